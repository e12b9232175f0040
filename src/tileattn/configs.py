"""Tile sizes, warps and pipeline stages, chosen per (arch, dtype, head dim, causal), outside the kernels.

The numbers for sm90 were picked by measurement (benchmarks/tune.py, results in benchmarks/NOTES.md). Other
architectures get conservative tiles that fit their shared memory. ``TILEATTN_FWD_CONFIG`` /
``TILEATTN_BWD_CONFIG`` environment variables override the table for experiments (see ``_override``).
"""

import contextlib
import dataclasses
import functools
import os
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import triton

MIN_HEAD_DIM = 8
MAX_HEAD_DIM = 256


@dataclass(frozen=True)
class KernelConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class BackwardConfig:
    dkdv: KernelConfig
    dq: KernelConfig
    # the dQ tile when the dQ kernel corrects delta itself (no stored residual: TILEATTN_DELTA=correct, the shim's
    # private backward); its second fp32 accumulator needs smaller tiles at D=256. None: ``dq``.
    dq_correct: Optional[KernelConfig] = None


_ENV_DATA = getattr(os.environ, "_data", None) if os.name == "posix" else None
_ENV_KEYS = {}


_ENV_LOG = None  # while ``env_log`` records: the list of (name, value or None) that getenv read


def getenv(name: str, default=None):
    """``os.environ.get(name, default)`` for the knobs read on every call: a lookup in os.environ's own bytes dict
    (what ``os.environ[...] = ...``, ``monkeypatch.setenv`` and ``del`` update) instead of the Mapping ABC's get,
    ~1-2 µs per read on the benchmark host, and a call reads ~8 of them."""
    if _ENV_DATA is None:
        value = os.environ.get(name)
    else:
        key = _ENV_KEYS.get(name)
        if key is None:
            key = _ENV_KEYS[name] = os.fsencode(name)
        value = _ENV_DATA.get(key)
        if value is not None:
            value = os.fsdecode(value)
    if _ENV_LOG is not None:
        _ENV_LOG.append((name, value))
    return default if value is None else value


def choice(name: str, allowed: tuple, default: str) -> str:
    """A knob read on every call (``getenv``) that takes one of ``allowed`` ("" = unset); anything else is a
    ValueError naming it and the values it takes."""
    value = getenv(name, default)
    if value not in allowed:
        named = [a for a in allowed if a]
        listed = named[0] if len(named) == 1 else ", ".join(named[:-1]) + " or " + named[-1]
        raise ValueError(f"{name} must be {listed}{' (or unset)' if '' in allowed else ''}, got {value!r}")
    return value


def switch(name: str, default: str = "0") -> bool:
    """An on / off knob read on every call (``getenv``): "1" on, "0" off, anything else a ValueError naming it."""
    return choice(name, ("0", "1"), default) == "1"


@contextlib.contextmanager
def env_log():
    """Record every knob ``getenv`` reads inside the block: yields the list of (name, value or None), which
    ``env_unchanged`` checks later (kernels/plans.py: a launch plan stands while the knobs its first call read are
    unchanged)."""
    global _ENV_LOG
    outer, _ENV_LOG = _ENV_LOG, []
    log = _ENV_LOG
    try:
        yield log
    finally:
        _ENV_LOG = outer
        if outer is not None:
            outer.extend(log)


