"""Attention features beyond plain causal/non-causal, forward (out, lse) and backward (dq, dk, dv, d(sink)).

Local windows, softcap, ALiBi, attention sinks, q/k head dim != v head dim, dropout, and all of them at once,
through ``tileattn.flash_attn_func`` (flash-attn 2.8's API) and ``tileattn.attention``, against the float64
``tileattn.reference.attention_ref`` under flash-attn's accuracy rule (tests/_helpers.py, tests/_flash_helpers.py):
``max|ours - ref64| <= 2 * max|pt - ref64| + atol`` for out / lse and ``3 *`` for gradients, ``pt`` being the
same reference at the input dtype. GQA ratios 1 / 2 / 4 are mixed into every group.

CPU (Triton interpreter): short sequences, fp16 mostly (bf16 / fp32 in the combined test). CUDA: sequences of
1k-2k, head dims 64 / 128 plus odd ones, fp16 and bf16.
"""

import itertools
import math

import numpy as np
import pytest
import torch

import tileattn
from _flash_helpers import check_call, rand, uniform
from _helpers import (FWD_MULT, _max_abs, DEVICE, HALF_DTYPES, LARGE, ON_GPU, atol_for, check_rule, dtype_id,
                      make_gen, seed_for)
from tileattn.reference import attention_ref

if LARGE:
    B, HQ = 2, 8
    SEQS = [(1024, 1024), (1000, 2048), (2048, 1000)]  # (Sq, Sk)
    HEAD_DIMS = [128, 64, 80, 111]
    DTYPES = HALF_DTYPES
    DIFF_DIMS = [(192, 128), (128, 64), (96, 40), (40, 72), (64, 256)]
    DROP_B, DROP_SEQS = B, SEQS
    RATE_SHAPE = (2, 8, 1024, 1024)  # (B, H, Sq, Sk) of the mask for the keep-rate test
    RATE_PS = [0.1, 0.5, 0.83]
else:
    B, HQ = 2, 4
    SEQS = [(64, 64), (63, 97), (97, 63)]
    HEAD_DIMS = [32, 40]
    DTYPES = [torch.float16]
    DIFF_DIMS = [(48, 24), (24, 40), (40, 64)]
    DROP_B, DROP_SEQS = 1, [(48, 48), (40, 72), (72, 40)]  # dropout is the slowest path in the interpreter
    RATE_SHAPE = (1, 4, 128, 128)
    RATE_PS = [0.1, 0.83]
