"""The fused Hopper backward's dQ accumulator (opt-in ``TILEATTN_GLUON_BWD_FUSED=1``; session 23's v28a).

In the fused form the Gluon dK/dV kernel (``gluon_backward.py``) also computes dQ: each program (128 keys) adds its
share of every query tile's dQ^T = K^T dS^T into one fp32 accumulator by TMA reduce-adds, so the backward runs five
matmuls instead of the two-kernel form's seven (the dQ kernel recomputes S and dP). Around it:

1. the portable dQ kernel in its stats-only form (``backward._bwd_dq_kernel``'s STATS_ONLY) writes the row
   statistics (lse in log2 units, delta) and zeroes the accumulator's rows of its query tile;
2. the dK/dV kernel with FUSED_DQ adds into the accumulator (its dQ steps, ``issue_dq`` and ``stage_dq_step``,
   are here);
3. ``convert`` writes dq = accumulator^T * softmax_scale in the input dtype.

v39a (``TILEATTN_GLUON_BWD_FUSED=int``, session 31, not yet GPU-run): a bit-reproducible form. The accumulator is
int64 fixed point: ``_scale_kernel`` (before the dK/dV kernel) bounds every partial sum of each query head's
dQ^T = K^T dS^T, |sum_j dS_ij K_jd| <= (2 |dO_i| max_j |V_j| + |dlse_i|) max |K| (sum_j P_ij <= 1, |dP_ij| <=
|dO_i| |V_j|, |delta_i| <= |dO_i| |O_i| <= |dO_i| max_j |V_j|; softcap's factor is <= 1), and stores the power of two
2^e that maps the head's bound below 2^61 (in the row-stats buffer's third plane); the dK/dV kernel adds
round-toward-zero(dQ^T share * 2^e) as int64 (TMA reduce-add on a u64 tensor map: two's complement addition),
and integer sums do not depend on the order of the adds, so dq is the same bits on every run. ``convert`` scales
back by softmax_scale / 2^e. Resolution 2^-61 of the head's bound per add (fp32 keeps 2^-24 of each value); twice
the accumulator memory of the fp32 form and two staging slots per warpgroup (D=64: a two-stage Q / dO ring) to
fit shared memory.

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
from .common import stats_row0
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
                      row0, dq_scale, HEAD_D: gl.constexpr, EXCHANGE: gl.constexpr, STAGE_DS: gl.constexpr,
                      STAGE_DQ: gl.constexpr):
        """FUSED_DQ, behind one fence and one barrier per step: STAGE_DS, this warpgroup's dS^T of step t into its
        slot (EXCHANGE, D=128: slot (t % 2, w) once both warpgroups' dQ^T products of step t - 2 have read it, then
        announced; D=64: slot w, read by its own product of step t - 1 already); STAGE_DQ, step t - 1's dQ^T share
        (HALF_N rows of D, BLOCK_M queries, fp32) into staging slot (t - 1) % SLOTS, then reduce-added into the
        accumulator (``fused_dq``; ``row0``: its row of the group's first query head plus this warpgroup's D
        offset). A staging slot is rewritten only after the add that last read it: the issuing thread waits for
        all but the last SLOTS - 2 adds before the barrier, so that at step t + 1 the add of step t + 1 - SLOTS
        is done (session 23: separate barriers for the dQ^T stage cost the D=128 kernel ~0.4 µs per step).
        uint64 slots (v39a): the share times its query head's 2^e (``dq_scale``: (pointer to the group's first
        head's scale, the heads' stride); ``_scale_kernel``), rounded toward zero to int64, its bits as uint64."""
        if STAGE_DQ:
            SLOTS: gl.constexpr = dq_slots.shape[0] // 2
            tma.store_wait(pendings=SLOTS - 2)
            dq_slot = dq_slots.index(SLOTS * w + (t - 1) % SLOTS)
            if dq_slots.dtype == gl.uint64:
                scale_ptr, scale_stride = dq_scale
                fixed = (dqt * gl.load(scale_ptr + ((t - 1) // n_m) * scale_stride)).to(gl.int64)
                dq_slot.store(fixed.to(gl.uint64, bitcast=True))
            else:
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


def mode() -> str:
    """``TILEATTN_GLUON_BWD_FUSED``: "0" (unset: the two-kernel backward), "1" (the fused backward, fp32 adds in
    any order) or "int" (v39a: int64 fixed-point adds, bit-reproducible)."""
    return configs.choice("TILEATTN_GLUON_BWD_FUSED", ("0", "1", "int"), "0")


def integer() -> bool:
    """Whether the fused backward accumulates in int64 fixed point (v39a, ``TILEATTN_GLUON_BWD_FUSED=int``)."""
    return mode() == "int"


def enabled(q: torch.Tensor, p) -> bool:
    """Whether ``TILEATTN_GLUON_BWD_FUSED=1`` (or ``int``) asks for the fused backward and the call is of its scope:
    batched (not varlen) fp16/bf16 on a GPU, Dqk = Dv in (64, 128), at D=64 without softcap or ALiBi (their fused
    kernels spill 192-364 B at 168 registers, ptxas sm_90a; D=128's features up to 100 B; v28c's order spills
    none). Then the backward makes the accumulator; the Gluon backward's own scope (``gluon_backward.applies`` and
    ``applies_to``) is checked when the kernels launch, and outside it the two-kernel path runs."""
    return (mode() != "0" and q.is_cuda and not p.varlen
            and q.dtype in (torch.float16, torch.bfloat16) and q.shape[3] in (64, 128)
            and (q.shape[3] == 128 or (p.softcap == 0 and p.alibi_slopes is None)))


def accumulator(q: torch.Tensor) -> torch.Tensor:
    """An uninitialised (B * Hq * D, S4) fp32 accumulator for q (B, Sq, Hq, D), int64 with v39a (``integer``); the
    stats-only pass zeroes it."""
    batch, seqlen, heads, d = q.shape
    return torch.empty((batch * heads * d, triton.cdiv(seqlen, 4) * 4),
                       dtype=torch.int64 if integer() else torch.float32, device=q.device)


def described(acc: torch.Tensor, seqlen: int) -> torch.Tensor:
    """The accumulator's first ``seqlen`` columns (what TMA may touch: its boxes are clipped there)."""
    return acc[:, :seqlen]


