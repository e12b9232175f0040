"""Decode kernels (Flash-Decoding): split the KV cache across programs, merge the partial results by logsumexp.

``_decode_split_kernel``: one program per (split, batch * kv_head, block of query rows). It processes the query rows
of the whole GQA group together (Sq new tokens x group query heads, up to 64 rows a block, so in decode each K/V
byte is read once per group) over the split's range of cache positions, and writes a partial result:
out_part (splits, B, Hq, Sq, Dv) fp32, normalised by the split's own denominator, and lse_part (splits, B, Hq, Sq)
fp32 (natural log, -inf for an empty split).
``_decode_combine_kernel``: one program per (batch, q_head, query) row merges the splits (and the sink).
With one split the split kernel writes out / lse itself (FINAL) and the combine kernel is not launched; with
``TILEATTN_DECODE_COMBINE=fused`` (opt-in) the last split program of each row block merges them
(``_merge_splits``) and no combine kernel runs either.

Caches: contiguous (B_cache, S_cache, Hkv, D) indexed through ``cache_batch_idx``, or paged (num_blocks, page_size,
Hkv, D) through ``block_table`` (B, max_pages) int32: key position j of sequence b lives in page
block_table[b, j // page_size], slot j % page_size — any page size.
"""

import torch
import triton
import triton.language as tl

from .common import LN2, LOG2E, global_ns, load_tile, mma, scores, trace_program3, visible
from .launch import launch, ticket_counters


