"""The kernels registered as ``torch.library`` custom ops, with fake (meta) implementations.

Registering them lets ``torch.compile(fullgraph=True)`` trace models that call tileattn without graph breaks:
the compiler sees an opaque op with known output shapes instead of Triton launches.

Tensors are 4-D (batch, seqlen, heads, dim); varlen calls pass (1, total, heads, dim) views with
cu_seqlens_q/k. Window bounds use -1 for "unbounded". ``rng`` is int64 [seed, offset] for dropout.
The forward op's third output is out's rounding residual for the backward (configs.delta_mode), or an empty (0,)
tensor when it is not kept (fp32, inference, or TILEATTN_DELTA other than "residual").
"""

from typing import Optional, Tuple

import torch

from . import configs
from ._hostinfo import leaves_rows
from .kernels.backward import attention_backward
from .kernels.forward import attention_forward
from .kernels.params import AttnParams, residual_like


def make_params(q, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, window_left,
                window_right, softcap, alibi_slopes, sink, dropout_p, rng) -> AttnParams:
    batch = cu_seqlens_q.shape[0] - 1 if cu_seqlens_q is not None else q.shape[0]
    # For query i < Sq and key j < Sk, j - (i + Sk - Sq) lies in [1 - Sk, Sq - 1]: a window bound of Sq + Sk
    # or more changes nothing. Clamping to it keeps the kernels' int32 position arithmetic from overflowing.
    reach = max_seqlen_q + max_seqlen_k
    window_left, window_right = min(window_left, reach), min(window_right, reach)
    return AttnParams(batch=batch, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
                      softmax_scale=softmax_scale, window_left=window_left, window_right=window_right,
                      softcap=softcap, alibi_slopes=alibi_slopes, sink=sink, dropout_p=dropout_p, rng=rng,
                      cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k)


def keeps_residual(q, save_residual: bool) -> bool:
    """Whether the forward keeps out's rounding residual (read by the real op and its fake alike)."""
    return save_residual and configs.delta_mode(q.dtype) == "residual"


def fwd_impl(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, window_left,
             window_right, softcap, alibi_slopes, sink, dropout_p, rng, save_residual=False):
    """The forward op's body (called directly in eager mode, skipping the dispatcher: see api._fwd).
    Returns (out, lse, resid); resid is empty (0,) unless kept (``keeps_residual``)."""
    p = make_params(q, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, window_left,
                    window_right, softcap, alibi_slopes, sink, dropout_p, rng)
    if keeps_residual(q, save_residual):
        return attention_forward(q, k, v, p, residual=True)
    out, lse = attention_forward(q, k, v, p)
    return out, lse, q.new_empty((0,))


@torch.library.custom_op("tileattn::fwd", mutates_args=(), device_types=("cuda", "cpu"))
def flash_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: Optional[torch.Tensor],
              cu_seqlens_k: Optional[torch.Tensor], max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float,
              window_left: int, window_right: int, softcap: float, alibi_slopes: Optional[torch.Tensor],
              sink: Optional[torch.Tensor], dropout_p: float,
              rng: Optional[torch.Tensor], save_residual: bool = False
              ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return fwd_impl(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, window_left,
                    window_right, softcap, alibi_slopes, sink, dropout_p, rng, save_residual)


@flash_fwd.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, window_left, window_right,
      softcap, alibi_slopes, sink, dropout_p, rng, save_residual=False):
    batch, rows_q, q_heads, _ = q.shape
    out = q.new_empty((batch, rows_q, q_heads, v.shape[3]))
    if cu_seqlens_q is not None:
        lse = q.new_empty((q_heads, rows_q), dtype=torch.float32)
    else:
        lse = q.new_empty((batch, q_heads, rows_q), dtype=torch.float32)
    return out, lse, (residual_like(out) if keeps_residual(q, save_residual) else q.new_empty((0,)))


def bwd_impl(dout, q, k, v, out, lse, dlse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
             window_left, window_right, softcap, alibi_slopes, sink, dropout_p, rng, pack=0, resid=None):
    """Returns (dq, dk, dv, dsink); dsink is an empty (0,) tensor when there is no sink. ``resid``: the forward's
    third output (None or empty: the backward corrects delta itself).

    pack = 1: q, k, v are views of one (B, S, 3, H, D) tensor; the first output is its gradient, packed the same
    way (the kernels write into its views: no concatenation), and dk, dv are empty. pack = 2: k, v are views of
    one (B, S, 2, H, D) tensor; dk is its packed gradient and dv is empty.
    """
    p = make_params(q, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, window_left,
                    window_right, softcap, alibi_slopes, sink, dropout_p, rng)
    if resid is not None and resid.numel() == 0:
        resid = None
    # varlen rows outside every sequence get zero gradients (unless the sequences are known to cover every row)
    zero = leaves_rows(cu_seqlens_q, q.shape[1]) or leaves_rows(cu_seqlens_k, k.shape[1])
    alloc = torch.zeros if zero else torch.empty
    none = lambda: q.new_empty((0,))  # noqa: E731  (distinct placeholders: outputs may not alias)
    if pack == 1:
        dqkv = alloc(q.shape[:2] + (3,) + q.shape[2:], dtype=q.dtype, device=q.device)
        _, _, _, dsink = attention_backward(dout, q, k, v, out, lse, dlse, p, grads=dqkv.unbind(2), resid=resid)
        result = [dqkv, none(), none()]
    elif pack == 2:
        dkv = alloc(k.shape[:2] + (2,) + k.shape[2:], dtype=k.dtype, device=k.device)
        dq = alloc(q.shape, dtype=q.dtype, device=q.device)
        _, _, _, dsink = attention_backward(dout, q, k, v, out, lse, dlse, p, grads=(dq,) + dkv.unbind(2),
                                            resid=resid)
        result = [dq, dkv, none()]
    else:
        *result, dsink = attention_backward(dout, q, k, v, out, lse, dlse, p, resid=resid)
    if dsink is None:
        dsink = q.new_empty((0,), dtype=torch.float32)
    return result[0], result[1], result[2], dsink


@torch.library.custom_op("tileattn::bwd", mutates_args=(), device_types=("cuda", "cpu"))
def flash_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
              lse: torch.Tensor, dlse: Optional[torch.Tensor], cu_seqlens_q: Optional[torch.Tensor],
              cu_seqlens_k: Optional[torch.Tensor], max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float,
              window_left: int, window_right: int, softcap: float, alibi_slopes: Optional[torch.Tensor],
              sink: Optional[torch.Tensor], dropout_p: float, rng: Optional[torch.Tensor],
              pack: int = 0, resid: Optional[torch.Tensor] = None
              ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backward op: see :func:`bwd_impl`."""
    return bwd_impl(dout, q, k, v, out, lse, dlse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                    softmax_scale, window_left, window_right, softcap, alibi_slopes, sink, dropout_p, rng, pack,
                    resid)


@flash_bwd.register_fake
def _(dout, q, k, v, out, lse, dlse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
      window_left, window_right, softcap, alibi_slopes, sink, dropout_p, rng, pack=0, resid=None):
    dsink = q.new_empty((sink.shape[0] if sink is not None else 0,), dtype=torch.float32)
    if pack == 1:
        return q.new_empty(q.shape[:2] + (3,) + q.shape[2:]), q.new_empty((0,)), q.new_empty((0,)), dsink
    if pack == 2:
        return q.new_empty(q.shape), k.new_empty(k.shape[:2] + (2,) + k.shape[2:]), q.new_empty((0,)), dsink
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dsink
