"""Backward pass (dq, dk, dv) of tileattn.attention against the float64 reference.

Rule: max|d_ours - d_ref| <= 3 * max|d_pt - d_ref| + atol (see tests/_helpers.py).
"""

import pytest
import torch

import tileattn
from _helpers import (
    HALF_DTYPES,
    LARGE,
    check_attention,
    dtype_id,
    make_gen,
    make_qkv,
    make_tensor,
    randn,
    run_ours,
    seed_for,
)

# (B, Sq, Sk, Hq, Hkv, D)
if LARGE:
    DTYPE_SHAPES = [(2, 1024, 1024, 4, 4, 64), (1, 2048, 4093, 8, 2, 128), (1, 8192, 8192, 2, 2, 128)]
    SEQLENS = [
        (1, 1), (1, 8192), (8192, 1), (113, 203), (128, 217), (1023, 1024), (2048, 2047),
        (3131, 1000), (1000, 3131), (4096, 4096), (8192, 8192),
    ]
    SEQ_DTYPES = HALF_DTYPES
    HEAD_DIMS = [8, 16, 24, 32, 40, 59, 64, 80, 96, 111, 128, 160, 192, 224, 256]
    HEAD_DIM_SHAPE = (2, 1031, 1031, 4, 2)
    GQA_SHAPE = (2, 1000, 2111, 128)
    GQA_HEADS = [(8, 8), (8, 4), (8, 2), (8, 1), (12, 3), (32, 4)]
    LAYOUT_SHAPE = (2, 1000, 1500, 8, 2, 96)
    MASKED_SEQLENS = [(17, 1), (1024, 17), (8192, 1000), (4097, 4096)]
    MISC_SHAPE = (2, 1111, 1111, 4, 2, 128)
    DET_SHAPE = (2, 4096, 4096, 16, 4, 128)
else:
    DTYPE_SHAPES = [(2, 130, 130, 2, 2, 64), (1, 63, 64, 4, 2, 40)]
    SEQLENS = [
        (1, 1), (1, 17), (17, 1), (17, 17), (1, 130), (130, 1), (63, 64), (64, 63),
        (63, 130), (130, 63), (130, 130),
    ]
    SEQ_DTYPES = [torch.float16]
    HEAD_DIMS = [8, 13, 16, 32, 40, 59, 64, 96, 111, 128, 256]
    HEAD_DIM_SHAPE = (1, 63, 64, 2, 1)
    GQA_SHAPE = (2, 63, 130, 32)
    GQA_HEADS = [(1, 1), (2, 1), (4, 1), (4, 2), (4, 4)]
    LAYOUT_SHAPE = (2, 63, 130, 2, 1, 40)
    MASKED_SEQLENS = [(17, 1), (64, 17), (130, 63)]
    MISC_SHAPE = (1, 63, 130, 2, 1, 64)
    DET_SHAPE = (1, 97, 130, 2, 1, 32)

CAUSAL = [False, True]


def _ids(shape):
    return "x".join(str(s) for s in shape)


def _qkv_dout(shape, dtype, seed, *, layout="contiguous", dout_layout="contiguous", scale=1.0):
    B, Sq, Sk, Hq, Hkv, D = shape
    q, k, v, gen = make_qkv(B, Sq, Sk, Hq, Hkv, D, dtype, seed, layout=layout, requires_grad=True, scale=scale)
    dout = make_tensor((B, Sq, Hq, D), dtype, gen, layout=dout_layout)
    return q, k, v, dout


