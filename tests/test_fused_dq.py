"""The fused Hopper backward (opt-in ``TILEATTN_GLUON_BWD_FUSED=1``; kernels/fused_dq.py and gluon_backward.py's
FUSED_DQ): the dK/dV kernel also computes dQ and reduce-adds it into an fp32 accumulator.

GPU (sm90): the fused kernel runs (spied); dq / dk / dv pass the accuracy rule against the float64 reference on odd
sizes, GQA, Sq != Sk, causal and the features (softcap, windows, ALiBi, sink, a gradient through lse); dk / dv are
bit-identical to the two-kernel path's (the same arithmetic) and dq agrees with it; launch plans replay it.
CPU: the knob, the accumulator's layout, the conversion kernel (interpreted), and the kernel compiled for sm_90a.
"""

import pytest
import torch

from _helpers import (HALF_DTYPES, HOPPER, attn_params, assert_compiles, check_attention, dtype_id, fresh_grads,
                      make_gen, make_qkv, ptxas_available, randn, seed_for)
from tileattn.kernels import fused_dq, gluon_backward, plans

KNOB = "TILEATTN_GLUON_BWD_FUSED"
hopper = pytest.mark.skipif(not HOPPER, reason="the Gluon backward runs on sm90 only")
needs_gluon = pytest.mark.skipif(not gluon_backward.AVAILABLE, reason="this triton has no Gluon")


def test_knob_and_accumulator(monkeypatch):
    """Off by default; a bad value is a ValueError naming the knob; CPU tensors never take it; the accumulator is
    (B * Hq * D, Sq rounded up to 4) fp32 and its described part the first Sq columns."""
    q = torch.zeros(2, 10, 3, 64)
    p = attn_params(q, q)
    assert not fused_dq.enabled(q, p)
    monkeypatch.setenv(KNOB, "1")
    assert not fused_dq.enabled(q, p), "a CPU tensor"
    monkeypatch.setenv(KNOB, "yes")
    with pytest.raises(ValueError, match=KNOB):
        fused_dq.enabled(q, p)
    assert fused_dq.slots(128) == 4 and fused_dq.slots(64) == 2
    monkeypatch.setenv("TILEATTN_FUSED_DQ_SLOTS", "2")
    assert fused_dq.slots(128) == 2
    monkeypatch.setenv("TILEATTN_FUSED_DQ_SLOTS", "3")
    with pytest.raises(ValueError, match="TILEATTN_FUSED_DQ_SLOTS"):
        fused_dq.slots(128)
    acc = fused_dq.accumulator(q)
    assert acc.shape == (2 * 3 * 64, 12) and acc.dtype == torch.float32
    view = fused_dq.described(acc, 10)
    assert view.shape == (384, 10) and view.stride() == (12, 1) and view.data_ptr() == acc.data_ptr()


@needs_gluon
def test_kernel_flags_and_descriptor(monkeypatch):
    """The dK/dV kernel's fused constexprs (FUSED_DQ = the slots, EARLY_DQ only with its knob) and the
    accumulator's TMA descriptor: the described columns (Sq, not the rounded width), the row stride of the full
    accumulator, boxes of (D rows, queries) and fp32's default 128-byte swizzle (built on the CPU: no GPU
    needed)."""
    assert fused_dq.kernel_flags(128) == {"FUSED_DQ": 4} and fused_dq.kernel_flags(64) == {"FUSED_DQ": 2}
    monkeypatch.setenv("TILEATTN_FUSED_DQ_EARLY", "1")
    assert fused_dq.kernel_flags(128) == {"FUSED_DQ": 4, "EARLY_DQ": True}
    acc = fused_dq.accumulator(torch.zeros(2, 130, 3, 128))
    desc = fused_dq.descriptor(acc, 130, 64, 128)
    assert list(desc.shape) == [768, 130] and list(desc.strides) == [132, 1]
    assert list(desc.block_shape) == [64, 128] and desc.base.data_ptr() == acc.data_ptr()
    assert desc.layout.swizzle_byte_width == 128 and desc.layout.element_bitwidth == 32


