"""Opt-in autotuning of the tile configs (``TILEATTN_AUTOTUNE=1``). Off by default: nothing here runs unless asked.

With the variable set, the first eager call of a kind — key (GPU name and compute capability, triton version,
phase fwd/bwd, dtype, padded head dim, causal, paged, a seqlen bucket) — times each candidate config on the call's
own inputs (CUDA events, median of a few runs after one warm-up that also compiles) and keeps the fastest. The
choice is cached in memory and in a JSON file (``TILEATTN_CACHE_DIR``, default ``~/.cache/tileattn``), so later
calls and later processes pay nothing. Candidates that fail to compile or run (e.g. out of shared memory) are
skipped. Never inside torch.compile tracing or CUDA-graph capture (the tables are used there).

Timing runs write only scratch outputs: the forward allocates its own, the backward its own gradients.
"""

import functools
import json
import os
import statistics
import tempfile
from typing import Callable, Dict, Optional, Sequence

import torch
import triton
from triton.errors import TritonError

from . import configs
from .configs import BackwardConfig, KernelConfig

_MEMORY: Dict[str, list] = {}
_LOADED_FROM: Optional[str] = None

_C = KernelConfig
# Candidates per padded head dim; each is shrunk to the GPU's shared memory like the tables' entries.
FWD_CANDIDATES = {
    "small": [_C(128, 64, 8, 3), _C(128, 64, 4, 3), _C(64, 64, 4, 3), _C(128, 128, 8, 2), _C(64, 32, 4, 3)],
    128: [_C(64, 64, 4, 3), _C(128, 64, 8, 3), _C(128, 64, 8, 2), _C(128, 128, 8, 2), _C(64, 128, 4, 3)],
    256: [_C(128, 64, 8, 2), _C(64, 64, 4, 2), _C(64, 32, 4, 2), _C(128, 32, 8, 2)],
}
BWD_CANDIDATES = {  # (dK/dV tile, dQ tile)
    "small": [(_C(32, 64, 4, 3), _C(128, 64, 8, 3)), (_C(64, 64, 4, 2), _C(128, 32, 8, 3)),
              (_C(32, 128, 4, 3), _C(64, 64, 4, 3)), (_C(64, 128, 8, 3), _C(128, 64, 8, 3))],
    128: [(_C(64, 128, 8, 3), _C(128, 64, 8, 3)), (_C(64, 64, 8, 3), _C(128, 64, 8, 3)),
          (_C(32, 128, 8, 3), _C(128, 64, 8, 3)), (_C(64, 64, 8, 3), _C(64, 64, 8, 3))],
    256: [(_C(32, 64, 8, 2), _C(64, 64, 8, 2)), (_C(64, 64, 8, 2), _C(64, 32, 8, 2)),
          (_C(32, 64, 8, 2), _C(64, 32, 8, 2))],
}


def enabled() -> bool:
    return configs.getenv("TILEATTN_AUTOTUNE", "0") == "1"


def applies(q: torch.Tensor, override_var: str) -> bool:
    """Tune this call? Only when enabled, for eager fp16/bf16 CUDA calls (not in the interpreter, torch.compile
    tracing or CUDA-graph capture; fp32 keeps its spill-safe table) whose tiles are not overridden by
    ``override_var`` (TILEATTN_FWD_CONFIG / TILEATTN_BWD_CONFIG)."""
    return (enabled() and q.is_cuda and q.dtype != torch.float32 and not configs.getenv(override_var)
            and not configs._interpreting() and not torch.compiler.is_compiling()
            and not torch.cuda.is_current_stream_capturing())


def cache_path() -> str:
    root = os.environ.get("TILEATTN_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "tileattn")
    return os.path.join(root, "autotune.json")


def _load():
    global _LOADED_FROM
    path = cache_path()
    if _LOADED_FROM == path:
        return
    _LOADED_FROM = path
    try:
        with open(path) as f:
            data = json.load(f)
        if isinstance(data, dict):
            _MEMORY.update({k: v for k, v in data.items() if isinstance(v, list)})
    except (OSError, ValueError):
        pass  # no cache yet, or an unreadable one: tune again


def _save():
    path = cache_path()
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".autotune-")
        with os.fdopen(fd, "w") as f:
            json.dump(_MEMORY, f, indent=1, sort_keys=True)
        os.replace(tmp, path)  # atomic: concurrent processes never read a half-written file
    except OSError:
        pass  # a read-only home: the choice still holds for this process


