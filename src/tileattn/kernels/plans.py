"""Launch plans: less host time for forward and backward calls whose shape repeats.

A call spends host time on validation, the scope checks (``gluon_forward.applies``, ``gluon_backward.applies``),
schedules, host descriptors and each launch's argument list and cache key: a forward 120-290 µs on the H200
benchmark host (run 114) against SDPA cuDNN's 23-46 µs, which decides the speed of short calls (512 tokens; NOTES,
session 20). A batched call whose shapes, strides, dtypes, scalars, features, 16-byte alignment, aliasing and
current device equal an earlier call's, and whose knobs (every ``configs.getenv`` the earlier call read, recorded
by ``configs.env_log``) are unchanged, replays the earlier call's launches (``launch.recording`` / ``launch.plan``)
with its own tensors: its outputs and buffers are allocated as the launchers allocate them and each compiled
kernel is launched through Triton's C launcher. A key's first call runs as usual (calls whose keys never repeat
pay nothing), its second call records the plan, later calls replay it. The Gluon and the portable kernels,
forward and backward, are planned alike. Varlen and paged calls, calls with a tile config given or autotuning
on, and calls made while a CUDA graph is captured build no plan, and a profiler's launch hooks make a replay step
aside.

On by default since session 21 (run 116 on an H200: the GPU tests passed, host time per training forward call
128 -> 73 us); ``TILEATTN_LAUNCH_PLANS=0`` turns them off.
"""

import torch

from .. import configs
from .. import _hostinfo, autotune
from . import launch
from .params import forward_outputs, residual_like

_PLANS = {}  # key -> (knobs read, a tuple of LaunchPlan)
_MAX_PLANS = 512
_SEEN = set()  # keys called once: a plan is made on a key's second call, so that calls whose keys never repeat
_MAX_SEEN = 4096  # (shapes that change every step) pay nothing for plans they would never replay
stats = {"replays": 0, "plans": 0}  # for tests


def _on(q, p) -> bool:
    """Plans for this call: batched, on the GPU, with the launch cache's direct launches, and not tuning (an
    autotuned call's first launches are its trials)."""
    return (not p.varlen and q.is_cuda and launch._ENABLED and launch._DIRECT
            and configs.getenv("TILEATTN_LAUNCH_PLANS") != "0" and not autotune.enabled())


def _geometry(t):
    return None if t is None else (t.shape, t.stride(), t.dtype)


def _params_key(p):
    s, a = p.sink, p.alibi_slopes
    return (p.softmax_scale, p.window_left, p.window_right, p.softcap, p.dropout_p, _geometry(s), _geometry(a))


def _alignment(*tensors) -> int:
    """Which tensors' addresses are not 16-byte aligned (Triton specialises each pointer on it), as a bit mask."""
    bits = 0
    for i, t in enumerate(tensors):
        if t is not None and t.data_ptr() & 15:
            bits |= 1 << i
    return bits


def _aliases(*tensors):
    """Which arguments are one tensor object: None when no two are (the usual case), else for each the position
    of its first occurrence. A plan maps its roles by identity, so calls that share tensors differently need
    different plans."""
    ids = [id(t) for t in tensors if t is not None]
    if len(set(ids)) == len(ids):
        return None
    return tuple(next(j for j in range(i + 1) if tensors[j] is t) for i, t in enumerate(tensors))


def forward_key(q, k, v, p, residual: bool, device_index: int):
    """A batched forward call's plan key: everything its launches depend on but the tensors' addresses (their
    16-byte alignment, which Triton specialises on, included). ``device_index``: the current CUDA device."""
    rng = p.rng if p.dropout_p > 0 else None
    given = (q, k, v, rng, p.sink, p.alibi_slopes)
    return ("fwd", _geometry(q), _geometry(k), _geometry(v), _geometry(rng), q.device, device_index,
            _alignment(*given), _aliases(*given), _params_key(p), bool(residual))


def backward_key(dout, q, k, v, out, lse, dlse, p, dq, dk, dv, resid, device_index: int):
    """A batched backward call's plan key (as ``forward_key``)."""
    rng = p.rng if p.dropout_p > 0 else None
    given = (dout, q, k, v, out, lse, dlse, resid, dq, dk, dv, rng, p.sink, p.alibi_slopes)
    return ("bwd", tuple(_geometry(t) for t in given[:12]), q.device, device_index, _alignment(*given),
            _aliases(*given), _params_key(p))


def _lookup(key):
    """The plan stored for a key, if the knobs its first call read are unchanged."""
    entry = _PLANS.get(key)
    if entry is not None and configs.env_unchanged(entry[0]):
        return entry
    return None


