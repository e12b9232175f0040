"""The Gluon dK/dV kernel's persistent form (v35e, opt-in ``configs.gluon_bwd_persistent``; sm90 only): the
producer's and the consumers' loops over a program's work items (key tiles of batched calls without a mask,
items pid, pid + nprog, ...), each item run by ``gluon_backward``'s ``_dkdv_load`` / ``_dkdv_consumer`` with the
ring positions carried across items; ``gluon_backward._dkdv_kernel`` launches them (PERSISTENT).
``benchmarks/persistent_protocol.py`` models these barriers (``check_dkdv``): change the two together."""

from .gluon_common import AVAILABLE

if AVAILABLE:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import tma
    from .gluon_backward import _dkdv_consumer, _dkdv_load
    from .gluon_common import stats_row0

    @gluon.jit
    def _dkdv_item(item, num_n_tiles, kv_heads, seqlen_q, BLOCK_M: gl.constexpr, HALF_N: gl.constexpr):
        """(b, hk, start_n, n_m) of a persistent program's work item (batched calls without a mask): the grid's
        item ``item`` (key tiles inner, then KV heads, then batch), every query tile."""
        bhk = item // num_n_tiles
        return bhk // kv_heads, bhk % kv_heads, (item % num_n_tiles) * (2 * HALF_N), gl.cdiv(seqlen_q, BLOCK_M)

    @gluon.jit
    def _dkdv_load_persistent(q_desc, do_desc, k_desc, v_desc, st_desc, q_smem, do_smem, k_smem, v_smem, lse_smem,
                              delta_smem, bars, kv_empty, pid, num_items, nprog, num_n_tiles, kv_heads, group,
                              seqlen_q, stride_sh, stride_st, HALF_N: gl.constexpr, BLOCK_M: gl.constexpr,
                              HEAD_D: gl.constexpr, STAGES: gl.constexpr):
        """Persistent producer (v35e): items pid, pid + nprog, ... (``_dkdv_item``), ``_dkdv_load`` each with the
        ring running on across items."""
        t0 = gl.to_tensor(0)
        for item in range(pid, num_items, nprog):
            it = (item - pid) // nprog
            b, hk, start_n, n_m = _dkdv_item(item, num_n_tiles, kv_heads, seqlen_q, BLOCK_M, HALF_N)
            _dkdv_load(q_desc, do_desc, k_desc, v_desc, st_desc, q_smem, do_smem, k_smem, v_smem, lse_smem,
                       delta_smem, bars, b, hk, group, start_n, 0, n_m, stats_row0(b, 0, seqlen_q, False), stride_sh,
                       stride_st, 0, 0, HALF_N, BLOCK_M, HEAD_D, STAGES, 2, t0, kv_empty, it)
            t0 += group * n_m

    @gluon.jit
    def _dkdv_consumer_persistent(w: gl.constexpr, dk_desc, dv_desc, DK, DV, ALIBI, q_smem, do_smem, k_smem, v_smem,
                                  lse_smem, delta_smem, bars, kv_empty, stage, pid, num_items, nprog, num_n_tiles,
                                  kv_heads, group, seqlen_q, seqlen_k, qk_scale, sm_scale, stride_dks, stride_dkh,
                                  stride_dvs, stride_dvh, HALF_N: gl.constexpr, softcap, BLOCK_M: gl.constexpr,
                                  HEAD_D: gl.constexpr, STAGES: gl.constexpr, HAS_SOFTCAP: gl.constexpr,
                                  HAS_ALIBI: gl.constexpr, stride_ab, KV_REGS: gl.constexpr):
        """Persistent consumer warpgroup w (v35e): ``_dkdv_consumer`` on items pid, pid + nprog, ..., ring
        positions carried across items, K / V's phase it & 1."""
        t0 = gl.to_tensor(0)
        for item in range(pid, num_items, nprog):
            it = (item - pid) // nprog
            b, hk, start_n, n_m = _dkdv_item(item, num_n_tiles, kv_heads, seqlen_q, BLOCK_M, HALF_N)
            alibi_b = ALIBI
            if HAS_ALIBI:
                alibi_b = ALIBI + b * stride_ab
            _dkdv_consumer(w, dk_desc, dv_desc, DK, DV, alibi_b, q_smem, do_smem, k_smem, v_smem, lse_smem,
                           delta_smem, bars, b, hk, group, start_n, 0, n_m, seqlen_q, seqlen_k, qk_scale, sm_scale, 0,
                           stride_dks, stride_dkh, stride_dvs, stride_dvh, HALF_N, -1, -1, softcap, BLOCK_M, HEAD_D,
                           STAGES, False, False, HAS_SOFTCAP, True, False, HAS_ALIBI, q_smem, 0, False, KV_REGS,
                           t0, it & 1, kv_empty, stage)
            t0 += group * n_m
        tma.store_wait(pendings=0)  # the last item's stores have read the staging buffers
