"""The Gluon forward's per-key-tile steps (sm90 only), shared by the consumer warpgroups of ``gluon_forward`` (plain
and persistent grids) and of ``gluon_flat`` (one pipeline across items): the online-softmax step of a key tile
(masking, softcap, ALiBi, window), the asynchronous P V product that hands the tensor cores to the next warpgroup,
and v38a's drained tiles (a warpgroup's turns through key tiles it does not see). Shapes as in ``gluon_forward``:
a warpgroup's 64 query rows against a (64, BLOCK_N) score tile in the wgmma accumulator layout."""

from .gluon_common import AVAILABLE

if AVAILABLE:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import mbarrier, warpgroup_mma
    from .gluon_common import (SOFTCAP_FFMA, _tanh, alibi_scores, exp2_tile, feature_scores, key_visible, turn_wait,
                               zero_rows_from)

    @gluon.jit
    def softmax_tile(s, j, full_lo, n_full, m_i, l_i, rows, row0, cols, diag, seqlen_k, qk_scale, softcap, win_left,
                      win_right, slope, CAUSAL: gl.constexpr, WINDOW: gl.constexpr, HAS_SOFTCAP: gl.constexpr,
                      IS_BF16: gl.constexpr, HAS_ALIBI: gl.constexpr):
        """Online-softmax step for key tile j: mask it when it is outside the full tiles [full_lo, n_full) (full_lo
        only with a window), then return (p unnormalised fp32, alpha = exp2(m_old - m_new), m_new, l_new). Rows
        that have seen no key keep m = -inf. With a softcap the scores become softcap * tanh(q.k * qk_scale)
        (softcap pre-multiplied by log2 e); with a window, row r sees keys [r + diag - win_left, r + diag +
        win_right]; ALiBi subtracts slope * |r + diag - key| (slope in log2 units; positions as fp32, exact below
        2^24), on every tile; HAS_ALIBI == 2 (the linear form, plain grid): ``alibi_scores``, a row term rho joins
        the max where a tile lies on one side of every row's position (rows = row0 .. row0 + HALF_M - 1).
        HAS_SOFTCAP == 2 (the fold, no ALiBi, bf16, softcap <= 50; the default, NOTES v20c): the max stays 0, as
        softcap * t <= softcap bounds every score: p = exp2(softcap * t) in [2^-c, 2^c] (c = softcap * log2 e <=
        72.2), no row max and alpha = 1 (the caller skips O's rescale)."""
        scale = qk_scale  # what s is multiplied by inside the exp2 (FFMA with the max), unless s is in log2 units
        LOG2_UNITS: gl.constexpr = HAS_ALIBI or (HAS_SOFTCAP and not SOFTCAP_FFMA)
        if HAS_ALIBI == 2:  # the linear form (configs.gluon_alibi_linear)
            s, rho = alibi_scores(s, j, row0, rows, cols, diag, qk_scale, softcap, slope, HAS_SOFTCAP, IS_BF16)
        elif LOG2_UNITS:
            s, _ = feature_scores(s, qk_scale, softcap, slope, (rows + diag).to(gl.float32)[:, None],
                                  (j * s.shape[1] + cols).to(gl.float32)[None, :], HAS_SOFTCAP, HAS_ALIBI, IS_BF16)
        elif HAS_SOFTCAP:  # SOFTCAP_FFMA: s = tanh(...), softcap the scale, so softcap * t joins the exp2's FFMA
            s = _tanh(s * qk_scale, IS_BF16)
            scale = softcap
        masked = j >= n_full
        if WINDOW:
            masked = masked | (j < full_lo)
        if masked:  # uniform branch: the diagonal / window-edge / sequence-end tiles only
            visible = key_visible(j * s.shape[1] + cols, rows, seqlen_k, diag, win_left, win_right, CAUSAL, WINDOW)
            s = gl.where(visible, s, float("-inf"))
        if HAS_SOFTCAP == 2:
            m_new = m_i
            alpha = m_i  # not read (no rescale)
            p = exp2_tile(s * scale)
            l_new = l_i + gl.sum(p, axis=1)
        else:
            if HAS_ALIBI == 2:  # scores are s + rho
                m_new = gl.maximum(m_i, gl.max(s, axis=1) + rho)
            elif LOG2_UNITS:
                m_new = gl.maximum(m_i, gl.max(s, axis=1))
            else:  # scale > 0: max(s) * scale = max(s * scale)
                m_new = gl.maximum(m_i, gl.max(s, axis=1) * scale)
            m_use = gl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = gl.exp2(m_i - m_use)
            if HAS_ALIBI == 2:
                x = s - (m_use - rho)[:, None]
            elif LOG2_UNITS:
                x = s - m_use[:, None]
            else:
                x = s * scale - m_use[:, None]
            p = exp2_tile(x)
            l_new = l_i * alpha + gl.sum(p, axis=1)
        return p, alpha, m_new, l_new

    @gluon.jit
    def pv_issue(acc, alpha, p_op, v_smem, v_ready, turn, w: gl.constexpr, t, kv_valid, VARLEN: gl.constexpr,
                  RESCALE: gl.constexpr):
        """Rescale O by alpha (RESCALE), issue O += P_t V_t (asynchronous) once V_t has landed, and hand the tensor
        cores to the other warpgroup. Returns the in-flight accumulator. VARLEN: V_t's rows from kv_valid on (the
        tile crosses its sequence's end) are zeroed first."""
        V_STAGES: gl.constexpr = v_smem.shape[0]
        vs = t % V_STAGES
        if RESCALE:
            acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, acc.type.layout))[:, None]
        mbarrier.wait(v_ready.index(vs), (t // V_STAGES) & 1)
        v2 = v_smem.index(vs).reshape([v_smem.shape[2], v_smem.shape[4]])
        if VARLEN:
            if kv_valid < v_smem.shape[2]:
                zero_rows_from(v2, kv_valid)
        o_tok = warpgroup_mma(p_op, v2, acc, is_async=True)
        mbarrier.arrive(turn.index((w + 1) % turn.shape[0]), count=1)  # the next warpgroup's turn
        return o_tok

    @gluon.jit
    def drain_tiles(bars, w: gl.constexpr, t, n, r):
        """v38a's CAUSAL_SKIP: key tiles at ring positions t .. t + n - 1 that warpgroup w does not see, in its
        ping-pong rounds r .. r + n - 1: no products; it waits for each tile to land, so that its release follows
        the slot's previous use's releases (the turns already order it while another warpgroup computes the tile,
        as in causal items, whose last warpgroup sees every key; ``benchmarks/persistent_protocol.check_fwd``),
        releases K and V and passes its turn."""
        q_bars, k_ready, k_empty, v_ready, v_empty, turn = bars
        K_STAGES: gl.constexpr = k_ready.shape[0]
        V_STAGES: gl.constexpr = v_ready.shape[0]
        for j in range(n):
            turn_wait(turn, w, r + j)
            ks = (t + j) % K_STAGES
            mbarrier.wait(k_ready.index(ks), ((t + j) // K_STAGES) & 1)
            mbarrier.arrive(k_empty.index(ks), count=1)
            vs = (t + j) % V_STAGES
            mbarrier.wait(v_ready.index(vs), ((t + j) // V_STAGES) & 1)
            mbarrier.arrive(v_empty.index(vs), count=1)
            mbarrier.arrive(turn.index((w + 1) % turn.shape[0]), count=1)