def applies_to(cfg) -> bool:
    """Whether a call ``gluon_backward.applies`` accepted (``cfg``, its ``configs.GluonBackwardConfig``), and whose
    shape ``enabled`` took (it made the accumulator), can take the fused backward: the dK/dV kernel's config is
    the pipelined 128-key one."""
    return cfg.pipeline and not cfg.split


def slots(head_dim: int, int64: bool = None) -> int:
    """FUSED_DQ's value: dQ^T staging slots per consumer warpgroup, ``TILEATTN_FUSED_DQ_SLOTS`` (2 or 4; 4 only at
    D=128, whose shared memory has room: 215 KB; default 4 there, 2 at D=64; v39a's int64 slots: 2). ``int64``:
    v39a's form or not (None: as the knob says, ``integer``)."""
    value = configs.getenv("TILEATTN_FUSED_DQ_SLOTS", "")
    if value not in ("", "2", "4"):
        raise ValueError(f"TILEATTN_FUSED_DQ_SLOTS must be 2 or 4, got {value!r}")
    if int64 is None:
        int64 = integer()
    return 4 if head_dim == 128 and value != "2" and not int64 else 2


def kernel_flags(head_dim: int, int64: bool = None) -> dict:
    """The dK/dV kernel's constexprs for the fused backward: FUSED_DQ (``slots``; ``int64`` as there) and, with
    ``TILEATTN_FUSED_DQ_EARLY=1`` (v28c; run 137: slower than the default order), EARLY_DQ."""
    return dict(FUSED_DQ=slots(head_dim, int64),
                **({"EARLY_DQ": True} if configs.switch("TILEATTN_FUSED_DQ_EARLY") else {}))


