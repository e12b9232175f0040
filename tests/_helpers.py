"""Shared test helpers: device / size switch, seeded inputs, NaN poisoning, accuracy rule.

Imported by conftest.py (which sets TRITON_INTERPRET=1 first when there is no
CUDA) and by the test modules (``from _helpers import ...``).

Size switch
-----------
``LARGE`` is True when CUDA is available (the H100 run): the parametrizations
then use long sequences / big head dims. Override with
``TILEATTN_TEST_SIZE=small`` or ``=large``.

Accuracy rule (flash-attn's)
----------------------------
``ref`` = :func:`tileattn.reference.attention_ref` in float64, ``pt`` = the same
computation at the input dtype (``upcast=False``). For each output ``x``::

    max|x_ours - x_ref| <= MULT * max|x_pt - x_ref| + atol

with ``MULT = 2`` for out / lse and ``3`` for dq / dk / dv. ``atol`` is only a
floor for the lucky case where the PyTorch baseline is (nearly) exact; it is on
the scale of one rounding at the natural magnitude of the result:

* out, dq, dk, dv: ``u(dtype) * max(max|x_ref|, scale)``, i.e. one rounding
  at the natural magnitude of the computation: ``scale = max|v|`` for out (out
  is a convex combination of rows of v), and the largest of ``max|dq_ref|,
  max|dk_ref|, max|dv_ref|`` for the gradients. ``u`` is the unit roundoff
  (fp16 ``2**-11``, bf16 ``2**-8``). For float32 inputs the kernels use fast
  ``exp2`` (ex2.approx: ~2 ulp) and a different summation order over tiles, so
  ``u`` is taken as ``2**-17`` (128 fp32 ulps; still 64x below fp16's).
  The natural scale matters where the reference is exactly 0 but the kernel
  gets it by cancellation in float32: with Sk == 1 the softmax is constant and
  dq == dk == 0 exactly; PyTorch's softmax backward then also gives exactly 0,
  while FlashAttention's ``dS = P * (dP - rowsum(dO * O))`` leaves fp32 noise of
  order ``2**-24 * sum_d |dO_d V_d|`` (flash-attn's own rule has an absolute
  atol of ~2 ulp(0.3) for the same reason).
* lse (always float32 in the kernels): ``2**-17 * max(1, max|lse_ref|)``.

These tolerances are never to be loosened to make a test pass: a failure is a
possible kernel bug.
"""

import contextlib
import functools
import math
import os
import zlib

import torch

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"

_size = os.environ.get("TILEATTN_TEST_SIZE", "").strip().lower()
if _size not in ("", "small", "large"):
    raise ValueError(f"TILEATTN_TEST_SIZE must be 'small' or 'large', got {_size!r}")
LARGE = (_size == "large") if _size else ON_GPU

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
HALF_DTYPES = [torch.float16, torch.bfloat16]

FWD_MULT = 2
BWD_MULT = 3
_ATOL_UNITS = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8, torch.float32: 2.0**-17}
_LSE_ATOL_UNITS = 2.0**-17


def dtype_id(dtype):
    return str(dtype).replace("torch.", "")


# --------------------------------------------------------------------------- RNG
def seed_for(*parts):
    """A stable 31-bit seed derived from the test parameters (independent of test order)."""
    return zlib.crc32(repr(parts).encode()) & 0x7FFFFFFF


def make_gen(seed):
    """Seeded CPU generator; tensors are drawn on CPU then moved, so CPU and GPU runs see the same data."""
    return torch.Generator(device="cpu").manual_seed(int(seed))


def randn(shape, dtype, gen, *, scale=1.0, device=DEVICE):
    x = torch.randn(tuple(shape), generator=gen, dtype=torch.float32) * scale
    return x.to(dtype).to(device)


