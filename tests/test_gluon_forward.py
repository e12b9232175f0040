"""The Hopper Gluon forward (kernels/gluon_forward.py).

GPU (sm90): the calls it accepts go through it (spied), its out / lse / gradients pass the accuracy rule against
the float64 reference on odd sizes, GQA, Sq != Sk, causal and strided inputs, and it agrees with the portable
kernel (TILEATTN_GLUON=0); softcap, sink and sliding windows through it. Every other GPU test file exercises it
too, wherever a call is in its scope.
CPU: the dispatch rules, and the kernel compiled for sm_90a with Triton's bundled ptxas (no spills, no wgmma
serialisation), which is what a change to the kernel most easily breaks without a GPU.
"""

import os

import pytest
import torch

import tileattn
from _helpers import (GLUON_CASES, HALF_DTYPES, HOPPER, assert_int8_residual_matches, attn_params, check_attention,
                      dtype_id, assert_compiles, feature_kwargs, lift_gluon_length_limits, make_gen, make_qkv,
                      ptxas_available, randn, record_gluon_launches, seed_for, spy_calls)
from tileattn import configs
from tileattn.kernels import gluon_forward

hopper = pytest.mark.skipif(not HOPPER, reason="the Gluon forward runs on sm90 only")
needs_gluon = pytest.mark.skipif(not gluon_forward.AVAILABLE, reason="this triton has no Gluon")


@pytest.fixture
def spy(monkeypatch):
    """Record the Gluon forward's calls; every sequence length in its scope (``lift_gluon_length_limits``)."""
    lift_gluon_length_limits(monkeypatch)
    return spy_calls(monkeypatch, gluon_forward, "attention_forward")


def test_scope_on_cpu():
    q = torch.zeros(1, 4, 2, 64)
    assert not gluon_forward.applies(q, q, q, attn_params(q, q))


@hopper
@pytest.mark.gpu
def test_scope_on_hopper(monkeypatch):
    q = torch.zeros(2, 64, 4, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.zeros(2, 80, 2, 128, device="cuda", dtype=torch.bfloat16)
    assert gluon_forward.applies(q, k, k, attn_params(q, k))
    assert gluon_forward.applies(q, k, k, attn_params(q, k, causal=True))
    assert not gluon_forward.applies(q.float(), k.float(), k.float(), attn_params(q, k))
    assert gluon_forward.applies(q, k, k, attn_params(q, k, softcap=5.0))
    assert gluon_forward.applies(q, k, k, attn_params(q, k, window_left=16))
    assert gluon_forward.applies(q, k, k, attn_params(q, k, sink=torch.zeros(4, device="cuda")))
    assert gluon_forward.applies(q, k, k, attn_params(q, k, alibi_slopes=torch.zeros(4, device="cuda")))
    assert not gluon_forward.applies(q[..., :96], k[..., :96], k[..., :96], attn_params(q, k))
    q256 = torch.zeros(1, 64, 2, 256, device="cuda", dtype=torch.bfloat16)
    k256 = torch.zeros(1, 1024, 2, 256, device="cuda", dtype=torch.bfloat16)
    assert not gluon_forward.applies(q256, q256, q256, attn_params(q256, q256))  # D=256: from 512 keys (s19)
    assert gluon_forward.applies(q256, k256, k256, attn_params(q256, k256))
    assert gluon_forward.applies(q256, k256, k256, attn_params(q256, k256, causal=True))  # causal too
    k256 = k256[:, :512]
    assert gluon_forward.applies(q256, k256, k256, attn_params(q256, k256))
    assert gluon_forward.applies(q256, k256, k256, attn_params(q256, k256, causal=True))
    k256 = k256[:, :511]
    assert not gluon_forward.applies(q256, k256, k256, attn_params(q256, k256))
    assert not gluon_forward.applies(q256, k256, k256, attn_params(q256, k256, causal=True))
    q64, k64 = q[..., :64].contiguous(), k[..., :64].contiguous()
    assert not gluon_forward.applies(q64, k64, k64, attn_params(q64, k64))  # D=64: from 512 keys (run 85)
    k64 = torch.zeros(2, 512, 2, 64, device="cuda", dtype=torch.bfloat16)
    assert gluon_forward.applies(q64, k64, k64, attn_params(q64, k64))
    assert not gluon_forward.applies(q64, k64, k64, attn_params(q64, k64, causal=True))  # causal: from 2048
    k64 = torch.zeros(2, 1024, 2, 64, device="cuda", dtype=torch.bfloat16)
    assert gluon_forward.applies(q64, k64, k64, attn_params(q64, k64, causal=True))  # 1k on the causal list (s20)
    assert not gluon_forward.applies(q64, k64, k64, attn_params(q64, k64, window_left=16, causal=True))
    monkeypatch.setenv("TILEATTN_CAUSAL_LIST", "0")
    assert not gluon_forward.applies(q64, k64, k64, attn_params(q64, k64, causal=True))  # no list: from 2048
    monkeypatch.delenv("TILEATTN_CAUSAL_LIST")
    k64 = torch.zeros(2, 2048, 2, 64, device="cuda", dtype=torch.bfloat16)
    assert gluon_forward.applies(q64, k64, k64, attn_params(q64, k64, causal=True))
    assert gluon_forward.applies(q64, k64, k64, attn_params(q64, k64))
    assert gluon_forward.applies(q64, k64, k64, attn_params(q64, k64, sink=torch.zeros(4, device="cuda")))
    assert not gluon_forward.applies(q64, k64, k64, attn_params(q64, k64, softcap=5.0))  # D=64: portable
    assert not gluon_forward.applies(q64, k64, k64, attn_params(q64, k64, window_left=16))
    qm = q[:, :, :, 1:65]  # the same shape, its base 2 bytes off a 16-byte boundary: TMA cannot load it
    assert not gluon_forward.applies(qm, k64, k64, attn_params(qm, k64))
    monkeypatch.setenv("TILEATTN_GLUON", "0")
    assert not gluon_forward.applies(q, k, k, attn_params(q, k))
    monkeypatch.setenv("TILEATTN_GLUON", "1")
    monkeypatch.setenv("TILEATTN_ARCH", "8.0")
    assert not gluon_forward.applies(q, k, k, attn_params(q, k))


@hopper
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("case", GLUON_CASES, ids=lambda c: "x".join(map(str, c)))
def test_accuracy(case, causal, d, dtype, spy):
    B, Sq, Sk, Hq, Hkv = case
    q, k, v, gen = make_qkv(B, Sq, Sk, Hq, Hkv, d, dtype, seed_for("gluon", case, causal, d), requires_grad=True)
    dout = randn((B, Sq, Hq, d), dtype, gen)
    check_attention(q, k, v, causal=causal, dout=dout, extra="gluon")
    assert spy, "the call did not take the Gluon forward"


@hopper
@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["bhsd", "qkv_packed"])
def test_strided_inputs(layout, spy):
    gen = torch.Generator(device="cuda").manual_seed(7)
    B, S, H, D = 2, 333, 4, 128
    if layout == "bhsd":  # (B, H, S, D) storage seen as (B, S, H, D)
        q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16, generator=gen).transpose(1, 2)
                   for _ in range(3))
    else:
        q, k, v = torch.randn(B, S, 3, H, D, device="cuda", dtype=torch.bfloat16, generator=gen).unbind(2)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    check_attention(q, k, v, causal=True, dout=torch.randn(B, S, H, D, device="cuda", dtype=torch.bfloat16,
                                                           generator=gen), extra=layout)
    assert spy


@hopper
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("feat", ["softcap", "sink", "softcap+sink"])
def test_softcap_and_sink(feat, causal, dtype, spy):
    """Softcap and sink as the Gluon kernel's constexpr features: out, lse and
    the gradients (d(sink) included; the backward is the Gluon one's too) against the reference."""
    import test_features
    B, Sq, Sk, Hq, Hkv, D = 2, 333, 777, 4, 2, 128
    q, k, v, gen = make_qkv(B, Sq, Sk, Hq, Hkv, D, dtype, seed_for("gluon-feat", feat, causal), requires_grad=True)
    kw = {}
    if "softcap" in feat:
        kw["softcap"] = 5.0
    if "sink" in feat:
        kw["sink"] = randn((Hq,), torch.float32, gen).requires_grad_()
    test_features._check(q, k, v, randn((B, Sq, Hq, D), dtype, gen), causal=causal, ctx="gluon", **kw)
    assert spy, "the call did not take the Gluon forward"


WINDOWS = [((0, 0), False), ((3, 2), False), ((-1, 5), False), ((37, 0), True), ((200, 100), False),
           ((1000, -1), False), ((130, 0), False)]


