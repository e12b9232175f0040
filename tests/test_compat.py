"""tileattn.compat: the drop-in flash-attn 2.8 shim.

install()/uninstall() and the refusal to shadow a real flash-attn; code written against flash-attn's API
(a BERT-style unpad -> varlen-qkvpacked -> pad block, a GPT-style rotary + causal GQA block) against plain
PyTorch references in float64, forward and backward; the private _flash_attn_* functions against the public
ones and the reference; bert_padding round trips; rotary embeddings against the direct formula.

Inputs are fp32 with small shapes, so the same tests run on CPU (Triton interpreter) and on a GPU. fp32
comparisons use ``max|ours - ref| <= TOL * max|ref|`` with TOL = 1e-5 (the kernels' fp32 path is ~2**-17).
"""

import importlib
import importlib.machinery
import importlib.util
import inspect
import math
import os
import sys
import types

import pytest
import torch

import tileattn
import tileattn.compat as compat
from tileattn.reference import attention_ref
from _helpers import DEVICE, make_gen, randn

TOL = 1e-5
F32 = torch.float32


# ------------------------------------------------------------------------------------------------ helpers
def assert_close(name, ours, ref, tol=TOL):
    assert tuple(ours.shape) == tuple(ref.shape), f"{name}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    empty = torch.isneginf(ref)  # lse of a row that sees no key
    assert torch.equal(torch.isneginf(ours), empty), f"{name}: -inf pattern differs from the reference"
    ours, ref = ours[~empty], ref[~empty]
    assert torch.isfinite(ours).all(), f"{name}: non-finite values"
    if ours.numel() == 0:
        return
    err = (ours.double() - ref.double()).abs().max().item()
    bound = tol * max(ref.double().abs().max().item(), 1e-6)
    assert err <= bound, f"{name}: max|ours - ref| = {err:.3e} > {bound:.3e}"


def _t(shape, gen, scale=1.0, dtype=F32, requires_grad=False):
    x = randn(shape, dtype, gen, scale=scale)
    return x.requires_grad_(requires_grad)


def _patch_find_spec(monkeypatch, spec_for_flash_attn):
    original = importlib.util.find_spec

    def find_spec(name, package=None):
        if name == "flash_attn":
            return spec_for_flash_attn
        return original(name, package)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


def _fake_real_spec():
    return importlib.machinery.ModuleSpec("flash_attn", None,
                                          origin="/opt/site-packages/flash_attn/__init__.py")


@pytest.fixture
def clean():
    """No flash_attn alias before or after the test (sys.modules restored)."""
    other = sys.modules.get("flash_attn")
    if other is not None and not compat.is_installed():
        pytest.skip("a real flash_attn is already imported in this process")
    compat.uninstall()
    yield
    compat.uninstall()
    for alias in compat.ALIASES:
        assert alias not in sys.modules, f"{alias} left in sys.modules"


@pytest.fixture
def fa(clean, monkeypatch):
    """The shim installed as `flash_attn` (as if no real flash-attn were present, whatever this machine has)."""
    _patch_find_spec(monkeypatch, None)
    return compat.install()


# ------------------------------------------------------------------------------------------ install / import
def test_install_aliases_and_imports(fa):
    import flash_attn
    from flash_attn import (flash_attn_func, flash_attn_kvpacked_func, flash_attn_qkvpacked_func,  # noqa: F401
                            flash_attn_varlen_func, flash_attn_varlen_kvpacked_func,
                            flash_attn_varlen_qkvpacked_func, flash_attn_with_kvcache)
    from flash_attn.bert_padding import index_first_axis, index_put_first_axis, pad_input, unpad_input  # noqa
    from flash_attn.flash_attn_interface import (_flash_attn_backward, _flash_attn_forward,  # noqa: F401
                                                 _flash_attn_varlen_backward, _flash_attn_varlen_forward,
                                                 _wrapped_flash_attn_forward)
    from flash_attn.layers.rotary import RotaryEmbedding, apply_rotary_emb  # noqa: F401
    import flash_attn.flash_attn_interface as fai
    import flash_attn.layers.rotary as rotary

    assert flash_attn is fa is sys.modules["tileattn.compat.flash_attn"]
    assert flash_attn.__version__ == "2.8.3+tileattn"
    assert flash_attn_func is tileattn.flash_api.flash_attn_func is fai.flash_attn_func
    assert rotary is sys.modules["tileattn.compat.flash_attn.layers.rotary"]
    assert importlib.import_module("flash_attn.bert_padding") is sys.modules["flash_attn.bert_padding"]
    assert compat.is_installed()
    assert compat.install() is fa  # idempotent
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("flash_attn.modules.mha")  # not provided: a clear import error


_PRIVATE_SIGNATURES = {  # flash-attn 2.8's flash_attn_interface, parameter names and defaults
    "_flash_attn_forward": "q, k, v, dropout_p, softmax_scale, causal, window_size_left, window_size_right, "
                           "softcap, alibi_slopes, return_softmax",
    "_flash_attn_varlen_forward": "q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, "
                                  "softmax_scale, causal, window_size_left=-1, window_size_right=-1, softcap=0.0, "
                                  "alibi_slopes=None, return_softmax=False, block_table=None, leftpad_k=None, "
                                  "seqused_k=None, zero_tensors=False",
    "_flash_attn_backward": "dout, q, k, v, out, softmax_lse, dq, dk, dv, dropout_p, softmax_scale, causal, "
                            "window_size_left, window_size_right, softcap, alibi_slopes, deterministic, "
                            "rng_state=None",
    "_flash_attn_varlen_backward": "dout, q, k, v, out, softmax_lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k, "
                                   "max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal, "
                                   "window_size_left, window_size_right, softcap, alibi_slopes, deterministic, "
                                   "rng_state=None, zero_tensors=False",
}


