"""Materialise the dropout keep-mask that the forward and backward kernels generate (a testing aid, O(N^2))."""

import torch
import triton
import triton.language as tl

from .. import configs
from .common import dropout_keep


@triton.jit
def _dropout_mask_kernel(MASK, RNG, max_seqlen_q, max_seqlen_k, dropout_p,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    bh = tl.program_id(2)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    keep = dropout_keep(tl.load(RNG), tl.load(RNG + 1), rows[:, None], cols[None, :],
                        bh.to(tl.int64) * max_seqlen_q, max_seqlen_k, dropout_p)
    ptrs = MASK + (bh.to(tl.int64) * max_seqlen_q + rows[:, None]) * max_seqlen_k + cols[None, :]
    tl.store(ptrs, keep.to(tl.int8), mask=(rows[:, None] < max_seqlen_q) & (cols[None, :] < max_seqlen_k))


def dropout_keep_mask(rng: torch.Tensor, batch: int, q_heads: int, max_seqlen_q: int, max_seqlen_k: int,
                      dropout_p: float) -> torch.Tensor:
    """bool (batch, q_heads, max_seqlen_q, max_seqlen_k): True where the kernels keep an attention weight.

    For varlen calls, sequence b uses the top-left [seqlen_q_b, seqlen_k_b] corner of mask[b].
    """
    mask = torch.empty((batch, q_heads, max_seqlen_q, max_seqlen_k), dtype=torch.int8, device=rng.device)
    if mask.numel():
        grid = (configs.cdiv(max_seqlen_q, 32), configs.cdiv(max_seqlen_k, 32), batch * q_heads)
        _dropout_mask_kernel[grid](mask, rng, max_seqlen_q, max_seqlen_k, float(dropout_p), BLOCK_M=32, BLOCK_N=32)
    return mask.bool()
