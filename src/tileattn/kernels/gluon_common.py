"""Pieces shared by the Hopper Gluon kernels (``gluon_forward.py``, ``gluon_dq.py``, ``gluon_backward.py``): the
softcap / ALiBi scores and a masked key tile's visibility, the warpgroups' turns, the producer's K/V ring,
shared-memory row zeroing and masked row stores for varlen, the forward's TMA output stores and in-place Q
scaling, the row-stats slot, the ALiBi slope and the trace probes; on the host, TMA descriptors, the window bounds
and the softcap fixed-max rule. Which program / work item covers which query tile and key tiles:
``gluon_schedule.py``.
"""

import functools
import os

import torch
import triton.language as tl

from ..configs import getenv
from .common import FAST_TANH, residual_store_value
from .launch import host_descriptor
from .params import AttnParams

try:  # Gluon ships with triton >= 3.5; without it every call takes the portable kernel
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor as GluonTensorDescriptor
    AVAILABLE = True
except ImportError:  # pragma: no cover - older triton
    AVAILABLE = False


# TILEATTN_SOFTCAP_FFMA (read at import; default 1, NOTES v19g, run 87: softcap forward 0.74-0.78 -> 0.79-0.80 of
# dense at D=128): the Gluon forward keeps tanh(...) as the score and softcap as the exp2's scale, so softcap * t is
# folded into the FFMA with the row max (one FMUL per score less: 3000 of the D=128 softcap kernel's 64927 SASS
# instructions); 0 restores the scores in log2 units
SOFTCAP_FFMA = tl.constexpr(os.environ.get("TILEATTN_SOFTCAP_FFMA", "1") != "0")


# TILEATTN_POLY_EXP (read at import; default 0; session 22's v27a, measured slower): the Gluon forward computes part
# of each tile's exp2 with a polynomial on the FMA units instead of the MUFU unit (FlashAttention-4's trick). At D=64
# the MUFU's exp2 (16 per clock per SM) takes as long as the tile's two matmuls, so the softmax, not the tensor
# cores, bounds the forward. 1: one of each pair of elements to the polynomial, the other to ex2.approx; 4: one of
# each four (``exp2_tile``); by the count in NOTES v27a, 1 balances the MUFU and FMA pipes better, 4 leaves the FMA
# pipe more room for the softmax's other work. Run 132 (H200, same commit, three processes, forward TFLOP/s against
# cuDNN's at D=64/128 1k-16k): geomean 0.99x off, 0.83x with 1, 0.91x with 4 (D=64 causal 16k 445 / 381 / 419;
# D=128 softcap 2k 539 / 509 / 539): the extra FMA-pipe instructions cost more than the MUFU time they free, so
# it stays off (the tests pass with it on).
_POLY = os.environ.get("TILEATTN_POLY_EXP", "0")
if _POLY not in ("0", "1", "4"):
    raise ValueError(f"TILEATTN_POLY_EXP must be 0, 1 or 4, got {_POLY!r}")
POLY_EXP = tl.constexpr({"0": 0, "1": 2, "4": 4}[_POLY])  # elements per group, one of them on the polynomial

# 2^x for the last element of each group by range reduction and a degree-3 polynomial with p(0) = 1 (relative error
# <= 1.0e-4 on [-0.5, 0.5] in fp32 Horner, exact at integers, so a row's maximum still gets p = 1; P is rounded to
# bf16/fp16 for P V anyway, and l's sum sees 1e-4 at most): x clamped at -127 (max.NaN keeps a NaN), n = round(x)
# by adding 1.5 * 2^23 (the sum's low mantissa bits hold n), f = x - n in [-0.5, 0.5], p(f) by Horner, then times
# 2^n built as the float bits (n + 127) << 23 — 0 for n = -127, so masked scores (-inf) give exactly 0 as
# ex2.approx does (valid for x <= 127: the forward's arguments are <= 0, or <= 72.2 with softcap's fixed max). The
# group's other elements take ex2.approx.ftz. tests/test_gluon_forward.py emulates it.
_POLY_ASM = """max.NaN.f32 t, ${x}, 0fC2FE0000;
add.rn.f32 r, t, 0f4B400000;
sub.rn.f32 f, r, 0f4B400000;
sub.rn.f32 f, t, f;
fma.rn.f32 q, f, 0f3D61510B, 0f3E780626;
fma.rn.f32 q, q, f, 0f3F317AFD;
fma.rn.f32 q, q, f, 0f3F800000;
mov.b32 j, r;
add.s32 j, j, 127;
shl.b32 j, j, 23;
mov.b32 e, j;
mul.rn.f32 ${y}, q, e;"""


