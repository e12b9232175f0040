"""``flash_attn.layers.rotary`` of flash-attn 2.8: rotary position embeddings (RoPE), in plain PyTorch.

For a head vector x and rotary_dim = 2 * r (r = cos.shape[-1]), position p rotates r pairs of coordinates by
the angles whose cosines / sines are ``cos[p]`` / ``sin[p]``:

* GPT-NeoX style (``interleaved=False``): pair i is (x[i], x[i + r]);
* GPT-J style (``interleaved=True``): pair i is (x[2i], x[2i + 1]);

    (a, b) -> (a * cos[p, i] - b * sin[p, i],  b * cos[p, i] + a * sin[p, i])

Coordinates past rotary_dim pass through. Token s of sequence b sits at position p = s + seqlen_offsets[b]
(varlen: s counts from the start of its sequence). As in flash-attn's kernel, a position outside the cos/sin
table is left unrotated. The math runs in fp32 (fp64 for fp64 inputs) and is rounded once to x's dtype.
Gradients flow to x (not to cos / sin, as in flash-attn).
"""

import numbers
from typing import Optional, Tuple, Union

import torch
from torch import Tensor

__all__ = ["apply_rotary_emb", "apply_rotary_emb_func", "apply_rotary_emb_qkv_", "apply_rotary_emb_kv_",
           "apply_rotary_emb_torch", "rotate_half", "RotaryEmbedding"]


