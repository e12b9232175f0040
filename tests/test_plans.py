"""Launch plans (kernels/plans.py): a replayed forward or backward gives bit-for-bit what fresh launches give,
for the Gluon and the portable kernels and every feature, with new tensors at new addresses; a plan follows the
knobs its call read, yields to launch hooks, and works inside a CUDA graph. The CPU tests check the knob recording
(the plans themselves need compiled kernels; tests/test_launch.py checks a plan's arguments with a stand-in)."""

import pytest
import torch

import tileattn
from tileattn import configs
from tileattn.kernels import plans
from _helpers import HALF_DTYPES, HOPPER, dtype_id, feature_kwargs, make_gen, make_qkv, randn, seed_for

hopper = pytest.mark.skipif(not HOPPER, reason="the Gluon forward runs on sm90 only")


def test_env_log_records_the_knobs_read(monkeypatch):
    """configs.env_log records every getenv inside it (set or not), nested logs reach the outer one, and
    env_unchanged notices a knob set, changed or removed."""
    monkeypatch.setenv("TILEATTN_PLAN_TEST_A", "1")
    monkeypatch.delenv("TILEATTN_PLAN_TEST_B", raising=False)
    with configs.env_log() as outer:
        configs.getenv("TILEATTN_PLAN_TEST_A")
        with configs.env_log() as inner:
            assert configs.getenv("TILEATTN_PLAN_TEST_B", "x") == "x"
    assert inner == [("TILEATTN_PLAN_TEST_B", None)]
    assert outer == [("TILEATTN_PLAN_TEST_A", "1"), ("TILEATTN_PLAN_TEST_B", None)]
    configs.getenv("TILEATTN_PLAN_TEST_A")
    assert len(outer) == 2, "recorded outside the block"
    assert configs.env_unchanged(outer)
    monkeypatch.setenv("TILEATTN_PLAN_TEST_B", "")
    assert not configs.env_unchanged(outer)
    monkeypatch.delenv("TILEATTN_PLAN_TEST_B")
    monkeypatch.setenv("TILEATTN_PLAN_TEST_A", "2")
    assert not configs.env_unchanged(outer)
    monkeypatch.delenv("TILEATTN_PLAN_TEST_A")
    assert not configs.env_unchanged(outer)


def test_no_plans_off_the_gpu(monkeypatch):
    """CPU (interpreter) calls take no plan: the key needs CUDA tensors and the compiled launcher."""
    monkeypatch.setenv("TILEATTN_LAUNCH_PLANS", "1")
    if torch.cuda.is_available():
        pytest.skip("CPU-only property")
    q, k, v, _ = make_qkv(1, 17, 17, 2, 1, 16, torch.float32, seed_for("plan-cpu"))
    for _ in range(2):
        tileattn.attention(q, k, v, causal=True)
    assert plans._PLANS == {}


# (B, Sq, Sk, Hq, Hkv, D, features): plain grid / persistent grid / causal work list / window / softcap / ALiBi
# per batch / sink / Sq != Sk / D=64 / D=256 (3 K slots, plain grid; the split backward) / dropout (the portable
# forward and backward, planned with their rng) / D=64 causal 512 (the portable forward)
PLAN_CASES = [(2, 1024, 1024, 8, 2, 128, {}), (2, 1500, 1500, 8, 8, 128, dict(causal=True)),
              (1, 777, 2048, 4, 2, 128, dict(causal=True, sink=True)),
              (2, 1024, 1024, 4, 4, 128, dict(window_size=(300, 40))), (2, 1024, 1024, 4, 2, 128, dict(softcap=6.0)),
              (2, 900, 1100, 4, 2, 128, dict(alibi=True)), (2, 2048, 2048, 4, 1, 64, dict(causal=True)),
              (2, 1024, 1024, 4, 4, 256, dict(causal=True)), (2, 512, 512, 4, 2, 64, dict(dropout_p=0.1)),
              (2, 512, 512, 4, 4, 64, dict(causal=True))]