def env_unchanged(log) -> bool:
    """Whether every knob in an ``env_log`` record still has the value it had."""
    for name, value in log:
        if getenv(name) != value:
            return False
    return True


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (1 for n <= 1), in plain Python for host-side launch math."""
    return 1 << (int(n) - 1).bit_length() if n > 1 else 1


def padded_head_dim(head_dim: int) -> int:
    """Register tile width for a head dim: next power of two, at least 16 (the tensor-core k minimum)."""
    return max(16, next_pow2(head_dim))


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for host-side launch math (plain Python: triton.cdiv is a constexpr_function, ~5 us a call)."""
    return -(-a // b)


def _device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def _interpreting() -> bool:
    return bool(triton.knobs.runtime.interpret)


@functools.lru_cache(maxsize=None)
def _device_arch(device_index: int):
    return torch.cuda.get_device_capability(device_index)


def _arch_override():
    """``TILEATTN_ARCH=8.0`` (major.minor): pick tiles, shared-memory limits and the TMA choice as for that
    compute capability — for testing the portable (non-Hopper) tables on a Hopper card. Must not exceed the real
    GPU's (a Hopper table on an sm80 card would not fit its shared memory)."""
    value = getenv("TILEATTN_ARCH")
    if not value:
        return None
    try:
        major, minor = (int(x) for x in value.split("."))
    except ValueError:
        raise ValueError(f"TILEATTN_ARCH must look like 8.0 (major.minor), got {value!r}") from None
    return major, minor


def _arch(device_index: int, override=None):
    real = _device_arch(device_index)
    if override is None:
        return real
    if tuple(override) > tuple(real):
        raise ValueError(f"TILEATTN_ARCH={override[0]}.{override[1]} exceeds the GPU's compute capability "
                         f"{real[0]}.{real[1]}")
    return tuple(override)


def _shared_memory_bytes(arch) -> int:
    # Opt-in shared memory per block by compute capability.
    return {(8, 0): 163 * 1024, (8, 7): 163 * 1024, (9, 0): 227 * 1024}.get(tuple(arch), 99 * 1024)


def _smem_bytes(resident_rows: int, streamed_rows: int, stages: int, block_d: int, elem: int) -> int:
    """Shared memory of one program: the resident tile(s) plus two streamed tiles per pipeline stage."""
    return (resident_rows + 2 * max(stages, 1) * streamed_rows) * block_d * elem


def _fit(cfg: KernelConfig, block_d: int, elem: int, arch, resident: str) -> KernelConfig:
    """Shrink a config until it fits the GPU's shared memory: fewer stages first, then smaller tiles.

    resident: which block stays on chip: "m" (forward and dQ: the query tile; dQ also keeps dO) or "n" (dK/dV: K and V).
    """
    bm, bn, warps, stages = cfg.block_m, cfg.block_n, cfg.num_warps, cfg.num_stages

    def need():
        if resident == "n":
            return _smem_bytes(2 * bn, bm, stages, block_d, elem)
        return _smem_bytes(bm * (2 if resident == "mm" else 1), bn, stages, block_d, elem)
    limit = _shared_memory_bytes(arch)
    while need() > limit:
        if stages > 2:
            stages -= 1
        elif resident == "n" and bn > 32:
            bn //= 2
        elif resident != "n" and bm > 32:
            bm //= 2
        elif stages > 1:
            stages -= 1
        elif max(bm, bn) > 16:
            bm, bn = max(16, bm // 2), max(16, bn // 2)
        else:
            break
    return KernelConfig(bm, bn, warps, stages)


def use_tma(device: torch.device, dtype: torch.dtype = torch.bfloat16, head_dim: int = 128,
            sliding: bool = False, seqlen_k: int = 0) -> bool:
    """Whether the forward streams K/V through tensor descriptors (TMA, sm_90+; the interpreter emulates them)
    instead of pointer loads. ``TILEATTN_TMA=1`` forces it on (sm_90+), ``=0`` off; unset, the sm_90 table
    decides (H200, run 23 in benchmarks/NOTES.md: the same call timed both paths): on for fp16/bf16 at head-dim
    tile 128 (forward +4-5% non-causal, +4-12% causal) and at 256 from 2k keys (+7-8%; slower at 512-1k), off at
    head dims <= 64 (1-4% slower, up to 1.8x at causal 1k-2k) and with a sliding window (window (512, 512) at D=128
    ran 0.93-0.95x with TMA, bench_features runs 22-23)."""
    value = getenv("TILEATTN_TMA", "")
    if value not in ("", "0", "1"):
        raise ValueError(f"TILEATTN_TMA must be 0 or 1 (or unset: the table), got {value!r}")
    if _interpreting() or device.type != "cuda":
        return value == "1"
    if _arch(_device_index(device), _arch_override())[0] < 9 or value == "0":
        return False
    if value == "1":
        return True
    block_d = padded_head_dim(head_dim)
    if dtype == torch.float32 or sliding:
        return False
    return block_d == 128 or (block_d == 256 and seqlen_k >= 2048)


def merge_edges(has_left: bool, has_right: bool) -> bool:
    """Whether the forward runs a query tile's key tiles as one pipelined loop that masks only the edge tiles
    (a sliding window's two edges, the causal diagonal) instead of separate unpipelined loops for the edges
    (kernels/forward.py, ``_fwd_tiles``). ``TILEATTN_FWD_EDGES=merged|split`` overrides. Default merged (H200,
    NOTES.md v10c and v11a): with pointer loads window (512, 512) forward +5-6%, D=64 causal 0.98-1.06x (run 24);
    with TMA descriptors, since the V-zeroing fix, D=256 causal 2k/4k +2-4% and D=128 causal within 1% (run 26).
    A plain call has no edge to merge."""
    value = choice("TILEATTN_FWD_EDGES", ("", "merged", "split"), "")
    if not (has_left or has_right):
        return False
    return value != "split"


def sm_count(device: torch.device) -> int:
    """Multiprocessors of a CUDA device, cached (get_device_properties cost ~20-35 us of host time per decode
    call in run 29's host profile)."""
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


DELTA_MODES = ("residual", "correct", "rounded")


def delta_mode(dtype: torch.dtype) -> str:
    """How the fp16/bf16 backward gets delta = rowsum(dO * O_exact) ("exact" for fp32, whose O is unrounded).

    ``TILEATTN_DELTA`` (read at each call):
    - ``residual`` (default): the forward also stores r = O_fp32 - O, O's rounding residual, in the input dtype
      or as int8 (``residual_dtype``; one more output-sized tensor kept for the backward), and
      delta = rowsum(dO * (O + r)).
    - ``correct``: no extra memory; the dQ kernel accumulates the exact sum_j P dP and corrects dQ and delta
      (one more matmul per tile). Also what a backward without a residual (the flash-attn shim's private
      ``_flash_attn_backward``) uses.
    - ``rounded``: FlashAttention's delta from the rounded O, uncorrected: inaccurate when a softmax row is
      nearly one-hot (benchmarks/NOTES.md, sweep #200). A benchmarking knob; ``TILEATTN_ROUNDED_DELTA=1``
      is an older spelling of it.
    """
    if dtype == torch.float32:
        return "exact"
    if getenv("TILEATTN_ROUNDED_DELTA", "0") == "1":
        return "rounded"
    mode = getenv("TILEATTN_DELTA", "residual") or "residual"
    if mode not in DELTA_MODES:
        raise ValueError(f"TILEATTN_DELTA must be one of {DELTA_MODES}, got {mode!r}")
    return mode


RESIDUAL_FORMATS = ("full", "int8")


def residual_dtype(dtype: torch.dtype) -> torch.dtype:
    """The storage of out's rounding residual (delta mode "residual") for an fp16/bf16 out.

    ``TILEATTN_RESIDUAL`` (read at each forward call; the backward reads the format from the tensor it gets):
    - ``full``: r = O_fp32 - O in out's dtype (as many bytes as out).
    - ``int8``: r in units of O's own exponent: with P = 2^floor(log2 |O|) (from O's bits; subnormals and zeros
      take the smallest normal's), q = round(r / P * 2^(m+8) * 127/128) (m: the mantissa bits, 7 for bf16, 10
      for fp16; |r| <= half an ulp = P 2^-(m+1), so |q| <= 127) and r ~ q P 2^-(m+8) * 128/127: half the bytes,
      r kept to P 2^-(m+9) * 128/127 (about 2^-16 |O| for bf16) against O's own rounding of up to P 2^-(m+1).
    """
    fmt = getenv("TILEATTN_RESIDUAL", "full") or "full"
    if fmt not in RESIDUAL_FORMATS:
        raise ValueError(f"TILEATTN_RESIDUAL must be one of {RESIDUAL_FORMATS}, got {fmt!r}")
    return torch.int8 if fmt == "int8" else dtype


def _override(name: str, fields: Optional[str] = None):
    """The integers of a comma-separated override knob, or None when unset; ``fields`` (their names, comma-separated):
    exactly that many are required."""
    value = getenv(name)
    if not value:
        return None
    over = [int(x) for x in value.split(",")]
    if fields is not None and len(over) != fields.count(",") + 1:
        raise ValueError(f"{name} must be {fields.count(',') + 1} integers: {fields}; got {over}")
    return over


# Tables: (head-dim tile, causal) -> config, (block_m, block_n, warps, stages).
# sm90 values for head dims <= 128 measured on an H200 at seqlen 4k, bf16 (benchmarks/NOTES.md, run 2); the causal
# d<=64 dK/dV tile chosen by ptxas spill counts and confirmed by run 5; D=256 backward tiles chosen to fit shared
# memory, not yet measured.
def _cfg(*c):
    return KernelConfig(*c)


_SM90_FWD = {
    **{(d, c): _cfg(128, 64, 8, 3) for d in (16, 32, 64) for c in (False, True)},
    (128, False): _cfg(64, 64, 4, 3), (128, True): _cfg(64, 64, 4, 3),
    (256, False): _cfg(128, 64, 8, 2), (256, True): _cfg(128, 64, 8, 2),
}
_SM90_BWD = {  # dkdv: block_m streamed, block_n resident; dq: block_m resident, block_n streamed
    **{(d, False): BackwardConfig(_cfg(32, 64, 4, 3), _cfg(128, 64, 8, 3)) for d in (16, 32, 64)},
    **{(d, True): BackwardConfig(_cfg(32, 64, 4, 3), _cfg(128, 64, 8, 3)) for d in (16, 32, 64)},
    (128, False): BackwardConfig(_cfg(64, 128, 8, 3), _cfg(128, 64, 8, 3)),
    (128, True): BackwardConfig(_cfg(32, 64, 4, 2), _cfg(128, 64, 8, 3)),
    (256, False): BackwardConfig(_cfg(32, 64, 8, 3), _cfg(128, 32, 8, 3), dq_correct=_cfg(64, 64, 8, 2)),
    (256, True): BackwardConfig(_cfg(32, 64, 8, 2), _cfg(128, 32, 8, 3), dq_correct=_cfg(64, 64, 8, 2)),
}
# Backward tiles re-timed after the residual delta (the dQ kernel lost the correction's PK matmul and its second
# fp32 accumulator; H200, run 20, NOTES.md). D=128 causal (also windows, which take the causal entries): dK/dV
# 32x64x4w x2 stages ran 241.7/293.8/326.6/376.1 TFLOP/s at 1k/2k/4k/16k against 213.1/262.0/296.5/349.0 for the
# old 32x128x8w and 223.6/290.5/337.3/389.4 for 64x128 (which stays faster non-causal, run 11); the (512, 512)
# window backward went from 220 to 247-251 TFLOP/s per useful FLOP. D=256: dK/dV 64x32 (176 regs, no spills) +
# dQ 128x32 (236 regs) ran 4-8% faster than 32x64 + 64x64 (164 B of spills causal), both causal and not. With
# the correction instead, dQ 128x32 spills 3.2 KB (ptxas): it keeps 64x64, the fastest of run 10's pairs.
# D=256 dK/dV, session 8: the 64x32 tile runs on mma.sync (HMMA: a 32-row operand is below wgmma's 64-row
# minimum; sass shows 128 HMMA, 0 HGMMA); 32x64 (resident 64 keys) runs on wgmma: run 35, H200, dK/dV 32x64x8w
# with 3 stages backward 202/213 TFLOP/s non-causal at 2k/8k vs 174/181, and with 2 stages causal 162/195 vs
# 154/173 (3 stages causal: 140/166, slower; ptxas: 2 stages causal spills 184 B). Then dQ 128x32x8w with 3 stages
# (224 KB of shared memory, no spills) instead of 2: run 37, backward 202.8/212.8 -> 220.2/232.3 non-causal,
# 162.6/192.9 -> 175.9/206.6 causal at 2k/8k; 64x64x8w x2: 173.7/177.8, 145.2/168.7.
# Portable tables (sm80 and the ~100 KB shared-memory parts): smaller tiles, fewer stages.
_GENERIC_FWD = {
    **{(d, c): _cfg(128, 64, 4, 3) for d in (16, 32, 64) for c in (False, True)},
    **{(128, c): _cfg(128, 32, 8, 2) for c in (False, True)},
    **{(256, c): _cfg(64, 32, 8, 1) for c in (False, True)},
}
_GENERIC_BWD = {
    **{(d, c): BackwardConfig(_cfg(64, 64, 4, 2), _cfg(64, 32, 4, 2)) for d in (16, 32, 64) for c in (False, True)},
    **{(128, c): BackwardConfig(_cfg(32, 64, 4, 2), _cfg(32, 32, 4, 2)) for c in (False, True)},
    **{(256, c): BackwardConfig(_cfg(16, 32, 4, 1), _cfg(16, 16, 4, 1)) for c in (False, True)},
}  # dq tiles: spill-free for sm_80 with the delta correction (ptxas)
# float32 (exact IEEE products: tl.dot on fp32 with input_precision="ieee" runs on FMA units and holds its operands
# in registers). Chosen by ptxas reports (benchmarks/compile_check.py-style compiles with launch hints, sm_90a):
# the half-precision tiles spilled 30–120 KB per thread in fp32, which made the kernels slow and their
# local-memory reservations large enough to run parallel test processes out of GPU memory (NOTES.md, session 2).
# Spills with these: none, except dK/dV at D=128 (~0.8 KB) and D=256 (~4.5 KB).
_FP32_FWD = {
    **{(d, c): _cfg(32, 32, 4, 1) for d in (16, 32, 64) for c in (False, True)},
    **{(128, c): _cfg(32, 32, 8, 1) for c in (False, True)},
    **{(256, c): _cfg(32, 16, 8, 1) for c in (False, True)},
}
_FP32_BWD = {
    **{(d, c): BackwardConfig(_cfg(16, 32, 4, 1), _cfg(32, 32, 4, 1)) for d in (16, 32, 64) for c in (False, True)},
    **{(128, c): BackwardConfig(_cfg(16, 32, 8, 1), _cfg(32, 32, 8, 1)) for c in (False, True)},
    **{(256, c): BackwardConfig(_cfg(16, 32, 8, 1), _cfg(32, 16, 4, 1)) for c in (False, True)},
}
# Triton interpreter (CPU tests): small, unequal tiles so that full/partial splits and multi-tile loops are hit.
_INTERP_FWD = KernelConfig(32, 16, 4, 1)
_INTERP_BWD = BackwardConfig(KernelConfig(16, 32, 4, 1), KernelConfig(32, 16, 4, 1))


def _table_fwd(arch_major: int, block_d: int, causal: bool) -> KernelConfig:
    return (_SM90_FWD if arch_major == 90 or arch_major == 9 else _GENERIC_FWD)[(block_d, causal)]


def _table_bwd(arch_major: int, block_d: int, causal: bool) -> BackwardConfig:
    return (_SM90_BWD if arch_major == 90 or arch_major == 9 else _GENERIC_BWD)[(block_d, causal)]


def forward_config(device: torch.device, dtype: torch.dtype, head_dim: int, causal: bool) -> KernelConfig:
    over = _override("TILEATTN_FWD_CONFIG")
    if over:
        return KernelConfig(*over)
    if _interpreting() or device.type != "cuda":
        return _INTERP_FWD
    return _forward_config(_device_index(device), dtype, padded_head_dim(head_dim), bool(causal), _arch_override())


@functools.lru_cache(maxsize=None)
def _forward_config(device_index: int, dtype: torch.dtype, block_d: int, causal: bool,
                    arch_override=None) -> KernelConfig:
    arch = _arch(device_index, arch_override)
    elem = 4 if dtype == torch.float32 else 2
    cfg = _table_fwd(arch[0], block_d, causal) if elem == 2 else _FP32_FWD[(block_d, causal)]
    return _fit(cfg, block_d, elem, arch, "m")


def backward_config(device: torch.device, dtype: torch.dtype, head_dim: int, causal: bool) -> BackwardConfig:
    over = _override("TILEATTN_BWD_CONFIG")
    if over:
        return BackwardConfig(KernelConfig(*over[0:4]), KernelConfig(*over[4:8]))
    if _interpreting() or device.type != "cuda":
        return _INTERP_BWD
    return _backward_config(_device_index(device), dtype, padded_head_dim(head_dim), bool(causal),
                            _arch_override())


@functools.lru_cache(maxsize=None)
def _backward_config(device_index: int, dtype: torch.dtype, block_d: int, causal: bool,
                     arch_override=None) -> BackwardConfig:
    arch = _arch(device_index, arch_override)
    elem = 4 if dtype == torch.float32 else 2
    cfg = _table_bwd(arch[0], block_d, causal) if elem == 2 else _FP32_BWD[(block_d, causal)]
    dq_correct = _fit(cfg.dq_correct, block_d, elem, arch, "mm") if cfg.dq_correct else None
    return BackwardConfig(_fit(cfg.dkdv, block_d, elem, arch, "n"), _fit(cfg.dq, block_d, elem, arch, "mm"),
                          dq_correct)


@dataclass(frozen=True)
class DecodeConfig:
    block_n: int  # cache positions per tile
    num_warps: int
    num_stages: int
    programs_per_sm: int  # the default split count aims at this many (split, batch, kv_head) programs per SM
    tma: int = 0  # contiguous caches on sm_90+: K/V tiles through tensor descriptors (decode_tma)


def decode_config(head_dim: int, paged: bool = False, paged_tma: bool = False, splits: int = 0) -> DecodeConfig:
    """Split-KV decode kernel launch parameters. ``TILEATTN_DECODE_CONFIG=block_n,warps,stages,programs_per_sm[,tma]``
    overrides them (benchmarks/experiments).

    Contiguous caches, head dims <= 128: 32-key tiles, 3 stages (run 28, D=128, kernel time from torch.profiler:
    -1.4% at B=8/64k, -7% at B=1/128k, within 1% elsewhere, against 64-key tiles with 2 stages, which wait for
    every outstanding copy at the top of each tile: no overlap of a program's loads with its own compute). Paged
    caches keep 64-key tiles, 2 stages: with 3 stages the block-table lookups join the pipeline, and 32-key tiles
    cost up to +44% (run 28). Paged caches read through tensor descriptors (``paged_tma``, ``decode_tma``), head
    dims <= 128: 64-key tiles, 3 stages — one block-table entry per tile, which the pipeline carries well (H200,
    page 256, CUDA-graph µs against the gather form, run 103 / run 108: 8x64k 532 / 533 vs 561 / 562, 64x4k 246 /
    246 vs 248 / 247, B=1 131k 142 / 142 vs 170 / 169, 16x16k 255 / 254 vs 263 / 263; with 2 stages 64x4k read 327).
    D=256: 32-key tiles, 2 stages (not measured). Calls with ``splits`` >= ``decode_long_splits()`` (default 16)
    take 3 stages (paged, gather form: ``decode_paged_split_factor``) and, contiguous, head dims <= 128, 64-key
    tiles (H200, CUDA-graph µs, B=1 131k with 33 splits: run 103 126.5 vs 130.9, cuDNN 126.4; run 108 126.9 vs
    131.4, cuDNN 125.9. That config on every call lost elsewhere in run 103: 8x64k, 5 splits, 522 vs 504, 16x16k
    250 vs 247, 64x4k, one split, 277 vs 245)."""
    over = _override("TILEATTN_DECODE_CONFIG")
    if over:
        return DecodeConfig(*over)
    if _interpreting():
        return DecodeConfig(32, 4, 1, 2)
    if padded_head_dim(head_dim) >= 256:
        return DecodeConfig(32, 4, 2, 2)
    long = decode_long_splits()
    if paged:
        return DecodeConfig(64, 4, 3 if paged_tma or (long and splits >= long) else 2, 2)
    if long and splits >= long:
        return DecodeConfig(64, 4, 3, 2)
    return DecodeConfig(32, 4, 3, 2)


def decode_long_splits() -> int:
    """The split count from which a decode call counts as long-split (``decode_config``; 0: never):
    ``TILEATTN_DECODE_LONG_SPLITS``, default 16."""
    long_splits = getenv("TILEATTN_DECODE_LONG_SPLITS", "16")
    if not long_splits.isdigit():
        raise ValueError(f"TILEATTN_DECODE_LONG_SPLITS must be a split count (0: off), got {long_splits!r}")
    return int(long_splits)


def decode_paged_split_factor() -> int:
    """Paged decode calls whose default split count is long (``decode_long_splits``: few batch rows and KV heads
    for the SMs) take this many times as many splits, and their gather form 3 stages (``decode_config``). H200,
    run 143 (B=1, Hkv=8, 131k keys, CUDA-graph µs, 33 -> 66 splits): page 16 173.1 -> 135.8, page 256 141.5 ->
    131.4 (cuDNN on the contiguous cache 126.0); the contiguous cache lost with 66 (127.8 -> 146.8), so it keeps
    its count. ``TILEATTN_DECODE_PAGED_SPLITS=N`` (1: off)."""
    value = getenv("TILEATTN_DECODE_PAGED_SPLITS", "2")
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"TILEATTN_DECODE_PAGED_SPLITS must be an int >= 1, got {value!r}")
    return int(value)


def gluon_dq_persistent(causal_or_window: bool) -> bool:
    """Whether the Gluon dQ kernel runs a batched call (head dims <= 128) on a persistent grid (v35b,
    ``TILEATTN_GLUON_DQ_PERSISTENT``): at most one program per SM takes the query tiles in turn, so a tile's
    prologue (Q / dO / first K and V loads) and its dQ store overlap the previous tile's last products instead of
    costing each program a few µs with the tensor cores idle (run 155's trace: 1220 ns per key tile at 2k
    against 990 at 16k, ~7 µs fixed per program, 1 program per SM). H200, D=128, same process (run 156): dQ
    kernel non-causal 394 -> 384 / 688 -> 653 / 1217 -> 1191 / 4278 -> 4249 µs at 1k / 2k / 4k / 16k, but causal
    275 -> 311 / 420 -> 464 / 676 -> 696 / 2158 -> 2331 (cause not found: neither the item order nor the static
    schedule's balance, v35c / run 158 and ``benchmarks/persistent_balance.py``; a work queue, v35d, runs 159 and
    162, gained 2-8% of the causal dQ kernel at 1k-4k and lost 6% at 16k, removed).
    auto (default): calls without a causal mask or window; 1: every batched call; 0: none."""
    value = choice("TILEATTN_GLUON_DQ_PERSISTENT", ("0", "1", "auto"), "auto")
    return value == "1" or value == "auto" and not causal_or_window


def decode_whole_waves(paged: bool = False) -> bool:
    """Whether decode calls (head dims <= 128) with a short default split count (``decode._default_splits``, below
    ``decode_long_splits``) size it for ``programs_per_sm`` + 1 programs per SM and take one split fewer where that
    fills the programs' waves better (v33b, ``TILEATTN_DECODE_WAVES``). H200, CUDA-graph µs, same process (runs
    152-153): B=8, Hkv=8, 64k keys, 6 splits (384 programs in 396 slots) 479.9 / 490.1 against 5 (320 in 264)
    505.1, cuDNN 483.5; 7 splits (3 per SM, no rounding) 503.2. The other table rows keep their counts (16x16k 3,
    64x4k 1; 1x131k is long). v33a, the rounding alone at 2 per SM (4 splits at 8x64k), read 506.2 against 504.7,
    and 16x16k with 2 splits 258.1 against 246.5 (3). Paged calls too since run 155 (8x64k page 256: 500.8 against
    532.6 µs, page 16: 519.9 against 569.3; the other rows unchanged). ``TILEATTN_DECODE_WAVES``: all (default),
    1 = contiguous calls only, 0 = neither."""
    value = choice("TILEATTN_DECODE_WAVES", ("0", "1", "all"), "all")
    return value == "all" or value == "1" and not paged


def decode_fused_combine() -> bool:
    """Whether a split decode merges its splits inside the split kernel (the last program of each row block to
    finish does it; ``kernels/decode.py``) instead of in a second kernel. ``TILEATTN_DECODE_COMBINE=fused|kernel``;
    unset: kernel (the fused form is not yet measured on a GPU, NOTES v19e)."""
    return choice("TILEATTN_DECODE_COMBINE", ("", "fused", "kernel"), "") == "fused"


def decode_tma(cfg: DecodeConfig, q: torch.Tensor, paged: bool, page_size: int = 0, leftpad: bool = False) -> bool:
    """Whether the decode kernel reads the cache through tensor descriptors (TMA), on GPUs that have TMA (sm_90+;
    the interpreter emulates descriptors). Contiguous caches: when the config asks for it (measured no faster,
    run 64). Paged caches (session 18; default since session 20, runs 103 and 108: faster than the gather form on
    four shapes with 3 stages, ``decode_config(paged_tma=True)``; ``TILEATTN_DECODE_PAGED_TMA=0`` turns it off),
    where every key tile lies in one page (page_size a multiple of the tile's keys, no cache_leftpad shifting the
    tiles): one block-table entry per tile, then a (1, block_n, 1, D) box of that page, instead of a gather of
    block_n rows."""
    if paged:
        if not switch("TILEATTN_DECODE_PAGED_TMA", "1") or page_size % cfg.block_n or leftpad:
            return False
    elif not cfg.tma:
        return False
    if _interpreting() or q.device.type != "cuda":
        return True
    return _arch(_device_index(q.device), _arch_override())[0] >= 9


@dataclass(frozen=True)
class GluonForwardConfig:
    """The Hopper Gluon forward (kernels/gluon_forward.py): 128 query rows per program in two 64-row consumer
    warpgroups, ``block_n`` keys per tile, K and V rings of ``k_stages`` / ``v_stages`` slots, the registers per
    thread of the consumers and of the producer warp (setmaxnreg) and the kernel's ``maxnreg`` (the pool they are
    taken from: 12 warps x maxnreg <= 64K); calls with fewer than ``min_seqlen_k`` keys (``min_seqlen_k_causal``
    for causal and other right-bounded windows; ``min_seqlen_k_causal_list``, where set, for batched causal calls
    that run on the persistent grid with the host's work list) take the portable kernel, as do softcap and
    sliding-window calls when ``window_softcap`` is False. ``default_on=False``: an entry not yet measured on a
    GPU, used only with ``TILEATTN_GLUON=all``. ``persistent``: calls whose query tiles see about the same number
    of keys (no mask, or a window bounded on both sides) run on a persistent grid (``gluon_forward_schedule``)."""
    block_n: int
    k_stages: int
    v_stages: int
    consumer_regs: int
    producer_regs: int
    maxnreg: int
    min_seqlen_k: int = 0
    min_seqlen_k_causal: int = 0
    min_seqlen_k_causal_list: Optional[int] = None
    window_softcap: bool = True
    default_on: bool = True
    persistent: bool = False


# Run 52 (H200, same call, forward TFLOP/s Gluon vs the portable kernel): D=128 faster from 1k (1.07-1.27x) and
# 0.97-1.09x at 512; D=64 0.78-0.89x at 512, 0.90-1.0x at 1k, 0.99-1.02x at 2k, 1.02-1.08x from 4k.
# Run 55 (H200, same call): D=256 (64-key tiles, 2+2 stages, 197 KB shared memory) non-causal 1.41x the portable
# kernel at 1k, 1.23-1.27x from 2k, 0.88x at 512; causal 1.24-1.25x from 2k, 0.80x at 1k, 0.86x at 512.
# Features, forward TFLOP/s Gluon vs portable at 2k / 8k (runs 55-56): D=128 softcap 480/527 vs 441/462, sink
# 596/640 vs 499/499, window (512,512) 419/417 vs 353/342; D=256 softcap 589/592 vs 426/477, window 474/472 vs
# 378/382; D=64 softcap 288/321 vs 313/330 and window 274/269 vs 303/282 (slower: those stay portable), sink
# 401/451 vs 411/424.
# Run 78 (H200, same process): the persistent grid (v19a) vs the plain grid, fwd D=128 non-causal 1.08x at 1k,
# 1.05x at 2k, 1.02x at 4k, 1.00x from 8k; causal 0.85x at 512, 0.92x at 1k, 0.75x at 16k (static round-robin over
# tiles of unequal length), so causal and windowed calls keep the grid; D=64 non-causal 1.04x at 2k, 1.02x at 4k,
# 1.00x from 8k. Packed varlen (D=128, 2k random lengths) 1.13x with the work list, 0.99x without; 8k 1.02x / 0.90x.
# Run 85 (H200, same process): causal on the persistent grid with longest items first (v19c) still 0.93-0.98x the
# plain grid at D=128 and D=64 (512-16k): causal stays on the grid. D=64 non-causal on the Gluon persistent forward
# 1.10x the portable kernel at 512 keys, 1.08x at 1k and 2k (causal 0.94-0.97x: keeps 2048).
# Run 87 (H200, same process): D=256 with 3 K slots (225 KB of shared memory) against 2 + 2: causal 1k 364 vs the
# portable kernel's 292 TFLOP/s (the 2 + 2 form lost there in run 55), 2k-8k 1.01-1.03x, non-causal 0.98-1.02x.
# Session 19, runs 103-105 (H200, the 3-slot form against the portable kernel in the same process): D=256 from 512
# keys 1.33-1.40x non-causal (512: 389-408 vs 293 TFLOP/s; 768: 447 vs 332) and 1.23-1.29x causal (512: 250-261
# vs 202), so both take Gluon from 512 keys (run 99's non-causal 512 at 201 was its process's first measurement;
# run 104's first process measured both kernels low as well).
# Session 23, run 131 (H200, CUDA-graph replay, one process): D=256 on the persistent grid (v25a; causal with the
# work list) against the plain grid, µs per training forward: causal 512 128.1 -> 120.0, 1k 176.0 -> 163.6, 2k
# 274.9 -> 260.9; non-causal 512 158.0 -> 149.8, 1k 257.8 -> 248.2, 2k 427.9 -> 425.0 (cuDNN 95.6 / 148.2 / 253.3
# and 126.3 / 216.3 / 399.7): persistent by default.
# Session 20, run 107 (H200, same process, D=64 causal, thresholds lifted): the persistent grid with the causal work
# list 193 vs the portable kernel's 191 TFLOP/s at 512 keys, 277 vs 261 at 1k, 343 vs 319 at 2k (the plain Gluon
# grid 149 / 233 / 315): batched causal calls on it take Gluon from 1k keys.
_GLUON_FWD = {64: GluonForwardConfig(128, 3, 2, 240, 24, 168, min_seqlen_k=512, min_seqlen_k_causal=2048,
                                     min_seqlen_k_causal_list=1024, window_softcap=False, persistent=True),
              128: GluonForwardConfig(128, 2, 2, 240, 24, 168, persistent=True),
              256: GluonForwardConfig(64, 3, 2, 240, 24, 168, min_seqlen_k=512, min_seqlen_k_causal=512,
                                      persistent=True)}


def _gluon_entry(table: dict, head_dim: int):
    """A Gluon table's entry for a head dim as ``TILEATTN_GLUON`` allows it (0: none; all: also entries with
    ``default_on=False``), or None."""
    mode = getenv("TILEATTN_GLUON", "1")
    cfg = table.get(head_dim)
    if cfg is None or mode == "0" or (not cfg.default_on and mode != "all"):
        return None
    return cfg


def gluon_forward_config(head_dim: int) -> Optional[GluonForwardConfig]:
    """The Gluon forward's parameters for a head dim, None where it has none or the entry is off (then the
    portable kernel runs). ``TILEATTN_GLUON=0`` turns every entry off, ``TILEATTN_GLUON=all`` every entry on
    (those not yet measured included). ``TILEATTN_GLUON_FWD_CONFIG=block_n,k_stages,v_stages,consumer_regs,
    producer_regs,maxnreg`` overrides an entry's parameters (and takes every sequence length; the entry's grid
    schedule stays)."""
    cfg = _gluon_entry(_GLUON_FWD, head_dim)
    if cfg is None:
        return None
    over = _override("TILEATTN_GLUON_FWD_CONFIG", "block_n,k_stages,v_stages,consumer_regs,producer_regs,maxnreg")
    return GluonForwardConfig(*over, persistent=cfg.persistent) if over else cfg


# v37a (session 29): the D=64 persistent forward with three consumer warpgroups (192-row items, as
# FlashAttention-3 takes for head dim 64). 16 warps (the producer warp is padded to a warpgroup): 65536 / 512 = 128
# registers per thread at launch; setmaxnreg gives the two worker consumers 160 each, the producer 24 and the
# default consumer the rest (168); per SM sub-partition 3 x 160 + 24 (x 32 lanes) fits its 16K registers.
GLUON_3WG_REGS = (160, 24, 128)  # consumer_regs, producer_regs, maxnreg
GLUON_FWD_3WG_MIN_SEQLEN_Q = 1024
GLUON_FWD_3WG_MIN_SEQLEN_Q_CAUSAL = 2048


def gluon_forward_warpgroups(head_dim: int, persistent: bool, seqlen_q: int = 1 << 30,
                             causal: bool = False) -> int:
    """Consumer warpgroups of a Gluon forward call: 3 (v37a) for D=64 calls on the persistent grid without a window,
    varlen packing or the flat pipeline (``persistent``; causal ones on the host's work list, built for 192-row
    items) from ``GLUON_FWD_3WG_MIN_SEQLEN_Q`` query rows (causal: ``GLUON_FWD_3WG_MIN_SEQLEN_Q_CAUSAL``), else 2;
    its registers are ``GLUON_3WG_REGS``. Outputs are bit-identical either way (each row's arithmetic is the same).
    H200, one process, CUDA-graph µs per training forward, D=64, 16k tokens, two / three warpgroups (cuDNN):
    non-causal (run 172) 512 194.8 / 198.0 (176.7), 1k 338.2 / 331.5 (316.7), 2k 623.1 / 567.5 (603.7), 4k
    1237.5 / 1068.0 (1169.7), 16k 4817.3 / 4212.5 (4797.8); causal (run 178) 1k 230.5 / 266.8 (201.9), 2k 370.4 /
    352.6 (344.5), 4k 658.2 / 639.9 (637.9), 16k 2416.2 / 2025.1 (2344.2): a causal 192-row item's first warpgroup
    computes up to two key tiles its rows do not see, which short sequences feel. ``TILEATTN_GLUON_FWD_WG=2|3``
    forces either count within that scope."""
    value = choice("TILEATTN_GLUON_FWD_WG", ("", "2", "3"), "")
    if head_dim != 64 or not persistent:
        return 2
    if value:
        return int(value)
    return 3 if seqlen_q >= (GLUON_FWD_3WG_MIN_SEQLEN_Q_CAUSAL if causal else GLUON_FWD_3WG_MIN_SEQLEN_Q) else 2


def gluon_forward_streamk() -> bool:
    """Opt-in ``TILEATTN_GLUON_FWD_STREAMK=1`` (session 32, not yet GPU-run; ``kernels/gluon_streamk.py``): batched
    non-causal calls on the persistent Gluon forward whose items do not divide among the programs give each
    program an equal share of the key tiles, merging the items split between two programs after the kernel (the
    grid's 2048 items on 132 SMs leave 3% of the rounds idle, run 196)."""
    return switch("TILEATTN_GLUON_FWD_STREAMK")


def gluon_forward_stagger() -> int:
    """Diagnostic (``TILEATTN_GLUON_FWD_STAGGER=<ns>``, default 0 = off): the persistent Gluon forward's odd
    programs start that many ns late (``gluon_loads._load_persistent``'s STAGGER), to see with
    ``benchmarks/fwd_trace.py`` whether an item's epilogue stores and Q loads cost less when the programs' item
    boundaries do not coincide (session 32, run 195: at D=256 they take ~6.5 µs per item, about what all 132 SMs'
    64 KB bursts need at the HBM's rate). Not a speed setting: the odd programs finish that much later."""
    value = getenv("TILEATTN_GLUON_FWD_STAGGER", "0") or "0"
    if not value.isdigit():
        raise ValueError(f"TILEATTN_GLUON_FWD_STAGGER must be a whole number of ns, got {value!r}")
    return int(value)


def gluon_forward_causal_skip() -> bool:
    """v38a (default on from session 31; ``TILEATTN_GLUON_FWD_SKIP=0`` turns it off): causal calls on three consumer
    warpgroups skip, per warpgroup, the key tiles its 64 rows do not see (a 192-row item's first warpgroup computes
    up to two 128-key tiles past its diagonal otherwise). Run 183 (H200, D=64 causal): 2.0-3.6% faster than three
    warpgroups without it at 2k-4k, level at 16k; 6% faster at 1k too, where two warpgroups (7% faster still) stay
    the default. Outputs bit-identical (``gluon_forward._consumer``'s CAUSAL_SKIP)."""
    return switch("TILEATTN_GLUON_FWD_SKIP", "1")


def gluon_forward_schedule(cfg: GluonForwardConfig, head_dim: int, uneven: bool, varlen: bool,
                           causal_list: bool = False, alibi_linear: bool = False):
    """(persistent, work_list, needs_list) for a Gluon forward call: a persistent grid (one program per
    multiprocessor walking the tiles; D <= 128 stages its outputs in their own buffers, D=256 in Q's: v25a, by
    default since session 23, run 131: 1.04-1.07x the plain grid at 512-1k, 1.01-1.05x at 2k) where the entry says
    so and the call's query tiles see about the same number of keys (``uneven``: causal, or a window open on one
    side; a static round-robin over those loses to the hardware's dynamic scheduling, runs 78 and 85; windows
    bounded on both sides gain, 1.03x at 2k and 1.08x at 8k for (512, 512) in run 85), or the call is batched
    causal and walks the host's L2-grouped work list (``causal_list``: ``causal_work_list_on()``; session 20, run
    107, H200, two processes, against the plain grid: D=128 1.04-1.27x at 512, 1.11x at 1k, 1.02-1.12x at 2k, 1.07x
    at 4k-8k, 1.00x at 16k; D=64 1.07-1.10x at 2k-4k, 1.03-1.04x at 8k, 1.00x at 16k); packed varlen calls on it
    walk the work list of the query tiles that hold rows (_hostinfo.tile_map), which it needs to beat the plain
    grid (run 78). With ``needs_list``, a call whose list cannot be built (varlen: no host copy of cu_seqlens, e.g.
    in a compiled graph; causal: a CUDA graph capturing a shape not seen before, or more items than the list
    takes) takes the plain grid instead. ``TILEATTN_GLUON_PERSISTENT`` and ``TILEATTN_VARLEN_TILEMAP`` (0 or 1)
    force either one (a forced persistent grid runs with or without a list). ``alibi_linear``
    (``gluon_alibi_linear``): the plain grid unless forced."""
    forced = choice("TILEATTN_GLUON_PERSISTENT", ("", "0", "1"), "")
    persistent = forced == "1" if forced else cfg.persistent and (not uneven or causal_list) and not alibi_linear
    tiles = choice("TILEATTN_VARLEN_TILEMAP", ("", "0", "1"), "")
    work_list = varlen and (tiles == "1" if tiles else persistent)
    return persistent, work_list, (work_list or causal_list) and persistent and forced != "1"


def gluon_alibi_linear(head_dim: int, varlen: bool) -> bool:
    """Whether a Gluon forward call with ALiBi takes the linear form: batched calls at D <= 128 (varlen and D=256
    ones keep the general form: the linear one has run on a GPU for batched D=128 calls only). The linear form
    (``gluon_common.alibi_scores``: on key tiles that lie on one side of a warpgroup's rows, -slope * |q - k| is a
    column term, one FFMA per score with the scale, plus a row term folded into the max) runs on the plain grid,
    the general form (|q - k| per score) on the persistent grid. sm_90a SASS, D=128, per score on a
    full tile: plain attention ~7.2 instructions, the general form ~10.7, the linear one ~8.3. The linear form
    holds the column term in registers (32 per thread) that the persistent kernels lack (ptxas: 156-212 B spills
    against 4-16), so it runs on the plain grid. H200, run 147 (both on the plain grid): +5-10% forward TFLOP/s;
    run 144 against the general form on the persistent grid: +0.03 of dense non-causal, +0.01 causal (NOTES
    v31a). ``TILEATTN_GLUON_ALIBI=linear|general`` (read for calls in that scope only)."""
    if varlen or head_dim > 128:
        return False
    return choice("TILEATTN_GLUON_ALIBI", ("linear", "general"), "linear") == "linear"


def causal_work_list_on() -> bool:
    """Whether batched causal calls run on the persistent Gluon forward walking the host's L2-grouped work list
    (``_hostinfo.causal_schedule``, session 19; default since session 20, ``gluon_forward_schedule``).
    ``TILEATTN_CAUSAL_LIST=0`` puts them back on the plain grid (with ``TILEATTN_GLUON_PERSISTENT=1``: the
    persistent grid in the kernel's LPT order)."""
    return switch("TILEATTN_CAUSAL_LIST", "1")


@dataclass(frozen=True)
class GluonBackwardConfig:
    """The Hopper Gluon dK/dV kernel (kernels/gluon_backward.py): 128 keys per program in two 64-key consumer
    warpgroups (``split``: 64 keys per program, warpgroup 0 accumulating dV and warpgroup 1 dK), ``block_m`` query
    rows per step, a Q/dO ring of ``stages`` slots, the registers per thread of the consumers and of the producer
    warp (setmaxnreg) and the kernel's ``maxnreg``; ``pipeline``: the consumers' loop software-pipelined by one step
    (3+ stages). The Gluon dQ kernel (kernels/gluon_dq.py) shares the registers: ``dq_block_n`` keys per tile, a K
    ring of ``dq_k_stages`` slots (3: tile j-1's K stays for its product while tile j+1's loads), off with
    ``dq=False``. ``kv_regs`` (non-causal, causal): the dK/dV kernel's KV_REGS (0: its S^T / dP^T products read K
    and V from shared memory; 1: K from registers; 2: K and V; ``gluon_backward.kv_regs``)."""
    block_m: int
    stages: int
    consumer_regs: int
    producer_regs: int
    maxnreg: int
    pipeline: bool = False
    dq_block_n: int = 64
    dq_k_stages: int = 3
    dq: bool = True
    split: bool = False
    default_on: bool = True
    kv_regs: Tuple[int, int] = (0, 0)


# Run 58 (H200, gluon_bwd_sweep.py, backward TFLOP/s at 1k / 4k / 16k, same process): D=128 non-causal portable
# 290/391/421, 64-row steps plain loop 305/401/428, 32-row steps pipelined 315/414/447, 32 plain 297/387/417, 64 plain
# 3 stages 310/407/437; causal portable 201/317/381, 64 plain 217/352/428, 32 pipelined 220/357/435, 64 plain 3 stages
# 221/361/428. (D=128 with 64-row steps pipelined needs more registers than a consumer warpgroup has: ptxas
# serialises its wgmma, C7512.) D=64 non-causal portable 303/350/375, 64 pipelined 307/387/411, 64 plain 294/368/395,
# 32 pipelined 285/358/372; causal portable 201/294/333, 64 pipelined 209/326/381, 64 plain 204/319/372.
# The dQ kernel, run 59 (same process, backward TFLOP/s at 1k / 4k / 16k, with the Gluon dK/dV kernel): D=128
# non-causal portable dQ 316/413/446, Gluon dQ (64-key tiles, 3 K slots) 339/453/486, 64-key tiles 2 slots
# 295/391/396; causal 220/354/430 vs 237/391/465. D=64 non-causal portable dQ 306/383/410, Gluon 64-key 288/380/405,
# 128-key 3 slots 296/384/415; causal 208/328/378 vs 191/317/375 and 196/325/381: D=64 keeps the portable dQ.
# KV_REGS, run 139 (H200, benchmarks/bwd_variants.py, one process, backward µs best of 2 interleaved medians; dK/dV
# kernel µs by torch.profiler): D=128 non-causal with K in registers 1k / 4k / 16k 854 -> 852, 2940 -> 2780, 11081 ->
# 10568 (kernel 1749 -> 1600, 6527 -> 5930 at 4k / 16k); causal 0.995 / 1.000 / 0.999x (kernel 16k 3524 -> 3613): K
# only where it paid. D=64 with K and V: causal 1.039 / 1.016 / 1.044x (kernel 388 -> 367, 1184 -> 1091, 4258 ->
# 3908), non-causal 0.994 / 1.030 / 0.997x; K alone 0.95-1.03x. (D=128 with K and V spills 304 B.)
_GLUON_BWD = {64: GluonBackwardConfig(64, 3, 240, 24, 168, pipeline=True, dq=False, kv_regs=(0, 2)),
              128: GluonBackwardConfig(32, 4, 240, 24, 168, pipeline=True, dq=True, kv_regs=(1, 0)),
              # D=256: 64 keys per program, one accumulator per warpgroup (``split``). Run 72 (H200, one process,
              # backward TFLOP/s 512/1k/2k/4k/8k/16k): non-causal portable 178/205/222/229/233/239, split plain
              # 267/315/347/365/377/379, cuDNN 241/299/343/365/355/360; causal portable 118/151/176/192/208/210,
              # split plain 176/243/291/325/349/374, cuDNN 177/246/297/345/376/379. Split pipelined (next run in
              # the same call): non-causal 265/321/360/378/385/391 vs cuDNN 242/298/345/366/359/358, causal
              # 183/250/302/336/367/387 vs 178/235/301/343/376/380. A 4-slot Q/dO ring: the same within noise
              # (run 75). The Gluon dQ kernel with 32-key tiles and 3 K/V slots (64-key tiles need 256 KB of
              # shared memory; 2 slots were slower), run 76, one process, TFLOP/s 512..16k: portable dQ
              # non-causal 264/323/358/376/389/384, Gluon dQ 273/331/362/387/398/400, cuDNN 237/290/339/360/352/351;
              # causal 182/250/304/335/361/382 vs 199/261/315/348/377/396, cuDNN 179/245/299/337/366/374.
              256: GluonBackwardConfig(32, 3, 240, 24, 168, pipeline=True, dq=True, dq_block_n=32, dq_k_stages=3,
                                       split=True)}


def gluon_backward_config(head_dim: int) -> Optional[GluonBackwardConfig]:
    """The Gluon dK/dV kernel's parameters for a head dim, None where it has none or the entry is off (the
    portable kernel runs). ``TILEATTN_GLUON`` as for the forward (0: off; all: entries not yet measured too);
    ``TILEATTN_GLUON_BWD_CONFIG=block_m,stages,consumer_regs,producer_regs,maxnreg,pipeline[,split]`` overrides
    an entry's dK/dV parameters (split: 64 keys per program, one warpgroup accumulating dV and the other dK);
    ``TILEATTN_GLUON_DQ=0|1`` turns the Gluon dQ kernel off / on, ``=block_n,k_stages`` on with those
    parameters."""
    cfg = _gluon_entry(_GLUON_BWD, head_dim)
    if cfg is None:
        return None
    over = _override("TILEATTN_GLUON_BWD_CONFIG")
    if over and len(over) not in (6, 7):
        raise ValueError("TILEATTN_GLUON_BWD_CONFIG must be 6 or 7 integers: block_m,stages,consumer_regs,"
                         f"producer_regs,maxnreg,pipeline[,split]; got {over}")
    if over:
        cfg = dataclasses.replace(cfg, block_m=over[0], stages=over[1], consumer_regs=over[2], producer_regs=over[3],
                                  maxnreg=over[4], pipeline=bool(over[5]),
                                  split=bool(over[6]) if len(over) == 7 else cfg.split)
    dq = getenv("TILEATTN_GLUON_DQ")
    if dq and "," in dq:
        bn, ks = (int(x) for x in dq.split(","))
        cfg = dataclasses.replace(cfg, dq=True, dq_block_n=bn, dq_k_stages=ks)
    elif dq:
        cfg = dataclasses.replace(cfg, dq=dq != "0")
    return cfg
