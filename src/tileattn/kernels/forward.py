"""Forward kernel: one program per (query tile, batch * q_head), K/V tiles streamed, online softmax.

Layouts: q (B, Sq, Hq, D), k and v (B, Sk, Hkv, D), any strides with the last one 1; out (B, Sq, Hq, D)
contiguous in q's dtype; lse fp32 (B, Hq, Sq) contiguous, natural log, -inf for rows that see no key.
GQA: query head h reads kv head h // (Hq // Hkv) directly (no copies).
"""

import torch
import triton
import triton.language as tl

from .. import configs
from .common import LN2, LOG2E_F, kv_tile_bounds, load_tile, mma, store_tile, visible


@triton.jit
def _fwd_tiles(acc, m_i, l_i, q, k_ptrs, v_ptrs, stride_ks, stride_vs, offs_m, offs_n, offs_d,
               lo, hi, seqlen_k, diag_offset, qk_scale,
               head_dim, EVEN_D: tl.constexpr, BLOCK_N: tl.constexpr,
               CAUSAL: tl.constexpr, MASKED: tl.constexpr, FP32: tl.constexpr):
    """Online-softmax update of (acc, m_i, l_i) over key tiles [lo, hi). Scores in log2 units."""
    for start_n in tl.range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        k = load_tile(k_ptrs + start_n * stride_ks, cols, seqlen_k, offs_d, head_dim, MASKED, EVEN_D)
        s = mma(q, tl.trans(k), None, FP32)
        if MASKED:
            s = tl.where(visible(offs_m, cols, seqlen_k, diag_offset, CAUSAL), s * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # Rows that have seen no key yet keep m = -inf; shift by 0 so exp2 gives 0, not NaN.
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(s - m_use[:, None])
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
            m_use = m_new
            p = tl.math.exp2(s * qk_scale - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        v = load_tile(v_ptrs + start_n * stride_vs, cols, seqlen_k, offs_d, head_dim, MASKED, EVEN_D)
        acc = mma(p.to(v.dtype), v, acc, FP32)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE,
                stride_qb, stride_qs, stride_qh,
                stride_kb, stride_ks, stride_kh,
                stride_vb, stride_vs, stride_vh,
                stride_ob, stride_os, stride_oh,
                q_heads, group, seqlen_q, seqlen_k, num_m_tiles, qk_scale,
                head_dim, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                CAUSAL: tl.constexpr, FP32: tl.constexpr):
    pid = tl.program_id(0)
    bh = pid // num_m_tiles
    tile = pid % num_m_tiles
    if CAUSAL:
        tile = num_m_tiles - 1 - tile  # longest tiles first
    b = bh // q_heads
    h = bh % q_heads
    hk = h // group
    diag_offset = seqlen_k - seqlen_q

    start_m = tile * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)

    b64 = b.to(tl.int64)
    q_ptrs = Q + b64 * stride_qb + h * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :]
    k_ptrs = K + b64 * stride_kb + hk * stride_kh + offs_n[:, None] * stride_ks + offs_d[None, :]
    v_ptrs = V + b64 * stride_vb + hk * stride_vh + offs_n[:, None] * stride_vs + offs_d[None, :]

    q = load_tile(q_ptrs, offs_m, seqlen_q, offs_d, head_dim, True, EVEN_D)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    full_end, hi = kv_tile_bounds(start_m, seqlen_k, diag_offset, BLOCK_M, BLOCK_N, CAUSAL)
    acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, q, k_ptrs, v_ptrs, stride_ks, stride_vs, offs_m, offs_n, offs_d,
                               0, full_end, seqlen_k, diag_offset, qk_scale,
                               head_dim, EVEN_D, BLOCK_N, CAUSAL, False, FP32)
    acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, q, k_ptrs, v_ptrs, stride_ks, stride_vs, offs_m, offs_n, offs_d,
                               full_end, hi, seqlen_k, diag_offset, qk_scale,
                               head_dim, EVEN_D, BLOCK_N, CAUSAL, True, FP32)

    # Rows that saw no key: l = 0, m = -inf -> out 0, lse = -inf.
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    acc = acc / l_safe[:, None]
    lse = (m_i + tl.math.log2(l_i)) * LN2
    tl.store(LSE + bh.to(tl.int64) * seqlen_q + offs_m, lse, mask=offs_m < seqlen_q)
    o_ptrs = O + b64 * stride_ob + h * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :]
    store_tile(o_ptrs, acc.to(O.dtype.element_ty), offs_m, seqlen_q, offs_d, head_dim, EVEN_D)


def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, softmax_scale: float,
                      cfg: "configs.KernelConfig | None" = None):
    """Launch the forward kernel. Inputs are validated by the caller; ``cfg`` overrides the table (tuning).

    Returns (out, lse).
    """
    batch, seqlen_q, q_heads, head_dim = q.shape
    seqlen_k, kv_heads = k.shape[1], k.shape[2]
    out = torch.empty((batch, seqlen_q, q_heads, head_dim), dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, q_heads, seqlen_q), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    if seqlen_k == 0:
        out.zero_()
        lse.fill_(float("-inf"))
        return out, lse
    cfg = cfg or configs.forward_config(q.device, q.dtype, head_dim, causal)
    block_d = configs.padded_head_dim(head_dim)
    num_m_tiles = triton.cdiv(seqlen_q, cfg.block_m)
    grid = (num_m_tiles * batch * q_heads,)
    _fwd_kernel[grid](
        q, k, v, out, lse,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        q_heads, q_heads // kv_heads, seqlen_q, seqlen_k, num_m_tiles, softmax_scale * LOG2E_F,
        head_dim, BLOCK_D=block_d, EVEN_D=block_d == head_dim, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        CAUSAL=causal, FP32=q.dtype == torch.float32,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out, lse