@pytest.mark.parametrize("name", list(_PRIVATE_SIGNATURES))
def test_private_signatures(name):
    from tileattn.compat.flash_attn import flash_attn_interface as fai

    params = inspect.signature(getattr(fai, name)).parameters.values()
    got = ", ".join(p.name if p.default is inspect.Parameter.empty else f"{p.name}={p.default!r}" for p in params)
    assert got == _PRIVATE_SIGNATURES[name]


def test_public_signatures():
    from tileattn.compat import flash_attn as shim

    common = ["dropout_p", "softmax_scale", "causal", "window_size", "softcap", "alibi_slopes", "deterministic",
              "return_attn_probs"]
    expected = {
        "flash_attn_func": ["q", "k", "v"] + common,
        "flash_attn_qkvpacked_func": ["qkv"] + common,
        "flash_attn_kvpacked_func": ["q", "kv"] + common,
        "flash_attn_varlen_func": ["q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k"]
        + common + ["block_table"],
        "flash_attn_varlen_qkvpacked_func": ["qkv", "cu_seqlens", "max_seqlen"] + common,
        "flash_attn_varlen_kvpacked_func": ["q", "kv", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q",
                                            "max_seqlen_k"] + common,
    }
    for name, names in expected.items():
        params = [p for p in inspect.signature(getattr(shim, name)).parameters.values()
                  if p.kind is not inspect.Parameter.KEYWORD_ONLY]
        assert [p.name for p in params] == names, name


def test_install_refuses_to_shadow_real_flash_attn(clean, monkeypatch):
    _patch_find_spec(monkeypatch, _fake_real_spec())
    with pytest.raises(RuntimeError, match=r"flash-attn.*force=True"):
        compat.install()
    assert "flash_attn" not in sys.modules and not compat.is_installed()

    shim = compat.install(force=True)
    import flash_attn

    assert flash_attn is shim and compat.is_installed()
    assert compat.install() is shim  # already installed: idempotent, no second refusal
    assert compat.uninstall() is True
    assert "flash_attn" not in sys.modules and "flash_attn.bert_padding" not in sys.modules
    assert compat.uninstall() is False


def test_install_refuses_already_imported_flash_attn(clean, monkeypatch):
    real = types.ModuleType("flash_attn")
    real.__file__ = "/opt/site-packages/flash_attn/__init__.py"
    monkeypatch.setitem(sys.modules, "flash_attn", real)
    with pytest.raises(RuntimeError, match="already imported"):
        compat.install()
    assert sys.modules["flash_attn"] is real
    compat.install(force=True)
    assert sys.modules["flash_attn"] is not real and compat.is_installed()
    compat.uninstall()
    assert sys.modules["flash_attn"] is real  # the previous entry comes back
    monkeypatch.delitem(sys.modules, "flash_attn")


def test_install_ignores_own_shim_on_path(clean, monkeypatch):
    shim_dir = os.path.join(os.path.dirname(compat.__file__), "flash_attn")
    spec = importlib.machinery.ModuleSpec("flash_attn", None, origin=os.path.join(shim_dir, "__init__.py"))
    _patch_find_spec(monkeypatch, spec)
    assert compat.install() is sys.modules["flash_attn"]


# ------------------------------------------------------------------------------- models written for flash-attn
class TinyBertAttention(torch.nn.Module):
    """BERT-style self-attention as flash-attn users write it: unpad -> varlen qkvpacked -> pad."""

    def __init__(self, dim, heads, gen):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.wqkv = torch.nn.Parameter(randn((dim, 3 * dim), F32, gen, scale=dim ** -0.5))
        self.bqkv = torch.nn.Parameter(randn((3 * dim,), F32, gen, scale=0.1))
        self.wo = torch.nn.Parameter(randn((dim, dim), F32, gen, scale=dim ** -0.5))

    def forward(self, hidden_states, attention_mask):
        from flash_attn import flash_attn_varlen_qkvpacked_func
        from flash_attn.bert_padding import pad_input, unpad_input

        batch, seqlen, _ = hidden_states.shape
        qkv = (hidden_states @ self.wqkv + self.bqkv).view(batch, seqlen, 3, self.heads, self.head_dim)
        qkv_unpad, indices, cu_seqlens, max_seqlen, _ = unpad_input(qkv, attention_mask)
        out = flash_attn_varlen_qkvpacked_func(qkv_unpad, cu_seqlens, max_seqlen, dropout_p=0.0, causal=False)
        out = pad_input(out.reshape(out.shape[0], -1), indices, batch, seqlen)
        return out @ self.wo


