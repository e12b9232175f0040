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
    monkeypatch.delenv(KNOB)
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
    fused_dq.convert(acc, dq, 0.125, torch.empty(2, H, 16, device=device))
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


def _record_fused(monkeypatch, early=False, value="1"):
    """Turn the fused backward on (``early``: with TILEATTN_FUSED_DQ_EARLY=1; ``value``: the knob's, "int" for
    v39a); the list of FUSED_DQ flags of the dK/dV kernel's launches (EARLY_DQ asserted as asked; with "int" the
    accumulator's descriptor asserted uint64: TMA adds no s64)."""
    seen = []
    real = gluon_backward.launch

    def launch(fn, grid, args, kw, *rest, **opts):
        seen.append(bool(kw.get("FUSED_DQ")))
        assert bool(kw.get("EARLY_DQ")) == (early and seen[-1])
        if seen[-1]:
            assert (args[7].base.dtype == torch.uint64) == (value == "int"), args[7].base.dtype
        return real(fn, grid, args, kw, *rest, **opts)
    monkeypatch.setattr(gluon_backward, "launch", launch)
    monkeypatch.setenv(KNOB, value)
    monkeypatch.setenv("TILEATTN_FUSED_DQ_EARLY", "1" if early else "0")
    return seen


FORMS = [("late", False, "1"), ("early", True, "1"), ("int", False, "int")]  # (id, EARLY_DQ, the knob's value)
FUSED_CASES = [(2, 1, 1, 2, 2), (1, 17, 300, 3, 3), (2, 130, 130, 4, 2), (1, 300, 128, 2, 2),
               (2, 1000, 1000, 2, 2), (1, 257, 1031, 4, 1), (1, 2048, 2048, 2, 2)]


@hopper
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("case", FUSED_CASES, ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("form", FORMS, ids=lambda f: f[0])
def test_accuracy(form, case, causal, d, dtype, monkeypatch):
    """The fused backward's forms (fp32 adds in the default or the early order, v39a's int64 adds) by the
    accuracy rule against the float64 reference: odd sizes, GQA, Sq != Sk, one query row."""
    B, Sq, Sk, Hq, Hkv = case
    seen = _record_fused(monkeypatch, form[1], form[2])
    q, k, v, gen = make_qkv(B, Sq, Sk, Hq, Hkv, d, dtype, seed_for("fused-bwd", case, causal, d), requires_grad=True)
    dout = randn((B, Sq, Hq, d), dtype, gen)
    check_attention(q, k, v, causal=causal, dout=dout, extra=f"fused bwd ({form[0]})")
    assert seen and all(seen), "the call did not take the fused backward"


@hopper
@pytest.mark.gpu
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("feat", [{}, dict(causal=True), dict(softcap=6.0, causal=True), dict(window_size=(300, 40)),
                                  dict(alibi=True)], ids=lambda f: "-".join(f) or "plain")
@pytest.mark.parametrize("form", FORMS, ids=lambda f: f[0])
def test_agrees_with_two_kernels(form, feat, d, monkeypatch):
    """dk / dv bit-identical to the two-kernel path (the fused kernel's dK / dV arithmetic is unchanged) and dq
    close to it, over many steps per program and GQA (the dS^T exchange between the warpgroups does not deadlock);
    D=64 softcap / ALiBi calls keep the two-kernel path (``fused_dq.enabled``). v39a's int64 form: dq the same
    bits in three runs (the programs' adds land in any order; that is its point)."""
    q, k, v, gen = make_qkv(2, 1500, 1300, 8, 2, d, torch.bfloat16, seed_for("fused-vs-two", d, sorted(feat)),
                            requires_grad=True)
    kw = dict(feat)
    if kw.pop("alibi", False):
        kw["alibi_slopes"] = randn((8,), torch.float32, gen).abs() * 0.1
    dout = randn((2, 1500, 8, d), torch.bfloat16, gen)
    want = fresh_grads(q, k, v, dout, **kw)
    seen = _record_fused(monkeypatch, form[1], form[2])
    runs = [fresh_grads(q, k, v, dout, **kw) for _ in range(3 if form[2] == "int" else 1)]
    fused = d == 128 or not ({"softcap", "alibi"} & set(feat))
    assert seen and all(f == fused for f in seen)
    for got in runs:
        assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2]), "dk / dv differ from the two kernels"
        assert torch.equal(got[0], runs[0][0]), "dq differs between runs"
    torch.testing.assert_close(runs[0][0].float(), want[0].float(), atol=2 ** -7, rtol=2 ** -7)


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
@pytest.mark.parametrize("value", ["1", "int"])
def test_launch_plans_replay_it(value, monkeypatch):
    """With launch plans on, the fused backward's launches (stats-only pass, v39a's scales, dK/dV + dQ,
    conversion) replay on a fresh accumulator each call: the replayed gradients equal the first call's dk / dv,
    and its dq up to the adds' order (fp32) or bit for bit (v39a's int64 adds). A plan of another form made
    before the knob was set is not replayed for it: the two-kernel form's for the fp32 form (run 133's bench
    replayed one: the knob is read with the buffers, outside the plan's record of knobs), the fp32 form's for the
    int64 one (the plan key holds the accumulator's dtype)."""
    monkeypatch.setenv("TILEATTN_LAUNCH_PLANS", "1")
    q, k, v, gen = make_qkv(2, 1024, 1024, 8, 2, 128, torch.bfloat16, seed_for("fused-plans", value),
                            requires_grad=True)
    dout = randn((2, 1024, 8, 128), torch.bfloat16, gen)
    if value == "int":
        monkeypatch.setenv(KNOB, "1")
    for _ in range(3):  # the other form's plan, made and replayed
        fresh_grads(q, k, v, dout, causal=True)
    seen = _record_fused(monkeypatch, value=value)
    first = fresh_grads(q, k, v, dout, causal=True)
    assert seen and all(seen), "the other form's plan was replayed with this form asked for"
    fresh_grads(q, k, v, dout, causal=True)  # records the plans
    replays = plans.stats["replays"]
    again = fresh_grads(q, k, v, dout, causal=True)
    assert plans.stats["replays"] == replays + 2, "forward and backward should both replay"
    assert seen and all(seen)
    assert torch.equal(again[1], first[1]) and torch.equal(again[2], first[2])
    if value == "int":
        assert torch.equal(again[0], first[0])
    else:
        torch.testing.assert_close(again[0], first[0], atol=2 ** -9, rtol=2 ** -9)