@functools.lru_cache(maxsize=None)
def _acc_layout(rows: int, cols: int, integer: bool = False):
    """Shared layout of a dQ^T box of the accumulator: (rows, cols) fp32 (uint64: v39a), TMA's default swizzle."""
    return gl.NVMMASharedLayout.get_default_for([rows, cols], gl.uint64 if integer else gl.float32)


def descriptor(acc: torch.Tensor, seqlen: int, rows: int, cols: int):
    """The dK/dV kernel's TMA descriptor of the accumulator (``described``), boxes of ``rows`` (D) x ``cols``
    (queries). An int64 accumulator (v39a) is described as uint64: TMA's reduce-add takes u64 but not s64 (an
    INT64 tensor map with ``.add`` is an illegal instruction on sm_90, run 189), and two's complement sums are
    the same bits either way."""
    integer = acc.dtype == torch.int64
    return host_descriptor(GluonTensorDescriptor, described(acc.view(torch.uint64) if integer else acc, seqlen),
                           (rows, cols), layout=_acc_layout(rows, cols, integer))


@triton.jit
def _convert_kernel(ACC, DQ, STATS, stride_acc, stride_dqb, stride_dqs, stride_dqh, stride_sh, stride_st, q_heads,
                    seqlen, sm_scale, HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr, INTEGER: tl.constexpr = False):
    """dq[b, rows, h, :] = ACC[(b * q_heads + h) * HEAD_D + d, rows] * sm_scale, in dq's dtype; INTEGER (v39a): ACC
    holds int64 fixed point, divided by the head's 2^e (``_scale_kernel``'s, in STATS' third plane)."""
    bh = tl.program_id(1)
    b = bh // q_heads
    h = bh % q_heads
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, HEAD_D)
    mask = rows[:, None] < seqlen
    acc = tl.load(ACC + (bh.to(tl.int64) * HEAD_D + d[None, :]) * stride_acc + rows[:, None], mask=mask)
    scale = sm_scale
    if INTEGER:
        scale = sm_scale / tl.load(STATS + 2 * stride_st + h * stride_sh + stats_row0(b, 0, seqlen, False))
        acc = acc.to(tl.float32)
    tl.store(DQ + b.to(tl.int64) * stride_dqb + h * stride_dqh + rows[:, None].to(tl.int64) * stride_dqs + d[None, :],
             (acc * scale).to(DQ.dtype.element_ty), mask=mask)


def convert(acc: torch.Tensor, dq: torch.Tensor, sm_scale: float, stats: torch.Tensor) -> None:
    """Write dq (B, Sq, Hq, D), last stride 1, from the accumulator (``accumulator``'s layout; an int64 one with
    its scales in ``stats``, the backward's row-stats buffer: v39a)."""
    batch, seqlen, heads, d = dq.shape
    block_m = 64
    sts = stats.stride()
    launch(_convert_kernel, (triton.cdiv(seqlen, block_m), batch * heads),
           (acc, dq, stats, acc.stride(0), dq.stride(0), dq.stride(1), dq.stride(2), sts[1], sts[0], heads, seqlen,
            sm_scale), dict(HEAD_D=d, BLOCK_M=block_m, **({"INTEGER": True} if acc.dtype == torch.int64 else {})),
           4, 1)


