"""flash-attn 2.8's Python surface on tileattn: signatures, return values, packed variants, input validation.

Packed inputs (qkv (B, S, 3, H, D), kv (B, S, 2, Hkv, D)) are checked against the float64 reference under
flash-attn's accuracy rule (tests/_helpers.py), and their gradient must be one tensor of the packed shape.
Bad values of every feature argument raise a ValueError / TypeError whose message names the argument.
"""

import inspect
import re

import pytest
import torch

import tileattn
from _flash_helpers import check_call, rand, seqlens_to_cu, uniform
from _helpers import _max_abs, DEVICE, HALF_DTYPES, LARGE, ON_GPU, make_gen, seed_for
from tileattn.reference import attention_ref

if LARGE:
    B, S, SK, HQ, D = 2, 1024, 2000, 8, 128
    DTYPES = HALF_DTYPES
    HEAD_DIMS = [128, 64, 80]
else:
    B, S, SK, HQ, D = 2, 64, 97, 4, 32
    DTYPES = [torch.float16]
    HEAD_DIMS = [32, 40, 24]
HKVS = [HQ, HQ // 2, HQ // 4]

FLASH_DEFAULTS = [("dropout_p", 0.0), ("softmax_scale", None), ("causal", False), ("window_size", (-1, -1)),
                  ("softcap", 0.0), ("alibi_slopes", None), ("deterministic", False), ("return_attn_probs", False)]
SIGNATURES = {  # flash-attn 2.8: name -> (leading positional parameters, extra trailing parameters)
    "flash_attn_func": (["q", "k", "v"], []),
    "flash_attn_qkvpacked_func": (["qkv"], []),
    "flash_attn_kvpacked_func": (["q", "kv"], []),
    "flash_attn_varlen_func": (["q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k"],
                               [("block_table", None)]),
    "flash_attn_varlen_qkvpacked_func": (["qkv", "cu_seqlens", "max_seqlen"], []),
    "flash_attn_varlen_kvpacked_func": (["q", "kv", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q",
                                         "max_seqlen_k"], []),
}


def _rng_fork():
    return torch.random.fork_rng(devices=[torch.cuda.current_device()] if ON_GPU else [])


# --------------------------------------------------------------------------------------- surface
@pytest.mark.parametrize("name", list(SIGNATURES))
def test_signature(name):
    """Same parameter names, order and defaults as flash-attn 2.8; ``sink`` is an extra keyword-only one."""
    fn = getattr(tileattn, name)
    assert name in tileattn.__all__ and fn.__doc__
    lead, extra = SIGNATURES[name]
    params = list(inspect.signature(fn).parameters.values())
    positional = [p for p in params if p.kind is p.POSITIONAL_OR_KEYWORD]
    assert [p.name for p in positional] == lead + [n for n, _ in FLASH_DEFAULTS] + [n for n, _ in extra]
    for p in positional[:len(lead)]:
        assert p.default is p.empty, f"{p.name} must be required"
    for p, (n, default) in zip(positional[len(lead):], FLASH_DEFAULTS + extra):
        assert p.default == default, f"{n}: default {p.default!r} != {default!r}"
    kwonly = [p for p in params if p.kind is p.KEYWORD_ONLY]
    assert [p.name for p in kwonly] == ["sink"] and kwonly[0].default is None


def test_varlen_block_table_needs_paged_cache():
    """block_table is supported (tests/test_varlen.py::test_paged_kv); packed (total, H, D) k/v with it are refused."""
    q = torch.zeros(5, 2, 16, dtype=torch.float16, device=DEVICE)
    cu = seqlens_to_cu([5])
    with pytest.raises(ValueError, match="paged cache"):
        tileattn.flash_attn_varlen_func(q, q, q, cu, cu, 5, 5, block_table=torch.zeros(1, 1, dtype=torch.int32,
                                                                                        device=DEVICE))


def test_return_values_and_positional_call():
    """out alone by default; (out, lse (B, H, Sq) fp32, S_dmask) with return_attn_probs; flash-attn's positional
    order works; deterministic is accepted and changes nothing."""
    gen = make_gen(seed_for("ret"))
    q = rand((B, S, HQ, D), DTYPES[0], gen)
    k, v = rand((B, SK, HQ // 2, D), DTYPES[0], gen), rand((B, SK, HQ // 2, D), DTYPES[0], gen)
    out = tileattn.flash_attn_func(q, k, v)
    assert isinstance(out, torch.Tensor) and out.shape == (B, S, HQ, D) and out.dtype == q.dtype
    res = tileattn.flash_attn_func(q, k, v, return_attn_probs=True)
    assert isinstance(res, tuple) and len(res) == 3
    o2, lse, s = res
    assert torch.equal(o2, out) and lse.shape == (B, HQ, S) and lse.dtype == torch.float32
    assert s.numel() == 0
    # positional: dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic, probs
    a = tileattn.flash_attn_func(q, k, v, 0.0, 0.2, True, (17, -1), 4.0, None, True, False)
    b = tileattn.flash_attn_func(q, k, v, softmax_scale=0.2, causal=True, window_size=(17, 0), softcap=4.0)
    assert torch.equal(a, b)
    c = tileattn.attention(q, k, v, softmax_scale=0.2, causal=True, window_size=(17, 0), softcap=4.0)
    assert torch.equal(a, c)


# ---------------------------------------------------------------------------------------- packed
QKV_CASES = [("plain", False, 0), ("plain", True, 1), ("features", True, 2), ("strided", False, 1)]


@pytest.mark.parametrize("variant,causal,i", QKV_CASES,
                         ids=[f"{c[0]}-{'causal' if c[1] else 'full'}-d{HEAD_DIMS[c[2]]}" for c in QKV_CASES])
def test_qkvpacked(variant, causal, i):
    """qkv (B, S, 3, H, D): out and lse match the reference on qkv[:, :, 0/1/2]; the gradient is one
    (B, S, 3, H, D) tensor whose three parts match dq, dk, dv (and d(sink) with a sink)."""
    d = HEAD_DIMS[i]
    dtype = DTYPES[i % len(DTYPES)]
    gen = make_gen(seed_for("qkvpacked", variant, causal, i))
    if variant == "strided":  # a view into a padded buffer (e.g. part of a fused projection's output)
        big = rand((B, S, 3, HQ + 1, d + 8), dtype, gen)
        qkv = big[:, :, :, 1:, :d].detach().requires_grad_(True)
        assert not qkv.is_contiguous()
    else:
        qkv = rand((B, S, 3, HQ, d), dtype, gen, requires_grad=True)
    dout = rand((B, S, HQ, d), dtype, gen)
    dlse = rand((B, HQ, S), torch.float32, gen)
    feat = {"causal": causal}
    leaves = {"qkv": qkv}
    if variant == "features":
        feat.update(window_size=(S // 3, 5), softcap=7.0, alibi_slopes=uniform((B, HQ), gen, 0.02, 0.5))
        leaves["sink"] = rand((HQ,), torch.float32, gen, scale=2.0).requires_grad_(True)

    def ours(qkv, sink=None):
        return tileattn.flash_attn_qkvpacked_func(qkv, return_attn_probs=True, sink=sink, **feat)[:2]

    def ref(upcast, qkv, sink=None):
        q, k, v = qkv.unbind(2)
        return attention_ref(q, k, v, upcast=upcast, sink=sink, **feat)

    res = check_call(ours, ref, leaves, dtype=dtype, dout=dout, dlse=dlse, split={"qkv": ("dq", "dk", "dv")},
                     v_scale=_max_abs(qkv[:, :, 2]), ctx=f"[qkvpacked {variant} causal={causal} d={d}]")
    out, lse, grads = res["_ours"]
    assert out.shape == (B, S, HQ, d) and lse.shape == (B, HQ, S)
    if variant == "plain" and not causal:
        # packed == unpacked, bit for bit, and the packed gradient is the stack of dq, dk, dv
        q, k, v = (x.detach().clone().requires_grad_(True) for x in qkv.unbind(2))
        o2, l2, _ = tileattn.flash_attn_func(q, k, v, return_attn_probs=True, **feat)
        g2 = torch.autograd.grad((o2, l2), (q, k, v), (dout, dlse))
        assert torch.equal(out, o2) and torch.equal(lse, l2)
        # (check_call already asserted that the packed gradient has qkv's shape; grads are its three parts)
        for name, g in zip(("dq", "dk", "dv"), g2):
            assert torch.equal(grads[name], g), f"packed {name} != unpacked {name}"


@pytest.mark.parametrize("form", ["qkv", "kv", "varlen-qkv", "varlen-kv"])
def test_packed_gradient_written_in_place(form, monkeypatch):
    """The packed gradient is allocated once, packed, and the backward kernels write dq / dk / dv into its views:
    no per-part gradients concatenated afterwards (the spy sees the views the kernels get, and the gradient
    autograd returns is the tensor they belong to)."""
    from tileattn import ops
    seen = []
    real = ops.attention_backward

    def spy(*args, grads=None, **kw):
        seen.append(grads)
        return real(*args, grads=grads, **kw)
    monkeypatch.setattr(ops, "attention_backward", spy)
    gen = make_gen(seed_for("packed-in-place", form))
    d, dtype = HEAD_DIMS[0], DTYPES[0]
    varlen = form.startswith("varlen")
    lead = (B * S,) if varlen else (B, S)
    cu = seqlens_to_cu([S] * B) if varlen else None
    if form.endswith("qkv"):
        packed = rand(lead + (3, HQ, d), dtype, gen, requires_grad=True)
        leaves = (packed,)
        out = (tileattn.flash_attn_varlen_qkvpacked_func(packed, cu, S) if varlen
               else tileattn.flash_attn_qkvpacked_func(packed))
        parts = 3
    else:
        q = rand(lead + (HQ, d), dtype, gen, requires_grad=True)
        packed = rand(lead + (2, HQ // 2, d), dtype, gen, requires_grad=True)
        leaves = (q, packed)
        out = (tileattn.flash_attn_varlen_kvpacked_func(q, packed, cu, cu, S, S) if varlen
               else tileattn.flash_attn_kvpacked_func(q, packed))
        parts = 2
    grads = torch.autograd.grad(out, leaves, rand(out.shape, dtype, gen))
    g = grads[-1]
    assert g.shape == packed.shape and len(seen) == 1 and seen[0] is not None
    views = seen[0][-parts:]  # the kernels' dq, dk, dv (qkv) or dk, dv (kv)
    for i, view in enumerate(views):
        assert view.untyped_storage().data_ptr() == g.untyped_storage().data_ptr()
        part = g.select(-3, i)  # varlen: the kernels see it with a leading batch of 1
        assert view.data_ptr() == part.data_ptr() and view.shape[-part.dim():] == part.shape
        assert view.stride()[-part.dim():] == part.stride()


KV_CASES = [(0, False, 0.0), (1, True, 0.0), (2, False, 0.0), (1, False, 0.3)]


@pytest.mark.parametrize("h,causal,p", KV_CASES,
                         ids=[f"hkv{HKVS[c[0]]}-{'causal' if c[1] else 'full'}-p{c[2]}" for c in KV_CASES])
def test_kvpacked(h, causal, p):
    """q (B, Sq, Hq, D), kv (B, Sk, 2, Hkv, D) with GQA and Sq != Sk; kv's gradient is one packed tensor.
    With dropout, the reference gets the returned keep-mask."""
    hkv = HKVS[h]
    dtype = DTYPES[h % len(DTYPES)]
    sq, sk = (S, SK) if h != 1 else (SK, S)
    if p and not LARGE:
        sq, sk = 40, 56  # dropout is slow in the interpreter
    gen = make_gen(seed_for("kvpacked", h, causal, p))
    q = rand((B, sq, HQ, D), dtype, gen, requires_grad=True)
    kv = rand((B, sk, 2, hkv, D), dtype, gen, requires_grad=True)
    dout = rand((B, sq, HQ, D), dtype, gen)
    dlse = rand((B, HQ, sq), torch.float32, gen)
    state = {}

    def ours(q, kv):
        out, lse, mask = tileattn.flash_attn_kvpacked_func(q, kv, dropout_p=p, causal=causal, return_attn_probs=True)
        state["mask"] = mask
        return out, lse

    def ref(upcast, q, kv):
        k, v = kv.unbind(2)
        return attention_ref(q, k, v, upcast=upcast, causal=causal, dropout_p=p,
                             dropout_mask=state["mask"] if p else None)

    with _rng_fork():
        torch.manual_seed(2024)
        res = check_call(ours, ref, {"q": q, "kv": kv}, dtype=dtype, dout=dout, dlse=dlse,
                         split={"kv": ("dk", "dv")}, v_scale=_max_abs(kv[:, :, 1]),
                         ctx=f"[kvpacked hkv={hkv} causal={causal} p={p} Sq={sq} Sk={sk}]")
    assert res["_ours"][0].shape == (B, sq, HQ, D)


# ----------------------------------------------------------------------------------- bad values
def _small(dtype=torch.float16, hq=4, hkv=2, b=2, sq=5, sk=7, d=16):
    gen = make_gen(0)
    return (rand((b, sq, hq, d), dtype, gen), rand((b, sk, hkv, d), dtype, gen), rand((b, sk, hkv, d), dtype, gen))


def _varlen_small(lens_q=(3, 4), lens_k=(5, 2), hq=4, hkv=2, d=16):
    gen = make_gen(1)
    q = rand((sum(lens_q), hq, d), torch.float16, gen)
    k = rand((sum(lens_k), hkv, d), torch.float16, gen)
    v = rand((sum(lens_k), hkv, d), torch.float16, gen)
    return q, k, v, seqlens_to_cu(lens_q), seqlens_to_cu(lens_k)


def _cu(values, dtype=torch.int32, device=DEVICE):
    return torch.tensor(values, dtype=dtype, device=device)


def _varlen_call(**over):
    q, k, v, cu_q, cu_k = _varlen_small()
    args = dict(q=q, k=k, v=v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=4, max_seqlen_k=5)
    args.update(over)
    return lambda: tileattn.flash_attn_varlen_func(**args)


def _feature_call(entry, **kw):
    q, k, v = _small()

    def call():
        if entry == "flash":
            return tileattn.flash_attn_func(q, k, v, **kw)
        return tileattn.attention(q, k, v, **kw)

    return call


_OTHER_DEVICE = "cpu" if ON_GPU else "meta"

# id -> (builder of a zero-argument call, exception type, regex the message must match)
BAD_VARLEN = {
    "cu-q-none": (lambda: _varlen_call(cu_seqlens_q=None), ValueError, r"cu_seqlens_q"),
    "cu-k-none": (lambda: _varlen_call(cu_seqlens_k=None), ValueError, r"cu_seqlens_k"),
    "qkvpacked-cu-none": (lambda: (lambda qkv=torch.zeros(7, 3, 2, 16, dtype=torch.float16, device=DEVICE):
                                   tileattn.flash_attn_varlen_qkvpacked_func(qkv, None, 4)), ValueError,
                          r"cu_seqlens"),
    "cu-not-monotonic": (lambda: _varlen_call(cu_seqlens_q=_cu([0, 4, 3])), ValueError, r"cu_seqlens_q"),
    "cu-k-not-monotonic": (lambda: _varlen_call(cu_seqlens_k=_cu([0, 6, 5])), ValueError, r"cu_seqlens_k"),
    "cu-not-from-0": (lambda: _varlen_call(cu_seqlens_q=_cu([1, 3, 7])), ValueError, r"cu_seqlens_q"),
    "cu-k-not-from-0": (lambda: _varlen_call(cu_seqlens_k=_cu([2, 5, 7])), ValueError, r"cu_seqlens_k"),
    "cu-int64": (lambda: _varlen_call(cu_seqlens_q=_cu([0, 3, 7], torch.int64)), TypeError, r"cu_seqlens_q"),
    "cu-k-int64": (lambda: _varlen_call(cu_seqlens_k=_cu([0, 5, 7], torch.int64)), TypeError, r"cu_seqlens_k"),
    "cu-float": (lambda: _varlen_call(cu_seqlens_q=_cu([0, 3, 7], torch.float32)), TypeError, r"cu_seqlens_q"),
    "cu-list": (lambda: _varlen_call(cu_seqlens_q=[0, 3, 7]), TypeError, r"cu_seqlens_q"),
    "cu-2d": (lambda: _varlen_call(cu_seqlens_q=_cu([[0, 3, 7]])), ValueError, r"cu_seqlens_q"),
    "cu-lengths-differ": (lambda: _varlen_call(cu_seqlens_k=_cu([0, 2, 5, 7])), ValueError, r"cu_seqlens"),
    "cu-past-total": (lambda: _varlen_call(cu_seqlens_q=_cu([0, 3, 9])), ValueError, r"cu_seqlens_q"),
    "cu-k-past-total": (lambda: _varlen_call(cu_seqlens_k=_cu([0, 5, 8])), ValueError, r"cu_seqlens_k"),
    "cu-other-device": (lambda: _varlen_call(cu_seqlens_q=_cu([0, 3, 7], device=_OTHER_DEVICE)), ValueError,
                        r"cu_seqlens_q"),
    "max-q-too-small": (lambda: _varlen_call(max_seqlen_q=3), ValueError, r"max_seqlen"),
    "max-k-too-small": (lambda: _varlen_call(max_seqlen_k=4), ValueError, r"max_seqlen"),
    "max-q-tensor-too-small": (lambda: _varlen_call(max_seqlen_q=torch.tensor(2)), ValueError, r"max_seqlen"),
    "max-negative": (lambda: _varlen_call(max_seqlen_k=-1), ValueError, r"max_seqlen"),
    "max-float": (lambda: _varlen_call(max_seqlen_q=4.0), TypeError, r"max_seqlen_q"),
    "max-float-tensor": (lambda: _varlen_call(max_seqlen_k=torch.tensor(5.0)), TypeError, r"max_seqlen_k"),
    "max-2-element-tensor": (lambda: _varlen_call(max_seqlen_q=torch.tensor([4, 4])), TypeError, r"max_seqlen_q"),
    "varlen-q-4d": (lambda: _varlen_call(q=torch.zeros(1, 7, 4, 16, dtype=torch.float16, device=DEVICE)),
                    ValueError, r"\bq\b"),
    "qkvpacked-cu-int64": (lambda: (lambda qkv=torch.zeros(7, 3, 2, 16, dtype=torch.float16, device=DEVICE):
                                    tileattn.flash_attn_varlen_qkvpacked_func(qkv, _cu([0, 3, 7], torch.int64), 4)),
                           TypeError, r"cu_seqlens"),
    "qkvpacked-cu-not-monotonic": (lambda: (lambda qkv=torch.zeros(7, 3, 2, 16, dtype=torch.float16, device=DEVICE):
                                            tileattn.flash_attn_varlen_qkvpacked_func(qkv, _cu([0, 5, 3, 7]), 4)),
                                   ValueError, r"cu_seqlens"),
    "qkvpacked-max-too-small": (lambda: (lambda qkv=torch.zeros(7, 3, 2, 16, dtype=torch.float16, device=DEVICE):
                                         tileattn.flash_attn_varlen_qkvpacked_func(qkv, _cu([0, 3, 7]), 3)),
                                ValueError, r"max_seqlen"),
}

BAD_FEATURES = {
    "window-left-lt-minus-1": (dict(window_size=(-2, 3)), ValueError, r"window_size"),
    "window-right-lt-minus-1": (dict(window_size=(4, -5)), ValueError, r"window_size"),
    "window-tensor-lt-minus-1": (dict(window_size=(torch.tensor(-3), 0)), ValueError, r"window_size"),
    "window-one-value": (dict(window_size=(3,)), TypeError, r"window_size"),
    "window-int": (dict(window_size=3), TypeError, r"window_size"),
    "window-float": (dict(window_size=(1.5, 2)), TypeError, r"window_size"),
    "window-float-tensor": (dict(window_size=(torch.tensor(1.0), 2)), TypeError, r"window_size"),
    "window-2-element-tensor": (dict(window_size=(torch.tensor([1, 2]), 2)), TypeError, r"window_size"),
    "softcap-negative": (dict(softcap=-1.0), ValueError, r"softcap"),
    "softcap-nan": (dict(softcap=float("nan")), ValueError, r"softcap"),
    "softcap-inf": (dict(softcap=float("inf")), ValueError, r"softcap"),
    "softcap-string": (dict(softcap="1"), TypeError, r"softcap"),
    "alibi-wrong-heads": (lambda: dict(alibi_slopes=torch.ones(3, device=DEVICE)), ValueError, r"alibi_slopes"),
    "alibi-kv-heads": (lambda: dict(alibi_slopes=torch.ones(2, device=DEVICE)), ValueError, r"alibi_slopes"),
    "alibi-wrong-batch": (lambda: dict(alibi_slopes=torch.ones(3, 4, device=DEVICE)), ValueError, r"alibi_slopes"),
    "alibi-3d": (lambda: dict(alibi_slopes=torch.ones(2, 4, 1, device=DEVICE)), ValueError, r"alibi_slopes"),
    "alibi-fp16": (lambda: dict(alibi_slopes=torch.ones(4, dtype=torch.float16, device=DEVICE)), TypeError,
                   r"alibi_slopes"),
    "alibi-fp64": (lambda: dict(alibi_slopes=torch.ones(2, 4, dtype=torch.float64, device=DEVICE)), TypeError,
                   r"alibi_slopes"),
    "alibi-list": (dict(alibi_slopes=[0.5, 0.25, 0.125, 0.0625]), TypeError, r"alibi_slopes"),
    "alibi-other-device": (lambda: dict(alibi_slopes=torch.ones(4, device=_OTHER_DEVICE)), ValueError,
                           r"alibi_slopes"),
    "sink-kv-heads": (lambda: dict(sink=torch.zeros(2, device=DEVICE)), ValueError, r"sink"),
    "sink-2d": (lambda: dict(sink=torch.zeros(1, 4, device=DEVICE)), ValueError, r"sink"),
    "sink-scalar": (lambda: dict(sink=torch.zeros((), device=DEVICE)), ValueError, r"sink"),
    "sink-int": (lambda: dict(sink=torch.zeros(4, dtype=torch.int32, device=DEVICE)), TypeError, r"sink"),
    "sink-list": (dict(sink=[0.0, 0.0, 0.0, 0.0]), TypeError, r"sink"),
    "sink-other-device": (lambda: dict(sink=torch.zeros(4, device=_OTHER_DEVICE)), ValueError, r"sink"),
    "dropout-one": (dict(dropout_p=1.0), ValueError, r"dropout_p"),
    "dropout-negative": (dict(dropout_p=-0.1), ValueError, r"dropout_p"),
    "dropout-above-one": (dict(dropout_p=1.5), ValueError, r"dropout_p"),
    "dropout-nan": (dict(dropout_p=float("nan")), ValueError, r"dropout_p"),
    "dropout-string": (dict(dropout_p="0.1"), TypeError, r"dropout_p"),
}

BAD_PACKED = {
    "qkv-2-not-3": (lambda: tileattn.flash_attn_qkvpacked_func(torch.zeros(1, 5, 2, 2, 16, dtype=torch.float16,
                                                                           device=DEVICE)), ValueError, r"qkv"),
    "qkv-4d": (lambda: tileattn.flash_attn_qkvpacked_func(torch.zeros(5, 3, 2, 16, dtype=torch.float16,
                                                                      device=DEVICE)), ValueError, r"qkv"),
    "qkv-not-tensor": (lambda: tileattn.flash_attn_qkvpacked_func([[0.0]]), TypeError, r"qkv"),
    "kv-3-not-2": (lambda: tileattn.flash_attn_kvpacked_func(
        torch.zeros(1, 5, 2, 16, dtype=torch.float16, device=DEVICE),
        torch.zeros(1, 5, 3, 2, 16, dtype=torch.float16, device=DEVICE)), ValueError, r"\bkv\b"),
    "varlen-qkv-5d": (lambda: tileattn.flash_attn_varlen_qkvpacked_func(
        torch.zeros(1, 5, 3, 2, 16, dtype=torch.float16, device=DEVICE), _cu([0, 5]), 5), ValueError, r"qkv"),
    "varlen-kv-3-not-2": (lambda: tileattn.flash_attn_varlen_kvpacked_func(
        torch.zeros(5, 2, 16, dtype=torch.float16, device=DEVICE),
        torch.zeros(5, 3, 2, 16, dtype=torch.float16, device=DEVICE), _cu([0, 5]), _cu([0, 5]), 5, 5),
        ValueError, r"\bkv\b"),
}


def _expect(call, exc, pattern, case):
    with pytest.raises((TypeError, ValueError)) as info:
        call()
    assert type(info.value) is exc, f"{case}: raised {type(info.value).__name__}: {info.value}; want {exc.__name__}"
    assert re.search(pattern, str(info.value)), f"{case}: message does not name the argument: {info.value}"


@pytest.mark.parametrize("case", list(BAD_VARLEN))
def test_bad_varlen_values(case):
    build, exc, pattern = BAD_VARLEN[case]
    _expect(build(), exc, pattern, case)


@pytest.mark.parametrize("entry", ["flash", "attention"])
@pytest.mark.parametrize("case", list(BAD_FEATURES))
def test_bad_feature_values(case, entry):
    kw, exc, pattern = BAD_FEATURES[case]
    kw = kw() if callable(kw) else kw
    _expect(_feature_call(entry, **kw), exc, pattern, case)


@pytest.mark.parametrize("case", ["window", "softcap", "alibi", "sink", "dropout"])
def test_bad_feature_values_varlen(case):
    """The varlen entry validates the features too (alibi (B, H) uses the number of sequences)."""
    kw = {
        "window": dict(window_size=(-4, -1)),
        "softcap": dict(softcap=-0.5),
        "alibi": dict(alibi_slopes=torch.ones(3, 4, device=DEVICE)),  # 2 sequences, not 3
        "sink": dict(sink=torch.zeros(2, device=DEVICE)),
        "dropout": dict(dropout_p=1.0),
    }[case]
    name = {"window": "window_size", "softcap": "softcap", "alibi": "alibi_slopes", "sink": "sink",
            "dropout": "dropout_p"}[case]
    _expect(_varlen_call(**kw), ValueError, name, case)


@pytest.mark.parametrize("case", list(BAD_PACKED))
def test_bad_packed_values(case):
    call, exc, pattern = BAD_PACKED[case]
    _expect(call, exc, pattern, case)


def test_valid_edge_values_accepted():
    """The boundary values themselves are valid: window (-1, -1) and (0, 0), softcap 0, dropout_p 0,
    alibi (B, H), max_seqlen equal to the longest sequence."""
    q, k, v = _small()
    tileattn.flash_attn_func(q, k, v, window_size=(0, 0), softcap=0.0, dropout_p=0.0,
                             alibi_slopes=torch.zeros(2, 4, device=DEVICE), sink=torch.zeros(4, device=DEVICE))
    qv, kv, vv, cu_q, cu_k = _varlen_small()
    tileattn.flash_attn_varlen_func(qv, kv, vv, cu_q, cu_k, 4, 5, window_size=(-1, -1))