@hopper
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", PLAN_CASES, ids=lambda c: "x".join(map(str, c[:6])) + "-" + "-".join(c[6]))
def test_replay_equals_a_fresh_launch(case, dtype, monkeypatch):
    """A call's second run replays its plans (stats), with the same out / lse / gradient bits as with plans off,
    for training (forward with the residual, backward) and inference; a third run on other tensors at other
    addresses (same values) replays too and matches."""
    B, Sq, Sk, Hq, Hkv, d, feat = case
    q, k, v, gen = make_qkv(B, Sq, Sk, Hq, Hkv, d, dtype, seed_for("plan", case[:6], dtype), requires_grad=True)
    kw = feature_kwargs(feat, Hq, gen)
    if "alibi_slopes" in kw:
        kw["alibi_slopes"] = randn((B, Hq), torch.float32, gen).abs() * 0.1
    dout = randn((B, Sq, Hq, d), dtype, gen)

    def run(q, k, v):
        torch.manual_seed(1234)  # dropout: the same mask in every run
        out, lse = tileattn.attention(q, k, v, return_lse=True, **kw)
        grads = torch.autograd.grad(out, (q, k, v), dout)
        torch.manual_seed(1234)
        with torch.no_grad():
            inf = tileattn.attention(q, k, v, return_lse=True, **kw)
        return (out, lse) + grads + inf

    monkeypatch.setenv("TILEATTN_LAUNCH_PLANS", "0")
    ref = run(q, k, v)
    monkeypatch.setenv("TILEATTN_LAUNCH_PLANS", "1")
    built = plans.stats["plans"]
    run(q, k, v)  # a key's first call: no plan yet
    assert plans.stats["plans"] == built
    run(q, k, v)  # the second: builds the plans (training forward, backward, inference forward)
    assert plans.stats["plans"] == built + 3
    replays = plans.stats["replays"]
    got = run(q, k, v)
    per_run = plans.stats["replays"] - replays
    assert per_run == 3, f"the second run replayed {per_run} of its 3 calls"
    clones = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    assert all(c.data_ptr() != t.data_ptr() for c, t in zip(clones, (q, k, v)))
    again = run(*clones)
    assert plans.stats["replays"] == replays + 2 * per_run
    for name, a, b, c in zip(("out", "lse", "dq", "dk", "dv", "out (no grad)", "lse (no grad)"), ref, got, again):
        assert torch.equal(a, b) and torch.equal(a, c), name


@hopper
@pytest.mark.gpu
def test_replay_with_aliased_and_strided_inputs(monkeypatch):
    """q is k is v (self-attention on one tensor) and q / k / v as strided views of one packed tensor: replays
    equal fresh launches; the aliased and the separate calls of one shape are different plans."""
    monkeypatch.setenv("TILEATTN_LAUNCH_PLANS", "1")
    gen = make_gen(seed_for("plan-alias"))
    x = randn((2, 1024, 8, 128), torch.bfloat16, gen)
    qkv = randn((2, 1024, 3, 8, 128), torch.bfloat16, gen)
    y = x.clone()
    calls = [lambda: tileattn.attention(x, x, x, causal=True), lambda: tileattn.attention(x, y, x, causal=True),
             lambda: tileattn.attention(*qkv.unbind(2))]
    monkeypatch.setenv("TILEATTN_LAUNCH_PLANS", "0")
    refs = [c() for c in calls]
    monkeypatch.setenv("TILEATTN_LAUNCH_PLANS", "1")
    for c in calls + calls:  # each key's first call, then its plan
        c()
    replays = plans.stats["replays"]
    for c, ref in zip(calls, refs):
        assert torch.equal(c(), ref)
    assert plans.stats["replays"] == replays + 3


@hopper
@pytest.mark.gpu
def test_plan_follows_knobs_and_hooks(monkeypatch):
    """A knob the call read changes (TILEATTN_GLUON=0: the portable kernel): no replay, the portable kernel's
    result (then planned in turn); back to the default: the Gluon kernel again, replayed from its next call. A
    launch hook set (a profiler): the plan declines and the hook sees the launch."""
    import triton
    monkeypatch.setenv("TILEATTN_LAUNCH_PLANS", "0")
    q, k, v, _ = make_qkv(2, 1024, 1024, 8, 2, 128, torch.bfloat16, seed_for("plan-knobs"))
    first = tileattn.attention(q, k, v)
    monkeypatch.setenv("TILEATTN_GLUON", "0")
    portable = tileattn.attention(q, k, v)
    monkeypatch.delenv("TILEATTN_GLUON")
    monkeypatch.setenv("TILEATTN_LAUNCH_PLANS", "1")

    def call(expect, replayed, built):
        before = dict(plans.stats)
        assert torch.equal(tileattn.attention(q, k, v), expect)
        assert plans.stats["replays"] - before["replays"] == replayed
        assert plans.stats["plans"] - before["plans"] == built
    call(first, 0, 0)  # the key's first call
    call(first, 0, 1)  # builds the plan
    call(first, 1, 0)
    monkeypatch.setenv("TILEATTN_GLUON", "0")  # read by the plan's call: the plan no longer stands
    call(portable, 0, 1)
    call(portable, 1, 0)
    monkeypatch.delenv("TILEATTN_GLUON")
    call(first, 0, 1)
    call(first, 1, 0)
    replays = plans.stats["replays"]
    seen = []

    def hook(*args):
        seen.append(1)
    triton.knobs.runtime.launch_enter_hook.add(hook)
    try:
        built = plans.stats["plans"]
        assert torch.equal(tileattn.attention(q, k, v), first)
    finally:
        triton.knobs.runtime.launch_enter_hook.remove(hook)
    assert seen and plans.stats["replays"] == replays and plans.stats["plans"] == built
    call(first, 1, 0)  # the plan stands once the hook is gone