def _exp2_group_asm(n: int) -> str:
    """The inline asm for a group of n elements ($0 .. $n-1 out, $n .. $2n-1 in): ex2.approx for all but the last,
    the polynomial for the last."""
    lines = ["{", ".reg .f32 t, r, f, q, e;", ".reg .b32 j;"]
    lines += [f"ex2.approx.ftz.f32 ${i}, ${n + i};" for i in range(n - 1)]
    lines += [_POLY_ASM.replace("${x}", f"${2 * n - 1}").replace("${y}", f"${n - 1}"), "}"]
    return "\n".join(lines)


_EXP2_ASM = tl.constexpr(_exp2_group_asm(POLY_EXP.value) if POLY_EXP.value else "")
_EXP2_CONSTRAINTS = tl.constexpr(",".join(["=f"] * POLY_EXP.value + ["f"] * POLY_EXP.value))


# the softcap bound below which the fixed max applies: p = exp2(softcap * log2 e * t) stays within [2^-72.2, 2^72.2],
# so O's accumulator (sum of p * v over the keys) overflows fp32 only for |v| * keys above ~2^55
SOFTCAP_FIXED_MAX_LIMIT = 50.0


def softcap_fixed_max(p: AttnParams, dtype, head_dim: int) -> bool:
    """Whether a softcap call runs with a fixed softmax max of 0 (default since session 18, +2-8% at D=128 on the
    H200; ``TILEATTN_SOFTCAP_FIXED_MAX=0`` opts out here and in the portable kernel; NOTES v20c): the fold on
    (SOFTCAP_FFMA), no ALiBi (unbounded scores), bf16 (P keeps fp32's exponent range; fp16's would overflow),
    softcap <= SOFTCAP_FIXED_MAX_LIMIT, head dim <= 128 (at 256 the kernel with a sink spills 76 bytes)."""
    return (0 < p.softcap <= SOFTCAP_FIXED_MAX_LIMIT and getenv("TILEATTN_SOFTCAP_FIXED_MAX") != "0"
            and SOFTCAP_FFMA.value and p.alibi_slopes is None and dtype == torch.bfloat16 and head_dim <= 128)


def portable_softcap_fixed_max(p: AttnParams, dtype) -> bool:
    """The same fixed softmax max for the portable Triton forward (kernels/forward.py; NOTES v21c): default since
    session 19 (D=64 softcap forward +4-8% on the H200, run 99); ``TILEATTN_SOFTCAP_FIXED_MAX=0`` opts
    out of both forms, ``=gluon`` keeps only the Gluon kernel's; bf16, softcap <= SOFTCAP_FIXED_MAX_LIMIT, no ALiBi,
    any head dim (its scores are in log2 units: softcap * log2 e <= 72.2)."""
    return (0 < p.softcap <= SOFTCAP_FIXED_MAX_LIMIT and p.alibi_slopes is None and dtype == torch.bfloat16
            and getenv("TILEATTN_SOFTCAP_FIXED_MAX") not in ("0", "gluon"))


