"""Shared ``@triton.jit`` helpers for the forward and backward kernels.

Conventions used by every kernel in this package:

* Tensors are indexed through explicit strides; q/k/v/o/do/dq/dk/dv are (batch, seqlen, heads, head_dim)
  with the last dimension contiguous, lse and delta are fp32 (batch, q_heads, seqlen_q) contiguous.
* Scores are kept in log2 units: ``s2 = (q . k) * softmax_scale * log2(e)``, so the kernels use ``exp2``.
  The lse written to memory is the natural-log value ``ln(sum_j exp(scale * q.k_j))``.
* Causal masking is bottom-right aligned: query ``i`` sees key ``j`` iff ``j <= i + (Sk - Sq)``.
* Tiles are split into "full" tiles, where no mask can apply (no causal cut, no key beyond ``Sk``), and
  "partial" tiles that pay for the mask. The two loops share one body, selected by a ``MASKED`` constexpr.
"""

import triton
import triton.language as tl

LOG2E_F = 1.4426950408889634  # python floats, for launchers
LN2_F = 0.6931471805599453
LOG2E = tl.constexpr(LOG2E_F)  # constexpr globals, for kernels
LN2 = tl.constexpr(LN2_F)


@triton.jit
def mma(a, b, acc, FP32: tl.constexpr):
    """acc + a @ b with fp32 accumulation; fp32 inputs use exact IEEE products (no TF32)."""
    if FP32:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def load_tile(ptrs, offs_row, n_rows, offs_d, head_dim, CHECK_ROWS: tl.constexpr,
              EVEN_D: tl.constexpr):
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
def visible(offs_m, offs_n, seqlen_k, diag_offset, CAUSAL: tl.constexpr):
    """[BLOCK_M, BLOCK_N] mask of (query, key) pairs that may attend: key in range, and causal cut."""
    mask = offs_n[None, :] < seqlen_k
    if CAUSAL:
        mask = mask & (offs_n[None, :] <= offs_m[:, None] + diag_offset)
    return mask


@triton.jit
def kv_tile_bounds(start_m, seqlen_k, diag_offset, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   CAUSAL: tl.constexpr):
    """Key range for the query tile [start_m, start_m + BLOCK_M).

    Returns (full_end, hi): key tiles starting in [0, full_end) are entirely visible to every row of the
    tile (no mask needed); tiles starting in [full_end, hi) need the mask; keys >= hi are never loaded.
    full_end is a multiple of BLOCK_N.
    """
    if CAUSAL:
        # The last row of the tile sees keys < start_m + BLOCK_M + diag_offset; the first row sees
        # keys < start_m + 1 + diag_offset.
        hi = tl.minimum(seqlen_k, start_m + BLOCK_M + diag_offset)
        hi = tl.maximum(hi, 0)
        full_end = tl.minimum(seqlen_k, start_m + 1 + diag_offset)
        full_end = tl.maximum(full_end, 0) // BLOCK_N * BLOCK_N
    else:
        hi = seqlen_k
        full_end = seqlen_k // BLOCK_N * BLOCK_N
    return full_end, hi


@triton.jit
def q_tile_bounds(start_n, seqlen_q, diag_offset, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  CAUSAL: tl.constexpr):
    """Query range for the key tile [start_n, start_n + BLOCK_N) (backward dK/dV).

    Returns (lo, full_start): query tiles starting in [lo, full_start) need the causal mask; tiles starting
    in [full_start, seqlen_q) see every key of the tile. Rows >= seqlen_q are neutralised by data (their
    lse is loaded as +inf, so their probabilities are 0), so no bound mask is needed for them.
    """
    if CAUSAL:
        q_end = tl.cdiv(seqlen_q, BLOCK_M) * BLOCK_M
        # Row i sees key j iff i >= j - diag_offset.
        lo = tl.maximum(start_n - diag_offset, 0) // BLOCK_M * BLOCK_M
        full_start = tl.maximum(start_n + BLOCK_N - 1 - diag_offset, 0)
        full_start = tl.minimum(tl.cdiv(full_start, BLOCK_M) * BLOCK_M, q_end)
        lo = tl.minimum(lo, full_start)
    else:
        lo = 0
        full_start = 0
    return lo, full_start