def make_tensor(shape, dtype, gen, *, layout="contiguous", scale=1.0, requires_grad=False):
    """A (B, S, H, D) tensor with the requested memory layout (values are layout-independent).

    layouts:
      ``contiguous``   plain (B, S, H, D)
      ``bhsd``         a contiguous (B, H, S, D) tensor transposed to (B, S, H, D)
      ``sliced``       a slice [:, :, 1:H+1, :D] of a (B, S, H+2, D+24) tensor (padded row strides)
      ``strided_seq``  every other sequence position of a (B, 2S, H, D) tensor
    Always last-dim contiguous (the API contract). Returned as a leaf tensor.
    """
    B, S, H, D = shape
    base = randn(shape, dtype, gen, scale=scale)
    if layout == "contiguous":
        x = base
    elif layout == "bhsd":
        x = base.transpose(1, 2).contiguous().transpose(1, 2)
    elif layout == "sliced":
        big = torch.full((B, S, H + 2, D + 24), float("nan"), dtype=dtype, device=base.device)
        big[:, :, 1 : H + 1, :D] = base
        x = big[:, :, 1 : H + 1, :D]
    elif layout == "strided_seq":
        big = torch.full((B, 2 * S, H, D), float("nan"), dtype=dtype, device=base.device)
        big[:, ::2] = base
        x = big[:, ::2]
    else:
        raise ValueError(f"unknown layout {layout!r}")
    assert x.shape == (B, S, H, D) and (x.numel() == 0 or x.stride(-1) == 1)
    x = x.detach()
    if requires_grad:
        x.requires_grad_(True)
    return x


# ------------------------------------------------------------------ NaN poisoning
_EMPTY_FNS = ("empty", "empty_like", "empty_strided")


@contextlib.contextmanager
def poisoned_empty():
    """While active, every floating-point ``torch.empty*`` / ``Tensor.new_empty`` result is NaN-filled.

    The kernels allocate their outputs (and scratch buffers) themselves; with
    this, any element a kernel forgets to write -- or any buffer used as an
    accumulator without being zeroed -- shows up as NaN in the checks.
    """

    def wrap(fn):
        @functools.wraps(fn)
        def poisoned(*args, **kwargs):
            t = fn(*args, **kwargs)
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.device.type != "meta":
                with torch.no_grad():
                    t.fill_(float("nan"))
            return t

        return poisoned

    saved = {name: getattr(torch, name) for name in _EMPTY_FNS}
    saved_new_empty = torch.Tensor.new_empty
    try:
        for name, fn in saved.items():
            setattr(torch, name, wrap(fn))
        torch.Tensor.new_empty = wrap(saved_new_empty)
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch, name, fn)
        torch.Tensor.new_empty = saved_new_empty


# --------------------------------------------------------------- accuracy checks
def _max_abs_diff(a, b):
    if a.numel() == 0:
        return 0.0
    return (a.double() - b.double()).abs().max().item()


def _max_abs(a):
    return a.double().abs().max().item() if a.numel() else 0.0


def check_rule(name, ours, ref, pt, mult, atol, context=""):
    """Assert ``max|ours-ref| <= mult*max|pt-ref| + atol`` (all tensors finite, same shape)."""
    assert ours.shape == ref.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(ref.shape)} {context}"
    assert torch.isfinite(ours).all(), f"{name}: non-finite values ({_count_bad(ours)}) {context}"
    err, err_pt = _max_abs_diff(ours, ref), _max_abs_diff(pt, ref)
    bound = mult * err_pt + atol
    assert err <= bound, (
        f"{name}: max|ours-ref| = {err:.3e} > {mult}*max|pt-ref| + atol = "
        f"{mult}*{err_pt:.3e} + {atol:.3e} = {bound:.3e} {context}"
    )
    return err, err_pt


def _count_bad(x):
    return f"{(~torch.isfinite(x)).sum().item()} of {x.numel()}, nan={torch.isnan(x).sum().item()}"


def atol_for(dtype, ref, scale):
    """Absolute floor of the rule (see module docstring): ``u(dtype) * max(max|ref|, scale)``."""
    return _ATOL_UNITS[dtype] * max(_max_abs(ref), scale)


