"""The Hopper Gluon backward kernels: dK/dV (kernels/gluon_backward.py) and dQ (kernels/gluon_dq.py; on by default at
D=128 and 256, forced on with TILEATTN_GLUON_DQ=1 for D=64 here).

GPU (sm90): the calls it accepts go through it (spied); dq / dk / dv pass the accuracy rule against the float64
reference on odd sizes, GQA, Sq != Sk, causal, strided and packed inputs, with a sink and with a gradient through
lse; results are bit-reproducible and agree with the portable kernel (TILEATTN_GLUON=0).
CPU: the dispatch rules, and the kernel compiled for sm_90a with Triton's bundled ptxas (no wgmma serialisation,
spills within budget).
"""

import dataclasses
import os

import pytest
import torch

import tileattn
from tileattn import configs
from _helpers import (GLUON_CASES, HALF_DTYPES, HOPPER, attn_params, check_attention, dtype_id, assert_compiles,
                      fresh_grads, make_gen, make_qkv, ptxas_available, randn, seed_for, spy_calls)
from tileattn.kernels import gluon_backward, gluon_dq

hopper = pytest.mark.skipif(not HOPPER, reason="the Gluon backward runs on sm90 only")
needs_gluon = pytest.mark.skipif(not gluon_backward.AVAILABLE, reason="this triton has no Gluon")


@pytest.fixture
def spy(monkeypatch):
    """Record the Gluon dK/dV kernel's calls."""
    return spy_calls(monkeypatch, gluon_backward, "dkdv")


@pytest.fixture
def dq_spy(monkeypatch):
    """Turn the Gluon dQ kernel on and record its calls."""
    monkeypatch.setenv("TILEATTN_GLUON_DQ", "1")
    return spy_calls(monkeypatch, gluon_dq, "dq")


def test_scope_on_cpu():
    q = torch.zeros(1, 4, 2, 64)
    assert not gluon_backward.applies(q, q, q, q, q, q, q, attn_params(q, q))


def test_config_override(monkeypatch):
    """TILEATTN_GLUON_BWD_CONFIG: six values keep the entry's split flag, a seventh sets it; other counts are a
    ValueError naming the knob."""
    base = configs.gluon_backward_config(128)
    monkeypatch.setenv("TILEATTN_GLUON_BWD_CONFIG", "64,3,232,40,168,0")
    c = configs.gluon_backward_config(128)
    assert (c.block_m, c.stages, c.consumer_regs, c.producer_regs, c.maxnreg, c.pipeline, c.split) == \
        (64, 3, 232, 40, 168, False, base.split)
    assert c.dq == base.dq and c.dq_block_n == base.dq_block_n
    monkeypatch.setenv("TILEATTN_GLUON_BWD_CONFIG", "64,3,240,24,168,1,1")
    assert configs.gluon_backward_config(128).split and configs.gluon_backward_config(128).pipeline
    monkeypatch.setenv("TILEATTN_GLUON_BWD_CONFIG", "32,3,240,24,168,1,0")
    assert not configs.gluon_backward_config(256).split
    for bad in ("64,3,240,24,168", "64,3,240,24,168,1,1,1"):
        monkeypatch.setenv("TILEATTN_GLUON_BWD_CONFIG", bad)
        with pytest.raises(ValueError, match="TILEATTN_GLUON_BWD_CONFIG"):
            configs.gluon_backward_config(128)