def bert_reference(params, x, mask, heads):
    """Plain PyTorch with masks (float64): padded keys masked out, padded query rows zero."""
    wqkv, bqkv, wo = params
    batch, seqlen, dim = x.shape
    head_dim = dim // heads
    q, k, v = (x @ wqkv + bqkv).view(batch, seqlen, 3, heads, head_dim).unbind(2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(head_dim)
    keys = mask.bool()[:, None, None, :]
    probs = torch.softmax(scores.masked_fill(~keys, -1e30), dim=-1) * keys  # all-padded rows stay finite
    out = torch.einsum("bhqk,bkhd->bqhd", probs, v) * mask[:, :, None, None]
    return out.reshape(batch, seqlen, dim) @ wo


def test_bert_block_unpad_varlen_pad(fa):
    gen = make_gen(11)
    batch, seqlen, dim, heads = 4, 9, 32, 2
    lengths = torch.tensor([9, 4, 0, 6])
    mask = (torch.arange(seqlen)[None, :] < lengths[:, None]).to(DEVICE)
    model = TinyBertAttention(dim, heads, gen).to(DEVICE)
    x = _t((batch, seqlen, dim), gen, requires_grad=True)
    dout = _t((batch, seqlen, dim), gen)

    out = model(x, mask)
    grads = torch.autograd.grad(out, (x, *model.parameters()), dout)

    ref_leaves = [t.detach().double().requires_grad_() for t in (x, *model.parameters())]
    ref = bert_reference(ref_leaves[1:], ref_leaves[0], mask.double(), heads)
    ref_grads = torch.autograd.grad(ref, ref_leaves, dout.double())

    assert_close("out", out, ref)
    assert (out[~mask] == 0).all()
    for name, g, r in zip(("dx", "dwqkv", "dbqkv", "dwo"), grads, ref_grads):
        assert_close(name, g, r)


class TinyGPTAttention(torch.nn.Module):
    """GPT-style causal GQA with rotary embeddings, written against flash-attn's API."""

    def __init__(self, dim, heads, kv_heads, rotary_dim, interleaved, gen):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.interleaved = interleaved
        self.wq = torch.nn.Parameter(randn((dim, dim), F32, gen, scale=dim ** -0.5))
        self.wkv = torch.nn.Parameter(randn((dim, 2 * kv_heads * self.head_dim), F32, gen, scale=dim ** -0.5))
        self.wo = torch.nn.Parameter(randn((dim, dim), F32, gen, scale=dim ** -0.5))
        inv_freq = 1.0 / 10000 ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)
        angles = torch.outer(torch.arange(64, dtype=torch.float64), inv_freq)
        self.register_buffer("cos", angles.cos().to(F32))
        self.register_buffer("sin", angles.sin().to(F32))

    def forward(self, x, seqlen_offset=0):
        from flash_attn import flash_attn_func
        from flash_attn.layers.rotary import apply_rotary_emb

        batch, seqlen, _ = x.shape
        q = (x @ self.wq).view(batch, seqlen, self.heads, self.head_dim)
        k, v = (x @ self.wkv).view(batch, seqlen, 2, self.kv_heads, self.head_dim).unbind(2)
        q = apply_rotary_emb(q, self.cos, self.sin, interleaved=self.interleaved, seqlen_offsets=seqlen_offset)
        k = apply_rotary_emb(k, self.cos, self.sin, interleaved=self.interleaved, seqlen_offsets=seqlen_offset)
        out = flash_attn_func(q, k, v, causal=True)
        return out.reshape(batch, seqlen, -1) @ self.wo


def rope_direct(x, cos, sin, positions, interleaved):
    """x (N, heads, head_dim), positions (N,): rotate pair i by the angle of row positions[n] of cos/sin."""
    out = x.clone()
    r = cos.shape[1]
    for i in range(r):
        a, b = (2 * i, 2 * i + 1) if interleaved else (i, i + r)
        c, s = cos[positions, i][:, None], sin[positions, i][:, None]
        out[..., a] = x[..., a] * c - x[..., b] * s
        out[..., b] = x[..., b] * c + x[..., a] * s
    return out


def gpt_reference(params, x, cos, sin, model, seqlen_offset):
    wq, wkv, wo = params
    batch, seqlen, _ = x.shape
    q = (x @ wq).view(batch, seqlen, model.heads, model.head_dim)
    k, v = (x @ wkv).view(batch, seqlen, 2, model.kv_heads, model.head_dim).unbind(2)
    pos = (torch.arange(seqlen, device=x.device) + seqlen_offset).repeat(batch)
    q, k = (rope_direct(t.reshape(batch * seqlen, *t.shape[2:]), cos, sin, pos, model.interleaved).view(t.shape)
            for t in (q, k))
    out, _ = attention_ref(q, k, v, causal=True)
    return out.reshape(batch, seqlen, -1) @ wo


@pytest.mark.parametrize("interleaved", [False, True], ids=["neox", "gptj"])
def test_gpt_block_rotary_causal(fa, interleaved):
    gen = make_gen(21 + interleaved)
    batch, seqlen, dim, heads, kv_heads = 2, 11, 64, 4, 2
    model = TinyGPTAttention(dim, heads, kv_heads, rotary_dim=8, interleaved=interleaved, gen=gen).to(DEVICE)
    x = _t((batch, seqlen, dim), gen, requires_grad=True)
    dout = _t((batch, seqlen, dim), gen)

    out = model(x, seqlen_offset=3)
    grads = torch.autograd.grad(out, (x, *model.parameters()), dout)

    leaves = [t.detach().double().requires_grad_() for t in (x, *model.parameters())]
    ref = gpt_reference(leaves[1:], leaves[0], model.cos.double(), model.sin.double(), model, 3)
    ref_grads = torch.autograd.grad(ref, leaves, dout.double())

    assert_close("out", out, ref)
    for name, g, r in zip(("dx", "dwq", "dwkv", "dwo"), grads, ref_grads):
        assert_close(name, g, r)