def check_lse(lse, lse_ref, lse_pt, context=""):
    """lse: float32 (B, Hq, Sq); -inf exactly where the reference is -inf, rule elsewhere."""
    assert lse.dtype == torch.float32, f"lse dtype {lse.dtype} != float32 {context}"
    assert lse.shape == lse_ref.shape, f"lse shape {tuple(lse.shape)} != {tuple(lse_ref.shape)} {context}"
    assert not torch.isnan(lse).any(), f"lse has NaN ({_count_bad(lse)}) {context}"
    empty_ref = torch.isneginf(lse_ref)
    got_empty = torch.isneginf(lse)
    assert torch.equal(got_empty, empty_ref), (
        f"lse: -inf pattern differs from reference ({(got_empty != empty_ref).sum().item()} rows) {context}"
    )
    keep = ~empty_ref
    ours, ref, pt = lse[keep], lse_ref[keep], lse_pt[keep]
    atol = _LSE_ATOL_UNITS * max(1.0, _max_abs(ref))
    return check_rule("lse", ours, ref, pt, FWD_MULT, atol, context)


def describe(q, k, causal, softmax_scale=None, extra=""):
    B, Sq, Hq, D = q.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    s = f"[B={B} Sq={Sq} Sk={Sk} Hq={Hq} Hkv={Hkv} D={D} {dtype_id(q.dtype)} causal={causal}"
    if softmax_scale is not None:
        s += f" scale={softmax_scale}"
    return s + (f" {extra}" if extra else "") + "]"


def _grad(out, lse, inputs, dout, dlse):
    if dlse is None:
        return torch.autograd.grad(out, inputs, dout)
    return torch.autograd.grad((out, lse), inputs, (dout, dlse.to(lse.dtype)))


def run_ours(q, k, v, *, causal, softmax_scale=None, dout=None, dlse=None, poison=True):
    """tileattn forward (+ backward when dout is given). Returns (out, lse, grads-or-None)."""
    import tileattn

    ctx = poisoned_empty() if poison else contextlib.nullcontext()
    with ctx:
        out, lse = tileattn.attention(q, k, v, causal=causal, softmax_scale=softmax_scale, return_lse=True)
        grads = None
        if dout is not None:
            grads = _grad(out, lse, (q, k, v), dout, dlse)
    return out, lse, grads


def run_reference(q, k, v, *, causal, softmax_scale=None, dout=None, dlse=None, upcast=True):
    from tileattn.reference import attention_ref

    leaves = [x.detach().requires_grad_(dout is not None) for x in (q, k, v)]
    with torch.enable_grad():
        out, lse = attention_ref(*leaves, causal=causal, softmax_scale=softmax_scale, upcast=upcast)
        grads = None
        if dout is not None:
            grads = _grad(out, lse, leaves, dout.to(out.dtype), dlse)
    return out.detach(), lse.detach(), grads


def check_attention(q, k, v, *, causal=False, softmax_scale=None, dout=None, dlse=None, extra=""):
    """Run tileattn and the two references; apply the accuracy rule to out, lse (and grads if dout).

    With ``dlse`` (float32, (B, Hq, Sq)) the gradients flow through lse as well.

    q, k, v must be leaves with ``requires_grad`` when ``dout`` is given.
    Also checks dtypes/shapes, that nothing is NaN/Inf (outputs are NaN-poisoned),
    and that rows without a visible key have out == 0, lse == -inf and dq == 0.
    Returns a dict of the measured errors.
    """
    ctx = describe(q, k, causal, softmax_scale, extra)
    dtype = q.dtype
    kw = dict(causal=causal, softmax_scale=softmax_scale, dout=dout, dlse=dlse)
    out, lse, grads = run_ours(q, k, v, **kw)
    out_ref, lse_ref, grads_ref = run_reference(q, k, v, **kw)
    out_pt, lse_pt, grads_pt = run_reference(q, k, v, upcast=False, **kw)

    assert out.dtype == dtype, f"out dtype {out.dtype} != {dtype} {ctx}"
    assert out.device == q.device, f"out device {out.device} != {q.device} {ctx}"
    errors = {}
    errors["out"] = check_rule("out", out, out_ref, out_pt, FWD_MULT, atol_for(dtype, out_ref, _max_abs(v)), ctx)
    errors["lse"] = check_lse(lse, lse_ref, lse_pt, ctx)

    empty_rows = torch.isneginf(lse_ref)  # (B, Hq, Sq)
    if empty_rows.any():
        rows = empty_rows.transpose(1, 2)  # (B, Sq, Hq)
        assert (out[rows] == 0).all(), f"out not exactly 0 on rows with no visible key {ctx}"

    if dout is not None:
        grad_scale = max(_max_abs(g) for g in grads_ref)
        for name, x, g, g_ref, g_pt in zip(("dq", "dk", "dv"), (q, k, v), grads, grads_ref, grads_pt):
            assert g.dtype == x.dtype, f"{name} dtype {g.dtype} != {x.dtype} {ctx}"
            assert g.shape == x.shape, f"{name} shape {tuple(g.shape)} != {tuple(x.shape)} {ctx}"
            errors[name] = check_rule(name, g, g_ref, g_pt, BWD_MULT, atol_for(dtype, g_ref, grad_scale), ctx)
        if empty_rows.any():
            dq = grads[0]
            assert (dq[empty_rows.transpose(1, 2)] == 0).all(), f"dq not exactly 0 on fully masked rows {ctx}"
    return errors


