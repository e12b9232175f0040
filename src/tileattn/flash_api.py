"""flash-attn 2.8's Python API (same names, arguments, defaults, return values), on tileattn's kernels.

Batched tensors are (batch, seqlen, heads, head_dim); varlen tensors are (total, heads, head_dim) with int32
cumulative sequence lengths ``cu_seqlens`` of length batch + 1. Extras over flash-attn: ``sink=`` (per-head
attention-sink logits, with gradient) and q/k head dim != v head dim. ``deterministic`` is accepted and
ignored: tileattn's backward is always deterministic, unless the opt-in fused backward
(``TILEATTN_GLUON_BWD_FUSED=1``, ``kernels/fused_dq.py``) is set, whose dq adds are unordered.

``return_attn_probs=True`` returns ``(out, softmax_lse, S_dmask)``. softmax_lse is fp32 (batch, heads, seqlen_q)
or (heads, total_q) for varlen. S_dmask is a testing aid: with dropout it is the bool keep-mask the kernels drew,
(batch, heads, max_seqlen_q, max_seqlen_k) (varlen: sequence b in the top-left corner of [b]), materialised
only on request; without dropout it is an empty tensor (flash-attn's returns an empty tensor there too).
"""

from typing import Optional

import torch

from .api import (_last_dim_contiguous, attention_impl, check_block_table, check_features, check_int32_offsets,
                  check_qkv, check_varlen, check_window, new_rng_state)
from .decode import flash_attn_with_kvcache  # noqa: F401  (re-exported: flash-attn's decode entry point)
from .kernels.dropout import dropout_keep_mask
from .kernels.forward import attention_forward
from .ops import make_params


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
         sink, cu_q=None, cu_k=None, max_q=None, max_k=None, varlen=False):
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
    [cu_seqlens[b], cu_seqlens[b+1]). Sequences never attend across their boundaries.

    With ``block_table`` (batch, max_pages) int32, k and v are paged caches (num_blocks, page_size, Hkv, D) (any
    power-of-two page size) and key j of sequence b (j < its length in cu_seqlens_k) is slot j % page_size of page
    block_table[b, j // page_size]. As in flash-attn, the paged form has no backward (inference)."""
    if block_table is not None:
        return _run_paged(q, k, v, block_table, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                          softmax_scale, causal, window_size, softcap, alibi_slopes, return_attn_probs, sink)
    return _run(q, k, v, 0, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                return_attn_probs, sink, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, varlen=True)


def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, causal=False,
                                     window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
                                     return_attn_probs=False, *, sink: Optional[torch.Tensor] = None):
    """qkv (total, 3, H, D) -> out (total, H, D); packed gradient."""
    _check_packed("qkv", qkv, 4, 3)
    return _run(qkv, None, None, 1, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                return_attn_probs, sink, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, varlen=True)


def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                                    softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                                    alibi_slopes=None, deterministic=False, return_attn_probs=False, *,
                                    sink: Optional[torch.Tensor] = None):
    """q (total_q, Hq, D), kv (total_k, 2, Hkv, D) -> out (total_q, Hq, D); kv's gradient comes back packed."""
    _check_packed("kv", kv, 4, 2)
    return _run(q, kv, None, 2, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                return_attn_probs, sink, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, varlen=True)


def _run_paged(q, k, v, block_table, cu_q, cu_k, max_q, max_k, dropout_p, softmax_scale, causal, window_size,
               softcap, alibi_slopes, return_attn_probs, sink):
    """flash_attn_varlen_func with a paged K/V cache: validated here, then the forward kernel's PAGED mode."""
    for name, t in (("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"with block_table, {name} must be a paged cache (num_blocks, page_size, kv_heads, "
                             f"head_dim), got shape {tuple(t.shape)}")
    if tuple(v.shape[:2]) != tuple(k.shape[:2]):
        raise ValueError(f"k and v caches differ in blocks or page size: k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape[0] == 0:
        raise ValueError("the paged k and v caches have no blocks")
    if k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("the paged k and v caches must have a contiguous last dimension")
    scale = check_qkv(q, k[0], v[0], causal, softmax_scale, varlen=True)
    cu_q, cu_k, batch, max_q, max_k = check_varlen(cu_q, cu_k, max_q, max_k, q, None)
    block_table, page_size, capacity = check_block_table(block_table, batch, k, q.device,
                                                         not torch.compiler.is_compiling())
    if max_k > capacity:
        raise ValueError(f"max_seqlen_k ({max_k}) exceeds the {capacity} keys block_table can address "
                         f"({block_table.shape[1]} pages of {page_size})")
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        raise ValueError("flash_attn_varlen_func with block_table has no backward (as in flash-attn): call it "
                         "under torch.no_grad() or with tensors that do not require grad")
    window = check_window(window_size, causal)
    q_heads = q.shape[-2]
    softcap, alibi_slopes, sink, dropout_p = check_features(q, batch, q_heads, softcap, alibi_slopes, sink,
                                                            dropout_p)
    rng = new_rng_state(q.device) if dropout_p > 0 else None
    p = make_params(q, cu_q, cu_k, max_q, max_k, scale, window[0], window[1], softcap, alibi_slopes, sink,
                    dropout_p, rng)
    qk = _last_dim_contiguous(q).unsqueeze(0)
    check_int32_offsets("q", qk, max_q)  # as for every other forward (pages are addressed with 64-bit offsets)
    out, lse = attention_forward(qk, k, v, p, block_table=block_table)
    return _finish(out[0], lse, rng, dropout_p, return_attn_probs, batch, q_heads, max_q, max_k)