@hopper
@pytest.mark.gpu
@pytest.mark.parametrize("seqs", [(333, 777), (777, 333), (1000, 1000)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("window,causal", WINDOWS, ids=[f"{w[0]}_{w[1]}{'-causal' if c else ''}" for w, c in WINDOWS])
def test_sliding_window(window, causal, seqs, spy):
    """Sliding windows in the Gluon kernel: the key-tile range [lo, hi) of
    each 128-row tile, masks on the edge tiles of each 64-row half; rows that see no key (window past the keys)."""
    import test_features
    sq, sk = seqs
    dtype = torch.bfloat16 if (sq + window[0]) % 2 else torch.float16
    q, k, v, gen = make_qkv(2, sq, sk, 4, 2, 128, dtype, seed_for("gluon-window", window, causal, seqs),
                            requires_grad=True)
    kw = dict(window_size=window, causal=causal)
    if window == (200, 100):
        kw.update(softcap=5.0, sink=randn((4,), torch.float32, gen).requires_grad_())
    test_features._check(q, k, v, randn((2, sq, 4, 128), dtype, gen), ctx="gluon window", **kw)
    assert spy, "the call did not take the Gluon forward"


@hopper
@pytest.mark.gpu
def test_features_take_gluon_by_default(spy):
    q, k, v, _ = make_qkv(1, 256, 256, 2, 2, 128, torch.bfloat16, seed_for("gluon-default-feat"))
    tileattn.attention(q, k, v, softcap=5.0)
    tileattn.attention(q, k, v, sink=torch.zeros(2, device="cuda"))
    tileattn.attention(q, k, v, window_size=(64, 0))
    tileattn.attention(q, k, v, alibi_slopes=torch.ones(2, device="cuda"))
    assert len(spy) == 4
    tileattn.attention(q, k, v, dropout_p=0.1)  # dropout: the portable kernel's
    assert len(spy) == 4


ALIBI_CASES = [("head", False, ()), ("batch", True, ()), ("batch", False, ("softcap", "sink")),
               ("head", True, ("window",)), ("head", False, ("long",)), ("batch", False, ("general",)),
               ("head", True, ("general",))]


@hopper
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("kind,causal,extra", ALIBI_CASES, ids=["-".join((k, str(c)) + e) for k, c, e in ALIBI_CASES])
def test_alibi(kind, causal, extra, dtype, spy, monkeypatch):
    """ALiBi in the Gluon forward (and backward): slopes (H,) (the standard geometric ones) or random (B, H), with
    causal, softcap, sink and a window; Sq != Sk (bottom-right aligned distances), GQA; out, lse and gradients
    against the float64 reference. "long": 9000 keys, so that the one-sided tiles' row terms (slope times
    distances up to ~9000, ``gluon_common.alibi_scores``) are large; "general": the general form on the
    persistent grid (``TILEATTN_GLUON_ALIBI=general``) instead of the linear one on the plain grid."""
    if "general" in extra:
        monkeypatch.setenv("TILEATTN_GLUON_ALIBI", "general")
    import test_features
    B, Sq, Sk, Hq, Hkv, D = (1, 200, 9000, 8, 2, 128) if "long" in extra else (2, 333, 777, 4, 2, 128)
    q, k, v, gen = make_qkv(B, Sq, Sk, Hq, Hkv, D, dtype, seed_for("gluon-alibi", kind, causal, extra),
                            requires_grad=True)
    kw = dict(causal=causal, alibi_slopes=test_features._alibi(kind, B, Hq, gen))
    if "softcap" in extra:
        kw["softcap"] = 5.0
    if "sink" in extra:
        kw["sink"] = randn((Hq,), torch.float32, gen).requires_grad_()
    if "window" in extra:
        kw["window_size"] = (100, 0)
        kw.pop("causal")
    test_features._check(q, k, v, randn((B, Sq, Hq, D), dtype, gen), ctx="gluon alibi", **kw)
    assert spy, "the call did not take the Gluon forward"


@hopper
@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
def test_agrees_with_portable_kernel(causal, monkeypatch):
    q, k, v, _ = make_qkv(2, 777, 777, 4, 2, 128, torch.bfloat16, seed_for("gluon-vs-portable", causal))
    out, lse = tileattn.attention(q, k, v, causal=causal, return_lse=True)
    monkeypatch.setenv("TILEATTN_GLUON", "0")
    out0, lse0 = tileattn.attention(q, k, v, causal=causal, return_lse=True)
    torch.testing.assert_close(lse, lse0, atol=1e-4, rtol=0)
    torch.testing.assert_close(out.float(), out0.float(), atol=2 ** -7, rtol=0)


PERSISTENT_CASES = [(2, 2100, 2100, 16, 8, 128, {}), (2, 2048, 2048, 16, 4, 128, dict(causal=True)),
                    (1, 1031, 257, 4, 1, 128, dict(causal=True)),
                    (3, 257, 1031, 4, 2, 128, dict(causal=True, sink=True)), (2, 1000, 1000, 4, 4, 64, {}),
                    (2, 999, 999, 2, 2, 128, dict(window_size=(300, 40), softcap=8.0)),
                    (1, 130, 4000, 4, 2, 128, dict(causal=True, alibi=True)), (4, 64, 64, 2, 1, 128, {}),
                    (2, 1500, 1300, 8, 2, 128, dict(softcap=8.0, alibi=True)),
                    (2, 2048, 2048, 8, 8, 64, dict(sink=True)),
                    (2, 1400, 1400, 12, 4, 128, dict(causal=True)),  # 264 items: 2 full rounds of 132, odd one last
                    # D=256 (forced only: the output staged in Q's buffer, session 22's v25a)
                    (2, 2100, 2100, 8, 8, 256, {}), (2, 1400, 1400, 8, 4, 256, dict(causal=True)),
                    (3, 257, 1031, 4, 2, 256, dict(causal=True, sink=True)),
                    (2, 1500, 1300, 8, 2, 256, dict(softcap=8.0, alibi=True))]


@hopper
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", PERSISTENT_CASES, ids=lambda c: "x".join(map(str, c[:6])) + "-" + "-".join(c[6]))
def test_persistent_matches_grid(case, dtype, spy, monkeypatch):
    """TILEATTN_GLUON_PERSISTENT=1 (a program per multiprocessor walking the plain grid's tiles, the K/V ring
    and the ping-pong carried across tiles): out and lse bit-identical to the plain grid's (=0; every tile's
    arithmetic is the same), and within the accuracy rule (out, lse, gradients) against the float64 reference;
    more tiles than multiprocessors (up to 544 on 132), Sq != Sk both ways, GQA, causal (the host's work list,
    _hostinfo.causal_schedule; the kernel's LPT order in test_causal_work_list_matches_grid), window + softcap,
    sink, ALiBi (its general form on both: the plain grid's default linear form rounds differently, and is
    checked against the reference in test_alibi); D=64, 128 and 256 (whose output is staged in Q's buffer)."""
    B, Sq, Sk, Hq, Hkv, d, feat = case
    q, k, v, gen = make_qkv(B, Sq, Sk, Hq, Hkv, d, dtype, seed_for("gluon-persistent", case[:6], dtype),
                            requires_grad=True)
    kw = feature_kwargs(feat, Hq, gen)
    monkeypatch.setenv("TILEATTN_GLUON_ALIBI", "general")
    monkeypatch.setenv("TILEATTN_GLUON_PERSISTENT", "0")
    ref = tileattn.attention(q, k, v, return_lse=True, **kw)
    n = len(spy)
    monkeypatch.setenv("TILEATTN_GLUON_PERSISTENT", "1")
    seen = record_gluon_launches(monkeypatch)
    got = tileattn.attention(q, k, v, return_lse=True, **kw)
    assert len(spy) == n + 1, "the call did not take the Gluon forward"
    assert seen and seen[-1][1]["PERSISTENT"], "the call did not run on the persistent grid"
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    import test_features
    test_features._check(q, k, v, randn((B, Sq, Hq, d), dtype, gen), entry="tileattn", ctx="gluon persistent", **kw)


TRACE_CASES = [(2, 2100, 2100, 16, 8, 128, {}), (2, 2100, 2100, 8, 8, 256, {}), (2, 2048, 2048, 8, 8, 64, {}),
               (2, 2048, 2048, 16, 4, 128, dict(causal=True))]


@hopper
@pytest.mark.gpu
@pytest.mark.parametrize("case", TRACE_CASES, ids=lambda c: "x".join(map(str, c[:6])) + "-" + "-".join(c[6]))
def test_trace_and_stagger_leave_outputs_alone(case, monkeypatch):
    """``benchmarks/fwd_trace.py``'s instruments: a persistent forward given a TRACE buffer and a STAGGER delay
    (TILEATTN_GLUON_FWD_STAGGER) computes out and lse bit-identical to the plain launch, and every item's
    warpgroups wrote their stamps in order (entry <= Q ready <= first S <= last P V <= residual staged <= epilogue
    issued) with their key tile counts (non-causal: every item all of them)."""
    import math
    from tileattn.kernels import gluon_common
    B, Sq, Sk, Hq, Hkv, d, feat = case
    q, k, v, gen = make_qkv(B, Sq, Sk, Hq, Hkv, d, torch.bfloat16, seed_for("gluon-trace", case[:6]))
    causal = feat.get("causal", False)
    want = tileattn.attention(q, k, v, causal=causal, return_lse=True)
    bufs = []
    real = gluon_forward.launch

    def launch(kernel, grid, args, kwargs, *rest, **opts):
        if kernel is gluon_forward._fwd_kernel and kwargs.get("PERSISTENT"):
            bufs.append((torch.full((kwargs["num_items"], kwargs.get("NUM_WG", 2), gluon_common.TRACE_FIELDS.value),
                                    -1, dtype=torch.int64, device=q.device), kwargs))
            kwargs = dict(kwargs, TRACE=bufs[-1][0])
        return real(kernel, grid, args, kwargs, *rest, **opts)
    monkeypatch.setattr(gluon_forward, "launch", launch)
    monkeypatch.setenv("TILEATTN_LAUNCH_PLANS", "0")
    monkeypatch.setenv("TILEATTN_GLUON_FWD_STAGGER", "3000")
    got = tileattn.attention(q, k, v, causal=causal, return_lse=True)
    torch.cuda.synchronize()
    assert bufs and bufs[-1][1].get("STAGGER") == 3000, "the call did not run on the persistent grid"
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    t, kwargs = bufs[-1][0].cpu(), bufs[-1][1]
    order = t[..., [0, 1, 2, 3, 6, 4]]
    assert bool((order[..., 1:] >= order[..., :-1]).all()) and bool((order >= 0).all()), "stamps out of order"
    if not causal:
        assert bool((t[..., 5] == math.ceil(Sk / kwargs["BLOCK_N"])).all())
    else:
        assert bool((t[..., 5] >= 0).all()) and bool((t[..., 5] <= math.ceil(Sk / kwargs["BLOCK_N"])).all())


THREE_WG_CASES = [(2, 2048, 2048, 8, 8, dict(sink=True)),  # (B, Sq, Sk, Hq, Hkv, features), D=64
                  (3, 257, 1031, 4, 2, {}),  # a last item of 65 rows: its third warpgroup has none
                  (1, 100, 300, 4, 4, {}),  # one item, rows for one and a half warpgroups
                  (4, 1500, 1300, 16, 4, {}),  # 512 items on the SMs (rounds), GQA, Sq > Sk
                  (2, 700, 2000, 6, 3, {}),
                  # causal on the host's work list (the default from 2048 query rows, run 178)
                  (2, 2048, 2048, 8, 8, dict(causal=True)), (3, 1500, 1100, 4, 2, dict(causal=True)),
                  (2, 700, 2000, 6, 3, dict(causal=True, sink=True))]


@hopper
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", THREE_WG_CASES, ids=lambda c: "x".join(map(str, c[:5])) + "-" + "-".join(c[5]))
def test_three_warpgroups_match_two(case, dtype, spy, monkeypatch):
    """v37a (TILEATTN_GLUON_FWD_WG=3, the default from 1024 query rows without a mask, on causal calls on the
    host's work list from 2048, incl. Sq > Sk's items without keys): the D=64 persistent forward with three
    consumer warpgroups (192-row items) launches with NUM_WG=3, and its out and lse equal the two-warpgroup
    kernel's (=2) bit for bit (every row's
    arithmetic is the same: the same key tiles in the same order); its gradients pass the accuracy rule against
    the float64 reference. Causal cases run without v38a's skip (TILEATTN_GLUON_FWD_SKIP=0, the form the knob
    keeps; ``test_causal_skip_matches_two`` covers the default)."""
    B, Sq, Sk, Hq, Hkv, feat = case
    q, k, v, gen = make_qkv(B, Sq, Sk, Hq, Hkv, 64, dtype, seed_for("gluon-3wg", case[:5], dtype),
                            requires_grad=True)
    kw = feature_kwargs(feat, Hq, gen)
    monkeypatch.setenv("TILEATTN_GLUON_FWD_WG", "2")
    seen = record_gluon_launches(monkeypatch)
    want = tileattn.attention(q, k, v, return_lse=True, **kw)
    assert seen and seen[-1][1]["PERSISTENT"] and "NUM_WG" not in seen[-1][1], seen[-1:]
    n = len(spy)
    monkeypatch.setenv("TILEATTN_GLUON_FWD_WG", "3")
    monkeypatch.setenv("TILEATTN_GLUON_FWD_SKIP", "0")
    got = tileattn.attention(q, k, v, return_lse=True, **kw)
    assert len(spy) == n + 1, "the call did not take the Gluon forward"
    assert "CAUSAL_SKIP" not in seen[-1][1], seen[-1]
    assert seen[-1][1].get("NUM_WG") == 3 and seen[-1][0] == (min(configs.cdiv(Sq, 192) * B * Hq,
                                                                  configs.sm_count(q.device)), ), seen[-1]
    assert not torch.isnan(got[0]).any()
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    import test_features
    test_features._check(q, k, v, randn((B, Sq, Hq, 64), dtype, gen), entry="tileattn", ctx="gluon 3 warpgroups",
                         **kw)


SKIP_CASES = [(16, 1024, 1024, 8, 8, {}),  # (B, Sq, Sk, Hq, Hkv, features), D=64 causal: 1k, many items per SM
              (2, 2048, 2048, 8, 8, dict(sink=True)),
              # Sq > Sk (diagonal -350): the item of rows 192-383 has one key tile, which its first two
              # warpgroups' rows do not see (they drain it; out 0, lse -inf), and its third's do
              (3, 1500, 1150, 4, 2, {}),
              (2, 700, 2000, 6, 3, {}),  # Sq < Sk
              (2, 1300, 1300, 4, 4, {})]  # a partial last item


@hopper
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", SKIP_CASES, ids=lambda c: "x".join(map(str, c[:5])) + "-" + "-".join(c[5]))
def test_causal_skip_matches_two(case, dtype, spy, monkeypatch):
    """v38a (the default on causal calls with three warpgroups since session 31): each warpgroup skips the key tiles
    its rows do not see, only releasing their ring slots and passing its turns; the call launches with
    CAUSAL_SKIP, and its out and lse equal the two-warpgroup kernel's bit for bit (a fully masked tile adds
    nothing), NaN-free, including warpgroups whose rows see no key at all (Sq > Sk)."""
    B, Sq, Sk, Hq, Hkv, feat = case
    q, k, v, gen = make_qkv(B, Sq, Sk, Hq, Hkv, 64, dtype, seed_for("gluon-skip", case[:5], dtype))
    kw = dict(feature_kwargs(feat, Hq, gen), causal=True)
    seen = record_gluon_launches(monkeypatch)
    monkeypatch.setenv("TILEATTN_GLUON_FWD_WG", "2")
    want = tileattn.attention(q, k, v, return_lse=True, **kw)
    assert seen and "NUM_WG" not in seen[-1][1], seen[-1:]
    n = len(spy)
    monkeypatch.setenv("TILEATTN_GLUON_FWD_WG", "3")
    got = tileattn.attention(q, k, v, return_lse=True, **kw)
    assert len(spy) == n + 1, "the call did not take the Gluon forward"
    assert seen[-1][1].get("NUM_WG") == 3 and seen[-1][1].get("CAUSAL_SKIP") and seen[-1][1]["USE_MAP"], seen[-1]
    assert not torch.isnan(got[0]).any()
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_persistent_forward_protocol_model():
    """benchmarks/persistent_protocol.check_fwd, the host model of the persistent forward's barriers with three
    warpgroups taking turns and v38a's drained tiles (TMA copies landing in random order): no deadlock, each item
    once per warpgroup, every read of its own ring slot and Q part, no refill in use; a drain without its waits
    is caught where every warpgroup drains a tile, one that ignores the turns always. (A model of the kernel's
    barrier code: the two must change together.)"""
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    import persistent_protocol as pp
    assert pp.check_fwd([3, 0, 5, 1], 2) == {0: 0, 1: 1, 2: 0, 3: 1}  # round robin, an item without keys
    seen = [[1, 0, 4], [0, 0, 0], [2, 3, 4]]  # warpgroups computing part (or none) of their items' tiles
    assert pp.check_fwd([4, 3, 4], 1, 3, 2, 2, seen) == {0: 0, 1: 0, 2: 0}
    for bug in ("no_ready_wait", "free_run"):
        with pytest.raises((AssertionError, pp.Deadlock)):
            pp.check_fwd([4, 3, 4], 1, 3, 2, 2, seen, bug=bug)
    pp.random_fwd_cases(80)
    pp.random_fwd_cases(40, skip=False)


def test_three_warpgroups_scope(monkeypatch):
    """configs.gluon_forward_warpgroups: by default 3 at D=64 on the plain persistent grid from 1024 query rows (run
    172), 2 elsewhere; TILEATTN_GLUON_FWD_WG forces either count within that scope; a bad value is refused naming
    the variable."""
    monkeypatch.delenv("TILEATTN_GLUON_FWD_WG", raising=False)
    wgs = configs.gluon_forward_warpgroups
    assert wgs(64, True, 1024) == 3 and wgs(64, True, 16384) == 3 and wgs(64, True, 1023) == 2
    assert wgs(128, True, 4096) == 2 and wgs(64, False, 4096) == 2 and wgs(256, True, 4096) == 2
    assert wgs(64, True, 2048, causal=True) == 3 and wgs(64, True, 2047, causal=True) == 2  # causal: from 2k (run 178)
    monkeypatch.setenv("TILEATTN_GLUON_FWD_WG", "3")
    assert wgs(64, True, 512) == 3 and wgs(128, True, 4096) == 2 and wgs(64, False, 4096) == 2
    assert wgs(64, True, 1024, causal=True) == 3
    monkeypatch.setenv("TILEATTN_GLUON_FWD_WG", "2")
    assert wgs(64, True, 4096) == 2 and wgs(64, True, 4096, causal=True) == 2
    monkeypatch.setenv("TILEATTN_GLUON_FWD_WG", "4")
    with pytest.raises(ValueError, match="TILEATTN_GLUON_FWD_WG"):
        configs.gluon_forward_warpgroups(64, True)


def _host_launch(monkeypatch, shape, causal=False, knobs=None, **kw):
    """``gluon_forward.attention_forward``'s host logic on the CPU: descriptors, outputs and the work list mocked
    (132 SMs), the launch recorded; returns (grid, constexpr kwargs, maxnreg, tiles' block_m or None)."""
    from tileattn.kernels import params
    for name, value in (knobs or {}).items():
        monkeypatch.setenv(name, value)
    B, Sq, Sk, Hq, Hkv, d = shape
    one = torch.zeros(1, dtype=torch.bfloat16)
    q, k = one.expand(B, Sq, Hq, d), one.expand(B, Sk, Hkv, d)
    kw.setdefault("window_right", 0 if causal else -1)
    p = params.AttnParams(batch=B, max_seqlen_q=Sq, max_seqlen_k=Sk, softmax_scale=d ** -0.5, **kw)
    seen, lists = [], []
    monkeypatch.setattr(gluon_forward, "make_desc", lambda *a, **o: None)
    monkeypatch.setattr(gluon_forward, "forward_outputs", lambda q, d, p: (torch.empty(1).expand(q.shape),
                                                                            torch.empty(0), 0, 0))
    monkeypatch.setattr(gluon_forward, "residual_like", lambda out: torch.empty(0))
    monkeypatch.setattr(configs, "sm_count", lambda device: 132)

    def work_list(batch, q_heads, group, seqlen_q, seqlen_k, block_m, *rest):
        lists.append(block_m)
        return torch.zeros(configs.cdiv(seqlen_q, block_m) * batch * q_heads, dtype=torch.int32)
    monkeypatch.setattr(gluon_forward, "causal_work_list", work_list)
    monkeypatch.setattr(gluon_forward, "launch", lambda fn, grid, args, kwargs, nw, ns, maxnreg: seen.append(
        (grid, kwargs, maxnreg)))
    gluon_forward.attention_forward(q, k, k, p, residual=True, cfg=configs._GLUON_FWD[d])
    (grid, kwargs, maxnreg), = seen
    return grid, kwargs, maxnreg, (lists[-1] if lists else None)


def test_stagger_knob_on_cpu(monkeypatch):
    """The diagnostic TILEATTN_GLUON_FWD_STAGGER (``benchmarks/fwd_trace.py --stagger``) reaches persistent launches
    only, as the odd programs' start delay in ns; unset, no STAGGER (the default kernel); not a number: a
    ValueError naming the knob."""
    monkeypatch.delenv("TILEATTN_GLUON_FWD_STAGGER", raising=False)
    _, kw, _, _ = _host_launch(monkeypatch, (2, 4096, 4096, 8, 8, 256))
    assert kw["PERSISTENT"] and "STAGGER" not in kw
    _, kw, _, _ = _host_launch(monkeypatch, (2, 4096, 4096, 8, 8, 256), knobs={"TILEATTN_GLUON_FWD_STAGGER": "7000"})
    assert kw["PERSISTENT"] and kw["STAGGER"] == 7000
    _, kw, _, _ = _host_launch(monkeypatch, (2, 4096, 4096, 16, 16, 128), causal=True,
                               knobs={"TILEATTN_CAUSAL_LIST": "0", "TILEATTN_GLUON_FWD_STAGGER": "7000"})
    assert not kw["PERSISTENT"] and "STAGGER" not in kw
    monkeypatch.setenv("TILEATTN_GLUON_FWD_STAGGER", "half")
    with pytest.raises(ValueError, match="TILEATTN_GLUON_FWD_STAGGER"):
        _host_launch(monkeypatch, (2, 4096, 4096, 8, 8, 256))


def test_launch_shapes_on_cpu(monkeypatch):
    """The launcher's schedule on the CPU (launch mocked): D=64 without a mask from 1k rows on three warpgroups
    (192-row items, v37a's registers), at 512 on two; D=128 on two (128-row items); causal D=64 on the work list
    from 2k rows with three (the list built for 192-row items), at 1k with two unless forced; a window keeps
    two."""
    monkeypatch.delenv("TILEATTN_GLUON_FWD_WG", raising=False)
    grid, kw, maxnreg, _ = _host_launch(monkeypatch, (1, 16384, 16384, 32, 32, 64))
    assert kw["NUM_WG"] == 3 and kw["PERSISTENT"] and kw["num_items"] == 86 * 32 and grid == (132, )
    assert (kw["CONSUMER_REGS"], kw["PRODUCER_REGS"], maxnreg) == configs.GLUON_3WG_REGS
    grid, kw, maxnreg, _ = _host_launch(monkeypatch, (32, 512, 512, 32, 32, 64))
    assert "NUM_WG" not in kw and kw["num_items"] == 4 * 32 * 32 and maxnreg == configs._GLUON_FWD[64].maxnreg
    grid, kw, _, _ = _host_launch(monkeypatch, (2, 4096, 4096, 16, 16, 128))
    assert "NUM_WG" not in kw and kw["PERSISTENT"] and kw["num_items"] == 32 * 2 * 16
    grid, kw, _, block_m = _host_launch(monkeypatch, (4, 4096, 4096, 32, 32, 64), causal=True)
    assert kw["NUM_WG"] == 3 and kw["USE_MAP"] and block_m == 192 and kw["num_items"] == 22 * 4 * 32
    assert kw["CAUSAL_SKIP"]  # v38a: the default with three warpgroups on causal calls
    grid, kw, _, block_m = _host_launch(monkeypatch, (16, 1024, 1024, 32, 32, 64), causal=True)
    assert "NUM_WG" not in kw and kw["USE_MAP"] and block_m == 128 and kw["num_items"] == 8 * 16 * 32
    grid, kw, _, block_m = _host_launch(monkeypatch, (16, 1024, 1024, 32, 32, 64), causal=True,
                                        knobs={"TILEATTN_GLUON_FWD_WG": "3"})
    assert kw["NUM_WG"] == 3 and kw["USE_MAP"] and block_m == 192 and kw["num_items"] == 6 * 16 * 32
    assert kw["CAUSAL_SKIP"]
    _, kw, _, _ = _host_launch(monkeypatch, (16, 1024, 1024, 32, 32, 64), causal=True,
                               knobs={"TILEATTN_GLUON_FWD_WG": "3", "TILEATTN_GLUON_FWD_SKIP": "0"})
    assert kw["NUM_WG"] == 3 and "CAUSAL_SKIP" not in kw
    _, kw, _, _ = _host_launch(monkeypatch, (1, 16384, 16384, 32, 32, 64))
    assert kw["NUM_WG"] == 3 and "CAUSAL_SKIP" not in kw  # not causal
    monkeypatch.setenv("TILEATTN_GLUON_FWD_WG", "2")
    _, kw, _, _ = _host_launch(monkeypatch, (4, 4096, 4096, 32, 32, 64), causal=True)
    assert "NUM_WG" not in kw and "CAUSAL_SKIP" not in kw  # two warpgroups: nothing to skip
    grid, kw, _, _ = _host_launch(monkeypatch, (2, 4096, 4096, 8, 8, 128), window_left=256, window_right=256)
    assert "NUM_WG" not in kw


@needs_gluon
@pytest.mark.skipif(not ptxas_available(), reason="needs triton's bundled ptxas")
def test_three_warpgroups_compile_for_sm90():
    """v37a for sm_90a: no serialised wgmma, shared memory within the limit; its worker consumers have 160
    registers, and ptxas spills ~100 bytes in the item loop (none in the key-tile loop, SASS); more would be a
    regression. (The causal form with a sink spills 180 B, also outside the key-tile loop.)"""
    assert_compiles([("--head-dim", 64, "--persistent", "--wg", 3, "--spill-budget", 112, *extra)
                     for extra in ((), ("--sink",), ("--fp16", "--no-resid"), ("--causal", "--tile-map"),
                                   ("--causal", "--tile-map", "--skip"))])  # v38a: 84 B, key-tile loop none


@pytest.mark.parametrize("shape", [(2, 16, 4, 2048, 2048, 128), (3, 4, 2, 257, 1031, 128), (2, 8, 2, 1500, 700, 128),
                                   (16, 32, 32, 1024, 1024, 64), (1, 16, 16, 16384, 16384, 128), (1, 2, 1, 100, 100, 64),
                                   (4, 16, 16, 4096, 4096, 128)], ids=lambda s: "x".join(map(str, s)))
def test_causal_schedule(shape):
    """_hostinfo.causal_schedule (the persistent forward's work list for batched causal calls): every (b, h, query
    tile) exactly once in item_bounds' USE_MAP form; each head group's K/V within CAUSAL_LIST_L2_FRACTION of the
    L2 unless a group must be larger to fill a round (nprog / query tiles heads), and the programs running at once
    (any window of nprog consecutive positions) read the K/V of at most three groups (the kernel's LPT order: of up
    to nprog heads); within a group the tiles go longest first level by level (a program's items in a group never
    get longer); the busiest program's modelled work is the returned balance times the mean and within 6% of a
    lower bound (the mean, or the longest item). Host-only: runs on the CPU."""
    from tileattn import _hostinfo
    batch, hq, hkv, sq, sk, d = shape
    nprog, l2 = 132, 50 << 20
    entries, balance, per_group = _hostinfo.causal_schedule(batch, hq, hq // hkv, sq, sk, 128, 128, 2 * d * 2, nprog,
                                                            l2)
    num_m = -(-sq // 128)
    decoded = [((e // hq) % batch, e % hq, e // hq // batch) for e in entries]  # (b, h, tile)
    assert sorted(decoded) == sorted((b, h, t) for b in range(batch) for h in range(hq) for t in range(num_m))
    head_bytes = sk * 2 * d * 2 // (hq // hkv)
    least = -(-min(nprog, batch * hq * num_m) // num_m)
    assert per_group <= least or per_group * head_bytes <= l2 * _hostinfo.CAUSAL_LIST_L2_FRACTION
    group_of = [(b * hq + h) // per_group for b, h, _ in decoded]
    progs = min(nprog, len(entries))
    for w in range(0, len(entries), 7):
        groups = {group_of[i] for i in range(w, min(len(entries), w + progs))}
        assert max(groups) - min(groups) <= 2, (w, sorted(groups))

    def key_tiles(t):
        hi = min(sk, (t + 1) * 128 + sk - sq)
        return -(-hi // 128) if hi > 0 else 0
    load = []
    for p in range(progs):
        mine = [(group_of[i], key_tiles(decoded[i][2])) for i in range(p, len(entries), progs)]
        assert all(a[0] < b[0] or (a[0] == b[0] and a[1] >= b[1]) for a, b in zip(mine, mine[1:])), p
        load.append(sum(n + _hostinfo.CAUSAL_LIST_ITEM_COST for _, n in mine))
    mean = sum(load) / progs
    assert max(load) / mean == pytest.approx(balance)
    longest = max(key_tiles(t) for t in range(num_m)) + _hostinfo.CAUSAL_LIST_ITEM_COST
    assert max(load) <= 1.06 * max(mean, longest), (balance, mean, longest)  # within 6% of a lower bound


def test_causal_list_l2_traffic_model():
    """benchmarks/l2_traffic.py (K/V reads through an LRU standing for one 25 MB half of the L2): the host's causal
    work list reads no more from HBM than the plain grid (each head's K/V about once), the kernel's LPT order 4x
    and more at 1k-2k (why causal lost on the persistent grid, NOTES v22a). Host-only: runs on the CPU."""
    import os
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    import l2_traffic
    l2 = 25 << 20
    for seqlen, d in ((1024, 128), (2048, 128), (2048, 64)):
        grid, lpt, lst, nprog = l2_traffic.schedules(seqlen, d, 132, l2)
        tile = 128 * d * 4
        g = l2_traffic.simulate([grid], tile, l2, 1.5, shared=nprog)
        assert g == 128 << 20  # every K/V tile of the call once: 16k tokens x 2048 x K and V x 2 bytes
        assert l2_traffic.simulate(lst, tile, l2, 1.5) <= 1.05 * g
        assert l2_traffic.simulate(lpt, tile, l2, 1.5) >= 4 * g


def test_causal_work_list_limits():
    """No work list (the plain grid runs; on a forced persistent grid the kernel's own order) for a call without
    query tiles or past CAUSAL_LIST_MAX_ITEMS items, whose Python schedule would cost too much host time.
    Host-only."""
    from tileattn import _hostinfo
    cpu = torch.device("cpu")
    assert _hostinfo.causal_work_list(2, 4, 1, 0, 100, 128, 128, 512, 132, cpu) is None
    tiles = _hostinfo.CAUSAL_LIST_MAX_ITEMS // (8 * 32) + 1
    assert _hostinfo.causal_work_list(8, 32, 1, tiles * 128, tiles * 128, 128, 128, 512, 132, cpu) is None


# (B, Sq, Sk, Hq, Hkv, D, features): 2 x 16 x 16 = 512 items in groups of heads, GQA; Sq > Sk (the top tiles see
# no key: items with n = 0); Sq < Sk; D=64 (its Gluon causal threshold lifted by the spy fixture); a sink
CAUSAL_LIST_CASES = [(2, 2048, 2048, 16, 4, 128, {}), (2, 1500, 700, 8, 2, 128, {}), (3, 257, 1031, 4, 2, 128,
                     dict(sink=True)), (2, 1400, 1400, 12, 4, 64, {}), (1, 4096, 4096, 16, 16, 128, {})]


@hopper
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", CAUSAL_LIST_CASES, ids=lambda c: "x".join(map(str, c[:6])) + "-" + "-".join(c[6]))
def test_causal_work_list_matches_grid(case, dtype, spy, monkeypatch):
    """Batched causal calls on the forced persistent grid walk the host's L2-grouped work list
    (_hostinfo.causal_schedule: the launch has USE_MAP and a list of every tile), the kernel's LPT order with
    TILEATTN_CAUSAL_LIST=0; unforced (the default) the persistent grid over the list, the plain grid with
    TILEATTN_CAUSAL_LIST=0 or when no list can be had (the shape cache full). All bit-identical to the plain grid
    (out, lse), and the list's call within the accuracy rule against the float64 reference (out, lse, gradients)."""
    B, Sq, Sk, Hq, Hkv, d, feat = case
    q, k, v, gen = make_qkv(B, Sq, Sk, Hq, Hkv, d, dtype, seed_for("causal-list", case[:6], dtype),
                            requires_grad=True)
    kw = dict(feature_kwargs(feat, Hq, gen), causal=True)
    seen = record_gluon_launches(monkeypatch)
    monkeypatch.setenv("TILEATTN_GLUON_PERSISTENT", "0")
    ref = tileattn.attention(q, k, v, return_lse=True, **kw)
    assert seen and not seen[-1][1]["PERSISTENT"]
    monkeypatch.setenv("TILEATTN_GLUON_PERSISTENT", "1")
    for on in ("1", "0"):
        monkeypatch.setenv("TILEATTN_CAUSAL_LIST", on)
        got = tileattn.attention(q, k, v, return_lse=True, **kw)
        grid, consts = seen[-1]
        assert consts["PERSISTENT"] and consts["USE_MAP"] == (on == "1"), (on, consts)
        assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1]), f"TILEATTN_CAUSAL_LIST={on}"
    # the default: the persistent grid over the list; TILEATTN_CAUSAL_LIST=0, or no list to be had (here: the
    # shape cache full), the plain grid
    from tileattn import _hostinfo
    monkeypatch.delenv("TILEATTN_GLUON_PERSISTENT")
    for on, full in (("1", False), ("0", False), ("1", True)):
        monkeypatch.setenv("TILEATTN_CAUSAL_LIST", on)
        if full:
            monkeypatch.setattr(_hostinfo, "_CAUSAL_LISTS", {})
            monkeypatch.setattr(_hostinfo, "CAUSAL_LIST_MAX_SHAPES", 0)
        got = tileattn.attention(q, k, v, return_lse=True, **kw)
        listed = on == "1" and not full
        assert seen[-1][1]["PERSISTENT"] == listed and seen[-1][1]["USE_MAP"] == listed, (on, full)
        assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1]), (on, full)
    monkeypatch.setattr(_hostinfo, "CAUSAL_LIST_MAX_SHAPES", 256)
    import test_features
    test_features._check(q, k, v, randn((B, Sq, Hq, d), dtype, gen), entry="tileattn", ctx="causal work list", **kw)


@hopper
@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["batched-causal", "varlen"])
def test_work_list_survives_in_a_cuda_graph(kind, spy, monkeypatch):
    """A work list (the batched causal one on the forced persistent grid, or the varlen one) cached before a CUDA
    graph captured the call stays alive while the graph lives, even when the caches drop it (the graph reads its
    address on every replay): replayed after the caches were emptied and the freed memory refilled with junk, the
    graph's output equals an eager call's."""
    from tileattn import _hostinfo
    from _flash_helpers import seqlens_to_cu
    monkeypatch.setenv("TILEATTN_GLUON_PERSISTENT", "1")
    gen = make_gen(seed_for("work-list-graph", kind))
    if kind == "varlen":
        cu = seqlens_to_cu([700, 1, 0, 1347])
        q, k, v = (torch.randn(2048, 8, 128, generator=gen).to("cuda", torch.bfloat16) for _ in range(3))

        def call():
            with torch.no_grad():
                return tileattn.flash_attn_varlen_func(q, k, v, cu, cu, 1347, 1347, causal=True)
    else:
        q, k, v = (torch.randn(2, 1400, 8, 128, generator=gen).to("cuda", torch.bfloat16) for _ in range(3))

        def call():
            with torch.no_grad():
                return tileattn.attention(q, k, v, causal=True)
    seen = record_gluon_launches(monkeypatch)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        call()
    torch.cuda.current_stream().wait_stream(side)
    assert seen[-1][1]["USE_MAP"], "the call did not walk a work list"
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = call()
    assert seen[-1][1]["USE_MAP"]
    _hostinfo._CAUSAL_LISTS.clear()
    _hostinfo._HOST_SUMMARIES.clear()
    junk = [torch.full((1 << 16,), 2**30, dtype=torch.int32, device="cuda") for _ in range(64)]
    for t in (q, k, v):
        t.copy_(torch.randn(t.shape, generator=gen).to("cuda", torch.bfloat16))
    graph.replay()
    torch.cuda.synchronize()
    del junk
    assert torch.equal(out, call())


def set_schedule(monkeypatch, tilemap, persistent):
    """Force the Gluon forward's work list and persistent grid on ("1") or off ("0"), or leave them to the table
    (None: configs.gluon_forward_schedule)."""
    for name, value in (("TILEATTN_VARLEN_TILEMAP", tilemap), ("TILEATTN_GLUON_PERSISTENT", persistent)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)


def test_schedule_table(monkeypatch):
    """configs.gluon_forward_schedule: the persistent grid for unmasked calls where the entry says so (D=64/128/256),
    the varlen work list with it (and the plain grid where the list cannot be built, unless forced); either one
    forced by its variable; bad values refused."""
    from tileattn import configs
    set_schedule(monkeypatch, None, None)
    cfg = configs._GLUON_FWD[128]
    assert cfg.persistent and configs._GLUON_FWD[64].persistent and configs._GLUON_FWD[256].persistent
    schedule = configs.gluon_forward_schedule
    assert schedule(cfg, 128, False, False) == (True, False, False)
    assert schedule(cfg, 128, False, True) == (True, True, True)  # no list (compiled graph): plain grid
    assert schedule(cfg, 128, True, True) == (False, False, False)  # uneven tiles (causal): the plain grid (run 78)
    assert schedule(cfg, 128, True, False, True) == (True, False, True)  # batched causal on the host's list (s20)
    assert schedule(configs._GLUON_FWD[256], 256, False, False) == (True, False, False)  # v25a, run 131
    assert schedule(configs._GLUON_FWD[256], 256, True, False, True) == (True, False, True)  # causal: the list
    assert schedule(configs._GLUON_FWD[256], 256, True, False) == (False, False, False)  # one-sided window: grid
    assert schedule(cfg, 128, False, False, False, True) == (False, False, False)  # linear ALiBi: the plain grid
    assert schedule(cfg, 128, False, True, False, True) == (False, False, False)
    assert configs.gluon_alibi_linear(128, False)
    assert not configs.gluon_alibi_linear(128, True) and not configs.gluon_alibi_linear(256, False)
    monkeypatch.setenv("TILEATTN_GLUON_ALIBI", "general")
    assert not configs.gluon_alibi_linear(128, False)
    monkeypatch.setenv("TILEATTN_GLUON_ALIBI", "yes")
    with pytest.raises(ValueError, match="TILEATTN_GLUON_ALIBI"):
        configs.gluon_alibi_linear(128, False)
    monkeypatch.delenv("TILEATTN_GLUON_ALIBI")
    set_schedule(monkeypatch, "1", "0")
    assert schedule(cfg, 128, False, True) == (False, True, False)
    set_schedule(monkeypatch, "1", "1")
    assert schedule(cfg, 128, False, True) == (True, True, False)  # forced: persistent with or without the list
    assert schedule(cfg, 128, True, False, True) == (True, False, False)
    set_schedule(monkeypatch, "0", "1")
    assert schedule(cfg, 128, True, True) == (True, False, False)
    assert schedule(configs._GLUON_FWD[256], 256, True, False) == (True, False, False)  # forced: D=256 too
    for name in ("TILEATTN_GLUON_PERSISTENT", "TILEATTN_VARLEN_TILEMAP"):
        set_schedule(monkeypatch, None, None)
        monkeypatch.setenv(name, "yes")
        with pytest.raises(ValueError, match=name):
            schedule(cfg, 128, False, True)


@hopper
@pytest.mark.gpu
def test_default_schedule_reaches_the_launch(spy, monkeypatch):
    """The table's schedule reaches the kernel: an unmasked D=128 call launches PERSISTENT on at most one program
    per multiprocessor, and so do windows bounded on both sides and a causal call (over the host's work list); a
    one-sided window the plain grid; a packed varlen call (cu_seqlens read on the host) the persistent grid over
    the work list; batched ALiBi calls the linear form on the plain grid (the general form, persistent, with
    TILEATTN_GLUON_ALIBI=general), varlen ones the general form on the work list."""
    from _flash_helpers import seqlens_to_cu
    from tileattn import configs
    set_schedule(monkeypatch, None, None)
    seen = record_gluon_launches(monkeypatch)
    q = torch.randn(2, 2048, 16, 128, device="cuda", dtype=torch.bfloat16)
    sms = configs.sm_count(q.device)
    tileattn.attention(q, q, q)
    tileattn.attention(q, q, q, causal=True)
    tileattn.attention(q, q, q, window_size=(512, 512))
    tileattn.attention(q, q, q, window_size=(512, 0))
    tileattn.attention(q, q, q, window_size=(-1, 512))
    (g0, kw0), (g1, kw1), (g2, kw2), (g3, kw3), (g4, kw4) = seen
    assert kw0["PERSISTENT"] and g0[0] == min(sms, 16 * 2 * 16) and kw0["num_items"] == 16 * 2 * 16
    assert kw1["PERSISTENT"] and kw1["USE_MAP"] and g1[0] == min(sms, 16 * 2 * 16), "causal: the host's work list"
    assert kw2["PERSISTENT"] and kw3["PERSISTENT"], "windows bounded on both sides: persistent"
    assert not kw4["PERSISTENT"] and g4[0] == 16 * 2 * 16, "a window open on one side: the plain grid"
    lens = [2000, 1, 700, 1300]
    qv = torch.randn(sum(lens), 8, 128, device="cuda", dtype=torch.bfloat16)
    cu = seqlens_to_cu(lens)
    tileattn.flash_attn_varlen_func(qv, qv, qv, cu, cu, max(lens), max(lens))
    grid, kw = seen[-1]
    assert kw["PERSISTENT"] and kw["USE_MAP"] and kw["num_items"] == sum(-(-n // 128) for n in lens) * 8
    slopes = torch.full((16,), 0.1, device="cuda")
    tileattn.attention(q, q, q, alibi_slopes=slopes)
    tileattn.attention(q, q, q, causal=True, alibi_slopes=slopes)
    (ga, kwa), (gc, kwc) = seen[-2:]
    assert kwa["HAS_ALIBI"] == 2 and not kwa["PERSISTENT"] and ga[0] == 16 * 2 * 16, "ALiBi: linear, plain grid"
    assert kwc["HAS_ALIBI"] == 2 and not kwc["PERSISTENT"] and not kwc["USE_MAP"], "causal ALiBi: the plain grid"
    monkeypatch.setenv("TILEATTN_GLUON_ALIBI", "general")
    tileattn.attention(q, q, q, alibi_slopes=slopes)
    assert seen[-1][1]["HAS_ALIBI"] == 1 and seen[-1][1]["PERSISTENT"], "the general form: persistent"
    monkeypatch.delenv("TILEATTN_GLUON_ALIBI")
    tileattn.flash_attn_varlen_func(qv, qv, qv, cu, cu, max(lens), max(lens), alibi_slopes=slopes[:8])
    kw = seen[-1][1]
    assert kw["HAS_ALIBI"] == 1 and kw["PERSISTENT"] and kw["USE_MAP"], "varlen ALiBi: the general form, work list"


VARLEN_FEATS = {"plain": {}, "causal": dict(causal=True), "causal+sink": dict(causal=True, sink=True),
                "window+sink": dict(window_size=(300, 40), sink=True), "softcap+causal": dict(softcap=8.0, causal=True)}
VARLEN_GLUON = [(128, f) for f in VARLEN_FEATS] + [(64, "plain"), (64, "causal+sink")]  # D=64: no window/softcap


TILEMAP_MODES = {"grid": ("0", "0"), "tilemap": ("1", "0"), "persistent-grid": ("0", "1"),
                 "persistent-tilemap": ("1", "1"), "default": (None, None)}


@hopper
@pytest.mark.gpu
@pytest.mark.parametrize("mode", list(TILEMAP_MODES))
@pytest.mark.parametrize("d,feat", VARLEN_GLUON, ids=[f"{d}-{f}" for d, f in VARLEN_GLUON])
def test_varlen_through_gluon(feat, d, mode, spy, monkeypatch):
    """Packed varlen calls (D <= 128) take the Gluon forward: every sequence (lengths 0, 1, tile-crossing and
    long, q and k lengths different, GQA) against the float64 reference on its own slice (tests/test_varlen.py's
    rule), rows past the last sequence 0 / -inf; and the same values as the portable kernel. With the grid over
    the longest sequence, with the work list (TILEATTN_VARLEN_TILEMAP=1, _hostinfo.tile_map), and either one
    on the persistent grid (TILEATTN_GLUON_PERSISTENT=1: bit-identical to the plain grid)."""
    from _flash_helpers import seqlens_to_cu, varlen_ref
    set_schedule(monkeypatch, *TILEMAP_MODES[mode])
    from _helpers import check_lse, check_rule, atol_for, make_gen
    kw = dict(VARLEN_FEATS[feat])
    lens_q, lens_k = [177, 0, 1, 1024, 2000, 731, 64], [1500, 5, 0, 1, 2048, 731, 130]
    gen = make_gen(seed_for("gluon-varlen", feat, d))
    extra = 37  # packed rows past the last sequence (outside every sequence)
    q = randn((sum(lens_q) + extra, 8, d), torch.bfloat16, gen)
    k = randn((sum(lens_k) + extra, 2, d), torch.bfloat16, gen)
    v = randn((sum(lens_k) + extra, 2, d), torch.bfloat16, gen)
    cu_q, cu_k = seqlens_to_cu(lens_q), seqlens_to_cu(lens_k)
    sink = torch.randn(8, generator=gen).to("cuda") if kw.pop("sink", False) else None
    out, lse, _ = tileattn.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), sink=sink,
                                                  return_attn_probs=True, **kw)
    assert spy, "the varlen call did not take the Gluon forward"
    n = sum(lens_q)
    ref_o, ref_lse = varlen_ref(True, q[:n], k, v, cu_q, cu_k, sink=sink, **kw)
    pt_o, pt_lse = varlen_ref(False, q[:n], k, v, cu_q, cu_k, sink=sink, **kw)
    check_rule("out", out[:n], ref_o, pt_o, 2, atol_for(torch.bfloat16, ref_o, 1.0), feat)
    check_lse(lse[:, :n], ref_lse, pt_lse, feat)
    assert not out[n:].any() and torch.isneginf(lse[:, n:]).all(), "rows outside every sequence"
    if mode != "grid":
        set_schedule(monkeypatch, "0", "0")
        grid = tileattn.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), sink=sink,
                                               return_attn_probs=True, **kw)
        assert torch.equal(out, grid[0]) and torch.equal(lse, grid[1]), "persistent != grid"
    monkeypatch.setenv("TILEATTN_GLUON", "0")
    out0, lse0, _ = tileattn.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), sink=sink,
                                                    return_attn_probs=True, **kw)
    torch.testing.assert_close(lse, lse0, atol=1e-4, rtol=0)
    # one bf16 rounding apart at any magnitude (2**-7 alone is one step only below 2; values near 2 occur in rows
    # with one or two keys)
    torch.testing.assert_close(out.float(), out0.float(), atol=2 ** -7, rtol=2 ** -8)


