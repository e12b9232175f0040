"""Host-side facts about small index tensors (cu_seqlens, block tables), read to the host once per tensor version."""

import weakref
from typing import Optional

import torch

_HOST_SUMMARIES = {}  # (id(tensor), kind) -> (weakref, version, summary)
_CAPTURED = []  # cached device lists a CUDA graph captured: kept alive, since the graph reads them on every replay
_HOST_COPIES = {}  # id(cu_seqlens) -> (weakref, version, host int64 tensor): kept by host_summary for tile_map


def host_summary(t: torch.Tensor, kind: str):
    """Small facts about an integer index tensor, read to the host once per tensor and in-place version (the same
    cu_seqlens / block_table is typically passed to every layer of a step, so checks cost one sync, not one per call).

    kind "cu": (first, last, non-decreasing, longest sequence); kind "range": (min, max) (0, -1 when empty).
    """
    hit = _cached(t, kind)
    if hit is not None:
        return hit
    c = t.detach().cpu()
    if kind == "cu":
        if len(_HOST_COPIES) > 256:
            _HOST_COPIES.clear()
        _HOST_COPIES[id(t)] = (weakref.ref(t), t._version, c.to(torch.int64))
        diffs = c[1:] - c[:-1]
        summary = (int(c[0]), int(c[-1]), bool((diffs >= 0).all()), int(diffs.max()) if diffs.numel() else 0)
    else:
        summary = (int(c.min()), int(c.max())) if c.numel() else (0, -1)
    if len(_HOST_SUMMARIES) > 256:
        _HOST_SUMMARIES.clear()
    _HOST_SUMMARIES[(id(t), kind)] = (weakref.ref(t), t._version, summary)
    return summary


def _cached(t: torch.Tensor, kind: str):
    """The summary already read for this tensor and in-place version, or None."""
    hit = _HOST_SUMMARIES.get((id(t), kind))
    return hit[2] if hit is not None and hit[0]() is t and hit[1] == t._version else None


def leaves_rows(cu: Optional[torch.Tensor], rows: int) -> bool:
    """Whether a varlen call's ``rows`` packed rows may include rows outside every sequence, which no kernel
    program writes (their outputs and gradients must be zero-filled): True unless cumulative lengths ``cu`` are
    known (from an earlier ``host_summary``, never by a new device read) to end at ``rows``; unknown e.g. inside a
    compiled graph, where the API skips its host reads. False for batched calls (``cu`` None)."""
    if cu is None:
        return False
    summary = _cached(cu, "cu")
    return summary is None or summary[1] != rows


def _pin_if_capturing(t: torch.Tensor) -> torch.Tensor:
    """A cached device tensor handed to a kernel: while a CUDA graph is being captured, also kept alive for good
    (the graph holds its address, and a cache may drop its entry later, which would free the memory under it)."""
    if t.is_cuda and torch.cuda.is_current_stream_capturing() and not any(p is t for p in _CAPTURED):
        _CAPTURED.append(t)
    return t


def _host_copy(t: torch.Tensor):
    hit = _HOST_COPIES.get(id(t))
    return hit[2] if hit is not None and hit[0]() is t and hit[1] == t._version else None


