"""The fused Hopper backward's dQ accumulator (opt-in ``TILEATTN_GLUON_BWD_FUSED=1``; session 23's v28a).

In the fused form the Gluon dK/dV kernel (``gluon_backward.py``) also computes dQ: each program (128 keys) adds its
share of every query tile's dQ^T = K^T dS^T into one fp32 accumulator by TMA reduce-adds, so the backward runs five
matmuls instead of the two-kernel form's seven (the dQ kernel recomputes S and dP). Around it:

1. the portable dQ kernel in its stats-only form (``backward._bwd_dq_kernel``'s STATS_ONLY) writes the row
   statistics (lse in log2 units, delta) and zeroes the accumulator's rows of its query tile;
2. the dK/dV kernel with FUSED_DQ adds into the accumulator;
3. ``convert`` writes dq = accumulator^T * softmax_scale in the input dtype.

All three are Triton launches, so launch plans replay them (``plans.backward_call``; the accumulator is one of the
backward's buffers). The adds of different programs into one dQ tile land in whatever order the hardware runs
them: fp32 sums in another order round differently, so this form is not bit-reproducible run to run (the
two-kernel default is), hence opt-in.

Accumulator layout: (B * Hq * D, S4) fp32 with S4 = Sq rounded up to 4 (16-byte rows for TMA); row (b * Hq + h) *
D + d holds dQ[b, :, h, d] / softmax_scale over the first Sq columns. Extra memory: 4 * B * Hq * D * S4 bytes
(twice a bf16 dq), O(batch * heads * seqlen).
"""

import torch
import triton
import triton.language as tl

from .. import configs
from .launch import launch


def enabled(q: torch.Tensor, p) -> bool:
    """Whether ``TILEATTN_GLUON_BWD_FUSED=1`` asks for the fused backward and the call is of its scope's shape:
    batched (not varlen) fp16/bf16 on a GPU, Dqk = Dv in (64, 128). The Gluon backward's own scope
    (``gluon_backward.fused_applies``) is checked when the kernels launch; outside it the two-kernel path runs."""
    value = configs.getenv("TILEATTN_GLUON_BWD_FUSED", "0")
    if value not in ("0", "1"):
        raise ValueError(f"TILEATTN_GLUON_BWD_FUSED must be 0 or 1, got {value!r}")
    return (value == "1" and q.is_cuda and not p.varlen and q.dtype in (torch.float16, torch.bfloat16)
            and q.shape[3] in (64, 128))


def accumulator(q: torch.Tensor) -> torch.Tensor:
    """An uninitialised (B * Hq * D, S4) fp32 accumulator for q (B, Sq, Hq, D); the stats-only pass zeroes it."""
    batch, seqlen, heads, d = q.shape
    return torch.empty((batch * heads * d, triton.cdiv(seqlen, 4) * 4), dtype=torch.float32, device=q.device)


def described(acc: torch.Tensor, seqlen: int) -> torch.Tensor:
    """The accumulator's first ``seqlen`` columns (what TMA may touch: its boxes are clipped there)."""
    return acc[:, :seqlen]


@triton.jit
def _convert_kernel(ACC, DQ, stride_acc, stride_dqb, stride_dqs, stride_dqh, q_heads, seqlen, sm_scale,
                    HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """dq[b, rows, h, :] = ACC[(b * q_heads + h) * HEAD_D + d, rows] * sm_scale, in dq's dtype."""
    bh = tl.program_id(1)
    b = bh // q_heads
    h = bh % q_heads
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, HEAD_D)
    mask = rows[:, None] < seqlen
    acc = tl.load(ACC + (bh.to(tl.int64) * HEAD_D + d[None, :]) * stride_acc + rows[:, None], mask=mask)
    tl.store(DQ + b.to(tl.int64) * stride_dqb + h * stride_dqh + rows[:, None].to(tl.int64) * stride_dqs + d[None, :],
             (acc * sm_scale).to(DQ.dtype.element_ty), mask=mask)


def convert(acc: torch.Tensor, dq: torch.Tensor, sm_scale: float) -> None:
    """Write dq (B, Sq, Hq, D), last stride 1, from the accumulator (``accumulator``'s layout)."""
    batch, seqlen, heads, d = dq.shape
    block_m = 64
    launch(_convert_kernel, (triton.cdiv(seqlen, block_m), batch * heads),
           (acc, dq, acc.stride(0), dq.stride(0), dq.stride(1), dq.stride(2), heads, seqlen, sm_scale),
           dict(HEAD_D=d, BLOCK_M=block_m), 4, 1)
