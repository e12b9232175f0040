"""Hopper (sm90) dQ backward kernel in Gluon, warp-specialised; the first of the backward's two kernels where it
applies (``gluon_backward.dkdv`` runs second and reads the row statistics this one writes).

One program per (128-row query tile, batch * q head), or (batched calls without a causal mask or window, head dims
<= 128: ``configs.gluon_dq_persistent``, v35b) at most one per SM taking the tiles in turn: a producer warp loads
the tile's Q and dO halves once, then
streams K and V tiles into shared-memory rings (ready/empty mbarriers); two consumer warpgroups (64 rows each)
first compute their rows' delta = rowsum(dO * (O + r)) - dlse (r: the forward's rounding residual of O, see
``backward._bwd_dq_kernel``) and lse in log2 units, write both to the row-stats buffer (and delta to its own
output, for d(sink)), then per key tile j run

    S = Q K_j^T,  dP = dO V_j^T,  P = exp2(S * qk_scale - lse),  dS = P (dP - delta),  dQ += dS K_j

software-pipelined by one tile: dQ += dS_{j-1} K_{j-1} is issued between S_j and dP_j, so tile j's elementwise
work runs while tile j-1's product holds the tensor cores; every product is waited for inside its iteration.

Scope: ``gluon_backward.applies``'s where the table's entry has ``dq`` on (D=128, and D=256 with 32-key
tiles; D=64 measured no faster than the portable dQ kernel, run 59), with delta from the residual
(``configs.delta_mode`` "residual" with the forward's residual at hand) or the rounded O ("rounded"); the
"correct" mode takes the portable kernel.
Layouts: q / dO / out / resid / dq (B, Sq, Hq, D), k / v (B, Sk, Hkv, D); lse / delta (B, Hq, Sq) fp32; packed
varlen: (1, total, H, D) and lse / delta (Hq, total_q), the key tile that crosses a sequence's end zeroed past it
in shared memory (K and V), a sequence's last query rows stored by masked pointer stores.
"""

import torch
import triton

from .. import configs
from .gluon_common import AVAILABLE, has_window, make_desc, window_bounds
from .launch import launch
from .params import AttnParams