@pytest.mark.parametrize("shape", [(2, 10, 3, 64), (1, 1, 2, 128), (1, 130, 1, 64)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=dtype_id)
def test_convert(shape, dtype):
    """dq[b, s, h, d] = acc[(b * H + h) * D + d, s] * scale in dq's dtype, into a strided dq (a view of a wider
    tensor), the accumulator's padding columns (NaN) never read (runs interpreted on the CPU)."""
    B, S, H, D = shape
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = make_gen(seed_for("fused-convert", shape))
    acc = fused_dq.accumulator(torch.empty(shape, device=device)).fill_(float("nan"))
    acc[:, :S] = randn((B * H * D, S), torch.float32, gen).to(device)
    wide = torch.full((B, S, H + 1, D), float("nan"), dtype=dtype, device=device)
    dq = wide[:, :, 1:]
    fused_dq.convert(acc, dq, 0.125)
    want = (acc[:, :S].view(B, H, D, S).permute(0, 3, 1, 2) * 0.125).to(dtype)
    assert torch.equal(dq, want)
    assert torch.isnan(wide[:, :, 0]).all(), "wrote outside dq"


@needs_gluon
@pytest.mark.skipif(not ptxas_available(), reason="needs triton's bundled ptxas")
def test_compiles_for_sm90():
    """FUSED_DQ at D=64 / 128 with the features in its scope (``fused_dq.enabled``: D=64 without softcap
    and ALiBi): no serialised wgmma, shared memory within the limit (~182 KB), few spills (ptxas, session 23: D=128
    0 B plain, 8 B causal, up to 100 B with softcap + window; D=64 8 / 24 B, 44 B windowed) with 4 staging slots at
    D=128 (215 KB of shared memory) and 2 at D=64."""
    assert_compiles([("--bwd", "--fused-dq", "--spill-budget", budget, "--head-dim", d, *extra)
                     for d, budget, extra in [(128, 16, ()), (128, 16, ("--causal",)), (64, 32, ()),
                                              (64, 32, ("--causal", "--fp16")), (64, 64, ("--window",)),
                                              (128, 112, ("--softcap", "--window")),
                                              (128, 112, ("--softcap", "--causal")),
                                              (128, 48, ("--alibi", "--fp16"))]],
                    env_extra={"TILEATTN_FAST_TANH": "1"})
    # v28c (TILEATTN_FUSED_DQ_EARLY=1: dQ^T issued first, staged while the step's other products run): 0 B
    assert_compiles([("--bwd", "--fused-dq", "--spill-budget", 0, "--head-dim", d, *extra)
                     for d, extra in [(128, ()), (128, ("--causal",)), (64, ("--causal", "--fp16")),
                                      (128, ("--softcap", "--window")), (64, ("--window",))]],
                    env_extra={"TILEATTN_FAST_TANH": "1", "TILEATTN_FUSED_DQ_EARLY": "1"})


def _record_fused(monkeypatch, early=False):
    """Turn the fused backward on (``early``: with TILEATTN_FUSED_DQ_EARLY=1); the list of FUSED_DQ flags of the
    dK/dV kernel's launches (EARLY_DQ asserted as asked)."""
    seen = []
    real = gluon_backward.launch

    def launch(fn, grid, args, kw, *rest, **opts):
        seen.append(bool(kw.get("FUSED_DQ")))
        assert bool(kw.get("EARLY_DQ")) == (early and seen[-1])
        return real(fn, grid, args, kw, *rest, **opts)
    monkeypatch.setattr(gluon_backward, "launch", launch)
    monkeypatch.setenv(KNOB, "1")
    monkeypatch.setenv("TILEATTN_FUSED_DQ_EARLY", "1" if early else "0")
    return seen


FUSED_CASES = [(2, 1, 1, 2, 2), (1, 17, 300, 3, 3), (2, 130, 130, 4, 2), (1, 300, 128, 2, 2),
               (2, 1000, 1000, 2, 2), (1, 257, 1031, 4, 1), (1, 2048, 2048, 2, 2)]


@hopper
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("case", FUSED_CASES, ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("early", [False, True], ids=["late", "early"])
def test_accuracy(early, case, causal, d, dtype, monkeypatch):
    B, Sq, Sk, Hq, Hkv = case
    seen = _record_fused(monkeypatch, early)
    q, k, v, gen = make_qkv(B, Sq, Sk, Hq, Hkv, d, dtype, seed_for("fused-bwd", case, causal, d), requires_grad=True)
    dout = randn((B, Sq, Hq, d), dtype, gen)
    check_attention(q, k, v, causal=causal, dout=dout, extra="fused bwd")
    assert seen and all(seen), "the call did not take the fused backward"


@hopper
@pytest.mark.gpu
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("feat", [{}, dict(causal=True), dict(softcap=6.0, causal=True), dict(window_size=(300, 40)),
                                  dict(alibi=True)], ids=lambda f: "-".join(f) or "plain")
@pytest.mark.parametrize("early", [False, True], ids=["late", "early"])
def test_agrees_with_two_kernels(early, feat, d, monkeypatch):
    """dk / dv bit-identical to the two-kernel path (the fused kernel's dK / dV arithmetic is unchanged) and dq
    close to it, over many steps per program and GQA (the dS^T exchange between the warpgroups does not deadlock);
    D=64 softcap / ALiBi calls keep the two-kernel path (``fused_dq.enabled``)."""
    q, k, v, gen = make_qkv(2, 1500, 1300, 8, 2, d, torch.bfloat16, seed_for("fused-vs-two", d, sorted(feat)),
                            requires_grad=True)
    kw = dict(feat)
    if kw.pop("alibi", False):
        kw["alibi_slopes"] = randn((8,), torch.float32, gen).abs() * 0.1
    dout = randn((2, 1500, 8, d), torch.bfloat16, gen)
    want = fresh_grads(q, k, v, dout, **kw)
    seen = _record_fused(monkeypatch, early)
    got = fresh_grads(q, k, v, dout, **kw)
    fused = d == 128 or not ({"softcap", "alibi"} & set(feat))
    assert seen and all(f == fused for f in seen)
    assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2]), "dk / dv differ from the two-kernel path"
    torch.testing.assert_close(got[0].float(), want[0].float(), atol=2 ** -7, rtol=2 ** -7)


