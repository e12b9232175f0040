"""``flash_attn_with_kvcache``: decode / chunked prefill against a KV cache (contiguous or paged), split-KV.

Status: tested in Triton's interpreter and on an H200 (sessions 2-4, ``cache_leftpad`` and CUDA-graph capture
with host reads skipped included); speed in BENCHMARKS.md (issue 5).
"""

import math
import numbers
from typing import Optional

import torch

from . import configs
from .api import (_as_int, _INTERPRETING, SUPPORTED_DTYPES, check_block_table, check_features, check_int32,
                  check_window, host_summary)
from .kernels.decode import decode_forward


def _default_splits(batch, kv_heads, max_len, device, head_dim, paged=False) -> int:
    """Enough (split, batch, kv_head) programs to fill every SM ``programs_per_sm`` times (configs.decode_config),
    each split with at least 512 cache positions. Calls with head dims <= 128 (as measured) whose count is short
    (below ``configs.decode_long_splits``) fill ``programs_per_sm`` + 1 slots per SM instead, taking one split
    fewer where that fills the programs' waves better (``configs.decode_whole_waves``); paged calls with a long
    split count (``configs.decode_long_splits``) ``configs.decode_paged_split_factor()`` times that."""
    if device.type != "cuda":
        return max(1, min(4, max_len // 64))
    sms = configs.sm_count(device)
    slots, pairs = configs.decode_config(head_dim).programs_per_sm * sms, max(1, batch * kv_heads)
    want = math.ceil(slots / pairs)
    long = 0 < configs.decode_long_splits() <= want  # judged on this count, whichever branch follows
    if paged and long:
        want *= configs.decode_paged_split_factor()
    elif not long and configs.padded_head_dim(head_dim) <= 128 and configs.decode_whole_waves(paged):
        slots += sms  # one more program per SM, and the count whose programs fill their waves best (v33b)
        want = math.ceil(slots / pairs)
        fill = lambda k: (k * pairs / (math.ceil(k * pairs / slots) * slots), k)  # noqa: E731
        want = max((max(want - 1, 1), want), key=fill)
    return max(1, min(want, max_len // 512, 256))


@torch.no_grad()
def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                            cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None, block_table=None,
                            softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                            rotary_interleaved=True, alibi_slopes=None, num_splits=0, return_softmax_lse=False,
                            *, sink: Optional[torch.Tensor] = None):
    """flash-attn 2.8's decode entry point (no autograd).

    q (B, Sq, Hq, D); k_cache/v_cache (B_cache, S_cache, Hkv, D) contiguous, or paged (num_blocks, page_size, Hkv, D)
    with ``block_table`` (B, max_pages) int32. ``k``/``v`` (B, S_new, Hkv, D / Dv), the cache's dtype, on q's device:
    written into the cache in place at positions cache_seqlens[b] ... (k after rotary) before attending; they need
    ``cache_seqlens`` (as in flash-attn: a ValueError without it). ``cache_seqlens``: int or (B,) int32, the cache
    lengths before the append (default, allowed only without k/v: the full capacity). Causal is aligned
    bottom-right to each sequence's length. ``rotary_cos/sin`` (S_rot, rotary_dim / 2), rotary_dim >= 2: k is
    rotated at its positions; q at positions cache_seqlens + i when causal or local, else at cache_seqlens.
    ``causal`` a bool; ``softmax_scale`` None (1 / sqrt(D)) or a positive real number. ``num_splits`` an int >= 0
    (0 = choose from the batch, heads and lengths). Each split covers a whole number of the kernel's key blocks
    (block_n keys), so the kernel runs ceil(L / split_len) splits, split_len = block_n * ceil(ceil(L / num_splits) /
    block_n), L = the longest attended key range: a requested count is honoured up to the number of key blocks in L
    (more become one split per block), and may come out a little lower where L / num_splits is not a whole number
    of blocks (flash-attn also caps its splits). Returns out (B, Sq, Hq, Dv), and lse fp32 (B, Hq, Sq) with
    ``return_softmax_lse``.
    """
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D, got shape {tuple(t.shape)}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; supported: float16, bfloat16, float32")
    if not (q.dtype == k_cache.dtype == v_cache.dtype):
        raise TypeError("q, k_cache, v_cache must share one dtype")
    if not (q.device == k_cache.device == v_cache.device):
        raise ValueError("q, k_cache, v_cache must be on one device")
    if q.device.type == "cpu" and not _INTERPRETING:
        raise ValueError("q is a CPU tensor: tileattn needs a CUDA device, or TRITON_INTERPRET=1")
    if (k is None) != (v is None):
        raise ValueError("k and v must be given together")
    if k is not None:
        for name, t, cache in (("k", k, k_cache), ("v", v, v_cache)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
            if t.dim() != 4:
                raise ValueError(f"{name} must be 4-D (batch, S_new, kv_heads, head_dim), got shape {tuple(t.shape)}")
            if t.dtype != cache.dtype:
                raise TypeError(f"{name} has dtype {t.dtype}; it must match the cache's dtype {cache.dtype}")
            if t.device != q.device:
                raise ValueError(f"{name} is on {t.device}, q on {q.device}")
        if cache_seqlens is None:
            raise ValueError("cache_seqlens must be given with k/v (the cache lengths before the append: where the "
                             "new tokens are written)")
    if not (isinstance(causal, bool) or (type(causal).__module__ == "numpy" and type(causal).__name__ in
                                         ("bool_", "bool"))):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    causal = bool(causal)
    if softmax_scale is not None and (isinstance(softmax_scale, bool) or not isinstance(softmax_scale, numbers.Real)):
        raise TypeError(f"softmax_scale must be None or a real number, got {type(softmax_scale).__name__}")
    if isinstance(num_splits, bool) or not isinstance(num_splits, numbers.Integral):
        raise TypeError(f"num_splits must be an int >= 0 (0 = choose), got {type(num_splits).__name__}")
    if num_splits < 0:
        raise ValueError(f"num_splits must be an int >= 0 (0 = choose), got {num_splits!r}")
    num_splits = int(num_splits)
    batch, seqlen_q, q_heads, dqk = q.shape
    kv_heads = k_cache.shape[2]
    if k_cache.shape[:3] != v_cache.shape[:3] or k_cache.shape[3] != dqk:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} / v_cache {tuple(v_cache.shape)} do not match q's head dim "
                         f"{dqk} or each other")
    if not (8 <= dqk <= 256 and 8 <= v_cache.shape[3] <= 256):
        raise ValueError("head dims must be in [8, 256]")
    if kv_heads == 0 or q_heads % kv_heads:
        raise ValueError(f"q heads ({q_heads}) must be a multiple of the cache's kv heads ({kv_heads})")
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("k_cache and v_cache must have a contiguous last dimension")
    q = q if q.stride(-1) == 1 else q.contiguous()
    # Host reads validate the index tensors and size the splits. They are skipped inside torch.compile graphs and
    # during CUDA-graph capture (where a device-to-host copy is not allowed): the splits are then sized for the
    # full capacity, and index values are not checked.
    host_reads = not (torch.compiler.is_compiling() or (q.is_cuda and torch.cuda.is_current_stream_capturing()))
    paged = block_table is not None
    if paged:
        if cache_batch_idx is not None:
            raise ValueError("cache_batch_idx cannot be combined with block_table")
        block_table, page_size, capacity = check_block_table(block_table, batch, k_cache, q.device, host_reads)
    else:
        page_size = 1
        capacity = k_cache.shape[1]
        if cache_batch_idx is not None:
            check_int32("cache_batch_idx", cache_batch_idx, (batch,), q.device)
            cache_batch_idx = cache_batch_idx.contiguous()
            lo, hi = host_summary(cache_batch_idx, "range") if host_reads else (0, 0)
            if lo < 0 or hi >= k_cache.shape[0]:
                raise ValueError(f"cache_batch_idx entries must be in [0, {k_cache.shape[0]})")
        elif k_cache.shape[0] < batch:
            raise ValueError(f"k_cache holds {k_cache.shape[0]} sequences, q has batch {batch}")
    known = None  # (min, max) of cache_seqlens when the host already knows them (an int, or the default)
    if cache_seqlens is None:  # (k/v given without it were refused above)
        cache_seqlens = capacity
    if isinstance(cache_seqlens, torch.Tensor) and cache_seqlens.dim() == 1:
        check_int32("cache_seqlens", cache_seqlens, (batch,), q.device)
        cache_seqlens = cache_seqlens.contiguous()
    else:
        value = _as_int("cache_seqlens", cache_seqlens)
        known = (value, value)
        cache_seqlens = torch.full((batch,), value, dtype=torch.int32, device=q.device)
    new = 0 if k is None else k.shape[1]
    if k is not None:
        if k.shape[0] != batch or k.shape[2] != kv_heads or k.shape[3] != dqk \
                or v.shape[:3] != k.shape[:3] or v.shape[3] != v_cache.shape[3]:
            raise ValueError(f"k/v must be (batch, S_new, kv_heads, head_dim) matching the cache, got "
                             f"{tuple(k.shape)} / {tuple(v.shape)}")
    max_len = capacity
    if known is not None or host_reads:
        lo, hi = known if known is not None else host_summary(cache_seqlens, "range")
        if lo < 0 or hi + new > capacity:
            raise ValueError(f"cache_seqlens (+ {new} new tokens) must be in [0, {capacity}] (the cache capacity), "
                             f"got [{lo}, {hi}]")
        max_len = hi + new
    attend_len = max_len  # the longest attended key range: sizes the splits
    if cache_leftpad is not None:  # each sequence's keys start at cache_leftpad[b] (flash-attn's left padding)
        check_int32("cache_leftpad", cache_leftpad, (batch,), q.device)
        cache_leftpad = cache_leftpad.contiguous()
        if host_reads:
            lp_lo, _ = host_summary(cache_leftpad, "range")
            if lp_lo < 0 or bool((cache_leftpad > cache_seqlens).any()):
                raise ValueError("cache_leftpad entries must be in [0, cache_seqlens[b]] (the index where each "
                                 "sequence's keys start)")
            attend_len = max_len - lp_lo
    softmax_scale = 1.0 / math.sqrt(dqk) if softmax_scale is None else float(softmax_scale)
    if not (math.isfinite(softmax_scale) and softmax_scale > 0):
        raise ValueError(f"softmax_scale must be a positive finite number, got {softmax_scale}")
    window = check_window(window_size, causal)
    softcap, alibi_slopes, sink, _ = check_features(q, batch, q_heads, softcap, alibi_slopes, sink, 0.0)

    # int64 positions for rotary and the append (the attending kernels read the int32 lengths directly)
    lens = cache_seqlens.to(torch.int64) if (k is not None or rotary_cos is not None) else None
    if rotary_cos is not None or rotary_sin is not None:
        if rotary_cos is None or rotary_sin is None:
            raise ValueError("rotary_cos and rotary_sin must both be given, with shape (S_rot, rotary_dim / 2)")
        for name, t in (("rotary_cos", rotary_cos), ("rotary_sin", rotary_sin)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if rotary_cos.shape != rotary_sin.shape or rotary_cos.dim() != 2:
            raise ValueError("rotary_cos and rotary_sin must both be given, with shape (S_rot, rotary_dim / 2)")
        rot_dim = 2 * rotary_cos.shape[1]
        if rot_dim < 2:
            raise ValueError(f"rotary_cos/sin have shape {tuple(rotary_cos.shape)}: rotary dim (2 * "
                             f"{rotary_cos.shape[1]}) must be >= 2 (at least one column)")
        if rot_dim > dqk:
            raise ValueError(f"rotary dim ({rot_dim}) must be <= head dim ({dqk})")
        q_per_token = causal or window != (-1, -1)  # else every query token sits at position cache_seqlens
        if host_reads:
            longest = max_len - new  # cache length before the append
            need = max(longest + (seqlen_q - 1 if q_per_token else 0), longest + new - 1)
            if need >= rotary_cos.shape[0]:
                raise ValueError(f"rotary_cos/sin have {rotary_cos.shape[0]} positions; position {need} is needed")
        # The shim's rotary (imported here: the compat package imports this module).
        from .compat.flash_attn.layers.rotary import apply_rotary_emb
        if q_per_token:
            q = apply_rotary_emb(q, rotary_cos, rotary_sin, rotary_interleaved, seqlen_offsets=lens)
        else:  # one "token" of Sq * Hq heads at position cache_seqlens
            q = apply_rotary_emb(q.reshape(batch, 1, seqlen_q * q_heads, dqk), rotary_cos, rotary_sin,
                                 rotary_interleaved, seqlen_offsets=lens).view(q.shape)
        if k is not None:
            k = apply_rotary_emb(k, rotary_cos, rotary_sin, rotary_interleaved, seqlen_offsets=lens)
    if k is not None and new:  # append in place
        pos = lens[:, None] + torch.arange(new, device=q.device)[None, :]  # (B, new)
        if paged:
            page = block_table.to(torch.int64).gather(1, pos // page_size)
            slot = pos % page_size
            k_cache[page, slot] = k.to(k_cache.dtype)
            v_cache[page, slot] = v.to(v_cache.dtype)
        else:
            rows = (cache_batch_idx.to(torch.int64) if cache_batch_idx is not None
                    else torch.arange(batch, device=q.device))[:, None].expand(-1, new)
            k_cache[rows, pos] = k.to(k_cache.dtype)
            v_cache[rows, pos] = v.to(v_cache.dtype)
    seqlens_k = cache_seqlens + new if new else cache_seqlens  # int32
    splits = num_splits or _default_splits(batch, kv_heads, attend_len, q.device,
                                           max(q.shape[-1], v_cache.shape[-1]), paged)
    out, lse = decode_forward(q, k_cache, v_cache, seqlens_k, softmax_scale=softmax_scale, window=window,
                              softcap=softcap, alibi_slopes=alibi_slopes,
                              sink=sink.float().contiguous() if sink is not None else None,
                              block_table=block_table if paged else None, cache_batch_idx=cache_batch_idx,
                              leftpad=cache_leftpad,
                              num_splits=splits, page_size=page_size, max_seqlen_k=max(attend_len, 1))
    return (out, lse) if return_softmax_lse else out