def _first_call(key) -> bool:
    """True (and the key remembered) on a key's first call: that call runs without recording."""
    if key in _SEEN:
        return False
    if len(_SEEN) >= _MAX_SEEN:
        _SEEN.clear()
    _SEEN.add(key)
    return True


def _store(key, env, plans):
    if torch.cuda.is_current_stream_capturing():
        return
    if len(_PLANS) >= _MAX_PLANS:
        _PLANS.clear()
    _PLANS[key] = (tuple(dict.fromkeys(env)), plans)  # each knob once (a call reads some several times)
    stats["plans"] += 1


def _ready(plans) -> bool:
    return launch.plans_ready() and all(lp.current() for lp in plans)


def _make(record, roles, views=()):
    """LaunchPlans of every recorded launch, or None if one of them cannot be planned."""
    keep = tuple(_hostinfo._CAUSAL_LISTS.values())  # the batched causal work lists a plan may hold
    plans = tuple(launch.plan(*entry, roles=roles, keep=keep, views=views) for entry in record)
    return plans if plans and all(lp is not None for lp in plans) else None


def forward_call(run, q, k, v, p, residual: bool):
    """``run(q, k, v, p, None, None, residual)`` (forward._launch_forward: (out, lse) or (out, lse, resid)) through a
    plan where one stands. Shapes and layouts as ``forward.attention_forward``."""
    if not _on(q, p):
        return run(q, k, v, p, None, None, residual)
    rng = p.rng if p.dropout_p > 0 else None
    key = forward_key(q, k, v, p, residual, torch.cuda.current_device())
    entry = _lookup(key)
    if entry is not None and _ready(entry[1]):
        out, lse, _, _ = forward_outputs(q, v.shape[3], p)  # as the launchers allocate them
        resid = residual_like(out) if residual else None
        roles = dict(q=q, k=k, v=v, out=out, lse=lse, resid=resid, rng=rng, sink=p.sink, alibi=p.alibi_slopes)
        for lp in entry[1]:
            lp.launch(roles)
        stats["replays"] += 1
        return (out, lse, resid) if residual else (out, lse)
    if not launch.plans_ready() or _first_call(key):  # a profiler's hooks: no recording either
        return run(q, k, v, p, None, None, residual)
    with configs.env_log() as env, launch.recording() as record:
        result = run(q, k, v, p, None, None, residual)
    roles = dict(q=q, k=k, v=v, out=result[0], lse=result[1], resid=result[2] if residual else None, rng=rng,
                 sink=p.sink, alibi=p.alibi_slopes)
    # views: the Gluon forward describes an int8 residual through an int16 view of it (gluon_common.make_desc)
    plans = _make(record, roles, views=("resid",))
    if plans is not None:
        _store(key, env, plans)
    return result


def backward_call(run, buffers, dout, q, k, v, out, lse, dlse, p, cfg, dq, dk, dv, resid):
    """``run(dout, q, k, v, out, lse, dlse, p, cfg, dq, dk, dv, resid, buffers=...)`` (backward._launch_backward:
    writes dq, dk, dv, returns delta) through a plan where one stands; ``buffers(q, lse, dlse, p)`` makes the
    backward's own buffers (delta, row stats, fp32 dlse, the fused backward's dQ accumulator), the same way on the
    first call and on replays."""
    if cfg is not None or not _on(q, p):
        return run(dout, q, k, v, out, lse, dlse, p, cfg, dq, dk, dv, resid)
    rng = p.rng if p.dropout_p > 0 else None
    bufs = buffers(q, lse, dlse, p)
    # the buffers' knobs (TILEATTN_GLUON_BWD_FUSED: an accumulator or none) are read outside the plan's env log
    key = backward_key(dout, q, k, v, out, lse, dlse, p, dq, dk, dv, resid, torch.cuda.current_device()) + (
        bufs[3] is not None, )
    entry = _lookup(key)
    roles = dict(dout=dout, q=q, k=k, v=v, out=out, lse=lse, resid=resid, dq=dq, dk=dk, dv=dv, delta=bufs[0],
                 stats=bufs[1], dlse=bufs[2], dq_acc=bufs[3], sink=p.sink, alibi=p.alibi_slopes, rng=rng)
    if entry is not None and _ready(entry[1]):
        for lp in entry[1]:
            lp.launch(roles)
        stats["replays"] += 1
        return bufs[0]
    if not launch.plans_ready() or _first_call(key):
        return run(dout, q, k, v, out, lse, dlse, p, None, dq, dk, dv, resid, buffers=bufs)
    with configs.env_log() as env, launch.recording() as record:
        delta = run(dout, q, k, v, out, lse, dlse, p, None, dq, dk, dv, resid, buffers=bufs)
    plans = _make(record, roles, views=("stats", "dq_acc"))  # both described through views
    if plans is not None:
        _store(key, env, plans)
    return delta