def cuda_timer(fn: Callable[[], object], reps: int = 5) -> float:
    """Median milliseconds of ``fn`` over ``reps`` runs after one warm-up run (which also compiles)."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def pick(key: str, candidates: Callable[[], Sequence], run: Callable[[object], object], encode, decode,
         timer: Optional[Callable[[Callable[[], object]], float]] = None):
    """The fastest candidate for ``key`` (cached in memory and on disk). ``candidates()`` lists them (called only
    when ``key`` is not cached); ``run(candidate)`` does one call with it; ``encode`` / ``decode`` turn a
    candidate into JSON-able lists and back. Falls back to the first candidate when none runs."""
    _load()
    if key in _MEMORY:
        return decode(_MEMORY[key])
    candidates = candidates()
    timer = timer or cuda_timer
    best, best_ms = None, float("inf")
    for cand in candidates:
        try:
            ms = timer(lambda: run(cand))
        except (TritonError, RuntimeError, ValueError):
            continue  # does not compile or fit this GPU (shared memory, registers, ptxas), or this problem
        if ms < best_ms:
            best, best_ms = cand, ms
    if best is None:
        return candidates[0]
    _MEMORY[key] = encode(best)
    _save()
    return best


def _bucket(n: int) -> int:
    return min(configs.next_pow2(max(n, 1)), 16384)


@functools.lru_cache(maxsize=None)
def _device_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def _key(phase: str, q: torch.Tensor, block_d: int, p, paged: bool) -> str:
    index = configs._device_index(q.device)
    arch = configs._arch(index, configs._arch_override())
    return "|".join(str(x) for x in (_device_name(index), f"sm{arch[0]}{arch[1]}", triton.__version__, phase,
                                     str(q.dtype).replace("torch.", ""), block_d, p.causal_like, paged,
                                     _bucket(p.max_seqlen_q), _bucket(p.max_seqlen_k)))


def _table_key(block_d: int):
    return block_d if block_d in (128, 256) else "small"


def forward_config(q, dim, p, run: Callable[[KernelConfig], object], paged: bool = False) -> KernelConfig:
    """The tuned forward config for this call (``run(cfg)`` launches the forward with ``cfg``)."""
    block_d = configs.padded_head_dim(dim)

    def candidates():  # the table's entry first, each shrunk to the GPU's shared memory like the table's
        arch = configs._arch(configs._device_index(q.device), configs._arch_override())
        table = configs.forward_config(q.device, q.dtype, dim, p.causal_like)
        return list(dict.fromkeys(configs._fit(c, block_d, q.element_size(), arch, "m")
                                  for c in [table] + FWD_CANDIDATES[_table_key(block_d)]))
    return pick(_key("fwd", q, block_d, p, paged), candidates, run,
                encode=lambda c: [c.block_m, c.block_n, c.num_warps, c.num_stages],
                decode=lambda v: KernelConfig(*v))


def backward_config(q, dim, p, run: Callable[[BackwardConfig], object]) -> BackwardConfig:
    """The tuned backward configs for this call (``run(cfg)`` runs the backward with ``cfg``)."""
    block_d = configs.padded_head_dim(dim)

    def candidates():
        arch = configs._arch(configs._device_index(q.device), configs._arch_override())
        table = configs.backward_config(q.device, q.dtype, dim, p.causal_like)
        elem = q.element_size()
        return list(dict.fromkeys(BackwardConfig(configs._fit(a, block_d, elem, arch, "n"),
                                                 configs._fit(b, block_d, elem, arch, "mm"))
                                  for a, b in [(table.dkdv, table.dq)] + BWD_CANDIDATES[_table_key(block_d)]))
    return pick(_key("bwd", q, block_d, p, False), candidates, run,
                encode=lambda c: [[c.dkdv.block_m, c.dkdv.block_n, c.dkdv.num_warps, c.dkdv.num_stages],
                                  [c.dq.block_m, c.dq.block_n, c.dq.num_warps, c.dq.num_stages]],
                decode=lambda v: BackwardConfig(KernelConfig(*v[0]), KernelConfig(*v[1])))
