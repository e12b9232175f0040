"""``flash_attn.flash_attn_interface`` of flash-attn 2.8, on tileattn's kernels.

Public functions: re-exported from :mod:`tileattn.flash_api`.

Private functions (used directly by ring / context-parallel attention libraries and DeepSpeed): same names,
parameters, defaults and return tuples as flash-attn 2.8, running on the custom ops ``torch.ops.tileattn.fwd``
and ``torch.ops.tileattn.bwd``. They are not differentiable themselves (inputs are detached): the forward
returns ``(out, softmax_lse, S_dmask, rng_state)``, and the backward writes dq, dk, dv in place and returns
``softmax_d``. Differences from flash-attn 2.8, all deliberate:

* ``softmax_lse``: fp32 (batch, heads, seqlen_q), or (heads, total_q) for varlen (same as flash-attn).
  ``softmax_d`` = rowsum(dout * out) in fp32 with the same shape as ``softmax_lse``: flash-attn pads it to
  a multiple of 128 rows (and 128 rows per sequence for varlen).
* ``S_dmask``: with dropout and ``return_softmax=True``, the bool keep-mask the kernels drew
  (batch, heads, max_seqlen_q, max_seqlen_k) (flash-attn returns its padded, sign-encoded probabilities);
  otherwise an empty tensor of q's dtype.
* ``rng_state``: int64 (2,) ``[seed, offset]`` with dropout, zeros without; pass the forward's to the backward
  (required when dropout_p > 0).
* ``deterministic`` is ignored: the backward is always deterministic (unless the opt-in fused backward,
  ``TILEATTN_GLUON_BWD_FUSED=1``, is set). ``softmax_scale=None`` means 1/sqrt(head_dim). q/k head dim may differ from v's.
* ``block_table`` (paged K/V, forward only) in ``_flash_attn_varlen_forward``: without dropout.
  Not supported: ``leftpad_k``, ``seqused_k`` (NotImplementedError).
"""

from typing import Optional, Tuple

import torch

from ... import ops as _ops  # noqa: F401  (registers torch.ops.tileattn.fwd / bwd)
from ...api import (_last_dim_contiguous, check_features, check_int32_offsets, check_qkv, check_varlen, check_window,
                    new_rng_state)
from ...flash_api import (flash_attn_func, flash_attn_kvpacked_func, flash_attn_qkvpacked_func,
                          flash_attn_varlen_func, flash_attn_varlen_kvpacked_func, flash_attn_varlen_qkvpacked_func,
                          flash_attn_with_kvcache)
from ...kernels.dropout import dropout_keep_mask

__all__ = [
    "flash_attn_func",
    "flash_attn_kvpacked_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func",
    "flash_attn_with_kvcache",
    "_flash_attn_forward",
    "_flash_attn_varlen_forward",
    "_flash_attn_backward",
    "_flash_attn_varlen_backward",
    "_wrapped_flash_attn_forward",
    "_wrapped_flash_attn_varlen_forward",
    "_wrapped_flash_attn_backward",
    "_wrapped_flash_attn_varlen_backward",
    "maybe_contiguous",
    "round_multiple",
]


def maybe_contiguous(x):
    """``x`` if its last stride is 1 (or it is None), else a contiguous copy."""
    return x.contiguous() if x is not None and x.stride(-1) != 1 else x


def round_multiple(x, m):
    return (x + m - 1) // m * m


# ----------------------------------------------------------------------------------------------- validation
def _setup(q, k, v, causal, softmax_scale, window_size_left, window_size_right, softcap, alibi_slopes, dropout_p,
           cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None):
    """Validate one call; returns (scale, (wl, wr), softcap, alibi, dropout_p, batch, cu_q, cu_k, max_q, max_k)."""
    varlen = cu_seqlens_q is not None or cu_seqlens_k is not None
    scale = check_qkv(q, k, v, causal, softmax_scale, varlen=varlen)
    window = check_window((window_size_left, window_size_right), causal)
    if varlen:
        cu_q, cu_k, batch, max_q, max_k = check_varlen(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, q, k)
    else:
        cu_q = cu_k = None
        batch, max_q, max_k = q.shape[0], q.shape[1], k.shape[1]
    softcap, alibi, _, dropout_p = check_features(q, batch, q.shape[-2], softcap, alibi_slopes, None, dropout_p)
    return scale, window, softcap, alibi, dropout_p, batch, cu_q, cu_k, max_q, max_k


def _unsupported(**kwargs):
    for name, value in kwargs.items():
        if value is not None:
            raise NotImplementedError(f"{name} is not supported by tileattn's flash-attn shim yet (pass None)")


def _kernel_view(t, varlen):
    """Detached, last-dim-contiguous, 4-D view for the custom ops (varlen: (1, total, H, D))."""
    t = _last_dim_contiguous(t.detach())
    return t.unsqueeze(0) if varlen else t


