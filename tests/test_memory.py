"""Peak extra CUDA memory of forward + backward grows as O(N), not O(N^2).

GPU-only: measured with torch.cuda.max_memory_allocated; the CPU interpreter has
no device allocator to measure, so these tests are skipped there.
"""

import gc

import pytest
import torch

import tileattn
from _helpers import ON_GPU, make_gen

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not ON_GPU, reason="peak CUDA memory is a GPU-only property (CPU runs the interpreter)"),
]

MiB = 2**20


def _peak_extra_bytes(B, S, Hq, Hkv, D, dtype, causal):
    """Peak bytes allocated during forward + backward beyond q, k, v, dout (all allocated beforehand)."""
    gen = make_gen(7)
    q = torch.randn(B, S, Hq, D, generator=gen).to("cuda", dtype).requires_grad_(True)
    k = torch.randn(B, S, Hkv, D, generator=gen).to("cuda", dtype).requires_grad_(True)
    v = torch.randn(B, S, Hkv, D, generator=gen).to("cuda", dtype).requires_grad_(True)
    dout = torch.randn(B, S, Hq, D, generator=gen).to("cuda", dtype)
    # warm-up (compilation, autotuning caches, cuBLAS/allocator state) outside the measurement
    out = tileattn.attention(q, k, v, causal=causal)
    torch.autograd.grad(out, (q, k, v), dout)
    del out
    # Nothing from the warm-up may be freed inside the measured region (that would lower peak - base): collect
    # any cyclic garbage now (run 30a: once, the 16k measurement read 33 MiB, below what dq, dk, dv alone take).
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = tileattn.attention(q, k, v, causal=causal)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    assert torch.isfinite(dq).all() and torch.isfinite(dk).all() and torch.isfinite(dv).all()
    io_bytes = sum(t.numel() * t.element_size() for t in (q, k, v, dout))
    del q, k, v, dout, out, dq, dk, dv
    torch.cuda.empty_cache()
    return peak, io_bytes


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("heads", [(8, 8), (8, 2)], ids=["mha", "gqa4"])
def test_peak_memory_linear_at_32k(heads, causal):
    B, S, D, dtype = 1, 32768, 128, torch.bfloat16
    Hq, Hkv = heads
    peak, io_bytes = _peak_extra_bytes(B, S, Hq, Hkv, D, dtype, causal)
    # What has to exist: out, dq, dk, dv (= io size) plus O(N) fp32 scratch (lse, delta, a fp32 dq
    # accumulator: <= 2x q). Allow 4x the inputs+dout bytes in total.
    bound = 4 * io_bytes
    one_score_matrix = S * S * 2  # a single (S x S) bf16 matrix for ONE head: 2 GiB
    naive = B * Hq * one_score_matrix  # what materialising the scores would take: 16 GiB
    assert bound <= naive / 8 and bound <= one_score_matrix / 2, "bound must be far below the N x N scores"
    assert peak <= bound, (
        f"peak extra memory {peak / MiB:.0f} MiB > bound {bound / MiB:.0f} MiB "
        f"(inputs+dout {io_bytes / MiB:.0f} MiB; one {S}x{S} bf16 matrix = {one_score_matrix / MiB:.0f} MiB)"
    )


def test_peak_memory_scales_linearly():
    """Doubling N at most ~doubles the extra memory (an N x N buffer would quadruple it)."""
    B, Hq, Hkv, D, dtype = 1, 4, 4, 128, torch.bfloat16
    p16, io16 = _peak_extra_bytes(B, 16384, Hq, Hkv, D, dtype, causal=True)
    p32, io32 = _peak_extra_bytes(B, 32768, Hq, Hkv, D, dtype, causal=True)
    # out, dq, dk, dv are live together at the end: a reading below them means the measurement is broken
    for peak, io, n in ((p16, io16, "16k"), (p32, io32, "32k")):
        assert peak >= io, f"{n}: peak extra {peak / MiB:.0f} MiB < out + dq + dk + dv ({io / MiB:.0f} MiB)"
    ratio = p32 / p16
    assert ratio <= 2.5, f"extra memory grew {ratio:.2f}x when N doubled (16k: {p16 / MiB:.0f} MiB, 32k: {p32 / MiB:.0f} MiB)"
