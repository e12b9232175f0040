"""flash-attn 2.8's Python API (same names, arguments, defaults, return values), on tileattn's kernels.

Batched tensors are (batch, seqlen, heads, head_dim); varlen tensors are (total, heads, head_dim) with int32
cumulative sequence lengths ``cu_seqlens`` of length batch + 1. Extras over flash-attn: ``sink=`` (per-head
attention-sink logits, with gradient) and q/k head dim != v head dim. ``deterministic`` is accepted and
ignored: tileattn's backward is always deterministic.

``return_attn_probs=True`` returns ``(out, softmax_lse, S_dmask)``. softmax_lse is fp32 (batch, heads, seqlen_q)
or (heads, total_q) for varlen. S_dmask is a testing aid: with dropout it is the bool keep-mask the kernels drew,
(batch, heads, max_seqlen_q, max_seqlen_k) (varlen: sequence b in the top-left corner of [b]), materialised
only on request; without dropout it is an empty tensor (flash-attn's returns an empty tensor there too).
"""

from typing import Optional

import torch

from .api import attention_impl, check_features, check_qkv, check_varlen, check_window
from .decode import flash_attn_with_kvcache  # noqa: F401  (re-exported: flash-attn's decode entry point)
from .kernels.dropout import dropout_keep_mask


def _finish(out, lse, rng, dropout_p, return_attn_probs, batch, q_heads, max_q, max_k):
    if not return_attn_probs:
        return out
    if rng is not None:
        s_dmask = dropout_keep_mask(rng, batch, q_heads, max_q, max_k, dropout_p)
    else:
        s_dmask = torch.empty(0, dtype=torch.bool, device=out.device)
    return out, lse, s_dmask


def _check_packed(name, t, rank, n):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != rank or t.shape[-3] != n:
        raise ValueError(f"{name} must be {rank}-D with size {n} at dim {rank - 3}, got shape {tuple(t.shape)}")


def _run(q, k, v, pack, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, return_attn_probs,
         sink, cu_q=None, cu_k=None, max_q=None, max_k=None):
    varlen = cu_q is not None
    qv, kv, vv = (q, k, v) if pack == 0 else (
        q.unbind(-3) if pack == 1 else (q,) + tuple(k.unbind(-3)))
    scale = check_qkv(qv, kv, vv, causal, softmax_scale, varlen=varlen)
    window = check_window(window_size, causal)
    q_heads = qv.shape[-2]
    if varlen:
        cu_q, cu_k, batch, max_q, max_k = check_varlen(cu_q, cu_k, max_q, max_k, qv, kv)
    else:
        batch, max_q, max_k = qv.shape[0], qv.shape[1], kv.shape[1]
    softcap, alibi_slopes, sink, dropout_p = check_features(qv, batch, q_heads, softcap, alibi_slopes, sink,
                                                            dropout_p)
    out, lse, rng = attention_impl(q, k, v, softmax_scale=scale, window=window, softcap=softcap,
                                   alibi_slopes=alibi_slopes, sink=sink, dropout_p=dropout_p, cu_seqlens_q=cu_q,
                                   cu_seqlens_k=cu_k, max_seqlen_q=max_q, max_seqlen_k=max_k, pack=pack)
    return _finish(out, lse, rng, dropout_p, return_attn_probs, batch, q_heads, max_q, max_k)


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False, *,
                    sink: Optional[torch.Tensor] = None):
    """q (B, Sq, Hq, D), k (B, Sk, Hkv, D), v (B, Sk, Hkv, Dv) -> out (B, Sq, Hq, Dv)."""
    return _run(q, k, v, 0, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                return_attn_probs, sink)


def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                              softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False, *,
                              sink: Optional[torch.Tensor] = None):
    """qkv (B, S, 3, H, D) -> out (B, S, H, D); the gradient is one packed (B, S, 3, H, D) tensor."""
    _check_packed("qkv", qkv, 5, 3)
    return _run(qkv, None, None, 1, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                return_attn_probs, sink)


def flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                             softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False, *,
                             sink: Optional[torch.Tensor] = None):
    """q (B, Sq, Hq, D), kv (B, Sk, 2, Hkv, D) -> out (B, Sq, Hq, D); kv's gradient comes back packed."""
    _check_packed("kv", kv, 5, 2)
    return _run(q, kv, None, 2, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                return_attn_probs, sink)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None, *,
                           sink: Optional[torch.Tensor] = None):
    """q (total_q, Hq, D), k (total_k, Hkv, D), v (total_k, Hkv, Dv); sequence b is rows
    [cu_seqlens[b], cu_seqlens[b+1]). Sequences never attend across their boundaries."""
    if block_table is not None:
        raise NotImplementedError("block_table (paged KV) in flash_attn_varlen_func is not supported yet; "
                                  "use a contiguous KV")
    return _run(q, k, v, 0, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                return_attn_probs, sink, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)


def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, causal=False,
                                     window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
                                     return_attn_probs=False, *, sink: Optional[torch.Tensor] = None):
    """qkv (total, 3, H, D) -> out (total, H, D); packed gradient."""
    _check_packed("qkv", qkv, 4, 3)
    return _run(qkv, None, None, 1, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                return_attn_probs, sink, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen)


def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                                    softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                                    alibi_slopes=None, deterministic=False, return_attn_probs=False, *,
                                    sink: Optional[torch.Tensor] = None):
    """q (total_q, Hq, D), kv (total_k, 2, Hkv, D) -> out (total_q, Hq, D); kv's gradient comes back packed."""
    _check_packed("kv", kv, 4, 2)
    return _run(q, kv, None, 2, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                return_attn_probs, sink, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