def _check_offsets(varlen, max_q, max_k, **tensors):
    """api.check_int32_offsets for every tensor the kernels address (the private functions take any strides)."""
    for name, t in tensors.items():
        check_int32_offsets(name, _kernel_view(t, varlen), max_k if name in ("k", "v") else max_q)


def _check_like(name, t, shape, device, dtype=None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, q on {device}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{name} must be {dtype}, got {t.dtype}")


# ------------------------------------------------------------------------------------------------- forward
def _forward(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, softmax_scale, causal, window_size_left,
             window_size_right, softcap, alibi_slopes, return_softmax):
    scale, (wl, wr), softcap, alibi, dropout_p, batch, cu_q, cu_k, max_q, max_k = _setup(
        q, k, v, causal, softmax_scale, window_size_left, window_size_right, softcap, alibi_slopes, dropout_p,
        cu_q, cu_k, max_q, max_k)
    varlen = cu_q is not None
    _check_offsets(varlen, max_q, max_k, q=q, k=k, v=v)
    rng = new_rng_state(q.device) if dropout_p > 0 else None
    with torch.no_grad():
        # no residual: flash-attn's private backward receives only out and lse (its delta is corrected instead)
        out, lse, _ = torch.ops.tileattn.fwd(_kernel_view(q, varlen), _kernel_view(k, varlen),
                                             _kernel_view(v, varlen), cu_q, cu_k, max_q, max_k, scale, wl, wr,
                                             softcap, alibi, None, dropout_p, rng)
    if varlen:
        out = out.squeeze(0)
    if return_softmax and rng is not None:
        s_dmask = dropout_keep_mask(rng, batch, q.shape[-2], max_q, max_k, dropout_p)
    else:
        s_dmask = torch.empty((0,), dtype=q.dtype, device=q.device)
    rng_state = rng if rng is not None else torch.zeros((2,), dtype=torch.int64, device=q.device)
    return out, lse, s_dmask, rng_state


def _flash_attn_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dropout_p: float,
    softmax_scale: float,
    causal: bool,
    window_size_left: int,
    window_size_right: int,
    softcap: float,
    alibi_slopes: Optional[torch.Tensor],
    return_softmax: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """q (B, Sq, Hq, D), k (B, Sk, Hkv, D), v (B, Sk, Hkv, Dv) -> (out, softmax_lse, S_dmask, rng_state).

    out (B, Sq, Hq, Dv); softmax_lse fp32 (B, Hq, Sq); see the module docstring for S_dmask and rng_state.
    """
    return _forward(q, k, v, None, None, None, None, dropout_p, softmax_scale, causal, window_size_left,
                    window_size_right, softcap, alibi_slopes, return_softmax)


def _flash_attn_varlen_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float,
    softmax_scale: float,
    causal: bool,
    window_size_left: int = -1,
    window_size_right: int = -1,
    softcap: float = 0.0,
    alibi_slopes: Optional[torch.Tensor] = None,
    return_softmax: bool = False,
    block_table: Optional[torch.Tensor] = None,
    leftpad_k: Optional[torch.Tensor] = None,
    seqused_k: Optional[torch.Tensor] = None,
    zero_tensors: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """q (total_q, Hq, D), k (total_k, Hkv, D), v (total_k, Hkv, Dv) -> (out, softmax_lse, S_dmask, rng_state).

    out (total_q, Hq, Dv); softmax_lse fp32 (Hq, total_q). ``zero_tensors=True``: rows of q past
    ``cu_seqlens_q[-1]`` get out = 0 and lse = -inf (otherwise they are left unwritten, as in flash-attn).
    """
    _unsupported(leftpad_k=leftpad_k, seqused_k=seqused_k)
    if block_table is not None:  # paged K/V: k, v are (num_blocks, page_size, Hkv, D) caches; forward only
        if dropout_p:
            raise NotImplementedError("block_table with dropout_p > 0 is not supported by tileattn's shim")
        with torch.no_grad():
            out, lse, _ = flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                                 0.0, softmax_scale, causal, (window_size_left, window_size_right),
                                                 softcap, alibi_slopes, False, True, block_table)
        s_dmask = torch.empty(0, dtype=q.dtype, device=q.device)
        rng_state = torch.zeros(2, dtype=torch.int64, device=q.device)
    else:
        out, lse, s_dmask, rng_state = _forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                                dropout_p, softmax_scale, causal, window_size_left,
                                                window_size_right, softcap, alibi_slopes, return_softmax)
    if zero_tensors:
        outside = torch.arange(out.shape[0], device=out.device) >= cu_seqlens_q[-1]
        out.masked_fill_(outside[:, None, None], 0)
        lse.masked_fill_(outside[None, :], float("-inf"))
    return out, lse, s_dmask, rng_state