@hopper
@pytest.mark.gpu
def test_scope_on_hopper(monkeypatch):
    q = torch.zeros(2, 64, 4, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.zeros(2, 80, 2, 128, device="cuda", dtype=torch.bfloat16)
    ok = (q, k, k, q, q, k, k)  # q, k, v, dout, dq, dk, dv
    assert gluon_backward.applies(*ok, attn_params(q, k))
    assert gluon_backward.applies(*ok, attn_params(q, k, causal=True))
    assert gluon_backward.applies(*ok, attn_params(q, k, sink=torch.zeros(4, device="cuda")))
    assert gluon_backward.applies(*ok, attn_params(q, k, softcap=5.0))  # softcap: in scope
    assert gluon_backward.applies(*ok, attn_params(q, k, window_left=16))  # sliding windows: in scope
    assert gluon_backward.applies(*ok, attn_params(q, k, alibi_slopes=torch.zeros(4, device="cuda")))
    assert not gluon_backward.applies(*ok, attn_params(q, k, dropout_p=0.1))
    f = [t.float() for t in ok]
    assert not gluon_backward.applies(*f, attn_params(q, k))
    q256 = torch.zeros(1, 64, 2, 256, device="cuda", dtype=torch.bfloat16)
    assert gluon_backward.applies(*(q256, ) * 7, attn_params(q256, q256)).split  # the split kernel: on by default
    assert not gluon_backward.applies(*(q256, ) * 7, attn_params(q256, q256, softcap=5.0))
    monkeypatch.setenv("TILEATTN_GLUON", "0")
    assert not gluon_backward.applies(*(q256, ) * 7, attn_params(q256, q256))
    monkeypatch.delenv("TILEATTN_GLUON")
    dk_odd = torch.zeros(2, 80, 2, 129, device="cuda", dtype=torch.bfloat16)[..., 1:]  # base off 16 bytes
    assert not gluon_backward.applies(q, k, k, q, q, dk_odd, k, attn_params(q, k))
    from _flash_helpers import seqlens_to_cu
    from tileattn.kernels.params import AttnParams
    cu = seqlens_to_cu([30, 34])
    pv = AttnParams(batch=2, max_seqlen_q=34, max_seqlen_k=34, softmax_scale=0.1, cu_seqlens_q=cu, cu_seqlens_k=cu)
    packed = (q[:1], q[:1, :, :2], q[:1, :, :2], q[:1], q[:1], q[:1, :, :2], q[:1, :, :2])  # (1, 64, H, 128)
    assert gluon_backward.applies(*packed, pv)  # packed varlen: in scope
    monkeypatch.setenv("TILEATTN_GLUON_VARLEN", "0")
    assert not gluon_backward.applies(*packed, pv)
    monkeypatch.delenv("TILEATTN_GLUON_VARLEN")
    monkeypatch.setenv("TILEATTN_GLUON", "0")
    assert not gluon_backward.applies(*ok, attn_params(q, k))
    monkeypatch.setenv("TILEATTN_GLUON", "1")
    monkeypatch.setenv("TILEATTN_ARCH", "8.0")
    assert not gluon_backward.applies(*ok, attn_params(q, k))


@hopper
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("case", GLUON_CASES, ids=lambda c: "x".join(map(str, c)))
def test_accuracy(case, causal, d, dtype, spy):
    B, Sq, Sk, Hq, Hkv = case
    q, k, v, gen = make_qkv(B, Sq, Sk, Hq, Hkv, d, dtype, seed_for("gluon-bwd", case, causal, d),
                            requires_grad=True)
    dout = randn((B, Sq, Hq, d), dtype, gen)
    check_attention(q, k, v, causal=causal, dout=dout, extra="gluon bwd")
    assert spy, "the call did not take the Gluon dK/dV kernel"


@hopper
@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_dlse_and_sink(causal, spy):
    """A gradient through lse and a sink change delta and lse only: the same kernel, checked end to end."""
    import test_features
    B, Sq, Sk, Hq, Hkv, D = 2, 333, 777, 4, 2, 128
    q, k, v, gen = make_qkv(B, Sq, Sk, Hq, Hkv, D, torch.bfloat16, seed_for("gluon-bwd-sink", causal),
                            requires_grad=True)
    test_features._check(q, k, v, randn((B, Sq, Hq, D), torch.bfloat16, gen), causal=causal, ctx="gluon bwd",
                         sink=randn((Hq,), torch.float32, gen).requires_grad_())
    dout = randn((B, Sq, Hq, D), torch.bfloat16, gen)
    check_attention(q, k, v, causal=causal, dout=dout, dlse=randn((B, Hq, Sq), torch.float32, gen),
                    extra="gluon bwd dlse")
    assert len(spy) == 2


@hopper
@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["bhsd", "qkv_packed"])
def test_strided_and_packed(layout, spy):
    gen = torch.Generator(device="cuda").manual_seed(11)
    B, S, H, D = 2, 333, 4, 128
    if layout == "bhsd":  # (B, H, S, D) storage seen as (B, S, H, D)
        q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16, generator=gen).transpose(1, 2)
                   for _ in range(3))
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        check_attention(q, k, v, causal=True, dout=torch.randn(B, S, H, D, device="cuda", dtype=torch.bfloat16,
                                                               generator=gen), extra=layout)
    else:  # the packed function writes dq / dk / dv into views of one (B, S, 3, H, D) gradient
        qkv = torch.randn(B, S, 3, H, D, device="cuda", dtype=torch.bfloat16, generator=gen, requires_grad=True)
        out = tileattn.flash_attn_qkvpacked_func(qkv, causal=True)
        dout = torch.randn_like(out)
        out.backward(dout)
        q, k, v = (t.detach().requires_grad_() for t in qkv.unbind(2))
        ref = tileattn.flash_attn_func(q, k, v, causal=True)
        ref.backward(dout)
        got = qkv.grad.unbind(2)
        for g, r in zip(got, (q.grad, k.grad, v.grad)):
            assert torch.equal(g, r)
    assert spy


DQ_CASES = [(2, 1, 1, 2, 2), (1, 17, 17, 3, 3), (2, 130, 130, 4, 2), (1, 128, 300, 2, 1), (1, 300, 128, 2, 2),
            (1, 257, 1031, 4, 1), (1, 2048, 2048, 2, 2)]


@hopper
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("case", DQ_CASES, ids=lambda c: "x".join(map(str, c)))
def test_dq_kernel_accuracy(case, causal, d, dtype, spy, dq_spy):
    B, Sq, Sk, Hq, Hkv = case
    q, k, v, gen = make_qkv(B, Sq, Sk, Hq, Hkv, d, dtype, seed_for("gluon-dq", case, causal, d), requires_grad=True)
    dout = randn((B, Sq, Hq, d), dtype, gen)
    check_attention(q, k, v, causal=causal, dout=dout, extra="gluon dq")
    assert spy and dq_spy, "the call did not take the Gluon dQ and dK/dV kernels"


