"""Shared ``@triton.jit`` helpers for the forward and backward kernels.

Conventions used by every kernel in this package:

* q/k/v/o/do/dq/dk/dv are (batch, seqlen, heads, head_dim) with the last dimension contiguous, indexed through
  explicit strides. Variable-length batches (``IS_VARLEN``) pass a batch stride of 0 and cumulative sequence
  lengths; sequence ``b`` occupies rows [cu[b], cu[b+1]) of the packed tensor.
* lse / delta are fp32 with element (b, h, i) at ``b * stride_b + h * stride_h + start_b + i`` (batched:
  (B, H, S) contiguous; varlen: (H, total) with stride_b = 0).
* Scores are kept in log2 units (``exp2``); the lse written to memory is natural-log.
* Masks are bottom-right aligned: with ``diag = Sk - Sq``, query i sees key j iff
  ``i + diag - window_left <= j <= i + diag + window_right`` (a bound is absent when its HAS_ flag is off;
  causal is window_right = 0). Keys >= Sk are never visible.
* Tiles are split into "full" tiles, where no mask can apply, and "partial" tiles that pay for it. The loops of
  one phase share one body, selected by a ``MASKED`` constexpr.
"""

import os

import torch
import triton
import triton.language as tl

LOG2E_F = 1.4426950408889634  # python floats, for launchers
LN2_F = 0.6931471805599453
LOG2E = tl.constexpr(LOG2E_F)  # constexpr globals, for kernels
LN2 = tl.constexpr(LN2_F)


def _fast_tanh_ok() -> bool:
    """Hardware tanh (MUFU.TANH) for the softcap of bf16 inputs: compiled kernels only (the interpreter
    cannot run inline PTX); ``TILEATTN_EXACT_TANH=1`` turns it off, ``TILEATTN_FAST_TANH=1`` forces it on."""
    if triton.knobs.runtime.interpret or os.environ.get("TILEATTN_EXACT_TANH") == "1":
        return False
    if os.environ.get("TILEATTN_FAST_TANH") == "1":  # e.g. compiling for a GPU on a machine without one
        return True
    # NVIDIA only (inline PTX); every NVIDIA GPU Triton supports (sm_80+) has it. No capability query here:
    # that would create a CUDA context at import.
    return torch.cuda.is_available() and torch.version.hip is None


FAST_TANH = tl.constexpr(_fast_tanh_ok())  # read once, at import (@triton.jit binds compiled kernels then too)


@triton.jit
def mma(a, b, acc, FP32: tl.constexpr):
    """acc + a @ b with fp32 accumulation; fp32 inputs use exact IEEE products (no TF32)."""
    if FP32:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def load_tile(ptrs, offs_row, n_rows, offs_d, head_dim, CHECK_ROWS: tl.constexpr, EVEN_D: tl.constexpr):
    """Load a [rows, BLOCK_D] tile, zero-filling rows >= n_rows (if CHECK_ROWS) and columns >= head_dim."""
    if CHECK_ROWS:
        if EVEN_D:
            x = tl.load(ptrs, mask=offs_row[:, None] < n_rows, other=0.0)
        else:
            x = tl.load(ptrs, mask=(offs_row[:, None] < n_rows) & (offs_d[None, :] < head_dim), other=0.0)
    else:
        if EVEN_D:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=offs_d[None, :] < head_dim, other=0.0)
    return x


@triton.jit
def store_tile(ptrs, x, offs_row, n_rows, offs_d, head_dim, EVEN_D: tl.constexpr):
    """Store a [rows, BLOCK_D] tile, skipping rows >= n_rows and columns >= head_dim."""
    if EVEN_D:
        tl.store(ptrs, x, mask=offs_row[:, None] < n_rows)
    else:
        tl.store(ptrs, x, mask=(offs_row[:, None] < n_rows) & (offs_d[None, :] < head_dim))