ALL_DTYPES = [torch.float16, torch.bfloat16, torch.float32]
HKVS = [HQ, HQ // 2, HQ // 4]  # GQA ratios 1, 2, 4


def _hd(i):
    """Head dims cycle over the cases (power-of-two and odd ones)."""
    return HEAD_DIMS[i % len(HEAD_DIMS)]


def _rng_fork():
    return torch.random.fork_rng(devices=[torch.cuda.current_device()] if ON_GPU else [])


def _inputs(shape, dtype, seed, *, dv=None, qk_scale=1.0, grad=True):
    """q (B, Sq, Hq, D), k (B, Sk, Hkv, D), v (B, Sk, Hkv, Dv), dout (B, Sq, Hq, Dv), dlse (B, Hq, Sq)."""
    b, sq, sk, hq, hkv, d = shape
    dv = d if dv is None else dv
    gen = make_gen(seed)
    q = rand((b, sq, hq, d), dtype, gen, scale=qk_scale, requires_grad=grad)
    k = rand((b, sk, hkv, d), dtype, gen, scale=qk_scale, requires_grad=grad)
    v = rand((b, sk, hkv, dv), dtype, gen, requires_grad=grad)
    dout = rand((b, sq, hq, dv), dtype, gen)
    dlse = rand((b, hq, sq), torch.float32, gen)
    return q, k, v, dout, dlse, gen


def _alibi(kind, b, h, gen):
    """Standard geometric per-head slopes (H,), or random per-(batch, head) slopes (B, H); fp32."""
    if kind == "head":
        return torch.tensor([2.0 ** (-8.0 * (i + 1) / h) for i in range(h)], dtype=torch.float32, device=DEVICE)
    return uniform((b, h), gen, 0.02, 0.6)


def _check(q, k, v, dout, dlse=None, *, ctx="", entry="flash", split=None, **feat):
    """flash_attn_func (or tileattn.attention) with the features in ``feat`` vs attention_ref, incl. grads.

    feat: causal, window_size, softcap, alibi_slopes, softmax_scale; ``sink`` is passed as a leaf (so that
    d(sink) is checked when it requires grad).
    """
    leaves = {"q": q, "k": k, "v": v}
    if feat.get("sink") is not None:
        leaves["sink"] = feat.pop("sink")
    else:
        feat.pop("sink", None)

    def ours(q, k, v, sink=None):
        if entry == "flash":
            return tileattn.flash_attn_func(q, k, v, return_attn_probs=True, sink=sink, **feat)[:2]
        return tileattn.attention(q, k, v, return_lse=True, sink=sink, **feat)

    def ref(upcast, q, k, v, sink=None):
        return attention_ref(q, k, v, upcast=upcast, sink=sink, **feat)

    return check_call(ours, ref, leaves, dtype=q.dtype, dout=dout, dlse=dlse, v_scale=_max_abs(v),
                      ctx=f"[{ctx} B={q.shape[0]} Sq={q.shape[1]} Sk={k.shape[1]} Hq={q.shape[2]} Hkv={k.shape[2]} "
                          f"D={q.shape[3]} Dv={v.shape[3]} {dtype_id(q.dtype)} {feat}]")


# ------------------------------------------------------------------------------------------ windows
def _window(kind, sq, sk):
    return {
        "w0-0": (0, 0),
        "small": (3, 2),
        "left-unbounded": (-1, 5),
        "right-unbounded": (9, -1),
        "ge-sk": (sk, sq + sk),  # every key visible: same as no window
        "medium": (100, 37),
    }[kind]


WINDOW_KINDS = ["w0-0", "small", "left-unbounded", "right-unbounded", "ge-sk"] + (["medium"] if LARGE else [])
WINDOW_CASES = [
    (kind, causal, SEQS[i % len(SEQS)], HKVS[(i + i // 3) % len(HKVS)])
    for i, (kind, causal) in enumerate(itertools.product(WINDOW_KINDS, [False, True]))
]


@pytest.mark.parametrize("kind,causal,seqs,hkv", WINDOW_CASES,
                         ids=[f"{c[0]}-{'causal' if c[1] else 'full'}-q{c[2][0]}k{c[2][1]}-hkv{c[3]}"
                              for c in WINDOW_CASES])
def test_window(kind, causal, seqs, hkv):
    """Sliding windows (left, right), -1 = unbounded; with causal, right becomes 0. Sq != Sk both ways."""
    sq, sk = seqs
    dtype = DTYPES[(WINDOW_KINDS.index(kind) + causal) % len(DTYPES)]
    q, k, v, dout, dlse, _ = _inputs((B, sq, sk, HQ, hkv, _hd(WINDOW_KINDS.index(kind) + causal)), dtype,
                                     seed_for("window", kind, causal, seqs, hkv))
    window = _window(kind, sq, sk)
    _check(q, k, v, dout, dlse, causal=causal, window_size=window)


def test_window_right_ignored_with_causal():
    """causal=True forces right = 0: (left, 7) and (left, 0) give bit-identical results; (−1, 0) == causal."""
    sq, sk = SEQS[1]
    q, k, v, _, _, _ = _inputs((1, sq, sk, HQ, HQ // 2, HEAD_DIMS[0]), DTYPES[0], seed_for("wr"),
                               grad=False)
    a = tileattn.flash_attn_func(q, k, v, causal=True, window_size=(11, 7))
    b = tileattn.flash_attn_func(q, k, v, causal=True, window_size=(11, 0))
    assert torch.equal(a, b)
    c = tileattn.flash_attn_func(q, k, v, causal=True)
    d = tileattn.flash_attn_func(q, k, v, causal=False, window_size=(-1, 0))
    torch.testing.assert_close(c, d, rtol=0, atol=0)


HUGE = 2**31 - 1


@pytest.mark.parametrize("window", [(0, HUGE), (-1, HUGE), (HUGE, -1), (HUGE, HUGE), (HUGE, 3)],
                         ids=["0-huge", "unb-huge", "huge-unb", "huge-huge", "huge-3"])
def test_window_huge_bounds(window):
    """Bounds up to int32's maximum mean "every key on that side" (they once overflowed the kernels' int32
    position arithmetic: silently wrong output and gradients); bounds past it (2**64) give the same bits."""
    sq, sk = SEQS[2]  # Sq > Sk: a left bound must reach past Sk - Sq as well
    dtype = DTYPES[0]
    q, k, v, dout, dlse, _ = _inputs((1, sq, sk, HQ, HQ // 2, HEAD_DIMS[0]), dtype, seed_for("whuge", window))
    _check(q, k, v, dout, dlse, window_size=window)
    with torch.no_grad():
        beyond = tuple(2**64 if w == HUGE else w for w in window)
        assert torch.equal(tileattn.flash_attn_func(q, k, v, window_size=beyond),
                           tileattn.flash_attn_func(q, k, v, window_size=window))


def _int_forms(value):
    """The same window bound as int, numpy int, 0-d tensor and 1-element tensor (on CPU and on the device)."""
    return {
        "int": value,
        "np": np.int64(value),
        "0d": torch.tensor(value),
        "1el": torch.tensor([value], dtype=torch.int32),
        "0d-dev": torch.tensor(value, device=DEVICE),
    }


@pytest.mark.parametrize("form", ["np", "0d", "1el", "0d-dev", "mixed"])
def test_window_values_as_tensors(form):
    """window_size bounds given as ints, numpy ints, 0-d / 1-element int tensors: identical results."""
    sq, sk = SEQS[2]
    q, k, v, _, _, _ = _inputs((1, sq, sk, HQ, HQ // 4, HEAD_DIMS[0]), DTYPES[0], seed_for("wforms"), grad=False)
    left, right = 13, 4
    want_out, want_lse, _ = tileattn.flash_attn_func(q, k, v, window_size=(left, right), return_attn_probs=True)
    if form == "mixed":
        window = (_int_forms(left)["0d"], right)
    else:
        window = (_int_forms(left)[form], _int_forms(right)[form])
    out, lse, _ = tileattn.flash_attn_func(q, k, v, window_size=window, return_attn_probs=True)
    assert torch.equal(out, want_out) and torch.equal(lse, want_lse)
    out2 = tileattn.attention(q, k, v, window_size=list(window))
    assert torch.equal(out2, want_out)
    # and the int form itself is right
    ref, _ = attention_ref(q, k, v, window_size=(left, right))
    ref_pt, _ = attention_ref(q, k, v, window_size=(left, right), upcast=False)
    check_rule("out", want_out, ref, ref_pt, FWD_MULT, atol_for(q.dtype, ref, _max_abs(v)), "[window ints]")


# ------------------------------------------------------------------------------------------ softcap
SOFTCAP_CASES = [(5.0, False, 0), (5.0, True, 1), (30.0, False, 2), (30.0, True, 0)]


@pytest.mark.parametrize("softcap,causal,i", SOFTCAP_CASES,
                         ids=[f"cap{c[0]:g}-{'causal' if c[1] else 'full'}" for c in SOFTCAP_CASES])
def test_softcap(softcap, causal, i):
    """scores -> softcap * tanh(scores / softcap); q, k scaled up so that tanh saturates for small caps."""
    sq, sk = SEQS[i]
    dtype = DTYPES[i % len(DTYPES)]
    q, k, v, dout, dlse, _ = _inputs((B, sq, sk, HQ, HKVS[i], _hd(i + causal)), dtype,
                                     seed_for("softcap", softcap, causal), qk_scale=2.0)
    _check(q, k, v, dout, dlse, causal=causal, softcap=softcap)


# ------------------------------------------------------------------------------------------- ALiBi
ALIBI_CASES = [("head", False, 1), ("head", True, 2), ("batch", False, 2), ("batch", True, 0)]


@pytest.mark.parametrize("kind,causal,i", ALIBI_CASES,
                         ids=[f"{c[0]}-{'causal' if c[1] else 'full'}" for c in ALIBI_CASES])
def test_alibi(kind, causal, i):
    """ALiBi: -slope * |i + Sk - Sq - j| with slopes (H,) or (B, H) fp32."""
    sq, sk = SEQS[i]
    dtype = DTYPES[i % len(DTYPES)]
    q, k, v, dout, dlse, gen = _inputs((B, sq, sk, HQ, HKVS[i], _hd(i + causal)), dtype,
                                       seed_for("alibi", kind, causal))
    slopes = _alibi(kind, B, HQ, gen)
    _check(q, k, v, dout, dlse, causal=causal, alibi_slopes=slopes)


def test_alibi_changes_result(monkeypatch):
    """Slopes actually reach the kernel: nonzero slopes change out; a zero (B, H) tensor changes nothing.
    (The base call pinned to the portable kernel, which runs the ALiBi calls: on Hopper the Gluon forward would
    take it, with its own summation order.)"""
    monkeypatch.setenv("TILEATTN_GLUON", "0")
    sq, sk = SEQS[0]
    q, k, v, _, _, _ = _inputs((B, sq, sk, HQ, HQ, HEAD_DIMS[0]), DTYPES[0], seed_for("alibi0"), grad=False)
    base = tileattn.flash_attn_func(q, k, v)
    zero = tileattn.flash_attn_func(q, k, v, alibi_slopes=torch.zeros(B, HQ, device=DEVICE))
    torch.testing.assert_close(zero, base, rtol=0, atol=2.0**-10)
    some = tileattn.flash_attn_func(q, k, v, alibi_slopes=torch.full((HQ,), 0.5, device=DEVICE))
    assert (some - base).abs().max().item() > 0.05


# -------------------------------------------------------------------------------------------- sink
SINK_CASES = [(False, 0, "fp32"), (True, 1, "fp32"), (False, 2, "dtype"), (True, 2, "fp32")]


@pytest.mark.parametrize("causal,i,sink_dtype", SINK_CASES,
                         ids=[f"{'causal' if c[0] else 'full'}-q{SEQS[c[1]][0]}k{SEQS[c[1]][1]}-{c[2]}"
                              for c in SINK_CASES])
def test_sink(causal, i, sink_dtype):
    """Per-head sink logits join the softmax denominator; d(sink) matches the reference's sink.grad."""
    sq, sk = SEQS[i]
    dtype = DTYPES[i % len(DTYPES)]
    q, k, v, dout, dlse, gen = _inputs((B, sq, sk, HQ, HKVS[i], _hd(i)), dtype,
                                       seed_for("sink", causal, i, sink_dtype))
    sdt = torch.float32 if sink_dtype == "fp32" else dtype
    sink = (rand((HQ,), torch.float32, gen, scale=2.0) + 1.0).to(sdt).requires_grad_(True)
    res = _check(q, k, v, dout, dlse, causal=causal, sink=sink)
    dsink = res["_ours"][2]["dsink"]
    assert dsink.dtype == sdt and dsink.shape == (HQ,)


@pytest.mark.parametrize("case", ["causal-sq-gt-sk", "window-0-0", "sk-0"])
def test_sink_rows_without_keys(case):
    """A row that sees no key but has a sink: lse == sink, out == 0, dq == 0, d(sink) still right."""
    hkv = HQ // 2
    if case == "causal-sq-gt-sk":
        sq, sk, feat = SEQS[2][0], SEQS[2][1], dict(causal=True)
    elif case == "window-0-0":  # Sq > Sk: the first Sq - Sk rows have their single key out of range
        sq, sk, feat = SEQS[2][0], SEQS[2][1], dict(window_size=(0, 0))
    else:
        sq, sk, feat = SEQS[0][0], 0, dict()
    q, k, v, dout, dlse, gen = _inputs((B, sq, sk, HQ, hkv, HEAD_DIMS[0]), DTYPES[0], seed_for("sinkempty", case))
    sink = rand((HQ,), torch.float32, gen, scale=2.0).requires_grad_(True)
    res = _check(q, k, v, dout, dlse, sink=sink, ctx=case, **feat)
    out, lse, grads = res["_ours"]
    n_empty = sq - sk
    expect = sink.detach()[None, :, None].expand(B, HQ, n_empty)
    # ln(exp(sink)) = sink, up to the rounding of the kernels' log2-unit round trip (a few fp32 ulps)
    torch.testing.assert_close(lse[:, :, :n_empty], expect, rtol=4 * torch.finfo(torch.float32).eps, atol=0,
                               msg="lse must equal the sink on rows that see no key")
    assert (out[:, :n_empty] == 0).all(), "out must be exactly 0 on rows that see no key"
    assert (grads["dq"][:, :n_empty] == 0).all(), "dq must be exactly 0 on rows that see no key"


# ----------------------------------------------------------------------------------- d_qk != d_v
DIFF_CASES = [(dims, causal, HKVS[(j + c) % len(HKVS)]) for j, dims in enumerate(DIFF_DIMS)
              for c, causal in enumerate([False, True])]


@pytest.mark.parametrize("dims,causal,hkv", DIFF_CASES,
                         ids=[f"dqk{c[0][0]}-dv{c[0][1]}-{'causal' if c[1] else 'full'}-hkv{c[2]}" for c in DIFF_CASES])
def test_head_dim_v_differs(dims, causal, hkv):
    """q/k head dim != v head dim (MLA-style): out and dout have v's head dim."""
    dqk, dv = dims
    sq, sk = SEQS[(dqk + dv) % len(SEQS)]
    dtype = DTYPES[dv % len(DTYPES)]
    q, k, v, dout, dlse, _ = _inputs((B, sq, sk, HQ, hkv, dqk), dtype, seed_for("dv", dims, causal), dv=dv)
    res = _check(q, k, v, dout, dlse, causal=causal)
    assert res["_ours"][0].shape == (B, sq, HQ, dv)


# ----------------------------------------------------------------------------------------- dropout
DROPOUT_CASES = [(0.17, False, 0), (0.17, True, 1), (0.5, False, 2), (0.5, True, 2)]


def _dropout_check(q, k, v, dout, dlse, p, *, entry_kwargs, ctx=""):
    """Run with dropout, keep S_dmask, scramble the global RNG before the backward, check against the
    reference given the mask: the backward must regenerate exactly the forward's mask."""
    state = {}
    sink = entry_kwargs.pop("sink", None)
    leaves = {"q": q, "k": k, "v": v}
    if sink is not None:
        leaves["sink"] = sink

    def ours(q, k, v, sink=None):
        out, lse, mask = tileattn.flash_attn_func(q, k, v, dropout_p=p, return_attn_probs=True, sink=sink,
                                                  **entry_kwargs)
        state["mask"] = mask
        torch.manual_seed(987654321)  # the backward must not draw a new mask from the generator
        torch.rand(1000, device=DEVICE)
        return out, lse

    def ref(upcast, q, k, v, sink=None):
        return attention_ref(q, k, v, upcast=upcast, sink=sink, dropout_mask=state["mask"], dropout_p=p,
                             **entry_kwargs)

    with _rng_fork():
        torch.manual_seed(1234)
        res = check_call(ours, ref, leaves, dtype=q.dtype, dout=dout, dlse=dlse, v_scale=_max_abs(v),
                         ctx=f"[dropout p={p} {ctx} {entry_kwargs} {tuple(q.shape)} {tuple(k.shape)}]")
    mask = state["mask"]
    assert mask.dtype == torch.bool and mask.shape == (q.shape[0], q.shape[2], q.shape[1], k.shape[1])
    return res, mask


@pytest.mark.parametrize("p,causal,i", DROPOUT_CASES,
                         ids=[f"p{c[0]}-{'causal' if c[1] else 'full'}-q{DROP_SEQS[c[2]][0]}k{DROP_SEQS[c[2]][1]}"
                              for c in DROPOUT_CASES])
def test_dropout_matches_reference_with_mask(p, causal, i):
    """out, lse and grads equal the reference that applies the returned keep-mask (scaled by 1/(1-p))."""
    sq, sk = DROP_SEQS[i]
    dtype = DTYPES[i % len(DTYPES)]
    q, k, v, dout, dlse, _ = _inputs((DROP_B, sq, sk, HQ, HKVS[(i + causal) % 3], _hd(i + 1)), dtype,
                                     seed_for("drop", p, causal, i))
    _, mask = _dropout_check(q, k, v, dout, dlse, p, entry_kwargs=dict(causal=causal))
    kept = mask.float().mean().item()
    assert 0 < kept < 1


@pytest.mark.parametrize("p", RATE_PS)
def test_dropout_keep_rate(p):
    """Empirical keep rate ~ 1 - p within 5 standard errors, per (batch, head) slice and overall; slices differ."""
    b, h, sq, sk = RATE_SHAPE
    q, k, v, _, _, _ = _inputs((b, sq, sk, h, h, 16), torch.float16, seed_for("rate", p), grad=False)
    with _rng_fork():
        torch.manual_seed(int(p * 1000))
        _, _, mask = tileattn.flash_attn_func(q, k, v, dropout_p=p, return_attn_probs=True)
    assert mask.shape == (b, h, sq, sk) and mask.dtype == torch.bool
    keep = 1.0 - p
    n = mask.numel()
    rate = mask.double().mean().item()
    se = math.sqrt(p * (1 - p) / n)
    assert abs(rate - keep) <= 5 * se, f"keep rate {rate:.5f} vs {keep:.5f} (5 SE = {5 * se:.5f})"
    per = mask.double().mean(dim=(2, 3)).flatten()
    se_slice = math.sqrt(p * (1 - p) / (sq * sk))
    assert (per - keep).abs().max().item() <= 5 * se_slice, f"per-(b, h) keep rates {per.tolist()}"
    # rows / columns are not a repeated pattern, and (batch, head) slices are independent draws
    flat = mask.reshape(b * h, sq * sk)
    assert not any(torch.equal(flat[i], flat[j]) for i in range(b * h) for j in range(i + 1, b * h))
    m0 = mask[0, 0]
    assert not torch.equal(m0[0], m0[1]) and not torch.equal(m0[:, 0], m0[:, 1])
    # neighbours uncorrelated: P(keep & keep next) ~ keep^2
    both = (m0[:, 1:] & m0[:, :-1]).double().mean().item()
    assert abs(both - keep * keep) <= 6 * math.sqrt(keep * keep * (1 - keep * keep) / m0[:, 1:].numel()) + 1e-3


def test_dropout_reproducible_by_seed():
    """torch.manual_seed(s) before the call reproduces out, lse, mask and grads bit for bit; another seed differs.
    Asking for the mask (return_attn_probs) does not change the result."""
    sq, sk = DROP_SEQS[1]
    q, k, v, dout, _, _ = _inputs((DROP_B, sq, sk, HQ, HQ // 2, HEAD_DIMS[0]), DTYPES[0], seed_for("repro"))
    p = 0.3

    def run(seed, probs=True, grad=False):
        torch.manual_seed(seed)
        res = tileattn.flash_attn_func(q, k, v, dropout_p=p, causal=True, return_attn_probs=probs)
        out = res[0] if probs else res
        grads = torch.autograd.grad(out, (q, k, v), dout) if grad else None
        return (res if probs else (out,)), grads

    with _rng_fork():
        (o1, l1, m1), g1 = run(11, grad=True)
        (o2, l2, m2), g2 = run(11, grad=True)
        (o3, l3, m3), _ = run(12)
        (o4,), _ = run(11, probs=False)
    assert torch.equal(o1, o2) and torch.equal(l1, l2) and torch.equal(m1, m2)
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))
    assert not torch.equal(m1, m3) and not torch.equal(o1, o3)
    assert torch.equal(l1, l3), "lse does not depend on dropout"
    assert torch.equal(o1, o4)


def test_dropout_zero_and_no_probs():
    """dropout_p = 0: S_dmask is an empty tensor and out equals the no-dropout call.
    return_attn_probs=False returns a single tensor."""
    sq, sk = SEQS[0]
    q, k, v, _, _, _ = _inputs((1, sq, sk, HQ, HQ, HEAD_DIMS[0]), DTYPES[0], seed_for("p0"), grad=False)
    out, lse, s = tileattn.flash_attn_func(q, k, v, dropout_p=0.0, return_attn_probs=True)
    assert isinstance(s, torch.Tensor) and s.numel() == 0
    plain = tileattn.flash_attn_func(q, k, v)
    assert isinstance(plain, torch.Tensor) and torch.equal(plain, out)


def test_dropout_attention_matches_flash_api():
    """tileattn.attention(dropout_p=...) and flash_attn_func draw the same mask from the same seed."""
    sq, sk = DROP_SEQS[2]
    q, k, v, _, _, gen = _inputs((DROP_B, sq, sk, HQ, HQ // 4, HEAD_DIMS[0]), DTYPES[0], seed_for("att-drop"),
                                 grad=False)
    kw = dict(causal=True, window_size=(20, 3), softcap=8.0, alibi_slopes=_alibi("batch", DROP_B, HQ, gen))
    with _rng_fork():
        torch.manual_seed(77)
        a, la = tileattn.attention(q, k, v, dropout_p=0.25, return_lse=True, **kw)
        torch.manual_seed(77)
        b, lb, _ = tileattn.flash_attn_func(q, k, v, dropout_p=0.25, return_attn_probs=True, **kw)
    assert torch.equal(a, b) and torch.equal(la, lb)


# ----------------------------------------------------------------------------------- all combined
if LARGE:
    COMBINED_CASES = [(dt, c, p) for dt in ALL_DTYPES for c in (False, True) for p in (0.0, 0.2)]
else:  # each dtype once with and once without dropout; causal alternates
    COMBINED_CASES = [(torch.float16, False, 0.0), (torch.float16, True, 0.2), (torch.bfloat16, True, 0.0),
                      (torch.bfloat16, False, 0.2), (torch.float32, False, 0.0), (torch.float32, True, 0.2)]


@pytest.mark.parametrize("dtype,causal,dropout", COMBINED_CASES,
                         ids=[f"{dtype_id(c[0])}-{'causal' if c[1] else 'full'}-p{c[2]}" for c in COMBINED_CASES])
def test_all_features_combined(dtype, causal, dropout):
    """window + softcap + ALiBi (B, H) + sink + dropout + GQA 4:1 (+ d_qk != d_v when causal) in one call,
    gradients through out and lse (incl. d(sink))."""
    b = DROP_B if dropout else B
    sq, sk = (DROP_SEQS if dropout else SEQS)[2 if causal else 1]
    d = HEAD_DIMS[1]
    dv = d if not causal else HEAD_DIMS[0]
    q, k, v, dout, dlse, gen = _inputs((b, sq, sk, HQ, HQ // 4, d), dtype,
                                       seed_for("combined", dtype, causal, dropout), dv=dv, qk_scale=1.5)
    slopes = _alibi("batch", b, HQ, gen)
    sink = rand((HQ,), torch.float32, gen, scale=1.5).requires_grad_(True)
    window = (sk // 3, 9) if not causal else (sk // 4, -1)
    kw = dict(causal=causal, window_size=window, softcap=6.0, alibi_slopes=slopes, sink=sink)
    if dropout:
        _dropout_check(q, k, v, dout, dlse, dropout, entry_kwargs=kw, ctx="combined")
    else:
        _check(q, k, v, dout, dlse, ctx="combined", **kw)
        if dtype == torch.float16 or LARGE:
            _check(q, k, v, dout, None, ctx="combined attention()", entry="attention", **kw)


def test_sink_non_contiguous_and_minus_inf():
    """A strided sink is read correctly; a -inf sink (a head with its sink switched off) gives no NaN."""
    q = torch.randn(1, 6, 2, 16, device=DEVICE)
    k = torch.randn(1, 2, 2, 16, device=DEVICE)
    v = torch.randn(1, 2, 2, 16, device=DEVICE)
    wide = torch.randn(4, device=DEVICE)
    a, la = tileattn.attention(q, k, v, sink=wide[::2], causal=True, return_lse=True)
    b, lb = tileattn.attention(q, k, v, sink=wide[::2].contiguous(), causal=True, return_lse=True)
    assert torch.equal(a, b) and torch.equal(la, lb)
    sink = torch.tensor([float("-inf"), 0.5], device=DEVICE, requires_grad=True)
    qg = q.clone().requires_grad_()
    o, lse = tileattn.attention(qg, k, v, sink=sink, causal=True, return_lse=True)
    ro, rl = attention_ref(q.double(), k.double(), v.double(), causal=True, sink=sink.detach().double())
    assert not torch.isnan(o).any() and not torch.isnan(lse).any()
    assert (o.double() - ro).abs().max().item() < 1e-5
    assert torch.equal(torch.isinf(lse), torch.isinf(rl))
    (o.sum() + lse[torch.isfinite(lse)].sum()).backward()
    assert torch.isfinite(sink.grad).all() and sink.grad[0].item() == 0.0 and torch.isfinite(qg.grad).all()