# v39a: the bit-reproducible fused backward (TILEATTN_GLUON_BWD_FUSED=int): int64 fixed-point dQ^T adds


def test_integer_mode(monkeypatch):
    """``int`` selects v39a: an int64 accumulator (described to TMA as uint64), two staging slots at both head
    dims; other values are a ValueError naming the knob and what it takes."""
    monkeypatch.setenv(KNOB, "int")
    assert fused_dq.mode() == "int" and fused_dq.integer()
    q = torch.zeros(2, 10, 3, 64)
    assert fused_dq.accumulator(q).dtype == torch.int64
    assert fused_dq.slots(128) == 2 and fused_dq.kernel_flags(128) == {"FUSED_DQ": 2}
    if gluon_backward.AVAILABLE:  # TMA's reduce-add has no s64 (an INT64 tensor map: illegal instruction, run 189)
        acc = fused_dq.accumulator(q)
        desc = fused_dq.descriptor(acc, 10, 64, 64)
        assert desc.base.dtype == torch.uint64 and desc.base.data_ptr() == acc.data_ptr()
        assert desc.layout.element_bitwidth == 64
    monkeypatch.setenv(KNOB, "float")
    with pytest.raises(ValueError, match=f"{KNOB} must be 0, 1 or int"):
        fused_dq.mode()


def _bound_ref(k, v, dout, dlse, group):
    """The bound ``_scale_kernel`` takes per (batch, query head), in float64: (2 max|dO_i| max|V_j| + max|dlse|)
    max|K| (row norms for dO and V, elementwise for K)."""
    rep = lambda t: t.repeat_interleave(group, dim=1)  # noqa: E731  (B, Hkv) -> (B, Hq)
    kmax = rep(k.double().abs().amax(dim=(1, 3)))
    vmax = rep(v.double().norm(dim=-1).amax(dim=1))
    dmax = dout.double().norm(dim=-1).amax(dim=1)
    lmax = dlse.double().abs().amax(dim=-1) if dlse is not None else 0.0
    return (2 * dmax * vmax + lmax) * kmax


