"""Host-side facts about small index tensors (cu_seqlens, block tables), read to the host once per tensor version."""

import weakref
from typing import Optional

import torch

_HOST_SUMMARIES = {}  # (id(tensor), kind) -> (weakref, version, summary)


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