@triton.jit
def residual_unit(o):
    """P = 2^e, the power of two at or below |o| (subnormals and zeros take the smallest normal's, whose ulp they
    share), and 1 / P, from o's bits alone (fp16 or bf16, through its exact fp32 value): the scale of the int8
    residual format (``configs.residual_dtype``), computed alike where it is packed and unpacked. inf / NaN
    outputs get a meaningless scale (their delta is NaN whatever it is)."""
    e32 = o.to(tl.float32).to(tl.int32, bitcast=True) & 0x7F800000  # the fp32 exponent field, in place
    if o.dtype == tl.bfloat16:
        e32 = tl.maximum(e32, 1 << 23)
    else:
        e32 = tl.maximum(e32, 113 << 23)  # fp16's smallest normal, 2^-14
    return e32.to(tl.float32, bitcast=True), ((254 << 23) - e32).to(tl.float32, bitcast=True)


@triton.jit
def residual_store_value(acc, o, R_DTYPE: tl.constexpr):
    """out's rounding residual r = acc - o (acc the fp32 output, o its rounding) in the residual buffer's dtype:
    out's own, or int8 q = round(r / P * 2^(m+8) * 127/128) (P = ``residual_unit``; m = 7 for bf16, 10 for fp16;
    |r| <= half an ulp = P 2^-(m+1), so |q| <= 127; the clamp only guards inf / NaN outputs), or int16: the int8
    format's bytes of columns 2j, 2j + 1 packed low / high (the Gluon epilogue: a thread of the MMA layout holds
    column pairs, and stores 16-bit values where int8 stores into the swizzled layout were byte-wide, NOTES v23a;
    [rows, D] -> [rows, D / 2])."""
    r = acc - o.to(tl.float32)
    if R_DTYPE == tl.int8 or R_DTYPE == tl.int16:
        _, inv = residual_unit(o)  # r * inv first (|r| / P <= 2^-(m+1)): no overflow at tiny P
        if o.dtype == tl.bfloat16:
            x = (r * inv) * 32512.0
        else:
            x = (r * inv) * 260096.0
        x = tl.minimum(tl.maximum(x, -127.0), 127.0)
        # round to nearest (even) by adding 1.5 * 2^23: the sum's low mantissa bits are round(x) in two's
        # complement, and the int32 -> int8 truncation keeps them (no float -> int conversion: quarter rate)
        r = (x + 12582912.0).to(tl.int32, bitcast=True)
        if R_DTYPE == tl.int16:
            lo, hi = tl.split(tl.reshape(r, [r.shape[0], r.shape[1] // 2, 2]))
            r = (lo & 0xFF) | (hi << 8)
    return r.to(R_DTYPE)


@triton.jit
def residual_value(r, o):
    """The fp32 residual from a stored one (``residual_store_value``) and out's stored value o."""
    x = r.to(tl.float32)
    if r.dtype == tl.int8:
        unit, _ = residual_unit(o)
        if o.dtype == tl.bfloat16:
            x = x * unit * (1.0 / 32512.0)
        else:
            x = x * unit * (1.0 / 260096.0)
    return x


@triton.jit
def seq_bounds(CU, b, max_seqlen, IS_VARLEN: tl.constexpr):
    """(start row, length) of sequence b, int32 tensors: from cumulative lengths when varlen, else (0, max_seqlen).

    Kept int32 whatever b's type: derived as b * 0 from the backward's int64 b, they made every mask compare
    and ALiBi distance in the backward 64-bit."""
    if IS_VARLEN:
        start = tl.load(CU + b)
        length = tl.load(CU + b + 1) - start
    else:
        start = tl.full([], 0, tl.int32)
        length = start + max_seqlen
    return start, length


@triton.jit
def visible(rows, cols, seqlen_k, diag, win_left, win_right, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """Mask of (query, key) pairs that may attend. rows/cols are broadcastable 2-D index tensors."""
    mask = cols < seqlen_k
    if HAS_RIGHT:
        mask = mask & (cols <= rows + diag + win_right)
    if HAS_LEFT:
        mask = mask & (cols >= rows + diag - win_left)
    return mask


@triton.jit
def scores(s, rows, cols, diag, qk_scale, softcap, slope,
           HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, IN_DTYPE: tl.constexpr):
    """Raw q.k products -> scores in log2 units, and tanh(...) of the softcap (for its gradient).

    qk_scale is softmax_scale * log2(e) without softcap, softmax_scale / softcap with it; in that case the
    score is softcap * tanh(q.k * scale / softcap) (softcap passed pre-multiplied by log2(e)).
    ALiBi subtracts slope * |i + diag - j| (slope pre-multiplied by log2(e)).
    IN_DTYPE (the inputs' dtype) picks tanh's form: bf16 uses the hardware tanh (one MUFU op, abs. error
    ~5e-4, several times below bf16's own rounding of the scores); fp16 uses exp and an approximate reciprocal
    (fp32-accurate to ~2 ulp, no IEEE-division slow path); fp32 and the interpreter the exact formula. The exact
    form costs three MUFU ops per score (two exp, one reciprocal) where the plain kernel has one: the softcap
    kernels were MUFU-bound (0.68x of plain, NOTES.md).
    """
    if HAS_SOFTCAP:
        x = s * qk_scale
        if FAST_TANH and IN_DTYPE == tl.bfloat16:
            t = tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True,
                                          pack=1)
        elif FAST_TANH and IN_DTYPE == tl.float16:
            t = 1.0 - tl.math.fdiv(2.0, tl.exp(2.0 * x) + 1.0)
        else:
            t = 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)
        s = softcap * t
    else:
        t = s
        s = s * qk_scale
    if HAS_ALIBI:  # positions to fp32 per row / per column (exact below 2^24); per score a float sub and an FMA.
        # The integer form converted every score (I2F, a quarter-rate pipe shared with exp2; int64 in the
        # backward, where b is int64): ALiBi's backward ran at 0.77 of dense (H200, run 13).
        s = s - slope * tl.abs((rows + diag).to(tl.float32) - cols.to(tl.float32))
    return s, t


@triton.jit
def feature_scalars(ALIBI, RNG, b, h, bh, stride_ab, max_seqlen_q, HAS_ALIBI: tl.constexpr,
                    HAS_DROPOUT: tl.constexpr):
    """Per-(batch, q-head) scalars of the optional features: ALiBi slope (log2 units), dropout seed and offset,
    and the dropout row base (b * Hq + h) * max_seqlen_q. Zeros where a feature is off."""
    slope = 0.0
    if HAS_ALIBI:
        slope = tl.load(ALIBI + b * stride_ab + h).to(tl.float32) * LOG2E
    seed = 0
    rng_offset = 0
    if HAS_DROPOUT:
        seed = tl.load(RNG)
        rng_offset = tl.load(RNG + 1)
    row_base = bh.to(tl.int64) * max_seqlen_q
    return slope, seed, rng_offset, row_base


@triton.jit
def dropout_keep(seed, offset, rows, cols, row_base, max_seqlen_k, dropout_p):
    """Philox keep-mask for (query row, key col); row_base = (b * Hq + h) * max_seqlen_q, same in fwd and bwd."""
    idx = ((row_base + rows).to(tl.int64) * max_seqlen_k + cols) + offset
    return tl.rand(seed, idx) >= dropout_p


@triton.jit
def kv_tile_range(start_m, seqlen_k, diag, win_left, win_right, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """Key tiles for the query tile [start_m, start_m + BLOCK_M).

    Returns (lo, full_lo, full_hi, hi): tiles starting in [lo, full_lo) and [full_hi, hi) need the mask,
    tiles in [full_lo, full_hi) are visible to every row; lo, full_lo, full_hi are multiples of BLOCK_N.
    """
    hi = seqlen_k
    lo = 0
    full_lo = 0
    full_hi = seqlen_k // BLOCK_N * BLOCK_N
    if HAS_RIGHT:  # last row sees keys <= start_m + BLOCK_M - 1 + diag + right; first row <= start_m + diag + right
        hi = tl.maximum(tl.minimum(hi, start_m + BLOCK_M + diag + win_right), 0)
        full_hi = tl.minimum(full_hi, tl.maximum(start_m + diag + win_right + 1, 0) // BLOCK_N * BLOCK_N)
    if HAS_LEFT:  # first row sees keys >= start_m + diag - left; last row >= start_m + BLOCK_M - 1 + diag - left
        lo = tl.maximum(start_m + diag - win_left, 0) // BLOCK_N * BLOCK_N
        full_lo = tl.cdiv(tl.maximum(start_m + BLOCK_M - 1 + diag - win_left, 0), BLOCK_N) * BLOCK_N
    hi_tiles = tl.cdiv(hi, BLOCK_N) * BLOCK_N
    full_lo = tl.minimum(full_lo, hi_tiles)
    full_hi = tl.minimum(tl.maximum(full_hi, full_lo), hi_tiles)
    return lo, full_lo, full_hi, hi


@triton.jit
def q_tile_range(start_n, seqlen_q, diag, win_left, win_right, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """Query tiles for the key tile [start_n, start_n + BLOCK_N) (backward dK/dV); same contract as
    ``kv_tile_range`` with BLOCK_M steps. Rows >= seqlen_q need no mask: their lse is loaded as +inf."""
    lo = 0
    hi = seqlen_q
    full_lo = 0
    full_hi = tl.cdiv(seqlen_q, BLOCK_M) * BLOCK_M
    if HAS_RIGHT:  # row i sees key j iff i >= j - diag - right
        lo = tl.maximum(start_n - diag - win_right, 0) // BLOCK_M * BLOCK_M
        full_lo = tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - diag - win_right, 0), BLOCK_M) * BLOCK_M
    if HAS_LEFT:  # row i sees key j iff i <= j - diag + left
        hi = tl.minimum(tl.maximum(start_n + BLOCK_N - diag + win_left, 0), seqlen_q)
        full_hi = tl.minimum(full_hi, tl.maximum(start_n - diag + win_left + 1, 0) // BLOCK_M * BLOCK_M)
    hi_tiles = tl.cdiv(hi, BLOCK_M) * BLOCK_M
    full_lo = tl.minimum(full_lo, hi_tiles)
    full_hi = tl.minimum(tl.maximum(full_hi, full_lo), hi_tiles)
    return lo, full_lo, full_hi, hi


@triton.jit
def stats_row0(b, q_start, max_seqlen_q, IS_VARLEN: tl.constexpr):
    """Where sequence b's rows start in the row-stats buffer (``backward._row_stats_buffer``): 16 * (b + first // 16)
    with ``first`` its first packed row (b * seqlen when batched), a multiple of 16 (aligned vector loads), and
    each sequence's slot is longer than the sequence (16 + 16 * (floor(next / 16) - floor(first / 16)) > len)."""
    first = b * max_seqlen_q
    if IS_VARLEN:
        first = q_start
    return tl.multiple_of(16 * (b + first // 16), 16)


@triton.jit
def global_ns():
    """The GPU's global nanosecond timer (%globaltimer, one clock on every SM), an int64 scalar (program traces:
    ``benchmarks/decode_trace.py``; the Gluon kernels' twin is ``gluon_common.global_ns``)."""
    return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False, pack=1)


@triton.jit
def trace_program3(TRACE, t_start, work):
    """A program trace of a 3-D grid: program (x, y, z) writes (start ns, end ns, SM id, work) to TRACE[4 p ..
    4 p + 3] (int64), p its linear index x-major, the end read now (``benchmarks/decode_trace.py``)."""
    t_end = global_ns()
    sm = tl.inline_asm_elementwise("mov.u32 $0, %smid;", "=r", [], dtype=tl.int32, is_pure=True, pack=1)
    p = (tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)) * tl.num_programs(2) + tl.program_id(2)
    row = TRACE + p.to(tl.int64) * 4
    tl.store(row, t_start)
    tl.store(row + 1, t_end)
    tl.store(row + 2, sm.to(tl.int64))
    tl.store(row + 3, work.to(tl.int64))