@hopper
@pytest.mark.gpu
def test_varlen_scope(monkeypatch):
    """Varlen (D <= 128) takes the Gluon forward by default, also when the API never read cu_seqlens on the host
    (compiled graphs); TILEATTN_GLUON_VARLEN=0 opts out; D=256 varlen stays portable (its masked epilogue
    spills)."""
    from _flash_helpers import seqlens_to_cu
    from tileattn.kernels.params import AttnParams

    def params(q, cu):
        return AttnParams(batch=2, max_seqlen_q=200, max_seqlen_k=200, softmax_scale=q.shape[-1] ** -0.5,
                          cu_seqlens_q=cu, cu_seqlens_k=cu)
    q = torch.zeros(1, 300, 4, 128, device="cuda", dtype=torch.bfloat16)
    cu = seqlens_to_cu([100, 200])
    assert gluon_forward.applies(q, q, q, params(q, cu))
    monkeypatch.setenv("TILEATTN_GLUON_VARLEN", "0")
    assert not gluon_forward.applies(q, q, q, params(q, cu))
    monkeypatch.delenv("TILEATTN_GLUON_VARLEN")
    q256 = torch.zeros(1, 300, 4, 256, device="cuda", dtype=torch.bfloat16)
    assert not gluon_forward.applies(q256, q256, q256, params(q256, cu))


