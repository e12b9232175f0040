"""Plain PyTorch reference attention, used by the tests and the benchmark.

It materialises the full (Sq, Sk) score matrix, so it is only meant for small
problems and for checking the Triton kernels.
"""

import math

import torch

__all__ = ["attention_ref"]


def attention_ref(q, k, v, causal=False, softmax_scale=None, upcast=True, window_size=(-1, -1), softcap=0.0,
                  alibi_slopes=None, sink=None, dropout_mask=None, dropout_p=0.0):
    """Reference softmax attention with the same conventions as ``tileattn.attention``.

    Args:
        q: ``(B, Sq, Hq, D)`` tensor.
        k, v: ``(B, Sk, Hkv, D)`` tensors with ``Hq % Hkv == 0`` (grouped-query
            attention: query head ``h`` uses kv head ``h // (Hq // Hkv)``).
        causal: bottom-right aligned causal mask (flash-attn >= 2.1): query ``i``
            sees keys ``j <= i + Sk - Sq``.
        softmax_scale: defaults to ``1 / sqrt(D)``.
        upcast: if True, compute in float64 and return ``out`` in float64 (the
            caller casts). If False, compute at the input dtype (the "same
            computation in PyTorch" baseline of the accuracy rule).

    Returns:
        ``(out, lse)``: ``out`` is ``(B, Sq, Hq, D)`` (float64 if ``upcast`` else
        the input dtype); ``lse`` is the natural-log logsumexp of the scaled
        scores, ``(B, Hq, Sq)``, float64 if ``upcast`` else float32 (computed
        from the input-dtype scores).

    Features (same semantics as ``tileattn.attention``): ``window_size=(left, right)``
    (-1 = unbounded; causal sets right = 0), ``softcap`` (scores -> softcap*tanh(s/softcap)),
    ``alibi_slopes`` ((H,) or (B, H): adds -slope*|i + Sk - Sq - j|), ``sink`` ((H,) logit joining the
    denominator), ``dropout_mask`` ((B, H, Sq, Sk) bool keep-mask, scaled by 1/(1-dropout_p)). v may have a
    different head dim from q/k.

    A query row that sees no key gets ``out = 0`` and ``lse = -inf`` (``sink`` with a
    sink); gradients through such a row are zero (never NaN). ``out`` and ``lse``
    are both differentiable w.r.t. q, k, v (and sink).
    """
    if upcast:
        q, k, v = q.double(), k.double(), v.double()
        sink = sink.double() if sink is not None else None
    Sq, Hq, D = q.shape[1], q.shape[2], q.shape[3]
    Sk, Hkv = k.shape[1], k.shape[2]
    if Hq != Hkv:
        k = k.repeat_interleave(Hq // Hkv, dim=2)
        v = v.repeat_interleave(Hq // Hkv, dim=2)
    scale = 1.0 / math.sqrt(D) if softmax_scale is None else softmax_scale

    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale  # (B, H, Sq, Sk)
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    i = torch.arange(Sq, device=q.device)[:, None]
    j = torch.arange(Sk, device=q.device)[None, :]
    left, right = window_size
    if causal:
        right = 0
    visible = torch.ones(Sq, Sk, dtype=torch.bool, device=q.device)
    if right >= 0:
        visible &= j <= i + (Sk - Sq) + right
    if left >= 0:
        visible &= j >= i + (Sk - Sq) - left
    if alibi_slopes is not None:
        slopes = alibi_slopes.to(scores.dtype)
        slopes = slopes[None, :, None, None] if slopes.dim() == 1 else slopes[:, :, None, None]
        scores = scores - slopes * (i + (Sk - Sq) - j).abs().to(scores.dtype)
    scores = scores.masked_fill(~visible, float("-inf"))
    lse_dtype = torch.float64 if upcast else torch.float32
    if sink is not None:  # one extra always-visible column with no value
        col = sink.to(scores.dtype)[None, :, None, None].expand(scores.shape[0], -1, Sq, 1)
        scores = torch.cat([scores, col], dim=-1)
        visible = torch.cat([visible, torch.ones(Sq, 1, dtype=torch.bool, device=q.device)], dim=-1)
    # a row is live if any score (or a finite sink) can enter its softmax: (B, H, Sq, 1)
    row_visible = (scores > float("-inf")).any(dim=-1, keepdim=True)
    if scores.shape[-1] > 0:
        # Rows with no visible key: feed zeros to softmax / logsumexp (finite, no NaN
        # in the backward), then zero the probabilities and set lse = -inf.
        zero = torch.zeros((), dtype=scores.dtype, device=scores.device)
        safe = torch.where(row_visible, scores, zero)
        probs = torch.softmax(safe, dim=-1) * row_visible
        lse = torch.logsumexp(safe.to(lse_dtype), dim=-1)
        lse = torch.where(row_visible[..., 0], lse, torch.full((), float("-inf"), dtype=lse_dtype, device=lse.device))
        if sink is not None:
            probs = probs[..., :Sk]
        if dropout_mask is not None:
            probs = probs * dropout_mask.to(probs.dtype) / (1.0 - dropout_p)
    else:
        probs = scores  # (B, H, Sq, 0): the einsum below gives zeros
        lse = scores.sum(dim=-1).to(lse_dtype) - float("inf")  # all -inf, still part of the graph
    out = torch.einsum("bhqk,bkhd->bqhd", probs.to(v.dtype), v)
    return out, lse
