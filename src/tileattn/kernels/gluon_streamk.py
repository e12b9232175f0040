"""Stream-K ranges for the persistent Gluon forward (opt-in ``TILEATTN_GLUON_FWD_STREAMK=1``; session 32, not yet
GPU-run; NOTES "Design sketch: stream-K ranges").

Batched non-causal calls give every work item (a query tile of one (batch, head)) the same n key tiles, and the
grid's items rarely divide among the programs (the benchmark grid: 2048 items on 132 SMs, 15.52 each, so 16
rounds with 3% of the slots idle). With STREAMK each program takes an equal share of the W = items x n key tiles
instead (``gluon_schedule.persistent_range`` / ``streamk_segment``): whole items in the middle of its range, at
most two partial ones at its ends. A partial item's warpgroups store their unnormalised fp32 output rows, row max
and row sum (log2 units, as the kernel keeps them) into a scratch record (``store_partial``); after the kernel,
``merge`` combines each split item's records in program order (fixed: the results do not depend on timing) and
writes out, lse and the full residual, as the epilogue would have.

Scratch: (programs, 2 slots, warpgroups) records of HALF_M * D + 2 * HALF_M fp32 (at most 17.4 MB at D=256), kept
per device and size so launches see one address; with that, two concurrent calls on different streams would share
it (the knob is an experiment). The segment table (which programs' records make each split item) depends only on
(items, n, programs) and is cached too. Calls with launch plans on are not planned (the scratch is not one of a
plan's roles), so they run through the launcher every time.
"""

import functools

import torch
import triton
import triton.language as tl

from .. import configs
from .common import LN2
from .gluon_common import AVAILABLE
from .launch import launch

if AVAILABLE:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl

    @gluon.jit
    def store_partial(PART, acc, m_i, l_i, rec):
        """One warpgroup's partial item: its fp32 accumulator (HALF_M, D; not divided by l), row max and row sum
        (log2 units) into scratch record ``rec`` (``record_size`` floats each), from the registers' own layouts."""
        HALF_M: gl.constexpr = acc.shape[0]
        HEAD_D: gl.constexpr = acc.shape[1]
        rr = gl.arange(0, HALF_M, layout=gl.SliceLayout(1, acc.type.layout))
        cc = gl.arange(0, HEAD_D, layout=gl.SliceLayout(0, acc.type.layout))
        base = PART + rec.to(gl.int64) * (HALF_M * HEAD_D + 2 * HALF_M)
        gl.store(base + rr[:, None] * HEAD_D + cc[None, :], acc)
        rm = gl.arange(0, HALF_M, layout=m_i.type.layout)
        gl.store(base + HALF_M * HEAD_D + rm, m_i)
        gl.store(base + HALF_M * HEAD_D + HALF_M + rm, l_i)


def record_size(half_m: int, head_dim: int) -> int:
    """Floats per scratch record: a warpgroup's HALF_M x D accumulator, then its row maxima and row sums."""
    return half_m * head_dim + 2 * half_m