@hopper
@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_dq_kernel_dlse_sink_and_delta_modes(causal, dq_spy, monkeypatch):
    """dlse and a sink (delta, d(sink)); the rounded delta mode (no residual) goes through the kernel too; the
    correcting mode (no residual kept) takes the portable dQ kernel."""
    import test_features
    B, Sq, Sk, Hq, Hkv, D = 2, 333, 777, 4, 2, 128
    q, k, v, gen = make_qkv(B, Sq, Sk, Hq, Hkv, D, torch.bfloat16, seed_for("gluon-dq-sink", causal),
                            requires_grad=True)
    test_features._check(q, k, v, randn((B, Sq, Hq, D), torch.bfloat16, gen), causal=causal, ctx="gluon dq",
                         sink=randn((Hq,), torch.float32, gen).requires_grad_())
    check_attention(q, k, v, causal=causal, dout=randn((B, Sq, Hq, D), torch.bfloat16, gen),
                    dlse=randn((B, Hq, Sq), torch.float32, gen), extra="gluon dq dlse")
    assert len(dq_spy) == 2
    dout = randn((B, Sq, Hq, D), torch.bfloat16, gen)

    def grads():
        q.grad = k.grad = v.grad = None
        tileattn.attention(q, k, v, causal=causal).backward(dout)
        return q.grad.float(), k.grad.float(), v.grad.float()
    want = grads()
    monkeypatch.setenv("TILEATTN_DELTA", "rounded")
    rounded = grads()
    assert len(dq_spy) == 4
    for a, b in zip(want, rounded):  # rounded delta: FlashAttention's; close on a random (not one-hot) softmax
        torch.testing.assert_close(a, b, atol=2 ** -5, rtol=2 ** -5)
    monkeypatch.setenv("TILEATTN_DELTA", "correct")  # no residual stored: the portable kernel corrects delta
    q2, k2, v2 = (t.detach().requires_grad_() for t in (q, k, v))
    tileattn.attention(q2, k2, v2, causal=causal).backward(dout)
    assert len(dq_spy) == 4
    for a, b in zip(want, (q2.grad, k2.grad, v2.grad)):
        torch.testing.assert_close(a, b.float(), atol=2 ** -6, rtol=2 ** -6)


@hopper
@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("portable", ["dq", "all"], ids=["portable-dq", "portable-both"])
def test_reproducible_and_agrees_with_portable_kernels(portable, causal, monkeypatch):
    """Bit-reproducible; and close to the portable dQ kernel (beside the Gluon dK/dV one) and to the portable
    backward (TILEATTN_GLUON=0), with the Gluon dQ kernel on."""
    q, k, v, gen = make_qkv(2, 777, 901, 4, 2, 128, torch.bfloat16, seed_for("gluon-bwd-vs-portable", causal),
                            requires_grad=True)
    dout = randn((2, 777, 4, 128), torch.bfloat16, gen)

    def grads():
        return fresh_grads(q, k, v, dout, causal=causal)
    monkeypatch.setenv("TILEATTN_GLUON_DQ", "1")
    a, b = grads(), grads()
    assert all(torch.equal(x, y) for x, y in zip(a, b)), "not bit-reproducible"
    monkeypatch.setenv("TILEATTN_GLUON_DQ", "0")
    if portable == "all":
        monkeypatch.setenv("TILEATTN_GLUON", "0")
    c = grads()
    for x, y in zip(a, c):
        torch.testing.assert_close(x.float(), y.float(), atol=2 ** -6, rtol=2 ** -6)


@hopper
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_softcap(causal, d, dtype, spy, monkeypatch):
    """Softcap in the Gluon backward: the scores softcap * tanh(S * scale / softcap) with the forward's tanh, dS
    through the tanh (times 1 - tanh^2); small and large caps (tanh saturated on most scores with 2.0), odd sizes,
    GQA, Sq != Sk, against the float64 reference."""
    import test_features
    dq_calls = spy_calls(monkeypatch, gluon_dq, "dq")
    for (B, Sq, Sk, Hq, Hkv), cap, scale in (((2, 333, 777, 4, 2), 5.0, 1.0), ((1, 1031, 257, 4, 1), 2.0, 1.5),
                                             ((1, 2048, 2048, 2, 2), 30.0, 1.0)):
        q, k, v, gen = make_qkv(B, Sq, Sk, Hq, Hkv, d, dtype, seed_for("gluon-bwd-softcap", causal, d, Sq),
                                requires_grad=True, scale=scale)
        test_features._check(q, k, v, randn((B, Sq, Hq, d), dtype, gen), causal=causal, softcap=cap,
                             ctx=f"gluon bwd softcap D={d}")
    assert spy, "the call did not take the Gluon dK/dV kernel"
    assert bool(dq_calls) == (d == 128), "the Gluon dQ kernel runs at D=128 and 256, not 64 (configs)"


@hopper
@pytest.mark.gpu
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("kind,causal", [("head", False), ("batch", True)])
def test_alibi(kind, causal, d, spy, monkeypatch):
    """ALiBi in the Gluon backward: the slope of each query head of the GQA group in dK/dV (per ring step), per
    (batch, head) slopes, Sq != Sk both ways; varlen with per-sequence slopes; against the float64 reference."""
    import test_features
    import test_varlen
    from _flash_helpers import rand
    dq_calls = spy_calls(monkeypatch, gluon_dq, "dq")
    for sq, sk in ((333, 777), (777, 333)):
        q, k, v, gen = make_qkv(2, sq, sk, 8, 2, d, torch.bfloat16, seed_for("gluon-bwd-alibi", kind, causal, d, sq),
                                requires_grad=True)
        test_features._check(q, k, v, randn((2, sq, 8, d), torch.bfloat16, gen), causal=causal,
                             alibi_slopes=test_features._alibi(kind, 2, 8, gen), ctx=f"gluon bwd alibi D={d}")
    lens_q, lens_k = VARLEN_LENS
    gen = make_gen(seed_for("gluon-bwd-alibi-varlen", kind, causal, d))
    q = rand((sum(lens_q), 8, d), torch.float16, gen, requires_grad=True)
    k = rand((sum(lens_k), 2, d), torch.float16, gen, requires_grad=True)
    v = rand((sum(lens_k), 2, d), torch.float16, gen, requires_grad=True)
    monkeypatch.setattr(test_varlen, "HQ", 8)
    test_varlen._check_varlen(q, k, v, lens_q, lens_k, rand((sum(lens_q), 8, d), torch.float16, gen), None,
                              causal=causal, alibi_slopes=test_features._alibi(kind, len(lens_q), 8, gen),
                              ctx=f"gluon bwd alibi D={d}")
    assert spy, "the call did not take the Gluon dK/dV kernel"
    assert bool(dq_calls) == (d == 128), "the Gluon dQ kernel runs at D=128 and 256, not 64 (configs)"