@hopper
@pytest.mark.gpu
@pytest.mark.parametrize("mode", list(TILEMAP_MODES))
@pytest.mark.parametrize("d", [64, 128])
def test_varlen_nan_stays_in_its_sequence(d, mode, spy, monkeypatch):
    """A NaN or inf in one sequence's K and V (and in the rows past every sequence) reaches no other sequence's
    output or lse: the key tile that crosses a sequence's end reads the next sequence's rows, whose scores are
    masked and whose V rows are zeroed before P V (0 * NaN would be NaN). Lengths put sequence ends inside tiles
    of both warpgroups' halves and at a tile's last row."""
    from _flash_helpers import seqlens_to_cu
    set_schedule(monkeypatch, *TILEMAP_MODES[mode])
    lens = [70, 300, 127, 2049, 129]
    gen = make_gen(seed_for("gluon-varlen-nan", d))
    total = sum(lens) + 40
    q = randn((total, 4, d), torch.bfloat16, gen)
    k = randn((total, 2, d), torch.bfloat16, gen)
    v = randn((total, 2, d), torch.bfloat16, gen)
    cu = seqlens_to_cu(lens)
    clean = tileattn.flash_attn_varlen_func(q, k, v, cu, cu, max(lens), max(lens), return_attn_probs=True)
    assert spy, "the varlen call did not take the Gluon forward"
    for poisoned in range(1, len(lens)):  # every sequence but the first in turn; its predecessor must not change
        k2, v2 = k.clone(), v.clone()
        a, b = int(cu[poisoned]), int(cu[poisoned + 1])
        k2[a:b, 0, 0] = float("inf")
        v2[a:b, :, :] = float("nan")
        v2[int(cu[-1]):] = float("inf")
        out, lse, _ = tileattn.flash_attn_varlen_func(q, k2, v2, cu, cu, max(lens), max(lens),
                                                      return_attn_probs=True)
        keep = torch.ones(total, dtype=torch.bool, device="cuda")
        keep[a:b] = False
        keep[int(cu[-1]):] = False
        assert torch.equal(out[keep], clean[0][keep]), f"sequence {poisoned}'s NaN reached another sequence"
        assert torch.equal(lse[:, keep], clean[1][:, keep])