def segments(num_items: int, n: int, nprog: int):
    """The host's mirror of the kernel's schedule (``gluon_schedule.persistent_range`` / ``streamk_segment``): per
    program, its (item, first key tile, tiles, slot) in loop order; slot -1 for a whole item, else 0 (the
    program's first item) or 1 (its last)."""
    work = num_items * n
    out = []
    for p in range(nprog):
        t_begin, t_end = p * work // nprog, (p + 1) * work // nprog
        first = t_begin // n
        mine = []
        for item in range(first, -(-t_end // n)):
            lo, hi = max(t_begin - item * n, 0), min(t_end - item * n, n)
            mine.append((item, lo, hi - lo, -1 if (lo == 0 and hi == n) else (0 if item == first else 1)))
        out.append(mine)
    return out


@functools.lru_cache(maxsize=64)
def _table(num_items: int, n: int, nprog: int):
    """The split items and their records: (items, offsets, records) lists, records[offsets[i]:offsets[i + 1]] the
    ``p * 2 + slot`` of item items[i]'s segments in program order (the kernel's ``streamk_segment`` slots)."""
    segs = {}
    for p, mine in enumerate(segments(num_items, n, nprog)):
        for item, _, _, slot in mine:
            if slot >= 0:
                segs.setdefault(item, []).append(p * 2 + slot)
    items = sorted(segs)
    offsets = [0]
    records = []
    for item in items:
        records += segs[item]
        offsets.append(len(records))
    return items, offsets, records


@functools.lru_cache(maxsize=16)
def _device_table(num_items: int, n: int, nprog: int, device):
    items, offsets, records = _table(num_items, n, nprog)
    as_t = lambda x: torch.tensor(x or [0], dtype=torch.int32, device=device)  # noqa: E731
    return len(items), as_t(items), as_t(offsets), as_t(records)


_SCRATCH = {}


def scratch(device, nprog: int, nw: int, half_m: int, head_dim: int) -> torch.Tensor:
    """The kernel's partial records for nprog programs of nw warpgroups (kept per device and size)."""
    key = (device, nprog * 2 * nw * record_size(half_m, head_dim))
    if key not in _SCRATCH:
        _SCRATCH[key] = torch.empty(key[1], dtype=torch.float32, device=device)
    return _SCRATCH[key]


def scratch_for(q: torch.Tensor, equal_items: bool, num_items: int, nprog: int, nw: int, half_m: int,
                residual: bool):
    """The scratch for a forward launch that takes stream-K ranges, or None: the knob
    (``configs.gluon_forward_streamk``) on, a persistent grid of equal items (``equal_items``: batched, no causal
    mask or window, no work list) that do not divide among the nprog programs, and the full residual format."""
    if not (equal_items and num_items > nprog and num_items % nprog and configs.gluon_forward_streamk()):
        return None
    if residual and configs.residual_dtype(q.dtype) == torch.int8:
        return None
    return scratch(q.device, nprog, nw, half_m, q.shape[3])


@triton.jit
def _merge_kernel(PART, ITEMS, OFFSETS, RECORDS, OUT, LSE, RESID, SINK, num_m_tiles, q_heads, seqlen_q,
                  stride_ob, stride_os, stride_oh, stride_lb, stride_lh, NW: tl.constexpr, HALF_M: tl.constexpr,
                  HEAD_D: tl.constexpr, STORE_RESID: tl.constexpr, HAS_SINK: tl.constexpr):
    """One split item's warpgroup rows (program (i, w): item ITEMS[i], rows w * HALF_M ..): its records merged in
    order, m = max m_s, l = sum l_s 2^(m_s - m), acc = sum acc_s 2^(m_s - m); the sink joins l as the epilogue's
    does; out = acc / l, lse = (m + log2 l) ln 2, the residual acc / l - out; rows past seqlen_q not stored."""
    i = tl.program_id(0)
    w = tl.program_id(1)
    item = tl.load(ITEMS + i)
    bh = item // num_m_tiles
    b = bh // q_heads
    h = bh % q_heads
    row0 = (item % num_m_tiles) * (NW * HALF_M) + w * HALF_M
    rows = tl.arange(0, HALF_M)
    cols = tl.arange(0, HEAD_D)
    size: tl.constexpr = HALF_M * HEAD_D + 2 * HALF_M
    lo = tl.load(OFFSETS + i)
    hi = tl.load(OFFSETS + i + 1)
    m = tl.full([HALF_M], float("-inf"), tl.float32)
    for s in range(lo, hi):
        base = PART + (tl.load(RECORDS + s).to(tl.int64) * NW + w) * size
        m = tl.maximum(m, tl.load(base + HALF_M * HEAD_D + rows))
    if HAS_SINK:
        m = tl.maximum(m, tl.load(SINK + h).to(tl.float32) * 1.4426950408889634)
    m_use = tl.where(m == float("-inf"), 0.0, m)
    l_sum = tl.zeros([HALF_M], tl.float32)
    acc = tl.zeros([HALF_M, HEAD_D], tl.float32)
    for s in range(lo, hi):
        base = PART + (tl.load(RECORDS + s).to(tl.int64) * NW + w) * size
        alpha = tl.math.exp2(tl.load(base + HALF_M * HEAD_D + rows) - m_use)
        l_sum += tl.load(base + HALF_M * HEAD_D + HALF_M + rows) * alpha
        acc += tl.load(base + rows[:, None] * HEAD_D + cols[None, :]) * alpha[:, None]
    if HAS_SINK:
        l_sum += tl.math.exp2(tl.load(SINK + h).to(tl.float32) * 1.4426950408889634 - m_use)
    acc = acc / tl.where(l_sum == 0.0, 1.0, l_sum)[:, None]
    ok = (row0 + rows) < seqlen_q
    tl.store(LSE + b.to(tl.int64) * stride_lb + h.to(tl.int64) * stride_lh + row0 + rows,
             (m + tl.math.log2(l_sum)) * LN2, mask=ok)
    o = acc.to(OUT.dtype.element_ty)
    offs = b.to(tl.int64) * stride_ob + h * stride_oh + (row0 + rows)[:, None].to(tl.int64) * stride_os + cols[None, :]
    tl.store(OUT + offs, o, mask=ok[:, None])
    if STORE_RESID:
        tl.store(RESID + offs, (acc - o.to(tl.float32)).to(RESID.dtype.element_ty), mask=ok[:, None])


def merge(part, num_items: int, n: int, nprog: int, nw: int, half_m: int, out, lse, resid, sink, num_m_tiles: int,
          q_heads: int, seqlen_q: int, stride_lb: int, stride_lh: int) -> None:
    """Write the split items' out / lse (/ residual: out's dtype only) from the kernel's records."""
    count, items, offsets, records = _device_table(num_items, n, nprog, out.device)
    if count == 0:
        return
    d = out.shape[3]
    launch(_merge_kernel, (count, nw), (
        part, items, offsets, records, out, lse, resid if resid is not None else out,
        sink if sink is not None else lse, num_m_tiles, q_heads, seqlen_q, out.stride(0), out.stride(1),
        out.stride(2), stride_lb, stride_lh), dict(NW=nw, HALF_M=half_m, HEAD_D=d, STORE_RESID=resid is not None,
                                                   HAS_SINK=sink is not None), 4, 1)
