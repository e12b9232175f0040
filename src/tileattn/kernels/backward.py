"""Backward kernels (FlashAttention-2 style, deterministic, no atomics).

1. ``_bwd_dq_kernel``: one program per (query tile, batch * q_head); key tiles are streamed. It computes
   delta = rowsum(dO * O) - dlse for its rows (no separate preprocess kernel); for fp16/bf16 from O plus the
   forward's rounding residual, or corrected in the kernel (exact sum_j P dP). It writes delta (fp32, lse's
   layout: d(sink) reads it) and, for step 2, lse (log2 units) and delta again into the row-stats buffer, whose
   sequence slots start 16-aligned (``_row_stats_buffer``).
2. ``_bwd_dkdv_kernel``: one program per (key tile, batch * kv_head). K and V stay in registers; the query tiles
   of every query head of the GQA group are streamed, so dK/dV are summed over the group inside the program.
   On Hopper the warp-specialised Gluon kernel in ``gluon_backward.py`` replaces it for the calls it accepts.
With a sink, d(sink) = -sum over rows of exp(sink - lse) * delta, from the final delta, reduced in a fixed order.

Every output element is written by exactly one program with a fixed reduction order, so results are
bit-identical run to run. Layouts as in ``forward.py``; dq/dk/dv are contiguous, in the input dtype.
Dropout regenerates the forward's Philox mask from the same (seed, offset, b, h, i, j).
"""

import torch
import triton
import triton.language as tl

from .. import autotune, configs
from .._hostinfo import leaves_rows
from .common import (LOG2E, dropout_keep, feature_scalars, kv_tile_range, load_tile, mma, q_tile_range,
                     residual_value, scores, seq_bounds, stats_row0, store_tile, visible)
from . import fused_dq, gluon_backward, gluon_dq, plans
from .launch import launch


@triton.jit
def _load_lse(LSE, rows, seqlen_q):
    """lse in log2 units (+inf for padding rows and rows that saw no key, so their p is 0)."""
    lse = tl.load(LSE + rows, mask=rows < seqlen_q, other=float("inf"))
    return tl.where(lse == float("-inf"), float("inf"), lse) * LOG2E


@triton.jit
def _store_row_stats(DELTA, STATS, h, stride_sh, rows, seqlen_q, b, q_start, max_seqlen_q, stride_st, lse, delta,
                     IS_VARLEN: tl.constexpr):
    """The dQ kernel's outputs for d(sink) and the dK/dV kernel: delta in lse's layout (DELTA at the row's
    sequence and head), and the row-stats buffer's copies (head h's): aligned rows, lse in log2 units
    (``_row_stats_buffer``)."""
    tl.store(DELTA + rows, delta, mask=rows < seqlen_q)
    srows = STATS + h.to(tl.int64) * stride_sh + stats_row0(b, q_start, max_seqlen_q, IS_VARLEN) + rows
    tl.store(srows, lse, mask=rows < seqlen_q)
    tl.store(srows + stride_st, delta, mask=rows < seqlen_q)


@triton.jit
def _load_row_stats(LSE2, DELTA, rows, seqlen_q, CHECK_ROWS: tl.constexpr):
    """lse in log2 units (+inf for rows past the sequence and rows that saw no key, so their p is 0) and delta,
    from the row-stats buffer the dQ kernel wrote."""
    if CHECK_ROWS:
        lse = tl.load(LSE2 + rows, mask=rows < seqlen_q, other=float("inf"))
        delta = tl.load(DELTA + rows, mask=rows < seqlen_q, other=0.0)
    else:
        lse = tl.load(LSE2 + rows)
        delta = tl.load(DELTA + rows)
    return lse, delta