FWD_COMPILE = [(128, False, ()), (128, True, ()), (64, False, ()), (256, True, ()),
               (128, True, ("--softcap", "--sink")), (128, False, ("--window",)),
               (64, False, ("--softcap", "--sink", "--fp16")),
               (128, False, ("--varlen",)), (128, True, ("--varlen", "--sink")),
               (64, False, ("--varlen", "--window", "--fp16")),
               (128, True, ("--alibi", "--softcap", "--sink")),
               (128, True, ("--varlen", "--tile-map")),
               (256, False, ("--alibi",)), (256, True, ("--resid8",)), (64, False, ("--resid8", "--fp16")),
               (128, True, ("--varlen", "--resid8"))]  # --resid8: the int8 residual (TILEATTN_RESIDUAL=int8)


@needs_gluon
@pytest.mark.skipif(not ptxas_available(), reason="needs triton's bundled ptxas")
def test_compiles_for_sm90_without_spills_or_serialised_wgmma():
    """ptxas serialises every wgmma of a kernel (warning C7514) when a register accumulator stays in flight where
    other instructions read it; that would silently cost most of the speed, so the CPU suite checks for it.
    (In a subprocess: this session's TRITON_INTERPRET=1 turns Gluon's library functions into interpreted ones.)"""
    assert_compiles([("--head-dim", d, *(["--causal"] if causal else []), *extra) for d, causal, extra in FWD_COMPILE],
                    env_extra={"TILEATTN_GLUON": "all", "TILEATTN_FAST_TANH": "1"})  # the GPU's tanh path