@pytest.mark.parametrize("shape", DTYPE_SHAPES, ids=_ids)
@pytest.mark.parametrize("causal", CAUSAL, ids=["full", "causal"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=dtype_id)
def test_dtypes(dtype, causal, shape):
    q, k, v, dout = _qkv_dout(shape, dtype, seed_for("bwd-dtypes", dtype, causal, shape))
    check_attention(q, k, v, causal=causal, dout=dout)


@pytest.mark.parametrize("dtype", SEQ_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("causal", CAUSAL, ids=["full", "causal"])
@pytest.mark.parametrize("seqlens", SEQLENS, ids=lambda s: f"q{s[0]}-k{s[1]}")
def test_seqlens(seqlens, causal, dtype):
    Sq, Sk = seqlens
    shape = (2, Sq, Sk, 2, 2, 32) if not LARGE else (1, Sq, Sk, 4, 2, 64)
    q, k, v, dout = _qkv_dout(shape, dtype, seed_for("bwd-seqlens", seqlens, causal, dtype))
    check_attention(q, k, v, causal=causal, dout=dout)


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("causal", CAUSAL, ids=["full", "causal"])
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_head_dims(head_dim, causal, dtype):
    if not LARGE and dtype == torch.bfloat16 and head_dim not in (13, 59, 64, 256):
        pytest.skip("CPU: bf16 only on a few head dims (interpreter time); all of them run on GPU")
    shape = (*HEAD_DIM_SHAPE, head_dim)
    q, k, v, dout = _qkv_dout(shape, dtype, seed_for("bwd-hd", head_dim, causal, dtype))
    check_attention(q, k, v, causal=causal, dout=dout)


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("causal", CAUSAL, ids=["full", "causal"])
@pytest.mark.parametrize("heads", GQA_HEADS, ids=lambda h: f"hq{h[0]}-hkv{h[1]}")
def test_gqa(heads, causal, dtype):
    """dk / dv of a shared kv head sum the contributions of all its query heads."""
    Hq, Hkv = heads
    B, Sq, Sk, D = GQA_SHAPE
    q, k, v, dout = _qkv_dout((B, Sq, Sk, Hq, Hkv, D), dtype, seed_for("bwd-gqa", heads, causal, dtype))
    check_attention(q, k, v, causal=causal, dout=dout)


@pytest.mark.parametrize("causal", CAUSAL, ids=["full", "causal"])
@pytest.mark.parametrize("layout,dout_layout", [
    ("contiguous", "bhsd"),
    ("contiguous", "sliced"),
    ("contiguous", "strided_seq"),
    ("bhsd", "contiguous"),
    ("sliced", "bhsd"),
    ("strided_seq", "sliced"),
])
def test_noncontiguous(layout, dout_layout, causal):
    """Strided q/k/v and strided dout (last dim contiguous; NaN padding around the slices)."""
    q, k, v, dout = _qkv_dout(
        LAYOUT_SHAPE, torch.float16, seed_for("bwd-layout", layout, dout_layout, causal),
        layout=layout, dout_layout=dout_layout,
    )
    check_attention(q, k, v, causal=causal, dout=dout, extra=f"layout={layout} dout={dout_layout}")


def test_dout_last_dim_not_contiguous():
    """A dout whose last stride isn't 1 (e.g. from a transpose in the graph) must still work."""
    B, Sq, Sk, Hq, Hkv, D = MISC_SHAPE
    q, k, v, gen = make_qkv(*MISC_SHAPE, torch.float16, seed_for("bwd-dout-T"), requires_grad=True)
    dout = randn((B, Sq, Hq, D), torch.float16, gen).transpose(-1, -2).contiguous().transpose(-1, -2)
    assert dout.stride(-1) != 1
    check_attention(q, k, v, causal=True, dout=dout, extra="dout last stride != 1")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=dtype_id)
@pytest.mark.parametrize("seqlens", MASKED_SEQLENS, ids=lambda s: f"q{s[0]}-k{s[1]}")
def test_fully_masked_rows(seqlens, dtype):
    """Causal with Sq > Sk: rows with no visible key give exactly zero (finite) dq; dk, dv finite."""
    Sq, Sk = seqlens
    q, k, v, dout = _qkv_dout((2, Sq, Sk, 2, 1, 32), dtype, seed_for("bwd-masked", seqlens, dtype))
    out, lse, (dq, dk, dv) = run_ours(q, k, v, causal=True, dout=dout)
    n_empty = Sq - Sk
    assert (dq[:, :n_empty] == 0).all(), "dq must be exactly 0 on rows with no visible key"
    for name, g in (("dq", dq), ("dk", dk), ("dv", dv)):
        assert torch.isfinite(g).all(), f"{name} has NaN/Inf"
    check_attention(q, k, v, causal=True, dout=dout)


@pytest.mark.parametrize("causal", CAUSAL, ids=["full", "causal"])
@pytest.mark.parametrize("seqlens", [(0, 17), (17, 0), (0, 0)], ids=lambda s: f"q{s[0]}-k{s[1]}")
def test_empty_sequences(seqlens, causal):
    """Sq == 0: dk = dv = 0. Sk == 0: dq = 0 (and dk, dv empty)."""
    Sq, Sk = seqlens
    q, k, v, dout = _qkv_dout((2, Sq, Sk, 4, 2, 32), torch.float16, seed_for("bwd-empty", seqlens, causal))
    _, _, (dq, dk, dv) = run_ours(q, k, v, causal=causal, dout=dout)
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
    for name, g in (("dq", dq), ("dk", dk), ("dv", dv)):
        assert (g == 0).all(), f"{name} must be all zeros for an empty sequence"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=dtype_id)
@pytest.mark.parametrize("causal", CAUSAL, ids=["full", "causal"])
def test_deterministic(dtype, causal):
    """Two forward+backward runs on the same inputs are bit-identical (no atomics-order effects)."""
    q, k, v, dout = _qkv_dout(DET_SHAPE, dtype, seed_for("det", dtype, causal))
    runs = [run_ours(q, k, v, causal=causal, dout=dout) for _ in range(2)]
    (o1, l1, g1), (o2, l2, g2) = runs
    assert torch.equal(o1, o2) and torch.equal(l1, l2), "forward not deterministic"
    for name, a, b in zip(("dq", "dk", "dv"), g1, g2):
        assert torch.equal(a, b), f"{name} differs between two identical backward runs"


