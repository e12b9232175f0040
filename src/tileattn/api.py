"""Public API: ``attention(q, k, v, *, causal=False, softmax_scale=None, return_lse=False, ...)``.

Validation happens here, at the boundary; the kernels assume valid inputs. ``attention_impl`` is the shared entry
used by ``attention`` and by the flash-attn-style functions in ``tileattn.flash_api``.
"""

import math
import numbers
from typing import Optional, Tuple

import torch

from . import configs
from ._hostinfo import host_summary  # noqa: F401  (re-exported: decode.py imports it from here)
from .ops import bwd_impl, flash_bwd, flash_fwd, fwd_impl

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Read once: @triton.jit chose compiled or interpreted kernels at import, and dynamo can't trace triton's getenv.
_INTERPRETING = configs._interpreting()


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    """The kernels accept any strides but the last; only a tensor whose last stride isn't 1 is copied."""
    if x.stride(-1) != 1 and x.numel() > 0 and x.shape[-1] > 1:
        return x.contiguous()
    return x


def _as_int(name: str, value) -> int:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.dtype.is_floating_point or value.dtype == torch.bool:
            raise TypeError(f"{name} must be an int or a one-element integer tensor, got {value}")
        return int(value.item())
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    return int(value)


def _as_float(name: str, value) -> float:
    if type(value) is float:
        return value
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    return float(value)


_INT32_MAX = 2**31 - 1


def check_window(window_size, causal: bool) -> Tuple[int, int]:
    """window_size=(left, right) ints or one-element tensors, -1 = unbounded; causal forces right = 0."""
    if not isinstance(window_size, (tuple, list)) or len(window_size) != 2:
        raise TypeError(f"window_size must be a pair (left, right), got {window_size!r}")
    left, right = window_size
    if type(left) is not int or type(right) is not int:  # plain ints (the usual case) need no conversion
        left, right = _as_int("window_size", left), _as_int("window_size", right)
    if left < -1 or right < -1:
        raise ValueError(f"window_size values must be >= -1 (-1 = unbounded), got {(left, right)}")
    if causal:
        right = 0
    # Every bound at or past 2**31 - 1 reaches beyond any sequence (one sequence spans < 2**31 elements): keep
    # it in int32; the launchers clamp further to the call's lengths (ops.make_params, decode), so that no
    # kernel's position arithmetic overflows.
    return min(left, _INT32_MAX), min(right, _INT32_MAX)


def check_qkv(q, k, v, causal, softmax_scale, varlen: bool = False) -> float:
    """Validate q, k, v (4-D batched, or 3-D (total, heads, dim) when varlen); return the softmax scale."""
    rank = 3 if varlen else 4
    layout = "(total, heads, head_dim)" if varlen else "(batch, seqlen, heads, head_dim)"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != rank:
            raise ValueError(f"{name} must be {rank}-D {layout}, got shape {tuple(t.shape)}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; supported: float16, bfloat16, float32")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got q {q.device}, k {k.device}, v {v.device}")
    if q.device.type == "cpu":
        if not _INTERPRETING:
            raise ValueError("q, k, v are CPU tensors: tileattn needs a CUDA device, or the Triton interpreter "
                             "(set TRITON_INTERPRET=1 before importing tileattn)")
    elif q.device.type != "cuda":
        raise ValueError(f"q, k, v must be CUDA tensors, got device {q.device}")
    if not varlen and not (q.shape[0] == k.shape[0] == v.shape[0]):
        raise ValueError(f"batch sizes differ: q {q.shape[0]}, k {k.shape[0]}, v {v.shape[0]}")
    head_dim, dim_v = q.shape[-1], v.shape[-1]
    if k.shape[-1] != head_dim:
        raise ValueError(f"head_dim differs: q {head_dim}, k {k.shape[-1]}")
    for name, d in (("q/k head_dim", head_dim), ("v head_dim", dim_v)):
        if not configs.MIN_HEAD_DIM <= d <= configs.MAX_HEAD_DIM:
            raise ValueError(f"{name} must be in [{configs.MIN_HEAD_DIM}, {configs.MAX_HEAD_DIM}], got {d}")
    if k.shape[-3] != v.shape[-3]:
        raise ValueError(f"k and v sequence lengths differ: k {k.shape[-3]}, v {v.shape[-3]}")
    if k.shape[-2] != v.shape[-2]:
        raise ValueError(f"k and v head counts differ: k {k.shape[-2]}, v {v.shape[-2]}")
    q_heads, kv_heads = q.shape[-2], k.shape[-2]
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


