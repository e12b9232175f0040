"""Forward kernel: one program per (query tile, batch * q_head), K/V tiles streamed, online softmax.

Layouts: q (B, Sq, Hq, Dqk), k (B, Sk, Hkv, Dqk), v (B, Sk, Hkv, Dv), any strides with the last one 1
(varlen: B = 1 and rows of all sequences packed, see ``common``); out (..., Hq, Dv) contiguous in q's dtype;
lse fp32, natural log, -inf for rows that see no key (ln(exp(sink)) = sink with a sink).
GQA: query head h reads kv head h // (Hq // Hkv) directly (no copies).
Features are constexpr flags: window bounds (HAS_LEFT/HAS_RIGHT; causal = right bound 0), softcap, ALiBi,
sink, dropout, varlen.
"""

import torch
import triton
import triton.language as tl

from .. import autotune, configs
from .common import (LN2, LOG2E, dropout_keep, feature_scalars, kv_tile_range, load_tile, mma, residual_store_value,
                     scores, seq_bounds, store_tile, visible)
from . import gluon_forward, plans
from .gluon_common import portable_softcap_fixed_max
from .launch import host_descriptor, launch, tma_aligned
from .params import forward_outputs, residual_like


@triton.jit
def _probs(s, m_i, rows, cols, seqlen_k, diag, win_left, win_right, qk_scale, softcap, slope,
           HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
           MASK: tl.constexpr, IN_DTYPE: tl.constexpr):
    """Raw q.k products of one tile -> (new row max, the shift used, unnormalised probabilities), log2 units.
    HAS_SOFTCAP == 2 (bf16 softcap <= 50, no ALiBi: ``portable_softcap_fixed_max``): the max stays 0, as every score
    is at most softcap * log2 e <= 72.2, so no row max is taken and the caller skips O's rescale (alpha = 1)."""
    if HAS_SOFTCAP == 2:
        s, _ = scores(s, rows[:, None], cols[None, :], diag, qk_scale, softcap, slope, HAS_SOFTCAP, HAS_ALIBI,
                      IN_DTYPE)
        if MASK:
            s = tl.where(visible(rows[:, None], cols[None, :], seqlen_k, diag, win_left, win_right,
                                 HAS_LEFT, HAS_RIGHT), s, float("-inf"))
        m_new = m_i
        m_use = m_i
        p = tl.math.exp2(s)
    elif not MASK and not HAS_SOFTCAP and not HAS_ALIBI:
        # Hot path: scale folded into the row max and into one FMA before exp2.
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        m_use = m_new
        p = tl.math.exp2(s * qk_scale - m_use[:, None])
    else:
        s, _ = scores(s, rows[:, None], cols[None, :], diag, qk_scale, softcap, slope, HAS_SOFTCAP, HAS_ALIBI,
                      IN_DTYPE)
        if MASK:
            s = tl.where(visible(rows[:, None], cols[None, :], seqlen_k, diag, win_left, win_right,
                                 HAS_LEFT, HAS_RIGHT), s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # Rows that have seen no key yet keep m = -inf; shift by 0 so exp2 gives 0, not NaN.
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = m_new
        p = tl.math.exp2(s - m_use[:, None])
    return m_new, m_use, p


@triton.jit
def _fwd_tiles(acc, m_i, l_i, q, k_ptrs, v_ptrs, stride_ks, stride_vs, rows, offs_n, offs_dqk, offs_dv,
               lo, hi, full_lo, full_hi, seqlen_k, diag, win_left, win_right, qk_scale, softcap, slope,
               seed, rng_offset, row_base, max_seqlen_k, dropout_p,
               dqk, dv, K_DESC, V_DESC, desc_b, desc_row0, hk, BT_ROW, page_size, stride_kp, stride_vp,
               EVEN_DQK: tl.constexpr, EVEN_DV: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
               HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
               HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr, MASKED: tl.constexpr, FP32: tl.constexpr,
               USE_TMA: tl.constexpr, PAGED: tl.constexpr, EVEN_N: tl.constexpr, IS_VARLEN: tl.constexpr):
    """Online-softmax update of (acc, m_i, l_i) over key tiles [lo, hi). Scores in log2 units.

    MASKED: 0 = every tile fully visible (no masks, software-pipelined); 1 = every tile masked (unpipelined: few
    tiles); 2 = one pipelined loop over all of a query tile's keys, masking only the tiles outside
    [full_lo, full_hi) (a uniform branch per tile): a window's or the diagonal's edge tiles then cost no
    separate loop, whose unpipelined loads exposed their latency (NOTES.md, v10c; with TMA loads the merged loop
    cost more than it saved until the TMA path stopped zeroing V for batched calls: v11a, configs.merge_edges).

    PAGED: k_ptrs / v_ptrs point at the head's first element ([1, BLOCK_D]); key position j lives in page
    BT_ROW[j // page_size] (page strides stride_kp / stride_vp), slot j % page_size (strides stride_ks / stride_vs).

    USE_TMA: K/V tiles come through host-built 4-D tensor descriptors (B, S, Hkv, D) with block
    (1, BLOCK_N, 1, BLOCK_D) (TMA on Hopper; rows past the tensor and columns past the head dim read as zero)
    instead of pointer loads. Rows past the sequence inside the tensor (varlen) are masked like any key tail, and
    varlen zeroes their V rows (they hold the next sequence's values; p = 0 there, but 0 * NaN = NaN). Batched
    calls skip that zeroing: their rows past the keys are past the tensor and read as zeros already, and the
    zeroing costs a V round trip shared memory -> registers -> shared memory on every tile it guards."""
    # Masked tiles are few (the diagonal / the edges): no software pipelining for them, which saves registers.
    for start_n in tl.range(lo, hi, BLOCK_N, num_stages=1 if MASKED == 1 else None):
        cols = start_n + offs_n
        if USE_TMA:
            k = K_DESC.load([desc_b, desc_row0 + start_n, hk, 0]).reshape([BLOCK_N, BLOCK_DQK])
        elif PAGED:
            page = tl.load(BT_ROW + cols // page_size, mask=cols < seqlen_k, other=0).to(tl.int64)
            slot = cols % page_size
            k = load_tile(k_ptrs + (page * stride_kp + slot * stride_ks)[:, None], cols, seqlen_k, offs_dqk, dqk,
                          MASKED != 0, EVEN_DQK)
        elif MASKED == 2:  # rows past the keys read the last key instead of a predicate per row in every tile:
            # the edge mask gives them p = 0 (EVEN_N: no tile reaches past the keys)
            k_tile = k_ptrs + start_n * stride_ks
            v_tile = v_ptrs + start_n * stride_vs
            if not EVEN_N:
                shift = tl.minimum(cols, seqlen_k - 1) - cols  # 0, or back to the last key
                k_tile += (shift * stride_ks)[:, None]
                v_tile += (shift * stride_vs)[:, None]
            k = load_tile(k_tile, cols, seqlen_k, offs_dqk, dqk, False, EVEN_DQK)
        else:
            k = load_tile(k_ptrs + start_n * stride_ks, cols, seqlen_k, offs_dqk, dqk, MASKED != 0, EVEN_DQK)
        s = mma(q, tl.trans(k), None, FP32)
        if MASKED == 2:
            # The branch only masks the scores (raw q.k, or the softcap/ALiBi scores): Triton 3.6's pipeliner
            # fails on a branch that yields the probabilities feeding the PV matmul.
            if HAS_SOFTCAP or HAS_ALIBI:
                s, _ = scores(s, rows[:, None], cols[None, :], diag, qk_scale, softcap, slope, HAS_SOFTCAP,
                              HAS_ALIBI, q.dtype)
            if (start_n < full_lo) | (start_n >= full_hi):
                s = tl.where(visible(rows[:, None], cols[None, :], seqlen_k, diag, win_left, win_right,
                                     HAS_LEFT, HAS_RIGHT), s, float("-inf"))
            if HAS_SOFTCAP == 2:  # the fixed max (_probs)
                m_new = m_i
                m_use = m_i
                p = tl.math.exp2(s)
            else:
                if HAS_SOFTCAP or HAS_ALIBI:
                    m_new = tl.maximum(m_i, tl.max(s, 1))
                else:  # raw products: the scale (> 0) folds into the max and the exp2's FMA, as in _probs
                    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
                    s = s * qk_scale
                m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no key yet: exp2 gives 0
                p = tl.math.exp2(s - m_use[:, None])
        else:
            m_new, m_use, p = _probs(s, m_i, rows, cols, seqlen_k, diag, win_left, win_right, qk_scale, softcap,
                                     slope, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, HAS_ALIBI, MASKED == 1, q.dtype)
        if HAS_SOFTCAP == 2:  # the fixed max: no rescale
            l_i = l_i + tl.sum(p, 1)
        else:
            alpha = tl.math.exp2(m_i - m_use)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None]
        if HAS_DROPOUT:
            keep = dropout_keep(seed, rng_offset, rows[:, None], cols[None, :], row_base, max_seqlen_k, dropout_p)
            p = tl.where(keep, p / (1.0 - dropout_p), 0.0)
        if USE_TMA:
            v = V_DESC.load([desc_b, desc_row0 + start_n, hk, 0]).reshape([BLOCK_N, BLOCK_DV])
            if IS_VARLEN:  # rows past this sequence belong to the next one (p = 0 there, 0 * NaN = NaN)
                if MASKED == 1:
                    v = tl.where((cols < seqlen_k)[:, None], v, 0.0)
                elif MASKED == 2:
                    if start_n + BLOCK_N > seqlen_k:
                        v = tl.where((cols < seqlen_k)[:, None], v, 0.0)
        elif PAGED:
            v = load_tile(v_ptrs + (page * stride_vp + slot * stride_vs)[:, None], cols, seqlen_k, offs_dv, dv,
                          MASKED != 0, EVEN_DV)
        elif MASKED == 2:
            v = load_tile(v_tile, cols, seqlen_k, offs_dv, dv, False, EVEN_DV)
        else:
            v = load_tile(v_ptrs + start_n * stride_vs, cols, seqlen_k, offs_dv, dv, MASKED != 0, EVEN_DV)
        acc = mma(p.to(v.dtype), v, acc, FP32)
        m_i = m_new
    return acc, m_i, l_i


# Lengths and tile counts are not specialised on the value 1: with both seqlen_k == 1 and one query tile
# constant-folded, ptxas (triton 3.6, sm_90a) crashes (SIGSEGV) on the causal fp16/bf16 forward.
@triton.jit(do_not_specialize=["max_seqlen_q", "max_seqlen_k", "num_m_tiles"])
def _fwd_kernel(Q, K, V, O, LSE, RESID, CU_Q, CU_K, ALIBI, SINK, RNG, K_DESC, V_DESC, BLOCK_TABLE,
                stride_qb, stride_qs, stride_qh,
                stride_kb, stride_ks, stride_kh,
                stride_vb, stride_vs, stride_vh,
                stride_ob, stride_os, stride_oh,
                stride_lb, stride_lh, stride_ab, stride_bt, page_size,
                q_heads, group, max_seqlen_q, max_seqlen_k, num_m_tiles,
                qk_scale, softcap, win_left, win_right, dropout_p,
                dqk, dv, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
                EVEN_DQK: tl.constexpr, EVEN_DV: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                HAS_ALIBI: tl.constexpr, HAS_SINK: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                IS_VARLEN: tl.constexpr, FP32: tl.constexpr, USE_TMA: tl.constexpr, PAGED: tl.constexpr,
                STORE_RESID: tl.constexpr, MERGE_EDGES: tl.constexpr, EVEN_N: tl.constexpr):
    pid = tl.program_id(0)
    bh = pid // num_m_tiles
    tile = pid % num_m_tiles
    if HAS_RIGHT and not HAS_LEFT:
        tile = num_m_tiles - 1 - tile  # causal: longest tiles first
    b = bh // q_heads
    h = bh % q_heads
    hk = h // group
    q_start, seqlen_q = seq_bounds(CU_Q, b, max_seqlen_q, IS_VARLEN)
    k_start, seqlen_k = seq_bounds(CU_K, b, max_seqlen_k, IS_VARLEN)
    start_m = tile * BLOCK_M
    if IS_VARLEN:
        if start_m >= seqlen_q:  # this sequence is shorter than the longest
            return
    diag = seqlen_k - seqlen_q
    rows = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_dqk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)

    b64 = b.to(tl.int64)
    # 64-bit base of the tile (batch and sequence start); in-sequence offsets stay 32-bit (api.check_int32_offsets).
    row0 = (q_start + start_m).to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    q_ptrs = Q + b64 * stride_qb + h * stride_qh + row0 * stride_qs + offs_m[:, None] * stride_qs + offs_dqk[None, :]
    if PAGED:  # K/V: paged caches (num_blocks, page_size, Hkv, D); sequence b's pages in BLOCK_TABLE[b]
        k_ptrs = K + hk * stride_kh + offs_dqk[None, :]
        v_ptrs = V + hk * stride_vh + offs_dv[None, :]
    else:
        k_ptrs = K + b64 * stride_kb + k_start.to(tl.int64) * stride_ks + hk * stride_kh \
            + offs_n[:, None] * stride_ks + offs_dqk[None, :]
        v_ptrs = V + b64 * stride_vb + k_start.to(tl.int64) * stride_vs + hk * stride_vh \
            + offs_n[:, None] * stride_vs + offs_dv[None, :]
    bt_row = BLOCK_TABLE + b64 * stride_bt

    q = load_tile(q_ptrs, rows, seqlen_q, offs_dqk, dqk, True, EVEN_DQK)
    m_i = tl.full([BLOCK_M], 0.0 if HAS_SOFTCAP == 2 else float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    slope, seed, rng_offset, row_base = feature_scalars(ALIBI, RNG, b, h, bh, stride_ab, max_seqlen_q,
                                                        HAS_ALIBI, HAS_DROPOUT)

    lo, full_lo, full_hi, hi = kv_tile_range(start_m, seqlen_k, diag, win_left, win_right, BLOCK_M, BLOCK_N,
                                             HAS_LEFT, HAS_RIGHT)
    desc_b = b
    if IS_VARLEN:  # one packed "batch": rows from k_start
        desc_b = 0
    # the kernel's loops over key tiles: MERGE_EDGES one pipelined loop over [lo, hi) (edge tiles masked by a
    # uniform branch), else a masked loop per edge around the unmasked full tiles (see _fwd_tiles)
    main_lo = full_lo
    main_hi = full_hi
    if MERGE_EDGES:
        main_lo = lo
        main_hi = hi
    if HAS_LEFT and not MERGE_EDGES:
        acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, q, k_ptrs, v_ptrs, stride_ks, stride_vs, rows, offs_n, offs_dqk,
                                   offs_dv, lo, full_lo, full_lo, full_hi, seqlen_k, diag, win_left, win_right,
                                   qk_scale, softcap, slope, seed, rng_offset, row_base, max_seqlen_k, dropout_p,
                                   dqk, dv, K_DESC, V_DESC, desc_b, k_start, hk, bt_row, page_size, stride_kb,
                                   stride_vb, EVEN_DQK, EVEN_DV, BLOCK_N, BLOCK_DQK, BLOCK_DV, HAS_LEFT, HAS_RIGHT,
                                   HAS_SOFTCAP, HAS_ALIBI, HAS_DROPOUT, 1, FP32, USE_TMA, PAGED, EVEN_N, IS_VARLEN)
    acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, q, k_ptrs, v_ptrs, stride_ks, stride_vs, rows, offs_n, offs_dqk,
                               offs_dv, main_lo, main_hi, full_lo, full_hi, seqlen_k, diag, win_left, win_right,
                               qk_scale, softcap, slope, seed, rng_offset, row_base, max_seqlen_k, dropout_p,
                               dqk, dv, K_DESC, V_DESC, desc_b, k_start, hk, bt_row, page_size, stride_kb,
                               stride_vb, EVEN_DQK, EVEN_DV, BLOCK_N, BLOCK_DQK, BLOCK_DV, HAS_LEFT, HAS_RIGHT,
                               HAS_SOFTCAP, HAS_ALIBI, HAS_DROPOUT, 2 if MERGE_EDGES else 0, FP32, USE_TMA, PAGED,
                               EVEN_N, IS_VARLEN)
    if not MERGE_EDGES:
        acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, q, k_ptrs, v_ptrs, stride_ks, stride_vs, rows, offs_n, offs_dqk,
                                   offs_dv, full_hi, hi, full_lo, full_hi, seqlen_k, diag, win_left, win_right,
                                   qk_scale, softcap, slope, seed, rng_offset, row_base, max_seqlen_k, dropout_p,
                                   dqk, dv, K_DESC, V_DESC, desc_b, k_start, hk, bt_row, page_size, stride_kb,
                                   stride_vb, EVEN_DQK, EVEN_DV, BLOCK_N, BLOCK_DQK, BLOCK_DV, HAS_LEFT, HAS_RIGHT,
                                   HAS_SOFTCAP, HAS_ALIBI, HAS_DROPOUT, 1, FP32, USE_TMA, PAGED, EVEN_N, IS_VARLEN)
    if HAS_SINK:  # the sink joins the denominator with no value
        sink = tl.load(SINK + h).to(tl.float32) * LOG2E
        m_new = tl.maximum(m_i, sink)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a -inf sink on a row with no key: stay 0 / -inf
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.math.exp2(sink - m_use)
        acc = acc * alpha[:, None]
        m_i = m_new

    # Rows that saw no key: l = 0, m = -inf -> out 0, lse = -inf.
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    acc = acc / l_safe[:, None]
    lse = (m_i + tl.math.log2(l_i)) * LN2
    tl.store(LSE + b64 * stride_lb + h.to(tl.int64) * stride_lh + q_start + rows, lse, mask=rows < seqlen_q)
    o_offs = b64 * stride_ob + h * stride_oh + row0 * stride_os + offs_m[:, None] * stride_os + offs_dv[None, :]
    o = acc.to(O.dtype.element_ty)
    store_tile(O + o_offs, o, rows, seqlen_q, offs_dv, dv, EVEN_DV)
    if STORE_RESID:  # O's rounding residual (same layout as O) for the backward's delta: see backward.py
        store_tile(RESID + o_offs, residual_store_value(acc, o, RESID.dtype.element_ty), rows, seqlen_q, offs_dv,
                   dv, EVEN_DV)


