"""Hopper (sm90) forward in Gluon, warp-specialised as FlashAttention-3: a producer warp issues every TMA load (the
query tile's two 64-row halves, then K and V tiles into shared-memory rings with ready/empty mbarriers); two consumer
warpgroups (64 query rows each, 240 registers each through setmaxnreg) run the online softmax with asynchronous
warpgroup MMAs in FA3's order (QK^T of tile j is issued before O is rescaled; P_{j-1} V_{j-1} runs during tile j's
softmax) and take turns issuing their matmuls (ping-pong through two mbarriers), so one warpgroup's softmax runs
while the other's matmuls hold the tensor cores. Triton 3.6's own pipeliner and warp specialisation do neither
(NOTES.md, sessions 8 and 10). The producer's loads are in ``gluon_loads.py``, the consumers' per-key-tile steps
(online softmax, P V) in ``gluon_forward_steps.py``. D=64 calls on the persistent grid
without a mask take three consumer warpgroups from 1024 query rows (192-row items, 160 registers each; v37a,
``configs.gluon_forward_warpgroups``), the turns cycling through three mbarriers.

Scope (``applies``): sm90, fp16/bf16, Dqk == Dv with an entry in ``configs.gluon_forward_config`` (64 from 512
keys or 2048 when causal, 128, 256 from 512 keys; the table's thresholds), batched inputs, and packed varlen ones
at D <= 128 (``TILEATTN_GLUON_VARLEN=0`` opts out; see ``attention_forward``), no paging or dropout, causal or not
(bottom-right aligned like the portable kernel). Softcap, sink, ALiBi and sliding windows (the key-tile range
[lo, hi) shared by both warpgroups, edge tiles masked) are constexpr features of the kernel (D=64 takes the portable
kernel for softcap, ALiBi and windows: faster there for the first two, measured). Calls whose tiles see about the
same number of keys run on a persistent grid (``configs.gluon_forward_schedule``); ``TILEATTN_GLUON_FLAT=1`` runs
that grid with one software pipeline across a program's tiles (``gluon_flat.py``, opt-in until measured).
Every other call, and every other GPU, takes the portable Triton kernel in ``forward.py``; both produce the same
outputs (out, lse, and the rounding residual for the backward), checked against the same reference in the tests.

Layouts: q (B, Sq, Hq, D), k / v (B, Sk, Hkv, D), any strides with the last one 1 and 16-byte aligned (TMA);
out (B, Sq, Hq, D) contiguous; lse (B, Hq, Sq) fp32 natural log. One program per (128-row query tile, batch *
q head); every tile is a TMA-loaded 4-D box (1, rows, 1, D), viewed as (rows, D) in shared memory. Rows past Sq
and keys past Sk are zero-filled by TMA (keys masked to -inf in the last tile) and out's rows past Sq are clipped
by the TMA store. Parameters per head dim: ``configs.GluonForwardConfig``.
"""


import torch
import triton

from .. import configs
from .._hostinfo import causal_work_list, keys_for_every_tile, tile_map
from . import gluon_streamk
from .gluon_common import AVAILABLE, has_window, make_desc, softcap_fixed_max, window_bounds
from .launch import launch, tma_aligned
from .params import AttnParams, forward_outputs, residual_like