if AVAILABLE:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                                  warpgroup_mma_wait)
    from .common import residual_value  # a @triton.jit helper: Gluon kernels call it like their own
    from .gluon_common import (alibi_slope, feature_scores, global_ns, key_visible, load_kv_ring, row_bounds,
                               stats_row0, store_rows, trace_program, zero_rows_from)
    from .gluon_schedule import key_tiles, persistent_item, program_tile, seq_bounds

    @gluon.jit
    def _dq_load(q_desc, do_desc, k_desc, v_desc, q_smem, do_smem, k_smem, v_smem, bars, b, h, hk, start_m, lo, n,
                 q_row0, k_row0, HALF_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_D: gl.constexpr,
                 K_STAGES: gl.constexpr, V_STAGES: gl.constexpr, t0=0, q_empty=None, q_phase=0):
        """Producer warp: Q and dO halves, then key tiles lo .. lo + n - 1 (K and V) into their rings at ring
        positions t0 .. (rows from q_row0 / k_row0: the sequence's first packed rows, varlen). q_empty (the
        persistent kernel): each half loads once its consumer released the previous item's (phase q_phase)."""
        q_bars, k_ready, k_empty, v_ready, v_empty = bars
        for w in gl.static_range(2):
            if q_empty is not None:
                mbarrier.wait(q_empty.index(w), q_phase ^ 1)
            mbarrier.expect(q_bars.index(w), 2 * HALF_M * HEAD_D * 2)
            tma.async_copy_global_to_shared(q_desc, [b, q_row0 + start_m + w * HALF_M, h, 0], q_bars.index(w),
                                            q_smem.index(w))
            tma.async_copy_global_to_shared(do_desc, [b, q_row0 + start_m + w * HALF_M, h, 0], q_bars.index(w),
                                            do_smem.index(w))
        load_kv_ring(k_desc, v_desc, k_smem, v_smem, k_ready, k_empty, v_ready, v_empty, b, hk, k_row0, lo, n, t0,
                     BLOCK_N, HEAD_D, K_STAGES, V_STAGES)

    @gluon.jit
    def _dq_item(pos, pid, nprog, num_items, num_m_tiles, q_heads, seqlen_q, seqlen_k, win_left, win_right,
                 BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, CAUSAL: gl.constexpr, WINDOW: gl.constexpr):
        """(b, h, start_m, lo, n) of a persistent program's pos-th work item (batched calls): the grid's items in
        ``persistent_item``'s order (causal: every (batch, head)'s longest tile first), one decoding for the
        producer and the consumers."""
        g = persistent_item(pos, pid, nprog, num_items, num_m_tiles, CAUSAL)
        b, h, tile = program_tile(g, num_m_tiles, q_heads, CAUSAL or WINDOW)
        start_m = tile * BLOCK_M
        lo, n = key_tiles(start_m, seqlen_q, seqlen_k, win_left, win_right, BLOCK_M, BLOCK_N, CAUSAL, WINDOW, False)
        return b, h, start_m, lo, n

    @gluon.jit
    def _dq_load_persistent(q_desc, do_desc, k_desc, v_desc, q_smem, do_smem, k_smem, v_smem, bars, q_empty, pid,
                            num_items, nprog, num_m_tiles, q_heads, group, seqlen_q, seqlen_k, win_left, win_right,
                            HALF_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_D: gl.constexpr,
                            K_STAGES: gl.constexpr, V_STAGES: gl.constexpr, CAUSAL: gl.constexpr,
                            WINDOW: gl.constexpr):
        """Persistent producer: items pid, pid + nprog, ... in turn (``_dq_load`` each), an item's Q / dO halves
        once the consumers released the previous item's (after their last S and dP products), the K / V rings
        running on across items (positions t0 + j)."""
        t0 = gl.to_tensor(0)
        for item in range(pid, num_items, nprog):
            it = (item - pid) // nprog
            b, h, start_m, lo, n = _dq_item(item, pid, nprog, num_items, num_m_tiles, q_heads, seqlen_q, seqlen_k,
                                            win_left, win_right, 2 * HALF_M, BLOCK_N, CAUSAL, WINDOW)
            _dq_load(q_desc, do_desc, k_desc, v_desc, q_smem, do_smem, k_smem, v_smem, bars, b, h, h // group,
                     start_m, lo, n, 0, 0, HALF_M, BLOCK_N, HEAD_D, K_STAGES, V_STAGES, t0, q_empty, it & 1)
            t0 += n

    @gluon.jit
    def _row_stats(O, RESID, DO, LSE, DLSE, DELTA, STATS, b, h, row0, seqlen_q, stride_ob, stride_os, stride_oh,
                   stride_dob, stride_dos, stride_doh, stride_lb, stride_lh, stride_sh, stride_st, srow0, q_row0,
                   row_layout: gl.constexpr, HALF_M: gl.constexpr, HEAD_D: gl.constexpr, HAS_RESID: gl.constexpr,
                   HAS_DLSE: gl.constexpr):
        """This warpgroup's rows: delta = rowsum(dO * (O + r)) - dlse and lse in log2 units (+inf for rows that
        saw no key or lie past the sequence), written to DELTA and to the row-stats buffer; returned in
        ``row_layout``. Rows count from the sequence's start, packed row q_row0 (varlen; b is then 0)."""
        CHUNK: gl.constexpr = 32  # columns per pass: O, r and dO tiles stay small beside nothing else
        blk: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 8], threads_per_warp=[8, 4], warps_per_cta=[4, 1],
                                             order=[1, 0])
        rows = row0 + gl.arange(0, HALF_M, layout=gl.SliceLayout(1, blk))
        cols = gl.arange(0, CHUNK, layout=gl.SliceLayout(0, blk))
        inside = (rows < seqlen_q)[:, None]
        prow = (q_row0 + rows).to(gl.int64)[:, None]
        o_offs = b.to(gl.int64) * stride_ob + h.to(gl.int64) * stride_oh + prow * stride_os
        do_offs = b.to(gl.int64) * stride_dob + h.to(gl.int64) * stride_doh + prow * stride_dos
        delta = gl.zeros([HALF_M], gl.float32, layout=gl.SliceLayout(1, blk))
        for c0 in gl.static_range(0, HEAD_D, CHUNK):
            o = gl.load(O + o_offs + c0 + cols[None, :], mask=inside, other=0.0)
            if HAS_RESID:  # out's rounding residual, in out's dtype or int8 (``residual_value``)
                o = o.to(gl.float32) + residual_value(gl.load(RESID + o_offs + c0 + cols[None, :], mask=inside,
                                                              other=0.0), o)
            o = o.to(gl.float32)
            do = gl.load(DO + do_offs + c0 + cols[None, :], mask=inside, other=0.0).to(gl.float32)
            delta += gl.sum(o * do, axis=1)
        delta = gl.convert_layout(delta, row_layout)
        rows = row0 + gl.arange(0, HALF_M, layout=row_layout)
        inside = rows < seqlen_q
        lrow = b.to(gl.int64) * stride_lb + h.to(gl.int64) * stride_lh + q_row0 + rows
        if HAS_DLSE:
            delta -= gl.load(DLSE + lrow, mask=inside, other=0.0)
        lse = gl.load(LSE + lrow, mask=inside, other=float("inf"))
        lse = gl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634
        gl.store(DELTA + lrow, delta, mask=inside)
        srow = STATS + h.to(gl.int64) * stride_sh + srow0 + rows
        gl.store(srow, lse, mask=inside)
        gl.store(srow + stride_st, delta, mask=inside)
        return lse, delta

    @gluon.jit
    def _probs(s, j, n_full, lse, rows, cols, seqlen_k, diag, qk_scale, win, softcap, slope, BLOCK_N: gl.constexpr,
               CAUSAL: gl.constexpr, WINDOW: gl.constexpr, HAS_SOFTCAP: gl.constexpr, IS_BF16: gl.constexpr,
               HAS_ALIBI: gl.constexpr):
        """P = exp2(S * qk_scale - lse) of key tile j, 0 past the sequence's keys, after the diagonal (causal) or
        outside the rows' windows in the tiles from n_full on and (window) before full_lo. win = (full_lo,
        win_left, win_right): row r sees keys [r + diag - win_left, r + diag + win_right]. HAS_SOFTCAP: the scores
        are softcap * tanh(S * qk_scale) (softcap pre-multiplied by log2 e, tanh as the forward's); returns (P,
        1 - tanh^2: the factor of dS), else (P, P). HAS_ALIBI: minus slope * |r + diag - key| (log2 units)."""
        full_lo, win_left, win_right = win
        if HAS_SOFTCAP or HAS_ALIBI:
            sc, t = feature_scores(s, qk_scale, softcap, slope, (rows + diag).to(gl.float32)[:, None],
                                   (j * BLOCK_N + cols).to(gl.float32)[None, :], HAS_SOFTCAP, HAS_ALIBI, IS_BF16)
            p = gl.exp2(sc - lse[:, None])
        else:
            p = gl.exp2(s * qk_scale - lse[:, None])
        masked = j >= n_full
        if WINDOW:
            masked = masked | (j < full_lo)
        if masked:  # uniform branch: the diagonal / window-edge / sequence-end tiles only
            visible = key_visible(j * BLOCK_N + cols, rows, seqlen_k, diag, win_left, win_right, CAUSAL, WINDOW)
            p = gl.where(visible, p, 0.0)
        if HAS_SOFTCAP:
            return p, 1.0 - t * t
        else:
            return p, p

    @gluon.jit
    def _dscores_op(p, g, dp, delta, dtype: gl.constexpr, op_layout: gl.constexpr, HAS_SOFTCAP: gl.constexpr):
        """dS = P (dP - delta) (times g = 1 - tanh^2 with a softcap) as the dQ product's A operand."""
        ds = p * (dp - delta[:, None])
        if HAS_SOFTCAP:
            ds = ds * g
        return gl.convert_layout(ds.to(dtype), op_layout)

    @gluon.jit
    def _zero_past_end(ring, slot, j, seqlen_k):
        """Varlen: zero the rows of ring slot ``slot`` (key tile j) past the sequence's last key."""
        BLOCK_N: gl.constexpr = ring.shape[2]
        if (j + 1) * BLOCK_N > seqlen_k:  # uniform branch: the sequence's last key tile only
            zero_rows_from(ring.index(slot).reshape([BLOCK_N, ring.shape[4]]), seqlen_k - j * BLOCK_N)

    @gluon.jit
    def _store_dq(dq_desc, q_smem, w: gl.constexpr, b, row, h):
        """dQ staged in this warpgroup's Q buffer to rows row .. by TMA (rows past the tensor clipped)."""
        fence_async_shared()
        gl.thread_barrier()
        tma.async_copy_shared_to_global(dq_desc, [b, row, h, 0], q_smem.index(w))
        tma.store_wait(pendings=0)

    @gluon.jit
    def _dq_consumer(w: gl.constexpr, dq_desc, O, RESID, DO, LSE, DLSE, DELTA, STATS, DQ, ALIBI_B, q_smem, do_smem,
                     k_smem, v_smem, bars, b, h, start_m, n, seqlen_q, seqlen_k, qk_scale, sm_scale, stride_ob,
                     stride_os, stride_oh, stride_dob, stride_dos, stride_doh, stride_lb, stride_lh, stride_sh,
                     stride_st, srow0, q_row0, stride_dqs, stride_dqh, HALF_M: gl.constexpr, BLOCK_N: gl.constexpr,
                     lo, win_left, win_right, softcap, HEAD_D: gl.constexpr, K_STAGES: gl.constexpr,
                     V_STAGES: gl.constexpr, CAUSAL: gl.constexpr, WINDOW: gl.constexpr, HAS_SOFTCAP: gl.constexpr,
                     HAS_RESID: gl.constexpr, HAS_DLSE: gl.constexpr, VARLEN: gl.constexpr, HAS_ALIBI: gl.constexpr,
                     t0=0, q_phase=0, q_empty=None, dq_stage=None):
        """One warpgroup: rows [start_m + w * HALF_M, + HALF_M), key tiles lo .. lo + n - 1 (ring positions t0 ..
        t0 + n - 1; Q's barrier phase q_phase: 0, 0 but in the persistent kernel). VARLEN: the key tile that
        crosses the sequence's end has its other rows (the next sequence's) zeroed in K and V before use (their P
        is 0, but 0 * NaN is NaN); the sequence's last rows are stored by masked pointer stores (DQ).
        q_empty / dq_stage (the persistent kernel, batched): Q and dO are released after the last S and dP
        products, and dQ is staged in ``dq_stage`` (this warpgroup's buffer), its TMA store left in flight (the
        next item's epilogue and the program's end wait for it)."""
        q_bars, k_ready, k_empty, v_ready, v_empty = bars
        dtype: gl.constexpr = dq_desc.dtype
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, BLOCK_N, 16])
        acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                             instr_shape=[16, HEAD_D, 16])
        op_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
        row0 = start_m + w * HALF_M
        lse, delta = _row_stats(O, RESID, DO, LSE, DLSE, DELTA, STATS, b, h, row0, seqlen_q, stride_ob, stride_os,
                                stride_oh, stride_dob, stride_dos, stride_doh, stride_lb, stride_lh, stride_sh,
                                stride_st, srow0, q_row0, gl.SliceLayout(1, s_layout), HALF_M, HEAD_D, HAS_RESID,
                                HAS_DLSE)
        # full key tiles [full_lo, n_full): no mask for this warpgroup's rows
        rows, cols, diag, n_full, full_lo = row_bounds(row0, seqlen_q, seqlen_k, win_left, win_right, s_layout,
                                                       HALF_M, BLOCK_N, CAUSAL, WINDOW)
        win = (full_lo, win_left, win_right)
        slope = alibi_slope(ALIBI_B, h, HAS_ALIBI)
        dq = gl.zeros([HALF_M, HEAD_D], gl.float32, layout=acc_layout)
        s_zero = gl.zeros([HALF_M, BLOCK_N], gl.float32, layout=s_layout)
        q2 = q_smem.index(w).reshape([HALF_M, HEAD_D])
        do2 = do_smem.index(w).reshape([HALF_M, HEAD_D])
        mbarrier.wait(q_bars.index(w), q_phase)
        if n > 0:
            ks0 = t0 % K_STAGES
            vs0 = t0 % V_STAGES
            mbarrier.wait(k_ready.index(ks0), (t0 // K_STAGES) & 1)
            if VARLEN:
                _zero_past_end(k_smem, ks0, lo, seqlen_k)
            s_tok = warpgroup_mma(q2, k_smem.index(ks0).reshape([BLOCK_N, HEAD_D]).permute((1, 0)), s_zero,
                                  use_acc=False, is_async=True)
            mbarrier.wait(v_ready.index(vs0), (t0 // V_STAGES) & 1)
            if VARLEN:
                _zero_past_end(v_smem, vs0, lo, seqlen_k)
            dp_tok = warpgroup_mma(do2, v_smem.index(vs0).reshape([BLOCK_N, HEAD_D]).permute((1, 0)), s_zero,
                                   use_acc=False, is_async=True)
            s = warpgroup_mma_wait(num_outstanding=1, deps=(s_tok, ))
            p, dtanh = _probs(s, lo, n_full, lse, rows, cols, seqlen_k, diag, qk_scale, win, softcap, slope, BLOCK_N,
                              CAUSAL, WINDOW, HAS_SOFTCAP, dtype == gl.bfloat16, HAS_ALIBI)
            dp = warpgroup_mma_wait(num_outstanding=0, deps=(dp_tok, ))
            mbarrier.arrive(v_empty.index(vs0), count=1)
            ds_op = _dscores_op(p, dtanh, dp, delta, dtype, op_layout, HAS_SOFTCAP)
            for j in range(1, n):
                t = t0 + j
                ks = t % K_STAGES
                vs = t % V_STAGES
                kp = (t - 1) % K_STAGES
                mbarrier.wait(k_ready.index(ks), (t // K_STAGES) & 1)
                if VARLEN:
                    _zero_past_end(k_smem, ks, lo + j, seqlen_k)
                s_tok = warpgroup_mma(q2, k_smem.index(ks).reshape([BLOCK_N, HEAD_D]).permute((1, 0)), s_zero,
                                      use_acc=False, is_async=True)
                dq_tok = warpgroup_mma(ds_op, k_smem.index(kp).reshape([BLOCK_N, HEAD_D]), dq, is_async=True)
                mbarrier.wait(v_ready.index(vs), (t // V_STAGES) & 1)
                if VARLEN:
                    _zero_past_end(v_smem, vs, lo + j, seqlen_k)
                dp_tok = warpgroup_mma(do2, v_smem.index(vs).reshape([BLOCK_N, HEAD_D]).permute((1, 0)), s_zero,
                                       use_acc=False, is_async=True)
                s = warpgroup_mma_wait(num_outstanding=2, deps=(s_tok, ))
                p, dtanh = _probs(s, lo + j, n_full, lse, rows, cols, seqlen_k, diag, qk_scale, win, softcap, slope,
                                  BLOCK_N, CAUSAL, WINDOW, HAS_SOFTCAP, dtype == gl.bfloat16, HAS_ALIBI)
                dq, dp = warpgroup_mma_wait(num_outstanding=0, deps=(dq_tok, dp_tok))
                mbarrier.arrive(k_empty.index(kp), count=1)
                mbarrier.arrive(v_empty.index(vs), count=1)
                ds_op = _dscores_op(p, dtanh, dp, delta, dtype, op_layout, HAS_SOFTCAP)
            if q_empty is not None:  # every S and dP product of this item is done: the next item's Q / dO may load
                mbarrier.arrive(q_empty.index(w), count=1)
            kp = (t0 + n - 1) % K_STAGES
            dq_tok = warpgroup_mma(ds_op, k_smem.index(kp).reshape([BLOCK_N, HEAD_D]), dq, is_async=True)
            dq = warpgroup_mma_wait(num_outstanding=0, deps=(dq_tok, ))
            mbarrier.arrive(k_empty.index(kp), count=1)
        elif q_empty is not None:
            mbarrier.arrive(q_empty.index(w), count=1)
        if dq_stage is not None:  # persistent: dQ in its own buffer once the previous item's store has read it
            tma.store_wait(pendings=0)
            gl.thread_barrier()
            stage = dq_stage.index(w)
            stage.reshape([HALF_M, HEAD_D]).store((dq * sm_scale).to(dtype))
            fence_async_shared()
            gl.thread_barrier()
            tma.async_copy_shared_to_global(dq_desc, [b, row0, h, 0], stage)
        else:
            q2.store((dq * sm_scale).to(dtype))  # Q is dead: its buffer stages dQ (TMA clips rows past the tensor)
            if VARLEN:
                if row0 + HALF_M > seqlen_q:  # the sequence's last rows (or none): masked pointer stores
                    gl.thread_barrier()
                    store_rows(DQ, q2, q_row0 + row0, h, seqlen_q - row0, stride_dqs, stride_dqh)
                else:
                    _store_dq(dq_desc, q_smem, w, b, q_row0 + row0, h)
            else:
                _store_dq(dq_desc, q_smem, w, b, row0, h)

    @gluon.jit
    def _dq_consumer_persistent(w: gl.constexpr, dq_desc, O, RESID, DO, LSE, DLSE, DELTA, STATS, DQ, ALIBI, q_smem,
                                do_smem, k_smem, v_smem, bars, q_empty, dq_stage, pid, num_items, nprog, num_m_tiles,
                                q_heads, seqlen_q, seqlen_k, qk_scale, sm_scale, stride_ob, stride_os, stride_oh,
                                stride_dob, stride_dos, stride_doh, stride_lb, stride_lh, stride_sh, stride_st,
                                stride_dqs, stride_dqh, stride_ab, HALF_M: gl.constexpr, BLOCK_N: gl.constexpr,
                                win_left, win_right, softcap, HEAD_D: gl.constexpr, K_STAGES: gl.constexpr,
                                V_STAGES: gl.constexpr, CAUSAL: gl.constexpr, WINDOW: gl.constexpr,
                                HAS_SOFTCAP: gl.constexpr, HAS_RESID: gl.constexpr, HAS_DLSE: gl.constexpr,
                                HAS_ALIBI: gl.constexpr):
        """Persistent consumer warpgroup w (batched calls): ``_dq_consumer`` on the items pid, pid + nprog, ...
        (``_dq_item``), the K / V ring positions t0 carried across items, Q's phase it & 1."""
        t0 = gl.to_tensor(0)
        for item in range(pid, num_items, nprog):
            it = (item - pid) // nprog
            b, h, start_m, lo, n = _dq_item(item, pid, nprog, num_items, num_m_tiles, q_heads, seqlen_q, seqlen_k,
                                            win_left, win_right, 2 * HALF_M, BLOCK_N, CAUSAL, WINDOW)
            alibi_b = ALIBI
            if HAS_ALIBI:
                alibi_b = ALIBI + b * stride_ab
            _dq_consumer(w, dq_desc, O, RESID, DO, LSE, DLSE, DELTA, STATS, DQ, alibi_b, q_smem, do_smem, k_smem,
                         v_smem, bars, b, h, start_m, n, seqlen_q, seqlen_k, qk_scale, sm_scale, stride_ob,
                         stride_os, stride_oh, stride_dob, stride_dos, stride_doh, stride_lb, stride_lh, stride_sh,
                         stride_st, stats_row0(b, 0, seqlen_q, False), 0, stride_dqs, stride_dqh, HALF_M, BLOCK_N,
                         lo, win_left, win_right, softcap, HEAD_D, K_STAGES, V_STAGES, CAUSAL, WINDOW, HAS_SOFTCAP,
                         HAS_RESID, HAS_DLSE, False, HAS_ALIBI, t0, it & 1, q_empty, dq_stage)
            t0 += n
        tma.store_wait(pendings=0)  # the last item's dQ store has read shared memory

    @gluon.jit
    def _dq_kernel(q_desc, do_desc, k_desc, v_desc, dq_desc, O, RESID, DO, LSE, DLSE, DELTA, STATS, DQ, CU_Q, CU_K,
                   ALIBI,
                   seqlen_q, seqlen_k, q_heads, group, num_m_tiles, qk_scale, sm_scale, stride_ob, stride_os,
                   stride_oh, stride_dob, stride_dos, stride_doh, stride_lb, stride_lh, stride_sh, stride_st,
                   stride_dqs, stride_dqh, win_left, win_right, softcap, stride_ab, BLOCK_N: gl.constexpr,
                   HEAD_D: gl.constexpr, K_STAGES: gl.constexpr, V_STAGES: gl.constexpr, CAUSAL: gl.constexpr,
                   WINDOW: gl.constexpr, HAS_SOFTCAP: gl.constexpr,
                   HAS_RESID: gl.constexpr, HAS_DLSE: gl.constexpr, VARLEN: gl.constexpr, HAS_ALIBI: gl.constexpr,
                   CONSUMER_REGS: gl.constexpr, PRODUCER_REGS: gl.constexpr, TRACE=None,
                   PERSISTENT: gl.constexpr = False, num_items=0):
        """Warp-specialised: two consumer warpgroups (64 query rows each) and a producer warp. TRACE: None, or an
        int64 (programs, 4) buffer for each program's trace (``trace_program``; measurement only). VARLEN: packed (1,
        total, H, D) tensors, sequence b spans rows CU_Q[b] .. CU_Q[b + 1] (keys: CU_K); seqlen_q / seqlen_k are
        then read per sequence (the arguments are the maxima); DQ: dq as a pointer (row and head strides
        stride_dqs / stride_dqh) for the masked stores of a sequence's last rows. ALIBI: fp32 slopes (Hq,) or (B,
        Hq) (batch stride stride_ab, 0 for (Hq,)). PERSISTENT (batched, HEAD_D <= 128;
        ``configs.gluon_dq_persistent``, by default calls without a causal mask or window): a grid of at most one
        program per SM runs the num_items query tiles in turn (``_dq_item``), the next item's Q / dO and first key
        tiles loading while an item's last products and epilogue run, dQ staged in its own buffers (TRACE: one
        record per program, n = its items' key tiles). ``benchmarks/persistent_protocol.py`` models its barriers
        (``check_dq``): change the two together."""
        HALF_M: gl.constexpr = q_desc.block_type.shape[1]
        dtype: gl.constexpr = q_desc.dtype
        if TRACE is not None:
            t_start = global_ns()
        if PERSISTENT:
            pid = gl.program_id(0)
            nprog = gl.num_programs(0)
            if TRACE is not None:
                n = gl.to_tensor(0)  # the trace's step count: every item's key tiles
                for item in range(pid, num_items, nprog):
                    n += _dq_item(item, pid, nprog, num_items, num_m_tiles, q_heads, seqlen_q, seqlen_k, win_left,
                                  win_right, 2 * HALF_M, BLOCK_N, CAUSAL, WINDOW)[4]
        else:
            b, h, tile = program_tile(gl.program_id(0), num_m_tiles, q_heads, CAUSAL or WINDOW)
            hk = h // group
            start_m = tile * 2 * HALF_M
            q_row0, seqlen_q, k_row0, seqlen_k, b_desc = seq_bounds(CU_Q, CU_K, b, seqlen_q, seqlen_k, VARLEN)
            lo, n = key_tiles(start_m, seqlen_q, seqlen_k, win_left, win_right, 2 * HALF_M, BLOCK_N, CAUSAL, WINDOW,
                              VARLEN)
            srow0 = stats_row0(b, q_row0, seqlen_q, VARLEN)

        q_smem = gl.allocate_shared_memory(dtype, [2, 1, HALF_M, 1, HEAD_D], q_desc.layout)
        do_smem = gl.allocate_shared_memory(dtype, [2, 1, HALF_M, 1, HEAD_D], do_desc.layout)
        k_smem = gl.allocate_shared_memory(dtype, [K_STAGES, 1, BLOCK_N, 1, HEAD_D], k_desc.layout)
        v_smem = gl.allocate_shared_memory(dtype, [V_STAGES, 1, BLOCK_N, 1, HEAD_D], v_desc.layout)
        q_bars = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        k_ready = gl.allocate_shared_memory(gl.int64, [K_STAGES, 1], mbarrier.MBarrierLayout())
        k_empty = gl.allocate_shared_memory(gl.int64, [K_STAGES, 1], mbarrier.MBarrierLayout())
        v_ready = gl.allocate_shared_memory(gl.int64, [V_STAGES, 1], mbarrier.MBarrierLayout())
        v_empty = gl.allocate_shared_memory(gl.int64, [V_STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(2):
            mbarrier.init(q_bars.index(i), count=1)
        for i in gl.static_range(K_STAGES):
            mbarrier.init(k_ready.index(i), count=1)
            mbarrier.init(k_empty.index(i), count=2)  # both consumer warpgroups release each slot
        for i in gl.static_range(V_STAGES):
            mbarrier.init(v_ready.index(i), count=1)
            mbarrier.init(v_empty.index(i), count=2)
        bars = (q_bars, k_ready, k_empty, v_ready, v_empty)
        if PERSISTENT:
            q_empty = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
            for i in gl.static_range(2):
                mbarrier.init(q_empty.index(i), count=1)
            dq_stage = gl.allocate_shared_memory(dtype, [2, 1, HALF_M, 1, HEAD_D], dq_desc.layout)
            gl.warp_specialize([
                (_dq_consumer_persistent, (0, dq_desc, O, RESID, DO, LSE, DLSE, DELTA, STATS, DQ, ALIBI, q_smem,
                                           do_smem, k_smem, v_smem, bars, q_empty, dq_stage, pid, num_items, nprog,
                                           num_m_tiles, q_heads, seqlen_q, seqlen_k, qk_scale, sm_scale, stride_ob,
                                           stride_os, stride_oh, stride_dob, stride_dos, stride_doh, stride_lb,
                                           stride_lh, stride_sh, stride_st, stride_dqs, stride_dqh, stride_ab, HALF_M,
                                           BLOCK_N, win_left, win_right, softcap, HEAD_D, K_STAGES, V_STAGES, CAUSAL,
                                           WINDOW, HAS_SOFTCAP, HAS_RESID, HAS_DLSE, HAS_ALIBI)),
                (_dq_consumer_persistent, (1, dq_desc, O, RESID, DO, LSE, DLSE, DELTA, STATS, DQ, ALIBI, q_smem,
                                           do_smem, k_smem, v_smem, bars, q_empty, dq_stage, pid, num_items, nprog,
                                           num_m_tiles, q_heads, seqlen_q, seqlen_k, qk_scale, sm_scale, stride_ob,
                                           stride_os, stride_oh, stride_dob, stride_dos, stride_doh, stride_lb,
                                           stride_lh, stride_sh, stride_st, stride_dqs, stride_dqh, stride_ab, HALF_M,
                                           BLOCK_N, win_left, win_right, softcap, HEAD_D, K_STAGES, V_STAGES, CAUSAL,
                                           WINDOW, HAS_SOFTCAP, HAS_RESID, HAS_DLSE, HAS_ALIBI)),
                (_dq_load_persistent, (q_desc, do_desc, k_desc, v_desc, q_smem, do_smem, k_smem, v_smem, bars, q_empty,
                                       pid, num_items, nprog, num_m_tiles, q_heads, group, seqlen_q, seqlen_k,
                                       win_left, win_right, HALF_M, BLOCK_N, HEAD_D, K_STAGES, V_STAGES, CAUSAL,
                                       WINDOW)),
            ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])
        else:
            alibi_b = ALIBI
            if HAS_ALIBI:
                alibi_b = ALIBI + b * stride_ab
            gl.warp_specialize([
                (_dq_consumer, (0, dq_desc, O, RESID, DO, LSE, DLSE, DELTA, STATS, DQ, alibi_b, q_smem, do_smem,
                                k_smem, v_smem, bars, b_desc, h, start_m, n, seqlen_q, seqlen_k, qk_scale, sm_scale,
                                stride_ob, stride_os, stride_oh, stride_dob, stride_dos, stride_doh, stride_lb,
                                stride_lh, stride_sh, stride_st, srow0, q_row0, stride_dqs, stride_dqh, HALF_M,
                                BLOCK_N, lo, win_left, win_right, softcap, HEAD_D, K_STAGES, V_STAGES, CAUSAL, WINDOW,
                                HAS_SOFTCAP, HAS_RESID, HAS_DLSE, VARLEN, HAS_ALIBI)),
                (_dq_consumer, (1, dq_desc, O, RESID, DO, LSE, DLSE, DELTA, STATS, DQ, alibi_b, q_smem, do_smem,
                                k_smem, v_smem, bars, b_desc, h, start_m, n, seqlen_q, seqlen_k, qk_scale, sm_scale,
                                stride_ob, stride_os, stride_oh, stride_dob, stride_dos, stride_doh, stride_lb,
                                stride_lh, stride_sh, stride_st, srow0, q_row0, stride_dqs, stride_dqh, HALF_M,
                                BLOCK_N, lo, win_left, win_right, softcap, HEAD_D, K_STAGES, V_STAGES, CAUSAL, WINDOW,
                                HAS_SOFTCAP, HAS_RESID, HAS_DLSE, VARLEN, HAS_ALIBI)),
                (_dq_load, (q_desc, do_desc, k_desc, v_desc, q_smem, do_smem, k_smem, v_smem, bars, b_desc, h, hk,
                            start_m, lo, n, q_row0, k_row0, HALF_M, BLOCK_N, HEAD_D, K_STAGES, V_STAGES)),
            ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])
        if TRACE is not None:
            trace_program(TRACE, t_start, n)


def dq(q, k, v, out, resid, dout, lse, dlse, delta, stats, dq_out, p: AttnParams, cfg):
    """Write dq_out (B, Sq, Hq, D), delta (lse's layout) and the row-stats buffer for a call
    ``gluon_backward.applies`` accepted. ``resid``: out's rounding residual (same strides as out) or None (delta
    from the rounded out); ``dlse``: fp32 contiguous (B, Hq, Sq) or None."""
    batch, seqlen_q, q_heads, d = q.shape
    seqlen_k, kv_heads = k.shape[1], k.shape[2]
    if p.varlen:  # packed (1, total, H, D), lse (Hq, total_q): the grid covers the longest sequence
        batch, seqlen_q, seqlen_k = p.batch, p.max_seqlen_q, p.max_seqlen_k
        stride_lb, stride_lh = 0, lse.stride(0)
    else:
        stride_lb, stride_lh = q_heads * seqlen_q, seqlen_q
    bf16 = q.dtype == torch.bfloat16
    half, bn = 64, cfg.dq_block_n
    q_desc, do_desc = make_desc(q, (1, half, 1, d), bf16), make_desc(dout, (1, half, 1, d), bf16)
    k_desc, v_desc = make_desc(k, (1, bn, 1, d), bf16), make_desc(v, (1, bn, 1, d), bf16)
    dq_desc = make_desc(dq_out, (1, half, 1, d), bf16)
    num_m_tiles = triton.cdiv(seqlen_q, 2 * half)
    os_, dos, sts = out.stride(), dout.stride(), stats.stride()
    grid, extra = num_m_tiles * batch * q_heads, {}
    causal = p.window_right == 0 and not has_window(p)
    if not p.varlen and d <= 128 and configs.gluon_dq_persistent(causal or has_window(p)):  # items in turn
        extra = dict(PERSISTENT=True, num_items=grid)
        grid = min(grid, configs.sm_count(q.device))
    launch(_dq_kernel, (grid,), (
        q_desc, do_desc, k_desc, v_desc, dq_desc, out, resid if resid is not None else out, dout, lse,
        dlse if dlse is not None else lse, delta, stats, dq_out, p.cu_seqlens_q if p.varlen else lse,
        p.cu_seqlens_k if p.varlen else lse, p.alibi_slopes if p.alibi_slopes is not None else lse, seqlen_q,
        seqlen_k, q_heads, q_heads // kv_heads,
        num_m_tiles, p.qk_scale, p.softmax_scale, os_[0], os_[1], os_[2], dos[0], dos[1], dos[2],
        stride_lb, stride_lh, sts[1], sts[0], dq_out.stride(1), dq_out.stride(2),
        *window_bounds(p, seqlen_q, seqlen_k), p.softcap_log2, p.alibi_stride_b),
        dict(BLOCK_N=bn, HEAD_D=d, K_STAGES=cfg.dq_k_stages, V_STAGES=2,
             CAUSAL=causal, WINDOW=has_window(p), HAS_SOFTCAP=p.softcap > 0,
             HAS_ALIBI=p.alibi_slopes is not None,
             HAS_RESID=resid is not None, HAS_DLSE=dlse is not None, VARLEN=p.varlen,
             CONSUMER_REGS=cfg.consumer_regs,
             PRODUCER_REGS=cfg.producer_regs, **extra),
        4, 1, maxnreg=cfg.maxnreg)