def test_softcap_fixed_max_scope(monkeypatch):
    """softcap_fixed_max (default; TILEATTN_SOFTCAP_FIXED_MAX=0 opts out): bf16 softcap calls up to the limit
    without ALiBi at head dims up to 128; never fp16, ALiBi, a larger softcap, D=256, or with the variable 0. The
    portable kernel's (portable_softcap_fixed_max, any head dim) by default too; off with 0 or "gluon"."""
    from tileattn.kernels import gluon_common
    q = torch.zeros(1, 4, 2, 128, dtype=torch.bfloat16)
    fixed = gluon_common.softcap_fixed_max
    ffma = bool(gluon_common.SOFTCAP_FFMA.value)
    monkeypatch.setenv("TILEATTN_SOFTCAP_FIXED_MAX", "0")
    assert not fixed(attn_params(q, q, softcap=30.0), torch.bfloat16, 128)
    monkeypatch.delenv("TILEATTN_SOFTCAP_FIXED_MAX", raising=False)
    assert fixed(attn_params(q, q, softcap=30.0), torch.bfloat16, 128) == ffma
    assert fixed(attn_params(q, q, softcap=30.0), torch.bfloat16, 64) == ffma
    assert not fixed(attn_params(q, q, softcap=30.0), torch.bfloat16, 256)
    limit = gluon_common.SOFTCAP_FIXED_MAX_LIMIT
    assert fixed(attn_params(q, q, softcap=limit), torch.bfloat16, 128) == ffma
    assert not fixed(attn_params(q, q, softcap=limit * 1.01), torch.bfloat16, 128)
    assert not fixed(attn_params(q, q, softcap=30.0), torch.float16, 128)
    assert not fixed(attn_params(q, q), torch.bfloat16, 128)
    assert not fixed(attn_params(q, q, softcap=30.0, alibi_slopes=torch.zeros(2)), torch.bfloat16, 128)
    # the portable kernel's form (v21c): default; the variable "gluon" keeps only the Gluon one, 0 neither
    portable = gluon_common.portable_softcap_fixed_max
    assert portable(attn_params(q, q, softcap=30.0), torch.bfloat16) and portable(attn_params(q, q, softcap=limit),
                                                                                  torch.bfloat16)
    monkeypatch.setenv("TILEATTN_SOFTCAP_FIXED_MAX", "gluon")
    assert not portable(attn_params(q, q, softcap=30.0), torch.bfloat16)
    assert fixed(attn_params(q, q, softcap=30.0), torch.bfloat16, 128) == ffma
    monkeypatch.setenv("TILEATTN_SOFTCAP_FIXED_MAX", "0")
    assert not portable(attn_params(q, q, softcap=30.0), torch.bfloat16)
    monkeypatch.delenv("TILEATTN_SOFTCAP_FIXED_MAX", raising=False)
    assert not portable(attn_params(q, q, softcap=30.0), torch.float16)
    assert not portable(attn_params(q, q, softcap=limit * 1.01), torch.bfloat16)
    assert not portable(attn_params(q, q, softcap=30.0, alibi_slopes=torch.zeros(2)), torch.bfloat16)