@hopper
@pytest.mark.gpu
def test_replay_in_a_cuda_graph(monkeypatch):
    """A replayed call captured in a CUDA graph: the graph's replays follow new input values (a causal call, whose
    plan holds the host's work list)."""
    monkeypatch.setenv("TILEATTN_LAUNCH_PLANS", "1")
    gen = make_gen(seed_for("plan-graph"))
    q, k, v = (randn((2, 1400, 8, 128), torch.bfloat16, gen) for _ in range(3))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            tileattn.attention(q, k, v, causal=True)
    torch.cuda.current_stream().wait_stream(side)
    replays = plans.stats["replays"]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = tileattn.attention(q, k, v, causal=True)
    assert plans.stats["replays"] == replays + 1
    for t in (q, k, v):
        t.copy_(randn(t.shape, torch.bfloat16, gen))
    graph.replay()
    torch.cuda.synchronize()
    monkeypatch.setenv("TILEATTN_LAUNCH_PLANS", "0")
    assert torch.equal(out, tileattn.attention(q, k, v, causal=True))


def test_plan_keys_tell_calls_apart():
    """Every input a launch depends on, other than the tensors' addresses, reaches the plan keys: each AttnParams
    field a batched call can vary, each tensor's shape, strides and dtype, 16-byte alignment, which arguments are
    one object, the residual flag and the device; calls equal in all of those share a key (new tensors elsewhere
    in memory). Host-only (the keys read no GPU state)."""
    import dataclasses
    from tileattn.kernels.params import AttnParams
    gen = make_gen(seed_for("plan-keys"))
    q, k, v = (randn((2, 64, 4, 32), torch.float16, gen, device="cpu") for _ in range(3))
    base = AttnParams(batch=2, max_seqlen_q=64, max_seqlen_k=64, softmax_scale=0.125)
    sink, alibi = torch.zeros(4), torch.zeros(2, 4)
    key = plans.forward_key(q, k, v, base, True, 0)
    assert plans.forward_key(q.clone(), k.clone(), v.clone(), base, True, 0) == key
    variants = [dict(softmax_scale=0.2), dict(window_left=3), dict(window_right=0), dict(softcap=5.0),
                dict(dropout_p=0.1, rng=torch.zeros(2, dtype=torch.int64)), dict(sink=sink), dict(alibi_slopes=alibi),
                dict(alibi_slopes=alibi[0])]
    keys = {key}
    for change in variants:
        keys.add(plans.forward_key(q, k, v, dataclasses.replace(base, **change), True, 0))
    keys.add(plans.forward_key(q, k, v, base, False, 0))
    keys.add(plans.forward_key(q, k, v, base, True, 1))
    keys.add(plans.forward_key(q, k, k, base, True, 0))  # k is v
    keys.add(plans.forward_key(q, q, q, base, True, 0))
    keys.add(plans.forward_key(q.transpose(1, 2).contiguous().transpose(1, 2), k, v, base, True, 0))  # strides
    keys.add(plans.forward_key(q.float(), k, v, base, True, 0))
    keys.add(plans.forward_key(q[:, :63], k, v, base, True, 0))
    shifted = torch.empty(q.numel() + 1, dtype=q.dtype)[1:].view(q.shape)  # 2 bytes off a 16-byte boundary
    keys.add(plans.forward_key(shifted, k, v, base, True, 0))
    keys.add(plans.forward_key(q, shifted, v, base, True, 0))  # which tensor is misaligned matters
    assert len(keys) == 1 + len(variants) + 9, "two different calls share a plan key"
    dq, dk, dv = (torch.empty_like(t) for t in (q, k, v))
    lse, out = torch.zeros(2, 4, 64), torch.empty_like(q)

    def bkey(dout=q, dlse=None, resid=None, p=base, dq=dq):
        return plans.backward_key(dout, q, k, v, out, lse, dlse, p, dq, dk, dv, resid, 0)
    bkeys = {bkey(), bkey(dout=q.clone()), bkey(dlse=lse), bkey(resid=out.clone()), bkey(p=dataclasses.replace(
        base, window_right=0)), bkey(dq=torch.empty(2, 64, 4, 48)[..., :32])}
    assert len(bkeys) == 6 and bkey(dout=torch.randn(q.shape).half()) == bkey(dout=q.clone())