@triton.jit
def _dkdv_tiles(dk, dv, k, v, q_ptrs, do_ptrs, LSE2, DELTA, stride_qs, stride_dos,
                offs_m, cols, offs_dqk, offs_dv, lo, hi, seqlen_q, seqlen_k, diag, win_left, win_right,
                qk_scale, softcap, slope, seed, rng_offset, row_base, max_seqlen_k, dropout_p, dqk, dim_v,
                EVEN_DQK: tl.constexpr, EVEN_DV: tl.constexpr, BLOCK_M: tl.constexpr,
                HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr, MASKED: tl.constexpr, FP32: tl.constexpr,
                CHECK_ROWS: tl.constexpr):
    """Accumulate dK, dV of one key tile over query tiles [lo, hi) of one query head (transposed form).

    CHECK_ROWS: some tile may reach past the sequence's last row (its q/dO rows load as 0 and its lse as +inf);
    False for tiles that end inside the sequence, whose loads then need no row predicates (varlen's row bounds
    are runtime values, so each predicate would be per element)."""
    # Masked tiles stay software-pipelined here (unlike the forward): unpipelining them cost the backward ~20% with
    # a sliding window and ~1.5% at causal 1k (H200, runs 4 vs 5 in benchmarks/NOTES.md).
    for start_m in tl.range(lo, hi, BLOCK_M):
        rows = start_m + offs_m
        q = load_tile(q_ptrs + start_m * stride_qs, rows, seqlen_q, offs_dqk, dqk, CHECK_ROWS, EVEN_DQK)
        lse, delta = _load_row_stats(LSE2, DELTA, rows, seqlen_q, CHECK_ROWS)
        s_t, t_t = scores(mma(k, tl.trans(q), None, FP32), rows[None, :], cols[:, None], diag, qk_scale, softcap,
                          slope, HAS_SOFTCAP, HAS_ALIBI, q.dtype)
        p_t = tl.math.exp2(s_t - lse[None, :])
        if MASKED:
            p_t = tl.where(visible(rows[None, :], cols[:, None], seqlen_k, diag, win_left, win_right,
                                   HAS_LEFT, HAS_RIGHT), p_t, 0.0)
        do = load_tile(do_ptrs + start_m * stride_dos, rows, seqlen_q, offs_dv, dim_v, CHECK_ROWS, EVEN_DV)
        dp_t = mma(v, tl.trans(do), None, FP32)
        if HAS_DROPOUT:
            keep = dropout_keep(seed, rng_offset, rows[None, :], cols[:, None], row_base, max_seqlen_k, dropout_p)
            dv = mma(tl.where(keep, p_t / (1.0 - dropout_p), 0.0).to(do.dtype), do, dv, FP32)
            dp_t = tl.where(keep, dp_t / (1.0 - dropout_p), 0.0)
        else:
            dv = mma(p_t.to(do.dtype), do, dv, FP32)
        ds_t = p_t * (dp_t - delta[None, :])
        if HAS_SOFTCAP:
            ds_t = ds_t * (1.0 - t_t * t_t)
        dk = mma(ds_t.to(q.dtype), q, dk, FP32)
    return dk, dv