# ------------------------------------------------------------------------------- private vs public functions
_CASES = {  # name -> (Hq, Hkv, Sq, Sk, causal, window, softcap, alibi)
    "plain": (2, 2, 7, 7, False, (-1, -1), 0.0, False),
    "causal-gqa": (4, 2, 5, 9, True, (-1, -1), 0.0, False),
    "window-softcap": (2, 1, 9, 9, False, (3, 2), 5.0, False),
    "alibi-causal-window": (2, 2, 8, 6, True, (4, 7), 0.0, True),
}


def _case_inputs(case, seed):
    hq, hkv, sq, sk, causal, window, softcap, alibi = _CASES[case]
    gen = make_gen(seed)
    batch, d = 2, 16
    q = _t((batch, sq, hq, d), gen, requires_grad=True)
    k = _t((batch, sk, hkv, d), gen, requires_grad=True)
    v = _t((batch, sk, hkv, d), gen, requires_grad=True)
    dout = _t((batch, sq, hq, d), gen)
    slopes = (torch.rand(hq, generator=gen) * 0.5).to(DEVICE) if alibi else None
    return q, k, v, dout, dict(causal=causal, window=window, softcap=softcap, alibi_slopes=slopes)


@pytest.mark.parametrize("case", list(_CASES))
def test_private_forward_backward_match_public(fa, case):
    from flash_attn import flash_attn_func
    from flash_attn.flash_attn_interface import _flash_attn_backward, _flash_attn_forward

    q, k, v, dout, f = _case_inputs(case, seed=31 + len(case))
    scale = 0.3
    out_pub, lse_pub, _ = flash_attn_func(q, k, v, softmax_scale=scale, causal=f["causal"], window_size=f["window"],
                                          softcap=f["softcap"], alibi_slopes=f["alibi_slopes"],
                                          return_attn_probs=True)
    grads_pub = torch.autograd.grad(out_pub, (q, k, v), dout)

    out, lse, s_dmask, rng_state = _flash_attn_forward(q, k, v, 0.0, scale, f["causal"], f["window"][0],
                                                       f["window"][1], f["softcap"], f["alibi_slopes"], False)
    assert not out.requires_grad and out.dtype == q.dtype and lse.dtype == F32
    assert lse.shape == (q.shape[0], q.shape[2], q.shape[1])
    assert s_dmask.numel() == 0 and s_dmask.dtype == q.dtype
    assert rng_state.dtype == torch.int64 and rng_state.shape == (2,) and not rng_state.any()
    assert_close("out", out, out_pub.detach(), tol=1e-6)
    assert_close("lse", lse, lse_pub.detach(), tol=1e-6)

    # dq, dk, dv are written in place (prefilled with NaN so an unwritten element shows)
    bufs = [torch.full_like(t, float("nan")) for t in (q, k, v)]
    softmax_d = _flash_attn_backward(dout, q, k, v, out, lse, *bufs, 0.0, scale, f["causal"], f["window"][0],
                                     f["window"][1], f["softcap"], f["alibi_slopes"], False, rng_state=rng_state)
    for name, buf, g in zip(("dq", "dk", "dv"), bufs, grads_pub):
        assert_close(name, buf, g, tol=1e-6)
    assert softmax_d.dtype == F32 and softmax_d.shape == lse.shape
    assert_close("softmax_d", softmax_d, (dout.double() * out.double()).sum(-1).transpose(1, 2), tol=1e-6)

    # and both against the float64 reference
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    slopes = f["alibi_slopes"]
    out_ref, lse_ref = attention_ref(*leaves, causal=f["causal"], softmax_scale=scale, window_size=f["window"],
                                     softcap=f["softcap"], alibi_slopes=slopes)
    grads_ref = torch.autograd.grad(out_ref, leaves, dout.double())
    assert_close("out vs ref", out, out_ref)
    assert_close("lse vs ref", lse, lse_ref)
    for name, buf, r in zip(("dq", "dk", "dv"), bufs, grads_ref):
        assert_close(f"{name} vs ref", buf, r)

    # any of dq, dk, dv may be None
    dk_only = torch.zeros_like(k)
    _flash_attn_backward(dout, q, k, v, out, lse, None, dk_only, None, 0.0, scale, f["causal"], f["window"][0],
                         f["window"][1], f["softcap"], f["alibi_slopes"], True)
    assert torch.equal(dk_only, bufs[1])


