"""The kernels registered as ``torch.library`` custom ops, with fake (meta) implementations.

Registering them lets ``torch.compile(fullgraph=True)`` trace models that call tileattn without graph breaks:
the compiler sees an opaque op with known output shapes instead of Triton launches.
"""

from typing import Optional, Tuple

import torch

from .kernels.backward import attention_backward
from .kernels.forward import attention_forward


@torch.library.custom_op("tileattn::fwd", mutates_args=(), device_types=("cuda", "cpu"))
def flash_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
              softmax_scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    return attention_forward(q, k, v, causal, softmax_scale)


@flash_fwd.register_fake
def _(q, k, v, causal, softmax_scale):
    batch, seqlen_q, q_heads, head_dim = q.shape
    out = q.new_empty((batch, seqlen_q, q_heads, head_dim))
    lse = q.new_empty((batch, q_heads, seqlen_q), dtype=torch.float32)
    return out, lse


@torch.library.custom_op("tileattn::bwd", mutates_args=(), device_types=("cuda", "cpu"))
def flash_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
              lse: torch.Tensor, dlse: Optional[torch.Tensor], causal: bool,
              softmax_scale: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return attention_backward(dout, q, k, v, out, lse, dlse, causal, softmax_scale)


@flash_bwd.register_fake
def _(dout, q, k, v, out, lse, dlse, causal, softmax_scale):
    return torch.empty_like(q, memory_format=torch.contiguous_format), \
        torch.empty_like(k, memory_format=torch.contiguous_format), \
        torch.empty_like(v, memory_format=torch.contiguous_format)
