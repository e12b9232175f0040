"""Host-side facts about small index tensors (cu_seqlens, block tables), read to the host once per tensor version."""

import weakref
from typing import Optional

import torch

_HOST_SUMMARIES = {}  # (id(tensor), kind) -> (weakref, version, summary)
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


def _host_copy(t: torch.Tensor):
    hit = _HOST_COPIES.get(id(t))
    return hit[2] if hit is not None and hit[0]() is t and hit[1] == t._version else None


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
        return hit[2]
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
            work = sum(-(-min(nk, max((t + 1) * block_m + nk - nq, 0)) // block_m) for t in tiles)
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
