"""Hopper (sm90) dK/dV backward kernel in Gluon, warp-specialised: a producer warp issues every TMA load (the key
tile's K and V once, then the query steps' Q, dO, lse and delta into a shared-memory ring with ready/empty
mbarriers); two consumer warpgroups each own 64 of the tile's 128 keys and, per query step (``block_m`` rows: 32 at
D=128, 64 at D=64), run

    S^T = K Q^T,  dP^T = V dO^T  (asynchronous warpgroup MMAs; Q / dO from shared memory, K / V from shared
                                  memory or, KV_REGS, from registers loaded once: ``kv_regs``)
    P^T = exp2(S^T * qk_scale - lse),  dS^T = P^T (dP^T - delta)
    dV += P^T dO,  dK += dS^T Q  (P^T and dS^T as register A operands: no transposes)

software-pipelined by one step (``pipeline``): step t's S^T / dP^T are issued around step t-1's dV / dK products,
so the elementwise work of one step runs while the previous step's products hold the tensor cores. Nothing is in
flight across the loop's back edge (ptxas serialises every wgmma of a kernel when a register accumulator is,
NOTES.md session 10). The two warpgroups do not synchronise with each other. It replaces the portable
``_bwd_dkdv_kernel`` (backward.py) for the calls ``applies`` accepts and reads the row statistics (lse in log2
units and delta, ``backward._row_stats_buffer``) that the dQ kernel (portable, or Gluon's in ``gluon_dq.py``)
writes first. dK/dV of a KV head sum over the query heads of its GQA group in a fixed order, so results are
bit-reproducible like the portable kernel's.

Scope (``applies``): sm90, fp16/bf16, Dqk == Dv with an entry in ``configs.gluon_backward_config`` (64, 128),
batched inputs and packed varlen ones (``TILEATTN_GLUON_VARLEN=0`` opts out), causal (bottom-right aligned) or not,
sliding windows (the query-tile range of each key tile, masks on the window's edge tiles), softcap (dS through
the tanh, with the forward's tanh) and ALiBi (its slope per query head); no dropout (sinks and dlse only change lse
and delta, so they are in scope). Everything else takes the portable kernel. Varlen: a query tile that crosses its
sequence's end reads the next sequence's Q / dO rows, zeroed in shared memory before use, so no value of one
sequence (NaN and inf included) reaches another's gradients; a key half that crosses it is stored by masked pointer
stores.

Opt-in (``TILEATTN_GLUON_BWD_FUSED=1``, ``fused_dq``): FUSED_DQ, the same kernel computing dQ as well and
reduce-adding it into an fp32 accumulator (the 5-matmul backward; no dQ kernel).

Layouts: q / dO (B, Sq, Hq, D), k / v / dk / dv (B, Sk, Hkv, D), any strides with the last one 1 and 16-byte
aligned (TMA); rows past Sq load as zeros with lse +inf (P = 0); keys past Sk are computed and clipped by the TMA
store. One program per (128-key tile, batch * kv head).
"""

import functools

import torch
import triton

from .. import configs
from . import fused_dq
from .gluon_common import AVAILABLE, has_window, make_desc, window_bounds
from .launch import host_descriptor, launch, tma_aligned
from .params import AttnParams

