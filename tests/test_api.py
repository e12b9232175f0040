"""Public API of tileattn.attention: signature, return values, input validation, fp32 accuracy."""

import inspect
import math
import re

import numpy as np
import pytest
import torch

import tileattn
from _helpers import DEVICE, ON_GPU, make_qkv, randn, make_gen, run_reference, seed_for


def _t(shape, dtype=torch.float16, device=DEVICE, seed=0):
    return randn(shape, dtype, make_gen(seed), device=device) if dtype.is_floating_point else \
        torch.zeros(shape, dtype=dtype, device=device)


def _ok(B=1, Sq=5, Sk=7, Hq=2, Hkv=1, D=16, dtype=torch.float16):
    return _t((B, Sq, Hq, D), dtype, seed=1), _t((B, Sk, Hkv, D), dtype, seed=2), _t((B, Sk, Hkv, D), dtype, seed=3)


def _replace(which, value):
    q, k, v = _ok()
    args = {"q": q, "k": k, "v": v}
    args[which] = value
    return (args["q"], args["k"], args["v"]), {}


def _other_device():
    return "cpu" if ON_GPU else "meta"


# id -> (builder returning (args, kwargs), exception type, regex the message must match)
BAD_INPUTS = {
    "q-list": (lambda: _replace("q", [[1.0]]), TypeError, r"\bq\b"),
    "k-none": (lambda: _replace("k", None), TypeError, r"\bk\b"),
    "v-numpy": (lambda: _replace("v", np.zeros((1, 7, 1, 16), np.float16)), TypeError, r"\bv\b"),
    "q-3d": (lambda: _replace("q", _t((5, 2, 16))), ValueError, r"\bq\b"),
    "k-5d": (lambda: ((_ok()[0], _t((1, 1, 7, 1, 16)), _ok()[2]), {}), ValueError, r"\bk\b"),
    "v-2d": (lambda: _replace("v", _t((7, 16))), ValueError, r"\bv\b"),
    "batch-mismatch-k": (lambda: _replace("k", _t((2, 7, 1, 16))), ValueError, r"\bk\b"),
    "batch-mismatch-v": (lambda: _replace("v", _t((2, 7, 1, 16))), ValueError, r"\bv\b"),
    "head-dim-mismatch-k": (lambda: _replace("k", _t((1, 7, 1, 32))), ValueError, r"\bk\b"),
    # v's head dim may differ from q/k's (MLA-style), but must be in range too
    "head-dim-v-257": (lambda: _replace("v", _t((1, 7, 1, 257))), ValueError, r"\bv\b"),
    "head-dim-v-7": (lambda: _replace("v", _t((1, 7, 1, 7))), ValueError, r"\bv\b"),
    "hq-not-multiple": (lambda: ((_t((1, 5, 3, 16)), _t((1, 7, 2, 16)), _t((1, 7, 2, 16))), {}),
                        ValueError, r"\b(q|k)\b"),
    "kv-heads-differ": (lambda: ((_t((1, 5, 2, 16)), _t((1, 7, 2, 16)), _t((1, 7, 1, 16))), {}),
                        ValueError, r"\b(k|v)\b"),
    "head-dim-7": (lambda: (_ok(D=7), {}), ValueError, r"\b(q|head_dim)\b"),
    "head-dim-257": (lambda: (_ok(D=257), {}), ValueError, r"\b(q|head_dim)\b"),
    "head-dim-0": (lambda: (_ok(D=0), {}), ValueError, r"\b(q|head_dim)\b"),
    "dtype-float64": (lambda: (_ok(dtype=torch.float64), {}), TypeError, r"\bq\b"),
    "dtype-int32": (lambda: (_ok(dtype=torch.int32), {}), TypeError, r"\bq\b"),
    "dtype-bool": (lambda: (_ok(dtype=torch.bool), {}), TypeError, r"\bq\b"),
    "dtype-complex": (lambda: (_ok(dtype=torch.complex64), {}), TypeError, r"\bq\b"),
    "dtype-v-float64": (lambda: _replace("v", _t((1, 7, 1, 16), torch.float64)), TypeError, r"\bv\b"),
    "dtype-mixed-k-bf16": (lambda: _replace("k", _t((1, 7, 1, 16), torch.bfloat16)), TypeError, r"\bk\b"),
    "dtype-mixed-v-fp32": (lambda: _replace("v", _t((1, 7, 1, 16), torch.float32)), TypeError, r"\bv\b"),
    "device-mismatch-k": (lambda: _replace("k", _t((1, 7, 1, 16), device=_other_device())), ValueError,
                          r"\bk\b"),
    "device-mismatch-v": (lambda: _replace("v", _t((1, 7, 1, 16), device=_other_device())), ValueError,
                          r"\bv\b"),
    "kv-seqlen-differ": (lambda: _replace("v", _t((1, 6, 1, 16))), ValueError, r"\b(k|v)\b"),
    "scale-zero": (lambda: (_ok(), {"softmax_scale": 0.0}), ValueError, r"\bsoftmax_scale\b"),
    "scale-negative": (lambda: (_ok(), {"softmax_scale": -0.5}), ValueError, r"\bsoftmax_scale\b"),
    "scale-nan": (lambda: (_ok(), {"softmax_scale": float("nan")}), ValueError, r"\bsoftmax_scale\b"),
    "scale-inf": (lambda: (_ok(), {"softmax_scale": float("inf")}), ValueError, r"\bsoftmax_scale\b"),
    "scale-string": (lambda: (_ok(), {"softmax_scale": "0.5"}), TypeError, r"\bsoftmax_scale\b"),
    "scale-list": (lambda: (_ok(), {"softmax_scale": [0.5]}), TypeError, r"\bsoftmax_scale\b"),
    "causal-int": (lambda: (_ok(), {"causal": 1}), TypeError, r"\bcausal\b"),
    "causal-none": (lambda: (_ok(), {"causal": None}), TypeError, r"\bcausal\b"),
    "causal-string": (lambda: (_ok(), {"causal": "yes"}), TypeError, r"\bcausal\b"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS), ids=str)