D256_CASES = [(2, 1, 1, 2, 2), (1, 130, 130, 4, 2), (1, 257, 1031, 4, 1), (1, 1031, 257, 2, 2), (2, 1000, 1000, 2, 2)]


@hopper
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("pipeline", [True, False], ids=["pipelined", "plain"])
@pytest.mark.parametrize("case", D256_CASES, ids=lambda c: "x".join(map(str, c)))
def test_split_d256_accuracy(case, causal, dtype, pipeline, spy, monkeypatch):
    """D=256 through the split dK/dV kernel (64 keys per program, warpgroup 0 accumulating dV, warpgroup 1 dK, P
    handed over in shared memory), its loop pipelined (the default) and plain: odd sizes, GQA, Sq != Sk both
    ways, against the float64 reference."""
    cfg = configs.gluon_backward_config(256)
    monkeypatch.setenv("TILEATTN_GLUON_BWD_CONFIG", f"{cfg.block_m},{cfg.stages},{cfg.consumer_regs},"
                       f"{cfg.producer_regs},{cfg.maxnreg},{int(pipeline)}")
    B, Sq, Sk, Hq, Hkv = case
    q, k, v, gen = make_qkv(B, Sq, Sk, Hq, Hkv, 256, dtype, seed_for("gluon-bwd-256", case, causal),
                            requires_grad=True)
    check_attention(q, k, v, causal=causal, dout=randn((B, Sq, Hq, 256), dtype, gen), extra="gluon bwd split")
    assert spy and spy[-1][-1] == 256, "the call did not take the (split) Gluon dK/dV kernel"


@hopper
@pytest.mark.gpu
def test_split_d256_features_reproducible(spy, monkeypatch):
    """The split kernel (D=256) with a sliding window, ALiBi per (batch, head), a sink and a gradient through lse;
    bit-reproducible and close to the portable backward; softcap and varlen stay portable."""
    import test_features
    for sq, sk in ((333, 777), (777, 333)):
        q, k, v, gen = make_qkv(2, sq, sk, 4, 2, 256, torch.bfloat16, seed_for("gluon-bwd-256-feat", sq),
                                requires_grad=True)
        dout = randn((2, sq, 4, 256), torch.bfloat16, gen)
        test_features._check(q, k, v, dout, randn((2, 4, sq), torch.float32, gen), window_size=(200, 100),
                             sink=randn((4,), torch.float32, gen).requires_grad_(), ctx="gluon bwd split window")
        test_features._check(q, k, v, dout, causal=True, alibi_slopes=test_features._alibi("batch", 2, 4, gen),
                             ctx="gluon bwd split alibi")
    assert len(spy) == 4

    def grads():
        q.grad = k.grad = v.grad = None
        tileattn.attention(q, k, v, causal=True).backward(dout)
        return q.grad.clone(), k.grad.clone(), v.grad.clone()
    a, b = grads(), grads()
    assert all(torch.equal(x, y) for x, y in zip(a, b)), "not bit-reproducible"
    monkeypatch.setenv("TILEATTN_GLUON", "0")
    for x, y in zip(a, grads()):
        torch.testing.assert_close(x.float(), y.float(), atol=2 ** -6, rtol=2 ** -6)
    monkeypatch.setenv("TILEATTN_GLUON", "all")
    n = len(spy)
    test_features._check(q, k, v, dout, softcap=5.0, ctx="D=256 softcap (portable backward)")
    assert len(spy) == n, "softcap at D=256 must stay on the portable backward"


BWD_WINDOWS = [(0, 0), (3, 2), (-1, 5), (37, 0), (200, 100), (1000, -1), (130, 0), (5000, 5000)]


@hopper
@pytest.mark.gpu
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("window", BWD_WINDOWS, ids=lambda w: f"{w[0]}_{w[1]}")
def test_sliding_window(window, d, spy, monkeypatch):
    """Sliding windows in the Gluon backward: the query-tile range of each key tile (dK/dV) and the key-tile range
    of each query tile (dQ), masks on the edge tiles only; rows and keys that see nothing (windows past the keys),
    Sq < Sk and Sq > Sk, GQA; with a softcap, a sink and a gradient through lse on one window."""
    import test_features
    dq_calls = spy_calls(monkeypatch, gluon_dq, "dq")
    for sq, sk in ((333, 777), (777, 333)):
        dtype = torch.bfloat16 if (sq + window[0]) % 2 else torch.float16
        q, k, v, gen = make_qkv(2, sq, sk, 4, 2, d, dtype, seed_for("gluon-bwd-window", window, sq, d),
                                requires_grad=True)
        kw = dict(window_size=window)
        dlse = None
        if window == (200, 100):
            kw["softcap"] = 5.0
            kw["sink"] = randn((4,), torch.float32, gen).requires_grad_()
            dlse = randn((2, 4, sq), torch.float32, gen)
        test_features._check(q, k, v, randn((2, sq, 4, d), dtype, gen), dlse, ctx=f"gluon bwd window D={d}", **kw)
    split = configs.gluon_backward_config(d).split  # e.g. TILEATTN_GLUON_BWD_CONFIG=...,1: softcap stays portable
    gluon_bwd = not split or "softcap" not in kw
    assert bool(spy) == gluon_bwd, "the Gluon dK/dV kernel's scope"
    # the dQ kernel runs with the Gluon dK/dV kernel (run 86: not when a forced split form sends softcap to the
    # portable backward), at D=128 and 256, not 64 (configs)
    assert bool(dq_calls) == (d == 128 and gluon_bwd), "the Gluon dQ kernel's scope"