FIXED_MAX_CASES = [(2, 777, 1031, 4, 2, 128, 5.0, dict(causal=True)), (1, 1031, 1031, 4, 4, 128, 50.0, {}),
                   (2, 300, 1500, 4, 1, 128, 30.0, dict(causal=True, sink=True)),
                   (1, 999, 999, 2, 2, 128, 8.0, dict(window_size=(300, 40)))]


@hopper
@pytest.mark.gpu
@pytest.mark.parametrize("case", FIXED_MAX_CASES, ids=lambda c: "x".join(map(str, c[:7])) + "-" + "-".join(c[7]))
@pytest.mark.parametrize("extreme", [False, True], ids=["randn", "saturated"])
def test_softcap_fixed_max(case, extreme, spy, monkeypatch):
    """The softcap forward with a fixed softmax max (TILEATTN_SOFTCAP_FIXED_MAX=1, NOTES v20c) against the
    float64 reference (out, lse, gradients): random inputs, and saturated ones (scores far beyond +-softcap, so
    whole rows sit at -softcap, the smallest p = 2^-c, or at +softcap, the largest, with values of 1e-3 and 1e3)."""
    B, Sq, Sk, Hq, Hkv, d, softcap, feat = case
    monkeypatch.setenv("TILEATTN_SOFTCAP_FIXED_MAX", "1")
    seen = record_gluon_launches(monkeypatch)
    q, k, v, gen = make_qkv(B, Sq, Sk, Hq, Hkv, d, torch.bfloat16, seed_for("gluon-fixed-max", case[:7], extreme))
    if extreme:  # half the query rows score ~ -60 * softcap against every key, half ~ +60 * softcap
        with torch.no_grad():
            k.copy_(k.abs() + 1.0)
            q.copy_(q.abs() + 1.0)
            q[:, ::2] *= -1.0
            q.mul_(softcap * 60.0 / (d ** 0.5))
            v[..., : d // 2] *= 1e-3
            v[..., d // 2:] *= 1e3
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    kw = dict(feat, softcap=softcap)
    if kw.pop("sink", False):
        kw["sink"] = randn((Hq,), torch.float32, gen).requires_grad_()
    import test_features
    test_features._check(q, k, v, randn((B, Sq, Hq, d), torch.bfloat16, gen), entry="tileattn",
                         ctx="gluon softcap fixed max", **kw)
    assert seen and all(kw["HAS_SOFTCAP"] == 2 for _, kw in seen), "the fixed-max form did not run"


SOFTCAP_FORMS = {
    # the fold turned off (scores in log2 units, the form before v19g)
    "log2-scores": ({"TILEATTN_SOFTCAP_FFMA": "0"},
                    [("--head-dim", 128, "--softcap", "--persistent", "--spill-budget", 48),
                     ("--head-dim", 128, "--causal", "--softcap", "--sink"),
                     ("--head-dim", 64, "--softcap", "--persistent", "--fp16")]),
    # the fixed softmax max (v20c, the default for bf16 softcap <= 50 at D <= 128)
    "fixed-max": ({},
                  [("--head-dim", 128, "--softcap-fixed-max", "--persistent", "--spill-budget", 48),
                   ("--head-dim", 128, "--causal", "--softcap-fixed-max", "--sink"),
                   ("--head-dim", 128, "--softcap-fixed-max", "--persistent", "--varlen", "--window", "--sink",
                    "--spill-budget", 48)]),
}


@needs_gluon
@pytest.mark.skipif(not ptxas_available(), reason="needs triton's bundled ptxas")
@pytest.mark.parametrize("form", list(SOFTCAP_FORMS))
def test_softcap_forms_compile_for_sm90(form):
    """The softcap forward's other forms (TILEATTN_SOFTCAP_FFMA is read at import, so in a
    subprocess): no spills beyond the persistent kernel's budget, no serialised wgmma."""
    env, variants = SOFTCAP_FORMS[form]
    assert_compiles(variants, env_extra={"TILEATTN_GLUON": "all", "TILEATTN_FAST_TANH": "1", **env})


PERSISTENT_COMPILE = [(128, False, ()), (128, True, ("--softcap", "--sink")), (64, True, ()), (64, False, ("--sink",)),
                      (128, False, ("--softcap", "--alibi", "--sink")),
                      (128, False, ("--window", "--alibi", "--fp16")),
                      (128, True, ("--varlen", "--tile-map")),
                      (128, False, ("--varlen", "--window", "--sink")),
                      (256, False, ()), (256, True, ("--tile-map", "--softcap", "--sink")),
                      # fwd_trace.py's instruments (TRACE stamps, STAGGER's delay; traced D=256: 28-36 B)
                      (256, False, ("--trace", "--stagger", "5000")), (128, True, ("--tile-map", "--trace")),
                      # stream-K ranges (gluon_streamk; D=256 44 B, the partial records' stores beside acc)
                      (256, False, ("--streamk", )), (128, False, ("--streamk", "--softcap", "--sink"))]


@needs_gluon
@pytest.mark.skipif(not ptxas_available(), reason="needs triton's bundled ptxas")
def test_persistent_compiles_for_sm90():
    """The persistent forward (opt-in) for sm_90a: no serialised wgmma; a few spilled bytes allowed (the item loop's
    scalars: one 4-byte value per key tile in the causal D=128 consumer, 40 bytes with varlen + window + sink,
    NOTES v19a), more would be a regression."""
    assert_compiles([("--head-dim", d, "--persistent", "--spill-budget", 48, *(["--causal"] if causal else []), *extra)
                     for d, causal, extra in PERSISTENT_COMPILE],
                    env_extra={"TILEATTN_GLUON": "all", "TILEATTN_FAST_TANH": "1"})


@hopper
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("d, varlen, causal", [(64, False, True), (128, False, False), (256, False, True),
                                               (128, True, True), (64, True, False)])
def test_int8_residual_matches_the_full_one(spy, monkeypatch, dtype, d, varlen, causal):
    """The int8 residual (TILEATTN_RESIDUAL=int8; the Gluon epilogue stores column pairs as int16 by TMA, and a
    varlen sequence's last rows by pointer stores through an int16 view) against the full residual of the same
    call: out and lse bit-identical, r to within P 2^-(m+9) 128/127 (P the power of two at or below |out|) plus
    the full residual's own rounding to out's dtype, and nonzero. CPU twin: test_delta_correction."""
    from _flash_helpers import seqlens_to_cu
    from tileattn import ops
    gen = make_gen(seed_for("int8_residual_gluon", dtype, d, varlen, causal))
    heads, scale = 3, d ** -0.5
    if varlen:
        lens = [300, 67, 1, 193]  # odd lengths: each sequence's last rows take the pointer-store path
        total = sum(lens)
        q, k, v = (randn((1, total, heads, d), dtype, gen) for _ in range(3))
        cu = seqlens_to_cu(lens)
        args = [cu, cu, max(lens), max(lens)]
    else:
        q, k, v = (randn((2, 611, heads, d), dtype, gen) for _ in range(3))
        args = [None, None, 611, 611]
    args += [scale, -1, 0 if causal else -1, 0.0, None, None, 0.0, None]
    results = {}
    for fmt in ("full", "int8"):
        monkeypatch.setenv("TILEATTN_RESIDUAL", fmt)
        results[fmt] = ops.fwd_impl(q, k, v, *args, True)
    assert len(spy) == 2, "the calls did not take the Gluon forward"
    (out, lse, full), (out8, lse8, r8) = results["full"], results["int8"]
    assert torch.equal(out, out8) and torch.equal(lse, lse8)
    assert r8.dtype == torch.int8 and r8.shape == out.shape and (r8 != 0).any()
    assert_int8_residual_matches(r8, full, out)


def _emulate_exp2_pair_asm(x):
    """float32 emulation of the polynomial element of gluon_common's exp2 asm (constants read from the asm text, so
    this follows the kernel's code): clamp, round by the 1.5 * 2^23 sum, Horner, times 2^n from the bits."""
    import re
    import numpy as np
    from tileattn.kernels import gluon_common
    asm = gluon_common._exp2_group_asm(2)

    def const(line):  # the PTX hex float constants of one instruction, as float32
        return [np.uint32(int(h, 16)).view(np.float32) for h in re.findall(r"0f([0-9A-F]{8})", line)]
    lines = [ln.strip() for ln in asm.splitlines()]
    lo = const(next(ln for ln in lines if ln.startswith("max.NaN.f32")))[0]
    magic = const(next(ln for ln in lines if ln.startswith("add.rn.f32")))[0]
    fmas = [const(ln) for ln in lines if ln.startswith("fma.rn.f32")]
    x = np.asarray(x, np.float32)
    t = np.where(np.isnan(x), x, np.maximum(x, lo)).astype(np.float32)
    r = (t + magic).astype(np.float32)
    f = (t - (r - magic)).astype(np.float32)
    q = (f * fmas[0][0] + fmas[0][1]).astype(np.float32)
    for (c,) in fmas[1:]:
        q = (q * f + c).astype(np.float32)
    bits = ((r.view(np.uint32).astype(np.uint64) + 127) << np.uint64(23)) & np.uint64(0xFFFFFFFF)
    return (q * bits.astype(np.uint32).view(np.float32)).astype(np.float32)


def test_exp2_polynomial_emulated():
    """The polynomial half of TILEATTN_POLY_EXP's exp2 (session 22, v27a), emulated in float32 from the asm's own
    constants: relative error <= 1.1e-4 on the scores' range, exact powers of two at integers (a row maximum keeps
    p = 1), exactly 0 for -inf and anything below -127, NaN kept."""
    import numpy as np
    x = np.concatenate([np.linspace(-126, 0, 400001, dtype=np.float32), -np.random.default_rng(0).exponential(
        8, 100000).astype(np.float32)])
    x = x[x >= -126]
    y = _emulate_exp2_pair_asm(x)
    assert np.max(np.abs(y / np.exp2(x.astype(np.float64)) - 1)) <= 1.1e-4
    ints = np.arange(-126, 1, dtype=np.float32)
    assert np.array_equal(_emulate_exp2_pair_asm(ints), np.exp2(ints))
    special = _emulate_exp2_pair_asm([-np.inf, -1e30, -200.0, -127.0, np.nan])
    assert np.array_equal(special[:4], np.zeros(4, np.float32)) and np.isnan(special[4])


@needs_gluon
@pytest.mark.skipif(not ptxas_available(), reason="needs triton's bundled ptxas")
@pytest.mark.parametrize("form", ["1", "4"])
def test_poly_exp_compiles_for_sm90(form):
    """TILEATTN_POLY_EXP=1 / 4 (read at import: in a subprocess) compiles without spills or serialised wgmma; the
    asm holds one polynomial per group of 2 / 4 elements."""
    from tileattn.kernels import gluon_common
    n = 2 if form == "1" else 4
    asm = gluon_common._exp2_group_asm(n)
    assert asm.count("ex2.approx") == n - 1 and asm.count("max.NaN.f32") == 1 and f"${2 * n - 1}," in asm
    assert_compiles([("--head-dim", 64, "--persistent"), ("--head-dim", 128, "--persistent"),
                     ("--head-dim", 64, "--persistent", "--causal", "--tile-map", "--spill-budget", 48),
                     ("--head-dim", 256, "--causal")],
                    env_extra={"TILEATTN_POLY_EXP": form, "TILEATTN_FAST_TANH": "1"})