# Value-specialised like any Triton kernel: do_not_specialize (needed by the forward, see forward.py) also drops the
# divisible-by-16 hints, which halved the D=128 backward on the H200 (NOTES.md, v5); the backward kernels compile
# fine when seqlen_k == 1 is constant-folded (benchmarks/compile_check.py's regression cases).
@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, STATS, DK, DV, CU_Q, CU_K, ALIBI, RNG,
                     stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
                     stride_vb, stride_vs, stride_vh, stride_dob, stride_dos, stride_doh,
                     stride_dkb, stride_dks, stride_dkh, stride_dvb, stride_dvs, stride_dvh,
                     stride_sh, stride_st, stride_ab,
                     q_heads, kv_heads, group, max_seqlen_q, max_seqlen_k, num_n_tiles,
                     qk_scale, sm_scale, softcap, win_left, win_right, dropout_p,
                     dqk, dim_v, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
                     EVEN_DQK: tl.constexpr, EVEN_DV: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                     HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr, IS_VARLEN: tl.constexpr,
                     FP32: tl.constexpr, EVEN_M: tl.constexpr):
    pid = tl.program_id(0)
    bhk = pid // num_n_tiles
    start_n = (pid % num_n_tiles) * BLOCK_N  # causal: low key tiles have the most work and run first
    b = (bhk // kv_heads).to(tl.int64)
    hk = bhk % kv_heads
    q_start, seqlen_q = seq_bounds(CU_Q, b, max_seqlen_q, IS_VARLEN)
    k_start, seqlen_k = seq_bounds(CU_K, b, max_seqlen_k, IS_VARLEN)
    if IS_VARLEN:
        if start_n >= seqlen_k:  # this sequence is shorter than the longest
            return
    diag = seqlen_k - seqlen_q
    offs_m = tl.arange(0, BLOCK_M)
    cols = start_n + tl.arange(0, BLOCK_N)
    offs_dqk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    k_rows = (k_start + cols[:, None]).to(tl.int64)
    k = load_tile(K + b * stride_kb + hk * stride_kh + k_rows * stride_ks + offs_dqk[None, :],
                  cols, seqlen_k, offs_dqk, dqk, True, EVEN_DQK)
    v = load_tile(V + b * stride_vb + hk * stride_vh + k_rows * stride_vs + offs_dv[None, :],
                  cols, seqlen_k, offs_dv, dim_v, True, EVEN_DV)
    dk = tl.zeros([BLOCK_N, BLOCK_DQK], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)

    lo, full_lo, full_hi, hi = q_tile_range(start_n, seqlen_q, diag, win_left, win_right, BLOCK_M, BLOCK_N,
                                            HAS_LEFT, HAS_RIGHT)
    # Tiles before ``mid`` lie inside the sequence: no row predicates. EVEN_M (batched, seqlen_q a multiple of
    # BLOCK_M): every tile does. Otherwise the last partial tile joins the left-window tiles, or runs alone.
    mid = full_hi
    if not EVEN_M:
        mid = tl.minimum(tl.maximum(seqlen_q // BLOCK_M * BLOCK_M, full_lo), full_hi)
    tail_hi = full_hi
    if HAS_LEFT:
        tail_hi = hi
    srow0 = stats_row0(b, q_start, max_seqlen_q, IS_VARLEN)
    for g in range(0, group):
        h = hk * group + g
        q_ptrs = Q + b * stride_qb + q_start.to(tl.int64) * stride_qs + h * stride_qh \
            + offs_m[:, None] * stride_qs + offs_dqk[None, :]
        do_ptrs = DO + b * stride_dob + q_start.to(tl.int64) * stride_dos + h * stride_doh \
            + offs_m[:, None] * stride_dos + offs_dv[None, :]
        lse2 = STATS + h.to(tl.int64) * stride_sh + srow0  # this head's rows: lse (log2 units), then delta
        slope, seed, rng_offset, row_base = feature_scalars(ALIBI, RNG, b, h, b * q_heads + h, stride_ab,
                                                            max_seqlen_q, HAS_ALIBI, HAS_DROPOUT)
        if HAS_RIGHT:
            dk, dv = _dkdv_tiles(dk, dv, k, v, q_ptrs, do_ptrs, lse2, lse2 + stride_st, stride_qs, stride_dos,
                                 offs_m, cols, offs_dqk, offs_dv, lo, full_lo, seqlen_q, seqlen_k, diag, win_left,
                                 win_right, qk_scale, softcap, slope, seed, rng_offset, row_base, max_seqlen_k,
                                 dropout_p, dqk, dim_v, EVEN_DQK, EVEN_DV, BLOCK_M, HAS_LEFT,
                                 HAS_RIGHT, HAS_SOFTCAP, HAS_ALIBI, HAS_DROPOUT, True, FP32, not EVEN_M)
        dk, dv = _dkdv_tiles(dk, dv, k, v, q_ptrs, do_ptrs, lse2, lse2 + stride_st, stride_qs, stride_dos,
                             offs_m, cols, offs_dqk, offs_dv, full_lo, mid, seqlen_q, seqlen_k, diag, win_left,
                             win_right, qk_scale, softcap, slope, seed, rng_offset, row_base, max_seqlen_k,
                             dropout_p, dqk, dim_v, EVEN_DQK, EVEN_DV, BLOCK_M, HAS_LEFT,
                             HAS_RIGHT, HAS_SOFTCAP, HAS_ALIBI, HAS_DROPOUT, False, FP32, False)
        if HAS_LEFT or not EVEN_M:
            dk, dv = _dkdv_tiles(dk, dv, k, v, q_ptrs, do_ptrs, lse2, lse2 + stride_st, stride_qs, stride_dos,
                                 offs_m, cols, offs_dqk, offs_dv, mid, tail_hi, seqlen_q, seqlen_k, diag, win_left,
                                 win_right, qk_scale, softcap, slope, seed, rng_offset, row_base, max_seqlen_k,
                                 dropout_p, dqk, dim_v, EVEN_DQK, EVEN_DV, BLOCK_M, HAS_LEFT,
                                 HAS_RIGHT, HAS_SOFTCAP, HAS_ALIBI, HAS_DROPOUT, HAS_LEFT, FP32, not EVEN_M)

    dk = dk * sm_scale
    store_tile(DK + b * stride_dkb + hk * stride_dkh + k_rows * stride_dks + offs_dqk[None, :],
               dk.to(DK.dtype.element_ty), cols, seqlen_k, offs_dqk, dqk, EVEN_DQK)
    store_tile(DV + b * stride_dvb + hk * stride_dvh + k_rows * stride_dvs + offs_dv[None, :],
               dv.to(DV.dtype.element_ty), cols, seqlen_k, offs_dv, dim_v, EVEN_DV)


@triton.jit
def _dq_tiles(dq, pk, dsum, q, do, lse, delta, k_ptrs, v_ptrs, stride_ks, stride_vs, rows, offs_n, offs_dqk,
              offs_dv, lo, hi, seqlen_k, diag, win_left, win_right, qk_scale, softcap, slope,
              seed, rng_offset, row_base, max_seqlen_k, dropout_p, dqk, dim_v,
              EVEN_DQK: tl.constexpr, EVEN_DV: tl.constexpr, BLOCK_N: tl.constexpr,
              HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
              HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr, MASKED: tl.constexpr, FP32: tl.constexpr,
              CORRECT: tl.constexpr):
    """Accumulate dQ of one query tile over key tiles [lo, hi), with dS = P (dP - delta).
    CORRECT: also dsum = sum_j P dP (fp32) and pk = sum_j P' K (P' = P, times tanh' with a softcap), from which
    the kernel's epilogue corrects dQ for the rounding in delta."""
    # Masked tiles stay software-pipelined (see _dkdv_tiles).
    for start_n in tl.range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        k = load_tile(k_ptrs + start_n * stride_ks, cols, seqlen_k, offs_dqk, dqk, MASKED, EVEN_DQK)
        v = load_tile(v_ptrs + start_n * stride_vs, cols, seqlen_k, offs_dv, dim_v, MASKED, EVEN_DV)
        s, t = scores(mma(q, tl.trans(k), None, FP32), rows[:, None], cols[None, :], diag, qk_scale, softcap,
                      slope, HAS_SOFTCAP, HAS_ALIBI, q.dtype)
        p = tl.math.exp2(s - lse[:, None])
        if MASKED:
            p = tl.where(visible(rows[:, None], cols[None, :], seqlen_k, diag, win_left, win_right,
                                 HAS_LEFT, HAS_RIGHT), p, 0.0)
        dp = mma(do, tl.trans(v), None, FP32)
        if HAS_DROPOUT:
            keep = dropout_keep(seed, rng_offset, rows[:, None], cols[None, :], row_base, max_seqlen_k, dropout_p)
            dp = tl.where(keep, dp / (1.0 - dropout_p), 0.0)
        if CORRECT:
            dsum += tl.sum(p * dp, 1)
        ds = p * (dp - delta[:, None])
        if HAS_SOFTCAP:
            p = p * (1.0 - t * t)
            ds = ds * (1.0 - t * t)
        dq = mma(ds.to(k.dtype), k, dq, FP32)
        if CORRECT:
            pk = mma(p.to(k.dtype), k, pk, FP32)
    return dq, pk, dsum


@triton.jit  # value-specialised: see _bwd_dkdv_kernel
def _bwd_dq_kernel(Q, K, V, O, RESID, DO, LSE, DELTA, DLSE, DQ, STATS, CU_Q, CU_K, ALIBI, RNG,
                   stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
                   stride_vb, stride_vs, stride_vh, stride_ob, stride_os, stride_oh,
                   stride_dob, stride_dos, stride_doh,
                   stride_dqb, stride_dqs, stride_dqh, stride_lb, stride_lh, stride_sh, stride_st, stride_ab,
                   q_heads, group, max_seqlen_q, max_seqlen_k, num_m_tiles,
                   qk_scale, sm_scale, softcap, win_left, win_right, dropout_p,
                   dqk, dim_v, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
                   EVEN_DQK: tl.constexpr, EVEN_DV: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                   HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr, IS_VARLEN: tl.constexpr,
                   FP32: tl.constexpr, HAS_DLSE: tl.constexpr, HAS_RESID: tl.constexpr, CORRECT: tl.constexpr,
                   DELTA_CHUNK: tl.constexpr, STATS_ONLY: tl.constexpr = False):
    """dQ of one query tile; launched before the dK/dV kernel, for which it writes lse and delta (STATS).
    STATS_ONLY (the fused backward, ``fused_dq``): no key loop, the statistics only; DQ is then the fp32 dQ^T
    accumulator, whose rows (b * q_heads + h) * dqk + d (stride_dqs apart) get zeros over this tile's columns.

    delta d~ = rowsum(dO * O) - dlse is computed here in the prologue, from O and dO (no separate
    preprocess kernel and its launch; measured within ±1% of the separate kernel on the H200, run 11b).
    fp16/bf16: O rounded to the input dtype breaks the cancellation in dS = P (dP - delta) when the softmax is
    nearly one-hot (sweep #200), so delta must come from the unrounded O. Two ways (configs.delta_mode):
    HAS_RESID (default): the forward stored r = O_fp32 - O (RESID, O's layout and strides), and
    d = rowsum(dO * (O + r)) - dlse. The forward's O_fp32 sums bf16(P~) V, but P~'s row maximum is exactly 1,
    so it matches sum_j P dP to ~2^-9 of the non-maximal probability mass: as accurate as CORRECT on #200.
    CORRECT (no residual): the exact delta is d = sum_j P dP - dlse, so with e = d - d~ the exact dQ is
    sum_j P (dP - d~) K - e * sum_j P K: the kernel accumulates the second sum too (one more matmul), applies
    the correction, and writes d to DELTA. With neither (fp32, or the rounded benchmarking mode) it writes d~."""
    pid = tl.program_id(0)
    bh = pid // num_m_tiles
    tile = pid % num_m_tiles
    if HAS_RIGHT and not HAS_LEFT:
        tile = num_m_tiles - 1 - tile  # causal: longest tiles first
    b = (bh // q_heads).to(tl.int64)
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
    q_rows = (q_start + rows[:, None]).to(tl.int64)
    do_ptrs = DO + b * stride_dob + h * stride_doh + q_rows * stride_dos
    o_offs = b * stride_ob + h * stride_oh + q_rows * stride_os
    delta = tl.zeros([BLOCK_M], dtype=tl.float32)
    for d0 in tl.static_range(0, BLOCK_DV, DELTA_CHUNK):  # in column chunks: a whole O tile live
        # beside q and dO made ptxas spill 6x more at D=128 (812 vs 140 B, sm_90a)
        offs_c = d0 + tl.arange(0, DELTA_CHUNK)
        o_c = load_tile(O + o_offs + offs_c[None, :], rows, seqlen_q, offs_c, dim_v, True, EVEN_DV)
        if HAS_RESID:
            o_c = o_c.to(tl.float32) + residual_value(load_tile(RESID + o_offs + offs_c[None, :], rows, seqlen_q,
                                                                offs_c, dim_v, True, EVEN_DV), o_c)
        o_c = o_c.to(tl.float32)
        do_c = load_tile(do_ptrs + offs_c[None, :], rows, seqlen_q, offs_c, dim_v, True, EVEN_DV)
        delta += tl.sum(o_c * do_c.to(tl.float32), 1)
    if STATS_ONLY:  # the fused backward's pass (fused_dq): statistics, and the accumulator's rows zeroed
        row0 = b * stride_lb + h.to(tl.int64) * stride_lh + q_start
        if HAS_DLSE:
            delta -= tl.load(DLSE + row0 + rows, mask=rows < seqlen_q, other=0.0)
        _store_row_stats(DELTA + row0, STATS, h, stride_sh, rows, seqlen_q, b, q_start, max_seqlen_q, stride_st,
                         _load_lse(LSE + row0, rows, seqlen_q), delta, IS_VARLEN)
        tl.store(DQ + b * stride_dqb + h * stride_dqh + q_rows + offs_dqk[None, :].to(tl.int64) * stride_dqs,
                 tl.zeros([BLOCK_M, BLOCK_DQK], dtype=tl.float32),
                 mask=(rows[:, None] < seqlen_q) & (offs_dqk[None, :] < dqk))
        return
    q = load_tile(Q + b * stride_qb + h * stride_qh + q_rows * stride_qs + offs_dqk[None, :],
                  rows, seqlen_q, offs_dqk, dqk, True, EVEN_DQK)
    do = load_tile(do_ptrs + offs_dv[None, :], rows, seqlen_q, offs_dv, dim_v, True, EVEN_DV)
    row0 = b * stride_lb + h.to(tl.int64) * stride_lh + q_start
    if HAS_DLSE:
        dlse = tl.load(DLSE + row0 + rows, mask=rows < seqlen_q, other=0.0)
        delta -= dlse
    lse = _load_lse(LSE + row0, rows, seqlen_q)
    k_ptrs = K + b * stride_kb + k_start.to(tl.int64) * stride_ks + hk * stride_kh \
        + offs_n[:, None] * stride_ks + offs_dqk[None, :]
    v_ptrs = V + b * stride_vb + k_start.to(tl.int64) * stride_vs + hk * stride_vh \
        + offs_n[:, None] * stride_vs + offs_dv[None, :]
    dq = tl.zeros([BLOCK_M, BLOCK_DQK], dtype=tl.float32)
    pk = tl.zeros([BLOCK_M, BLOCK_DQK], dtype=tl.float32)
    dsum = tl.zeros([BLOCK_M], dtype=tl.float32)
    slope, seed, rng_offset, row_base = feature_scalars(ALIBI, RNG, b, h, bh, stride_ab, max_seqlen_q,
                                                        HAS_ALIBI, HAS_DROPOUT)

    lo, full_lo, full_hi, hi = kv_tile_range(start_m, seqlen_k, diag, win_left, win_right, BLOCK_M, BLOCK_N,
                                             HAS_LEFT, HAS_RIGHT)
    if HAS_LEFT:
        dq, pk, dsum = _dq_tiles(dq, pk, dsum, q, do, lse, delta, k_ptrs, v_ptrs, stride_ks, stride_vs, rows,
                                 offs_n, offs_dqk, offs_dv, lo, full_lo, seqlen_k, diag, win_left, win_right,
                                 qk_scale, softcap, slope, seed, rng_offset, row_base, max_seqlen_k, dropout_p,
                                 dqk, dim_v, EVEN_DQK, EVEN_DV, BLOCK_N, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP,
                                 HAS_ALIBI, HAS_DROPOUT, True, FP32, CORRECT)
    dq, pk, dsum = _dq_tiles(dq, pk, dsum, q, do, lse, delta, k_ptrs, v_ptrs, stride_ks, stride_vs, rows,
                             offs_n, offs_dqk, offs_dv, full_lo, full_hi, seqlen_k, diag, win_left, win_right,
                             qk_scale, softcap, slope, seed, rng_offset, row_base, max_seqlen_k, dropout_p,
                             dqk, dim_v, EVEN_DQK, EVEN_DV, BLOCK_N, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP,
                             HAS_ALIBI, HAS_DROPOUT, False, FP32, CORRECT)
    dq, pk, dsum = _dq_tiles(dq, pk, dsum, q, do, lse, delta, k_ptrs, v_ptrs, stride_ks, stride_vs, rows,
                             offs_n, offs_dqk, offs_dv, full_hi, hi, seqlen_k, diag, win_left, win_right,
                             qk_scale, softcap, slope, seed, rng_offset, row_base, max_seqlen_k, dropout_p,
                             dqk, dim_v, EVEN_DQK, EVEN_DV, BLOCK_N, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP,
                             HAS_ALIBI, HAS_DROPOUT, True, FP32, CORRECT)
    if CORRECT:
        if HAS_DLSE:
            dsum -= dlse
        dq -= (dsum - delta)[:, None] * pk
        delta = dsum
    _store_row_stats(DELTA + row0, STATS, h, stride_sh, rows, seqlen_q, b, q_start, max_seqlen_q, stride_st, lse,
                     delta, IS_VARLEN)
    dq = dq * sm_scale
    store_tile(DQ + b * stride_dqb + h * stride_dqh + q_rows * stride_dqs + offs_dqk[None, :],
               dq.to(DQ.dtype.element_ty), rows, seqlen_q, offs_dqk, dqk, EVEN_DQK)


def attention_backward(dout, q, k, v, out, lse, dlse, p, cfg=None, grads=None, resid=None):
    """Launch the two backward kernels. Shapes as in ``attention_forward``; ``p`` its AttnParams.

    dout/q/k/v/out: last stride 1. lse: the forward's. dlse: optional gradient w.r.t. lse (same shape) or None.
    Returns (dq, dk, dv, dsink): contiguous, input dtype; dsink fp32 (Hq,) or None without a sink.
    ``cfg`` overrides the tile table (tuning). ``grads``: optional preallocated (dq, dk, dv), any strides with the
    last one 1 (e.g. views of one packed qkv gradient), zero-filled when varlen rows may lie outside every
    sequence (``_hostinfo.leaves_rows``). ``resid``: the forward's
    rounding residual of out (``attention_forward(..., residual=True)``), or None (see ``_bwd_dq_kernel``).
    """
    empty = p.max_seqlen_q == 0 or p.max_seqlen_k == 0 or q.numel() == 0 or k.numel() == 0
    if cfg is None and not empty and autotune.applies(q, "TILEATTN_BWD_CONFIG"):  # opt-in; scratch gradients
        cfg = autotune.backward_config(
            q, max(q.shape[-1], v.shape[-1]), p,
            lambda c: attention_backward(dout, q, k, v, out, lse, dlse, p, c, resid=resid))
    if grads is not None:
        dq, dk, dv = grads
    else:  # varlen: rows outside every sequence get zero gradients; batched: every row is written.
        alloc_q = torch.zeros if leaves_rows(p.cu_seqlens_q, q.shape[1]) else torch.empty
        alloc_k = torch.zeros if leaves_rows(p.cu_seqlens_k, k.shape[1]) else torch.empty
        dq = alloc_q(q.shape, dtype=q.dtype, device=q.device)
        dk = alloc_k(k.shape, dtype=k.dtype, device=k.device)
        dv = alloc_k(v.shape, dtype=v.dtype, device=v.device)
    if empty:
        dq.zero_(), dk.zero_(), dv.zero_()
        # No keys anywhere: out = 0, so delta = -dlse (each row's sink probability is then exp(sink - lse) = 1).
        delta = -dlse.float() if dlse is not None else torch.zeros_like(lse)
    else:
        delta = plans.backward_call(_launch_backward, _backward_buffers, dout, q, k, v, out, lse, dlse, p, cfg,
                                    dq, dk, dv, resid)
    dsink = None
    if p.sink is not None:  # rows outside every sequence (varlen) have lse = -inf: no share
        rows = torch.where(lse == float("-inf"), 0.0, -torch.exp(_sink_rows(p) - lse) * delta)
        dsink = rows.sum(dim=-1) if p.varlen else rows.sum(dim=(0, 2))  # fixed-order reduction: deterministic
    return dq, dk, dv, dsink


def _row_stats_buffer(batch: int, q_heads: int, total_rows: int, device) -> torch.Tensor:
    """(2, Hq, L) fp32: lse (log2 units) and delta per query row, written by the dQ kernel for the dK/dV kernel.
    Sequence b's rows start at 16 * (b + first_row // 16) (``common.stats_row0``): aligned whatever the varlen
    offsets, so the dK/dV kernel reads them with vector loads (packed rows of lse's own layout start anywhere).
    L = 16 * (batch + total_rows // 16 + 1) covers every slot: O(heads * (batch + rows)) extra memory."""
    return torch.empty((2, q_heads, 16 * (batch + total_rows // 16 + 1)), dtype=torch.float32, device=device)


def _sink_rows(p):
    """The sink logits shaped to broadcast against lse: (Hq, 1) varlen, (1, Hq, 1) batched."""
    return p.sink.float().view(-1, 1) if p.varlen else p.sink.float().view(1, -1, 1)


def _backward_buffers(q, lse, dlse, p):
    """The backward's own buffers: (delta like lse, the row-stats buffer, dlse as fp32 contiguous or None, the
    fused backward's dQ accumulator or None: ``fused_dq``)."""
    _, rows_q, q_heads, _ = q.shape
    delta = torch.empty_like(lse)
    stats = _row_stats_buffer(p.batch, q_heads, rows_q if p.varlen else p.batch * rows_q, q.device)
    return (delta, stats, (dlse.to(torch.float32).contiguous() if dlse is not None else None),
            fused_dq.accumulator(q) if fused_dq.enabled(q, p) else None)


def _launch_backward(dout, q, k, v, out, lse, dlse, p, cfg, dq, dk, dv, resid, buffers=None):
    """Writes dq, dk, dv; returns the final delta (fp32, lse's layout). ``buffers``: ``_backward_buffers``' result
    when the caller made them (a launch plan's first call), else made here."""
    _, rows_q, q_heads, dqk = q.shape
    kv_heads, dim_v = k.shape[2], v.shape[3]
    batch = p.batch
    gluon_cfg = gluon_backward.applies(q, k, v, dout, dq, dk, dv, p) if cfg is None else None
    cfg = cfg or configs.backward_config(q.device, q.dtype, max(dqk, dim_v), p.causal_like)
    block_dqk, block_dv = configs.padded_head_dim(dqk), configs.padded_head_dim(dim_v)
    fp32 = q.dtype == torch.float32
    group = q_heads // kv_heads
    # strides read once per tensor (host time); the batch stride is 0 for varlen's packed (1, total, H, D) rows
    qs, ks, vs, os_, dos, dqs, dks, dvs = (t.stride() for t in (q, k, v, out, dout, dq, dk, dv))
    if p.varlen:
        stride_lb, stride_lh = 0, rows_q
        qb = kb = vb = ob = dob = dqb = dkb = dvb = 0
    else:
        stride_lb, stride_lh = q_heads * rows_q, rows_q
        qb, kb, vb, ob, dob, dqb, dkb, dvb = qs[0], ks[0], vs[0], os_[0], dos[0], dqs[0], dks[0], dvs[0]
    dummy = lse
    cu_q = p.cu_seqlens_q if p.varlen else dummy
    cu_k = p.cu_seqlens_k if p.varlen else dummy
    alibi = p.alibi_slopes if p.alibi_slopes is not None else dummy
    rng = p.rng if p.dropout_p > 0 else dummy
    flags = dict(HAS_LEFT=p.window_left >= 0, HAS_RIGHT=p.window_right >= 0, HAS_SOFTCAP=p.softcap > 0,
                 HAS_ALIBI=p.alibi_slopes is not None, HAS_DROPOUT=p.dropout_p > 0, IS_VARLEN=p.varlen, FP32=fp32)

    delta, stats, dlse, dq_acc = buffers if buffers is not None else _backward_buffers(q, lse, dlse, p)
    sts = stats.stride()
    # The dQ kernel computes delta and runs first; the dK/dV kernel and d(sink) (attention_backward) use the delta
    # it writes. fp16/bf16: from O plus the forward's residual, else corrected in the dQ kernel (see
    # _bwd_dq_kernel; configs.delta_mode). fp32 keeps O unrounded: its rowsum is already exact.
    mode = configs.delta_mode(q.dtype)
    has_resid = mode in ("residual", "correct") and resid is not None and resid.shape == out.shape \
        and resid.stride() == out.stride()
    correct = mode in ("residual", "correct") and not has_resid
    qc = cfg.dq_correct if correct and cfg.dq_correct is not None else cfg.dq
    num_m_tiles = configs.cdiv(p.max_seqlen_q, qc.block_m)
    # opt-in: the fused backward (fused_dq): the stats-only pass, dK/dV with dQ reduce-added, dQ's conversion
    fused = dq_acc is not None and gluon_cfg is not None and not correct and fused_dq.applies_to(gluon_cfg)
    if fused:  # the dQ kernel's DQ is the accumulator (STATS_ONLY): its head, column-to-D and batch strides
        accs = dq_acc.stride(0)
        dqb, stride_dqs, stride_dqh = q_heads * dqk * accs, accs, dqk * accs
    else:
        stride_dqs, stride_dqh = dqs[1], dqs[2]
    if gluon_cfg is not None and gluon_cfg.dq and not correct and not fused:  # Hopper: the warp-specialised dQ
        gluon_dq.dq(q, k, v, out, resid if has_resid else None, dout, lse, dlse, delta, stats, dq, p, gluon_cfg)
    else:
        launch(_bwd_dq_kernel, (num_m_tiles * batch * q_heads,), (
            q, k, v, out, resid if has_resid else dummy, dout, lse, delta, dlse if dlse is not None else dummy,
            dq_acc if fused else dq, stats, cu_q, cu_k, alibi, rng,
            qb, qs[1], qs[2], kb, ks[1], ks[2],
            vb, vs[1], vs[2], ob, os_[1], os_[2], dob, dos[1],
            dos[2], dqb, stride_dqs, stride_dqh, stride_lb, stride_lh, sts[1], sts[0],
            p.alibi_stride_b,
            q_heads, group, p.max_seqlen_q, p.max_seqlen_k, num_m_tiles,
            p.qk_scale, p.softmax_scale, p.softcap_log2, p.window_left, p.window_right, p.dropout_p,
            dqk, dim_v), dict(
            BLOCK_DQK=block_dqk, BLOCK_DV=block_dv, EVEN_DQK=block_dqk == dqk,
            EVEN_DV=block_dv == dim_v, BLOCK_M=qc.block_m, BLOCK_N=qc.block_n, **flags,
            HAS_DLSE=dlse is not None, HAS_RESID=has_resid, CORRECT=correct, DELTA_CHUNK=min(32, block_dv),
            **({"STATS_ONLY": True} if fused else {})), qc.num_warps, qc.num_stages)

    if gluon_cfg is not None:  # Hopper: the warp-specialised dK/dV kernel (gluon_backward.py)
        gluon_backward.dkdv(q, k, v, dout, stats, dk, dv, p, gluon_cfg, dq_acc if fused else None)
        if fused:
            fused_dq.convert(dq_acc, dq, p.softmax_scale)
        return delta
    kv = cfg.dkdv
    num_n_tiles = configs.cdiv(p.max_seqlen_k, kv.block_n)
    launch(_bwd_dkdv_kernel, (num_n_tiles * batch * kv_heads,), (
        q, k, v, dout, stats, dk, dv, cu_q, cu_k, alibi, rng,
        qb, qs[1], qs[2], kb, ks[1], ks[2],
        vb, vs[1], vs[2], dob, dos[1], dos[2],
        dkb, dks[1], dks[2], dvb, dvs[1], dvs[2],
        sts[1], sts[0], p.alibi_stride_b,
        q_heads, kv_heads, group, p.max_seqlen_q, p.max_seqlen_k, num_n_tiles,
        p.qk_scale, p.softmax_scale, p.softcap_log2, p.window_left, p.window_right, p.dropout_p,
        dqk, dim_v), dict(
        BLOCK_DQK=block_dqk, BLOCK_DV=block_dv, EVEN_DQK=block_dqk == dqk,
        EVEN_DV=block_dv == dim_v, BLOCK_M=kv.block_m, BLOCK_N=kv.block_n, **flags,
        EVEN_M=not p.varlen and p.max_seqlen_q % kv.block_m == 0),
        kv.num_warps, kv.num_stages)
    return delta
