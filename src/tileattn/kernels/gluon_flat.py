"""The Gluon forward's persistent schedule with one software pipeline across work items (opt-in
``TILEATTN_GLUON_FLAT=1``, NOTES v21a; sm90 only, imported by ``gluon_forward``).

The persistent consumer of ``gluon_forward`` runs each item (a 128-row query tile of one (batch, head)) as n + 1
ping-pong rounds: Q K^T of tile 0 alone, then (Q K^T_j, P_{j-1} V_{j-1}) pairs, then P_{n-1} V_{n-1} alone and the
epilogue. The first and last rounds hold half a round's matmuls, so an item of n key tiles keeps the tensor cores
busy for about n of its n + 1 rounds (8 of 9 at 1k keys with 128-key tiles). Here the round that finishes item i
also starts item i + 1: it issues Q K^T_0 of item i + 1 beside P_{n-1} V_{n-1} of item i, so every round but the
program's first and last holds a full pair, and item i's epilogue runs while the other warpgroup's matmuls hold
the tensor cores.

That needs the next item's Q before this item's last round: Q is double-buffered per warpgroup (buffer it % 2
for the program's it-th item), and item i's output is staged in its own Q buffer (dead after its last Q K^T), which
is released to the producer once the TMA store has read it. Shared memory stays that of the plain persistent
kernel (the output's own staging buffer goes).

Scope (the launcher's ``flat`` condition): persistent calls whose every item has at least one key tile (the
pipeline issues item i + 1's first Q K^T unconditionally): batched ones, causal or windowed only with seqlen_k >=
seqlen_q (then every query row sees its own diagonal key); packed varlen ones on the work list when that holds for
every sequence with rows (``_hostinfo.keys_for_every_tile``). Per item the arithmetic is the plain kernel's, in the
same order: results are bit-identical to it.
"""

from .gluon_common import AVAILABLE