def test_bad_inputs(case):
    build, exc, pattern = BAD_INPUTS[case]
    args, kwargs = build()
    with pytest.raises(exc) as info:
        tileattn.attention(*args, **kwargs)
    assert type(info.value) is exc, f"{case}: raised {type(info.value).__name__}, want exactly {exc.__name__}"
    assert re.search(pattern, str(info.value)), f"{case}: message does not name the argument: {info.value}"


def test_cpu_tensors_without_interpreter(monkeypatch):
    """CPU tensors are only accepted under the Triton interpreter."""
    if not ON_GPU:
        # Pretend the interpreter is off, whether the API reads the env / triton knobs at call time or
        # cached the flag at import (tileattn.api._INTERPRETING). The kernels are not reached.
        import tileattn.api as tileattn_api  # an alias: a bare `import tileattn.api` would make `tileattn` local

        monkeypatch.setenv("TRITON_INTERPRET", "0")
        monkeypatch.setattr(tileattn_api, "_INTERPRETING", False, raising=False)
    q, k, v = (t.cpu() for t in _ok())
    with pytest.raises(ValueError, match=r"\b(q|k|v)\b"):
        tileattn.attention(q, k, v)


def test_signature():
    """attention(q, k, v, *, causal=False, softmax_scale=None, return_lse=False, <optional extras>)."""
    sig = inspect.signature(tileattn.attention)
    params = list(sig.parameters.values())
    assert [p.name for p in params[:6]] == ["q", "k", "v", "causal", "softmax_scale", "return_lse"]
    for p in params[:3]:
        assert p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
    for p, default in zip(params[3:6], (False, None, False)):
        assert p.kind is p.KEYWORD_ONLY, f"{p.name} must be keyword-only"
        assert p.default is default, f"{p.name} default {p.default!r} != {default!r}"
    for p in params[6:]:  # later additions must not change the meaning of existing calls
        assert p.kind is p.KEYWORD_ONLY and p.default is not p.empty, f"extra parameter {p.name}"
    assert tileattn.attention.__doc__
    assert "attention" in tileattn.__all__


def test_positional_flags_rejected():
    q, k, v = _ok()
    with pytest.raises(TypeError):
        tileattn.attention(q, k, v, True)