@pytest.mark.parametrize("causal", CAUSAL, ids=["full", "causal"])
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=dtype_id)
def test_grad_through_lse(dtype, causal):
    """The API documents lse as differentiable: gradients through (out, lse) match the reference."""
    B, Sq, Sk, Hq, Hkv, D = MISC_SHAPE
    Sq = Sk + 7  # Sq > Sk: with causal the first 7 rows are -inf (their dlse is 0)
    q, k, v, dout = _qkv_dout((B, Sq, Sk, Hq, Hkv, D), dtype, seed_for("lse-grad", dtype, causal))
    gen = make_gen(seed_for("dlse", dtype, causal))
    dlse = torch.randn((B, Hq, Sq), generator=gen).to(q.device)
    if causal and Sq > Sk:
        dlse[:, :, : Sq - Sk] = 0
    check_attention(q, k, v, causal=causal, dout=dout, dlse=dlse, extra="grad through lse")


@pytest.mark.parametrize("through", ["out", "lse"])
def test_unused_output_gradient_stays_none(monkeypatch, through):
    """A backward through out alone passes no dlse to the kernels (no zero-filled (B, H, S) buffer: HAS_DLSE off;
    the accuracy of that path is what every other backward test checks). One through lse alone gets dout = zeros:
    bit-equal to passing explicit zero dout with the same dlse (whose accuracy test_grad_through_lse checks)."""
    from tileattn.kernels import backward as bwd_mod, gluon_dq
    B, Sq, Sk, Hq, Hkv, D = MISC_SHAPE
    q, k, v, dout = _qkv_dout(MISC_SHAPE, torch.float16, seed_for("unused-grad", through))
    dlse = torch.randn((B, Hq, Sq), generator=make_gen(seed_for("unused-dlse"))).to(q.device)
    seen = []
    for mod in (bwd_mod, gluon_dq):  # the portable dQ kernel's launcher, or the Hopper Gluon one's (D=128)
        monkeypatch.setattr(mod, "launch", lambda fn, grid, args, kw, *o, _real=mod.launch, **ko: (
            seen.append(kw["HAS_DLSE"]) if "HAS_DLSE" in kw else None) or _real(fn, grid, args, kw, *o, **ko))
    out, lse = tileattn.attention(q, k, v, causal=True, return_lse=True)
    if through == "out":
        grads = torch.autograd.grad(out, (q, k, v), dout)
    else:
        grads = torch.autograd.grad(lse, (q, k, v), dlse)
    assert seen == [through == "lse"]
    if through == "lse":
        out, lse = tileattn.attention(q, k, v, causal=True, return_lse=True)
        want = torch.autograd.grad((out, lse), (q, k, v), (torch.zeros_like(out), dlse))
        for name, g, w in zip(("dq", "dk", "dv"), grads, want):
            assert torch.equal(g, w), name


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=dtype_id)
def test_large_logits(dtype):
    q, k, v, dout = _qkv_dout(MISC_SHAPE, dtype, seed_for("bwd-logits", dtype), scale=6.0)
    check_attention(q, k, v, causal=True, dout=dout, extra="q,k *= 6")


def test_partial_requires_grad():
    """Only q requires grad (e.g. frozen k/v cache): dq equals the dq of the all-grad run."""
    q, k, v, dout = _qkv_dout(MISC_SHAPE, torch.float16, seed_for("partial"))
    (dq_full, _, _) = run_ours(q, k, v, causal=True, dout=dout)[2]
    k2, v2 = k.detach(), v.detach()
    out = tileattn.attention(q, k2, v2, causal=True)
    (dq,) = torch.autograd.grad(out, (q,), dout)
    assert torch.equal(dq, dq_full)


def test_backward_via_loss():
    """Plain loss.backward() accumulates into .grad of all three inputs."""
    q, k, v, dout = _qkv_dout(MISC_SHAPE, torch.bfloat16, seed_for("loss"))
    out = tileattn.attention(q, k, v)
    (out.float() * dout.float()).sum().backward()
    for name, x in (("q", q), ("k", k), ("v", v)):
        assert x.grad is not None and x.grad.shape == x.shape and torch.isfinite(x.grad).all(), name


VALUE_DIMS = [(192, 128), (64, 256)] if LARGE else [(40, 24), (16, 59)]


@pytest.mark.parametrize("causal", CAUSAL, ids=["full", "causal"])
@pytest.mark.parametrize("dims", VALUE_DIMS, ids=lambda d: f"d{d[0]}-dv{d[1]}")
def test_value_head_dim_differs(dims, causal):
    """v's head dim differs from q/k's (allowed by the API): dq, dk, dv still match."""
    D, Dv = dims
    B, Sq, Sk, Hq, Hkv, _ = MISC_SHAPE
    gen = make_gen(seed_for("bwd-dv", dims, causal))
    q = make_tensor((B, Sq, Hq, D), torch.float16, gen, requires_grad=True)
    k = make_tensor((B, Sk, Hkv, D), torch.float16, gen, requires_grad=True)
    v = make_tensor((B, Sk, Hkv, Dv), torch.float16, gen, requires_grad=True)
    dout = make_tensor((B, Sq, Hq, Dv), torch.float16, gen)
    check_attention(q, k, v, causal=causal, dout=dout, extra=f"Dv={Dv}")