def check_features(q, batch: int, q_heads: int, softcap, alibi_slopes, sink, dropout_p):
    softcap = _as_float("softcap", softcap)
    if not (math.isfinite(softcap) and softcap >= 0):
        raise ValueError(f"softcap must be a finite number >= 0 (0 = off), got {softcap}")
    dropout_p = _as_float("dropout_p", dropout_p)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if alibi_slopes is not None:
        if not isinstance(alibi_slopes, torch.Tensor):
            raise TypeError(f"alibi_slopes must be a tensor of shape ({q_heads},) or ({batch}, {q_heads})")
        if alibi_slopes.dtype != torch.float32:
            raise TypeError(f"alibi_slopes must be float32, got {alibi_slopes.dtype}")
        if tuple(alibi_slopes.shape) not in ((q_heads,), (batch, q_heads)):
            raise ValueError(f"alibi_slopes must have shape ({q_heads},) or ({batch}, {q_heads}), "
                             f"got {tuple(alibi_slopes.shape)}")
        if alibi_slopes.device != q.device:
            raise ValueError(f"alibi_slopes is on {alibi_slopes.device}, q on {q.device}")
        alibi_slopes = alibi_slopes.contiguous()
    if sink is not None:
        if not isinstance(sink, torch.Tensor):
            raise TypeError(f"sink must be a tensor of shape ({q_heads},)")
        if not sink.dtype.is_floating_point:
            raise TypeError(f"sink must be a floating-point tensor, got {sink.dtype}")
        if tuple(sink.shape) != (q_heads,):
            raise ValueError(f"sink must have shape ({q_heads},) (one logit per query head), got {tuple(sink.shape)}")
        if sink.device != q.device:
            raise ValueError(f"sink is on {sink.device}, q on {q.device}")
        sink = sink.contiguous()  # the kernels read it with stride 1 (differentiable: gradients still reach it)
    return softcap, alibi_slopes, sink, dropout_p