if AVAILABLE:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
    from .gluon_common import epilogue, row_bounds, trace_row, trace_stamp, turn_wait
    from .gluon_schedule import item_bounds, persistent_bounds, persistent_range, streamk_segment
    from .gluon_streamk import store_partial
    from .gluon_flat import consumer_flat
    from .gluon_forward_steps import drain_tiles, pv_issue, softmax_tile
    from .gluon_loads import _load_partition, _load_persistent

    @gluon.jit
    def _consumer(w: gl.constexpr, o_desc, r_desc, LSE, SINK, ALIBI_B, O, RESID, q_smem, k_smem, v_smem, bars, b, h,
                  start_m, lo, n, seqlen_q, seqlen_k, qk_scale, softcap, win_left, win_right, stride_lb, stride_lh,
                  q_row0, b_desc, stride_os, stride_oh, t0, r0, q_phase, o_smem, q_empty, HALF_M: gl.constexpr,
                  BLOCK_N: gl.constexpr, HEAD_D: gl.constexpr, K_STAGES: gl.constexpr, V_STAGES: gl.constexpr,
                  CAUSAL: gl.constexpr, WINDOW: gl.constexpr, STORE_RESID: gl.constexpr, HAS_SOFTCAP: gl.constexpr,
                  HAS_SINK: gl.constexpr, VARLEN: gl.constexpr, HAS_ALIBI: gl.constexpr, PERSISTENT: gl.constexpr,
                  CAUSAL_SKIP: gl.constexpr = False, TRACE=None, trace_item=0, PART=None, part_rec=-1):
        """One warpgroup: rows [start_m + w * HALF_M, + HALF_M) of the query tile, key tiles lo .. lo + n - 1
        (ring positions t0 .. t0 + n - 1, ping-pong rounds r0 .. r0 + n, Q's barrier phase q_phase: 0, 0, 0 but
        in the persistent kernel). Rows and keys count from the sequence's start (q_row0: its first packed row in
        a varlen call, where b_desc = 0 is the descriptors' batch index). ALIBI_B: this sequence's ALiBi slopes
        (Hq,). PERSISTENT: Q's buffer is released (``q_empty``) after the last Q K^T, and the output is staged in
        ``o_smem`` instead, so the next item's Q loads during this item's last P V and epilogue (D=256: staged in
        Q's buffer, released after the epilogue). CAUSAL_SKIP (v38a, default; causal items of three warpgroups,
        whose 192 rows span more key tiles than a warpgroup's 64 see): the item's key tiles past this warpgroup's
        last visible key get no products here; the warpgroup only waits for each such tile's K and V to land and
        releases them, and passes its turns, so the rings and rounds stay those of the other warpgroups. A fully
        masked tile adds nothing to a row's max, sum or output, so the outputs are bit-identical. TRACE (None, or
        measurement only: ``benchmarks/fwd_trace.py``): this warpgroup's stamps of item ``trace_item``
        (``trace_stamp``: entry, Q ready, first S done, last P V done, epilogue issued, key tiles; 6, the
        residual staged, in the epilogue). PART (stream-K, ``gluon_streamk``): with part_rec >= 0 the item is
        partial, and its unnormalised output rows, row max and row sum go to PART's record part_rec * NW + w
        (``store_partial``) instead of the epilogue."""
        if TRACE is not None:
            trace_stamp(TRACE, trace_item, w, bars[5].shape[0], 0)
        q_bars, k_ready, k_empty, v_ready, v_empty, turn = bars
        NW: gl.constexpr = turn.shape[0]  # consumer warpgroups (2; 3 with NUM_WG=3)
        dtype: gl.constexpr = o_desc.dtype
        # the persistent grid at D=256 (v25a): no room for separate staging buffers, so the output is
        # staged in Q's buffer and the next item's Q loads after this item's stores have read it
        Q_STAGE: gl.constexpr = PERSISTENT and HEAD_D > 128
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, BLOCK_N, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, HEAD_D, 16])
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        row0 = start_m + w * HALF_M
        rows, cols, diag, n_full, full_lo = row_bounds(row0, seqlen_q, seqlen_k, win_left, win_right, s_layout,
                                                       HALF_M, BLOCK_N, CAUSAL, WINDOW)
        slope = 0.0
        if HAS_ALIBI:
            slope = gl.load(ALIBI_B + h).to(gl.float32) * 1.4426950408889634
        if HAS_SOFTCAP == 2:  # the fixed max (gluon_forward_steps.softmax_tile)
            m_i = gl.zeros([HALF_M], gl.float32, layout=gl.SliceLayout(1, s_layout))
        else:
            m_i = gl.full([HALF_M], float("-inf"), gl.float32, layout=gl.SliceLayout(1, s_layout))
        l_i = gl.zeros([HALF_M], gl.float32, layout=gl.SliceLayout(1, s_layout))
        acc = gl.zeros([HALF_M, HEAD_D], gl.float32, layout=o_layout)
        s_zero = gl.zeros([HALF_M, BLOCK_N], gl.float32, layout=s_layout)
        q_buf = q_smem.index(w)
        q2 = q_buf.reshape([HALF_M, HEAD_D])
        mbarrier.wait(q_bars.index(w), q_phase)
        if TRACE is not None:  # also the first S's and the last P V's stamps of an item without key tiles
            trace_stamp(TRACE, trace_item, w, NW, 1)
            trace_stamp(TRACE, trace_item, w, NW, 2)
            trace_stamp(TRACE, trace_item, w, NW, 3)
        n_w = n  # key tiles this warpgroup computes
        if CAUSAL_SKIP:  # up to its rows' last visible key (rows past the end: as if they existed)
            n_w = gl.minimum(gl.maximum(gl.cdiv(gl.maximum(row0 + HALF_M + diag, 0), BLOCK_N) - lo, 0), n)
        if n_w > 0:
            # FlashAttention-3's order: QK^T of tile j runs while O is rescaled, and P_{j-1} V_{j-1} runs while
            # tile j's softmax runs; nothing is in flight across the loop's back edge (ptxas serialises every
            # wgmma of the kernel when a register accumulator stays in flight there and is read after a wait).
            turn_wait(turn, w, r0)
            ks = t0 % K_STAGES
            mbarrier.wait(k_ready.index(ks), (t0 // K_STAGES) & 1)
            s_tok = warpgroup_mma(q2, k_smem.index(ks).reshape([BLOCK_N, HEAD_D]).permute((1, 0)), s_zero,
                                  use_acc=False, is_async=True)
            mbarrier.arrive(turn.index((w + 1) % NW), count=1)
            s = warpgroup_mma_wait(num_outstanding=0, deps=(s_tok, ))
            if TRACE is not None:
                trace_stamp(TRACE, trace_item, w, NW, 2)
            mbarrier.arrive(k_empty.index(ks), count=1)
            p, alpha, m_i, l_i = softmax_tile(s, lo, full_lo, n_full, m_i, l_i, rows, row0, cols, diag, seqlen_k,
                                               qk_scale, softcap, win_left, win_right, slope, CAUSAL, WINDOW,
                                               HAS_SOFTCAP, dtype == gl.bfloat16, HAS_ALIBI)
            p_op = gl.convert_layout(p.to(dtype), p_layout)
            for j in range(1, n_w):
                turn_wait(turn, w, r0 + j)
                ks = (t0 + j) % K_STAGES
                mbarrier.wait(k_ready.index(ks), ((t0 + j) // K_STAGES) & 1)
                s_tok = warpgroup_mma(q2, k_smem.index(ks).reshape([BLOCK_N, HEAD_D]).permute((1, 0)), s_zero,
                                      use_acc=False, is_async=True)
                o_tok = pv_issue(acc, alpha, p_op, v_smem, v_ready, turn, w, t0 + j - 1,
                                  seqlen_k - (lo + j - 1) * BLOCK_N, VARLEN,
                                  HAS_SOFTCAP != 2)
                s = warpgroup_mma_wait(num_outstanding=1, deps=(s_tok, ))
                mbarrier.arrive(k_empty.index(ks), count=1)
                p, alpha, m_i, l_i = softmax_tile(s, lo + j, full_lo, n_full, m_i, l_i, rows, row0, cols, diag,
                                                   seqlen_k, qk_scale, softcap, win_left, win_right, slope, CAUSAL,
                                                   WINDOW, HAS_SOFTCAP, dtype == gl.bfloat16, HAS_ALIBI)
                acc = warpgroup_mma_wait(num_outstanding=0, deps=(o_tok, ))
                mbarrier.arrive(v_empty.index((t0 + j - 1) % V_STAGES), count=1)
                p_op = gl.convert_layout(p.to(dtype), p_layout)
            if PERSISTENT and not Q_STAGE:  # every Q K^T of this item is done: the next item's Q may load
                mbarrier.arrive(q_empty.index(w), count=1)
            turn_wait(turn, w, r0 + n_w)
            o_tok = pv_issue(acc, alpha, p_op, v_smem, v_ready, turn, w, t0 + n_w - 1,
                              seqlen_k - (lo + n_w - 1) * BLOCK_N, VARLEN,
                              HAS_SOFTCAP != 2)
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(o_tok, ))
            if TRACE is not None:
                trace_stamp(TRACE, trace_item, w, NW, 3)
            mbarrier.arrive(v_empty.index((t0 + n_w - 1) % V_STAGES), count=1)
        elif PERSISTENT:  # no key tile: one empty ping-pong round, so that every item takes n + 1 rounds
            if not Q_STAGE:
                mbarrier.arrive(q_empty.index(w), count=1)
            turn_wait(turn, w, r0)
            mbarrier.arrive(turn.index((w + 1) % NW), count=1)
        if CAUSAL_SKIP:  # the tiles this warpgroup does not see: rounds r0 + n_w + 1 .. r0 + n without products
            drain_tiles(bars, w, t0 + n_w, n - n_w, r0 + n_w + 1)

        # Q is dead: its buffer stages this warpgroup's output rows for TMA stores (rows past the tensor clipped);
        # PERSISTENT at D <= 128: the next item's Q may be loading into it, the output has its own buffers
        trace_at = 0
        if TRACE is not None:  # the epilogue's stamp (6)
            trace_at = trace_row(trace_item, w, NW)
        if (PART is not None) and (part_rec >= 0):  # stream-K: part of the item's key tiles (gluon_streamk.merge)
            store_partial(PART, acc, m_i, l_i, part_rec * NW + w)
            if Q_STAGE:
                gl.thread_barrier()
                mbarrier.arrive(q_empty.index(w), count=1)
        elif Q_STAGE:  # out and the residual staged in Q's buffer; released once the stores have read it
            epilogue(acc, m_i, l_i, q_buf, o_desc, r_desc, LSE, SINK, O, RESID, b, h, row0, rows, seqlen_q, q_row0,
                     b_desc, stride_lb, stride_lh, stride_os, stride_oh, HALF_M, HEAD_D, STORE_RESID, HAS_SINK, VARLEN,
                     TRACE=TRACE, trace_at=trace_at)
            gl.thread_barrier()
            mbarrier.arrive(q_empty.index(w), count=1)
        elif PERSISTENT:  # out and the residual in their own buffers, stores left in flight (the next epilogue
            # and the program's end wait for them)
            epilogue(acc, m_i, l_i, o_smem.index(w), o_desc, r_desc, LSE, SINK, O, RESID, b, h, row0, rows, seqlen_q,
                     q_row0, b_desc, stride_lb, stride_lh, stride_os, stride_oh, HALF_M, HEAD_D, STORE_RESID,
                     HAS_SINK, VARLEN, o_smem.index(NW * STORE_RESID + w), True, TRACE, trace_at)
        else:
            epilogue(acc, m_i, l_i, q_buf, o_desc, r_desc, LSE, SINK, O, RESID, b, h, row0, rows, seqlen_q, q_row0,
                     b_desc, stride_lb, stride_lh, stride_os, stride_oh, HALF_M, HEAD_D, STORE_RESID, HAS_SINK, VARLEN)
        if TRACE is not None:
            trace_stamp(TRACE, trace_item, w, NW, 4)
            gl.store(TRACE + trace_row(trace_item, w, NW) + 5, n_w.to(gl.int64))

    @gluon.jit
    def _consumer_persistent(w: gl.constexpr, o_desc, r_desc, LSE, SINK, ALIBI, O, RESID, q_smem, k_smem, v_smem,
                             bars, o_smem, q_empty, pid, num_items, nprog, TILE_MAP, CU_Q, CU_K, num_m_tiles, q_heads,
                             seqlen_q, seqlen_k, qk_scale, softcap, win_left, win_right, stride_lb, stride_lh,
                             stride_os, stride_oh, stride_ab, HALF_M: gl.constexpr, BLOCK_N: gl.constexpr,
                             HEAD_D: gl.constexpr, K_STAGES: gl.constexpr, V_STAGES: gl.constexpr,
                             CAUSAL: gl.constexpr, WINDOW: gl.constexpr, STORE_RESID: gl.constexpr,
                             HAS_SOFTCAP: gl.constexpr, HAS_SINK: gl.constexpr, VARLEN: gl.constexpr,
                             HAS_ALIBI: gl.constexpr, USE_MAP: gl.constexpr, CAUSAL_SKIP: gl.constexpr = False,
                             TRACE=None, STREAMK: gl.constexpr = False, PART=None):
        """Persistent consumer warpgroup w: ``_consumer`` on the work items pid, pid + nprog, ... (causal: in
        ``persistent_item``'s order), the K/V ring positions t0 carried across items; the it-th item's ping-pong
        rounds start at t0 + it (every item takes n + 1 rounds) and its Q phase is it & 1 (derived, not carried:
        fewer live registers). TRACE: ``_fwd_kernel``'s. STREAMK (with PART): the items of this program's equal
        share of the key tiles (``persistent_range``), the first and last possibly partial (``streamk_segment``;
        ``gluon_streamk``)."""
        q_bars, k_ready, k_empty, v_ready, v_empty, turn = bars
        BLOCK_M: gl.constexpr = turn.shape[0] * HALF_M
        t0 = gl.to_tensor(0)
        start, stop, step, t_begin, t_end = persistent_range(pid, nprog, num_items, seqlen_k, BLOCK_N, STREAMK)
        for item in range(start, stop, step):
            it = (item - start) // step
            b, h, start_m, q_row0, sq, k_row0, sk, b_desc, lo, n = persistent_bounds(
                item, pid, nprog, num_items, TILE_MAP, CU_Q, CU_K, num_m_tiles, q_heads, seqlen_q, seqlen_k,
                win_left, win_right, BLOCK_M, BLOCK_N, CAUSAL, WINDOW, VARLEN, USE_MAP)
            part_rec = -1
            if STREAMK:
                lo, n, slot = streamk_segment(item, start, lo, n, t_begin, t_end)
                part_rec = gl.where(slot >= 0, pid * 2 + slot, -1)
            alibi_b = ALIBI
            if HAS_ALIBI:
                alibi_b = ALIBI + b * stride_ab
            _consumer(w, o_desc, r_desc, LSE, SINK, alibi_b, O, RESID, q_smem, k_smem, v_smem, bars, b, h, start_m,
                      lo, n, sq, sk, qk_scale, softcap, win_left, win_right, stride_lb, stride_lh, q_row0, b_desc,
                      stride_os, stride_oh, t0, t0 + it, it & 1, o_smem, q_empty, HALF_M, BLOCK_N, HEAD_D, K_STAGES,
                      V_STAGES, CAUSAL, WINDOW, STORE_RESID, HAS_SOFTCAP, HAS_SINK, VARLEN, HAS_ALIBI, True,
                      CAUSAL_SKIP, TRACE, item, PART, part_rec)
            t0 += n
        tma.store_wait(pendings=0)  # the last item's stores (left in flight by the epilogue) have read shared memory

    @gluon.jit
    def _fwd_kernel(q_desc, k_desc, v_desc, o_desc, r_desc, LSE, SINK, ALIBI, O, RESID, CU_Q, CU_K, TILE_MAP,
                    seqlen_q, seqlen_k, q_heads, group, num_m_tiles, qk_scale, softcap, win_left, win_right,
                    stride_lb, stride_lh, stride_os, stride_oh, stride_ab, BLOCK_N: gl.constexpr, HEAD_D: gl.constexpr,
                    K_STAGES: gl.constexpr, V_STAGES: gl.constexpr, CAUSAL: gl.constexpr, WINDOW: gl.constexpr,
                    STORE_RESID: gl.constexpr, HAS_SOFTCAP: gl.constexpr, HAS_SINK: gl.constexpr,
                    VARLEN: gl.constexpr, HAS_ALIBI: gl.constexpr, USE_MAP: gl.constexpr, CONSUMER_REGS: gl.constexpr,
                    PRODUCER_REGS: gl.constexpr, PERSISTENT: gl.constexpr = False, num_items=0,
                    FLAT: gl.constexpr = False, NUM_WG: gl.constexpr = 2, CAUSAL_SKIP: gl.constexpr = False,
                    TRACE=None, STAGGER: gl.constexpr = 0, STREAMK: gl.constexpr = False, PART=None):
        """Warp-specialised: the default partition and one worker partition are the two consumer warpgroups
        (64 query rows each; NUM_WG=3, persistent only: three, 192-row items, ``configs.gluon_forward_warpgroups``),
        one more worker warp issues every TMA load. VARLEN: q / k / v / out are packed
        (1, total, H, D), sequence b spans rows CU_Q[b] .. CU_Q[b + 1] (keys: CU_K); seqlen_q / seqlen_k are then
        read per sequence (the arguments are the maxima). O / RESID: out and the residual as pointers, for the
        masked stores of a sequence's last rows (varlen only). ALIBI: fp32 slopes (Hq,) or (B, Hq) (batch stride
        stride_ab, 0 for (Hq,)). USE_MAP (varlen; or batched causal on the persistent grid): program pid runs
        entry TILE_MAP[pid] = (tile * num_m_tiles + b) * q_heads + h (``_hostinfo.tile_map`` /
        ``causal_work_list``; num_m_tiles is then the batch), so no program is launched for a tile past its
        sequence's end, and the longest sequences run first. PERSISTENT (the schedule table decides;
        D=256 since session 23): a grid of at most one program per multiprocessor, program pid running the items (the
        default grid's tiles, or the work list's entries) pid, pid + grid, ... < num_items, with the output and
        the residual staged in their own buffers so that the next item's loads overlap this item's last P V and
        epilogue, whose stores are left in flight (``_consumer_persistent``, ``store_tile_tma``; D=256 stages
        them in Q's buffer and overlaps only the next item's K/V loads). FLAT (with PERSISTENT, opt-in, D <= 128):
        the same items as one pipeline across item boundaries, Q double-buffered (``gluon_flat``; varlen only on
        the work list). PERSISTENT, not FLAT: TRACE, stamps per item (``_consumer``; measurement), STAGGER
        (``_load_persistent``; diagnostic), STREAMK with PART (``gluon_streamk``'s equal shares; opt-in)."""
        HALF_M: gl.constexpr = q_desc.block_type.shape[1]
        BLOCK_M: gl.constexpr = NUM_WG * HALF_M
        dtype: gl.constexpr = q_desc.dtype
        pid = gl.program_id(0)
        max_seqlen_q, max_seqlen_k = seqlen_q, seqlen_k
        b, h, start_m, q_row0, seqlen_q, k_row0, seqlen_k, b_desc, lo, n = item_bounds(
            pid, TILE_MAP, CU_Q, CU_K, num_m_tiles, q_heads, seqlen_q, seqlen_k, win_left, win_right, BLOCK_M,
            BLOCK_N, CAUSAL, WINDOW, VARLEN, USE_MAP)
        hk = h // group

        NQ: gl.constexpr = 4 if FLAT else NUM_WG  # FLAT: two Q buffers per warpgroup (gluon_flat)
        q_smem = gl.allocate_shared_memory(dtype, [NQ, 1, HALF_M, 1, HEAD_D], q_desc.layout)
        k_smem = gl.allocate_shared_memory(dtype, [K_STAGES, 1, BLOCK_N, 1, HEAD_D], k_desc.layout)
        v_smem = gl.allocate_shared_memory(dtype, [V_STAGES, 1, BLOCK_N, 1, HEAD_D], v_desc.layout)
        q_bars = gl.allocate_shared_memory(gl.int64, [NQ, 1], mbarrier.MBarrierLayout())
        k_ready = gl.allocate_shared_memory(gl.int64, [K_STAGES, 1], mbarrier.MBarrierLayout())
        k_empty = gl.allocate_shared_memory(gl.int64, [K_STAGES, 1], mbarrier.MBarrierLayout())
        v_ready = gl.allocate_shared_memory(gl.int64, [V_STAGES, 1], mbarrier.MBarrierLayout())
        v_empty = gl.allocate_shared_memory(gl.int64, [V_STAGES, 1], mbarrier.MBarrierLayout())
        turn = gl.allocate_shared_memory(gl.int64, [NUM_WG, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(NUM_WG):
            mbarrier.init(q_bars.index(i), count=1)
            mbarrier.init(turn.index(i), count=1)
        for i in gl.static_range(NUM_WG, NQ):
            mbarrier.init(q_bars.index(i), count=1)
        for i in gl.static_range(K_STAGES):
            mbarrier.init(k_ready.index(i), count=1)
            mbarrier.init(k_empty.index(i), count=NUM_WG)  # every consumer warpgroup releases each slot
        for i in gl.static_range(V_STAGES):
            mbarrier.init(v_ready.index(i), count=1)
            mbarrier.init(v_empty.index(i), count=NUM_WG)
        bars = (q_bars, k_ready, k_empty, v_ready, v_empty, turn)
        alibi_b = ALIBI
        if HAS_ALIBI:
            alibi_b = ALIBI + b * stride_ab
        if FLAT:  # PERSISTENT with one pipeline across items (gluon_flat): outputs staged in the dead Q buffers
            q_empty = gl.allocate_shared_memory(gl.int64, [4, 1], mbarrier.MBarrierLayout())
            for i in gl.static_range(4):
                mbarrier.init(q_empty.index(i), count=1)
            nprog = gl.num_programs(0)
            gl.warp_specialize([
                (consumer_flat, (0, o_desc, r_desc, LSE, SINK, ALIBI, O, RESID, q_smem, k_smem, v_smem, bars,
                                 q_empty, pid, num_items, nprog, TILE_MAP, CU_Q, CU_K, num_m_tiles, q_heads,
                                 max_seqlen_q, max_seqlen_k, qk_scale, softcap, win_left, win_right, stride_lb,
                                 stride_lh, stride_os, stride_oh, stride_ab, HALF_M, BLOCK_N, HEAD_D, CAUSAL,
                                 WINDOW, STORE_RESID, HAS_SOFTCAP, HAS_SINK, VARLEN, HAS_ALIBI, USE_MAP)),
                (consumer_flat, (1, o_desc, r_desc, LSE, SINK, ALIBI, O, RESID, q_smem, k_smem, v_smem, bars,
                                 q_empty, pid, num_items, nprog, TILE_MAP, CU_Q, CU_K, num_m_tiles, q_heads,
                                 max_seqlen_q, max_seqlen_k, qk_scale, softcap, win_left, win_right, stride_lb,
                                 stride_lh, stride_os, stride_oh, stride_ab, HALF_M, BLOCK_N, HEAD_D, CAUSAL,
                                 WINDOW, STORE_RESID, HAS_SOFTCAP, HAS_SINK, VARLEN, HAS_ALIBI, USE_MAP)),
                (_load_persistent, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, bars, q_empty, pid, num_items,
                                    nprog, TILE_MAP, CU_Q, CU_K, num_m_tiles, q_heads, group, max_seqlen_q,
                                    max_seqlen_k, win_left, win_right, HALF_M, BLOCK_N, HEAD_D, K_STAGES, V_STAGES,
                                    CAUSAL, WINDOW, VARLEN, USE_MAP, True)),
            ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])
        elif PERSISTENT:
            # out's staging buffers (one per consumer warpgroup), then the residual's; D=256 stages in Q's
            # (``_consumer``'s Q_STAGE)
            if HEAD_D > 128:
                o_smem = q_smem
            else:
                o_smem = gl.allocate_shared_memory(dtype, [NUM_WG + NUM_WG * STORE_RESID, 1, HALF_M, 1, HEAD_D],
                                                   o_desc.layout)
            q_empty = gl.allocate_shared_memory(gl.int64, [NUM_WG, 1], mbarrier.MBarrierLayout())
            for i in gl.static_range(NUM_WG):
                mbarrier.init(q_empty.index(i), count=1)
            nprog = gl.num_programs(0)
            if NUM_WG == 3:  # v37a: three consumer warpgroups, 192-row items
                gl.warp_specialize([
                    (_consumer_persistent, (0, o_desc, r_desc, LSE, SINK, ALIBI, O, RESID, q_smem, k_smem, v_smem,
                                            bars, o_smem, q_empty, pid, num_items, nprog, TILE_MAP, CU_Q, CU_K,
                                            num_m_tiles, q_heads, max_seqlen_q, max_seqlen_k, qk_scale, softcap,
                                            win_left, win_right, stride_lb, stride_lh, stride_os, stride_oh,
                                            stride_ab, HALF_M, BLOCK_N, HEAD_D, K_STAGES, V_STAGES, CAUSAL, WINDOW,
                                            STORE_RESID, HAS_SOFTCAP, HAS_SINK, VARLEN, HAS_ALIBI, USE_MAP,
                                            CAUSAL_SKIP, TRACE, STREAMK, PART)),
                    (_consumer_persistent, (1, o_desc, r_desc, LSE, SINK, ALIBI, O, RESID, q_smem, k_smem, v_smem,
                                            bars, o_smem, q_empty, pid, num_items, nprog, TILE_MAP, CU_Q, CU_K,
                                            num_m_tiles, q_heads, max_seqlen_q, max_seqlen_k, qk_scale, softcap,
                                            win_left, win_right, stride_lb, stride_lh, stride_os, stride_oh,
                                            stride_ab, HALF_M, BLOCK_N, HEAD_D, K_STAGES, V_STAGES, CAUSAL, WINDOW,
                                            STORE_RESID, HAS_SOFTCAP, HAS_SINK, VARLEN, HAS_ALIBI, USE_MAP,
                                            CAUSAL_SKIP, TRACE, STREAMK, PART)),
                    (_consumer_persistent, (2, o_desc, r_desc, LSE, SINK, ALIBI, O, RESID, q_smem, k_smem, v_smem,
                                            bars, o_smem, q_empty, pid, num_items, nprog, TILE_MAP, CU_Q, CU_K,
                                            num_m_tiles, q_heads, max_seqlen_q, max_seqlen_k, qk_scale, softcap,
                                            win_left, win_right, stride_lb, stride_lh, stride_os, stride_oh,
                                            stride_ab, HALF_M, BLOCK_N, HEAD_D, K_STAGES, V_STAGES, CAUSAL, WINDOW,
                                            STORE_RESID, HAS_SOFTCAP, HAS_SINK, VARLEN, HAS_ALIBI, USE_MAP,
                                            CAUSAL_SKIP, TRACE, STREAMK, PART)),
                    (_load_persistent, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, bars, q_empty, pid,
                                        num_items, nprog, TILE_MAP, CU_Q, CU_K, num_m_tiles, q_heads, group,
                                        max_seqlen_q, max_seqlen_k, win_left, win_right, HALF_M, BLOCK_N, HEAD_D,
                                        K_STAGES, V_STAGES, CAUSAL, WINDOW, VARLEN, USE_MAP, False, STAGGER,
                                        STREAMK)),
                ], [4, 4, 1], [CONSUMER_REGS, CONSUMER_REGS, PRODUCER_REGS])
            else:
                gl.warp_specialize([
                    (_consumer_persistent, (0, o_desc, r_desc, LSE, SINK, ALIBI, O, RESID, q_smem, k_smem, v_smem,
                                            bars, o_smem, q_empty, pid, num_items, nprog, TILE_MAP, CU_Q, CU_K,
                                            num_m_tiles, q_heads, max_seqlen_q, max_seqlen_k, qk_scale, softcap,
                                            win_left, win_right, stride_lb, stride_lh, stride_os, stride_oh,
                                            stride_ab, HALF_M, BLOCK_N, HEAD_D, K_STAGES, V_STAGES, CAUSAL, WINDOW,
                                            STORE_RESID, HAS_SOFTCAP, HAS_SINK, VARLEN, HAS_ALIBI, USE_MAP, False,
                                            TRACE, STREAMK, PART)),
                    (_consumer_persistent, (1, o_desc, r_desc, LSE, SINK, ALIBI, O, RESID, q_smem, k_smem, v_smem,
                                            bars, o_smem, q_empty, pid, num_items, nprog, TILE_MAP, CU_Q, CU_K,
                                            num_m_tiles, q_heads, max_seqlen_q, max_seqlen_k, qk_scale, softcap,
                                            win_left, win_right, stride_lb, stride_lh, stride_os, stride_oh,
                                            stride_ab, HALF_M, BLOCK_N, HEAD_D, K_STAGES, V_STAGES, CAUSAL, WINDOW,
                                            STORE_RESID, HAS_SOFTCAP, HAS_SINK, VARLEN, HAS_ALIBI, USE_MAP, False,
                                            TRACE, STREAMK, PART)),
                    (_load_persistent, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, bars, q_empty, pid,
                                        num_items, nprog, TILE_MAP, CU_Q, CU_K, num_m_tiles, q_heads, group,
                                        max_seqlen_q, max_seqlen_k, win_left, win_right, HALF_M, BLOCK_N, HEAD_D,
                                        K_STAGES, V_STAGES, CAUSAL, WINDOW, VARLEN, USE_MAP, False, STAGGER,
                                        STREAMK)),
                ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])
        else:
            gl.warp_specialize([
                (_consumer, (0, o_desc, r_desc, LSE, SINK, alibi_b, O, RESID, q_smem, k_smem, v_smem, bars, b, h,
                             start_m, lo, n, seqlen_q, seqlen_k, qk_scale, softcap, win_left, win_right, stride_lb,
                             stride_lh, q_row0, b_desc, stride_os, stride_oh, 0, 0, 0, q_smem, q_bars, HALF_M,
                             BLOCK_N, HEAD_D, K_STAGES, V_STAGES, CAUSAL, WINDOW, STORE_RESID, HAS_SOFTCAP, HAS_SINK,
                             VARLEN, HAS_ALIBI, False)),
                (_consumer, (1, o_desc, r_desc, LSE, SINK, alibi_b, O, RESID, q_smem, k_smem, v_smem, bars, b, h,
                             start_m, lo, n, seqlen_q, seqlen_k, qk_scale, softcap, win_left, win_right, stride_lb,
                             stride_lh, q_row0, b_desc, stride_os, stride_oh, 0, 0, 0, q_smem, q_bars, HALF_M,
                             BLOCK_N, HEAD_D, K_STAGES, V_STAGES, CAUSAL, WINDOW, STORE_RESID, HAS_SOFTCAP, HAS_SINK,
                             VARLEN, HAS_ALIBI, False)),
                (_load_partition, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, bars, b_desc, h, hk, start_m, lo,
                                   n, q_row0, k_row0, 0, HALF_M, BLOCK_N, HEAD_D, K_STAGES, V_STAGES)),
            ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])


def applies(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: AttnParams, block_table=None):
    """The Gluon forward's ``configs.GluonForwardConfig`` for this call, or None when the portable kernel takes it
    (see the module docstring for the scope)."""
    if not AVAILABLE or not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16):
        return None
    d = q.shape[3]
    cfg = configs.gluon_forward_config(d)
    if cfg is None or k.shape[3] != d or v.shape[3] != d or block_table is not None:
        return None
    if q.numel() == 0 or k.numel() == 0:
        return None
    if p.varlen and (configs.getenv("TILEATTN_GLUON_VARLEN") == "0" or d > 128 or p.max_seqlen_q == 0):
        # TILEATTN_GLUON_VARLEN=0: varlen takes the portable kernel; D=256's masked epilogue spills (~650 B,
        # ptxas): portable
        return None
    least = cfg.min_seqlen_k_causal if p.causal_like else cfg.min_seqlen_k
    if (cfg.min_seqlen_k_causal_list is not None and p.window_right == 0 and not has_window(p) and not p.varlen
            and configs.gluon_forward_schedule(cfg, d, True, False, configs.causal_work_list_on())[0]):
        least = cfg.min_seqlen_k_causal_list  # batched causal on the persistent grid with the host's work list
    if (p.max_seqlen_k if p.varlen else k.shape[1]) < least:
        return None
    if p.dropout_p > 0:
        return None
    if not cfg.window_softcap and (p.softcap > 0 or has_window(p) or p.alibi_slopes is not None):
        return None
    if configs._arch(configs._device_index(q.device), configs._arch_override())[0] != 9:
        return None  # TILEATTN_ARCH=8.0 forces the portable path on a Hopper card
    if any(not tma_aligned(t) or t.stride(-1) != 1 for t in (q, k, v)):
        return None
    return cfg


