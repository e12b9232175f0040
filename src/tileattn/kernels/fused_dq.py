"""The fused Hopper backward's dQ accumulator (opt-in ``TILEATTN_GLUON_BWD_FUSED=1``; session 23's v28a).

In the fused form the Gluon dK/dV kernel (``gluon_backward.py``) also computes dQ: each program (128 keys) adds its
share of every query tile's dQ^T = K^T dS^T into one fp32 accumulator by TMA reduce-adds, so the backward runs five
matmuls instead of the two-kernel form's seven (the dQ kernel recomputes S and dP). Around it:

1. the portable dQ kernel in its stats-only form (``backward._bwd_dq_kernel``'s STATS_ONLY) writes the row
   statistics (lse in log2 units, delta) and zeroes the accumulator's rows of its query tile;
2. the dK/dV kernel with FUSED_DQ adds into the accumulator (its dQ steps, ``issue_dq`` and ``stage_dq_step``,
   are here);
3. ``convert`` writes dq = accumulator^T * softmax_scale in the input dtype.

All three are Triton launches, so launch plans replay them (``plans.backward_call``; the accumulator is one of the
backward's buffers). The adds of different programs into one dQ tile land in whatever order the hardware runs
them: fp32 sums in another order round differently, so this form is not bit-reproducible run to run (the
two-kernel default is), hence opt-in.

Accumulator layout: (B * Hq * D, S4) fp32 with S4 = Sq rounded up to 4 (16-byte rows for TMA); row (b * Hq + h) *
D + d holds dQ[b, :, h, d] / softmax_scale over the first Sq columns. Extra memory: 4 * B * Hq * D * S4 bytes
(twice a bf16 dq), O(batch * heads * seqlen).
"""

import functools

import torch
import triton
import triton.language as tl

from .. import configs
from .gluon_common import AVAILABLE
from .launch import host_descriptor, launch