# ------------------------------------------------------------------------------------------------ backward
def _backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, cu_q, cu_k, max_q, max_k, dropout_p, softmax_scale,
              causal, window_size_left, window_size_right, softcap, alibi_slopes, rng_state):
    scale, (wl, wr), softcap, alibi, dropout_p, batch, cu_q, cu_k, max_q, max_k = _setup(
        q, k, v, causal, softmax_scale, window_size_left, window_size_right, softcap, alibi_slopes, dropout_p,
        cu_q, cu_k, max_q, max_k)
    varlen = cu_q is not None
    out_shape = tuple(q.shape[:-1]) + (v.shape[-1],)
    _check_like("dout", dout, out_shape, q.device)
    _check_like("out", out, out_shape, q.device)
    if dout.dtype != q.dtype or out.dtype != q.dtype:
        raise TypeError(f"dout and out must have q's dtype {q.dtype}, got {dout.dtype} and {out.dtype}")
    _check_offsets(varlen, max_q, max_k, q=q, k=k, v=v, out=out, dout=dout)
    q_heads = q.shape[-2]
    lse_shape = (q_heads, q.shape[0]) if varlen else (batch, q_heads, q.shape[1])
    _check_like("softmax_lse", softmax_lse, lse_shape, q.device, torch.float32)
    for name, buf, ref in (("dq", dq, q), ("dk", dk, k), ("dv", dv, v)):
        if buf is not None:
            _check_like(name, buf, ref.shape, q.device)
    rng = None
    if dropout_p > 0:
        if rng_state is None:
            raise ValueError("dropout_p > 0 needs the forward's rng_state (the dropout mask is regenerated from it)")
        _check_like("rng_state", rng_state, (2,), q.device, torch.int64)
        rng = rng_state.contiguous()
    with torch.no_grad():
        dout_k, out_k = _kernel_view(dout, varlen), _kernel_view(out, varlen)
        grads = torch.ops.tileattn.bwd(dout_k, _kernel_view(q, varlen), _kernel_view(k, varlen),
                                       _kernel_view(v, varlen), out_k, softmax_lse.detach().contiguous(), None,
                                       cu_q, cu_k, max_q, max_k, scale, wl, wr, softcap, alibi, None, dropout_p,
                                       rng, 0)
        for buf, grad in zip((dq, dk, dv), grads[:3]):
            if buf is not None:
                buf.copy_(grad.squeeze(0) if varlen else grad)
        softmax_d = (dout.detach().float() * out.detach().float()).sum(-1)  # (B, Sq, Hq) or (total_q, Hq)
        softmax_d = softmax_d.t() if varlen else softmax_d.transpose(1, 2)
    return softmax_d.contiguous()


def _flash_attn_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    softmax_lse: torch.Tensor,
    dq: Optional[torch.Tensor],
    dk: Optional[torch.Tensor],
    dv: Optional[torch.Tensor],
    dropout_p: float,
    softmax_scale: float,
    causal: bool,
    window_size_left: int,
    window_size_right: int,
    softcap: float,
    alibi_slopes: Optional[torch.Tensor],
    deterministic: bool,
    rng_state: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Gradients of attention w.r.t. q, k, v written into dq, dk, dv (any that are not None); returns
    softmax_d = rowsum(dout * out), fp32 (B, Hq, Sq). ``out`` and ``softmax_lse`` are the forward's (or, as in
    ring attention, the final merged ones)."""
    return _backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, None, None, None, None, dropout_p, softmax_scale,
                     causal, window_size_left, window_size_right, softcap, alibi_slopes, rng_state)


def _flash_attn_varlen_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    softmax_lse: torch.Tensor,
    dq: Optional[torch.Tensor],
    dk: Optional[torch.Tensor],
    dv: Optional[torch.Tensor],
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float,
    softmax_scale: float,
    causal: bool,
    window_size_left: int,
    window_size_right: int,
    softcap: float,
    alibi_slopes: Optional[torch.Tensor],
    deterministic: bool,
    rng_state: Optional[torch.Tensor] = None,
    zero_tensors: bool = False,
) -> torch.Tensor:
    """Varlen backward: writes dq, dk, dv in place (rows outside every sequence get zeros, so
    ``zero_tensors`` changes nothing); returns softmax_d fp32 (Hq, total_q)."""
    return _backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                     max_seqlen_k, dropout_p, softmax_scale, causal, window_size_left, window_size_right, softcap,
                     alibi_slopes, rng_state)


# flash-attn 2.8 binds these to its torch.ops.flash_attn.* custom ops; libraries import either name.
_wrapped_flash_attn_forward = _flash_attn_forward
_wrapped_flash_attn_varlen_forward = _flash_attn_varlen_forward
_wrapped_flash_attn_backward = _flash_attn_backward
_wrapped_flash_attn_varlen_backward = _flash_attn_varlen_backward