def test_private_backward_reads_strided_out_and_dout(fa):
    """out and dout as views with padded rows (last dim contiguous, other strides not): the dQ kernel reads O and
    dO through their own strides for delta, so the gradients equal those of contiguous copies."""
    from flash_attn.flash_attn_interface import _flash_attn_backward, _flash_attn_forward

    q, k, v, dout, f = _case_inputs("causal-gqa", seed=57)
    qd, kd, vd = (t.detach() for t in (q, k, v))
    out, lse, _, rng_state = _flash_attn_forward(qd, kd, vd, 0.0, 0.3, True, -1, 0, 0.0, None, False)

    def padded(t, extra):  # same values, every row padded: strides (.., H * (D + extra), D + extra, 1)
        big = torch.full(t.shape[:-1] + (t.shape[-1] + extra,), float("nan"), dtype=t.dtype, device=t.device)
        big[..., : t.shape[-1]] = t
        return big[..., : t.shape[-1]]
    out_s, dout_s = padded(out, 3), padded(dout, 5)  # different paddings: a mixed-up stride shows
    assert not out_s.is_contiguous() and out_s.stride(-1) == 1
    grads = []
    for o, g in ((out, dout), (out_s, dout_s)):
        bufs = [torch.full_like(t, float("nan")) for t in (qd, kd, vd)]
        _flash_attn_backward(g, qd, kd, vd, o, lse, *bufs, 0.0, 0.3, True, -1, 0, 0.0, None, False,
                             rng_state=rng_state)
        grads.append(bufs)
    for name, a, b in zip(("dq", "dk", "dv"), *grads):
        assert torch.equal(a, b), f"{name} differs with strided out/dout"