if AVAILABLE:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma, warpgroup_mma
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor as GluonTensorDescriptor
    from .gluon_common import tma_reduce_add

    # The dK/dV kernel's dQ steps (gluon_backward._dkdv_consumer with FUSED_DQ)
    @gluon.jit
    def stage_dq_step(ds, dqt, ds_slots, ds_ready, ds_free, dq_slots, dq_desc, w: gl.constexpr, t, n_m, m_lo,
                      row0, HEAD_D: gl.constexpr, EXCHANGE: gl.constexpr, STAGE_DS: gl.constexpr,
                      STAGE_DQ: gl.constexpr):
        """FUSED_DQ, behind one fence and one barrier per step: STAGE_DS, this warpgroup's dS^T of step t into its
        slot (EXCHANGE, D=128: slot (t % 2, w) once both warpgroups' dQ^T products of step t - 2 have read it, then
        announced; D=64: slot w, read by its own product of step t - 1 already); STAGE_DQ, step t - 1's dQ^T share
        (HALF_N rows of D, BLOCK_M queries, fp32) into staging slot (t - 1) % SLOTS, then reduce-added into the
        accumulator (``fused_dq``; ``row0``: its row of the group's first query head plus this warpgroup's D
        offset). A staging slot is rewritten only after the add that last read it: the issuing thread waits for
        all but the last SLOTS - 2 adds before the barrier, so that at step t + 1 the add of step t + 1 - SLOTS
        is done (session 23: separate barriers for the dQ^T stage cost the D=128 kernel ~0.4 µs per step)."""
        if STAGE_DQ:
            SLOTS: gl.constexpr = dq_slots.shape[0] // 2
            tma.store_wait(pendings=SLOTS - 2)
            dq_slot = dq_slots.index(SLOTS * w + (t - 1) % SLOTS)
            dq_slot.store(dqt)
        if STAGE_DS:
            if EXCHANGE:
                mbarrier.wait(ds_free.index(t % 2), ((t // 2) & 1) ^ 1)
                ds_slots.index(2 * (t % 2) + w).store(ds)
            else:
                ds_slots.index(w).store(ds)
        fence_async_shared()
        gl.thread_barrier()
        if STAGE_DS and EXCHANGE:
            mbarrier.arrive(ds_ready.index(t % 2), count=1)
        if STAGE_DQ:
            BLOCK_M: gl.constexpr = dq_slots.shape[2]
            g = (t - 1) // n_m
            tma_reduce_add(dq_desc, [row0 + g * HEAD_D, (m_lo + t - 1 - g * n_m) * BLOCK_M], dq_slot)

    @gluon.jit
    def issue_dq(k_lo, k_hi, ds_slots, ds_ready, acc, w: gl.constexpr, t, EXCHANGE: gl.constexpr):
        """FUSED_DQ: dQ^T = K^T dS^T of step t, asynchronous (returns the token; ``acc`` a tile of the result's
        shape and layout, not read). EXCHANGE: this warpgroup's half of D over both warpgroups' keys (two
        products); else its own keys' share of all of D (one product)."""
        if EXCHANGE:
            mbarrier.wait(ds_ready.index(t % 2), (t // 2) & 1)
            tok = warpgroup_mma(k_lo, ds_slots.index(2 * (t % 2)), acc, use_acc=False, is_async=True)
            tok = warpgroup_mma(k_hi, ds_slots.index(2 * (t % 2) + 1), tok, is_async=True)
        else:
            tok = warpgroup_mma(k_lo, ds_slots.index(w), acc, use_acc=False, is_async=True)
        return tok


def enabled(q: torch.Tensor, p) -> bool:
    """Whether ``TILEATTN_GLUON_BWD_FUSED=1`` asks for the fused backward and the call is of its scope's shape:
    batched (not varlen) fp16/bf16 on a GPU, Dqk = Dv in (64, 128), at D=64 without softcap or ALiBi (their fused
    kernels spill 192-364 B at 168 registers, ptxas sm_90a; D=128's features up to 100 B; v28c's order spills
    none). Then the backward makes the accumulator; the Gluon backward's own scope (``gluon_backward.applies`` and
    ``applies_to``) is checked when the kernels launch, and outside it the two-kernel path runs."""
    return (configs.switch("TILEATTN_GLUON_BWD_FUSED") and q.is_cuda and not p.varlen
            and q.dtype in (torch.float16, torch.bfloat16) and q.shape[3] in (64, 128)
            and (q.shape[3] == 128 or (p.softcap == 0 and p.alibi_slopes is None)))


def accumulator(q: torch.Tensor) -> torch.Tensor:
    """An uninitialised (B * Hq * D, S4) fp32 accumulator for q (B, Sq, Hq, D); the stats-only pass zeroes it."""
    batch, seqlen, heads, d = q.shape
    return torch.empty((batch * heads * d, triton.cdiv(seqlen, 4) * 4), dtype=torch.float32, device=q.device)


def described(acc: torch.Tensor, seqlen: int) -> torch.Tensor:
    """The accumulator's first ``seqlen`` columns (what TMA may touch: its boxes are clipped there)."""
    return acc[:, :seqlen]


def applies_to(cfg) -> bool:
    """Whether a call ``gluon_backward.applies`` accepted (``cfg``, its ``configs.GluonBackwardConfig``), and whose
    shape ``enabled`` took (it made the accumulator), can take the fused backward: the dK/dV kernel's config is
    the pipelined 128-key one."""
    return cfg.pipeline and not cfg.split


def slots(head_dim: int) -> int:
    """FUSED_DQ's value: dQ^T staging slots per consumer warpgroup, ``TILEATTN_FUSED_DQ_SLOTS`` (2 or 4; 4 only at
    D=128, whose shared memory has room: 215 KB; default 4 there, 2 at D=64)."""
    value = configs.getenv("TILEATTN_FUSED_DQ_SLOTS", "")
    if value not in ("", "2", "4"):
        raise ValueError(f"TILEATTN_FUSED_DQ_SLOTS must be 2 or 4, got {value!r}")
    return 4 if head_dim == 128 and value != "2" else 2


def kernel_flags(head_dim: int) -> dict:
    """The dK/dV kernel's constexprs for the fused backward: FUSED_DQ (``slots``) and, with
    ``TILEATTN_FUSED_DQ_EARLY=1`` (v28c; run 137: slower than the default order), EARLY_DQ."""
    return dict(FUSED_DQ=slots(head_dim), **({"EARLY_DQ": True} if configs.switch("TILEATTN_FUSED_DQ_EARLY") else {}))


@functools.lru_cache(maxsize=None)
def _acc_layout(rows: int, cols: int):
    """Shared layout of a dQ^T box of the accumulator: (rows, cols) fp32, TMA's default swizzle."""
    return gl.NVMMASharedLayout.get_default_for([rows, cols], gl.float32)


def descriptor(acc: torch.Tensor, seqlen: int, rows: int, cols: int):
    """The dK/dV kernel's TMA descriptor of the accumulator (``described``), boxes of ``rows`` (D) x ``cols``
    (queries)."""
    return host_descriptor(GluonTensorDescriptor, described(acc, seqlen), (rows, cols), layout=_acc_layout(rows, cols))


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