VARLEN_LENS = ([177, 0, 1, 1024, 2000, 731, 64], [1500, 5, 0, 1, 2048, 731, 130])  # (q lens, k lens)


@hopper
@pytest.mark.gpu
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("mask", ["full", "causal", "window"])
def test_varlen_through_gluon(mask, d, spy, monkeypatch):
    """Packed varlen gradients (D <= 128) through the Gluon dK/dV kernel (and dQ at D=128): every sequence
    (lengths 0, 1, tile-crossing and long, q and k lengths different, GQA 4:1) against the float64 reference on its
    own slice under the accuracy rule, with a gradient through lse and a sink (tests/test_varlen.py's check);
    causal, or a sliding window (300, 40)."""
    causal = mask == "causal"
    feat = dict(window_size=(300, 40)) if mask == "window" else dict(causal=causal)
    import test_varlen
    from _flash_helpers import rand
    monkeypatch.setattr(test_varlen, "HQ", 8)
    dq_calls = spy_calls(monkeypatch, gluon_dq, "dq")
    lens_q, lens_k = VARLEN_LENS
    gen = make_gen(seed_for("gluon-bwd-varlen", mask, d))
    dtype = torch.bfloat16 if causal else torch.float16
    q = rand((sum(lens_q), 8, d), dtype, gen, requires_grad=True)
    k = rand((sum(lens_k), 2, d), dtype, gen, requires_grad=True)
    v = rand((sum(lens_k), 2, d), dtype, gen, requires_grad=True)
    dout = rand((sum(lens_q), 8, d), dtype, gen)
    dlse = rand((8, sum(lens_q)), torch.float32, gen)
    sink = rand((8,), torch.float32, gen, scale=2.0).requires_grad_(True)
    test_varlen._check_varlen(q, k, v, lens_q, lens_k, dout, dlse, sink=sink, ctx=f"gluon bwd D={d}", **feat)
    assert spy, "the varlen call did not take the Gluon dK/dV kernel"
    assert bool(dq_calls) == (d == 128), "the Gluon dQ kernel runs at D=128 and 256, not 64 (configs)"


@hopper
@pytest.mark.gpu
@pytest.mark.parametrize("d", [64, 128])
def test_varlen_reproducible_agrees_with_portable_and_isolated(d, spy, monkeypatch):
    """Varlen through the Gluon backward: bit-reproducible; close to the portable kernels (TILEATTN_GLUON=0); and
    a NaN in one sequence's q, k, v and dout (and in the rows past every sequence) changes no other sequence's
    gradients, bit for bit (the tiles that cross a sequence's end read the next sequence's rows: zeroed in shared
    memory before use). Rows outside every sequence get zero gradients."""
    from _flash_helpers import seqlens_to_cu
    lens = [70, 300, 127, 2049, 129, 64]
    gen = torch.Generator(device="cuda").manual_seed(seed_for("gluon-bwd-varlen-nan", d))
    total, extra = sum(lens), 40
    cu = seqlens_to_cu(lens)
    base = [torch.randn(total + extra, h, d, device="cuda", dtype=torch.bfloat16, generator=gen)
            for h in (8, 2, 2, 8)]  # q, k, v, dout

    def grads(q, k, v, dout, causal=True):
        q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
        out = tileattn.flash_attn_varlen_func(q, k, v, cu, cu, max(lens), max(lens), causal=causal)
        return torch.autograd.grad(out, (q, k, v), dout)
    clean = grads(*base)
    assert spy, "the varlen call did not take the Gluon dK/dV kernel"
    assert all(torch.equal(a, b) for a, b in zip(clean, grads(*base))), "not bit-reproducible"
    assert not any(g[total:].any() for g in clean), "rows outside every sequence"
    for poisoned in range(1, len(lens)):  # its neighbours' gradients must not change
        a, b = int(cu[poisoned]), int(cu[poisoned + 1])
        bad = [t.clone() for t in base]
        for t in bad:
            t[a:b] = float("nan")
            t[total:] = float("nan")
        got = grads(*bad)
        keep = torch.ones(total + extra, dtype=torch.bool, device="cuda")
        keep[a:b] = False
        for name, g, c in zip("qkv", got, clean):
            assert torch.equal(g[keep], c[keep]), f"d{name}: sequence {poisoned}'s NaN reached another sequence"
    ours = {True: clean, False: grads(*base, causal=False)}
    monkeypatch.setenv("TILEATTN_GLUON", "0")
    for causal, got in ours.items():
        for x, y in zip(got, grads(*base, causal=causal)):
            torch.testing.assert_close(x.float(), y.float(), atol=2 ** -6, rtol=2 ** -6)


KV_REGS_CASES = [(2, 130, 130, 4, 2), (1, 257, 1031, 4, 1), (1, 300, 128, 2, 2), (2, 1000, 1000, 2, 2)]


KV = "TILEATTN_GLUON_BWD_KV_REGS"


