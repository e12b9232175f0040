"""The validated, kernel-ready description of one attention call, shared by the forward and backward launchers."""

from dataclasses import dataclass
from typing import Optional

import torch

from .. import configs
from .._hostinfo import leaves_rows
from .common import LOG2E_F


@dataclass
class AttnParams:
    """Everything but the tensors q, k, v (and their gradients).

    batch: number of sequences. varlen: q/k/v are packed (1, total, H, D) with cu_seqlens_* (batch + 1,) int32.
    max_seqlen_q/k: the (maximum) sequence lengths. window_left/right: -1 = unbounded; causal is right = 0.
    softcap: 0 = off. alibi_slopes: fp32 (H,) or (B, H) contiguous, or None. sink: fp32 (Hq,) or None.
    dropout_p: probability of dropping; rng: int64 (2,) [seed, offset] when dropout_p > 0.
    """
    batch: int
    max_seqlen_q: int
    max_seqlen_k: int
    softmax_scale: float
    window_left: int = -1
    window_right: int = -1
    softcap: float = 0.0
    alibi_slopes: Optional[torch.Tensor] = None
    sink: Optional[torch.Tensor] = None
    dropout_p: float = 0.0
    rng: Optional[torch.Tensor] = None
    cu_seqlens_q: Optional[torch.Tensor] = None
    cu_seqlens_k: Optional[torch.Tensor] = None

    @property
    def varlen(self) -> bool:
        return self.cu_seqlens_q is not None

    @property
    def causal_like(self) -> bool:
        return self.window_right >= 0

    @property
    def qk_scale(self) -> float:
        """Multiplier of raw q.k: to log2 units without softcap, to the tanh argument with it."""
        return self.softmax_scale / self.softcap if self.softcap > 0 else self.softmax_scale * LOG2E_F

    @property
    def softcap_log2(self) -> float:
        return self.softcap * LOG2E_F

    @property
    def alibi_stride_b(self) -> int:
        a = self.alibi_slopes
        return a.stride(0) if (a is not None and a.dim() == 2) else 0


def forward_outputs(q: torch.Tensor, dv: int, p: AttnParams):
    """The forward's outputs for q (B, Sq, Hq, Dqk) (varlen: (1, total_q, Hq, Dqk)): out (B, Sq, Hq, dv) in q's
    dtype and lse fp32 (B, Hq, Sq), or (Hq, total_q) for varlen, with lse's batch and head strides. Varlen rows
    outside every sequence, which no kernel program writes, start as out 0 / lse -inf."""
    _, rows_q, q_heads, _ = q.shape
    outside = leaves_rows(p.cu_seqlens_q, rows_q)
    out = (torch.zeros if outside else torch.empty)(q.shape[:3] + (dv,), dtype=q.dtype, device=q.device)
    if p.varlen:
        lse = (torch.full((q_heads, rows_q), float("-inf"), dtype=torch.float32, device=q.device) if outside
               else torch.empty((q_heads, rows_q), dtype=torch.float32, device=q.device))
        return out, lse, 0, rows_q
    lse = torch.empty((q.shape[0], q_heads, rows_q), dtype=torch.float32, device=q.device)
    return out, lse, q_heads * rows_q, rows_q


def residual_like(out: torch.Tensor) -> torch.Tensor:
    """An uninitialised buffer for out's rounding residual: out's shape and strides, in the format
    ``configs.residual_dtype`` names (out's dtype, or int8 in units of out's exponent: the kernels tell them apart
    by dtype)."""
    return torch.empty_like(out, dtype=configs.residual_dtype(out.dtype))