def attention_forward(q, k, v, p: AttnParams, residual=False, cfg=None):
    """Same contract as ``forward.attention_forward`` for the calls ``applies`` accepts (batched or varlen; causal,
    softcap, ALiBi, sink and sliding windows): returns (out (B, Sq, Hq, D), lse fp32 natural log (B, Hq, Sq), or (Hq,
    total_q) for varlen[, resid like out]). ``cfg``: what ``applies`` returned (looked up again when not given).

    Varlen (q / k / v packed (1, total, H, D)): a key tile that crosses its sequence's end reads the next
    sequence's rows (or rows past every sequence): their scores are masked to -inf and both consumer warpgroups
    zero their V rows in shared memory before P V (``zero_rows_from``), so no value of one sequence, NaN and inf
    included, reaches another's output. A sequence's last query rows are stored by masked pointer stores, every
    other tile by TMA. Needs no host read of cu_seqlens (compiled graphs take it too)."""
    batch, seqlen_q, q_heads, d = q.shape
    seqlen_k, kv_heads = k.shape[1], k.shape[2]
    out, lse, stride_lb, stride_lh = forward_outputs(q, d, p)  # varlen rows outside every sequence: 0 / -inf
    cu_q = cu_k = None
    if p.varlen:  # packed: the grid covers the longest sequence
        cu_q, cu_k, batch = p.cu_seqlens_q, p.cu_seqlens_k, p.batch
        seqlen_q, seqlen_k = p.max_seqlen_q, p.max_seqlen_k
    resid = residual_like(out) if residual else None
    cfg = cfg or configs.gluon_forward_config(d)
    bn, half = cfg.block_n, 64
    bf16 = q.dtype == torch.bfloat16
    q_desc = make_desc(q, (1, half, 1, d), bf16)
    k_desc = make_desc(k, (1, bn, 1, d), bf16)
    v_desc = make_desc(v, (1, bn, 1, d), bf16)
    o_desc = make_desc(out, (1, half, 1, d), bf16)
    r_desc = make_desc(resid, (1, half, 1, d), bf16) if residual else o_desc  # int8 resid: int16 pairs (make_desc)
    window = has_window(p)
    causal = p.window_right == 0 and not window
    # tiles of unequal length: causal, or a window open on one side (rows see up to a diagonal); a window bounded
    # on both sides (incl. (w, 0)) gives every tile but the edge ones the same number of keys
    uneven = causal or (window and (p.window_left < 0 or p.window_right < 0))
    alibi_linear = p.alibi_slopes is not None and configs.gluon_alibi_linear(d, p.varlen)
    causal_list = causal and not p.varlen and not alibi_linear and configs.causal_work_list_on()
    persistent, work_list, needs_list = configs.gluon_forward_schedule(cfg, d, uneven, p.varlen, causal_list,
                                                                       alibi_linear)
    flat_on = configs.getenv("TILEATTN_GLUON_FLAT") == "1"  # opt-in, NOTES v21a (``flat`` below)
    # v37a: three consumer warpgroups (192-row items) on the persistent grid and on batched causal calls' host
    # work list (``configs.gluon_forward_warpgroups``); the opt-in flat pipeline keeps two
    wg = configs.gluon_forward_warpgroups(d, persistent and not (window or p.varlen or flat_on)
                                          and (causal_list or not causal), seqlen_q, causal)
    nprog = configs.sm_count(q.device) if persistent else 0  # the persistent grid's programs (at most)
    tiles = tile_map(cu_q, cu_k, 2 * half, causal, q_heads, nprog) if work_list else None
    if persistent and causal_list:
        # batched causal: the host's L2-grouped, balanced work list in place of the kernel's LPT order
        # (_hostinfo.causal_schedule, NOTES v22a); None while capturing a new shape or past its item cap
        tiles = causal_work_list(batch, q_heads, q_heads // kv_heads, seqlen_q, seqlen_k, wg * half, bn,
                                 2 * d * q.element_size(), nprog, q.device)
    if needs_list and tiles is None:
        persistent, wg = False, 2
    num_m_tiles = triton.cdiv(seqlen_q, wg * half)
    grid = num_m_tiles * batch * q_heads
    if tiles is not None:  # a program per (query tile that holds rows, head), longest sequences first
        num_m_tiles, grid = batch, tiles.numel()
    # opt-in (TILEATTN_GLUON_FLAT=1, NOTES v21a): one pipeline across a persistent program's items (gluon_flat),
    # for calls whose every item has a key tile: causal or windowed ones only with seqlen_k >= seqlen_q, varlen
    # ones on the work list with that known for every sequence (host copies of cu_seqlens)
    flat = persistent and d <= 128 and flat_on and (
        keys_for_every_tile(cu_q, cu_k, causal or window) if p.varlen and tiles is not None
        else not p.varlen and (not (causal or window) or seqlen_k >= seqlen_q))
    regs = configs.GLUON_3WG_REGS if wg == 3 else (cfg.consumer_regs, cfg.producer_regs, cfg.maxnreg)
    num_items = 0  # unused without PERSISTENT: a constant adds no Triton specialisations (% 16, == 1)
    if persistent:
        num_items, grid = grid, min(grid, nprog)
    part = gluon_streamk.scratch_for(q, persistent and not (flat or causal or window or p.varlen) and tiles is None,
                                     num_items, grid, wg, half, residual)  # stream-K (opt-in), or None
    launch(_fwd_kernel, (grid,), (
        q_desc, k_desc, v_desc, o_desc, r_desc, lse, p.sink if p.sink is not None else lse,
        p.alibi_slopes if p.alibi_slopes is not None else lse, out,
        resid if residual else out, cu_q if cu_q is not None else lse, cu_k if cu_k is not None else lse,
        tiles if tiles is not None else lse,
        seqlen_q, seqlen_k, q_heads, q_heads // kv_heads, num_m_tiles, p.qk_scale, p.softcap_log2,
        *window_bounds(p, seqlen_q, seqlen_k),
        stride_lb, stride_lh, out.stride(1), out.stride(2), p.alibi_stride_b),
        dict(BLOCK_N=bn, HEAD_D=d, K_STAGES=cfg.k_stages, V_STAGES=cfg.v_stages,
             CAUSAL=causal, WINDOW=window,
             STORE_RESID=residual, HAS_SOFTCAP=2 if softcap_fixed_max(p, q.dtype, d) else p.softcap > 0,
             HAS_SINK=p.sink is not None, VARLEN=p.varlen,
             HAS_ALIBI=(2 if alibi_linear and not persistent else 1) if p.alibi_slopes is not None else 0,
             USE_MAP=tiles is not None,
             CONSUMER_REGS=regs[0], PRODUCER_REGS=regs[1], PERSISTENT=persistent,
             num_items=num_items, **({"FLAT": True} if flat else {}), **({"NUM_WG": 3} if wg == 3 else {}),
             **({"CAUSAL_SKIP": True} if wg == 3 and causal and configs.gluon_forward_causal_skip() else {}),
             **({"STAGGER": stagger} if persistent and not flat and (stagger := configs.gluon_forward_stagger())
                else {}),
             **({"STREAMK": True, "PART": part} if part is not None else {})),
        4, 3, maxnreg=regs[2])
    if part is not None:  # the split items' out, lse and residual from their partial records
        gluon_streamk.merge(part, num_items, triton.cdiv(seqlen_k, bn), grid, wg, half, out, lse, resid, p.sink,
                            num_m_tiles, q_heads, seqlen_q, stride_lb, stride_lh)
    return (out, lse, resid) if residual else (out, lse)