@hopper
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("level,d", [(1, 128), (1, 64), (2, 64)], ids=["d128-k", "d64-k", "d64-kv"])
@pytest.mark.parametrize("case", KV_REGS_CASES, ids=lambda c: "x".join(map(str, c)))
def test_operands_in_registers(case, level, d, causal, dtype, spy, monkeypatch):
    """KV_REGS (dK/dV kernel: K, or K and V, as register A operands of S^T / dP^T): the accuracy rule, and dq / dk
    / dv bit-identical to the kernel that reads them from shared memory (the same products in the same order)."""
    B, Sq, Sk, Hq, Hkv = case
    q, k, v, gen = make_qkv(B, Sq, Sk, Hq, Hkv, d, dtype, seed_for("gluon-bwd-regs", case, causal, d),
                            requires_grad=True)
    dout = randn((B, Sq, Hq, d), dtype, gen)
    monkeypatch.setenv(KV, str(level))
    check_attention(q, k, v, causal=causal, dout=dout, extra=f"gluon bwd KV_REGS={level}")
    assert spy, "the call did not take the Gluon dK/dV kernel"
    with_regs = fresh_grads(q, k, v, dout, causal=causal)
    monkeypatch.setenv(KV, "0")
    for name, a, b in zip("qkv", with_regs, fresh_grads(q, k, v, dout, causal=causal)):
        assert torch.equal(a, b), f"d{name} differs from the shared-memory operands' (KV_REGS={level})"


@hopper
@pytest.mark.gpu
@pytest.mark.parametrize("level,d", [(1, 128), (2, 64)])
def test_operands_in_registers_varlen(level, d, spy, monkeypatch):
    """Packed varlen through the Gluon backward with KV_REGS: bit-identical to level 0."""
    from _flash_helpers import seqlens_to_cu
    lens = [70, 300, 1, 2049, 129, 64]
    gen = torch.Generator(device="cuda").manual_seed(seed_for("gluon-bwd-regs-varlen", d))
    cu = seqlens_to_cu(lens)
    base = [torch.randn(sum(lens), h, d, device="cuda", dtype=torch.bfloat16, generator=gen) for h in (8, 2, 2, 8)]

    def grads(causal):
        q, k, v = (t.clone().requires_grad_() for t in base[:3])
        out = tileattn.flash_attn_varlen_func(q, k, v, cu, cu, max(lens), max(lens), causal=causal)
        return torch.autograd.grad(out, (q, k, v), base[3])
    for causal in (False, True):
        monkeypatch.setenv(KV, str(level))
        a = grads(causal)
        monkeypatch.setenv(KV, "0")
        assert all(torch.equal(x, y) for x, y in zip(a, grads(causal))), f"causal={causal}"
    assert spy


def test_kv_regs_knob(monkeypatch):
    """``gluon_backward.kv_regs``: the config's level for the call's mask, the knob over it; 0 for softcap / ALiBi /
    window calls and the fused backward; a bad value is refused."""
    q = torch.zeros(1, 4, 2, 64)
    plain, causal = attn_params(q, q), attn_params(q, q, causal=True)
    monkeypatch.setenv("TILEATTN_GLUON_BWD_KV_REGS", "2")
    assert gluon_backward.kv_regs(64, plain, False) == 2 and gluon_backward.kv_regs(128, causal, False) == 2
    assert gluon_backward.kv_regs(64, plain, True) == 0
    for feat in (dict(softcap=5.0), dict(alibi_slopes=torch.ones(2)), dict(window_left=8)):
        assert gluon_backward.kv_regs(64, attn_params(q, q, **feat), False) == 0, feat
    monkeypatch.setenv("TILEATTN_GLUON_BWD_KV_REGS", "0")
    assert gluon_backward.kv_regs(64, plain, False) == 0
    monkeypatch.delenv("TILEATTN_GLUON_BWD_KV_REGS")
    for d in (64, 128):
        assert gluon_backward.kv_regs(d, plain, False) == configs._GLUON_BWD[d].kv_regs[0]
        assert gluon_backward.kv_regs(d, causal, False) == configs._GLUON_BWD[d].kv_regs[1]
    monkeypatch.setenv("TILEATTN_GLUON_BWD_KV_REGS", "3")
    with pytest.raises(ValueError, match="TILEATTN_GLUON_BWD_KV_REGS"):
        gluon_backward.kv_regs(64, plain, False)


BWD_COMPILE = [(128, False, ()), (128, True, ()), (64, True, ()), (64, False, ("--fp16",)),
               (128, True, ("--config", "64,2,240,24,168,0")),
               (128, True, ("--varlen",)), (64, False, ("--varlen", "--fp16")),
               (128, False, ("--window",)), (64, False, ("--window", "--varlen")),
               (128, True, ("--softcap",)), (64, False, ("--softcap", "--window")),
               (128, True, ("--alibi", "--varlen")), (64, False, ("--alibi",)),
               (256, False, ()), (256, True, ("--fp16",)), (256, False, ("--window",)),
               (256, True, ("--alibi",)), (128, True, ("--trace",)), (256, True, ("--trace",)),  # bwd_trace.py
               (128, True, ("--config", "64,3,240,24,168,1,1")),  # the split form at D=128 (opt-in, gpu_run s16)
               # K (D=128) or K and V (D=64) in registers (KV_REGS; 4-8 B spills at D=128 varlen)
               (128, False, ("--kv-regs", 1)), (128, True, ("--kv-regs", 1, "--varlen")),
               (64, True, ("--kv-regs", 2)), (64, False, ("--kv-regs", 2, "--varlen", "--fp16"))]