# ------------------------------------------------------------------------------------------------- core
def _check_tables(cos, sin, head_dim):
    for name, t in (("cos", cos), ("sin", sin)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or not t.dtype.is_floating_point:
            raise ValueError(f"{name} must be a floating-point (seqlen_rotary, rotary_dim / 2) tensor")
    if cos.shape != sin.shape:
        raise ValueError(f"cos and sin shapes differ: {tuple(cos.shape)} vs {tuple(sin.shape)}")
    if 2 * cos.shape[1] > head_dim:
        raise ValueError(f"rotary_dim (2 * {cos.shape[1]}) must be <= head_dim ({head_dim})")


def _check_offsets(seqlen_offsets, batch, seqlen, seqlen_ro, device):
    if isinstance(seqlen_offsets, torch.Tensor):
        if seqlen_offsets.dtype not in (torch.int32, torch.int64) or tuple(seqlen_offsets.shape) != (batch,):
            raise ValueError(f"seqlen_offsets must be an int or an int32/int64 tensor of shape ({batch},), got "
                             f"{seqlen_offsets.dtype} {tuple(seqlen_offsets.shape)}")
        if seqlen_offsets.device != device:
            raise ValueError(f"seqlen_offsets is on {seqlen_offsets.device}, x on {device}")
        return seqlen_offsets
    if isinstance(seqlen_offsets, bool) or not isinstance(seqlen_offsets, numbers.Integral):
        raise TypeError(f"seqlen_offsets must be an int or a tensor, got {type(seqlen_offsets).__name__}")
    seqlen_offsets = int(seqlen_offsets)
    if seqlen_offsets < 0:
        raise ValueError(f"seqlen_offsets must be >= 0, got {seqlen_offsets}")
    if seqlen is not None and seqlen_offsets + seqlen > seqlen_ro:
        raise ValueError(f"seqlen_offsets + seqlen ({seqlen_offsets} + {seqlen}) exceeds the {seqlen_ro} positions "
                         f"of cos/sin")
    return seqlen_offsets


def _positions(x, seqlen_offsets, cu_seqlens, seqlen_ro):
    """Table row per token: (B or 1, S) for batched x, (total,) for varlen; seqlen_ro = the identity row."""
    device = x.device
    if cu_seqlens is None:
        pos = torch.arange(x.shape[1], device=device)[None, :]
        pos = pos + (seqlen_offsets.long()[:, None] if isinstance(seqlen_offsets, torch.Tensor) else seqlen_offsets)
    else:
        batch = cu_seqlens.shape[0] - 1
        tok = torch.arange(x.shape[0], device=device)
        if batch <= 0:
            return torch.full_like(tok, seqlen_ro)
        cu = cu_seqlens.long()
        seq = torch.searchsorted(cu[1:], tok, right=True).clamp(max=batch - 1)
        pos = tok - cu[seq]
        pos = pos + (seqlen_offsets.long()[seq] if isinstance(seqlen_offsets, torch.Tensor) else seqlen_offsets)
        pos = torch.where(tok < cu[-1], pos, seqlen_ro)  # rows past the last sequence: untouched
    return torch.where((pos >= 0) & (pos < seqlen_ro), pos, seqlen_ro)


def _rotated(x, cos, sin, interleaved, seqlen_offsets, cu_seqlens, conjugate=False):
    """The first rotary_dim coordinates of x, rotated (a new tensor in x's dtype)."""
    r = cos.shape[-1]
    compute = torch.promote_types(x.dtype, torch.float32)
    seqlen_ro = cos.shape[0]
    cos_t = torch.cat([cos.to(compute), cos.new_ones((1, r), dtype=compute)])
    sin_t = torch.cat([sin.to(compute), sin.new_zeros((1, r), dtype=compute)])
    pos = _positions(x, seqlen_offsets, cu_seqlens, seqlen_ro)
    c, s = cos_t[pos].unsqueeze(-2), sin_t[pos].unsqueeze(-2)  # (..., 1, r): broadcast over heads
    if conjugate:
        s = -s
    xr = x[..., : 2 * r].to(compute)
    a, b = (xr[..., 0::2], xr[..., 1::2]) if interleaved else (xr[..., :r], xr[..., r:])
    ra, rb = a * c - b * s, b * c + a * s
    out = torch.stack((ra, rb), dim=-1).flatten(-2) if interleaved else torch.cat((ra, rb), dim=-1)
    return out.to(x.dtype)


def _with_rest(rot, x):
    return rot if rot.shape[-1] == x.shape[-1] else torch.cat([rot, x[..., rot.shape[-1]:]], dim=-1)


class _ApplyRotaryEmb(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin, interleaved, inplace, seqlen_offsets, cu_seqlens, max_seqlen):
        rot = _rotated(x, cos, sin, interleaved, seqlen_offsets, cu_seqlens)
        if inplace:
            x[..., : rot.shape[-1]].copy_(rot)
            ctx.mark_dirty(x)
            out = x
        else:
            out = _with_rest(rot, x)
        offsets_t = seqlen_offsets if isinstance(seqlen_offsets, torch.Tensor) else None
        ctx.save_for_backward(cos, sin, cu_seqlens, offsets_t)
        ctx.offsets_int = None if offsets_t is not None else seqlen_offsets
        ctx.interleaved = interleaved
        return out

    @staticmethod
    def backward(ctx, grad):
        cos, sin, cu_seqlens, offsets_t = ctx.saved_tensors
        offsets = offsets_t if offsets_t is not None else ctx.offsets_int
        # The rotation is orthogonal: its transpose is the rotation by the opposite angle.
        rot = _rotated(grad, cos, sin, ctx.interleaved, offsets, cu_seqlens, conjugate=True)
        return _with_rest(rot, grad), None, None, None, None, None, None, None


def apply_rotary_emb(
    x: Tensor,
    cos: Tensor,
    sin: Tensor,
    interleaved: bool = False,
    inplace: bool = False,
    seqlen_offsets: Union[int, Tensor] = 0,
    cu_seqlens: Optional[Tensor] = None,
    max_seqlen: Optional[int] = None,
) -> Tensor:
    """Rotate the first rotary_dim = 2 * cos.shape[-1] coordinates of every head of x.

    Args:
        x: (batch, seqlen, heads, head_dim), or (total, heads, head_dim) with ``cu_seqlens``.
        cos, sin: (seqlen_rotary, rotary_dim / 2); rotary_dim <= head_dim.
        interleaved: GPT-J pairs (2i, 2i+1) if True, else GPT-NeoX halves (i, i + rotary_dim / 2).
        inplace: write into x (and return it).
        seqlen_offsets: int, or (batch,) int tensor: sequence b starts at position seqlen_offsets[b]
            (decoding with a KV cache).
        cu_seqlens: (batch + 1,) int cumulative sequence lengths for varlen x.
        max_seqlen: longest sequence in a varlen x (only used to check that cos/sin are long enough).
    Returns: the rotated tensor, shaped like x.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if cu_seqlens is None:
        if x.dim() != 4:
            raise ValueError(f"x must be (batch, seqlen, heads, head_dim), got shape {tuple(x.shape)}")
        batch, seqlen = x.shape[0], x.shape[1]
    else:
        if x.dim() != 3:
            raise ValueError(f"with cu_seqlens, x must be (total, heads, head_dim), got shape {tuple(x.shape)}")
        if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.dtype not in (
                torch.int32, torch.int64) or cu_seqlens.shape[0] < 1:
            raise ValueError("cu_seqlens must be a 1-D int32/int64 tensor of length batch + 1")
        batch = cu_seqlens.shape[0] - 1
        seqlen = None if max_seqlen is None else int(max_seqlen)
    _check_tables(cos, sin, x.shape[-1])
    if seqlen is not None and seqlen > cos.shape[0]:
        raise ValueError(f"cos/sin have {cos.shape[0]} positions, fewer than seqlen {seqlen}")
    seqlen_offsets = _check_offsets(seqlen_offsets, batch, seqlen, cos.shape[0], x.device)
    return _ApplyRotaryEmb.apply(x, cos, sin, bool(interleaved), bool(inplace), seqlen_offsets, cu_seqlens,
                                 max_seqlen)


apply_rotary_emb_func = apply_rotary_emb  # flash-attn's older name


def rotate_half(x, interleaved=False):
    """(a, b) -> (-b, a) on each rotary pair (halves, or even/odd coordinates when interleaved)."""
    if interleaved:
        a, b = x[..., 0::2], x[..., 1::2]
        return torch.stack((-b, a), dim=-1).flatten(-2)
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def apply_rotary_emb_torch(x, cos, sin, interleaved=False):
    """Reference formula: x (batch, seqlen, heads, head_dim), cos/sin (seqlen, rotary_dim / 2), position s for
    token s; fully differentiable (also w.r.t. cos and sin)."""
    rd = 2 * cos.shape[-1]
    expand = (lambda t: t.repeat_interleave(2, dim=-1)) if interleaved else (lambda t: torch.cat((t, t), dim=-1))
    c, s = expand(cos).unsqueeze(-2), expand(sin).unsqueeze(-2)
    return torch.cat([x[..., :rd] * c + rotate_half(x[..., :rd], interleaved) * s, x[..., rd:]], dim=-1)


# ----------------------------------------------------------------------------- in-place packed variants
def _qk_views(qkv, num_heads_q):
    if qkv.dim() == 5:
        if qkv.shape[2] != 3:
            raise ValueError(f"qkv must be (batch, seqlen, 3, heads, head_dim), got {tuple(qkv.shape)}")
        return qkv[:, :, 0], qkv[:, :, 1]
    if qkv.dim() != 4 or num_heads_q is None:
        raise ValueError("qkv must be (batch, seqlen, 3, heads, head_dim), or (batch, seqlen, "
                         "heads_q + 2 * heads_k, head_dim) together with num_heads_q")
    heads_k = (qkv.shape[2] - num_heads_q) // 2
    if heads_k <= 0 or num_heads_q + 2 * heads_k != qkv.shape[2]:
        raise ValueError(f"qkv has {qkv.shape[2]} heads, not num_heads_q ({num_heads_q}) + 2 * heads_k")
    return qkv[:, :, :num_heads_q], qkv[:, :, num_heads_q:num_heads_q + heads_k]


class _ApplyRotaryQK_(torch.autograd.Function):
    """Rotate, in place, the q and k parts of a packed tensor (``k_only``: just the k part of a packed kv)."""

    @staticmethod
    def forward(ctx, packed, cos, sin, cos_k, sin_k, interleaved, seqlen_offsets, num_heads_q, k_only):
        ctx.args = (interleaved, num_heads_q, k_only,
                    None if isinstance(seqlen_offsets, torch.Tensor) else seqlen_offsets)
        ctx.save_for_backward(cos, sin, cos_k, sin_k,
                              seqlen_offsets if isinstance(seqlen_offsets, torch.Tensor) else None)
        _ApplyRotaryQK_._rotate_parts(packed, cos, sin, cos_k, sin_k, interleaved, seqlen_offsets, num_heads_q,
                                      k_only, conjugate=False)
        ctx.mark_dirty(packed)
        return packed

    @staticmethod
    def _rotate_parts(packed, cos, sin, cos_k, sin_k, interleaved, offsets, num_heads_q, k_only, conjugate):
        parts = [(packed[:, :, 0], cos, sin)] if k_only else list(zip(_qk_views(packed, num_heads_q),
                                                                      (cos, cos_k), (sin, sin_k)))
        for view, c, s in parts:
            rot = _rotated(view, c, s, interleaved, offsets, None, conjugate=conjugate)
            view[..., : rot.shape[-1]].copy_(rot)

    @staticmethod
    def backward(ctx, grad):
        interleaved, num_heads_q, k_only, offsets_int = ctx.args
        cos, sin, cos_k, sin_k, offsets_t = ctx.saved_tensors
        offsets = offsets_t if offsets_t is not None else offsets_int
        grad = grad.clone()
        _ApplyRotaryQK_._rotate_parts(grad, cos, sin, cos_k, sin_k, interleaved, offsets, num_heads_q, k_only,
                                      conjugate=True)
        return grad, None, None, None, None, None, None, None, None


def apply_rotary_emb_qkv_(
    qkv: Tensor,
    cos: Tensor,
    sin: Tensor,
    cos_k: Optional[Tensor] = None,
    sin_k: Optional[Tensor] = None,
    interleaved: bool = False,
    seqlen_offsets: Union[int, Tensor] = 0,
    num_heads_q: Optional[int] = None,
) -> Tensor:
    """In place on q and k of qkv (batch, seqlen, 3, heads, head_dim), or of (batch, seqlen, heads_q +
    2 * heads_k, head_dim) with ``num_heads_q`` (GQA). k uses cos_k / sin_k when given. Returns qkv."""
    q, _ = _qk_views(qkv, num_heads_q)
    cos_k = cos if cos_k is None else cos_k
    sin_k = sin if sin_k is None else sin_k
    _check_tables(cos, sin, qkv.shape[-1])
    _check_tables(cos_k, sin_k, qkv.shape[-1])
    offsets = _check_offsets(seqlen_offsets, qkv.shape[0], qkv.shape[1], cos.shape[0], qkv.device)
    return _ApplyRotaryQK_.apply(qkv, cos, sin, cos_k, sin_k, bool(interleaved), offsets, num_heads_q, False)


def apply_rotary_emb_kv_(
    kv: Tensor,
    cos: Tensor,
    sin: Tensor,
    interleaved: bool = False,
    seqlen_offsets: Union[int, Tensor] = 0,
) -> Tensor:
    """In place on k of kv (batch, seqlen, 2, heads, head_dim). Returns kv."""
    if not isinstance(kv, torch.Tensor) or kv.dim() != 5 or kv.shape[2] != 2:
        raise ValueError("kv must be (batch, seqlen, 2, heads, head_dim)")
    _check_tables(cos, sin, kv.shape[-1])
    offsets = _check_offsets(seqlen_offsets, kv.shape[0], kv.shape[1], cos.shape[0], kv.device)
    return _ApplyRotaryQK_.apply(kv, cos, sin, None, None, bool(interleaved), offsets, None, True)


# ------------------------------------------------------------------------------------------------ module
class RotaryEmbedding(torch.nn.Module):
    """RoPE (RoFormer) with cached cos/sin tables, applied in place to packed qkv (or q and kv).

    ``dim``: rotary_dim; ``base``: frequency base (inv_freq_i = base ** (-2i / dim)); ``interleaved``: GPT-J
    pairs; ``scale_base``: if set, XPos scaling (q scaled by scale ** ((pos - seqlen // 2) / scale_base),
    k by its inverse).
    """

    def __init__(self, dim: int, base=10000.0, interleaved=False, scale_base=None, device=None):
        super().__init__()
        self.dim = dim
        self.base = float(base)
        self.interleaved = interleaved
        self.scale_base = scale_base
        self.register_buffer("inv_freq", self._compute_inv_freq(device), persistent=False)
        scale = self._compute_scale(device) if scale_base is not None else None
        self.register_buffer("scale", scale, persistent=False)
        self._seq_len_cached = 0
        self._cos_cached = self._sin_cached = self._cos_k_cached = self._sin_k_cached = None

    def _compute_inv_freq(self, device=None):
        exponents = torch.arange(0, self.dim, 2, device=device, dtype=torch.float32) / self.dim
        return 1.0 / (self.base ** exponents)

    def _compute_scale(self, device=None):
        idx = torch.arange(0, self.dim, 2, device=device, dtype=torch.float32)
        return (idx + 0.4 * self.dim) / (1.4 * self.dim)

    def _update_cos_sin_cache(self, seqlen, device=None, dtype=None):
        stale = (seqlen > self._seq_len_cached or self._cos_cached is None or self._cos_cached.device != device
                 or self._cos_cached.dtype != dtype or (self.training and self._cos_cached.is_inference()))
        if not stale:
            return
        self._seq_len_cached = seqlen
        # Angles in fp32 whatever the module's dtype: positions times frequencies lose too much in bf16.
        inv_freq = self.inv_freq if self.inv_freq.dtype == torch.float32 else self._compute_inv_freq(device)
        t = torch.arange(seqlen, device=device, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq.to(device))
        if self.scale is None:
            self._cos_cached, self._sin_cached = torch.cos(freqs).to(dtype), torch.sin(freqs).to(dtype)
            return
        scale = self.scale if self.scale.dtype == torch.float32 else self._compute_scale(device)
        power = (torch.arange(seqlen, dtype=torch.float32, device=device) - seqlen // 2) / self.scale_base
        xpos = scale.to(device)[None, :] ** power[:, None]
        self._cos_cached = (torch.cos(freqs) * xpos).to(dtype)
        self._sin_cached = (torch.sin(freqs) * xpos).to(dtype)
        self._cos_k_cached = (torch.cos(freqs) / xpos).to(dtype)
        self._sin_k_cached = (torch.sin(freqs) / xpos).to(dtype)

    def forward(self, qkv: Tensor, kv: Optional[Tensor] = None, seqlen_offset: Union[int, Tensor] = 0,
                max_seqlen: Optional[int] = None, num_heads_q: Optional[int] = None
                ) -> Union[Tensor, Tuple[Tensor, Tensor]]:
        """qkv: packed (see :func:`apply_rotary_emb_qkv_`), or q (batch, seqlen, heads, head_dim) when ``kv``
        (batch, seqlen, 2, heads, head_dim) is given. With a tensor ``seqlen_offset`` pass ``max_seqlen`` so
        the tables cover every position. In place; returns qkv, or (q, kv)."""
        seqlen = qkv.shape[1]
        if max_seqlen is not None:
            self._update_cos_sin_cache(max_seqlen, device=qkv.device, dtype=qkv.dtype)
        elif isinstance(seqlen_offset, int):
            self._update_cos_sin_cache(seqlen + seqlen_offset, device=qkv.device, dtype=qkv.dtype)
        xpos = self.scale is not None
        if kv is None:
            return apply_rotary_emb_qkv_(qkv, self._cos_cached, self._sin_cached,
                                         self._cos_k_cached if xpos else None, self._sin_k_cached if xpos else None,
                                         interleaved=self.interleaved, seqlen_offsets=seqlen_offset,
                                         num_heads_q=num_heads_q)
        q = apply_rotary_emb(qkv, self._cos_cached, self._sin_cached, interleaved=self.interleaved, inplace=True,
                             seqlen_offsets=seqlen_offset)
        kv = apply_rotary_emb_kv_(kv, self._cos_k_cached if xpos else self._cos_cached,
                                  self._sin_k_cached if xpos else self._sin_cached, interleaved=self.interleaved,
                                  seqlen_offsets=seqlen_offset)
        return q, kv