def test_private_varlen_match_public(fa):
    from flash_attn import flash_attn_varlen_func
    from flash_attn.flash_attn_interface import _flash_attn_varlen_backward, _flash_attn_varlen_forward

    gen = make_gen(41)
    cu_q = torch.tensor([0, 3, 8, 8, 12], dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([0, 5, 9, 11, 17], dtype=torch.int32, device=DEVICE)
    total_q, total_k, hq, hkv, d = 14, 17, 4, 2, 16  # q rows 12, 13 lie outside every sequence
    q = _t((total_q, hq, d), gen, requires_grad=True)
    k = _t((total_k, hkv, d), gen, requires_grad=True)
    v = _t((total_k, hkv, d), gen, requires_grad=True)
    dout = _t((total_q, hq, d), gen)
    dout[12:] = 0
    args = (cu_q, cu_k, 5, 6)

    out_pub, lse_pub, _ = flash_attn_varlen_func(q, k, v, *args, causal=True, return_attn_probs=True)
    grads_pub = torch.autograd.grad(out_pub[:12], (q, k, v), dout[:12])

    out, lse, s_dmask, rng_state = _flash_attn_varlen_forward(q, k, v, *args, 0.0, None, True, zero_tensors=True)
    assert lse.shape == (hq, total_q) and lse.dtype == F32 and s_dmask.numel() == 0
    assert_close("out", out[:12], out_pub[:12].detach(), tol=1e-6)
    assert_close("lse", lse[:, :12], lse_pub[:, :12].detach(), tol=1e-6)
    assert (out[12:] == 0).all() and torch.isneginf(lse[:, 12:]).all()  # zero_tensors

    bufs = [torch.full_like(t, float("nan")) for t in (q, k, v)]
    softmax_d = _flash_attn_varlen_backward(dout, q, k, v, out, lse, *bufs, *args, 0.0, q.shape[-1] ** -0.5, True,
                                            -1, -1, 0.0, None, False, rng_state)
    for name, buf, g in zip(("dq", "dk", "dv"), bufs, grads_pub):
        assert_close(name, buf, g, tol=1e-6)
    assert softmax_d.shape == (hq, total_q) and softmax_d.dtype == F32
    assert_close("softmax_d", softmax_d, (dout.double() * out.double()).sum(-1).t(), tol=1e-6)

    # against the float64 reference, sequence by sequence
    for b in range(4):
        (qs, qe), (ks, ke) = cu_q[b:b + 2].tolist(), cu_k[b:b + 2].tolist()
        leaves = [t[s:e].detach().double()[None].requires_grad_() for t, s, e in ((q, qs, qe), (k, ks, ke),
                                                                                  (v, ks, ke))]
        out_ref, lse_ref = attention_ref(*leaves, causal=True)
        grads_ref = torch.autograd.grad(out_ref, leaves, dout[qs:qe].double()[None])
        assert_close(f"out[{b}]", out[qs:qe], out_ref[0])
        assert_close(f"lse[{b}]", lse[:, qs:qe], lse_ref[0])
        for name, buf, r, (s, e) in zip(("dq", "dk", "dv"), bufs, grads_ref, ((qs, qe), (ks, ke), (ks, ke))):
            assert_close(f"{name}[{b}]", buf[s:e], r[0])


def test_private_dropout_rng_state(fa):
    from flash_attn.flash_attn_interface import _flash_attn_backward, _flash_attn_forward

    gen = make_gen(51)
    q = _t((2, 6, 2, 16), gen)
    k = _t((2, 10, 2, 16), gen)
    v = _t((2, 10, 2, 16), gen)
    dout = _t((2, 6, 2, 16), gen)
    p = 0.25
    out, lse, s_dmask, rng_state = _flash_attn_forward(q, k, v, p, 0.25, False, -1, -1, 0.0, None, True)
    assert rng_state.dtype == torch.int64 and rng_state.shape == (2,)
    assert s_dmask.dtype == torch.bool and s_dmask.shape == (2, 2, 6, 10)
    assert 0 < s_dmask.float().mean().item() < 1

    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    out_ref, lse_ref = attention_ref(*leaves, softmax_scale=0.25, dropout_mask=s_dmask, dropout_p=p)
    grads_ref = torch.autograd.grad(out_ref, leaves, dout.double())
    assert_close("out", out, out_ref)
    assert_close("lse", lse, lse_ref)

    bufs = [torch.empty_like(t) for t in (q, k, v)]
    _flash_attn_backward(dout, q, k, v, out, lse, *bufs, p, 0.25, False, -1, -1, 0.0, None, False, rng_state)
    for name, buf, r in zip(("dq", "dk", "dv"), bufs, grads_ref):
        assert_close(name, buf, r)

    with pytest.raises(ValueError, match="rng_state"):
        _flash_attn_backward(dout, q, k, v, out, lse, *bufs, p, 0.25, False, -1, -1, 0.0, None, False)


def _bad_private_calls():
    from tileattn.compat.flash_attn import flash_attn_interface as fai

    gen = make_gen(61)
    q, k, v = _t((1, 4, 2, 16), gen), _t((1, 4, 2, 16), gen), _t((1, 4, 2, 16), gen)
    out, lse, _, _ = fai._flash_attn_forward(q, k, v, 0.0, None, False, -1, -1, 0.0, None, False)
    cu = torch.tensor([0, 4], dtype=torch.int32, device=DEVICE)
    fwd, bwd = fai._flash_attn_forward, fai._flash_attn_backward
    bwd_args = lambda **kw: {**dict(dout=out, q=q, k=k, v=v, out=out, softmax_lse=lse, dq=None, dk=None,  # noqa
                                    dv=None, dropout_p=0.0, softmax_scale=None, causal=False, window_size_left=-1,
                                    window_size_right=-1, softcap=0.0, alibi_slopes=None, deterministic=False), **kw}
    return {
        "q-3d": (lambda: fwd(q[0], k, v, 0.0, None, False, -1, -1, 0.0, None, False), ValueError),
        "causal-int": (lambda: fwd(q, k, v, 0.0, None, 1, -1, -1, 0.0, None, False), TypeError),
        "window-below-minus-one": (lambda: fwd(q, k, v, 0.0, None, False, -2, -1, 0.0, None, False), ValueError),
        "dropout-one": (lambda: fwd(q, k, v, 1.0, None, False, -1, -1, 0.0, None, False), ValueError),
        "varlen-block-table-not-paged": (lambda: fai._flash_attn_varlen_forward(
            q[0], k[0], v[0], cu, cu, 4, 4, 0.0, None, False, block_table=cu), ValueError),
        "varlen-block-table-dropout": (lambda: fai._flash_attn_varlen_forward(
            q[0], k, v, cu, cu, 4, 4, 0.1, None, False, block_table=cu[None, :1]), NotImplementedError),
        "varlen-max-seqlen-too-small": (lambda: fai._flash_attn_varlen_forward(
            q[0], k[0], v[0], cu, cu, 3, 4, 0.0, None, False), ValueError),
        "varlen-cu-int64": (lambda: fai._flash_attn_varlen_forward(
            q[0], k[0], v[0], cu.long(), cu, 4, 4, 0.0, None, False), TypeError),
        "bwd-lse-shape": (lambda: bwd(**bwd_args(softmax_lse=lse[0])), ValueError),
        "bwd-lse-dtype": (lambda: bwd(**bwd_args(softmax_lse=lse.double())), TypeError),
        "bwd-dq-shape": (lambda: bwd(**bwd_args(dq=torch.empty_like(q[:, :2]))), ValueError),
        "bwd-dout-shape": (lambda: bwd(**bwd_args(dout=out[:, :3])), ValueError),
    }


@pytest.mark.parametrize("case", ["q-3d", "causal-int", "window-below-minus-one", "dropout-one",
                                  "varlen-block-table-not-paged", "varlen-block-table-dropout",
                                  "varlen-max-seqlen-too-small", "varlen-cu-int64",
                                  "bwd-lse-shape", "bwd-lse-dtype", "bwd-dq-shape", "bwd-dout-shape"])
def test_private_bad_inputs(case):
    call, exc = _bad_private_calls()[case]
    with pytest.raises(exc):
        call()


# ------------------------------------------------------------------------------------------- bert_padding
def test_unpad_pad_round_trip():
    from tileattn.compat.flash_attn.bert_padding import pad_input, unpad_input

    gen = make_gen(71)
    batch, seqlen = 4, 6
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0], [1, 0, 1, 1, 0, 1], [1, 1, 1, 1, 1, 1]],
                        dtype=torch.int32, device=DEVICE)
    x = _t((batch, seqlen, 3, 5), gen, requires_grad=True)
    x_unpad, indices, cu_seqlens, max_seqlen, seqused = unpad_input(x, mask)

    keep = mask.bool()
    assert torch.equal(x_unpad, x[keep])
    assert indices.dtype == torch.int64 and torch.equal(indices, keep.flatten().nonzero().flatten())
    assert cu_seqlens.dtype == torch.int32 and cu_seqlens.tolist() == [0, 3, 3, 7, 13]
    assert isinstance(max_seqlen, int) and max_seqlen == 6
    assert seqused.dtype == torch.int32 and seqused.tolist() == [3, 0, 4, 6]

    y = pad_input(x_unpad * 2, indices, batch, seqlen)
    assert y.shape == x.shape
    assert torch.equal(y, 2 * x * keep[:, :, None, None])
    w = _t(x.shape, gen)
    (gx,) = torch.autograd.grad((y * w).sum(), x)
    assert torch.equal(gx, 2 * w * keep[:, :, None, None])