def check_int32(name, t, shape=None, device=None):
    """An int32 index tensor, optionally of a given shape and on q's device."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be an int32 tensor")
    if t.dtype != torch.int32:
        raise TypeError(f"{name} must be int32, got {t.dtype}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device}, q on {device}")


def check_block_table(block_table, batch: int, cache: torch.Tensor, device, host_reads: bool = True):
    """A paged cache's block table: int32 (batch, max_pages) on q's device, entries in [0, num_blocks) (read to the
    host once per tensor version unless ``host_reads`` is False), and the cache (num_blocks, page_size, ...) with
    a power-of-two page size. Returns (contiguous block_table, page_size, capacity in keys)."""
    check_int32("block_table", block_table, device=device)
    if block_table.dim() != 2 or block_table.shape[0] != batch:
        raise ValueError(f"block_table must be (batch={batch}, max_pages), got {tuple(block_table.shape)}")
    num_blocks, page_size = cache.shape[0], cache.shape[1]
    if page_size < 1 or page_size & (page_size - 1):
        raise ValueError(f"page size (the cache's dim 1) must be a power of two, got {page_size}")
    if block_table.numel() and host_reads:
        lo, hi = host_summary(block_table, "range")
        if lo < 0 or hi >= num_blocks:
            raise ValueError(f"block_table entries must be in [0, {num_blocks}), got [{lo}, {hi}]")
    return block_table.contiguous(), page_size, block_table.shape[1] * page_size


def check_cu_seqlens(name: str, cu, device, rows: Optional[int]):
    """rows: how many packed rows the sequences may span (None: no bound)."""
    if not isinstance(cu, torch.Tensor):
        raise TypeError(f"{name} must be an int32 tensor of cumulative sequence lengths")
    if cu.dtype != torch.int32:
        raise TypeError(f"{name} must be int32, got {cu.dtype}")
    if cu.dim() != 1 or cu.shape[0] < 1:
        raise ValueError(f"{name} must be 1-D of length batch + 1, got shape {tuple(cu.shape)}")
    if cu.device != device:
        raise ValueError(f"{name} is on {cu.device}, q on {device}")
    if not torch.compiler.is_compiling():  # one small host read per tensor version; skipped in compiled graphs
        first, last, monotonic, _ = host_summary(cu, "cu")
        if first != 0 or not monotonic or (rows is not None and last > rows):
            bound = "" if rows is None else f" and end <= {rows}"
            raise ValueError(f"{name} must start at 0, be non-decreasing{bound}, "
                             f"got {cu.detach().cpu().tolist()[:16]}")
    return cu.contiguous()


def check_int32_offsets(name: str, t: torch.Tensor, seqlen: int):
    """The kernels address one sequence of one tensor with 32-bit offsets (batch and sequence starts are 64-bit):
    refuse, rather than silently wrap, a sequence whose elements span 2**31 or more."""
    if seqlen <= t.shape[-3] and t.is_contiguous() and t.numel() < 2 ** 31:  # a sequence spans at most the tensor
        return
    span = max(seqlen - 1, 0) * abs(t.stride(-3)) + (t.shape[-2] - 1) * abs(t.stride(-2)) + t.shape[-1]
    if span >= 2 ** 31:
        raise ValueError(f"{name}: one sequence spans {span} elements (seqlen {seqlen} x stride {t.stride(-3)}); "
                         f"tileattn's kernels address a sequence with 32-bit offsets (< 2**31 elements). Split the "
                         f"sequence, or use fewer heads per tensor")


def unpack_qkv(a, b, c, pack: int):
    """pack 0: (q, k, v); pack 1: a = qkv (..., 3, H, D); pack 2: a = q, b = kv (..., 2, Hkv, D). Views only."""
    if pack == 1:
        return a.unbind(-3)
    if pack == 2:
        return (a,) + tuple(b.unbind(-3))
    return a, b, c


def check_varlen(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, q, k):
    """Validate a varlen call's sequence description against q/k (total, heads, dim).

    ``k`` None: keys are not packed rows (a paged cache, whose capacity bounds max_seqlen_k instead).
    Returns (cu_q, cu_k, batch, max_q, max_k) with max_seqlen_* as ints (ints or 0-d tensors accepted).
    """
    if cu_seqlens_q is None or cu_seqlens_k is None:
        raise ValueError("varlen calls need both cu_seqlens_q and cu_seqlens_k")
    cu_q = check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.device, q.shape[0])
    cu_k = check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, q.device, None if k is None else k.shape[0])
    if cu_q.shape[0] != cu_k.shape[0]:
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must have the same length (batch + 1), "
                         f"got {cu_q.shape[0]} and {cu_k.shape[0]}")
    max_q, max_k = _as_int("max_seqlen_q", max_seqlen_q), _as_int("max_seqlen_k", max_seqlen_k)
    if max_q < 0 or max_k < 0:
        raise ValueError(f"max_seqlen_q/max_seqlen_k must be >= 0, got {max_q}, {max_k}")
    if not torch.compiler.is_compiling():
        longest = [host_summary(c, "cu")[3] for c in (cu_q, cu_k)]
        if longest[0] > max_q or longest[1] > max_k:
            raise ValueError(f"max_seqlen_q/max_seqlen_k ({max_q}, {max_k}) are smaller than the longest "
                             f"sequences in cu_seqlens ({longest[0]}, {longest[1]})")
    return cu_q, cu_k, cu_q.shape[0] - 1, max_q, max_k


def _fwd(*args):
    """Eager calls run the op's body directly (the dispatcher costs tens of microseconds a call, which shows at
    short sequences); traced code (torch.compile) sees the registered custom op."""
    return flash_fwd(*args) if torch.compiler.is_compiling() else fwd_impl(*args)


def _bwd(*args):
    return flash_bwd(*args) if torch.compiler.is_compiling() else bwd_impl(*args)


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, c, sink, rest):
        # rest: the arguments without a gradient in one tuple (autograd.Function.apply walks every argument in
        # Python on every call: host time)
        pack, cu_q, cu_k, max_q, max_k, scale, wl, wr, softcap, alibi, dropout_p, rng = rest
        # a gradient that never reaches out or lse stays None: no zero-filled (B, H, S) dlse (a fill launch and
        # the dQ kernel's HAS_DLSE variant) on every backward of a caller that uses out alone
        ctx.set_materialize_grads(False)
        q, k, v = unpack_qkv(a, b, c, pack)
        # resid: out's rounding residual for an exact delta in the backward (empty when not kept: ops.fwd_impl)
        out, lse, resid = _fwd(q, k, v, cu_q, cu_k, max_q, max_k, scale, wl, wr, softcap, alibi, sink, dropout_p,
                               rng, True)
        ctx.save_for_backward(q, k, v, out, lse, sink, cu_q, cu_k, alibi, rng, resid)
        ctx.args = (max_q, max_k, scale, wl, wr, softcap, dropout_p, pack)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, sink, cu_q, cu_k, alibi, rng, resid = ctx.saved_tensors
        max_q, max_k, scale, wl, wr, softcap, dropout_p, pack = ctx.args
        if dout is None:
            dout = torch.zeros_like(out)
        dout = _last_dim_contiguous(dout)
        check_int32_offsets("dout", dout, max_q)  # any strides reach here, and the kernels' offsets are 32-bit
        g0, g1, g2, dsink = _bwd(dout, q, k, v, out, lse, dlse, cu_q, cu_k, max_q, max_k,
                                 scale, wl, wr, softcap, alibi, sink, dropout_p, rng, pack, resid)
        dsink = dsink.to(sink.dtype) if sink is not None else None
        grads = (g0, g1 if pack != 1 else None, g2 if pack == 0 else None)
        return grads + (dsink, None)


def new_rng_state(device) -> torch.Tensor:
    """[seed, offset] drawn from torch's default generator of ``device`` (torch.manual_seed reproduces it)."""
    return torch.randint(0, 2 ** 62, (2,), dtype=torch.int64, device=device)