if AVAILABLE:
    from triton.experimental import gluon
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor as GluonTensorDescriptor
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                                  warpgroup_mma_wait)
    from .gluon_backward_split import _split_consumer
    from .fused_dq import issue_dq, stage_dq_step
    from .gluon_backward_steps import dkdv_dscores, dkdv_mask_bounds, dkdv_probs
    from .gluon_common import alibi_slope, global_ns, stats_row0, store_rows, trace_program, zero_rows_from
    from .gluon_schedule import seq_bounds

    @gluon.jit
    def _dkdv_load(q_desc, do_desc, k_desc, v_desc, st_desc, q_smem, do_smem, k_smem, v_smem, lse_smem, delta_smem,
                   bars, b, hk, group, start_n, m_lo, n_m, srow0, stride_sh, stride_st, q_row0, k_row0,
                   HALF_N: gl.constexpr, BLOCK_M: gl.constexpr, HEAD_D: gl.constexpr, STAGES: gl.constexpr,
                   KV_PARTS: gl.constexpr):
        """Producer warp: the tile's K and V (KV_PARTS parts of HALF_N keys: one per warpgroup, or one shared by
        both with SPLIT), then Q, dO and the row statistics (lse, delta) of query tiles m_lo .. m_lo + n_m - 1 of
        each query head of the group (step t = g * n_m + tile) into ring slot t % STAGES. q_row0 / k_row0: the
        sequence's first packed row (varlen; 0 batched)."""
        kv_bar, ready, empty = bars
        mbarrier.expect(kv_bar, KV_PARTS * 2 * HALF_N * HEAD_D * 2)
        for w in gl.static_range(KV_PARTS):
            tma.async_copy_global_to_shared(k_desc, [b, k_row0 + start_n + w * HALF_N, hk, 0], kv_bar,
                                            k_smem.index(w))
            tma.async_copy_global_to_shared(v_desc, [b, k_row0 + start_n + w * HALF_N, hk, 0], kv_bar,
                                            v_smem.index(w))
        for t in range(group * n_m):
            g = t // n_m
            row = (m_lo + t - g * n_m) * BLOCK_M
            s = t % STAGES
            mbarrier.wait(empty.index(s), ((t // STAGES) & 1) ^ 1)
            mbarrier.expect(ready.index(s), 2 * BLOCK_M * HEAD_D * 2 + 2 * BLOCK_M * 4)
            tma.async_copy_global_to_shared(q_desc, [b, q_row0 + row, hk * group + g, 0], ready.index(s),
                                            q_smem.index(s))
            tma.async_copy_global_to_shared(do_desc, [b, q_row0 + row, hk * group + g, 0], ready.index(s),
                                            do_smem.index(s))
            srow = (hk * group + g) * stride_sh + srow0 + row
            tma.async_copy_global_to_shared(st_desc, [srow], ready.index(s), lse_smem.index(s))
            tma.async_copy_global_to_shared(st_desc, [stride_st + srow], ready.index(s), delta_smem.index(s))

    @gluon.jit
    def _zero_foreign_rows(q_smem, do_smem, s, tile, seqlen_q, BLOCK_M: gl.constexpr):
        """Varlen: zero the rows of ring slot s's Q and dO past the sequence's end (query tile ``tile``)."""
        if (tile + 1) * BLOCK_M > seqlen_q:  # uniform branch: the sequence's last query tile only
            HEAD_D: gl.constexpr = q_smem.shape[4]
            zero_rows_from(q_smem.index(s).reshape([BLOCK_M, HEAD_D]), seqlen_q - tile * BLOCK_M)
            zero_rows_from(do_smem.index(s).reshape([BLOCK_M, HEAD_D]), seqlen_q - tile * BLOCK_M)

    @gluon.jit
    def _store_kv(dk_desc, dv_desc, k_smem, v_smem, w: gl.constexpr, b, row, hk):
        """dK and dV staged in this warpgroup's K and V buffers to rows row .. by TMA (rows past the tensor
        clipped)."""
        fence_async_shared()
        gl.thread_barrier()
        tma.async_copy_shared_to_global(dk_desc, [b, row, hk, 0], k_smem.index(w))
        tma.async_copy_shared_to_global(dv_desc, [b, row, hk, 0], v_smem.index(w))
        tma.store_wait(pendings=0)

    @gluon.jit
    def _dkdv_consumer(w: gl.constexpr, dk_desc, dv_desc, DK, DV, ALIBI_B, q_smem, do_smem, k_smem, v_smem, lse_smem,
                       delta_smem, bars, b, hk, group, start_n, m_lo, n_m, seqlen_q, seqlen_k, qk_scale, sm_scale,
                       k_row0, stride_dks, stride_dkh, stride_dvs, stride_dvh, HALF_N: gl.constexpr,
                       win_left, win_right, softcap, BLOCK_M: gl.constexpr, HEAD_D: gl.constexpr,
                       STAGES: gl.constexpr, CAUSAL: gl.constexpr, WINDOW: gl.constexpr, HAS_SOFTCAP: gl.constexpr,
                       PIPELINE: gl.constexpr, VARLEN: gl.constexpr, HAS_ALIBI: gl.constexpr, fused=None,
                       FUSED_DQ: gl.constexpr = 0, EARLY_DQ: gl.constexpr = False, KV_REGS: gl.constexpr = 0):
        """One warpgroup: keys [start_n + w * HALF_N, + HALF_N), accumulating dK and dV over the ring's steps.
        PIPELINE: software-pipelined by one step: S^T_t and dP^T_t are issued with dV += P^T_{t-1} dO_{t-1} and
        dK += dS^T_{t-1} Q_{t-1} between them, so step t's elementwise work runs while step t-1's products hold the
        tensor cores; every product is waited for inside its iteration (nothing in flight across the back edge).
        Needs a ring of 3 slots (step t-1's Q and dO stay until its products finish). VARLEN: the query tile that
        crosses the sequence's end has its other rows (the next sequence's) zeroed in Q and dO before use (their
        P is 0, but 0 * NaN is NaN), and a key half that crosses it is stored by masked pointer stores (DK /
        DV), since a TMA store would overwrite the next sequence's rows.

        FUSED_DQ (the fused backward, ``fused_dq``; D=64 and 128, PIPELINE, batched): dQ here too. Each step's
        dS^T is staged in shared memory (``fused``: (dS slots (2 steps x 2 warpgroups, HALF_N, BLOCK_M), their
        ready and free barriers of 2 arrivals, dQ slots (2 warpgroups x FUSED_DQ steps, HALF_N, BLOCK_M) fp32, the
        accumulator's descriptor, its row of the group's first query head)) and, issued with the next step's
        products, each warpgroup computes a share of that step's dQ^T = K^T dS^T: at D=128 its 64 of D's rows
        over both warpgroups' keys (dS^T exchanged through the barriers: a 16-register accumulator instead of 32),
        at D=64 all of D over its own keys (no exchange), and reduce-adds it into the accumulator by TMA
        (``fused_dq.stage_dq_step``); the programs' (and, at D=64, the warpgroups') adds into one tile are
        unordered. EARLY_DQ (with FUSED_DQ; session 23's v28c, not yet GPU-run): step t - 1's dQ^T products are
        issued before step t's others and staged while those run (with BLOCK_M=32 at D=128 a step's five products
        take ~0.7 µs, and a stage after the last wait left the tensor cores idle for ~0.4 µs of it, run 135)."""
        kv_bar, ready, empty = bars
        dtype: gl.constexpr = dk_desc.dtype
        EXCHANGE: gl.constexpr = HEAD_D == 2 * HALF_N  # FUSED_DQ's form (D=128; D=64: own keys)
        DQ_MMAS: gl.constexpr = 2 if EXCHANGE else 1
        st_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                            instr_shape=[16, BLOCK_M, 16])
        acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                             instr_shape=[16, HEAD_D, 16])
        op_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
        key0 = start_n + w * HALF_N
        keys = key0 + gl.arange(0, HALF_N, layout=gl.SliceLayout(1, st_layout))
        diag = seqlen_k - seqlen_q
        win = dkdv_mask_bounds(key0, diag, win_left, win_right, HALF_N, BLOCK_M, CAUSAL, WINDOW)
        dk = gl.zeros([HALF_N, HEAD_D], gl.float32, layout=acc_layout)
        dv = gl.zeros([HALF_N, HEAD_D], gl.float32, layout=acc_layout)
        st_zero = gl.zeros([HALF_N, BLOCK_M], gl.float32, layout=st_layout)
        k2 = k_smem.index(w).reshape([HALF_N, HEAD_D])
        v2 = v_smem.index(w).reshape([HALF_N, HEAD_D])
        mbarrier.wait(kv_bar, 0)
        # the A operands of S^T = K Q^T and dP^T = V dO^T: shared memory, or registers loaded once (KV_REGS)
        k_a = k2
        v_a = v2
        if KV_REGS >= 1:
            k_a = k2.load(gl.DotOperandLayout(operand_index=0, parent=st_layout, k_width=2))
        if KV_REGS >= 2:
            v_a = v2.load(gl.DotOperandLayout(operand_index=0, parent=st_layout, k_width=2))
        n = group * n_m
        if not PIPELINE:  # the plain order (64-row steps at D=128 pipelined need more registers: C7512)
            for t in range(n):
                g = t // n_m
                tile = m_lo + t - g * n_m
                s = t % STAGES
                mbarrier.wait(ready.index(s), (t // STAGES) & 1)
                q2 = q_smem.index(s).reshape([BLOCK_M, HEAD_D])
                do2 = do_smem.index(s).reshape([BLOCK_M, HEAD_D])
                if VARLEN:
                    _zero_foreign_rows(q_smem, do_smem, s, tile, seqlen_q, BLOCK_M)
                st_tok = warpgroup_mma(k_a, q2.permute((1, 0)), st_zero, use_acc=False, is_async=True)
                dpt_tok = warpgroup_mma(v_a, do2.permute((1, 0)), st_zero, use_acc=False, is_async=True)
                st = warpgroup_mma_wait(num_outstanding=1, deps=(st_tok, ))
                p, dtanh = dkdv_probs(st, lse_smem.index(s), tile, keys, seqlen_q, diag, win, qk_scale, softcap,
                                      alibi_slope(ALIBI_B, hk * group + g, HAS_ALIBI), BLOCK_M, CAUSAL, WINDOW,
                                      HAS_SOFTCAP, dtype == gl.bfloat16, HAS_ALIBI)
                dpt = warpgroup_mma_wait(num_outstanding=0, deps=(dpt_tok, ))
                ds = dkdv_dscores(p, dtanh, dpt, delta_smem.index(s), tile, seqlen_q, BLOCK_M, HAS_SOFTCAP)
                # both products issued after dS (P^T in flight beside fp32 P^T and dP^T spilled at D=128)
                dv_tok = warpgroup_mma(gl.convert_layout(p.to(dtype), op_layout), do2, dv, is_async=True)
                dk_tok = warpgroup_mma(gl.convert_layout(ds.to(dtype), op_layout), q2, dk, is_async=True)
                dv, dk = warpgroup_mma_wait(num_outstanding=0, deps=(dv_tok, dk_tok))
                mbarrier.arrive(empty.index(s), count=1)
        elif n > 0:
            mbarrier.wait(ready.index(0), 0)
            if VARLEN:
                _zero_foreign_rows(q_smem, do_smem, 0, m_lo, seqlen_q, BLOCK_M)
            st_tok = warpgroup_mma(k_a, q_smem.index(0).reshape([BLOCK_M, HEAD_D]).permute((1, 0)), st_zero,
                                   use_acc=False, is_async=True)
            dpt_tok = warpgroup_mma(v_a, do_smem.index(0).reshape([BLOCK_M, HEAD_D]).permute((1, 0)), st_zero,
                                    use_acc=False, is_async=True)
            st = warpgroup_mma_wait(num_outstanding=1, deps=(st_tok, ))
            p, dtanh = dkdv_probs(st, lse_smem.index(0), m_lo, keys, seqlen_q, diag, win, qk_scale, softcap,
                                  alibi_slope(ALIBI_B, hk * group, HAS_ALIBI), BLOCK_M, CAUSAL, WINDOW,
                                  HAS_SOFTCAP, dtype == gl.bfloat16, HAS_ALIBI)
            dpt = warpgroup_mma_wait(num_outstanding=0, deps=(dpt_tok, ))
            ds = dkdv_dscores(p, dtanh, dpt, delta_smem.index(0), m_lo, seqlen_q, BLOCK_M, HAS_SOFTCAP)
            if FUSED_DQ:
                ds_slots, ds_ready, ds_free, dq_slots, dq_desc, dq_row0 = fused
                # (HALF_N, BLOCK_M) of a step's dQ^T: D=128 this warpgroup's 64 rows of D over both warpgroups'
                # keys (EXCHANGE); D=64 all of D over its own keys (both warpgroups add theirs)
                if EXCHANGE:
                    dq_row0 += w * HALF_N
                    k_lo = k_smem.index(0).reshape([HALF_N, HEAD_D]).slice(w * HALF_N, HALF_N, dim=1).permute((1, 0))
                    k_hi = k_smem.index(1).reshape([HALF_N, HEAD_D]).slice(w * HALF_N, HALF_N, dim=1).permute((1, 0))
                else:
                    k_lo = k2.permute((1, 0))
                    k_hi = k_lo
                stage_dq_step(ds.to(dtype), st_zero, ds_slots, ds_ready, ds_free, dq_slots, dq_desc, w, 0, n_m, m_lo,
                              dq_row0, HEAD_D, EXCHANGE, True, False)
            p_op = gl.convert_layout(p.to(dtype), op_layout)
            ds_op = gl.convert_layout(ds.to(dtype), op_layout)
            for t in range(1, n):
                g = t // n_m
                tile = m_lo + t - g * n_m
                s = t % STAGES
                sp = (t - 1) % STAGES
                mbarrier.wait(ready.index(s), (t // STAGES) & 1)
                if VARLEN:
                    _zero_foreign_rows(q_smem, do_smem, s, tile, seqlen_q, BLOCK_M)
                if EARLY_DQ:  # dQ^T_{t-1} first: staged and added while the step's other products run
                    dq_tok = issue_dq(k_lo, k_hi, ds_slots, ds_ready, st_zero, w, t - 1, EXCHANGE)
                st_tok = warpgroup_mma(k_a, q_smem.index(s).reshape([BLOCK_M, HEAD_D]).permute((1, 0)), st_zero,
                                       use_acc=False, is_async=True)
                dv_tok = warpgroup_mma(p_op, do_smem.index(sp).reshape([BLOCK_M, HEAD_D]), dv, is_async=True)
                dpt_tok = warpgroup_mma(v_a, do_smem.index(s).reshape([BLOCK_M, HEAD_D]).permute((1, 0)), st_zero,
                                        use_acc=False, is_async=True)
                dk_tok = warpgroup_mma(ds_op, q_smem.index(sp).reshape([BLOCK_M, HEAD_D]), dk, is_async=True)
                if EARLY_DQ:
                    dqt = warpgroup_mma_wait(num_outstanding=4, deps=(dq_tok, ))
                    if EXCHANGE:
                        mbarrier.arrive(ds_free.index((t - 1) % 2), count=1)
                    stage_dq_step(dqt, dqt, ds_slots, ds_ready, ds_free, dq_slots, dq_desc, w, t, n_m, m_lo,
                                  dq_row0, HEAD_D, EXCHANGE, False, True)
                    st = warpgroup_mma_wait(num_outstanding=3, deps=(st_tok, ))
                elif FUSED_DQ:  # dQ^T_{t-1}
                    dq_tok = issue_dq(k_lo, k_hi, ds_slots, ds_ready, st_zero, w, t - 1, EXCHANGE)
                    st = warpgroup_mma_wait(num_outstanding=3 + DQ_MMAS, deps=(st_tok, ))
                else:
                    st = warpgroup_mma_wait(num_outstanding=3, deps=(st_tok, ))
                p, dtanh = dkdv_probs(st, lse_smem.index(s), tile, keys, seqlen_q, diag, win, qk_scale, softcap,
                                      alibi_slope(ALIBI_B, hk * group + g, HAS_ALIBI), BLOCK_M, CAUSAL, WINDOW,
                                      HAS_SOFTCAP, dtype == gl.bfloat16, HAS_ALIBI)
                if FUSED_DQ and not EARLY_DQ:
                    dv, dpt = warpgroup_mma_wait(num_outstanding=1 + DQ_MMAS, deps=(dv_tok, dpt_tok))
                else:
                    dv, dpt = warpgroup_mma_wait(num_outstanding=1, deps=(dv_tok, dpt_tok))
                ds = dkdv_dscores(p, dtanh, dpt, delta_smem.index(s), tile, seqlen_q, BLOCK_M, HAS_SOFTCAP)
                if EARLY_DQ:
                    dk = warpgroup_mma_wait(num_outstanding=0, deps=(dk_tok, ))
                    stage_dq_step(ds.to(dtype), st_zero, ds_slots, ds_ready, ds_free, dq_slots, dq_desc, w, t, n_m,
                                  m_lo, dq_row0, HEAD_D, EXCHANGE, True, False)
                elif FUSED_DQ:
                    dk, dqt = warpgroup_mma_wait(num_outstanding=0, deps=(dk_tok, dq_tok))
                    if EXCHANGE:
                        mbarrier.arrive(ds_free.index((t - 1) % 2), count=1)
                    stage_dq_step(ds.to(dtype), dqt, ds_slots, ds_ready, ds_free, dq_slots, dq_desc, w, t, n_m,
                                  m_lo, dq_row0, HEAD_D, EXCHANGE, True, True)
                else:
                    dk = warpgroup_mma_wait(num_outstanding=0, deps=(dk_tok, ))
                mbarrier.arrive(empty.index(sp), count=1)
                p_op = gl.convert_layout(p.to(dtype), op_layout)
                ds_op = gl.convert_layout(ds.to(dtype), op_layout)
            sp = (n - 1) % STAGES
            dv_tok = warpgroup_mma(p_op, do_smem.index(sp).reshape([BLOCK_M, HEAD_D]), dv, is_async=True)
            dk_tok = warpgroup_mma(ds_op, q_smem.index(sp).reshape([BLOCK_M, HEAD_D]), dk, is_async=True)
            if FUSED_DQ:
                dq_tok = issue_dq(k_lo, k_hi, ds_slots, ds_ready, st_zero, w, n - 1, EXCHANGE)
                dv, dk, dqt = warpgroup_mma_wait(num_outstanding=0, deps=(dv_tok, dk_tok, dq_tok))
                if EXCHANGE:  # both warpgroups' last products have read both K halves before they stage dK
                    mbarrier.arrive(ds_free.index((n - 1) % 2), count=1)
                stage_dq_step(dqt, dqt, ds_slots, ds_ready, ds_free, dq_slots, dq_desc, w, n, n_m, m_lo, dq_row0,
                              HEAD_D, EXCHANGE, False, True)
                if EXCHANGE:
                    mbarrier.wait(ds_free.index((n - 1) % 2), ((n - 1) // 2) & 1)
            else:
                dv, dk = warpgroup_mma_wait(num_outstanding=0, deps=(dv_tok, dk_tok))
            mbarrier.arrive(empty.index(sp), count=1)
        # K and V are dead (only this warpgroup reads its halves): their buffers stage dK and dV for the TMA store
        k2.store((dk * sm_scale).to(dtype))
        v2.store(dv.to(dtype))
        if VARLEN:
            if key0 + HALF_N > seqlen_k:  # the sequence's last keys (or none): masked pointer stores
                gl.thread_barrier()
                store_rows(DK, k2, k_row0 + key0, hk, seqlen_k - key0, stride_dks, stride_dkh)
                store_rows(DV, v2, k_row0 + key0, hk, seqlen_k - key0, stride_dvs, stride_dvh)
            else:
                _store_kv(dk_desc, dv_desc, k_smem, v_smem, w, b, k_row0 + key0, hk)
        else:
            _store_kv(dk_desc, dv_desc, k_smem, v_smem, w, b, key0, hk)

    @gluon.jit
    def _dkdv_kernel(q_desc, do_desc, k_desc, v_desc, dk_desc, dv_desc, st_desc, dq_desc, DK, DV, CU_Q, CU_K, ALIBI,
                     seqlen_q, seqlen_k, kv_heads, group, num_n_tiles, qk_scale, sm_scale, stride_sh, stride_st,
                     stride_dks, stride_dkh, stride_dvs, stride_dvh, win_left, win_right, softcap, stride_ab,
                     HEAD_D: gl.constexpr, STAGES: gl.constexpr, CAUSAL: gl.constexpr, WINDOW: gl.constexpr,
                     HAS_SOFTCAP: gl.constexpr, PIPELINE: gl.constexpr, VARLEN: gl.constexpr,
                     HAS_ALIBI: gl.constexpr, SPLIT: gl.constexpr,
                     CONSUMER_REGS: gl.constexpr, PRODUCER_REGS: gl.constexpr, FUSED_DQ: gl.constexpr = 0,
                     EARLY_DQ: gl.constexpr = False, KV_REGS: gl.constexpr = 0, TRACE=None):
        """Warp-specialised: the default partition and one worker partition are the two consumer warpgroups (64
        keys each), one more worker warp issues every TMA load. VARLEN: q / dO / k / v / dk / dv are packed (1,
        total, H, D), sequence b spans rows CU_Q[b] .. CU_Q[b + 1] (keys: CU_K); seqlen_q / seqlen_k are then
        read per sequence (the arguments are the maxima). DK / DV: dk and dv as pointers (with their row and head
        strides) for the masked stores of a sequence's last keys (varlen only). ALIBI: fp32 slopes (Hq,) or (B,
        Hq) (batch stride stride_ab, 0 for (Hq,)). SPLIT: 64 keys per program, shared by both consumer warpgroups
        (``_split_consumer``; no varlen or softcap). FUSED_DQ (0: off; else dQ^T staging slots per warpgroup, 2 or
        4): dQ too, reduce-added into the fp32 accumulator ``dq_desc`` describes (``fused_dq``; without it
        ``dq_desc`` is a placeholder, not read); EARLY_DQ its products' order (``_dkdv_consumer``). TRACE: None,
        or an int64 (programs, 4) buffer that gets each program's trace (``trace_program``; measurement only)."""
        BLOCK_M: gl.constexpr = q_desc.block_type.shape[1]
        HALF_N: gl.constexpr = k_desc.block_type.shape[1]
        KV_PARTS: gl.constexpr = 1 if SPLIT else 2  # key parts of HALF_N per program
        dtype: gl.constexpr = q_desc.dtype
        pid = gl.program_id(0)
        if TRACE is not None:
            t_start = global_ns()
        bhk = pid // num_n_tiles
        start_n = (pid % num_n_tiles) * (KV_PARTS * HALF_N)  # causal: low key tiles have the most work, run first
        b = bhk // kv_heads
        hk = bhk % kv_heads
        q_row0, seqlen_q, k_row0, seqlen_k, b_desc = seq_bounds(CU_Q, CU_K, b, seqlen_q, seqlen_k, VARLEN)
        m_lo = 0
        if CAUSAL:  # query rows before start_n - diag see none of this tile's keys
            m_lo = gl.maximum(start_n - (seqlen_k - seqlen_q), 0) // BLOCK_M
        if WINDOW:  # rows [start_n - diag - win_right, start_n + 2 * HALF_N - 1 - diag + win_left] see the tile
            m_lo = gl.maximum(start_n - (seqlen_k - seqlen_q) - win_right, 0) // BLOCK_M
            m_hi = gl.minimum(seqlen_q, gl.maximum(start_n + KV_PARTS * HALF_N - (seqlen_k - seqlen_q) + win_left,
                                                   0))
            n_m = gl.maximum(gl.cdiv(m_hi, BLOCK_M) - m_lo, 0)
        else:
            n_m = gl.maximum(gl.cdiv(seqlen_q, BLOCK_M) - m_lo, 0)
        if VARLEN:  # a key tile past its sequence's end (the grid covers the longest): nothing to do or store
            n_m = gl.where(start_n < seqlen_k, n_m, 0)
        srow0 = stats_row0(b, q_row0, seqlen_q, VARLEN)

        q_smem = gl.allocate_shared_memory(dtype, [STAGES, 1, BLOCK_M, 1, HEAD_D], q_desc.layout)
        do_smem = gl.allocate_shared_memory(dtype, [STAGES, 1, BLOCK_M, 1, HEAD_D], do_desc.layout)
        k_smem = gl.allocate_shared_memory(dtype, [KV_PARTS, 1, HALF_N, 1, HEAD_D], k_desc.layout)
        v_smem = gl.allocate_shared_memory(dtype, [KV_PARTS, 1, HALF_N, 1, HEAD_D], v_desc.layout)
        lse_smem = gl.allocate_shared_memory(gl.float32, [STAGES, BLOCK_M], st_desc.layout)
        delta_smem = gl.allocate_shared_memory(gl.float32, [STAGES, BLOCK_M], st_desc.layout)
        kv_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        mbarrier.init(kv_bar, count=1)
        for i in gl.static_range(STAGES):
            mbarrier.init(ready.index(i), count=1)
            mbarrier.init(empty.index(i), count=2)  # both consumer warpgroups release each slot
        bars = (kv_bar, ready, empty)
        alibi_b = ALIBI
        if HAS_ALIBI:
            alibi_b = ALIBI + b * stride_ab
        if SPLIT:
            p_smem = gl.allocate_shared_memory(gl.float32, [2, HALF_N, BLOCK_M],
                                               gl.NVMMASharedLayout.get_default_for([HALF_N, BLOCK_M], gl.float32))
            p_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
            p_free = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
            for i in gl.static_range(2):
                mbarrier.init(p_ready.index(i), count=1)
                mbarrier.init(p_free.index(i), count=1)
            p_bars = (p_ready, p_free)
            gl.warp_specialize([
                (_split_consumer, (0, dk_desc, dv_desc, alibi_b, q_smem, do_smem, k_smem, v_smem, lse_smem,
                                   delta_smem, p_smem, bars, p_bars, b_desc, hk, group, start_n, m_lo, n_m, seqlen_q,
                                   seqlen_k, qk_scale, sm_scale, win_left, win_right, BLOCK_M, HEAD_D, STAGES,
                                   CAUSAL, WINDOW, HAS_ALIBI, PIPELINE)),
                (_split_consumer, (1, dk_desc, dv_desc, alibi_b, q_smem, do_smem, k_smem, v_smem, lse_smem,
                                   delta_smem, p_smem, bars, p_bars, b_desc, hk, group, start_n, m_lo, n_m, seqlen_q,
                                   seqlen_k, qk_scale, sm_scale, win_left, win_right, BLOCK_M, HEAD_D, STAGES,
                                   CAUSAL, WINDOW, HAS_ALIBI, PIPELINE)),
                (_dkdv_load, (q_desc, do_desc, k_desc, v_desc, st_desc, q_smem, do_smem, k_smem, v_smem, lse_smem,
                              delta_smem, bars, b_desc, hk, group, start_n, m_lo, n_m, srow0, stride_sh, stride_st,
                              q_row0, k_row0, HALF_N, BLOCK_M, HEAD_D, STAGES, KV_PARTS)),
            ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])
            if TRACE is not None:
                trace_program(TRACE, t_start, n_m)
            return
        if FUSED_DQ:  # dQ in this kernel (``_dkdv_consumer``)
            ds_slots = gl.allocate_shared_memory(dtype, [4, HALF_N, BLOCK_M],
                                                 gl.NVMMASharedLayout.get_default_for([HALF_N, BLOCK_M], dtype))
            dq_slots = gl.allocate_shared_memory(gl.float32, [2 * FUSED_DQ, HALF_N, BLOCK_M], dq_desc.layout)
            ds_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
            ds_free = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
            for i in gl.static_range(2):
                mbarrier.init(ds_ready.index(i), count=2)
                mbarrier.init(ds_free.index(i), count=2)
            fused = (ds_slots, ds_ready, ds_free, dq_slots, dq_desc, (b * kv_heads + hk) * group * HEAD_D)
        else:
            fused = q_smem  # not read without FUSED_DQ
        gl.warp_specialize([
            (_dkdv_consumer, (0, dk_desc, dv_desc, DK, DV, alibi_b, q_smem, do_smem, k_smem, v_smem, lse_smem,
                              delta_smem, bars, b_desc, hk, group, start_n, m_lo, n_m, seqlen_q, seqlen_k,
                              qk_scale, sm_scale, k_row0, stride_dks, stride_dkh, stride_dvs, stride_dvh, HALF_N,
                              win_left, win_right, softcap, BLOCK_M, HEAD_D, STAGES, CAUSAL, WINDOW, HAS_SOFTCAP,
                              PIPELINE, VARLEN, HAS_ALIBI, fused, FUSED_DQ, EARLY_DQ, KV_REGS)),
            (_dkdv_consumer, (1, dk_desc, dv_desc, DK, DV, alibi_b, q_smem, do_smem, k_smem, v_smem, lse_smem,
                              delta_smem, bars, b_desc, hk, group, start_n, m_lo, n_m, seqlen_q, seqlen_k,
                              qk_scale, sm_scale, k_row0, stride_dks, stride_dkh, stride_dvs, stride_dvh, HALF_N,
                              win_left, win_right, softcap, BLOCK_M, HEAD_D, STAGES, CAUSAL, WINDOW, HAS_SOFTCAP,
                              PIPELINE, VARLEN, HAS_ALIBI, fused, FUSED_DQ, EARLY_DQ, KV_REGS)),
            (_dkdv_load, (q_desc, do_desc, k_desc, v_desc, st_desc, q_smem, do_smem, k_smem, v_smem, lse_smem,
                          delta_smem, bars, b_desc, hk, group, start_n, m_lo, n_m, srow0, stride_sh, stride_st,
                          q_row0, k_row0, HALF_N, BLOCK_M, HEAD_D, STAGES, KV_PARTS)),
        ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])
        if TRACE is not None:
            trace_program(TRACE, t_start, n_m)

def kv_regs(head_dim: int, p: AttnParams, fused: bool) -> int:
    """The dK/dV kernel's KV_REGS for a call: 0, K and V read from shared memory by every S^T / dP^T product
    (with 32-query steps at D=128 those products are m64n32: their A and B reads, 3 KB per 16 tensor-core clocks,
    exceed the shared-memory port's 128 B per clock); 1, K held in registers (32 per thread at D=128, 16 at D=64);
    2, K and V. The config's ``kv_regs`` for the call's mask (non-causal, causal), or ``TILEATTN_GLUON_BWD_KV_REGS``
    for both. Calls with softcap, ALiBi or a window keep 0 (they spill with it: 48-168 B), and so does the fused
    backward (its dQ products read K from shared memory)."""
    cfg = configs._GLUON_BWD.get(head_dim)
    val = configs.getenv("TILEATTN_GLUON_BWD_KV_REGS", "")
    if val not in ("", "0", "1", "2"):
        raise ValueError(f"TILEATTN_GLUON_BWD_KV_REGS must be 0, 1 or 2, got {val!r}")
    if fused or p.softcap > 0 or p.alibi_slopes is not None or has_window(p):
        return 0
    if val:
        return int(val)
    return cfg.kv_regs[p.window_right == 0] if cfg is not None else 0


def applies(q, k, v, dout, dq, dk, dv, p: AttnParams):
    """The Gluon backward's ``configs.GluonBackwardConfig`` for this call (the dK/dV kernel, and the dQ kernel of
    gluon_dq.py where its ``dq`` is on), or None when the portable kernels take it (see the module docstring for
    the scope)."""
    if not AVAILABLE or not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16):
        return None
    d = q.shape[3]
    cfg = configs.gluon_backward_config(d)
    if cfg is None or k.shape[3] != d or v.shape[3] != d or q.numel() == 0 or k.numel() == 0:
        return None
    if p.varlen and (configs.getenv("TILEATTN_GLUON_VARLEN") == "0" or p.max_seqlen_q == 0 or p.max_seqlen_k == 0):
        return None
    if p.dropout_p > 0 or (cfg.split and (p.varlen or p.softcap > 0)):  # SPLIT: neither yet
        return None
    if configs._arch(configs._device_index(q.device), configs._arch_override())[0] != 9:
        return None
    if any(t.dtype != q.dtype or not tma_aligned(t) or t.stride(-1) != 1 for t in (q, k, v, dout, dq, dk, dv)):
        return None
    return cfg


@functools.lru_cache(maxsize=None)
def _stats_layout(block_m: int):
    """Shared layout of one ring slot of lse or delta: block_m fp32, unswizzled (a 1-D TMA box of the flattened
    row-stats buffer)."""
    return gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=1)


def dkdv(q, k, v, dout, stats, dk, dv, p: AttnParams, cfg, dq_acc=None):
    """Write dk and dv (B, Sk, Hkv, D) for a call ``applies`` accepted. ``stats``: the (2, Hq, L) fp32 row
    statistics the dQ kernel wrote (``backward._row_stats_buffer``). ``dq_acc``: with the fused backward
    (``fused_dq.applies_to``), the zeroed fp32 dQ^T accumulator (``fused_dq``) this kernel adds dQ into."""
    batch, seqlen_q, q_heads, d = q.shape
    seqlen_k, kv_heads = k.shape[1], k.shape[2]
    if p.varlen:  # packed (1, total, H, D): the grid covers the longest sequence
        batch, seqlen_q, seqlen_k = p.batch, p.max_seqlen_q, p.max_seqlen_k
    bf16 = q.dtype == torch.bfloat16
    half_n, bm = 64, cfg.block_m
    q_desc, do_desc = make_desc(q, (1, bm, 1, d), bf16), make_desc(dout, (1, bm, 1, d), bf16)
    k_desc, v_desc = make_desc(k, (1, half_n, 1, d), bf16), make_desc(v, (1, half_n, 1, d), bf16)
    dk_desc, dv_desc = make_desc(dk, (1, half_n, 1, d), bf16), make_desc(dv, (1, half_n, 1, d), bf16)
    num_n_tiles = triton.cdiv(seqlen_k, (1 if cfg.split else 2) * half_n)
    st_desc = host_descriptor(GluonTensorDescriptor, stats.view(-1), (bm, ), layout=_stats_layout(bm))
    sts = stats.stride()
    dq_desc = st_desc if dq_acc is None else fused_dq.descriptor(dq_acc, seqlen_q, half_n, bm)  # FUSED_DQ's
    launch(_dkdv_kernel, (num_n_tiles * batch * kv_heads,), (
        q_desc, do_desc, k_desc, v_desc, dk_desc, dv_desc, st_desc, dq_desc, dk, dv,
        p.cu_seqlens_q if p.varlen else dk, p.cu_seqlens_k if p.varlen else dk,
        p.alibi_slopes if p.alibi_slopes is not None else stats, seqlen_q, seqlen_k, kv_heads,
        q_heads // kv_heads, num_n_tiles, p.qk_scale, p.softmax_scale, sts[1], sts[0], dk.stride(1), dk.stride(2),
        dv.stride(1), dv.stride(2), *window_bounds(p, seqlen_q, seqlen_k), p.softcap_log2, p.alibi_stride_b),
        dict(HEAD_D=d, STAGES=cfg.stages, CAUSAL=p.window_right == 0 and not has_window(p), WINDOW=has_window(p),
             HAS_SOFTCAP=p.softcap > 0, HAS_ALIBI=p.alibi_slopes is not None,
             PIPELINE=cfg.pipeline, VARLEN=p.varlen, SPLIT=cfg.split,
             CONSUMER_REGS=cfg.consumer_regs,
             PRODUCER_REGS=cfg.producer_regs, **(fused_dq.kernel_flags(d) if dq_acc is not None else {}),
             **({"KV_REGS": kvr} if (kvr := kv_regs(d, p, dq_acc is not None)) else {})),
        4, 1, maxnreg=cfg.maxnreg)
