"""Public API: ``attention(q, k, v, *, causal=False, softmax_scale=None, return_lse=False)``."""

import math
import numbers
from typing import Optional

import torch
import triton

from . import configs
from .ops import flash_bwd, flash_fwd

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _needs_copy(x: torch.Tensor) -> bool:
    return x.stride(-1) != 1 and x.numel() > 0 and x.shape[-1] > 1


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    """The kernels accept any strides but the last; only a tensor whose last stride isn't 1 is copied."""
    return x.contiguous() if _needs_copy(x) else x


def _check_inputs(q, k, v, causal, softmax_scale):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (batch, seqlen, heads, head_dim), got shape {tuple(t.shape)}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; supported: float16, bfloat16, float32")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got q {q.device}, k {k.device}, v {v.device}")
    if q.device.type == "cpu":
        if not triton.knobs.runtime.interpret:
            raise ValueError("q, k, v are CPU tensors: tileattn needs a CUDA device, or the Triton interpreter "
                             "(set TRITON_INTERPRET=1 before importing tileattn)")
    elif q.device.type != "cuda":
        raise ValueError(f"q, k, v must be CUDA tensors, got device {q.device}")
    batch, _, q_heads, head_dim = q.shape
    if k.shape[0] != batch or v.shape[0] != batch:
        raise ValueError(f"batch sizes differ: q {batch}, k {k.shape[0]}, v {v.shape[0]}")
    if k.shape[3] != head_dim or v.shape[3] != head_dim:
        raise ValueError(f"head_dim differs: q {head_dim}, k {k.shape[3]}, v {v.shape[3]}")
    if not configs.MIN_HEAD_DIM <= head_dim <= configs.MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be in [{configs.MIN_HEAD_DIM}, {configs.MAX_HEAD_DIM}], got {head_dim}")
    if k.shape[1] != v.shape[1]:
        raise ValueError(f"k and v sequence lengths differ: k {k.shape[1]}, v {v.shape[1]}")
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"k and v head counts differ: k {k.shape[2]}, v {v.shape[2]}")
    kv_heads = k.shape[2]
    if kv_heads == 0 or q_heads % kv_heads != 0:
        raise ValueError(f"q heads ({q_heads}) must be a multiple of k/v heads ({kv_heads}) (MQA/GQA)")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if softmax_scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, numbers.Real):
        raise TypeError(f"softmax_scale must be a number or None, got {type(softmax_scale).__name__}")
    softmax_scale = float(softmax_scale)
    if not (math.isfinite(softmax_scale) and softmax_scale > 0):
        raise ValueError(f"softmax_scale must be a positive finite number, got {softmax_scale}")
    return softmax_scale


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, softmax_scale):
        out, lse = flash_fwd(q, k, v, causal, softmax_scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.causal = causal
        ctx.softmax_scale = softmax_scale
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dk, dv = flash_bwd(_last_dim_contiguous(dout), q, k, v, out, lse, dlse, ctx.causal, ctx.softmax_scale)
        return dq, dk, dv, None, None


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
              softmax_scale: Optional[float] = None, return_lse: bool = False):
    """Exact softmax attention, computed tile by tile (FlashAttention-2), differentiable.

    Args:
        q: (batch, seqlen_q, q_heads, head_dim), float16 / bfloat16 / float32, on a CUDA device (or CPU under
            the Triton interpreter). Any strides with the last one 1 (others are copied once).
        k, v: (batch, seqlen_k, kv_heads, head_dim), same dtype and device; q_heads % kv_heads == 0
            (grouped-query / multi-query attention read the shared kv head directly, no copies).
        causal: bottom-right aligned causal mask (flash-attn >= 2.1): query i sees key j iff
            j <= i + seqlen_k - seqlen_q.
        softmax_scale: scale applied to q.k before softmax; default 1/sqrt(head_dim).
        return_lse: also return the logsumexp.

    Returns:
        out (batch, seqlen_q, q_heads, head_dim) in q's dtype; with ``return_lse`` also
        lse (batch, q_heads, seqlen_q) float32, ``ln(sum_j exp(scale * q_i . k_j))`` over visible keys.
        A query row that sees no key (causal with seqlen_q > seqlen_k, or seqlen_k == 0) gets out = 0,
        lse = -inf, and zero gradients. Gradients flow to q, k, v through out and through lse.
    """
    softmax_scale = _check_inputs(q, k, v, causal, softmax_scale)
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    out, lse = _FlashAttention.apply(q, k, v, causal, softmax_scale)
    return (out, lse) if return_lse else out