def attention_impl(q, k, v, *, softmax_scale: float, window: Tuple[int, int], softcap: float, alibi_slopes,
                   sink, dropout_p: float, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None,
                   max_seqlen_k=None, pack: int = 0):
    """Run validated inputs through the autograd Function. Batched: 4-D tensors; varlen: 3-D with cu_seqlens.

    ``pack``: 0 = q, k, v; 1 = ``q`` is a packed qkv (..., 3, H, D) and k, v are None; 2 = ``k`` is a packed
    kv (..., 2, Hkv, D) and v is None. Packed inputs get packed gradients (written in place, no concatenation).
    Returns (out, lse, rng): out like q with v's head dim; lse (B, Hq, Sq) or (Hq, total_q); rng the dropout
    state used (None without dropout).
    """
    varlen = cu_seqlens_q is not None
    tensors = [None if t is None else _last_dim_contiguous(t) for t in (q, k, v)]
    if varlen:
        tensors = [None if t is None else t.unsqueeze(0) for t in tensors]
    qv, kv_, vv = unpack_qkv(*tensors, pack)
    if not varlen:
        max_seqlen_q, max_seqlen_k = qv.shape[1], kv_.shape[1]
    for name, t, seqlen in (("q", qv, max_seqlen_q), ("k", kv_, max_seqlen_k), ("v", vv, max_seqlen_k)):
        check_int32_offsets(name, t, seqlen)
    rng = new_rng_state(qv.device) if dropout_p > 0 else None
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (*tensors, sink)):
        out, lse = _FlashAttention.apply(*tensors, sink, (pack, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                                           max_seqlen_k, softmax_scale, window[0], window[1],
                                                           softcap, alibi_slopes, dropout_p, rng))
    else:  # inference: no graph to record, skip the autograd.Function
        out, lse, _ = _fwd(qv, kv_, vv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
                           window[0], window[1], softcap, alibi_slopes, sink, dropout_p, rng)
    if varlen:
        out = out.squeeze(0)
    return out, lse, rng


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
              softmax_scale: Optional[float] = None, return_lse: bool = False, window_size=(-1, -1),
              softcap: float = 0.0, alibi_slopes: Optional[torch.Tensor] = None,
              sink: Optional[torch.Tensor] = None, dropout_p: float = 0.0):
    """Exact softmax attention, computed tile by tile (FlashAttention-2), differentiable.

    Args:
        q: (batch, seqlen_q, q_heads, head_dim), float16 / bfloat16 / float32, on a CUDA device (or CPU under
            the Triton interpreter). Any strides with the last one 1 (others are copied once).
        k: (batch, seqlen_k, kv_heads, head_dim); v: (batch, seqlen_k, kv_heads, head_dim_v), same dtype and
            device; q_heads % kv_heads == 0 (GQA/MQA read the shared kv head directly, no copies).
            head_dim and head_dim_v in [8, 256]; they may differ (e.g. MLA's 192 and 128).
        causal: bottom-right aligned causal mask (flash-attn >= 2.1): query i sees key j iff
            j <= i + seqlen_k - seqlen_q.
        softmax_scale: scale applied to q.k before softmax; default 1/sqrt(head_dim).
        return_lse: also return the logsumexp.
        window_size: (left, right) local attention: query i sees keys in
            [i + Sk - Sq - left, i + Sk - Sq + right]; -1 = unbounded. Causal sets right = 0.
        softcap: > 0 replaces scores s by softcap * tanh(s / softcap) (after scaling).
        alibi_slopes: fp32 (q_heads,) or (batch, q_heads): adds -slope * |i + Sk - Sq - j| to the scores.
        sink: (q_heads,) learnable per-head logit that joins each row's softmax denominator with no value
            (gpt-oss style); it receives a gradient.
        dropout_p: dropout probability on the attention weights (Philox, seeded from torch's generator;
            the backward regenerates the same mask).

    Returns:
        out (batch, seqlen_q, q_heads, head_dim_v) in q's dtype; with ``return_lse`` also
        lse (batch, q_heads, seqlen_q) float32, ``ln(sum_j exp(score_ij))`` over visible keys (+ exp(sink)).
        A query row that sees no key gets out = 0, lse = -inf (= sink with a sink) and zero gradients.
        Gradients flow to q, k, v (and sink) through out and through lse.
    """
    softmax_scale = check_qkv(q, k, v, causal, softmax_scale)
    window = check_window(window_size, causal)
    softcap, alibi_slopes, sink, dropout_p = check_features(q, q.shape[0], q.shape[2], softcap, alibi_slopes, sink,
                                                            dropout_p)
    out, lse, _ = attention_impl(q, k, v, softmax_scale=softmax_scale, window=window, softcap=softcap,
                                 alibi_slopes=alibi_slopes, sink=sink, dropout_p=dropout_p)
    return (out, lse) if return_lse else out
