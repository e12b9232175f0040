"""Tile sizes, warps and pipeline stages, chosen per (arch, dtype, head dim, causal), outside the kernels.

The numbers for sm90 were picked by measurement (benchmarks/tune.py, results in benchmarks/NOTES.md). Other
architectures get conservative tiles that fit their shared memory. ``TILEATTN_FWD_CONFIG`` /
``TILEATTN_BWD_CONFIG`` environment variables override the table for experiments (see ``_override``).
"""

import functools
import os
from dataclasses import dataclass

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
    pre_block_m: int = 64


def padded_head_dim(head_dim: int) -> int:
    """Register tile width for a head dim: next power of two, at least 16 (the tensor-core k minimum)."""
    return max(16, triton.next_power_of_2(head_dim))


def _interpreting() -> bool:
    return bool(triton.knobs.runtime.interpret)


@functools.lru_cache(maxsize=None)
def _arch(device_index: int):
    return torch.cuda.get_device_capability(device_index)


def _shared_memory_bytes(arch) -> int:
    # Opt-in shared memory per block by compute capability.
    return {(8, 0): 163 * 1024, (8, 7): 163 * 1024, (9, 0): 227 * 1024}.get(tuple(arch), 99 * 1024)


def _fits(cfg: KernelConfig, block_d: int, elem: int, arch, resident_rows: int) -> bool:
    """Rough shared-memory need: streamed tiles (two per stage) plus the resident tile(s)."""
    streamed = 2 * cfg.num_stages * max(cfg.block_n, cfg.block_m) * block_d * elem
    return streamed + resident_rows * block_d * elem <= _shared_memory_bytes(arch)


def _override(name: str):
    value = os.environ.get(name)
    if not value:
        return None
    return [int(x) for x in value.split(",")]


# sm90 tables: head-dim tile -> config. (block_m, block_n, warps, stages)
_SM90_FWD = {
    16: KernelConfig(128, 64, 4, 3),
    32: KernelConfig(128, 64, 4, 3),
    64: KernelConfig(128, 64, 4, 3),
    128: KernelConfig(128, 64, 8, 3),
    256: KernelConfig(128, 64, 8, 2),
}
_SM90_BWD = {  # dkdv (block_m streamed, block_n resident), dq (block_m resident, block_n streamed)
    16: BackwardConfig(KernelConfig(64, 128, 8, 3), KernelConfig(128, 64, 8, 3)),
    32: BackwardConfig(KernelConfig(64, 128, 8, 3), KernelConfig(128, 64, 8, 3)),
    64: BackwardConfig(KernelConfig(64, 128, 8, 3), KernelConfig(128, 64, 8, 3)),
    128: BackwardConfig(KernelConfig(64, 128, 8, 2), KernelConfig(128, 64, 8, 2)),
    256: BackwardConfig(KernelConfig(32, 64, 8, 2), KernelConfig(64, 32, 8, 2)),
}
# Portable tables (sm80 and newer consumer parts): smaller tiles, fewer stages.
_GENERIC_FWD = {
    16: KernelConfig(128, 64, 4, 3),
    32: KernelConfig(128, 64, 4, 3),
    64: KernelConfig(128, 64, 4, 3),
    128: KernelConfig(128, 32, 8, 2),
    256: KernelConfig(64, 32, 8, 1),
}
_GENERIC_BWD = {
    16: BackwardConfig(KernelConfig(64, 64, 4, 2), KernelConfig(64, 64, 4, 2)),
    32: BackwardConfig(KernelConfig(64, 64, 4, 2), KernelConfig(64, 64, 4, 2)),
    64: BackwardConfig(KernelConfig(64, 64, 4, 2), KernelConfig(64, 64, 4, 2)),
    128: BackwardConfig(KernelConfig(32, 64, 4, 2), KernelConfig(64, 32, 4, 2)),
    256: BackwardConfig(KernelConfig(16, 32, 4, 1), KernelConfig(32, 16, 4, 1)),
}
# Triton interpreter (CPU tests): small, unequal tiles so that full/partial splits and multi-tile loops are hit.
_INTERP_FWD = KernelConfig(32, 16, 4, 1)
_INTERP_BWD = BackwardConfig(KernelConfig(16, 32, 4, 1), KernelConfig(32, 16, 4, 1), pre_block_m=32)


def forward_config(device: torch.device, dtype: torch.dtype, head_dim: int, causal: bool) -> KernelConfig:
    over = _override("TILEATTN_FWD_CONFIG")
    if over:
        return KernelConfig(*over)
    if _interpreting() or device.type != "cuda":
        return _INTERP_FWD
    block_d = padded_head_dim(head_dim)
    arch = _arch(device.index if device.index is not None else torch.cuda.current_device())
    elem = 4 if dtype == torch.float32 else 2
    if arch[0] == 9 and elem == 2:
        cfg = _SM90_FWD[block_d]
    else:
        cfg = _GENERIC_FWD[block_d]
    while not _fits(cfg, block_d, elem, arch, cfg.block_m) and cfg.num_stages > 1:
        cfg = KernelConfig(cfg.block_m, cfg.block_n, cfg.num_warps, cfg.num_stages - 1)
    if elem == 4 and block_d >= 128:
        cfg = KernelConfig(min(cfg.block_m, 64), min(cfg.block_n, 32), cfg.num_warps, 1)
    return cfg


def backward_config(device: torch.device, dtype: torch.dtype, head_dim: int, causal: bool) -> BackwardConfig:
    over = _override("TILEATTN_BWD_CONFIG")
    if over:
        return BackwardConfig(KernelConfig(*over[0:4]), KernelConfig(*over[4:8]))
    if _interpreting() or device.type != "cuda":
        return _INTERP_BWD
    block_d = padded_head_dim(head_dim)
    arch = _arch(device.index if device.index is not None else torch.cuda.current_device())
    elem = 4 if dtype == torch.float32 else 2
    table = _SM90_BWD if (arch[0] == 9 and elem == 2) else _GENERIC_BWD
    cfg = table[block_d]
    if elem == 4:
        cfg = BackwardConfig(
            KernelConfig(min(cfg.dkdv.block_m, 32), min(cfg.dkdv.block_n, 64 if block_d <= 64 else 32), 4, 1),
            KernelConfig(min(cfg.dq.block_m, 64 if block_d <= 64 else 32), min(cfg.dq.block_n, 32), 4, 1),
        )
    return cfg