@hopper
@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_features(causal, monkeypatch):
    """A sink (with its gradient), softcap + window, ALiBi and a gradient through lse, fused, by the accuracy
    rule."""
    import test_features
    seen = _record_fused(monkeypatch)
    B, Sq, Sk, Hq, Hkv, D = 2, 333, 777, 4, 2, 128
    q, k, v, gen = make_qkv(B, Sq, Sk, Hq, Hkv, D, torch.bfloat16, seed_for("fused-feat", causal), requires_grad=True)
    dout = randn((B, Sq, Hq, D), torch.bfloat16, gen)
    test_features._check(q, k, v, dout, causal=causal, ctx="fused bwd",
                         sink=randn((Hq,), torch.float32, gen).requires_grad_())
    test_features._check(q, k, v, dout, causal=causal, ctx="fused bwd", softcap=5.0, window_size=(200, 50))
    test_features._check(q, k, v, dout, causal=causal, ctx="fused bwd",
                         alibi_slopes=randn((Hq,), torch.float32, gen).abs() * 0.1)
    check_attention(q, k, v, causal=causal, dout=dout, dlse=randn((B, Hq, Sq), torch.float32, gen),
                    extra="fused bwd dlse")
    assert len(seen) == 4 and all(seen)


@hopper
@pytest.mark.gpu
def test_launch_plans_replay_it(monkeypatch):
    """With launch plans on, the fused backward's launches (stats-only pass, dK/dV + dQ, conversion) replay on a
    fresh accumulator each call: the replayed gradients equal the first call's dk / dv and its dq up to the adds'
    order. A plan of the two-kernel form made before the knob was set is not replayed for it (run 133's bench
    replayed one: the knob is read with the buffers, outside the plan's record of knobs)."""
    monkeypatch.setenv("TILEATTN_LAUNCH_PLANS", "1")
    q, k, v, gen = make_qkv(2, 1024, 1024, 8, 2, 128, torch.bfloat16, seed_for("fused-plans"), requires_grad=True)
    dout = randn((2, 1024, 8, 128), torch.bfloat16, gen)
    for _ in range(3):  # the two-kernel form's plan, made and replayed
        fresh_grads(q, k, v, dout, causal=True)
    seen = _record_fused(monkeypatch)
    first = fresh_grads(q, k, v, dout, causal=True)
    assert seen and all(seen), "the two-kernel plan was replayed with the fused backward asked for"
    fresh_grads(q, k, v, dout, causal=True)  # records the plans
    replays = plans.stats["replays"]
    again = fresh_grads(q, k, v, dout, causal=True)
    assert plans.stats["replays"] == replays + 2, "forward and backward should both replay"
    assert seen and all(seen)
    assert torch.equal(again[1], first[1]) and torch.equal(again[2], first[2])
    torch.testing.assert_close(again[0], first[0], atol=2 ** -9, rtol=2 ** -9)