def _scales_of(stats, B, Sq, Hq):
    """The (B, Hq) scales ``_scale_kernel`` wrote into the stats buffer's third plane."""
    return torch.stack([stats[2, :, 16 * (b + b * Sq // 16)] for b in range(B)])


@pytest.mark.parametrize("dlse", [False, True], ids=["", "dlse"])
def test_scale_kernel(dlse):
    """Each (batch, query head)'s scale is a power of two 2^e that maps the bound of every partial dQ^T sum into
    [2^60, 2^61) (so int64 sums cannot overflow, and keep ~60 bits of the largest); heads of very different sizes
    get their own e; a head whose dO is zero gets 2^126 (every add is zero); a NaN in K makes its group's scales
    NaN (dq then NaN as the inputs). Runs interpreted on the CPU: B=2, Sq=37, Sk=50 (partial row blocks), GQA 4/2."""
    B, Sq, Sk, Hq, Hkv, D = 2, 37, 50, 4, 2, 64
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = make_gen(seed_for("fused-int-scale", dlse))
    q = randn((B, Sq, Hq, D), torch.float16, gen).to(device)
    k = randn((B, Sk, Hkv, D), torch.float16, gen).to(device)
    v = randn((B, Sk, Hkv, D), torch.float16, gen).to(device)
    dout = randn((B, Sq, Hq, D), torch.float16, gen).to(device)
    dout[:, :, 1] *= 1000
    dout[1, :, 2] = 0
    dl = randn((B, Hq, Sq), torch.float32, gen).to(device) * 50 if dlse else None
    stats = torch.full((3, Hq, 16 * (B + B * Sq // 16 + 1)), float("nan"), device=device)
    fused_dq.scales(q, k, v, dout, dl, stats)
    got = _scales_of(stats, B, Sq, Hq).double().cpu()
    bound = _bound_ref(k, v, dout, dl, Hq // Hkv).cpu()
    zero = bound == 0
    assert torch.equal(got[zero], torch.full_like(got[zero], 2.0 ** 126)) and zero.sum() == (0 if dlse else 1)
    e = torch.log2(got[~zero])
    assert torch.equal(e, e.round()), "not powers of two"
    scaled = bound[~zero] * got[~zero]
    assert (scaled < 2.0 ** 61).all() and (scaled >= 2.0 ** 59.99).all(), scaled.log2()
    k[1, 3, 0, 5] = float("nan")
    fused_dq.scales(q, k, v, dout, dl, stats)
    got = _scales_of(stats, B, Sq, Hq).cpu()
    assert torch.isnan(got[1, :2]).all() and not torch.isnan(got[0]).any() and not torch.isnan(got[1, 2:]).any()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=dtype_id)
def test_convert_integer(dtype):
    """An int64 accumulator: dq = float32(acc) * (softmax_scale / 2^e) with its head's 2^e from the stats
    buffer's third plane, exactly as torch computes it (runs interpreted on the CPU)."""
    B, S, H, D = 2, 70, 3, 64
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = make_gen(seed_for("fused-int-convert", dtype))
    acc = torch.empty((B * H * D, 72), dtype=torch.int64, device=device)
    acc[:, :S] = (randn((B * H * D, S), torch.float32, gen) * 2.0 ** 40).to(torch.int64).to(device)
    stats = torch.zeros((3, H, 16 * (B + B * S // 16 + 1)), device=device)
    scale = 2.0 ** torch.randint(20, 50, (B, H), generator=gen).float()
    for b in range(B):
        stats[2, :, 16 * (b + b * S // 16)] = scale[b].to(device)
    dq = torch.full((B, S, H, D), float("nan"), dtype=dtype, device=device)
    fused_dq.convert(acc, dq, 0.125, stats)
    per = (0.125 / scale).view(B, H, 1, 1).to(device)
    want = (acc[:, :S].float().view(B, H, D, S) * per).permute(0, 3, 1, 2).to(dtype)
    assert torch.equal(dq, want)


def test_fixed_point_sums_are_order_free():
    """The arithmetic of v39a on the CPU, against float64: a small attention backward's dQ^T split into 16-key
    partial products (fp32, as the kernel's MMAs give them), each times its head's scale (``_scale_kernel``)
    truncated to int64 and summed in two different orders: the same bits, every running sum below 2^62, and
    dq within 4 fp32 ulps of its largest value of the float64 result (the fp32 partials' own rounding), while
    the fp32 sums in the two orders differ."""
    B, S, H, D, blk = 1, 96, 2, 64, 16
    gen = make_gen(seed_for("fused-int-math"))
    q, k, v, dout = (randn((B, S, H, D), torch.float16, gen, device="cpu") for _ in range(4))
    dout[:, :, 1] *= 300
    scale = D ** -0.5
    qd, kd, vd, dd = (t.double().transpose(1, 2) for t in (q, k, v, dout))  # (B, H, S, D)
    p = torch.softmax(qd @ kd.transpose(-1, -2) * scale, dim=-1)
    o = p @ vd
    ds = p * (dd @ vd.transpose(-1, -2) - (dd * o).sum(-1, keepdim=True))
    want = (ds @ kd)  # dQ / softmax_scale, (B, H, S, D)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # the scale kernel: interpreted on the CPU
    stats = torch.zeros((3, H, 16 * (B + B * S // 16 + 1)), device=device)
    fused_dq.scales(*(t.to(device) for t in (q, k, v, dout)), None, stats)
    sc = _scales_of(stats, B, S, H).double().cpu().view(B, H, 1, 1)
    parts = [(ds[..., j:j + blk] @ kd[:, :, j:j + blk]).float() for j in range(0, S, blk)]
    ints = [(part.double() * sc).to(torch.int64) for part in parts]  # exact: |part * 2^e| < 2^61
    fwd, rev, run = torch.zeros_like(ints[0]), torch.zeros_like(ints[0]), torch.zeros_like(ints[0], dtype=torch.float64)
    for x in ints:
        fwd += x
        run += x.double()
        assert run.abs().max() < 2.0 ** 62
    for x in ints[::-1]:
        rev += x
    assert torch.equal(fwd, rev)
    got = fwd.double() / sc
    err = (got - want).abs().amax(dim=(-1, -2))
    assert (err <= 4 * torch.finfo(torch.float32).eps * want.abs().amax(dim=(-1, -2))).all(), err
    f_fwd, f_rev = sum(parts), sum(parts[::-1])
    assert not torch.equal(f_fwd, f_rev), "the fp32 sums happen to agree: this case shows nothing"


@needs_gluon
@pytest.mark.skipif(not ptxas_available(), reason="needs triton's bundled ptxas")
def test_integer_compiles_for_sm90():
    """v39a's dK/dV kernel (int64 dQ^T staging, two slots) for sm_90a: no serialised wgmma, shared memory within
    the limit, spills as measured in session 31 (ptxas; none in the D=128 step loops): D=128 20 B plain, 44 B
    causal, 140 B softcap + window; D=64 with 64-query steps (two-stage ring, 231 KB) 160 / 196 B, in its step
    loops; with 32-query steps (``TILEATTN_GLUON_BWD_CONFIG=32,4,240,24,168,1``) none; with EARLY_DQ 4-8 B."""
    assert_compiles([("--bwd", "--fused-int", "--spill-budget", budget, "--head-dim", d, *extra)
                     for d, budget, extra in [(128, 24, ()), (128, 48, ("--causal",)),
                                              (128, 144, ("--softcap", "--window")), (64, 200, ("--causal",)),
                                              (64, 0, ("--causal", "--config", "32,4,240,24,168,1"))]],
                    env_extra={"TILEATTN_FAST_TANH": "1"})
    assert_compiles([("--bwd", "--fused-int", "--spill-budget", 8, "--head-dim", d, *extra)
                     for d, extra in [(128, ()), (64, ("--causal", "--fp16"))]],
                    env_extra={"TILEATTN_FAST_TANH": "1", "TILEATTN_FUSED_DQ_EARLY": "1"})


@hopper
@pytest.mark.gpu
@pytest.mark.parametrize("d", [64, 128])
def test_integer_features(d, monkeypatch):
    """v39a with a sink (and its gradient), a gradient through lse (dlse joins the bound), causal GQA, and at
    D=128 softcap + window and ALiBi, by the accuracy rule; dO rows of very different sizes in one head (the
    scale is per head: the small rows keep their precision by the int64 range)."""
    import test_features
    seen = _record_fused(monkeypatch, value="int")
    B, Sq, Sk, Hq, Hkv = 2, 333, 777, 4, 2
    q, k, v, gen = make_qkv(B, Sq, Sk, Hq, Hkv, d, torch.bfloat16, seed_for("fused-int-feat", d), requires_grad=True)
    dout = randn((B, Sq, Hq, d), torch.bfloat16, gen)
    dout[:, ::7] *= 1000
    test_features._check(q, k, v, dout, causal=True, ctx="fused int64 bwd",
                         sink=randn((Hq,), torch.float32, gen).requires_grad_())
    check_attention(q, k, v, causal=True, dout=dout, dlse=randn((B, Hq, Sq), torch.float32, gen) * 30,
                    extra="fused int64 bwd dlse")
    n = 2
    if d == 128:
        test_features._check(q, k, v, dout, ctx="fused int64 bwd", softcap=5.0, window_size=(200, 50))
        test_features._check(q, k, v, dout, causal=True, ctx="fused int64 bwd",
                             alibi_slopes=randn((Hq,), torch.float32, gen).abs() * 0.1)
        n = 4
    assert len(seen) == n and all(seen)


@hopper
@pytest.mark.gpu
def test_integer_nan_reaches_dq(monkeypatch):
    """A NaN in K reaches dq of the heads that read it as NaN (the scale turns NaN; an int64 conversion alone
    would drop it), as in the two-kernel path."""
    q, k, v, gen = make_qkv(1, 300, 300, 4, 2, 128, torch.bfloat16, seed_for("fused-int-nan"), requires_grad=True)
    with torch.no_grad():
        k[0, 17, 1, 3] = float("nan")
    dout = randn((1, 300, 4, 128), torch.bfloat16, gen)
    seen = _record_fused(monkeypatch, value="int")
    dq = fresh_grads(q, k, v, dout)[0]
    assert seen and all(seen)
    assert torch.isnan(dq[:, :, 2:]).all(), "heads 2-3 read KV head 1"
    assert not torch.isnan(dq[:, :, :2]).any()