@triton.jit
def _scale_kernel(K, V, DO, DLSE, STATS, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                  stride_dob, stride_dos, stride_doh, stride_lb, stride_lh, stride_sh, stride_st, kv_heads, group,
                  seqlen_q, seqlen_k, HEAD_D: tl.constexpr, BLOCK: tl.constexpr, HAS_DLSE: tl.constexpr):
    """v39a: one program per (batch, KV head): max |K|, max_j |V_j| (row norms) over the head's keys, then for
    each query head of its group max_i |dO_i| (and max |dlse_i|), the bound (2 |dO| |V| + |dlse|) |K| of every
    partial dQ^T sum, and the power of two 2^e, e = 60 - floor(log2 bound) (within fp32's normal range), that maps
    it below 2^61; written to STATS[2, h, ``stats_row0``] (``backward._row_stats_buffer``'s third plane, where
    the stats of the sequence's first row sit in the other two). A zero bound gives 2^126 (every
    add is zero), a non-finite one NaN (so dq is NaN, as the inputs)."""
    pid = tl.program_id(0)
    b = pid // kv_heads
    hk = pid % kv_heads
    d = tl.arange(0, HEAD_D)
    kmax = 0.0
    vmax2 = 0.0
    poison = 0.0  # NaN once any input is NaN or infinite (the maxima skip NaNs)
    for start in range(0, seqlen_k, BLOCK):
        rows = start + tl.arange(0, BLOCK)
        ok = rows[:, None] < seqlen_k
        k = tl.load(K + b.to(tl.int64) * stride_kb + hk * stride_kh + rows[:, None].to(tl.int64) * stride_ks
                    + d[None, :], mask=ok, other=0.0).to(tl.float32)
        v = tl.load(V + b.to(tl.int64) * stride_vb + hk * stride_vh + rows[:, None].to(tl.int64) * stride_vs
                    + d[None, :], mask=ok, other=0.0).to(tl.float32)
        kmax = tl.maximum(kmax, tl.max(tl.max(tl.abs(k), 1), 0))
        vmax2 = tl.maximum(vmax2, tl.max(tl.sum(v * v, 1), 0))
        poison += tl.sum(tl.sum(k * 0.0 + v * 0.0, 1), 0)
    for g in range(group):
        h = hk * group + g
        dmax2 = 0.0
        lmax = 0.0
        bad = poison
        for start in range(0, seqlen_q, BLOCK):
            rows = start + tl.arange(0, BLOCK)
            do = tl.load(DO + b.to(tl.int64) * stride_dob + h * stride_doh + rows[:, None].to(tl.int64) * stride_dos
                         + d[None, :], mask=rows[:, None] < seqlen_q, other=0.0).to(tl.float32)
            dmax2 = tl.maximum(dmax2, tl.max(tl.sum(do * do, 1), 0))
            bad += tl.sum(tl.sum(do * 0.0, 1), 0)
            if HAS_DLSE:
                dl = tl.load(DLSE + b * stride_lb + h.to(tl.int64) * stride_lh + rows, mask=rows < seqlen_q,
                             other=0.0)
                lmax = tl.maximum(lmax, tl.max(tl.abs(dl), 0))
                bad += tl.sum(dl * 0.0, 0)
        bound = (2.0 * tl.sqrt(dmax2) * tl.sqrt(vmax2) + lmax) * kmax + bad
        biased = (bound.to(tl.int32, bitcast=True) >> 23) & 0xFF  # floor(log2 bound) + 127 (normal bounds)
        e = tl.minimum(tl.maximum(60 - (biased - 127), -126), 126)
        scale = ((e + 127) << 23).to(tl.float32, bitcast=True)
        scale = tl.where(biased == 0xFF, float("nan"), scale)
        tl.store(STATS + 2 * stride_st + h * stride_sh + stats_row0(b, 0, seqlen_q, False), scale)


def scales(q, k, v, dout, dlse, stats) -> None:
    """v39a: write each (batch, query head)'s fixed-point scale 2^e into the row-stats buffer's third plane
    (``_scale_kernel``; q / k / v / dout (B, S, H, D) batched, dlse fp32 (B, Hq, Sq) or None)."""
    batch, seqlen_q, q_heads, d = q.shape
    seqlen_k, kv_heads = k.shape[1], k.shape[2]
    ks, vs, ds, sts = k.stride(), v.stride(), dout.stride(), stats.stride()
    launch(_scale_kernel, (batch * kv_heads, ), (
        k, v, dout, dlse if dlse is not None else stats, stats, ks[0], ks[1], ks[2], vs[0], vs[1], vs[2], ds[0],
        ds[1], ds[2], q_heads * seqlen_q, seqlen_q, sts[1], sts[0], kv_heads, q_heads // kv_heads, seqlen_q,
        seqlen_k), dict(HEAD_D=d, BLOCK=64, HAS_DLSE=dlse is not None), 4, 1)
