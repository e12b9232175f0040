"""Backward kernels (FlashAttention-2 style, deterministic, no atomics).

1. ``_bwd_preprocess``: delta = rowsum(dO * O) - dlse, fp32 (B, Hq, Sq).
2. ``_bwd_dkdv_kernel``: one program per (key tile, batch * kv_head). K and V stay in registers; query tiles of
   every query head of the GQA group are streamed, so dK/dV are summed over the group inside the program.
3. ``_bwd_dq_kernel``: one program per (query tile, batch * q_head); key tiles are streamed.

Every output element is written by exactly one program with a fixed reduction order, so results are
bit-identical run to run. Layouts as in ``forward.py``; dq/dk/dv are contiguous (B, S, H, D) in the input dtype.
"""

import torch
import triton
import triton.language as tl

from .. import configs
from .common import LOG2E, LOG2E_F, kv_tile_bounds, load_tile, mma, q_tile_bounds, store_tile, visible


@triton.jit
def _bwd_preprocess(O, DO, DLSE, DELTA,
                    stride_ob, stride_os, stride_oh, stride_dob, stride_dos, stride_doh,
                    q_heads, seqlen_q, num_m_tiles,
                    head_dim, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_M: tl.constexpr,
                    HAS_DLSE: tl.constexpr):
    pid = tl.program_id(0)
    bh = pid // num_m_tiles
    b = (bh // q_heads).to(tl.int64)
    h = bh % q_heads
    offs_m = (pid % num_m_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    o = load_tile(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :],
                  offs_m, seqlen_q, offs_d, head_dim, True, EVEN_D)
    do = load_tile(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dos + offs_d[None, :],
                   offs_m, seqlen_q, offs_d, head_dim, True, EVEN_D)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    row = bh.to(tl.int64) * seqlen_q + offs_m
    if HAS_DLSE:
        delta -= tl.load(DLSE + row, mask=offs_m < seqlen_q, other=0.0)
    tl.store(DELTA + row, delta, mask=offs_m < seqlen_q)


@triton.jit
def _load_row_stats(LSE, DELTA, rows, seqlen_q):
    """lse in log2 units (+inf for padding rows and rows that saw no key, so their p is 0) and delta."""
    lse = tl.load(LSE + rows, mask=rows < seqlen_q, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse) * LOG2E
    delta = tl.load(DELTA + rows, mask=rows < seqlen_q, other=0.0)
    return lse, delta


@triton.jit
def _dkdv_tiles(dk, dv, k, v, q_ptrs, do_ptrs, LSE, DELTA, stride_qs, stride_dos,
                offs_m, offs_n, offs_d, lo, hi, seqlen_q, diag_offset, qk_scale,
                head_dim, EVEN_D: tl.constexpr, BLOCK_M: tl.constexpr,
                CAUSAL: tl.constexpr, MASKED: tl.constexpr, FP32: tl.constexpr):
    """Accumulate dK, dV of one key tile over query tiles [lo, hi) of one query head (transposed form)."""
    for start_m in tl.range(lo, hi, BLOCK_M):
        rows = start_m + offs_m
        q = load_tile(q_ptrs + start_m * stride_qs, rows, seqlen_q, offs_d, head_dim, True, EVEN_D)
        lse, delta = _load_row_stats(LSE, DELTA, rows, seqlen_q)
        p_t = tl.math.exp2(mma(k, tl.trans(q), None, FP32) * qk_scale - lse[None, :])
        if MASKED:
            if CAUSAL:
                p_t = tl.where(offs_n[:, None] <= rows[None, :] + diag_offset, p_t, 0.0)
        do = load_tile(do_ptrs + start_m * stride_dos, rows, seqlen_q, offs_d, head_dim, True, EVEN_D)
        dv = mma(p_t.to(do.dtype), do, dv, FP32)
        dp_t = mma(v, tl.trans(do), None, FP32)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = mma(ds_t.to(q.dtype), q, dk, FP32)
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV,
                     stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
                     stride_vb, stride_vs, stride_vh, stride_dob, stride_dos, stride_doh,
                     stride_dkb, stride_dks, stride_dkh, stride_dvb, stride_dvs, stride_dvh,
                     q_heads, kv_heads, group, seqlen_q, seqlen_k, num_n_tiles, qk_scale, sm_scale,
                     head_dim, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, FP32: tl.constexpr):
    pid = tl.program_id(0)
    bhk = pid // num_n_tiles
    start_n = (pid % num_n_tiles) * BLOCK_N  # causal: low key tiles have the most work and run first
    b = (bhk // kv_heads).to(tl.int64)
    hk = bhk % kv_heads
    diag_offset = seqlen_k - seqlen_q

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k = load_tile(K + b * stride_kb + hk * stride_kh + offs_n[:, None] * stride_ks + offs_d[None, :],
                  offs_n, seqlen_k, offs_d, head_dim, True, EVEN_D)
    v = load_tile(V + b * stride_vb + hk * stride_vh + offs_n[:, None] * stride_vs + offs_d[None, :],
                  offs_n, seqlen_k, offs_d, head_dim, True, EVEN_D)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    lo, full_start = q_tile_bounds(start_n, seqlen_q, diag_offset, BLOCK_M, BLOCK_N, CAUSAL)
    for g in range(0, group):
        h = hk * group + g
        q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :]
        do_ptrs = DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dos + offs_d[None, :]
        row0 = (b * q_heads + h) * seqlen_q
        dk, dv = _dkdv_tiles(dk, dv, k, v, q_ptrs, do_ptrs, LSE + row0, DELTA + row0, stride_qs, stride_dos,
                             offs_m, offs_n, offs_d, lo, full_start, seqlen_q, diag_offset, qk_scale,
                             head_dim, EVEN_D, BLOCK_M, CAUSAL, True, FP32)
        dk, dv = _dkdv_tiles(dk, dv, k, v, q_ptrs, do_ptrs, LSE + row0, DELTA + row0, stride_qs, stride_dos,
                             offs_m, offs_n, offs_d, full_start, seqlen_q, seqlen_q, diag_offset, qk_scale,
                             head_dim, EVEN_D, BLOCK_M, CAUSAL, False, FP32)

    dk = dk * sm_scale
    store_tile(DK + b * stride_dkb + hk * stride_dkh + offs_n[:, None] * stride_dks + offs_d[None, :],
               dk.to(DK.dtype.element_ty), offs_n, seqlen_k, offs_d, head_dim, EVEN_D)
    store_tile(DV + b * stride_dvb + hk * stride_dvh + offs_n[:, None] * stride_dvs + offs_d[None, :],
               dv.to(DV.dtype.element_ty), offs_n, seqlen_k, offs_d, head_dim, EVEN_D)