@needs_gluon
@pytest.mark.skipif(not ptxas_available(), reason="needs triton's bundled ptxas")
def test_compiles_for_sm90_without_serialised_wgmma():
    """No C7514 / C7512 (wgmma serialised) and at most a few spilled scalars (64 bytes: the plain loop with 64-row
    steps at D=128 has 20-36, in local memory that stays in L1). In a subprocess, as test_gluon_forward's."""
    assert_compiles([("--bwd", "--spill-budget", 64, "--head-dim", d, *(["--causal"] if causal else []), *extra)
                     for d, causal, extra in BWD_COMPILE],
                    env_extra={"TILEATTN_FAST_TANH": "1"})  # the GPU's tanh path (softcap, bf16)


DQ_COMPILE = [(128, False, ()), (128, True, ("--dlse", )), (64, True, ()),
              (64, False, ("--fp16", "--no-resid")), (128, True, ("--varlen", "--dlse")),
              (128, False, ("--varlen", "--no-resid")), (128, False, ("--window",)),
              (128, False, ("--window", "--varlen", "--dlse")),
              (128, True, ("--softcap", "--fp16")),
              (128, False, ("--alibi", "--softcap")), (256, False, ()),
              (256, True, ("--fp16", "--dlse")), (256, False, ("--window", "--alibi")),
              (128, True, ("--resid8",)), (256, False, ("--resid8", "--fp16")), (64, False, ("--resid8", "--varlen")),
              (128, True, ("--trace",))]  # bwd_trace.py


@needs_gluon
@pytest.mark.skipif(not ptxas_available(), reason="needs triton's bundled ptxas")
def test_dq_kernel_compiles_for_sm90_without_spills_or_serialised_wgmma():
    assert_compiles([("--dq", "--head-dim", d, *(["--causal"] if causal else []), *extra)
                     for d, causal, extra in DQ_COMPILE], env_extra={"TILEATTN_FAST_TANH": "1"})


@needs_gluon
@pytest.mark.skipif(not ptxas_available(), reason="needs triton's bundled ptxas")
def test_tma_reduce_add_lowers_to_a_bulk_tensor_reduce():
    """gluon_common.tma_reduce_add (for a fused backward's dQ adds): a Gluon kernel that stages an fp32 tile in
    shared memory and reduce-adds it through a host descriptor compiles for sm_90a to one
    cp.reduce.async.bulk.tensor ... add (``gluon_compile.py --reduce-add``, in a subprocess as the other compile
    tests: this session's TRITON_INTERPRET=1 would interpret Gluon's library)."""
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.path.join(root, "src") + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "gluon_compile.py"), "--reduce-add"],
                       capture_output=True, text=True, env=env)
    assert "reduce-adds 1" in r.stdout, r.stdout[-2000:] + r.stderr[-4000:]


def _record_launches(monkeypatch, module, flag, default):
    """A list that gets (grid, the constexpr ``flag`` or ``default``) of every launch through ``module.launch`` (the
    kernel under test) from now on; the launches still run."""
    launches = []
    real = module.launch
    monkeypatch.setattr(module, "launch", lambda fn, grid, args, kwargs, *a, **o: launches.append(
        (grid, kwargs.get(flag, default))) or real(fn, grid, args, kwargs, *a, **o))
    return launches


def _grads_off_and_on(monkeypatch, module, knob, on, tensors, kw):
    """(dq, dk, dv) with the persistent knob ``knob`` at 0, then at ``on``, and the (grid, PERSISTENT) of each
    launch through ``module.launch`` (the kernel under test)."""
    launches = _record_launches(monkeypatch, module, "PERSISTENT", False)
    monkeypatch.setenv(knob, "0")
    want = fresh_grads(*tensors, **kw)
    monkeypatch.setenv(knob, on)
    return want, fresh_grads(*tensors, **kw), launches


def _assert_persistent_grid_and_bit_identity(launches, items, want, got, device):
    """The persistent launch ran min(items, SMs) programs, and its gradients equal the one-tile kernel's bit for
    bit (no NaN)."""
    assert launches[1][0] == (min(items, configs.sm_count(device)), ), launches
    for name, a, b in zip(("dq", "dk", "dv"), want, got):
        assert torch.equal(a, b), f"{name} differs from the one-tile-per-program kernel's"
    assert not any(torch.isnan(t).any() for t in got)


PERSISTENT_DQ_CASES = {  # (B, Sq, Sk, Hq, Hkv, attention kwargs): items beyond one per SM, rows without keys, features
    "full_gqa": (4, 1000, 1000, 8, 2, dict()),
    "causal": (4, 1000, 1000, 8, 2, dict(causal=True)),
    "causal_sq_lt_sk": (2, 777, 1500, 4, 4, dict(causal=True)),
    "causal_sq_gt_sk": (2, 1500, 777, 4, 2, dict(causal=True)),  # the first query tiles see no key: n = 0 items
    "window_softcap_alibi": (3, 900, 1100, 4, 2, dict(window_size=(100, 50), softcap=5.0)),
    "few_items": (1, 130, 130, 2, 1, dict(causal=True)),  # fewer items than SMs
}