def make_qkv(B, Sq, Sk, Hq, Hkv, D, dtype, seed, *, layout="contiguous", requires_grad=False, scale=1.0):
    gen = make_gen(seed)
    q = make_tensor((B, Sq, Hq, D), dtype, gen, layout=layout, scale=scale, requires_grad=requires_grad)
    k = make_tensor((B, Sk, Hkv, D), dtype, gen, layout=layout, scale=scale, requires_grad=requires_grad)
    v = make_tensor((B, Sk, Hkv, D), dtype, gen, layout=layout, requires_grad=requires_grad)
    return q, k, v, gen


def softmax_scale_default(D):
    return 1.0 / math.sqrt(D)


# ----------------------------------------------------------------------------------- Gluon kernel tests

def spy_calls(monkeypatch, module, name):
    """Replace ``module.name`` by a wrapper that records the shape of each call's first argument; returns that
    list (which kernel path a call took)."""
    calls = []
    real = getattr(module, name)

    def wrapped(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)
    monkeypatch.setattr(module, name, wrapped)
    return calls


def feature_kwargs(feat: dict, q_heads: int, gen) -> dict:
    """A test case's feature dict as attention keywords: ``sink=True`` becomes random logits (q_heads,) and
    ``alibi=True`` random positive slopes (q_heads,) (fp32, drawn from ``gen``); everything else as given."""
    kw = dict(feat)
    if kw.pop("sink", False):
        kw["sink"] = randn((q_heads,), torch.float32, gen)
    if kw.pop("alibi", False):
        kw["alibi_slopes"] = randn((q_heads,), torch.float32, gen).abs() * 0.1
    return kw


def lift_gluon_length_limits(monkeypatch):
    """Every sequence length in the Gluon forward's scope for this test (the table sends short D=64 and D=256
    calls to the portable kernel, which is faster there)."""
    import dataclasses
    from tileattn import configs
    for d, cfg in list(configs._GLUON_FWD.items()):
        monkeypatch.setitem(configs._GLUON_FWD, d, dataclasses.replace(
            cfg, min_seqlen_k=0, min_seqlen_k_causal=0,
            min_seqlen_k_causal_list=None if cfg.min_seqlen_k_causal_list is None else 0))


def record_gluon_launches(monkeypatch):
    """A list that collects (grid, constexpr kwargs) of every Gluon forward launch from now on."""
    from tileattn.kernels import gluon_forward
    seen = []
    real = gluon_forward.launch

    def launch(fn, grid, args, kw, *rest, **opts):
        seen.append((grid, kw))
        return real(fn, grid, args, kw, *rest, **opts)
    monkeypatch.setattr(gluon_forward, "launch", launch)
    return seen