def causal_key_tiles(tile: int, seqlen_q: int, seqlen_k: int, block_m: int, block_n: int) -> int:
    """Key tiles (of block_n keys) that query tile ``tile`` (of block_m rows) visits under a causal mask aligned
    bottom-right: its last row sees keys below (tile + 1) * block_m + seqlen_k - seqlen_q; 0 when none."""
    hi = min(seqlen_k, max((tile + 1) * block_m + seqlen_k - seqlen_q, 0))
    return -(-hi // block_n)


def tile_map(cu_q: torch.Tensor, cu_k: torch.Tensor, block_m: int, causal: bool,
             q_heads: int, rounds: int = 0) -> Optional[torch.Tensor]:
    """A varlen forward's work list: one int32 entry (tile * batch + b) * q_heads + h per (query tile of block_m
    rows that holds a row of sequence b, query head h), on cu_q's device. No entry for the tiles past a sequence's
    end, which a grid over the longest sequence would launch empty. Order: sequences by decreasing work (key tiles
    visited, summed over their query tiles; causal: up to each tile's diagonal), equal work in sequence order; within
    a sequence head by head and, per head, its query tiles (causal: last tile first, the longest), as the grid over
    the longest sequence runs them. That keeps the programs running at once on few (sequence, head) pairs, whose K/V
    then stay in L2; v17d's order (every head of a tile next to each other) lost 4-9% at 8k (NOTES.md).
    rounds > 0 (the persistent forward's program count: program p runs positions p, p + rounds, ...): each odd full
    round of that many positions reversed, so the program that gets a round's longest entry gets the next round's
    shortest (a static round-robin over a list sorted by work otherwise hands program 0 the longest entry of every
    round; host model: the busiest program over the mean 1.02-1.07 -> 1.01-1.04 at 2k random lengths, NOTES v19f).

    Built from the host copies ``host_summary`` kept of both cumulative-lengths tensors and cached per tensor
    version; None when either was never read on the host (e.g. inside a compiled graph), while a CUDA graph is
    being captured (no host-to-device copy there), or when an entry would not fit in int32."""
    key = (id(cu_q), f"tiles{block_m},{int(causal)},{q_heads},{rounds},{id(cu_k)},{cu_k._version}")
    hit = _HOST_SUMMARIES.get(key)
    if hit is not None and hit[0]() is cu_q and hit[1] == cu_q._version:
        return _pin_if_capturing(hit[2])
    cq, ck = _host_copy(cu_q), _host_copy(cu_k)
    if cq is None or ck is None or (cu_q.is_cuda and torch.cuda.is_current_stream_capturing()):
        return None
    lq, lk = (cq[1:] - cq[:-1]).tolist(), (ck[1:] - ck[:-1]).tolist()
    batch = len(lq)
    if (-(-max(lq, default=0) // block_m) * batch + batch) * q_heads >= 2**31:
        return None
    seqs = []
    for b, (nq, nk) in enumerate(zip(lq, lk)):
        tiles = range(-(-nq // block_m))
        if causal:
            tiles = tiles[::-1]
            work = sum(causal_key_tiles(t, nq, nk, block_m, block_m) for t in tiles)
        else:
            work = len(tiles) * -(-nk // block_m)
        seqs.append((work, b, tiles))
    seqs.sort(key=lambda w: -w[0])  # stable: equal work keeps sequence order
    m = [(t * batch + b) * q_heads + h for _, b, tiles in seqs for h in range(q_heads) for t in tiles]
    if rounds > 0:
        for r in range(1, len(m) // rounds, 2):
            m[r * rounds:(r + 1) * rounds] = m[r * rounds:(r + 1) * rounds][::-1]
    m = torch.tensor(m, dtype=torch.int32, device=cu_q.device)
    if len(_HOST_SUMMARIES) > 256:
        _HOST_SUMMARIES.clear()
    _HOST_SUMMARIES[key] = (weakref.ref(cu_q), cu_q._version, m)
    return m


def keys_for_every_tile(cu_q: torch.Tensor, cu_k: torch.Tensor, diagonal: bool) -> bool:
    """Whether every sequence with query rows has keys for each of its rows to see: seqlen_k >= 1, and with a causal
    mask or a window (``diagonal``: every row sees at least its own diagonal key then) seqlen_k >= seqlen_q.
    From the host copies ``host_summary`` kept (no new device read); False when either was never read."""
    cq, ck = _host_copy(cu_q), _host_copy(cu_k)
    if cq is None or ck is None:
        return False
    lq, lk = cq[1:] - cq[:-1], ck[1:] - ck[:-1]
    need = torch.maximum(lq, torch.ones_like(lq)) if diagonal else torch.ones_like(lq)
    return bool(((lq == 0) | (lk >= need)).all())


# the causal work list's group of heads whose K/V stay in L2 while their items run: at most a quarter of the L2
# (H100 / H200: 50 MB -> 12.5 MB), since the items running at once span a group and part of the next, Hopper's L2 is
# two halves (data read from both sides may sit in both) and Q / O stream through it too
CAUSAL_LIST_L2_FRACTION = 0.25
CAUSAL_LIST_ITEM_COST = 1.5  # a work item's fixed cost (Q load, epilogue) in key tiles, for the balance
CAUSAL_LIST_MAX_ITEMS = 1 << 15  # query tiles x batch x heads: the Python schedule takes ~1 us per item and size
CAUSAL_LIST_MAX_SHAPES = 256  # causal work lists kept (never evicted); a new shape past them takes the plain grid
_CAUSAL_LISTS = {}


def causal_schedule(batch: int, q_heads: int, group: int, seqlen_q: int, seqlen_k: int, block_m: int, block_n: int,
                    kv_bytes_per_key: int, nprog: int, l2_bytes: int):
    """The persistent forward's work list for a batched causal call, as a Python list of entries
    (tile * batch + b) * q_heads + h (``gluon_schedule.item_bounds``' USE_MAP form; program p runs entries p,
    p + nprog, ...), with the busiest program's modelled work over the mean and the heads per group.

    Heads are taken in groups small enough that a group's K/V (``kv_bytes_per_key`` bytes per key and KV head, shared by
    ``group`` consecutive query heads) fills at most a fraction CAUSAL_LIST_L2_FRACTION of the L2: the items running at
    once then read the K/V of a group or two (three at a group's edge), which stay in L2 while every query tile of those
    heads passes over them. The in-kernel order it replaces (``persistent_item``'s LPT: every head's longest tile, then
    every head's second longest, ...) runs tiles of up to nprog different heads at once, so at 1k-16k each head's K/V
    leaves L2 between its tiles (D=128 causal 1k: ~4.6x the plain grid's HBM reads, by this model), which is where the
    persistent grid lost 2-25% to the plain grid on causal calls (runs 78, 85; the varlen work list learnt the same in
    v17d). Within a group the tiles go longest first, level by level; each round of nprog positions hands its items,
    longest first, to the programs with the least modelled work so far (key tiles + CAUSAL_LIST_ITEM_COST per item), and
    the programs are numbered so that those with an item in the last, partial round come first (program p's it-th item
    sits at p + it * nprog). A round of nprog items spans at least nprog / num_m heads however the groups are cut, and
    with groups of G heads the items running at once touch about G heads, so the group size runs from that floor to what
    fits; the balance moves by a few percent with it, so up to 12 sizes in that range (fewer for long lists) are built
    and the best balanced taken (host model, flash-attn's grid, makespan over mean: 1.015-1.027 at D=128 and 1.007-1.010
    at D=64, against the kernel's LPT order's 1.008-1.031 and 1.002-1.023; benchmarks/persistent_balance.py)."""
    num_m = -(-seqlen_q // block_m)

    levels = [(causal_key_tiles(t, seqlen_q, seqlen_k, block_m, block_n), t) for t in range(num_m - 1, -1, -1)]
    nbh = batch * q_heads
    per_head = max(1, seqlen_k * kv_bytes_per_key // max(1, group))  # one query head's share of its KV head
    # a round of nprog items spans at least nprog / num_m heads whatever the groups: smaller groups only cost balance
    least = max(1, -(-min(nprog, nbh * num_m) // max(1, num_m)))
    fit = max(least, int(l2_bytes * CAUSAL_LIST_L2_FRACTION) // per_head)

    def build(heads_per_group):
        order = []  # (key tiles, entry)
        for g0 in range(0, nbh, heads_per_group):
            members = range(g0, min(nbh, g0 + heads_per_group))
            for n, t in levels:
                order.extend((n, (t * batch + bh // q_heads) * q_heads + bh % q_heads) for bh in members)
        progs = min(nprog, len(order))
        load = [0.0] * progs
        assigned = [[] for _ in range(progs)]
        for r0 in range(0, len(order), progs):
            items = sorted(order[r0:r0 + progs], key=lambda it: -it[0])  # stable
            for (n, entry), p in zip(items, sorted(range(progs), key=lambda q: load[q])):
                assigned[p].append(entry)
                load[p] += n + CAUSAL_LIST_ITEM_COST
        rank = sorted(range(progs), key=lambda q: -len(assigned[q]))  # stable: the last round's programs first
        entries = [0] * len(order)
        for new_p, p in enumerate(rank):
            for it, entry in enumerate(assigned[p]):
                entries[new_p + it * progs] = entry
        return entries, (max(load) / (sum(load) / progs) if progs and sum(load) else 1.0), heads_per_group

    tries = max(2, min(12, 200_000 // max(1, len(levels) * nbh)))  # host time: ~1 us per item and size tried
    step = max(1, (fit - least + tries - 1) // tries)
    sizes = range(least, fit + 1, step)
    return min((build(g) for g in sizes), key=lambda r: (round(r[1], 3), r[2]))


def causal_work_list(batch: int, q_heads: int, group: int, seqlen_q: int, seqlen_k: int, block_m: int,
                     block_n: int, kv_bytes_per_key: int, nprog: int, device: torch.device) -> Optional[torch.Tensor]:
    """``causal_schedule``'s entries as an int32 tensor on ``device``, cached per shape (the first call of a shape
    pays the schedule's host time: 1-30 ms at flash-attn's grid, ~0.2 s at the cap); None (the plain grid runs by
    default, the kernel's own order on a forced persistent grid) while a CUDA graph is being captured and the list
    is not cached yet (no host-to-device copy there), for no items, past CAUSAL_LIST_MAX_ITEMS items, or for a new
    shape once CAUSAL_LIST_MAX_SHAPES are cached (lists are never evicted, as a captured graph may hold one, and
    building one per call would cost its host time on every call)."""
    items = -(-seqlen_q // block_m) * batch * q_heads
    if not 0 < items <= CAUSAL_LIST_MAX_ITEMS:
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    key = (batch, q_heads, group, seqlen_q, seqlen_k, block_m, block_n, kv_bytes_per_key, nprog, index)
    hit = _CAUSAL_LISTS.get(key)
    if hit is not None:
        return _pin_if_capturing(hit)
    if torch.cuda.is_current_stream_capturing() or len(_CAUSAL_LISTS) >= CAUSAL_LIST_MAX_SHAPES:
        return None
    l2 = torch.cuda.get_device_properties(index).L2_cache_size
    entries, _, _ = causal_schedule(batch, q_heads, group, seqlen_q, seqlen_k, block_m, block_n,
                                    kv_bytes_per_key, nprog, l2)
    lst = _CAUSAL_LISTS[key] = torch.tensor(entries, dtype=torch.int32, device=device)
    return lst