if AVAILABLE:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import mbarrier, warpgroup_mma, warpgroup_mma_wait
    from .gluon_common import epilogue, row_bounds, turn_wait
    from .gluon_schedule import persistent_bounds
    from .gluon_forward_steps import pv_issue, softmax_tile

    @gluon.jit
    def _q_view(q_smem, w: gl.constexpr, it):
        """Warpgroup w's Q rows of the program's it-th item (buffer 2 * (it % 2) + w) as a (HALF_M, HEAD_D) view."""
        return q_smem.index(2 * (it % 2) + w).reshape([q_smem.shape[2], q_smem.shape[4]])

    @gluon.jit
    def _qk_issue(q2, k_smem, k_ready, t, s_zero):
        """Issue S = Q K^T (asynchronous) for the Q view q2 and the key tile at ring position t, once it landed."""
        K_STAGES: gl.constexpr = k_smem.shape[0]
        ks = t % K_STAGES
        mbarrier.wait(k_ready.index(ks), (t // K_STAGES) & 1)
        return warpgroup_mma(q2, k_smem.index(ks).reshape([k_smem.shape[2], k_smem.shape[4]]).permute((1, 0)),
                             s_zero, use_acc=False, is_async=True)

    @gluon.jit
    def _item_rounds(q_smem, k_smem, v_smem, k_ready, k_empty, v_ready, v_empty, turn, w: gl.constexpr, it, t, n, lo,
                     acc, alpha, p_op, m_i, l_i, rows, row0, cols, diag, n_full, full_lo, sk, qk_scale, softcap,
                     win_left, win_right, slope, s_zero, CAUSAL: gl.constexpr, WINDOW: gl.constexpr,
                     HAS_SOFTCAP: gl.constexpr, VARLEN: gl.constexpr, HAS_ALIBI: gl.constexpr):
        """Rounds t + 1 .. t + n - 1 of the it-th item (key tiles at ring positions t .. t + n - 1): Q K^T_j beside
        P_{j-1} V_{j-1}, as gluon_forward._consumer's loop. Returns (acc, alpha, p_op, m_i, l_i) after tile
        n - 1's softmax, its P V not issued."""
        V_STAGES: gl.constexpr = v_smem.shape[0]
        dtype: gl.constexpr = q_smem.dtype
        p_layout: gl.constexpr = p_op.type.layout
        q2 = _q_view(q_smem, w, it)
        for j in range(1, n):
            turn_wait(turn, w, t + j)
            s_tok = _qk_issue(q2, k_smem, k_ready, t + j, s_zero)
            o_tok = pv_issue(acc, alpha, p_op, v_smem, v_ready, turn, w, t + j - 1,
                                  sk - (lo + j - 1) * k_smem.shape[2], VARLEN, HAS_SOFTCAP != 2)
            s = warpgroup_mma_wait(num_outstanding=1, deps=(s_tok, ))
            mbarrier.arrive(k_empty.index((t + j) % k_smem.shape[0]), count=1)
            p, alpha, m_i, l_i = softmax_tile(s, lo + j, full_lo, n_full, m_i, l_i, rows, row0, cols, diag, sk,
                                                   qk_scale, softcap, win_left, win_right, slope, CAUSAL, WINDOW,
                                                   HAS_SOFTCAP, dtype == gl.bfloat16, HAS_ALIBI)
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(o_tok, ))
            mbarrier.arrive(v_empty.index((t + j - 1) % V_STAGES), count=1)
            p_op = gl.convert_layout(p.to(dtype), p_layout)
        return acc, alpha, p_op, m_i, l_i

    @gluon.jit
    def _item(it, pid, nprog, num_items, TILE_MAP, CU_Q, CU_K, num_m_tiles, q_heads, max_seqlen_q, max_seqlen_k,
              win_left, win_right, ALIBI, stride_ab, w: gl.constexpr, s_layout: gl.constexpr, HALF_M: gl.constexpr,
              BLOCK_N: gl.constexpr, CAUSAL: gl.constexpr, WINDOW: gl.constexpr, VARLEN: gl.constexpr,
              HAS_ALIBI: gl.constexpr, USE_MAP: gl.constexpr):
        """The program's it-th item (clamped to the last one) as (b, h, start_m, q_row0, seqlen_q, seqlen_k, b_desc,
        lo, n, rows, diag, n_full, full_lo, slope) for warpgroup w (varlen: its sequence's bounds)."""
        b, h, start_m, q_row0, sq, k_row0, sk, b_desc, lo, n = persistent_bounds(
            gl.minimum(pid + it * nprog, num_items - 1), pid, nprog, num_items, TILE_MAP, CU_Q, CU_K, num_m_tiles,
            q_heads, max_seqlen_q, max_seqlen_k, win_left, win_right, 2 * HALF_M, BLOCK_N, CAUSAL, WINDOW, VARLEN,
            USE_MAP)
        rows, _, diag, n_full, full_lo = row_bounds(start_m + w * HALF_M, sq, sk, win_left, win_right, s_layout,
                                                    HALF_M, BLOCK_N, CAUSAL, WINDOW)
        slope = 0.0
        if HAS_ALIBI:
            slope = gl.load(ALIBI + b * stride_ab + h).to(gl.float32) * 1.4426950408889634
        return b, h, start_m, q_row0, sq, sk, b_desc, lo, n, rows, diag, n_full, full_lo, slope

    @gluon.jit
    def _run_item(s, it, t, pid, nprog, num_items, TILE_MAP, CU_Q, CU_K, num_m_tiles, q_heads, max_seqlen_q,
                  max_seqlen_k, win_left, win_right, ALIBI, stride_ab, q_smem, k_smem, v_smem, k_ready, k_empty,
                  v_ready, v_empty, turn, m_start, l_start, cols, qk_scale, softcap, s_zero, w: gl.constexpr,
                  HALF_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_D: gl.constexpr, CAUSAL: gl.constexpr,
                  WINDOW: gl.constexpr, HAS_SOFTCAP: gl.constexpr, VARLEN: gl.constexpr, HAS_ALIBI: gl.constexpr,
                  USE_MAP: gl.constexpr):
        """The program's it-th item up to its last P V: its bounds (``_item``), the softmax of its S_0 (``s``, in
        registers) and its rounds (``_item_rounds``; key tiles at ring positions t ..). Returns what the caller's
        last P V and epilogue need: (b, h, start_m, q_row0, sq, sk, b_desc, lo, n, rows, acc, alpha, p_op, m_i,
        l_i)."""
        s_layout: gl.constexpr = s.type.layout
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, HEAD_D, 16])
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        dtype: gl.constexpr = q_smem.dtype
        b, h, start_m, q_row0, sq, sk, b_desc, lo, n, rows, diag, n_full, full_lo, slope = _item(
            it, pid, nprog, num_items, TILE_MAP, CU_Q, CU_K, num_m_tiles, q_heads, max_seqlen_q, max_seqlen_k,
            win_left, win_right, ALIBI, stride_ab, w, s_layout, HALF_M, BLOCK_N, CAUSAL, WINDOW, VARLEN, HAS_ALIBI,
            USE_MAP)
        row0 = start_m + w * HALF_M
        p, alpha, m_i, l_i = softmax_tile(s, lo, full_lo, n_full, m_start, l_start, rows, row0, cols, diag, sk,
                                               qk_scale, softcap, win_left, win_right, slope, CAUSAL, WINDOW,
                                               HAS_SOFTCAP, dtype == gl.bfloat16, HAS_ALIBI)
        acc, alpha, p_op, m_i, l_i = _item_rounds(
            q_smem, k_smem, v_smem, k_ready, k_empty, v_ready, v_empty, turn, w, it, t, n, lo,
            gl.zeros([HALF_M, HEAD_D], gl.float32, layout=o_layout), alpha, gl.convert_layout(p.to(dtype), p_layout),
            m_i, l_i, rows, row0, cols, diag, n_full, full_lo, sk, qk_scale, softcap, win_left, win_right, slope,
            s_zero, CAUSAL, WINDOW, HAS_SOFTCAP, VARLEN, HAS_ALIBI)
        return b, h, start_m, q_row0, sq, sk, b_desc, lo, n, rows, acc, alpha, p_op, m_i, l_i

    @gluon.jit
    def consumer_flat(w: gl.constexpr, o_desc, r_desc, LSE, SINK, ALIBI, O, RESID, q_smem, k_smem, v_smem, bars,
                      q_empty, pid, num_items, nprog, TILE_MAP, CU_Q, CU_K, num_m_tiles, q_heads, max_seqlen_q,
                      max_seqlen_k, qk_scale, softcap, win_left, win_right, stride_lb, stride_lh, stride_os, stride_oh,
                      stride_ab, HALF_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_D: gl.constexpr,
                      CAUSAL: gl.constexpr, WINDOW: gl.constexpr, STORE_RESID: gl.constexpr,
                      HAS_SOFTCAP: gl.constexpr, HAS_SINK: gl.constexpr, VARLEN: gl.constexpr,
                      HAS_ALIBI: gl.constexpr, USE_MAP: gl.constexpr):
        """Consumer warpgroup w over the program's items pid, pid + nprog, ... (see the module docstring). Round r
        issues the Q K^T of the key tile at ring position r (r = 0: the first item's first tile alone) beside the
        P V of position r - 1; the last item's final P V runs alone after the loop."""
        q_bars, k_ready, k_empty, v_ready, v_empty, turn = bars
        K_STAGES: gl.constexpr = k_smem.shape[0]
        V_STAGES: gl.constexpr = v_smem.shape[0]
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, BLOCK_N, 16])
        cols = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        s_zero = gl.zeros([HALF_M, BLOCK_N], gl.float32, layout=s_layout)
        if HAS_SOFTCAP == 2:  # the fixed max (gluon_forward_steps.softmax_tile)
            m_start = gl.zeros([HALF_M], gl.float32, layout=gl.SliceLayout(1, s_layout))
        else:
            m_start = gl.full([HALF_M], float("-inf"), gl.float32, layout=gl.SliceLayout(1, s_layout))
        l_start = gl.zeros([HALF_M], gl.float32, layout=gl.SliceLayout(1, s_layout))
        my_items = (num_items - pid + nprog - 1) // nprog  # >= 1: the grid has at most num_items programs

        # round 0: the first item's first Q K^T alone
        t = gl.to_tensor(0)  # ring position (and round) of the current item's first key tile
        mbarrier.wait(q_bars.index(w), 0)
        turn_wait(turn, w, t)
        s_tok = _qk_issue(_q_view(q_smem, w, 0), k_smem, k_ready, t, s_zero)
        mbarrier.arrive(turn.index(1 - w), count=1)
        s = warpgroup_mma_wait(num_outstanding=0, deps=(s_tok, ))
        mbarrier.arrive(k_empty.index(0), count=1)
        # Each iteration starts with its item's S_0 in registers (fp32: carrying P as bf16 across this loop made
        # the compiler keep it unpacked, 64 PRMT more per key tile) and ends with the next item's.
        for it in range(my_items - 1):
            # the item's bounds are recomputed per item rather than carried across the loop (fewer live registers)
            b, h, start_m, q_row0, sq, sk, b_desc, lo, n, rows, acc, alpha, p_op, m_i, l_i = _run_item(
                s, it, t, pid, nprog, num_items, TILE_MAP, CU_Q, CU_K, num_m_tiles, q_heads, max_seqlen_q,
                max_seqlen_k, win_left, win_right, ALIBI, stride_ab, q_smem, k_smem, v_smem, k_ready, k_empty, v_ready,
                v_empty, turn, m_start, l_start, cols, qk_scale, softcap, s_zero, w, HALF_M, BLOCK_N, HEAD_D, CAUSAL,
                WINDOW, HAS_SOFTCAP, VARLEN, HAS_ALIBI, USE_MAP)
            # round t + n: the next item's Q K^T_0 beside this item's last P V
            turn_wait(turn, w, t + n)
            mbarrier.wait(q_bars.index(2 * ((it + 1) % 2) + w), ((it + 1) // 2) & 1)
            s_tok = _qk_issue(_q_view(q_smem, w, it + 1), k_smem, k_ready, t + n, s_zero)
            o_tok = pv_issue(acc, alpha, p_op, v_smem, v_ready, turn, w, t + n - 1,
                                  sk - (lo + n - 1) * BLOCK_N, VARLEN, HAS_SOFTCAP != 2)
            # this item's epilogue while the other warpgroup's matmuls run (the next item's S_0 waits in registers;
            # its softmax comes at the top of the next iteration)
            s, acc = warpgroup_mma_wait(num_outstanding=0, deps=(s_tok, o_tok))
            mbarrier.arrive(k_empty.index((t + n) % K_STAGES), count=1)
            mbarrier.arrive(v_empty.index((t + n - 1) % V_STAGES), count=1)
            qi = 2 * (it % 2) + w  # this item's Q buffer, dead since its last Q K^T: it stages the output
            epilogue(acc, m_i, l_i, q_smem.index(qi), o_desc, r_desc, LSE, SINK, O, RESID, b, h, start_m + w * HALF_M,
                     rows, sq, q_row0, b_desc, stride_lb, stride_lh, stride_os, stride_oh, HALF_M, HEAD_D,
                     STORE_RESID, HAS_SINK, VARLEN)
            gl.thread_barrier()  # every thread past the store's read of the buffer
            mbarrier.arrive(q_empty.index(qi), count=1)  # item it + 2's Q may load into it
            t = t + n
        # the last item: its rounds, then its final P V alone (round t + n) and its epilogue
        last = my_items - 1
        b, h, start_m, q_row0, sq, sk, b_desc, lo, n, rows, acc, alpha, p_op, m_i, l_i = _run_item(
            s, last, t, pid, nprog, num_items, TILE_MAP, CU_Q, CU_K, num_m_tiles, q_heads, max_seqlen_q, max_seqlen_k,
            win_left, win_right, ALIBI, stride_ab, q_smem, k_smem, v_smem, k_ready, k_empty, v_ready, v_empty, turn,
            m_start, l_start, cols, qk_scale, softcap, s_zero, w, HALF_M, BLOCK_N, HEAD_D, CAUSAL, WINDOW,
            HAS_SOFTCAP, VARLEN, HAS_ALIBI, USE_MAP)
        turn_wait(turn, w, t + n)
        o_tok = pv_issue(acc, alpha, p_op, v_smem, v_ready, turn, w, t + n - 1,
                              sk - (lo + n - 1) * BLOCK_N, VARLEN, HAS_SOFTCAP != 2)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(o_tok, ))
        mbarrier.arrive(v_empty.index((t + n - 1) % V_STAGES), count=1)
        epilogue(acc, m_i, l_i, q_smem.index(2 * (last % 2) + w), o_desc, r_desc, LSE, SINK, O, RESID, b, h,
                 start_m + w * HALF_M, rows, sq, q_row0, b_desc, stride_lb, stride_lh, stride_os, stride_oh, HALF_M,
                 HEAD_D, STORE_RESID, HAS_SINK, VARLEN)