def test_unpad_unused_mask():
    from tileattn.compat.flash_attn.bert_padding import pad_input, unpad_input

    x = torch.arange(2 * 5, dtype=F32, device=DEVICE).view(2, 5, 1)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 0, 0]], device=DEVICE, dtype=torch.bool)
    unused = torch.tensor([[0, 0, 1, 1, 0], [0, 0, 0, 0, 1]], device=DEVICE, dtype=torch.bool)
    x_unpad, indices, cu_seqlens, max_seqlen, seqused = unpad_input(x, mask, unused)
    assert x_unpad.flatten().tolist() == [0, 1, 2, 3, 5, 6, 7, 9]
    assert cu_seqlens.tolist() == [0, 4, 8] and max_seqlen == 4 and seqused.tolist() == [2, 3]
    assert torch.equal(pad_input(x_unpad, indices, 2, 5), x * (mask | unused)[..., None])


def test_index_first_axis_gradcheck():
    from tileattn.compat.flash_attn.bert_padding import index_first_axis, index_put_first_axis

    gen = make_gen(81)
    x = randn((7, 3), torch.float64, gen).requires_grad_()
    idx = torch.tensor([5, 0, 2, 6], device=DEVICE)
    assert torch.equal(index_first_axis(x, idx), x[idx])
    torch.autograd.gradcheck(lambda t: index_first_axis(t, idx), (x,))
    vals = randn((4, 3), torch.float64, gen).requires_grad_()
    placed = index_put_first_axis(vals, idx, 7)
    assert torch.equal(placed[idx], vals) and (placed[[1, 3, 4]] == 0).all()
    torch.autograd.gradcheck(lambda t: index_put_first_axis(t, idx, 7), (vals,))


def test_unpad_concatenated_sequences():
    from tileattn.compat.flash_attn.bert_padding import unpad_input_for_concatenated_sequences

    lengths = torch.tensor([[2, 3, 0, 0, 0, 0], [3, 2, 0, 0, 0, 0], [6, 0, 0, 0, 0, 0]], device=DEVICE)
    x = torch.arange(18, dtype=F32, device=DEVICE).view(3, 6, 1)
    x_unpad, indices, cu_seqlens, max_seqlen = unpad_input_for_concatenated_sequences(x, lengths)
    assert indices.tolist() == [0, 1, 2, 3, 4, 6, 7, 8, 9, 10, 12, 13, 14, 15, 16, 17]
    assert x_unpad.flatten().tolist() == [float(i) for i in indices.tolist()]
    assert cu_seqlens.tolist() == [0, 2, 5, 8, 10, 16] and max_seqlen == 6


# ------------------------------------------------------------------------------------------------ rotary
def _tables(seqlen_ro, r, gen):
    angles = torch.rand((seqlen_ro, r), generator=gen, dtype=torch.float64) * 2 * math.pi
    return angles.cos().to(DEVICE), angles.sin().to(DEVICE)