@triton.jit
def _dq_tiles(dq, q, do, lse, delta, k_ptrs, v_ptrs, stride_ks, stride_vs,
              offs_m, offs_n, offs_d, lo, hi, seqlen_k, diag_offset, qk_scale,
              head_dim, EVEN_D: tl.constexpr, BLOCK_N: tl.constexpr,
              CAUSAL: tl.constexpr, MASKED: tl.constexpr, FP32: tl.constexpr):
    """Accumulate dQ of one query tile over key tiles [lo, hi)."""
    for start_n in tl.range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        k = load_tile(k_ptrs + start_n * stride_ks, cols, seqlen_k, offs_d, head_dim, MASKED, EVEN_D)
        v = load_tile(v_ptrs + start_n * stride_vs, cols, seqlen_k, offs_d, head_dim, MASKED, EVEN_D)
        p = tl.math.exp2(mma(q, tl.trans(k), None, FP32) * qk_scale - lse[:, None])
        if MASKED:
            p = tl.where(visible(offs_m, cols, seqlen_k, diag_offset, CAUSAL), p, 0.0)
        dp = mma(do, tl.trans(v), None, FP32)
        ds = p * (dp - delta[:, None])
        dq = mma(ds.to(k.dtype), k, dq, FP32)
    return dq


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ,
                   stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
                   stride_vb, stride_vs, stride_vh, stride_dob, stride_dos, stride_doh,
                   stride_dqb, stride_dqs, stride_dqh,
                   q_heads, group, seqlen_q, seqlen_k, num_m_tiles, qk_scale, sm_scale,
                   head_dim, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, FP32: tl.constexpr):
    pid = tl.program_id(0)
    bh = pid // num_m_tiles
    tile = pid % num_m_tiles
    if CAUSAL:
        tile = num_m_tiles - 1 - tile  # longest tiles first
    b = (bh // q_heads).to(tl.int64)
    h = bh % q_heads
    hk = h // group
    diag_offset = seqlen_k - seqlen_q

    start_m = tile * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q = load_tile(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :],
                  offs_m, seqlen_q, offs_d, head_dim, True, EVEN_D)
    do = load_tile(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dos + offs_d[None, :],
                   offs_m, seqlen_q, offs_d, head_dim, True, EVEN_D)
    lse, delta = _load_row_stats(LSE + bh.to(tl.int64) * seqlen_q, DELTA + bh.to(tl.int64) * seqlen_q,
                                 offs_m, seqlen_q)
    k_ptrs = K + b * stride_kb + hk * stride_kh + offs_n[:, None] * stride_ks + offs_d[None, :]
    v_ptrs = V + b * stride_vb + hk * stride_vh + offs_n[:, None] * stride_vs + offs_d[None, :]
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    full_end, hi = kv_tile_bounds(start_m, seqlen_k, diag_offset, BLOCK_M, BLOCK_N, CAUSAL)
    dq = _dq_tiles(dq, q, do, lse, delta, k_ptrs, v_ptrs, stride_ks, stride_vs, offs_m, offs_n, offs_d,
                   0, full_end, seqlen_k, diag_offset, qk_scale, head_dim, EVEN_D, BLOCK_N, CAUSAL, False, FP32)
    dq = _dq_tiles(dq, q, do, lse, delta, k_ptrs, v_ptrs, stride_ks, stride_vs, offs_m, offs_n, offs_d,
                   full_end, hi, seqlen_k, diag_offset, qk_scale, head_dim, EVEN_D, BLOCK_N, CAUSAL, True, FP32)
    dq = dq * sm_scale
    store_tile(DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqs + offs_d[None, :],
               dq.to(DQ.dtype.element_ty), offs_m, seqlen_q, offs_d, head_dim, EVEN_D)


