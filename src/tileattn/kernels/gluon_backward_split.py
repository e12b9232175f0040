"""The split mode of the Hopper Gluon dK/dV kernel (``gluon_backward._dkdv_kernel`` with SPLIT, head dim 256):
the two consumer warpgroups share the program's 64 keys, warpgroup 0 accumulating dV and warpgroup 1 dK, with P^T
handed from the first to the second through shared memory. Same layouts and scope as gluon_backward.py, less
varlen and softcap.
"""

from .gluon_common import AVAILABLE

if AVAILABLE:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                                  warpgroup_mma_wait)
    from .gluon_backward_steps import dkdv_dscores, dkdv_mask_bounds, dkdv_probs
    from .gluon_common import alibi_slope

    @gluon.jit
    def _split_front(w: gl.constexpr, x, t, s, tile, g, lse_smem, delta_smem, p_smem, p_bars, keys, seqlen_q, diag,
                     win, qk_scale, ALIBI_B, hk, group, BLOCK_M: gl.constexpr, CAUSAL: gl.constexpr,
                     WINDOW: gl.constexpr, HAS_ALIBI: gl.constexpr, IS_BF16: gl.constexpr):
        """The elementwise half of step t in the split kernel. Warpgroup 0 (x = S^T): P^T, written to slot t % 2
        of the P ring for warpgroup 1; warpgroup 1 (x = dP^T): reads P^T from the ring, returns dS^T."""
        p_ready, p_free = p_bars
        ps = t % 2
        if w == 0:
            y, _ = dkdv_probs(x, lse_smem.index(s), tile, keys, seqlen_q, diag, win, qk_scale, 0.0,
                              alibi_slope(ALIBI_B, hk * group + g, HAS_ALIBI), BLOCK_M, CAUSAL, WINDOW, False,
                              IS_BF16, HAS_ALIBI)
            mbarrier.wait(p_free.index(ps), ((t // 2) & 1) ^ 1)
            p_smem.index(ps).store(y)
            gl.thread_barrier()
            mbarrier.arrive(p_ready.index(ps), count=1)
        else:
            mbarrier.wait(p_ready.index(ps), (t // 2) & 1)
            p = p_smem.index(ps).load(x.type.layout)
            gl.thread_barrier()
            mbarrier.arrive(p_free.index(ps), count=1)
            y = dkdv_dscores(p, p, x, delta_smem.index(s), tile, seqlen_q, BLOCK_M, False)
        return y

    @gluon.jit
    def _split_consumer(w: gl.constexpr, dk_desc, dv_desc, ALIBI_B, q_smem, do_smem, k_smem, v_smem, lse_smem,
                        delta_smem, p_smem, bars, p_bars, b, hk, group, start_n, m_lo, n_m, seqlen_q, seqlen_k,
                        qk_scale, sm_scale, win_left, win_right, BLOCK_M: gl.constexpr, HEAD_D: gl.constexpr,
                        STAGES: gl.constexpr, CAUSAL: gl.constexpr, WINDOW: gl.constexpr, HAS_ALIBI: gl.constexpr,
                        PIPELINE: gl.constexpr):
        """SPLIT (D=256, where one warpgroup cannot hold both [64, D] fp32 accumulators): both warpgroups work on
        the program's 64 keys. Warpgroup 0 runs S^T = K Q^T, P^T and dV += P^T dO and hands P^T (fp32) to
        warpgroup 1 through a 2-slot shared-memory ring (p_ready / p_free); warpgroup 1 runs dP^T = V dO^T, dS^T
        = P^T (dP^T - delta) and dK += dS^T Q. Each holds one accumulator (128 registers at D=256) and runs two of
        the step's four products. PIPELINE: step t's first product is issued with step t-1's accumulation, so the
        elementwise half runs while that accumulation holds the tensor cores (waited within the iteration, as in
        _dkdv_consumer). At the end each stages its result in the K or V buffer only it read (dV in K's, dK in
        V's) for the TMA store."""
        kv_bar, ready, empty = bars
        dtype: gl.constexpr = dk_desc.dtype
        HALF_N: gl.constexpr = k_smem.shape[2]
        st_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                            instr_shape=[16, BLOCK_M, 16])
        acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                             instr_shape=[16, HEAD_D, 16])
        op_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
        keys = start_n + gl.arange(0, HALF_N, layout=gl.SliceLayout(1, st_layout))
        diag = seqlen_k - seqlen_q
        # only warpgroup 0 masks: P^T is 0 where masked, so is dS^T
        win = dkdv_mask_bounds(start_n, diag, win_left, win_right, HALF_N, BLOCK_M, CAUSAL, WINDOW)
        acc = gl.zeros([HALF_N, HEAD_D], gl.float32, layout=acc_layout)
        st_zero = gl.zeros([HALF_N, BLOCK_M], gl.float32, layout=st_layout)
        a2 = k_smem.index(0).reshape([HALF_N, HEAD_D])  # the first product's A: K (S^T) or V (dP^T)
        if w == 1:
            a2 = v_smem.index(0).reshape([HALF_N, HEAD_D])
        b_smem = do_smem  # the first product's B^T, the accumulation's B: Q / dO (S^T, dV) or dO / Q (dP^T, dK)
        first_smem = q_smem
        if w == 1:
            b_smem = q_smem
            first_smem = do_smem
        mbarrier.wait(kv_bar, 0)
        n = group * n_m
        if not PIPELINE:
            for t in range(n):
                g = t // n_m
                s = t % STAGES
                mbarrier.wait(ready.index(s), (t // STAGES) & 1)
                x_tok = warpgroup_mma(a2, first_smem.index(s).reshape([BLOCK_M, HEAD_D]).permute((1, 0)), st_zero,
                                      use_acc=False, is_async=True)
                x = warpgroup_mma_wait(num_outstanding=0, deps=(x_tok, ))
                y = _split_front(w, x, t, s, m_lo + t - g * n_m, g, lse_smem, delta_smem, p_smem, p_bars, keys,
                                 seqlen_q, diag, win, qk_scale, ALIBI_B, hk, group, BLOCK_M, CAUSAL, WINDOW,
                                 HAS_ALIBI, dtype == gl.bfloat16)
                tok = warpgroup_mma(gl.convert_layout(y.to(dtype), op_layout),
                                    b_smem.index(s).reshape([BLOCK_M, HEAD_D]), acc, is_async=True)
                acc = warpgroup_mma_wait(num_outstanding=0, deps=(tok, ))
                mbarrier.arrive(empty.index(s), count=1)
        elif n > 0:
            mbarrier.wait(ready.index(0), 0)
            x_tok = warpgroup_mma(a2, first_smem.index(0).reshape([BLOCK_M, HEAD_D]).permute((1, 0)), st_zero,
                                  use_acc=False, is_async=True)
            x = warpgroup_mma_wait(num_outstanding=0, deps=(x_tok, ))
            y = _split_front(w, x, 0, 0, m_lo, 0, lse_smem, delta_smem, p_smem, p_bars, keys, seqlen_q, diag, win,
                             qk_scale, ALIBI_B, hk, group, BLOCK_M, CAUSAL, WINDOW, HAS_ALIBI, dtype == gl.bfloat16)
            y_op = gl.convert_layout(y.to(dtype), op_layout)
            for t in range(1, n):
                g = t // n_m
                s = t % STAGES
                sp = (t - 1) % STAGES
                mbarrier.wait(ready.index(s), (t // STAGES) & 1)
                x_tok = warpgroup_mma(a2, first_smem.index(s).reshape([BLOCK_M, HEAD_D]).permute((1, 0)), st_zero,
                                      use_acc=False, is_async=True)
                tok = warpgroup_mma(y_op, b_smem.index(sp).reshape([BLOCK_M, HEAD_D]), acc, is_async=True)
                x = warpgroup_mma_wait(num_outstanding=1, deps=(x_tok, ))
                y = _split_front(w, x, t, s, m_lo + t - g * n_m, g, lse_smem, delta_smem, p_smem, p_bars, keys,
                                 seqlen_q, diag, win, qk_scale, ALIBI_B, hk, group, BLOCK_M, CAUSAL, WINDOW,
                                 HAS_ALIBI, dtype == gl.bfloat16)
                acc = warpgroup_mma_wait(num_outstanding=0, deps=(tok, ))
                mbarrier.arrive(empty.index(sp), count=1)
                y_op = gl.convert_layout(y.to(dtype), op_layout)
            sp = (n - 1) % STAGES
            tok = warpgroup_mma(y_op, b_smem.index(sp).reshape([BLOCK_M, HEAD_D]), acc, is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(tok, ))
            mbarrier.arrive(empty.index(sp), count=1)
        # the result, staged in the buffer of the A operand only this warpgroup read: dV in K's, dK in V's
        if w == 0:
            a2.store(acc.to(dtype))
        else:
            a2.store((acc * sm_scale).to(dtype))
        fence_async_shared()
        gl.thread_barrier()
        if w == 0:
            tma.async_copy_shared_to_global(dv_desc, [b, start_n, hk, 0], k_smem.index(0))
        else:
            tma.async_copy_shared_to_global(dk_desc, [b, start_n, hk, 0], v_smem.index(0))
        tma.store_wait(pendings=0)