def test_keyword_qkv():
    q, k, v = _ok()
    a = tileattn.attention(q=q, k=k, v=v)
    b = tileattn.attention(q, k, v)
    assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_return_lse(dtype):
    B, Sq, Sk, Hq, Hkv, D = 2, 17, 33, 4, 2, 24
    q, k, v = _ok(B, Sq, Sk, Hq, Hkv, D, dtype)
    out = tileattn.attention(q, k, v)
    assert isinstance(out, torch.Tensor)
    assert out.shape == (B, Sq, Hq, D) and out.dtype == dtype and out.device == q.device
    res = tileattn.attention(q, k, v, return_lse=True)
    assert isinstance(res, tuple) and len(res) == 2
    out2, lse = res
    assert torch.equal(out, out2)
    assert lse.shape == (B, Hq, Sq) and lse.dtype == torch.float32 and lse.device == q.device
    # natural log: lse == log(sum(exp(scale * q.k)))
    _, lse_ref, _ = run_reference(q, k, v, causal=False)
    assert torch.allclose(lse.double(), lse_ref, rtol=0, atol=1e-4 * max(1.0, lse_ref.abs().max().item()))


def test_default_softmax_scale():
    q, k, v = _ok(D=40)
    a = tileattn.attention(q, k, v)
    b = tileattn.attention(q, k, v, softmax_scale=1.0 / math.sqrt(40))
    assert torch.equal(a, b)


@pytest.mark.parametrize("scale", [1, np.float32(0.25), np.float64(0.5)], ids=["int", "np32", "np64"])
def test_softmax_scale_accepts_real_numbers(scale):
    q, k, v = _ok()
    a = tileattn.attention(q, k, v, softmax_scale=scale)
    b = tileattn.attention(q, k, v, softmax_scale=float(scale))
    assert torch.equal(a, b)


def test_causal_changes_result():
    q, k, v = _ok(Sq=9, Sk=9)
    a = tileattn.attention(q, k, v, causal=False)
    b = tileattn.attention(q, k, v, causal=True)
    assert torch.equal(a[:, -1], b[:, -1]), "last query sees every key in both modes"
    assert not torch.equal(a[:, 0], b[:, 0])


def test_inputs_not_modified():
    q, k, v, gen = make_qkv(2, 33, 47, 4, 2, 40, torch.float16, seed_for("nomod"), requires_grad=True)
    before = [t.detach().clone() for t in (q, k, v)]
    dout = randn(q.shape, torch.float16, gen)
    dout_before = dout.clone()
    out = tileattn.attention(q, k, v, causal=True)
    torch.autograd.grad(out, (q, k, v), dout)
    for name, t, b in zip("qkv", (q, k, v), before):
        assert torch.equal(t.detach(), b), f"{name} was modified"
    assert torch.equal(dout, dout_before), "dout was modified"


@pytest.mark.parametrize("causal", [False, True])
def test_fp32_near_exact(causal):
    """float32 inputs: within ~1e-5 (relative to the magnitude) of the float64 reference, out/lse/grads.

    A kernel that silently used TF32 (10-bit mantissa) for fp32 would be off by ~1e-3 here.
    """
    B, Sq, Sk, Hq, Hkv, D = (2, 1000, 1200, 4, 2, 128) if ON_GPU else (1, 63, 130, 2, 1, 64)
    q, k, v, gen = make_qkv(B, Sq, Sk, Hq, Hkv, D, torch.float32, seed_for("fp32", causal), requires_grad=True)
    dout = randn(q.shape, torch.float32, gen)
    out, lse = tileattn.attention(q, k, v, causal=causal, return_lse=True)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    out_ref, lse_ref, grads_ref = run_reference(q, k, v, causal=causal, dout=dout)
    finite = torch.isfinite(lse_ref)
    named = [("out", out, out_ref), ("lse", lse[finite], lse_ref[finite])]
    named += list(zip(("dq", "dk", "dv"), grads, grads_ref))
    for name, x, ref in named:
        scale = max(1.0, ref.abs().max().item())
        err = (x.double() - ref).abs().max().item()
        assert err <= 1e-5 * scale, f"fp32 {name}: max error {err:.3e} > 1e-5 * {scale:.3g}"


def test_sequence_too_long_for_int32_offsets():
    """A sequence spanning >= 2**31 elements is refused, not silently wrapped (meta tensors: no memory needed)."""
    from tileattn.api import check_int32_offsets
    big = torch.empty(1, 2 ** 20, 16, 128, device="meta")  # 2**31 elements in one sequence
    with pytest.raises(ValueError, match=r"\bk\b.*32-bit"):
        check_int32_offsets("k", big, big.shape[1])
    check_int32_offsets("k", big[:, : 2 ** 20 - 1], 2 ** 20 - 1)  # just under: accepted


