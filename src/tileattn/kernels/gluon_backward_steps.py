"""The Gluon dK/dV kernels' per-step math (sm90 only), shared by ``gluon_backward`` (two warpgroups of 64 keys) and
``gluon_backward_split`` (D=256: one accumulator per warpgroup): the mask bounds of a program's keys, P^T of one
query step from S^T (with the row statistics read from shared memory, causal / window masks, softcap, ALiBi) and
dS^T = P^T (dP^T - delta). Tiles are (keys, BLOCK_M query rows) in the wgmma accumulator layout."""

from .gluon_common import AVAILABLE

if AVAILABLE:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from .gluon_common import feature_scores

    @gluon.jit
    def dkdv_mask_bounds(key0, diag, win_left, win_right, HALF_N: gl.constexpr, BLOCK_M: gl.constexpr,
                         CAUSAL: gl.constexpr, WINDOW: gl.constexpr):
        """The dK/dV kernels' ``win`` for keys key0 .. key0 + HALF_N - 1 (``dkdv_probs``): (mask_end, mask_start,
        win_left, win_right); query tiles before mask_end see only part of these keys on the right (causal /
        window), tiles from mask_start on miss some on the left (window)."""
        mask_end = 0
        if CAUSAL:
            mask_end = gl.cdiv(gl.maximum(key0 + HALF_N - 1 - diag, 0), BLOCK_M)
        mask_start = 0
        if WINDOW:
            mask_end = gl.cdiv(gl.maximum(key0 + HALF_N - 1 - diag - win_right, 0), BLOCK_M)
            mask_start = gl.maximum(key0 + win_left - diag + 1, 0) // BLOCK_M
        return mask_end, mask_start, win_left, win_right

    @gluon.jit
    def dkdv_probs(st, lse_slot, tile, keys, seqlen_q, diag, win, qk_scale, softcap, slope, BLOCK_M: gl.constexpr,
                   CAUSAL: gl.constexpr, WINDOW: gl.constexpr, HAS_SOFTCAP: gl.constexpr, IS_BF16: gl.constexpr,
                   HAS_ALIBI: gl.constexpr):
        """P^T of one step from S^T: exp2(S^T * qk_scale - lse), 0 where the key is after the row (causal) or
        outside the row's window, and for rows past the sequence (lse and delta are read from shared memory when
        needed: held in registers across the waits they made the D=128 warpgroups spill; past the last row they
        are another sequence's). win = (mask_end, mask_start, win_left, win_right): query tiles before mask_end
        see only part of the warpgroup's keys on the right (causal / window), tiles from mask_start on on the
        left (window); row r sees keys [r + diag - win_left, r + diag + win_right]. HAS_SOFTCAP: the scores are
        softcap * tanh(S^T * qk_scale) (softcap pre-multiplied by log2 e, tanh as the forward's); returns (P^T,
        1 - tanh^2: the factor of dS^T), else (P^T, P^T). HAS_ALIBI: minus slope * |r + diag - key| (log2
        units)."""
        mask_end, mask_start, win_left, win_right = win
        col_layout: gl.constexpr = gl.SliceLayout(0, st.type.layout)
        lse = lse_slot.load(col_layout)
        if (tile + 1) * BLOCK_M > seqlen_q:
            lse = gl.where(tile * BLOCK_M + gl.arange(0, BLOCK_M, layout=col_layout) < seqlen_q, lse, float("inf"))
        if HAS_SOFTCAP or HAS_ALIBI:
            rows_f = (tile * BLOCK_M + gl.arange(0, BLOCK_M, layout=col_layout) + diag).to(gl.float32)
            sc, t = feature_scores(st, qk_scale, softcap, slope, rows_f[None, :], keys.to(gl.float32)[:, None],
                                   HAS_SOFTCAP, HAS_ALIBI, IS_BF16)
            p = gl.exp2(sc - lse[None, :])
        else:
            p = gl.exp2(st * qk_scale - lse[None, :])
        if CAUSAL:
            if tile < mask_end:  # uniform branch: the diagonal's query tiles only
                rows = tile * BLOCK_M + gl.arange(0, BLOCK_M, layout=col_layout)
                p = gl.where(keys[:, None] <= rows[None, :] + diag, p, 0.0)
        if WINDOW:
            if (tile < mask_end) | (tile >= mask_start):  # uniform branch: the window's edge tiles only
                rows = tile * BLOCK_M + gl.arange(0, BLOCK_M, layout=col_layout)
                rel = keys[:, None] - (rows[None, :] + diag)
                p = gl.where((rel >= -win_left) & (rel <= win_right), p, 0.0)
        if HAS_SOFTCAP:
            return p, 1.0 - t * t
        else:
            return p, p

    @gluon.jit
    def dkdv_dscores(p, g, dpt, delta_slot, tile, seqlen_q, BLOCK_M: gl.constexpr, HAS_SOFTCAP: gl.constexpr):
        """dS^T = P^T (dP^T - delta) of one step."""
        col_layout: gl.constexpr = gl.SliceLayout(0, p.type.layout)
        delta = delta_slot.load(col_layout)
        if (tile + 1) * BLOCK_M > seqlen_q:
            delta = gl.where(tile * BLOCK_M + gl.arange(0, BLOCK_M, layout=col_layout) < seqlen_q, delta, 0.0)
        ds = p * (dpt - delta[None, :])
        if HAS_SOFTCAP:  # through the tanh: g = 1 - tanh^2 (``dkdv_probs``)
            ds = ds * g
        return ds