def window_bounds(p: AttnParams, seqlen_q: int, seqlen_k: int):
    """(win_left, win_right) for the Gluon kernels: a side of -1 (unbounded) as a bound past every key."""
    unbounded = seqlen_q + seqlen_k
    return (p.window_left if p.window_left >= 0 else unbounded, p.window_right if p.window_right >= 0 else unbounded)


def has_window(p: AttnParams) -> bool:
    """A window other than none or causal: a left bound, or a right bound above 0."""
    return p.window_left >= 0 or p.window_right > 0


@functools.lru_cache(maxsize=None)
def _smem_layout(block, kind):
    dtype = {"int16": gl.int16, True: gl.bfloat16, False: gl.float16}[kind]
    return gl.NVMMASharedLayout.get_default_for(list(block), dtype)


def make_desc(t: torch.Tensor, block: tuple, bf16: bool):
    """Gluon host descriptor of a (B, S, H, D) tensor that ``applies`` checked by TMA's rules (bf16 / fp16 as
    ``bf16`` says). An int8 tensor (the forward's packed residual) is described as int16 column pairs, (B, S, H,
    D / 2) over the same bytes, ``block``'s last size halved: the kernel stores pairs (``store_tile_tma``)."""
    if t.dtype == torch.int8:
        t, block = t.view(torch.int16), block[:-1] + (block[-1] // 2,)
        return host_descriptor(GluonTensorDescriptor, t, block, layout=_smem_layout(block, "int16"))
    return host_descriptor(GluonTensorDescriptor, t, block, layout=_smem_layout(block, bf16))


# a persistent forward item's stamps per warpgroup (``trace_stamp``, ``epilogue``; benchmarks/fwd_trace.py)
TRACE_FIELDS = tl.constexpr(7)

if AVAILABLE:
    from triton._C.libtriton import ir as _ir
    from triton.experimental.gluon.language._core import builtin as _builtin

    @_builtin
    def tma_reduce_add(tensor_desc, coord, src, _semantic=None):
        """TMA reduce-add of the shared-memory tile ``src`` into the global box at ``coord`` of ``tensor_desc``
        (``cp.reduce.async.bulk.tensor ... .add``, one bulk group: wait with ``tma.store_wait``). Gluon 3.6's
        hopper ``tma`` module has no such call; its builder does (``create_async_tma_reduce``). For a fused
        backward's dQ adds (NOTES, session 22: v26a); the adds' order, and so fp32 rounding, is the caller's."""
        coord = _semantic._convert_to_ir_values(coord, require_i64=False)
        _semantic.builder.create_async_tma_reduce(_ir.DESCRIPTOR_REDUCE_KIND.ADD, tensor_desc.handle, coord,
                                                  src.handle)

    @gluon.jit
    def _tanh(x, IS_BF16: gl.constexpr):
        """tanh as the portable kernel's softcap computes it (common.scores): the hardware tanh for bf16 inputs,
        exp and an approximate reciprocal for fp16 (TILEATTN_EXACT_TANH=1: the exact formula for both)."""
        if FAST_TANH and IS_BF16:
            t = gl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=f,f", [x], dtype=gl.float32, is_pure=True,
                                          pack=1)
        elif FAST_TANH:
            t = 1.0 - gl.fdiv(2.0, gl.exp(2.0 * x) + 1.0)
        else:
            t = 1.0 - 2.0 / (gl.exp(2.0 * x) + 1.0)
        return t

    @gluon.jit
    def turn_wait(turn, w: gl.constexpr, r):
        """Turns between the consumer warpgroups (one mbarrier of one arrival per warpgroup; warpgroup w arrives on
        the next one's, ``turn.index((w + 1) % NW)``, once it has issued round r's matmuls): warpgroup w issues its
        matmuls of round r after warpgroup w - 1 issued its round r (w > 0) or the last one its round r - 1 (w = 0),
        so one warpgroup's elementwise work runs while the others' matmuls hold the tensor cores. Each barrier's
        producer is at most one round ahead of its waiter, so phase parity suffices."""
        if w == 0:
            mbarrier.wait(turn.index(0), (r & 1) ^ 1)
        else:
            mbarrier.wait(turn.index(w), r & 1)

    @gluon.jit
    def exp2_tile(x):
        """exp2 of a score tile: ex2.approx for every element, or with POLY_EXP one element of each group of
        POLY_EXP by the FMA units' polynomial (``_exp2_group_asm``)."""
        if POLY_EXP:
            y = gl.inline_asm_elementwise(_EXP2_ASM, _EXP2_CONSTRAINTS, [x], dtype=gl.float32, is_pure=True,
                                          pack=POLY_EXP)
        else:
            y = gl.exp2(x)
        return y

    @gluon.jit
    def residual_stage(stage, r_desc):
        """The shared buffer that stages the residual's rows: out's dead ``stage`` itself, or for an int8 residual
        (``r_desc`` int16 pairs, ``make_desc``) its first half viewed in the pairs' layout."""
        buf = stage
        if r_desc.dtype == gl.int16:  # a compile-time choice (one return: Gluon types both branches' returns)
            buf = stage._reinterpret(r_desc.dtype, r_desc.block_shape, r_desc.layout)
        return buf

    @gluon.jit
    def store_tile_tma(o_desc, r_desc, q_buf, acc, o, b, row, h, STORE_RESID: gl.constexpr, r_stage,
                       DEFER: gl.constexpr, TRACE=None, trace_at=0):
        """out (and the rounding residual) of one warpgroup's rows through a dead shared buffer ``q_buf`` and TMA
        stores (rows past the tensor clipped). DEFER (the persistent forward): the residual is staged in its own
        buffer ``r_stage`` and nothing waits for the stores here: the caller waits (``tma.store_wait``) before it
        writes either buffer again and before the program ends. Otherwise the residual reuses ``q_buf`` once out's
        store has read it, and the stores are waited for before returning. TRACE: ``epilogue``'s (stamp 6)."""
        q2 = q_buf.reshape([q_buf.shape[1], q_buf.shape[3]])
        q2.store(o)
        fence_async_shared()
        gl.thread_barrier()
        tma.async_copy_shared_to_global(o_desc, [b, row, h, 0], q_buf)
        if STORE_RESID:  # out's rounding residual for the backward's delta (see backward.py)
            r = residual_store_value(acc, o, r_desc.dtype)
            if DEFER:
                r_buf = residual_stage(r_stage, r_desc)
            else:
                r_buf = residual_stage(q_buf, r_desc)
                tma.store_wait(pendings=0)
                gl.thread_barrier()
            r_buf.reshape([r_buf.shape[1], r_buf.shape[3]]).store(r)
            fence_async_shared()
            gl.thread_barrier()
            if TRACE is not None:  # 6: the residual staged (without DEFER after out's store has read q_buf)
                gl.store(TRACE + trace_at + 6, global_ns())
            tma.async_copy_shared_to_global(r_desc, [b, row, h, 0], r_buf)
        elif TRACE is not None:  # no residual: 6 once out's store is issued
            gl.store(TRACE + trace_at + 6, global_ns())
        if not DEFER:
            tma.store_wait(pendings=0)

    @gluon.jit
    def feature_scores(s, qk_scale, softcap, slope, q_pos, k_pos, HAS_SOFTCAP: gl.constexpr,
                       HAS_ALIBI: gl.constexpr, IS_BF16: gl.constexpr):
        """Raw q.k products -> scores in log2 units with a softcap and / or ALiBi (without either, callers
        fold qk_scale into their exp2 instead): softcap * tanh(s * qk_scale)
        (softcap pre-multiplied by log2 e) or s * qk_scale, minus slope * |q_pos - k_pos| (slope in log2 units;
        q_pos = row + diag and k_pos = key as fp32, exact below 2^24, broadcast to s's shape by the caller).
        Returns (scores, tanh(...)) with a softcap, else (scores, scores)."""
        if HAS_SOFTCAP:
            t = _tanh(s * qk_scale, IS_BF16)
            sc = softcap * t
        else:
            sc = s * qk_scale
            t = sc
        if HAS_ALIBI:
            sc = sc - slope * gl.abs(q_pos - k_pos)
        return sc, t

    @gluon.jit
    def alibi_scores(s, j, row0, rows, cols, diag, qk_scale, softcap, slope, HAS_SOFTCAP: gl.constexpr,
                     IS_BF16: gl.constexpr):
        """Key tile j's raw q.k products s [HALF_M, BLOCK_N] (rows ``rows`` = row0 .. row0 + HALF_M - 1, columns
        ``cols`` = 0 .. BLOCK_N - 1) -> (y, rho) with score = y + rho[:, None] in log2 units: the base score
        (softcap * tanh(s * qk_scale), softcap pre-multiplied by log2 e, or s * qk_scale) minus
        slope * |row + diag - key| (slope in log2 units). On a tile whose keys all lie at or before every row's
        position (or all at or after), |q - k| is linear: -slope * |q - k| = +-slope * c + rho with c the key's
        column in the tile and rho = +-slope * (k0 - q) per row (k0 = j * BLOCK_N), so y costs one FFMA per score
        (slope * c is the same for every tile) and the row term joins the softmax's max instead of every score;
        rho is exact-integer k0 - q times slope, rounded once, as slope * |q - k| is in the general form, which
        the tiles that straddle the rows' positions keep (rho = 0)."""
        HALF_M: gl.constexpr = s.shape[0]
        BLOCK_N: gl.constexpr = s.shape[1]
        x = s
        scale = qk_scale
        if HAS_SOFTCAP:
            x = _tanh(s * qk_scale, IS_BF16)
            scale = softcap
        k0 = j * BLOCK_N
        q_pos = rows + diag
        col_term = slope * cols.to(gl.float32)
        rho = slope * (k0 - q_pos).to(gl.float32)
        # each branch scales x itself, so that the scale and the column term contract to one FFMA
        if k0 + BLOCK_N - 1 <= row0 + diag:  # every key at or before every row: slope * (k - q)
            y = x * scale + col_term[None, :]
        elif k0 >= row0 + HALF_M - 1 + diag:  # every key at or after every row: slope * (q - k)
            y = x * scale - col_term[None, :]
            rho = -rho
        else:
            y = x * scale - slope * gl.abs(q_pos.to(gl.float32)[:, None] - (k0 + cols).to(gl.float32)[None, :])
            rho = gl.zeros_like(rho)
        return y, rho

    @gluon.jit
    def global_ns():
        """The GPU's global nanosecond timer (%globaltimer, the same clock on every SM), an int64 scalar."""
        return gl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=gl.int64, is_pure=False,
                                         pack=1)

    @gluon.jit
    def trace_program(TRACE, t_start, steps):
        """A program trace (``benchmarks/bwd_trace.py``): program pid writes (start ns, end ns, SM id, steps) to
        TRACE[4 pid .. 4 pid + 3] (int64), the end read now."""
        t_end = global_ns()
        sm = gl.inline_asm_elementwise("mov.u32 $0, %smid;", "=r", [], dtype=gl.int32, is_pure=True, pack=1)
        row = TRACE + gl.program_id(0).to(gl.int64) * 4
        gl.store(row, t_start)
        gl.store(row + 1, t_end)
        gl.store(row + 2, sm.to(gl.int64))
        gl.store(row + 3, steps.to(gl.int64))

    @gluon.jit
    def trace_stamp(TRACE, item, w: gl.constexpr, NW: gl.constexpr, i: gl.constexpr):
        """TRACE[(item * NW + w) * TRACE_FIELDS + i] = now (%globaltimer ns, ``global_ns``; int64): stamp i of
        warpgroup w in a persistent forward item (``gluon_forward._consumer``'s TRACE, ``benchmarks/fwd_trace.py``;
        ``epilogue`` stamps field 6 through ``trace_row``)."""
        gl.store(TRACE + trace_row(item, w, NW) + i, global_ns())

    @gluon.jit
    def trace_row(item, w: gl.constexpr, NW: gl.constexpr):
        """Where warpgroup w's stamps of a persistent forward item start in the TRACE buffer (an int32 offset: one
        register where the epilogue has none to spare; items < 2^31 / (3 * 7))."""
        return (item * NW + w) * TRACE_FIELDS

    @gluon.jit
    def load_kv_ring(k_desc, v_desc, k_smem, v_smem, k_ready, k_empty, v_ready, v_empty, b, hk, row0, lo, n, t0,
                     BLOCK_N: gl.constexpr, HEAD_D: gl.constexpr, K_STAGES: gl.constexpr, V_STAGES: gl.constexpr):
        """Producer side of the K and V rings: key tiles lo .. lo + n - 1 (rows from
        row0: a varlen sequence's first packed row) into ring position t = t0 + tile - lo (t0: the tiles this
        program's ring carried before, 0 but in the persistent forward), each slot refilled once the consumers
        released it (empty) and announced by its ready barrier with the tile's byte count."""
        for j in range(n):
            t = t0 + j
            ks = t % K_STAGES
            mbarrier.wait(k_empty.index(ks), ((t // K_STAGES) & 1) ^ 1)
            mbarrier.expect(k_ready.index(ks), BLOCK_N * HEAD_D * 2)
            tma.async_copy_global_to_shared(k_desc, [b, row0 + (lo + j) * BLOCK_N, hk, 0], k_ready.index(ks),
                                            k_smem.index(ks))
            vs = t % V_STAGES
            mbarrier.wait(v_empty.index(vs), ((t // V_STAGES) & 1) ^ 1)
            mbarrier.expect(v_ready.index(vs), BLOCK_N * HEAD_D * 2)
            tma.async_copy_global_to_shared(v_desc, [b, row0 + (lo + j) * BLOCK_N, hk, 0], v_ready.index(vs),
                                            v_smem.index(vs))

    @gluon.jit
    def zero_rows_from(buf, n_valid):
        """Zero rows n_valid .. of the (rows, D) shared-memory tile ``buf`` (a varlen sequence's last tile, whose
        other rows are the next sequence's: masked scores give P = 0 there, but 0 * inf / NaN is NaN), then make
        the writes visible to the warpgroup's asynchronous MMAs. Called by every warp of a warpgroup; two
        warpgroups may zero the same tile at once (each rewrites the same values). 16 rows per pass."""
        layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
        rr = gl.arange(0, 16, layout=gl.SliceLayout(1, layout))
        for i in gl.static_range(buf.shape[0] // 16):
            if 16 * i + 16 > n_valid:  # uniform branch: chunks that hold a foreign row
                chunk = buf.slice(16 * i, 16, dim=0)
                x = chunk.load(layout)
                chunk.store(gl.where((16 * i + rr < n_valid)[:, None], x, gl.zeros_like(x)))
        fence_async_shared()
        gl.thread_barrier()

    @gluon.jit
    def residual_rows(RESID, r_desc, stride_os, stride_oh):
        """(pointer, row stride, head stride) for masked row stores of the residual: RESID itself, or for an int8
        residual (``r_desc`` int16 pairs, ``make_desc``) an int16 view of it with both strides halved."""
        if r_desc.dtype == gl.int16:  # a compile-time choice
            return RESID.to(gl.pointer_type(gl.int16), bitcast=True), stride_os // 2, stride_oh // 2
        else:
            return RESID, stride_os, stride_oh

    @gluon.jit
    def store_rows(PTR, buf, row, h, n_rows, stride_os, stride_oh):
        """Masked pointer store of the rows staged in shared memory ``buf`` (rows, D) to rows row .. of head h,
        only the first n_rows of them (a varlen sequence's last tile: a TMA store would overwrite the next
        sequence's rows), 16 rows at a time in a coalesced layout (few registers: the epilogue's are taken)."""
        D: gl.constexpr = buf.shape[1]
        layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
        rr = gl.arange(0, 16, layout=gl.SliceLayout(1, layout))
        cc = gl.arange(0, D, layout=gl.SliceLayout(0, layout))
        base = PTR + row.to(gl.int64) * stride_os + h * stride_oh
        for i in gl.static_range(buf.shape[0] // 16):
            x = buf.slice(16 * i, 16, dim=0).load(layout)
            r = 16 * i + rr
            gl.store(base + r[:, None] * stride_os + cc[None, :], x, mask=(r < n_rows)[:, None] & (cc < D)[None, :])

    @gluon.jit
    def stats_row0(b, q_row0, seqlen_q, VARLEN: gl.constexpr):
        """Where sequence b's rows start in the row-stats buffer (``backward._row_stats_buffer``): 16 * (b +
        first // 16), first = its first packed row q_row0 (varlen) or b * seqlen_q."""
        if VARLEN:
            srow0 = 16 * (b + q_row0 // 16)
        else:
            srow0 = 16 * (b + (b * seqlen_q) // 16)
        return srow0

    @gluon.jit
    def alibi_slope(ALIBI_B, hq, HAS_ALIBI: gl.constexpr):
        """Query head hq's ALiBi slope in log2 units (0.0 without ALiBi); ALIBI_B: the sequence's slopes (Hq,)."""
        slope = 0.0
        if HAS_ALIBI:
            slope = gl.load(ALIBI_B + hq).to(gl.float32) * 1.4426950408889634
        return slope

    @gluon.jit
    def key_visible(keys, rows, seqlen_k, diag, win_left, win_right, CAUSAL: gl.constexpr, WINDOW: gl.constexpr):
        """The (rows, keys) mask of a masked key tile (forward and dQ kernels): keys before seqlen_k, and with
        CAUSAL at or before the row's diagonal, with WINDOW within [r + diag - win_left, r + diag + win_right]."""
        visible = (keys < seqlen_k)[None, :]
        if CAUSAL:
            visible = visible & (keys[None, :] <= rows[:, None] + diag)
        if WINDOW:
            rel = keys[None, :] - (rows[:, None] + diag)
            visible = visible & (rel >= -win_left) & (rel <= win_right)
        return visible

    @gluon.jit
    def row_bounds(row0, seqlen_q, seqlen_k, win_left, win_right, s_layout: gl.constexpr, HALF_M: gl.constexpr,
                   BLOCK_N: gl.constexpr, CAUSAL: gl.constexpr, WINDOW: gl.constexpr):
        """A warpgroup's rows row0 .. row0 + HALF_M - 1 (in s_layout's row slice), a key tile's columns, the causal
        diagonal's offset and its full key tiles [full_lo, n_full): every key of them visible to every row."""
        rows = row0 + gl.arange(0, HALF_M, layout=gl.SliceLayout(1, s_layout))
        cols = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        diag = seqlen_k - seqlen_q
        n_full = seqlen_k // BLOCK_N
        if CAUSAL:
            n_full = gl.minimum(n_full, gl.maximum(row0 + diag + 1, 0) // BLOCK_N)
        full_lo = 0
        if WINDOW:  # full tiles: every key visible to every row of this warpgroup
            n_full = gl.minimum(n_full, gl.maximum(row0 + diag + win_right + 1, 0) // BLOCK_N)
            full_lo = gl.cdiv(gl.maximum(row0 + HALF_M - 1 + diag - win_left, 0), BLOCK_N)
        return rows, cols, diag, n_full, full_lo

    @gluon.jit
    def epilogue(acc, m_i, l_i, stage, o_desc, r_desc, LSE, SINK, O, RESID, b, h, row0, rows, seqlen_q, q_row0,
                 b_desc, stride_lb, stride_lh, stride_os, stride_oh, HALF_M: gl.constexpr, HEAD_D: gl.constexpr,
                 STORE_RESID: gl.constexpr, HAS_SINK: gl.constexpr, VARLEN: gl.constexpr, r_stage=None,
                 DEFER: gl.constexpr = False, TRACE=None, trace_at=0):
        """The Gluon forward's epilogue for a warpgroup's rows after their last key tile: the sink joins the
        denominator, out = acc / l and lse are stored (out through ``stage``, a dead (1, HALF_M, 1, HEAD_D) shared
        buffer, by TMA; a varlen sequence's last rows by masked pointer stores). DEFER (``store_tile_tma``): the
        residual has its own staging buffer ``r_stage``, the TMA stores are left in flight, and this waits for
        the previous epilogue's stores before writing the buffers again. TRACE (measurement only,
        ``benchmarks/fwd_trace.py``): stamp 6 at TRACE + trace_at (``trace_row``): the residual staged
        (``store_tile_tma``; stamps where the accumulator or the residual are live spill 52 B more at D=256)."""
        dtype: gl.constexpr = o_desc.dtype
        o_layout: gl.constexpr = acc.type.layout
        if HAS_SINK:  # the sink joins the denominator with no value
            sink = gl.load(SINK + h).to(gl.float32) * 1.4426950408889634
            m_new = gl.maximum(m_i, sink)
            m_use = gl.where(m_new == float("-inf"), 0.0, m_new)  # a -inf sink on a row with no key: stay 0 / -inf
            alpha = gl.exp2(m_i - m_use)
            l_i = l_i * alpha + gl.exp2(sink - m_use)
            acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
            m_i = m_new
        # rows that saw no key: l = 0, m = -inf -> out 0, lse -inf
        l_safe = gl.where(l_i == 0.0, 1.0, l_i)
        acc = acc / gl.convert_layout(l_safe, gl.SliceLayout(1, o_layout))[:, None]
        lse = (m_i + gl.log2(l_i)) * 0.6931471805599453
        gl.store(LSE + b.to(gl.int64) * stride_lb + h.to(gl.int64) * stride_lh + q_row0 + rows, lse,
                 mask=rows < seqlen_q)
        o = acc.to(dtype)
        st2 = stage.reshape([HALF_M, HEAD_D])
        if DEFER:  # the previous item's TMA stores have read both staging buffers
            tma.store_wait(pendings=0)
            gl.thread_barrier()
        if VARLEN:
            if row0 + HALF_M > seqlen_q:  # the sequence's last rows (or none): masked pointer stores
                st2.store(o)
                gl.thread_barrier()
                store_rows(O, st2, q_row0 + row0, h, seqlen_q - row0, stride_os, stride_oh)
                if TRACE is not None:  # (this path's stamp 6: out stored)
                    gl.store(TRACE + trace_at + 6, global_ns())
                if STORE_RESID:
                    r_buf = residual_stage(stage, r_desc)
                    r2 = r_buf.reshape([HALF_M, r_buf.shape[3]])
                    gl.thread_barrier()
                    r2.store(residual_store_value(acc, o, r_desc.dtype))
                    gl.thread_barrier()
                    r_ptr, r_os, r_oh = residual_rows(RESID, r_desc, stride_os, stride_oh)
                    store_rows(r_ptr, r2, q_row0 + row0, h, seqlen_q - row0, r_os, r_oh)
            else:
                store_tile_tma(o_desc, r_desc, stage, acc, o, b_desc, q_row0 + row0, h, STORE_RESID, r_stage, DEFER,
                               TRACE, trace_at)
        else:
            store_tile_tma(o_desc, r_desc, stage, acc, o, b_desc, row0, h, STORE_RESID, r_stage, DEFER, TRACE,
                           trace_at)
