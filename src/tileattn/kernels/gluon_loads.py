"""The Gluon forward's producer warp (sm90 only, imported by ``gluon_forward``): the TMA loads of a program's
query tile (two 64-row halves) and of its key tiles into the K and V rings, for the one-tile-per-program grid
(``_load_partition``) and the persistent grid (``_load_persistent``); the consumers' side is ``gluon_forward``'s
``_consumer``."""

from .gluon_common import AVAILABLE

if AVAILABLE:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma
    from .gluon_common import global_ns, load_kv_ring
    from .gluon_schedule import persistent_bounds, persistent_range, streamk_segment

    @gluon.jit
    def _load_partition(q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, bars, b, h, hk, start_m, lo, n, q_row0,
                        k_row0, t0, HALF_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_D: gl.constexpr,
                        K_STAGES: gl.constexpr, V_STAGES: gl.constexpr, qb=0):
        """Producer warp: the two Q halves (into Q buffers qb and qb + 1: 0 but in the flat kernel), then key tiles
        lo .. lo + n - 1 (K and V) into their rings as the consumers free the slots (ring position t0 + j: the j-th
        tile loaded; t0 = 0 but in the persistent kernel)."""
        q_bars, k_ready, k_empty, v_ready, v_empty, turn = bars
        _load_q(q_desc, q_smem, q_bars, b, h, q_row0, start_m, HALF_M, HEAD_D, qb, turn.shape[0])
        load_kv_ring(k_desc, v_desc, k_smem, v_smem, k_ready, k_empty, v_ready, v_empty, b, hk, k_row0, lo, n, t0,
                     BLOCK_N, HEAD_D, K_STAGES, V_STAGES)

    @gluon.jit
    def _load_q(q_desc, q_smem, q_bars, b, h, q_row0, start_m, HALF_M: gl.constexpr, HEAD_D: gl.constexpr, qb,
                NW: gl.constexpr = 2):
        """The query tile's NW parts of HALF_M rows, one per consumer warpgroup (rows q_row0 + start_m .. + NW HALF_M
        of head h), into Q buffers qb .. qb + NW - 1."""
        for w in gl.static_range(NW):
            mbarrier.expect(q_bars.index(qb + w), HALF_M * HEAD_D * 2)
            tma.async_copy_global_to_shared(q_desc, [b, q_row0 + start_m + w * HALF_M, h, 0], q_bars.index(qb + w),
                                            q_smem.index(qb + w))

    @gluon.jit
    def _load_persistent(q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, bars, q_empty, pid, num_items, nprog,
                         TILE_MAP, CU_Q, CU_K, num_m_tiles, q_heads, group, seqlen_q, seqlen_k, win_left, win_right,
                         HALF_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_D: gl.constexpr, K_STAGES: gl.constexpr,
                         V_STAGES: gl.constexpr, CAUSAL: gl.constexpr, WINDOW: gl.constexpr, VARLEN: gl.constexpr,
                         USE_MAP: gl.constexpr, FLAT: gl.constexpr = False, STAGGER: gl.constexpr = 0,
                         STREAMK: gl.constexpr = False):
        """Persistent producer: the work items pid, pid + nprog, ... in turn (``_load_partition`` each; causal: in
        ``persistent_item``'s longest-first order); an item's Q halves load once both consumer warpgroups released
        the previous item's (``q_empty``, after their last Q K^T; at D=256, where out is staged in Q's buffer,
        after their epilogue, and the item's first key tiles load before it), and the K/V rings run on across
        items (positions t0 + j). FLAT (gluon_flat): two sets of Q buffers, the it-th item's in set it % 2,
        released by item it - 2's epilogue. STAGGER (ns; diagnostic, ``configs.gluon_forward_stagger``): odd
        programs start their loads that much later, so their item boundaries (epilogue stores, Q loads) fall
        between the even programs' instead of all at once. STREAMK: the consumers' items and parts of them
        (``persistent_range``, ``streamk_segment``; ``gluon_streamk``)."""
        Q_SETS: gl.constexpr = 2 if FLAT else 1
        if STAGGER > 0:
            if pid % 2 == 1:
                now = global_ns()
                go = now + STAGGER
                while now < go:
                    now = global_ns()
        NW: gl.constexpr = bars[5].shape[0]  # consumer warpgroups (the turn barriers)
        t0 = gl.to_tensor(0)
        start, stop, step, t_begin, t_end = persistent_range(pid, nprog, num_items, seqlen_k, BLOCK_N, STREAMK)
        for item in range(start, stop, step):
            it = (item - start) // step
            b, h, start_m, q_row0, sq, k_row0, sk, b_desc, lo, n = persistent_bounds(
                item, pid, nprog, num_items, TILE_MAP, CU_Q, CU_K, num_m_tiles, q_heads, seqlen_q, seqlen_k,
                win_left, win_right, NW * HALF_M, BLOCK_N, CAUSAL, WINDOW, VARLEN, USE_MAP)
            if STREAMK:
                lo, n, _ = streamk_segment(item, start, lo, n, t_begin, t_end)
            qb = 2 * (it % Q_SETS)
            if HEAD_D > 128 and not FLAT:
                # out is staged in Q's buffer (``_consumer``'s Q_STAGE): the item's first key tiles load while the
                # previous item's epilogue runs, its Q once that epilogue released the buffer
                q_bars, k_ready, k_empty, v_ready, v_empty, turn = bars
                m = gl.minimum(n, V_STAGES)
                load_kv_ring(k_desc, v_desc, k_smem, v_smem, k_ready, k_empty, v_ready, v_empty, b_desc, h // group,
                             k_row0, lo, m, t0, BLOCK_N, HEAD_D, K_STAGES, V_STAGES)
                for w in gl.static_range(2):
                    mbarrier.wait(q_empty.index(w), (it & 1) ^ 1)
                _load_q(q_desc, q_smem, q_bars, b_desc, h, q_row0, start_m, HALF_M, HEAD_D, 0)
                load_kv_ring(k_desc, v_desc, k_smem, v_smem, k_ready, k_empty, v_ready, v_empty, b_desc, h // group,
                             k_row0, lo + m, n - m, t0 + m, BLOCK_N, HEAD_D, K_STAGES, V_STAGES)
            else:
                for w in gl.static_range(NW):
                    mbarrier.wait(q_empty.index(qb + w), ((it // Q_SETS) & 1) ^ 1)
                _load_partition(q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, bars, b_desc, h, h // group, start_m,
                                lo, n, q_row0, k_row0, t0, HALF_M, BLOCK_N, HEAD_D, K_STAGES, V_STAGES, qb)
            t0 += n