def attention_backward(dout, q, k, v, out, lse, dlse, causal: bool, softmax_scale: float,
                       cfg: "configs.BackwardConfig | None" = None):
    """Launch the three backward kernels. dout/q/k/v/out: last stride 1. lse fp32 (B, Hq, Sq) contiguous.

    dlse: optional gradient w.r.t. lse (B, Hq, Sq) or None; ``cfg`` overrides the table (tuning).
    Returns (dq, dk, dv), contiguous, input dtype.
    """
    batch, seqlen_q, q_heads, head_dim = q.shape
    seqlen_k, kv_heads = k.shape[1], k.shape[2]
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    if seqlen_q == 0 or seqlen_k == 0 or batch == 0 or q_heads == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    cfg = cfg or configs.backward_config(q.device, q.dtype, head_dim, causal)
    block_d = configs.padded_head_dim(head_dim)
    even_d = block_d == head_dim
    fp32 = q.dtype == torch.float32
    group = q_heads // kv_heads
    qk_scale = softmax_scale * LOG2E_F

    delta = torch.empty((batch, q_heads, seqlen_q), dtype=torch.float32, device=q.device)
    if dlse is not None:
        dlse = dlse.to(torch.float32).contiguous()
    num_m_pre = triton.cdiv(seqlen_q, cfg.pre_block_m)
    _bwd_preprocess[(num_m_pre * batch * q_heads,)](
        out, dout, dlse if dlse is not None else delta, delta,
        out.stride(0), out.stride(1), out.stride(2), dout.stride(0), dout.stride(1), dout.stride(2),
        q_heads, seqlen_q, num_m_pre,
        head_dim, BLOCK_D=block_d, EVEN_D=even_d, BLOCK_M=cfg.pre_block_m, HAS_DLSE=dlse is not None,
    )

    kv = cfg.dkdv
    num_n_tiles = triton.cdiv(seqlen_k, kv.block_n)
    _bwd_dkdv_kernel[(num_n_tiles * batch * kv_heads,)](
        q, k, v, dout, lse, delta, dk, dv,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), dout.stride(0), dout.stride(1), dout.stride(2),
        dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
        q_heads, kv_heads, group, seqlen_q, seqlen_k, num_n_tiles, qk_scale, softmax_scale,
        head_dim, BLOCK_D=block_d, EVEN_D=even_d, BLOCK_M=kv.block_m, BLOCK_N=kv.block_n, CAUSAL=causal, FP32=fp32,
        num_warps=kv.num_warps, num_stages=kv.num_stages,
    )

    qc = cfg.dq
    num_m_tiles = triton.cdiv(seqlen_q, qc.block_m)
    _bwd_dq_kernel[(num_m_tiles * batch * q_heads,)](
        q, k, v, dout, lse, delta, dq,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), dout.stride(0), dout.stride(1), dout.stride(2),
        dq.stride(0), dq.stride(1), dq.stride(2),
        q_heads, group, seqlen_q, seqlen_k, num_m_tiles, qk_scale, softmax_scale,
        head_dim, BLOCK_D=block_d, EVEN_D=even_d, BLOCK_M=qc.block_m, BLOCK_N=qc.block_n, CAUSAL=causal, FP32=fp32,
        num_warps=qc.num_warps, num_stages=qc.num_stages,
    )
    return dq, dk, dv