def ptxas_available() -> bool:
    """Triton's bundled ptxas is there (compiling Gluon kernels for sm_90a without a GPU)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        p = get_ptxas(90)
        return os.path.exists(getattr(p, "path", p))
    except Exception:
        return False


def gluon_compile_check_many(variants, env_extra=None):
    """Check every variant (a sequence of ``benchmarks/gluon_compile.py`` arguments) as ``--check`` does, all in one
    subprocess (its imports cost ~5 s); returns the list of (variant as one string, passed, report) and asserts
    nothing: callers assert, naming the variants that failed."""
    import shlex
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.path.join(root, "src") + os.pathsep + env.get("PYTHONPATH", "")
    env.update(env_extra or {})
    lines = [shlex.join(map(str, v)) for v in variants]
    r = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "gluon_compile.py"), "--many"],
                       input="\n".join(lines) + "\n", capture_output=True, text=True, env=env)
    results = []
    for block in r.stdout.split("=== VARIANT ")[1:]:
        head, _, rest = block.partition("\n")
        status, _, report = rest.partition("\n")
        results.append((head, status == "=== ok", report))
    assert len(results) == len(lines), f"gluon_compile.py --many reported {len(results)} of {len(lines)} variants:\n" \
        + r.stdout[-4000:] + r.stderr[-4000:]
    return results


def assert_compiles(variants, env_extra=None):
    """``gluon_compile_check_many`` and fail with the reports of every variant that did not pass."""
    bad = [f"--- {v}\n{report}" for v, ok, report in gluon_compile_check_many(variants, env_extra) if not ok]
    assert not bad, f"{len(bad)} of {len(variants)} variants failed:\n" + "\n".join(bad)


def fresh_grads(q, k, v, dout, **kw):
    """(dq, dk, dv) of one backward through ``tileattn.attention(q, k, v, **kw)``, the inputs' .grad cleared first
    (cloned: the next call overwrites them)."""
    import tileattn
    q.grad = k.grad = v.grad = None
    tileattn.attention(q, k, v, **kw).backward(dout)
    return q.grad.clone(), k.grad.clone(), v.grad.clone()


def attn_params(q, k, causal=False, **kw):
    """Batched ``AttnParams`` for q (B, Sq, H, D) / k (B, Sk, Hkv, D) with the default scale (dispatch tests)."""
    from tileattn.kernels import params
    return params.AttnParams(batch=q.shape[0], max_seqlen_q=q.shape[1], max_seqlen_k=k.shape[1],
                             softmax_scale=q.shape[-1] ** -0.5, window_right=0 if causal else -1, **kw)


HOPPER = ON_GPU and torch.cuda.get_device_capability()[0] == 9
# Shapes (B, Sq, Sk, Hq, Hkv) of the Gluon kernels' GPU accuracy tests: 1 and odd lengths, Sq != Sk both ways, GQA,
# several tiles, and a full 2k
GLUON_CASES = [
    (2, 1, 1, 2, 2), (1, 17, 17, 3, 3), (2, 130, 130, 4, 2), (1, 128, 300, 2, 1), (1, 300, 128, 2, 2),
    (2, 1000, 1000, 2, 2), (1, 257, 1031, 4, 1), (1, 2048, 2048, 2, 2),
]


def int8_residual(r8, out):
    """(r, P): the fp32 residual an int8 one (``TILEATTN_RESIDUAL=int8``, ``configs.residual_dtype``) stands for,
    r = q P 2^-(m+8) 128/127, and its unit P, the power of two at or below |out| (the smallest normal's for
    subnormals and 0)."""
    fi = torch.finfo(out.dtype)
    mant = 7 if out.dtype == torch.bfloat16 else 10
    a = out.float().abs()
    unit = torch.where(a < fi.tiny, fi.tiny, torch.ldexp(torch.ones_like(a), torch.frexp(a)[1] - 1))
    return r8.float() * unit * 2.0 ** -(mant + 8) * 128 / 127, unit


def assert_int8_residual_matches(r8, full, out):
    """The int8 residual ``r8`` is the full one (``full``, out's dtype, the same call's) to within
    P 2^-(m+9) 128/127, plus the full one's own rounding to out's dtype (half an ulp of r, subnormal spacing
    included); |q| <= 127."""
    fi = torch.finfo(out.dtype)
    mant = 7 if out.dtype == torch.bfloat16 else 10
    r, unit = int8_residual(r8, out)
    full = full.float()
    tol = unit * 2.0 ** -(mant + 9) * 128 / 127 * 1.001 + full.abs() * fi.eps / 2 + fi.tiny * fi.eps / 2
    assert ((r - full).abs() <= tol).all()
    assert r8.abs().max() <= 127