@triton.jit(do_not_specialize=["num_splits"])  # read by FUSED_COMBINE only: no extra compiles as it varies
def _decode_split_kernel(Q, K, V, OUT_PART, LSE_PART, SEQLENS_K, BATCH_IDX, BLOCK_TABLE, ALIBI, LEFTPAD, SINK,
                         OUT, LSE, COUNTERS, num_splits,
                         stride_qb, stride_qs, stride_qh, stride_ob, stride_os, stride_oh,
                         stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                         stride_bt, stride_ab,
                         q_heads, kv_heads, group, seqlen_q, batch, split_len, page_size,
                         qk_scale, softcap, win_left, win_right, dqk, dv,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
                         EVEN_DQK: tl.constexpr, EVEN_DV: tl.constexpr,
                         PAGED: tl.constexpr, HAS_BATCH_IDX: tl.constexpr, HAS_LEFTPAD: tl.constexpr,
                         HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                         HAS_ALIBI: tl.constexpr, FP32: tl.constexpr, FINAL: tl.constexpr, HAS_SINK: tl.constexpr,
                         USE_TMA: tl.constexpr, FUSED_COMBINE: tl.constexpr, TRACE=None):
    """FINAL (one split): OUT_PART / LSE_PART are the call's out (B, Sq, Hq, Dv) (strides stride_o*) and lse
    (B, Hq, Sq), written directly with the sink folded in, and no combine kernel runs.
    USE_TMA: K and V are host tensor descriptors over the caches (B_cache, S_cache, Hkv, D) with block
    (1, BLOCK_N, 1, BLOCK_D): rows past S_cache and columns past D read as zero; V rows in [end, S_cache) are
    zeroed here (an unwritten cache slot may hold NaN, and 0 * NaN = NaN). With PAGED the descriptors cover the
    paged caches (num_blocks, page_size, Hkv, D) and a tile (which lies in one page: page_size % BLOCK_N == 0 and
    tiles start at multiples of BLOCK_N, ``configs.decode_tma``) is the box at (page, slot of its first key).
    FUSED_COMBINE (several splits): after writing its partials, each program takes a ticket from its rows'
    counter (COUNTERS[bhk * row_blocks + row block], int32, zero between calls); the program that draws the last
    ticket merges every split's partials of those rows into OUT / LSE (``_merge_splits``) and resets the counter,
    so no combine kernel runs. The merge reads the splits in order 0 .. num_splits - 1 whichever program draws it:
    results do not depend on the programs' timing. TRACE (measurement only, ``benchmarks/decode_trace.py``): None,
    or an int64 (programs, 4) buffer that gets each program's (start, end, SM, keys) (``common.trace_program3``)."""
    if TRACE is not None:
        t_start = global_ns()
    split = tl.program_id(0)
    bhk = tl.program_id(1)
    b = bhk // kv_heads
    hk = bhk % kv_heads
    seqlen_k = tl.load(SEQLENS_K + b)
    diag = seqlen_k - seqlen_q
    # rows of this program: r = qi * group + g  (query token qi, query head hk * group + g), one block of them
    r = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    qi = r // group
    h = hk * group + r % group
    row_ok = r < seqlen_q * group
    offs_n = tl.arange(0, BLOCK_N)
    offs_dqk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    b64 = b.to(tl.int64)
    q_ptrs = Q + b64 * stride_qb + qi[:, None] * stride_qs + h[:, None] * stride_qh + offs_dqk[None, :]
    q = load_tile(q_ptrs, r, seqlen_q * group, offs_dqk, dqk, True, EVEN_DQK)
    qi = tl.where(row_ok, qi, 0)  # padding rows: keep indices in range (their results are never stored)
    cb = b64
    if HAS_BATCH_IDX:
        cb = tl.load(BATCH_IDX + b).to(tl.int64)
    slope = tl.zeros([BLOCK_M], dtype=tl.float32)
    if HAS_ALIBI:
        slope = tl.load(ALIBI + b * stride_ab + h, mask=row_ok, other=0.0).to(tl.float32) * LOG2E

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    start = split * split_len
    if HAS_LEFTPAD:  # keys before cache_leftpad[b] are not part of the sequence; positions stay absolute
        start += tl.load(LEFTPAD + b)
    end = tl.minimum(start + split_len, seqlen_k)
    for start_n in tl.range(start, end, BLOCK_N):
        cols = start_n + offs_n
        if USE_TMA:
            if PAGED:  # the tile's page, and its first key's slot there
                box_b = tl.load(BLOCK_TABLE + b64 * stride_bt + start_n // page_size)
                box_s = start_n % page_size
            else:
                box_b = cb.to(tl.int32)
                box_s = start_n
            k = K.load([box_b, box_s, hk, 0]).reshape([BLOCK_N, BLOCK_DQK])
        elif PAGED:
            page = tl.load(BLOCK_TABLE + b64 * stride_bt + cols // page_size, mask=cols < seqlen_k, other=0)
            row_k = page.to(tl.int64) * stride_kb + (cols % page_size) * stride_ks
            row_v = page.to(tl.int64) * stride_vb + (cols % page_size) * stride_vs
        else:
            row_k = cb * stride_kb + cols.to(tl.int64) * stride_ks
            row_v = cb * stride_vb + cols.to(tl.int64) * stride_vs
        if not USE_TMA:
            k = load_tile(K + row_k[:, None] + hk * stride_kh + offs_dqk[None, :], cols, end, offs_dqk, dqk, True,
                          EVEN_DQK)
        s, _ = scores(mma(q, tl.trans(k), None, FP32), qi[:, None], cols[None, :], diag, qk_scale, softcap,
                      slope[:, None], HAS_SOFTCAP, HAS_ALIBI, q.dtype)
        ok = visible(qi[:, None], cols[None, :], end, diag, win_left, win_right, HAS_LEFT, HAS_RIGHT)
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        if USE_TMA:
            v = V.load([box_b, box_s, hk, 0]).reshape([BLOCK_N, BLOCK_DV])
            v = tl.where((cols < end)[:, None], v, 0.0)
        else:
            v = load_tile(V + row_v[:, None] + hk * stride_vh + offs_dv[None, :], cols, end, offs_dv, dv, True,
                          EVEN_DV)
        acc = mma(p.to(v.dtype), v, acc * alpha[:, None], FP32)
        m_i = m_new
    if FINAL and HAS_SINK:  # the sink joins the denominator with no value (as in the combine kernel)
        sink = tl.load(SINK + h, mask=row_ok, other=0.0).to(tl.float32) * LOG2E
        m_new = tl.maximum(m_i, sink)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.math.exp2(sink - m_use)
        acc = acc * alpha[:, None]
        m_i = m_new
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    acc = acc / l_safe[:, None]
    lse = (m_i + tl.math.log2(l_i)) * LN2
    o_mask = row_ok[:, None]
    if not EVEN_DV:
        o_mask = o_mask & (offs_dv[None, :] < dv)
    if FINAL:
        tl.store(LSE_PART + (b64 * q_heads + h) * seqlen_q + qi, lse, mask=row_ok)
        tl.store(OUT_PART + b64 * stride_ob + qi[:, None] * stride_os + h[:, None] * stride_oh + offs_dv[None, :],
                 acc.to(OUT_PART.dtype.element_ty), mask=o_mask)
    else:
        # partial layouts: (split, b, h, qi) rows of Dv
        prow = ((split * batch + b64) * q_heads + h) * seqlen_q + qi
        tl.store(LSE_PART + prow, lse, mask=row_ok)
        tl.store(OUT_PART + prow[:, None] * dv + offs_dv[None, :], acc, mask=o_mask)
        if FUSED_COMBINE:
            tl.debug_barrier()  # every thread's partial stores precede the ticket (its release publishes them)
            counter = COUNTERS + bhk * tl.num_programs(2) + tl.program_id(2)
            if tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu") == num_splits - 1:
                rows_total = batch * q_heads * seqlen_q
                _merge_splits(OUT_PART, LSE_PART, OUT, LSE, SINK, prow - split * rows_total, rows_total, num_splits,
                              b64 * stride_ob + qi * stride_os + h * stride_oh, (b64 * q_heads + h) * seqlen_q + qi,
                              row_ok, o_mask, offs_dv, h, dv, BLOCK_M, BLOCK_DV, HAS_SINK)
                tl.atomic_xchg(counter, 0, sem="relaxed", scope="gpu")  # ready for the next call
    if TRACE is not None:
        trace_program3(TRACE, t_start, tl.maximum(end - start, 0))


@triton.jit
def _merge_splits(OUT_PART, LSE_PART, OUT, LSE, SINK, prow0, rows_total, num_splits, out_row, lse_row, row_ok,
                  o_mask, offs_dv, h, dv, BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr, HAS_SINK: tl.constexpr):
    """The fused combine of a block of rows (split 0's partial rows prow0, BLOCK_M of them): the same merge as
    ``_decode_combine_kernel``, reading split s's partials at prow0 + s * rows_total around L1 (.cg: other
    programs wrote them, and this SM may hold stale lines of the buffer from an earlier call)."""
    m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    for sp in range(num_splits):
        m = tl.maximum(m, tl.load(LSE_PART + prow0 + sp * rows_total, mask=row_ok, other=float("-inf"),
                                  cache_modifier=".cg"))
    if HAS_SINK:
        sink = tl.load(SINK + h, mask=row_ok, other=float("-inf")).to(tl.float32)
        m = tl.maximum(m, sink)
    m_use = tl.where(m == float("-inf"), 0.0, m)
    denom = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    for sp in range(num_splits):
        prow = prow0 + sp * rows_total
        w = tl.exp(tl.load(LSE_PART + prow, mask=row_ok, other=float("-inf"), cache_modifier=".cg") - m_use)
        denom += w
        part = tl.load(OUT_PART + prow[:, None] * dv + offs_dv[None, :], mask=o_mask, other=0.0, cache_modifier=".cg")
        acc += w[:, None] * part
    if HAS_SINK:
        denom += tl.exp(sink - m_use)
    out = acc / tl.where(denom == 0.0, 1.0, denom)[:, None]
    tl.store(LSE + lse_row, m_use + tl.log(denom), mask=row_ok)
    tl.store(OUT + out_row[:, None] + offs_dv[None, :], out.to(OUT.dtype.element_ty), mask=o_mask)


@triton.jit
def _decode_combine_kernel(OUT_PART, LSE_PART, OUT, LSE, SINK, stride_ob, stride_os, stride_oh,
                           q_heads, seqlen_q, rows_total, num_splits, dv,
                           BLOCK_S: tl.constexpr, BLOCK_DV: tl.constexpr, HAS_SINK: tl.constexpr):
    """Merge the splits of one (b, h, qi) row: out = sum_s exp(lse_s - lse) * out_s, lse = log sum_s exp(lse_s).

    The splits are read BLOCK_S at a time as one [BLOCK_S, Dv] tile (independent loads in flight together): a
    loop of one split per iteration serialised the memory latency and dominated small-batch decode steps."""
    row = tl.program_id(0).to(tl.int64)  # flat (b, h, qi)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_DV)
    d_ok = offs_d < dv
    h = (row // seqlen_q) % q_heads
    m = tl.max(tl.full([BLOCK_S], float("-inf"), dtype=tl.float32), 0)
    for s0 in range(0, num_splits, BLOCK_S):
        split = s0 + offs_s
        m = tl.maximum(m, tl.max(tl.load(LSE_PART + split * rows_total + row, mask=split < num_splits,
                                         other=float("-inf")), 0))
    if HAS_SINK:
        m = tl.maximum(m, tl.load(SINK + h).to(tl.float32))
    m_use = tl.where(m == float("-inf"), 0.0, m)
    denom = tl.sum(tl.zeros([BLOCK_S], dtype=tl.float32), 0)
    acc = tl.zeros([BLOCK_DV], dtype=tl.float32)
    for s0 in range(0, num_splits, BLOCK_S):
        split = s0 + offs_s
        ok = split < num_splits
        w = tl.exp(tl.load(LSE_PART + split * rows_total + row, mask=ok, other=float("-inf")) - m_use)
        denom += tl.sum(w, 0)
        part = tl.load(OUT_PART + (split * rows_total + row)[:, None] * dv + offs_d[None, :],
                       mask=ok[:, None] & d_ok[None, :], other=0.0)
        acc += tl.sum(w[:, None] * part, 0)
    if HAS_SINK:
        denom += tl.exp(tl.load(SINK + h).to(tl.float32) - m_use)
    out = acc / tl.where(denom == 0.0, 1.0, denom)
    tl.store(LSE + row, m_use + tl.log(denom))
    qi = row % seqlen_q
    b = row // (seqlen_q * q_heads)
    tl.store(OUT + b * stride_ob + qi * stride_os + h * stride_oh + offs_d, out.to(OUT.dtype.element_ty), mask=d_ok)


def _counters(device: torch.device, n: int) -> torch.Tensor:
    """The fused combine's ticket counters (n int32 entries, zero when the kernel starts; its merging programs
    reset the ones they used): ``launch.ticket_counters``."""
    return ticket_counters(device, n, "decode")


def decode_forward(q, k_cache, v_cache, seqlens_k, *, softmax_scale, window, softcap, alibi_slopes, sink,
                   block_table, cache_batch_idx, num_splits, page_size, max_seqlen_k, leftpad=None):
    """q (B, Sq, Hq, Dqk); caches contiguous (B_cache, S_cache, Hkv, D) or paged (blocks, page_size, Hkv, D);
    seqlens_k int32 (B,) = end of each sequence's keys; leftpad int32 (B,) or None = their start (keys
    [leftpad[b], seqlens_k[b]) are attended; positions, causal/window/ALiBi alignment are absolute);
    max_seqlen_k bounds seqlens_k - leftpad (sizes the splits).
    Returns out (B, Sq, Hq, Dv), lse fp32 (B, Hq, Sq)."""
    from .. import configs
    from .common import LOG2E_F
    batch, seqlen_q, q_heads, dqk = q.shape
    kv_heads, dv = k_cache.shape[2], v_cache.shape[3]
    group = q_heads // kv_heads
    out = torch.empty((batch, seqlen_q, q_heads, dv), dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, q_heads, seqlen_q), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    block_m = min(64, max(16, configs.next_pow2(seqlen_q * group)))  # chunked prefill: several row blocks
    row_blocks = configs.cdiv(seqlen_q * group, block_m)
    paged = block_table is not None
    cfg = configs.decode_config(max(dqk, dv), paged=paged, splits=num_splits)
    use_tma = configs.decode_tma(cfg, q, paged, page_size, leftpad is not None)
    if use_tma and paged:  # the descriptor form's own pipeline depth (same tile, so decode_tma still holds)
        cfg = configs.decode_config(max(dqk, dv), paged=True, paged_tma=True)
    block_n = cfg.block_n
    split_len = configs.cdiv(configs.cdiv(max_seqlen_k, num_splits), block_n) * block_n
    num_splits = configs.cdiv(max_seqlen_k, split_len)
    final = num_splits == 1  # one split: the split kernel writes out / lse itself, no combine kernel
    counters = None
    if final:
        out_part, lse_part = out, lse
    else:
        counters = _counters(q.device, batch * kv_heads * row_blocks) if configs.decode_fused_combine() else None
        out_part = torch.empty((num_splits, batch, q_heads, seqlen_q, dv), dtype=torch.float32, device=q.device)
        lse_part = torch.empty((num_splits, batch, q_heads, seqlen_q), dtype=torch.float32, device=q.device)
    # key positions stay below the capacity: a window bound of Sq + capacity or more admits every key, and
    # clamping to it keeps the kernel's int32 position arithmetic from overflowing
    reach = seqlen_q + (block_table.shape[1] * page_size if paged else k_cache.shape[1])
    window = (min(window[0], reach), min(window[1], reach))
    dummy = seqlens_k
    qk_scale = softmax_scale / softcap if softcap > 0 else softmax_scale * LOG2E_F
    block_dqk, block_dv = configs.padded_head_dim(dqk), configs.padded_head_dim(dv)
    descs = None
    if use_tma:
        from .forward import _kv_descriptors
        descs = _kv_descriptors(k_cache, v_cache, block_n, block_dqk, block_dv)
    launch(_decode_split_kernel, (num_splits, batch * kv_heads, row_blocks), (
        q, descs[0] if descs else k_cache, descs[1] if descs else v_cache, out_part, lse_part, seqlens_k,
        cache_batch_idx if cache_batch_idx is not None else dummy, block_table if paged else dummy,
        alibi_slopes if alibi_slopes is not None else dummy, leftpad if leftpad is not None else dummy,
        sink if sink is not None else dummy, out, lse, counters if counters is not None else dummy, num_splits,
        q.stride(0), q.stride(1), q.stride(2), out.stride(0), out.stride(1), out.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
        v_cache.stride(2), block_table.stride(0) if paged else 0,
        alibi_slopes.stride(0) if (alibi_slopes is not None and alibi_slopes.dim() == 2) else 0,
        q_heads, kv_heads, group, seqlen_q, batch, split_len, page_size,
        qk_scale, softcap * LOG2E_F, window[0], window[1], dqk, dv), dict(
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_DQK=block_dqk, BLOCK_DV=block_dv,
        EVEN_DQK=block_dqk == dqk, EVEN_DV=block_dv == dv, PAGED=paged, HAS_BATCH_IDX=cache_batch_idx is not None,
        HAS_LEFTPAD=leftpad is not None,
        HAS_LEFT=window[0] >= 0, HAS_RIGHT=window[1] >= 0, HAS_SOFTCAP=softcap > 0,
        HAS_ALIBI=alibi_slopes is not None, FP32=q.dtype == torch.float32, FINAL=final, HAS_SINK=sink is not None,
        USE_TMA=descs is not None, FUSED_COMBINE=counters is not None), cfg.num_warps, cfg.num_stages)
    if final or counters is not None:
        return out, lse
    rows_total = batch * q_heads * seqlen_q
    block_s = min(32, max(2, configs.next_pow2(num_splits)))
    launch(_decode_combine_kernel, (rows_total,), (
        out_part, lse_part, out, lse, sink if sink is not None else dummy,
        out.stride(0), out.stride(1), out.stride(2), q_heads, seqlen_q, rows_total, num_splits, dv), dict(
        BLOCK_S=block_s, BLOCK_DV=block_dv, HAS_SINK=sink is not None),
        4, 3)
    return out, lse