@hopper
@pytest.mark.gpu
@pytest.mark.parametrize("case", list(PERSISTENT_DQ_CASES))
def test_persistent_dq_matches_the_grid(case, monkeypatch):
    """v35b (TILEATTN_GLUON_DQ_PERSISTENT=1): the persistent dQ kernel (at most one program per SM, the query
    tiles in turn) computes each tile as the one-tile-per-program kernel does, so dq, dk and dv (dK/dV reads the
    row statistics the dQ kernel writes) are bit-identical to the one-tile kernel's; the launch is the persistent
    one."""
    B, Sq, Sk, Hq, Hkv, kw = PERSISTENT_DQ_CASES[case]
    q, k, v, gen = make_qkv(B, Sq, Sk, Hq, Hkv, 128, torch.bfloat16, seed_for("gluon-dq-persistent", case),
                            requires_grad=True)
    dout = randn((B, Sq, Hq, 128), torch.bfloat16, gen)
    if kw.get("softcap"):
        kw = dict(kw, alibi_slopes=torch.rand(Hq, generator=gen).to("cuda") * 0.1)
    want, got, launches = _grads_off_and_on(monkeypatch, gluon_dq, "TILEATTN_GLUON_DQ_PERSISTENT", "1",
                                            (q, k, v, dout), kw)
    assert [p for _, p in launches] == [False, True], launches
    _assert_persistent_grid_and_bit_identity(launches, configs.cdiv(Sq, 128) * B * Hq, want, got, q.device)


def _mock_launches(monkeypatch, module):
    """Descriptors and the SM count (132) mocked in ``module``; returns the list its launches are recorded in as
    (grid, constexpr kwargs, maxnreg)."""
    seen = []
    monkeypatch.setattr(module, "make_desc", lambda *a, **o: None)
    if hasattr(module, "host_descriptor"):
        monkeypatch.setattr(module, "host_descriptor", lambda *a, **o: None)
    monkeypatch.setattr(configs, "sm_count", lambda device: 132)
    monkeypatch.setattr(module, "launch", lambda fn, grid, args, kwargs, nw, ns, maxnreg: seen.append(
        (grid, kwargs, maxnreg)))
    return seen


@pytest.mark.skipif(not gluon_backward.AVAILABLE, reason="this triton has no Gluon")
def test_backward_launch_shapes_on_cpu(monkeypatch):
    """The dQ and dK/dV launchers' grids and constexprs on the CPU (launch and descriptors mocked): the D=64 dQ
    items of 128 rows on the persistent grid (with TILEATTN_GLUON_DQ=1's config), the dK/dV programs of 128 keys
    with the table's stages and KV_REGS, causal or not."""
    from tileattn.kernels import params
    B, S, H, d = 1, 16384, 32, 64
    one = torch.zeros(1, dtype=torch.bfloat16)
    q = one.expand(B, S, H, d)
    stats = torch.zeros(2, H, B * S)
    lse = torch.zeros(B, H, S)
    p = params.AttnParams(batch=B, max_seqlen_q=S, max_seqlen_k=S, softmax_scale=d ** -0.5, window_right=-1)
    cfg = dataclasses.replace(configs._GLUON_BWD[64], dq=True)
    seen = _mock_launches(monkeypatch, gluon_dq)
    gluon_dq.dq(q, q, q, q, q, q, lse, None, lse, stats, q, p, cfg)
    (grid, kw, maxnreg), = seen
    assert grid == (132, ) and kw["PERSISTENT"] and kw["num_items"] == 128 * B * H, (grid, kw)
    assert (kw["CONSUMER_REGS"], kw["PRODUCER_REGS"], maxnreg) == (cfg.consumer_regs, cfg.producer_regs, cfg.maxnreg)
    for causal in (False, True):
        seen = _mock_launches(monkeypatch, gluon_backward)
        pc = dataclasses.replace(p, window_right=0 if causal else -1)
        gluon_backward.dkdv(q, q, q, q, stats, q, q, pc, configs._GLUON_BWD[64])
        (grid, kw, maxnreg), = seen
        assert grid == (128 * B * H, ), grid
        assert kw["STAGES"] == configs._GLUON_BWD[64].stages
        assert kw.get("KV_REGS", 0) == configs._GLUON_BWD[64].kv_regs[causal]


def test_persistent_dq_knob(monkeypatch):
    """TILEATTN_GLUON_DQ_PERSISTENT: auto (default) = calls without a causal mask or window, 1 = all, 0 = none."""
    monkeypatch.setenv("TILEATTN_GLUON_DQ_PERSISTENT", "2")
    with pytest.raises(ValueError, match="TILEATTN_GLUON_DQ_PERSISTENT"):
        configs.gluon_dq_persistent(False)
    for value, want in (("1", (True, True)), ("0", (False, False)), ("auto", (True, False)), (None, (True, False))):
        if value is None:
            monkeypatch.delenv("TILEATTN_GLUON_DQ_PERSISTENT")
        else:
            monkeypatch.setenv("TILEATTN_GLUON_DQ_PERSISTENT", value)
        assert (configs.gluon_dq_persistent(False), configs.gluon_dq_persistent(True)) == want, value


def test_persistent_protocol_model():
    """benchmarks/persistent_protocol.py, the host model of the persistent dQ kernel's barriers (producer, consumer
    warpgroups, TMA copies landing in random order): no deadlock, each item computed once per warpgroup, every
    read of its own buffers and ring slots, no buffer refilled while in use. (A model of the kernel's barrier
    code: the two must change together.)"""
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    import persistent_protocol as pp
    assert pp.check_dq([3, 0, 5, 1], 2) == {0: 0, 1: 1, 2: 0, 3: 1}  # round robin, a query tile without keys
    pp.random_cases(150)


def test_dkdv_protocol_model():
    """benchmarks/dkdv_protocol.py, the host model of the pipelined dK/dV kernel's barriers (producer, two consumer
    warpgroups, TMA copies landing in random order): no deadlock, every product on its own step's ring slot, no
    slot refilled while a product may read it. (A model of the kernel's barrier code: the two must change
    together.)"""
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    import dkdv_protocol as dp
    assert dp.check(0, 3) == 0  # a key tile that no query row sees
    assert dp.check(5, 4) == 10  # two warpgroups, five steps each
    dp.random_cases(150)