def test_every_addressed_tensor_gets_the_int32_offset_check(monkeypatch):
    """dout (any strides, from autograd or from a caller of the shim's private functions) and the shim's q/k/v/out
    reach kernels that use 32-bit in-sequence offsets: each must pass check_int32_offsets (spied here: a 2**31
    span needs 4 GB, too much for a test)."""
    import tileattn.api as api
    from tileattn.compat.flash_attn import flash_attn_interface as fi
    seen = []
    real = api.check_int32_offsets

    def spy(name, t, seqlen):
        seen.append((name, tuple(t.shape), int(seqlen)))
        return real(name, t, seqlen)
    monkeypatch.setattr(api, "check_int32_offsets", spy)
    monkeypatch.setattr(fi, "check_int32_offsets", spy)
    monkeypatch.setattr(tileattn.flash_api, "check_int32_offsets", spy)
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 5, 2, 16, generator=gen).to(DEVICE).requires_grad_() for _ in range(3))
    out = tileattn.attention(q, k, v)
    seen.clear()
    out.backward(torch.randn(1, 5, 2, 16, generator=gen).to(DEVICE).transpose(1, 2).contiguous().transpose(1, 2))
    assert [s[0] for s in seen] == ["dout"] and seen[0][2] == 5
    qd, kd, vd = (t.detach() for t in (q, k, v))
    seen.clear()
    o, lse, _, rng = fi._flash_attn_forward(qd, kd, vd, 0.0, 0.25, False, -1, -1, 0.0, None, False)
    assert sorted(s[0] for s in seen) == ["k", "q", "v"]
    seen.clear()
    fi._flash_attn_backward(torch.ones_like(o), qd, kd, vd, o, lse, None, None, None, 0.0, 0.25, False, -1, -1, 0.0,
                            None, False)
    assert sorted(s[0] for s in seen) == ["dout", "k", "out", "q", "v"]
    # the paged varlen forward: q's rows (the pages themselves are addressed with 64-bit offsets)
    seen.clear()
    cu = torch.tensor([0, 5], dtype=torch.int32, device=DEVICE)
    table = torch.arange(2, dtype=torch.int32, device=DEVICE).view(1, 2)
    kc = torch.randn(2, 4, 2, 16, generator=gen).to(DEVICE)  # 2 pages of 4 keys
    vc = torch.randn(2, 4, 2, 16, generator=gen).to(DEVICE)
    tileattn.flash_attn_varlen_func(qd[0], kc, vc, cu, cu, 5, 5, block_table=table)
    assert [s[0] for s in seen] == ["q"] and seen[0][2] == 5


def test_getenv_follows_environment_changes(monkeypatch):
    """configs.getenv (the per-call knob reader) sees setenv / delenv like os.environ.get does."""
    from tileattn import configs
    monkeypatch.delenv("TILEATTN_TEST_KNOB", raising=False)
    assert configs.getenv("TILEATTN_TEST_KNOB") is None and configs.getenv("TILEATTN_TEST_KNOB", "d") == "d"
    monkeypatch.setenv("TILEATTN_TEST_KNOB", "1")
    assert configs.getenv("TILEATTN_TEST_KNOB") == "1"
    import os
    os.environ["TILEATTN_TEST_KNOB"] = "é2"
    assert configs.getenv("TILEATTN_TEST_KNOB") == os.environ.get("TILEATTN_TEST_KNOB") == "é2"
    monkeypatch.delenv("TILEATTN_TEST_KNOB")
    assert configs.getenv("TILEATTN_TEST_KNOB", "") == ""


def test_getenv_without_the_bytes_dict(monkeypatch):
    """Where os.environ has no bytes dict to read (non-POSIX), configs.getenv is os.environ.get."""
    from tileattn import configs
    monkeypatch.setattr(configs, "_ENV_DATA", None)
    monkeypatch.setenv("TILEATTN_TEST_KNOB", "3")
    assert configs.getenv("TILEATTN_TEST_KNOB") == "3" and configs.getenv("TILEATTN_TEST_KNOB_UNSET", "x") == "x"
