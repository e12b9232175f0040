"""``flash_attn.bert_padding`` of flash-attn 2.8: move between padded (batch, seqlen, ...) tensors and packed
(total_tokens, ...) ones for the varlen attention functions. Plain PyTorch; every function is differentiable.

Typical use::

    x_unpad, indices, cu_seqlens, max_seqlen, seqused = unpad_input(x, attention_mask)
    y_unpad = ...  # e.g. flash_attn_varlen_qkvpacked_func(qkv_unpad, cu_seqlens, max_seqlen)
    y = pad_input(y_unpad, indices, batch, seqlen)  # padded positions are 0
"""

import torch
import torch.nn.functional as F

__all__ = ["index_first_axis", "index_put_first_axis", "unpad_input", "pad_input",
           "unpad_input_for_concatenated_sequences"]


def _check_indices(indices):
    if not isinstance(indices, torch.Tensor) or indices.dim() != 1 or indices.dtype not in (torch.int64, torch.int32):
        raise TypeError("indices must be a 1-D int64 (or int32) tensor")


def index_first_axis(input: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``input[indices]`` along the first axis: (N, ...) -> (len(indices), ...).

    The gradient scatters back into a zero (N, ...) tensor (summing over repeated indices).
    """
    if not isinstance(input, torch.Tensor) or input.dim() < 1:
        raise ValueError("index_first_axis needs a tensor with at least 1 dimension")
    _check_indices(indices)
    return input.index_select(0, indices)


def index_put_first_axis(values: torch.Tensor, indices: torch.Tensor, first_axis_dim: int) -> torch.Tensor:
    """A zero (first_axis_dim, ...) tensor with row ``indices[i]`` set to ``values[i]`` (indices unique).

    The gradient w.r.t. ``values`` gathers the rows ``indices`` of the incoming gradient.
    """
    if not isinstance(values, torch.Tensor) or values.dim() < 1:
        raise ValueError("index_put_first_axis needs values with at least 1 dimension")
    _check_indices(indices)
    if indices.shape[0] != values.shape[0]:
        raise ValueError(f"indices ({indices.shape[0]}) and values ({values.shape[0]}) must have the same length")
    base = values.new_zeros((int(first_axis_dim),) + tuple(values.shape[1:]))
    return base.index_copy(0, indices.long(), values)


def _flat_tokens(hidden_states, mask_shape):
    if not isinstance(hidden_states, torch.Tensor) or hidden_states.dim() < 2:
        raise ValueError("hidden_states must be (batch, seqlen, ...)")
    if tuple(hidden_states.shape[:2]) != tuple(mask_shape):
        raise ValueError(f"attention mask shape {tuple(mask_shape)} does not match hidden_states' (batch, seqlen) "
                         f"{tuple(hidden_states.shape[:2])}")
    return hidden_states.reshape((-1,) + tuple(hidden_states.shape[2:]))


def _cu_seqlens(seqlens: torch.Tensor) -> torch.Tensor:
    return F.pad(torch.cumsum(seqlens, dim=0, dtype=torch.int32), (1, 0))


def unpad_input(hidden_states, attention_mask, unused_mask=None):
    """Pack the tokens of a padded batch.

    Args:
        hidden_states: (batch, seqlen, ...).
        attention_mask: (batch, seqlen) bool / int, nonzero = a real token.
        unused_mask: optional (batch, seqlen) bool / int, nonzero = a slot that is kept in the packed tensor
            (it counts in cu_seqlens) but holds no real token.

    Returns ``(hidden_states_unpad, indices, cu_seqlens, max_seqlen_in_batch, seqused)``:
        hidden_states_unpad (total, ...): the kept tokens in (batch, position) order;
        indices (total,) int64: their positions in the flattened (batch * seqlen) input;
        cu_seqlens (batch + 1,) int32: cumulative kept tokens per sequence (attention_mask | unused_mask);
        max_seqlen_in_batch: Python int;
        seqused (batch,) int32: real tokens per sequence (attention_mask only).
    """
    kept = attention_mask != 0
    if unused_mask is not None:
        if tuple(unused_mask.shape) != tuple(attention_mask.shape):
            raise ValueError(f"unused_mask shape {tuple(unused_mask.shape)} != attention_mask shape "
                             f"{tuple(attention_mask.shape)}")
        kept = kept | (unused_mask != 0)
    flat = _flat_tokens(hidden_states, attention_mask.shape)
    seqlens = kept.sum(dim=-1, dtype=torch.int32)
    seqused = (attention_mask != 0).sum(dim=-1, dtype=torch.int32)
    indices = torch.nonzero(kept.flatten(), as_tuple=False).flatten()
    max_seqlen_in_batch = int(seqlens.max().item()) if seqlens.numel() else 0
    return index_first_axis(flat, indices), indices, _cu_seqlens(seqlens), max_seqlen_in_batch, seqused


def unpad_input_for_concatenated_sequences(hidden_states, attention_mask_in_length):
    """Pack rows that each hold several concatenated sequences.

    ``attention_mask_in_length`` (batch, seqlen) int: row b lists the lengths of the sequences packed in row b
    (in order, then zeros), e.g. ``[2, 3, 0, 0, 0, 0]`` = a 2-token and a 3-token sequence, then 1 pad slot.
    Returns ``(hidden_states_unpad, indices, cu_seqlens, max_seqlen_in_batch)``, where cu_seqlens has one entry
    per packed sequence (not per row).
    """
    lengths = attention_mask_in_length
    seqlen = lengths.shape[-1]
    totals = lengths.sum(dim=-1)
    kept = torch.arange(seqlen, device=lengths.device)[None, :] < totals[:, None]
    flat = _flat_tokens(hidden_states, lengths.shape)
    flat_lengths = lengths.flatten()
    seqlens = flat_lengths[flat_lengths != 0].to(torch.int32)
    indices = torch.nonzero(kept.flatten(), as_tuple=False).flatten()
    max_seqlen_in_batch = int(seqlens.max().item()) if seqlens.numel() else 0
    return index_first_axis(flat, indices), indices, _cu_seqlens(seqlens), max_seqlen_in_batch


def pad_input(hidden_states, indices, batch, seqlen):
    """Inverse of :func:`unpad_input`: (total, ...) -> (batch, seqlen, ...), zeros where no token was kept."""
    if not isinstance(hidden_states, torch.Tensor) or hidden_states.dim() < 1:
        raise ValueError("pad_input needs hidden_states of shape (total, ...)")
    out = index_put_first_axis(hidden_states, indices, int(batch) * int(seqlen))
    return out.reshape((int(batch), int(seqlen)) + tuple(hidden_states.shape[1:]))
