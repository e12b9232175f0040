"""kernels/launch.py: the launch cache must reuse a compiled kernel only for calls Triton would specialise the same.

The CPU test drives ``launch`` with a stand-in kernel (the interpreter has no compiled kernels, so the cache is off
there); the GPU tests run real kernels through it, alternating between calls that need different specialisations
(alignment, lengths divisible by 16 or equal to 1, dtypes, features) and checking each against the uncached path.
"""
import inspect

import pytest
import torch

import tileattn
from tileattn.kernels import launch as launch_mod

from _helpers import ON_GPU, make_gen, seed_for


class _Compiled:
    function, packed_metadata = "function", "packed"

    def __init__(self):
        self.runs = []

    def run(self, *args):
        self.runs.append(args)

    def launch_metadata(self, *args):
        return None


class _Kernel:
    """Quacks like a @triton.jit function for ``launch``: a signature and ``fn[grid](...)``."""

    def __init__(self):
        def kernel(T, n, x, FLAG, D=7):
            pass
        self.signature = inspect.signature(kernel)
        self.compiles = []

    def __getitem__(self, grid):
        def go(*args, num_warps, num_stages, **kwargs):
            self.compiles.append((grid, args, kwargs, num_warps, num_stages))
            return _Compiled()
        return go


def test_launch_cache_key(monkeypatch):
    monkeypatch.setattr(launch_mod, "_ENABLED", True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(launch_mod, "_raw_stream", lambda device: 1234)
    fn = _Kernel()
    buf = torch.zeros(64)
    aligned, misaligned = buf[:32], buf[1:33]  # fp32: 4-byte offset, not 16-byte aligned
    assert aligned.data_ptr() % 16 == 0 and misaligned.data_ptr() % 16 != 0

    def call(t, n, x=0.5, flag=True, warps=4, stages=2, **extra):
        return launch_mod.launch(fn, (3, 2), (t, n), dict(x=x, FLAG=flag, **extra), warps, stages)

    first = call(aligned, 32)
    assert len(fn.compiles) == 1 and not first.runs
    again = call(torch.zeros(32), 32)  # another tensor, same dtype and alignment: the cached kernel, launched
    assert again is first and len(fn.compiles) == 1
    assert first.runs == [(3, 2, 1, 1234, "function", "packed", None, None, None, again.runs[0][9], 32, 0.5, True,
                           7)]
    assert first.runs[0][9].data_ptr() != aligned.data_ptr()
    misses = [dict(t=misaligned), dict(n=33), dict(n=1), dict(n=2 ** 31), dict(t=aligned.double()),
              dict(flag=False), dict(warps=8), dict(stages=3), dict(x=1), dict(D=8), dict(n=32.0)]
    for i, change in enumerate(misses):
        args = dict(t=aligned, n=32)
        args.update(change)
        t, n = args.pop("t"), args.pop("n")
        kernel = call(t, n, **args)
        assert len(fn.compiles) == 2 + i, f"{change} reused a kernel compiled for another specialisation"
        assert not kernel.runs
        assert call(t, n, **args) is kernel and len(kernel.runs) == 1, change  # and is cached in turn
    compiles = len(fn.compiles)  # floats key by value too (a constexpr could be a float): a new value takes
    call(aligned, 32, x=0.25)  # Triton's path, which would find its own compiled kernel
    assert len(fn.compiles) == compiles + 1


def test_launch_cache_bounded(monkeypatch):
    monkeypatch.setattr(launch_mod, "_ENABLED", True)
    monkeypatch.setattr(launch_mod, "_MAX_ENTRIES", 3)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(launch_mod, "_raw_stream", lambda device: 0)
    fn = _Kernel()
    t = torch.zeros(8)
    for n in range(10):
        launch_mod.launch(fn, (1,), (t, n), dict(x=1.0, FLAG=True), 4, 2)
    assert len(launch_mod._state[fn][2]) <= 3


@pytest.mark.skipif(not ON_GPU, reason="the launch cache serves compiled kernels: GPU only")
def test_launch_cache_matches_uncached_path(monkeypatch):
    """Calls cycling through specialisations (q misaligned, lengths 1 / 16k+1 / 16k, fp16 / bf16, window, GQA,
    sink, varlen): forward, backward and decode through the cache (with its direct C launch and without) equal the
    uncached launches bit for bit."""
    def tensors(B, Sq, Sk, H, Hkv, D, dtype, misaligned, g):
        q, k, v = (torch.randn(B, S, heads, D, generator=g).to("cuda", dtype)
                   for S, heads in ((Sq, H), (Sk, Hkv), (Sk, Hkv)))
        if misaligned:  # a view one element into a buffer: q's pointer is not 16-byte aligned
            q = torch.empty(q.numel() + 1, device="cuda", dtype=dtype)[1:].view(q.shape).copy_(q)
            assert q.data_ptr() % 16
        return q, k, v

    cases = [  # (B, Sq, Sk, H, Hkv, D, dtype, misaligned q, kwargs)
        (2, 128, 128, 4, 4, 128, torch.bfloat16, 0, dict(causal=True)),
        (2, 128, 128, 4, 4, 128, torch.bfloat16, 1, dict(causal=True)),
        (2, 129, 129, 4, 4, 128, torch.bfloat16, 0, dict(causal=True)),
        (2, 1, 1, 4, 4, 128, torch.bfloat16, 0, dict()),
        (1, 200, 333, 6, 2, 64, torch.float16, 0, dict(window_size=(40, 7))),
        (1, 200, 333, 6, 2, 64, torch.float16, 0, dict(sink=True)),
        (2, 128, 128, 4, 4, 128, torch.bfloat16, 0, dict(causal=True)),
    ]
    results = {}
    for enabled, direct in ((True, True), (True, False), (False, False)):  # direct C launch, cached run, uncached
        monkeypatch.setattr(launch_mod, "_ENABLED", enabled)
        monkeypatch.setattr(launch_mod, "_DIRECT", direct)
        hits = launch_mod.stats["hits"]
        for rep in range(2):
            for i, (B, Sq, Sk, H, Hkv, D, dtype, offset, kw) in enumerate(cases):
                g = make_gen(seed_for("launch-case", i))
                q, k, v = tensors(B, Sq, Sk, H, Hkv, D, dtype, offset, g)
                kw = dict(kw)
                if kw.pop("sink", False):
                    kw["sink"] = torch.randn(H, generator=g).cuda().requires_grad_()
                q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
                out = tileattn.attention(q, k, v, **kw)
                out.backward(torch.randn(out.shape, generator=g).to(out))
                got = [out.detach(), q.grad, k.grad, v.grad]
                results.setdefault(i, []).append(got)
            cache = torch.zeros(2, 300, 2, 128, device="cuda", dtype=torch.bfloat16)
            cache.copy_(torch.randn(cache.shape, generator=make_gen(seed_for("launch-decode"))))
            qd = torch.randn(2, 1, 8, 128, generator=make_gen(seed_for("launch-qd"))).cuda().bfloat16()
            for lens in (torch.tensor([17, 300], dtype=torch.int32, device="cuda"), 256):
                results.setdefault(("decode", str(lens)), []).append(
                    [tileattn.flash_attn_with_kvcache(qd, cache, cache, cache_seqlens=lens)])
        if enabled:
            assert launch_mod.stats["hits"] > hits + 10, "the second pass did not use the launch cache"
    for key, runs in results.items():
        for other in runs[1:]:
            for a, b in zip(runs[0], other):
                assert torch.equal(a, b), f"case {key}: cached and uncached launches differ"


def _stand_in_direct_kernel(monkeypatch):
    """A stand-in for a compiled kernel with two host-descriptor arguments, kernel(T, D, n, E, F=3), whose C
    launcher is Triton's real descriptor wrapper (``wrap_handle_tensordesc``) around a recorder, with the launch
    cache and direct launches on and the descriptor encoding (which needs a GPU) replaced by a record of its inputs.
    Returns (kernel, launcher calls received, descriptors encoded)."""
    from triton.backends.nvidia import driver as nv_driver
    encodes = []

    def fake_encode(desc, meta):  # stands in for fill_tma_descriptor (needs a GPU): a record of the inputs
        encodes.append(desc)
        return [("map", desc.base.data_ptr(), tuple(desc.strides), meta["swizzle"]), *desc.shape, *desc.strides]
    monkeypatch.setattr(nv_driver, "make_tensordesc_arg", fake_encode)
    received = []
    signature = {"T": "*fp32", "D": "tensordesc<fp32[1,8]>", "n": "i32", "E": "tensordesc<fp32[1,8]>", "F": "constexpr"}
    metas = [dict(swizzle=1, elem_size=4, block_size=[1, 8]), dict(swizzle=2, elem_size=4, block_size=[1, 8])]  # as 3.6's
    wrapped = nv_driver.wrap_handle_tensordesc(lambda *a: received.append(a), signature, metas)

    class Run:
        global_scratch_size = profile_scratch_size = 0
        launch_cooperative_grid, launch_pdl = False, True
        launch = staticmethod(wrapped)

        def __call__(self, gx, gy, gz, stream, function, *args):  # CudaLauncher.__call__ without scratch
            self.launch(gx, gy, gz, stream, function, False, True, None, None, *args)

    class Compiled:
        function, packed_metadata = "function", "packed"
        run = Run()

    class Kernel:
        def __init__(self):
            def kernel(T, D, n, E, F=3):
                pass
            self.signature = inspect.signature(kernel)

        def __getitem__(self, grid):
            return lambda *a, **kw: Compiled()
    for name, value in (("_ENABLED", True), ("_DIRECT", True), ("_encoded", {}), ("_state", {}),
                        ("_raw_stream", lambda device: 77)):
        monkeypatch.setattr(launch_mod, name, value)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    return Kernel(), received, encodes


def test_direct_launch_matches_triton_wrapper(monkeypatch):
    """Cache hits call the C launcher directly (``_direct``): the arguments it receives equal those Triton's own
    descriptor wrapper (``wrap_handle_tensordesc``, the real one) passes, descriptors expanded; an equal descriptor
    is encoded once, one with another base address or stride is encoded anew."""
    from triton.tools.tensor_descriptor import TensorDescriptor
    kernel, received, encodes = _stand_in_direct_kernel(monkeypatch)
    fn, t = kernel, torch.zeros(4)
    a, b = torch.zeros(4, 8), torch.zeros(4, 8)
    descs = lambda x, y: (TensorDescriptor.from_tensor(x, [1, 8]), TensorDescriptor.from_tensor(y, [1, 8]))  # noqa

    def call(x, y):
        d, e = descs(x, y)
        return launch_mod.launch(fn, (5,), (t, d, 9, e), {}, 4, 2)
    call(a, b)  # miss: compiles (the stand-in), nothing launched
    assert not received
    call(a, b)
    call(a, b)
    assert len(received) == 2 and len(encodes) == 2  # two descriptors, encoded once
    c = torch.zeros(4, 12)[:, :8]
    call(b, c)  # new geometry (c's row stride is 12): a miss, then a hit
    call(b, c)  # b with the other descriptor's metadata, c another base and stride: both encoded anew
    assert len(received) == 3 and len(encodes) == 4
    direct = received[-1]
    received.clear()
    monkeypatch.setattr(launch_mod, "_DIRECT", False)
    monkeypatch.setattr(launch_mod, "_state", {})
    call(b, c)
    call(b, c)  # through Compiled.run and Triton's wrapper
    assert len(received) == 1 and len(encodes) == 6
    via_triton = received[0]
    assert len(direct) == len(via_triton) == 13 + 1 + 5 + 1 + 5 + 1  # T, D (map, 2 sizes, 2 strides), n, E, F
    for x, y in zip(direct, via_triton):
        assert x is y or x == y, (x, y)
    assert direct[:13] == (5, 1, 1, 77, "function", False, True, None, None, "packed", None, None, None)


def test_launch_plain_path_for_non_kernels(monkeypatch):
    """An object with ``fn[grid]`` but no signature (a test's spy around a kernel) is launched as is."""
    monkeypatch.setattr(launch_mod, "_ENABLED", True)
    seen = []

    class Spy:
        def __getitem__(self, grid):
            return lambda *a, **kw: seen.append((grid, a, kw)) or "ran"
    assert launch_mod.launch(Spy(), (2,), (1, 2), dict(X=3), 4, 2) == "ran"
    assert seen == [((2,), (1, 2), dict(X=3, num_warps=4, num_stages=2))]


def test_gluon_descriptors_keyed_by_layout():
    """Gluon host descriptors carry the shared-memory layout the kernel is compiled for: two descriptors equal but
    for the layout must not share a cache entry."""
    gluon_common = pytest.importorskip("tileattn.kernels.gluon_common")
    if not gluon_common.AVAILABLE:
        pytest.skip("this triton has no Gluon")
    t = torch.zeros(2, 64, 4, 128, dtype=torch.bfloat16)
    a = gluon_common.make_desc(t, (1, 64, 1, 128), True)
    b = gluon_common.make_desc(t, (1, 64, 1, 128), True)
    c = gluon_common.make_desc(t, (1, 64, 1, 128), True)
    c.layout = type(a.layout)(swizzle_byte_width=64, element_bitwidth=16, rank=4)
    assert launch_mod._spec(a) == launch_mod._spec(b)
    assert launch_mod._spec(a) != launch_mod._spec(c)
    assert launch_mod._spec(a)[:6] == (torch.bfloat16, True, (2, 64, 4, 128), tuple(t.stride()), (1, 64, 1, 128),
                                       "zero")


def test_launch_plan_replays_the_direct_launch(monkeypatch):
    """launch.plan from a recorded launch (stand-in kernel and C launcher, as above): replayed with other tensors of
    the same geometry, the plan passes the C launcher exactly what a direct launch of those tensors passes
    (descriptors encoded for the new base addresses); an argument tensor outside the roles (unless kept, or a view
    at a role's address when that role is listed in views) gives no plan; the plan holds no tensor of the call it
    was made from."""
    from triton.tools.tensor_descriptor import TensorDescriptor
    fn, received, _ = _stand_in_direct_kernel(monkeypatch)

    def call(t, a, b):
        d, e = TensorDescriptor.from_tensor(a, [1, 8]), TensorDescriptor.from_tensor(b, [1, 8])
        return launch_mod.launch(fn, (5, 2), (t, d, 9, e), {}, 4, 2)
    t, a, b = torch.zeros(4), torch.zeros(4, 8), torch.zeros(4, 8)
    call(t, a, b)  # compiles (the stand-in)
    with launch_mod.recording() as record:
        call(t, a, b)
    assert len(record) == 1 and len(received) == 1
    lp = launch_mod.plan(*record[0], roles=dict(t=t, a=a, b=b))
    assert lp is not None and lp.keep == ()
    assert all(x is None or not isinstance(x, torch.Tensor) for x in lp.template)
    t2, a2, b2 = torch.ones(4), torch.ones(4, 8), torch.ones(4, 8)
    assert launch_mod.plans_ready() and lp.current()
    lp.launch(dict(t=t2, a=a2, b=b2))
    call(t2, a2, b2)
    replayed, direct = received[-2:]
    assert len(replayed) == len(direct)
    for x, y in zip(replayed, direct):
        assert x is y or x == y, (x, y)
    assert replayed[13] is t2 and replayed[14][1] == a2.data_ptr()
    assert launch_mod.plan(*record[0], roles=dict(t=t, a=a)) is None  # b: not a role
    assert launch_mod.plan(*record[0], roles=dict(t=t, a=a), keep=(b,)).keep == (b,)
    with launch_mod.recording() as record:
        call(t, a.view(4, 8), b)  # a view of a: another object at a's address
    assert launch_mod.plan(*record[0], roles=dict(t=t, a=a, b=b)) is None
    assert launch_mod.plan(*record[0], roles=dict(t=t, a=a, b=b), views=("a",)) is not None