def attention_forward(q, k, v, p, cfg=None, block_table=None, residual=False):
    """Launch the forward kernel. ``p`` is a validated :class:`tileattn.kernels.params.AttnParams`.

    q: (B, Sq, Hq, Dqk) (varlen: (1, total_q, Hq, Dqk)); k: (B, Sk, Hkv, Dqk); v: (B, Sk, Hkv, Dv).
    With ``block_table`` (B, max_pages) int32 (varlen only, forward only): k / v are paged caches
    (num_blocks, page_size, Hkv, D); key j of sequence b is in page block_table[b, j // page_size].
    Returns (out (B, Sq, Hq, Dv), lse fp32: (B, Hq, Sq), or (Hq, total_q) for varlen).
    ``residual=True`` (fp16/bf16, for the backward) returns a third tensor shaped and strided like out:
    r = O_fp32 - out, out's rounding residual in out's dtype (rows outside every varlen sequence unwritten).
    ``cfg`` overrides the tile table (tuning).
    """
    if cfg is None and block_table is None:  # through a launch plan where one stands (kernels/plans.py)
        return plans.forward_call(_launch_forward, q, k, v, p, residual)
    return _launch_forward(q, k, v, p, cfg, block_table, residual)


def _launch_forward(q, k, v, p, cfg=None, block_table=None, residual=False):
    """``attention_forward`` without the launch plans: the Hopper Gluon kernel where it applies, else the portable
    one."""
    gluon_cfg = gluon_forward.applies(q, k, v, p) if cfg is None and block_table is None else None
    if gluon_cfg is not None:  # Hopper fast path
        return gluon_forward.attention_forward(q, k, v, p, residual, gluon_cfg)
    _, rows_q, q_heads, dqk = q.shape
    kv_heads, dv = k.shape[2], v.shape[3]
    batch = p.batch
    out, lse, stride_lb, stride_lh = forward_outputs(q, dv, p)  # varlen rows outside every sequence: 0 / -inf
    resid = residual_like(out) if residual else None
    if out.numel() == 0 or p.max_seqlen_q == 0:
        return (out, lse, resid.zero_()) if residual else (out, lse)
    if cfg is None and autotune.applies(q, "TILEATTN_FWD_CONFIG"):  # opt-in (TILEATTN_AUTOTUNE=1), cached
        cfg = autotune.forward_config(q, max(dqk, dv), p, lambda c: attention_forward(q, k, v, p, c, block_table),
                                      paged=block_table is not None)
    cfg = cfg or configs.forward_config(q.device, q.dtype, max(dqk, dv), p.causal_like)
    num_m_tiles = configs.cdiv(p.max_seqlen_q, cfg.block_m)
    grid = (num_m_tiles * batch * q_heads,)
    dummy = lse
    block_dqk, block_dv = configs.padded_head_dim(dqk), configs.padded_head_dim(dv)
    paged = block_table is not None
    use_tma = configs.use_tma(q.device, q.dtype, max(dqk, dv), p.window_left >= 0, p.max_seqlen_k) and not paged
    descs = _kv_descriptors(k, v, cfg.block_n, block_dqk, block_dv) if use_tma else None
    kv_b = paged or not p.varlen  # K/V's leading stride: the page stride when paged, none for packed varlen
    qs, ks, vs, os_ = q.stride(), k.stride(), v.stride(), out.stride()  # one call each (host time)
    launch(_fwd_kernel, grid, (
        q, k, v, out, lse, resid if residual else dummy,
        p.cu_seqlens_q if p.varlen else dummy, p.cu_seqlens_k if p.varlen else dummy,
        p.alibi_slopes if p.alibi_slopes is not None else dummy,
        p.sink if p.sink is not None else dummy, p.rng if p.dropout_p > 0 else dummy,
        descs[0] if descs else k, descs[1] if descs else v, block_table if paged else dummy,
        0 if p.varlen else qs[0], qs[1], qs[2],
        ks[0] if kv_b else 0, ks[1], ks[2],
        vs[0] if kv_b else 0, vs[1], vs[2],
        0 if p.varlen else os_[0], os_[1], os_[2],
        stride_lb, stride_lh, p.alibi_stride_b, block_table.stride(0) if paged else 0,
        k.shape[1] if paged else 1,
        q_heads, q_heads // kv_heads, p.max_seqlen_q, p.max_seqlen_k, num_m_tiles,
        p.qk_scale, p.softcap_log2, p.window_left, p.window_right, p.dropout_p,
        dqk, dv), dict(
        BLOCK_DQK=block_dqk, BLOCK_DV=block_dv, EVEN_DQK=block_dqk == dqk, EVEN_DV=block_dv == dv,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        HAS_LEFT=p.window_left >= 0, HAS_RIGHT=p.window_right >= 0,
        HAS_SOFTCAP=2 if portable_softcap_fixed_max(p, q.dtype) else p.softcap > 0,
        HAS_ALIBI=p.alibi_slopes is not None, HAS_SINK=p.sink is not None, HAS_DROPOUT=p.dropout_p > 0,
        IS_VARLEN=p.varlen, FP32=q.dtype == torch.float32, USE_TMA=descs is not None, PAGED=paged,
        STORE_RESID=residual, MERGE_EDGES=configs.merge_edges(p.window_left >= 0, p.window_right >= 0),
        EVEN_N=not p.varlen and not paged and p.max_seqlen_k % cfg.block_n == 0),
        cfg.num_warps, cfg.num_stages)
    return (out, lse, resid) if residual else (out, lse)


def _kv_descriptors(k, v, block_n, block_dqk, block_dv):
    """Host tensor descriptors for K and V, (B, S, Hkv, D) with block (1, block_n, 1, block_d), or None when a
    tensor breaks TMA's rules (16-byte aligned base and strides) or is empty."""
    from triton.tools.tensor_descriptor import TensorDescriptor
    descs = []
    for t, block_d in ((k, block_dqk), (v, block_dv)):
        if t.numel() == 0 or not tma_aligned(t) or block_d * t.element_size() < 16:
            return None
        descs.append(host_descriptor(TensorDescriptor, t, [1, block_n, 1, block_d]))
    return descs