@pytest.mark.parametrize("interleaved", [False, True], ids=["neox", "gptj"])
@pytest.mark.parametrize("rotary_dim", [16, 6], ids=["full", "partial"])
@pytest.mark.parametrize("offsets", ["zero", "int", "tensor"])
def test_rotary_matches_direct_formula(interleaved, rotary_dim, offsets):
    from tileattn.compat.flash_attn.layers.rotary import apply_rotary_emb

    gen = make_gen(91 + rotary_dim + interleaved)
    batch, seqlen, heads, head_dim, seqlen_ro = 3, 5, 2, 16, 12
    cos, sin = _tables(seqlen_ro, rotary_dim // 2, gen)
    x = _t((batch, seqlen, heads, head_dim), gen, requires_grad=True)
    off = {"zero": 0, "int": 7, "tensor": torch.tensor([0, 4, 7], device=DEVICE)}[offsets]
    out = apply_rotary_emb(x, cos.float(), sin.float(), interleaved=interleaved, seqlen_offsets=off)

    off_t = off if isinstance(off, torch.Tensor) else torch.full((batch,), off, device=DEVICE)
    pos = (torch.arange(seqlen, device=DEVICE)[None, :] + off_t[:, None]).flatten()
    ref = rope_direct(x.detach().double().view(-1, heads, head_dim), cos, sin, pos, interleaved).view(x.shape)
    assert_close("out", out, ref, tol=1e-6)
    assert torch.equal(out[..., rotary_dim:], x[..., rotary_dim:])

    # the gradient is the inverse rotation
    g = _t(x.shape, gen)
    (gx,) = torch.autograd.grad(out, x, g)
    ref_g = rope_direct(g.double().view(-1, heads, head_dim), cos, -sin, pos, interleaved).view(x.shape)
    assert_close("dx", gx, ref_g, tol=1e-6)


@pytest.mark.parametrize("interleaved", [False, True], ids=["neox", "gptj"])
def test_rotary_varlen(interleaved):
    from tileattn.compat.flash_attn.layers.rotary import apply_rotary_emb

    gen = make_gen(101 + interleaved)
    cu = torch.tensor([0, 4, 4, 9, 11], dtype=torch.int32, device=DEVICE)
    total, heads, head_dim, seqlen_ro = 12, 3, 8, 16  # row 11 is outside every sequence
    cos, sin = _tables(seqlen_ro, 3, gen)
    x = _t((total, heads, head_dim), gen)
    off = torch.tensor([1, 0, 6, 2], device=DEVICE)
    out = apply_rotary_emb(x, cos.float(), sin.float(), interleaved=interleaved, seqlen_offsets=off,
                           cu_seqlens=cu, max_seqlen=5)
    pos = torch.tensor([1, 2, 3, 4, 6, 7, 8, 9, 10, 2, 3], device=DEVICE)
    ref = rope_direct(x[:11].double(), cos, sin, pos, interleaved)
    assert_close("out", out[:11], ref, tol=1e-6)
    assert torch.equal(out[11], x[11])

    # same values in place; gradcheck in float64
    y = x.clone()
    assert apply_rotary_emb(y, cos.float(), sin.float(), interleaved, True, off, cu, 5) is y
    assert torch.equal(y, out)
    x64 = x.double().requires_grad_()
    torch.autograd.gradcheck(lambda t: apply_rotary_emb(t, cos, sin, interleaved, False, off, cu, 5), (x64,))


def test_rotary_checks_and_identity_past_table():
    from tileattn.compat.flash_attn.layers.rotary import apply_rotary_emb

    gen = make_gen(111)
    cos, sin = _tables(6, 4, gen)
    x = _t((2, 4, 1, 8), gen)
    with pytest.raises(ValueError, match="seqlen_offsets"):
        apply_rotary_emb(x, cos, sin, seqlen_offsets=3)  # 3 + 4 > 6 positions
    with pytest.raises(ValueError, match="rotary_dim"):
        apply_rotary_emb(x, *_tables(6, 5, gen))  # rotary_dim 10 > head_dim 8
    with pytest.raises(ValueError):
        apply_rotary_emb(x[0], cos, sin)  # 3-D without cu_seqlens
    # tensor offsets are not checked against the table (as in flash-attn): positions past it are not rotated
    out = apply_rotary_emb(x, cos, sin, seqlen_offsets=torch.tensor([0, 4], device=DEVICE))
    assert torch.equal(out[1, 2:], x[1, 2:]) and not torch.equal(out[1, :2], x[1, :2])


def test_rotary_embedding_module_inplace_qkv():
    from tileattn.compat.flash_attn.layers.rotary import RotaryEmbedding, apply_rotary_emb

    gen = make_gen(121)
    rope = RotaryEmbedding(8, device=DEVICE)
    w = _t((16, 3 * 2 * 16), gen, requires_grad=True)
    x = _t((2, 5, 16), gen)
    qkv = (x @ w).view(2, 5, 3, 2, 16)
    expected = [apply_rotary_emb(qkv[:, :, i].detach(), *_module_tables(rope, 5 + 2), seqlen_offsets=2)
                for i in range(2)]
    out = rope(qkv, seqlen_offset=2)
    assert out is qkv
    assert_close("q", out[:, :, 0], expected[0], tol=1e-6)
    assert_close("k", out[:, :, 1], expected[1], tol=1e-6)
    # the in-place rotation is differentiable: compare with the out-of-place path
    g = _t(qkv.shape, gen)
    (gw,) = torch.autograd.grad(out, w, g)
    qkv2 = (x @ w).view(2, 5, 3, 2, 16)
    rotated = torch.stack([apply_rotary_emb(qkv2[:, :, i], rope._cos_cached, rope._sin_cached, seqlen_offsets=2)
                           for i in range(2)] + [qkv2[:, :, 2]], dim=2)
    (gw2,) = torch.autograd.grad(rotated, w, g)
    assert_close("dw", gw, gw2, tol=1e-6)


def _module_tables(rope, seqlen):
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, rope.dim, 2, dtype=torch.float64) / rope.dim)
    angles = torch.outer(torch.arange(seqlen, dtype=torch.float64), inv_freq).to(DEVICE)
    return angles.cos().float(), angles.sin().float()


def test_private_varlen_forward_paged():
    """_flash_attn_varlen_forward with block_table (paged K/V, forward only) returns the public paged call's
    out and lse, an empty S_dmask and a zero rng_state."""
    from tileattn.compat.flash_attn import flash_attn_interface as fai

    gen = make_gen(62)
    q, kc, vc = _t((5, 2, 16), gen), _t((3, 4, 2, 16), gen), _t((3, 4, 2, 16), gen)  # 3 pages of 4 keys
    cu_q = torch.tensor([0, 2, 5], dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([0, 6, 9], dtype=torch.int32, device=DEVICE)
    table = torch.tensor([[2, 0], [1, 2]], dtype=torch.int32, device=DEVICE)
    out, lse, s_dmask, rng = fai._flash_attn_varlen_forward(q, kc, vc, cu_q, cu_k, 3, 6, 0.0, None, True,
                                                            block_table=table)
    ref_out, ref_lse, _ = tileattn.flash_attn_varlen_func(q, kc, vc, cu_q, cu_k, 3, 6, causal=True,
                                                          return_attn_probs=True, block_table=table)
    assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)
    assert s_dmask.numel() == 0 and s_dmask.dtype == q.dtype and torch.equal(rng.cpu(), torch.zeros(2).long())
