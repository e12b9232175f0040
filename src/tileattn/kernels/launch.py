"""A cheaper Triton launch for kernels called with the same arguments again and again.

``JITFunction.run`` binds every argument, computes Triton's specialisation of each (C++ ``native_specialize_impl``),
builds a cache key string and looks the compiled kernel up: ~40-60 µs of host time per launch for our 40-60
arguments on the benchmark host (benchmarks/NOTES.md, run 29/33 host profiles), which decides the speed of short
calls (seqlen <= 1k) and of eager decode steps.

``launch`` keys its own cache on a superset of what Triton specialises on: the exact value and type of every scalar
and constexpr argument, each tensor's dtype and 16-byte alignment (what Triton specialises a pointer on), each host
``TensorDescriptor``'s dtype, shape, strides, block shape, padding and base alignment, and the launch options. Two
calls with equal keys therefore get the same specialisation from Triton, so the kernel compiled for the first call
is the right one for the second, which goes straight to the compiled kernel's launcher. Misses (first calls, new
shapes) take Triton's normal path, which compiles if needed and returns the kernel cached here. Hits call Triton's
C launcher directly where its form is the known one, with host TMA descriptors expanded from cached encodings
(``_direct``, ``_expand``).

Off under the interpreter (its kernels are not compiled) and with ``TILEATTN_FAST_LAUNCH=0`` (read at import).
"""

import contextlib
import operator
import os

import torch
import triton

_ENABLED = not triton.knobs.runtime.interpret and os.environ.get("TILEATTN_FAST_LAUNCH", "1") != "0"
# TILEATTN_DIRECT_LAUNCH=0 (read at import; tests and benchmarks/host_profile.py flip it): cache hits go through the
# compiled kernel's own ``run`` instead of its C launcher (see ``_direct``)
_DIRECT = os.environ.get("TILEATTN_DIRECT_LAUNCH", "1") != "0"
_MAX_ENTRIES = 4096  # per kernel; keys hold exact sizes, so a stream of new shapes must not grow it forever

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # older Triton: no host descriptors, nothing to key on
    class TensorDescriptor:  # noqa: D401 - placeholder type that no argument is an instance of
        pass
try:  # Gluon's host descriptor: the same fields plus the shared-memory layout, which the kernel specialises on
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor as GluonTensorDescriptor
except ImportError:
    class GluonTensorDescriptor:  # noqa: D401 - placeholder type that no argument is an instance of
        pass

_TENSOR = torch.Tensor
_PLAIN = frozenset((int, float, bool, str, type(None)))  # keyed by value (with the types tuple beside)
_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", lambda d: torch.cuda.current_stream(d).cuda_stream)
_DESC = (TensorDescriptor, GluonTensorDescriptor)
_layout_keys = {}  # id(layout) -> (layout, its repr): the layout object kept alive so that its id stays its own
_state = {}  # JITFunction -> (param names, defaults by name, {key: (compiled kernel, direct)}, {types: layout})
stats = {"hits": 0, "misses": 0}  # for tests and benchmarks/host_profile.py


def _spec(v):
    """The key part of an argument that is neither a plain value nor a tensor (those are keyed in ``launch``: by
    value, and by dtype and 16-byte alignment): a host descriptor's geometry, anything else itself."""
    if isinstance(v, _DESC):
        b = v.base
        layout = getattr(v, "layout", None)  # Gluon descriptors (an unhashable dataclass): keyed by its repr
        if layout is not None:
            entry = _layout_keys.get(id(layout))
            if entry is None or entry[0] is not layout:
                if len(_layout_keys) >= _MAX_ENCODED:
                    _layout_keys.clear()
                entry = _layout_keys[id(layout)] = (layout, repr(layout))
            layout = entry[1]
        return (b.dtype, b.data_ptr() % 16 == 0, tuple(v.shape), tuple(v.strides), tuple(v.block_shape),
                v.padding, layout)
    return v


_COUNTERS = {}  # (tag, device type, index, raw stream) -> int32 buffer (``ticket_counters``)


def ticket_counters(device: torch.device, n: int, tag: str) -> torch.Tensor:
    """n int32 counters for a kernel's tickets or work queue, zero when the kernel starts; the kernel leaves the
    ones it used at zero (the last program resets them). Eager calls share one buffer per (tag, device, stream),
    kept across calls: calls on one stream run in order, calls on two streams never share a counter, and a buffer
    replaced by a bigger one is freed in stream order. A call being captured in a CUDA graph gets a buffer of its
    own, zeroed by a memset node of the graph and owned by the graph's memory pool (torch.cuda.graph captures on a
    private stream, and a graph may be replayed on any stream), so no graph shares counters with eager calls or
    with another graph, and no graph keeps a freed buffer. ``tag`` keeps different kernels' buffers apart. A
    launch that died before resetting would leave a counter non-zero; the CUDA context is unusable after such a
    fault anyway."""
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return torch.zeros(n, dtype=torch.int32, device=device)
    stream = _raw_stream(device.index) if device.type == "cuda" else 0
    key = (tag, device.type, device.index, stream)
    buf = _COUNTERS.get(key)
    if buf is None or buf.numel() < n:
        buf = _COUNTERS[key] = torch.zeros(max(n, 4096), dtype=torch.int32, device=device)
    return buf


def tma_aligned(t: torch.Tensor) -> bool:
    """TMA's rules for a tensor a host descriptor covers: a 16-byte aligned base and 16-byte multiples for every
    stride but the last."""
    size = t.element_size()
    return not t.data_ptr() % 16 and not any(st * size % 16 for st in t.stride()[:-1])


def host_descriptor(cls, t: torch.Tensor, block, **extra):
    """``cls(t, shape, strides, block, *extra)`` for a host descriptor class (Triton's, or Gluon's with
    ``layout=``), without the dataclass's re-validation (~10 µs of host time per descriptor in run 29's profile),
    for a tensor the caller checked (``tma_aligned``); the plain constructor when the class's fields are not the
    ones this was written against."""
    if tuple(getattr(cls, "__dataclass_fields__", ())) == ("base", "shape", "strides", "block_shape", *extra,
                                                            "padding"):
        d = object.__new__(cls)
        d.__dict__.update(base=t, shape=list(t.shape), strides=list(t.stride()), block_shape=list(block),
                          padding="zero", **extra)
        return d
    return cls(t, list(t.shape), list(t.stride()), list(block), *extra.values())


def _idle(hook) -> bool:
    """No launch hook to call: None, or Triton 3.6's empty HookChain (which Triton's own path calls anyway)."""
    return hook is None or getattr(hook, "calls", None) == []


def _kernel_state(fn):
    """(param names, defaults, {key: (compiled kernel, direct launcher)}, {argument types: layout}) of a kernel, or
    None for an object that only quacks like one (``fn[grid]`` with no signature, e.g. a test's spy): those take the
    plain path."""
    st = _state.get(fn)
    if st is None:
        import inspect
        sig = getattr(fn, "signature", None)
        if not isinstance(sig, inspect.Signature):
            return None
        params = sig.parameters
        defaults = {n: p.default for n, p in params.items() if p.default is not inspect.Parameter.empty}
        st = _state[fn] = (tuple(params), defaults, {}, {})
    return st


def _layout(types):
    """Where the plain values, the tensors and the other arguments sit in an argument list of these types:
    (getter of the plain values as a tuple, tensor positions, other positions). Computed once per type pattern, so
    that a key is built by C-level item getters instead of a Python test per argument."""
    plain = [i for i, t in enumerate(types) if t in _PLAIN]
    tensors = tuple(i for i, t in enumerate(types) if issubclass(t, _TENSOR))
    other = tuple(i for i, t in enumerate(types) if t not in _PLAIN and not issubclass(t, _TENSOR))
    if len(plain) >= 2:
        getter = operator.itemgetter(*plain)
    elif plain:
        getter = lambda vals, i=plain[0]: (vals[i],)  # noqa: E731
    else:
        getter = lambda vals: ()  # noqa: E731
    return getter, tensors, other


def _direct(kernel):
    """(C launcher, descriptor positions, cooperative flag, PDL flag) to launch ``kernel`` without Triton's Python
    wrappers, or None where its launcher is not the Triton 3.6 CUDA one this was written against (then
    ``kernel.run`` is called as usual).

    The wrapper this skips expands each host ``TensorDescriptor`` argument into an encoded CUtensorMap plus its
    shape and strides (``make_tensordesc_arg``), re-encoding it on every launch; here the expansion is cached by
    everything the encoding reads (base address, shape, strides, dtype and the kernel's block/swizzle metadata),
    so an equal descriptor gets the same bytes without the encode."""
    try:
        run = kernel.run
        if run.global_scratch_size or run.profile_scratch_size:
            return None
        wrapped, coop, pdl = run.launch, run.launch_cooperative_grid, run.launch_pdl
    except AttributeError:
        return None
    code = getattr(wrapped, "__code__", None)
    if code is None:  # the C launcher itself: no descriptor arguments
        return wrapped, (), coop, pdl
    cells = dict(zip(code.co_freevars, (c.cell_contents for c in wrapped.__closure__ or ())))
    raw, positions, metas = cells.get("launcher"), cells.get("tensordesc_indices"), cells.get("tensordesc_meta")
    if wrapped.__name__ != "inner" or raw is None or positions is None or not metas or None in metas:
        return None
    descs = tuple((i, m, _frozen(m)) for i, m in zip(sorted(positions), metas))
    try:
        hash(tuple(d[2] for d in descs))
    except TypeError:  # metadata of a form this does not know: Triton's own path
        return None
    return raw, descs, coop, pdl


def _frozen(value):
    """A hashable copy of a descriptor's metadata (a dict holding lists, e.g. its block size)."""
    if isinstance(value, dict):
        return tuple((k, _frozen(v)) for k, v in sorted(value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(v) for v in value)
    return value


_RECORD = None  # while ``recording``: the list of launch() calls (for launch plans)
_encoded = {}  # descriptor key -> [CUtensorMap, *shape, *strides]
_MAX_ENCODED = 1024


def _expand(vals, descs):
    """``vals`` with each descriptor replaced by its launcher arguments (see ``_direct``)."""
    from triton.backends.nvidia.driver import make_tensordesc_arg
    out, prev = [], 0
    for i, meta, meta_key in descs:
        d = vals[i]
        b = d.base
        key = (b.data_ptr(), b.dtype, tuple(d.shape), tuple(d.strides), tuple(d.block_shape), d.padding, meta_key)
        enc = _encoded.get(key)
        if enc is None:
            if len(_encoded) >= _MAX_ENCODED:
                _encoded.clear()
            enc = _encoded[key] = make_tensordesc_arg(d, meta)
        out += vals[prev:i]
        out += enc
        prev = i + 1
    out += vals[prev:]
    return out


def _cache_key(vals, layouts, device, num_warps, num_stages, maxnreg):
    """``launch``'s cache key of an argument list (see the module docstring)."""
    types = tuple(map(type, vals))
    layout = layouts.get(types)
    if layout is None:
        layout = layouts[types] = _layout(types)
    plain, tensors, other = layout
    return (device, num_warps, num_stages, maxnreg, triton.knobs.runtime.debug, types, plain(vals),
            tuple([(vals[i].dtype, not vals[i].data_ptr() & 15) for i in tensors]),
            tuple([_spec(vals[i]) for i in other]))


def launch(fn, grid, args, kwargs, num_warps: int, num_stages: int, maxnreg=None):
    """``fn[grid](*args, **kwargs, num_warps=num_warps, num_stages=num_stages[, maxnreg=maxnreg])``, through the
    cache above.

    ``fn`` a ``@triton.jit`` or ``@gluon.jit`` kernel; ``grid`` a tuple of ints; ``args`` the leading positional
    arguments; ``kwargs`` the rest by name (constexprs included). No other launch options."""
    if _RECORD is not None:
        _RECORD.append((fn, grid, args, kwargs, num_warps, num_stages, maxnreg))
    opts = {} if maxnreg is None else {"maxnreg": maxnreg}
    st = _kernel_state(fn) if _ENABLED else None
    vals = None
    if st is not None:
        names, defaults, cache, layouts = st
        try:
            vals = list(args) + [kwargs[n] if n in kwargs else defaults[n] for n in names[len(args):]]
        except KeyError:  # a missing argument: Triton's path reports it
            pass
    if vals is None:  # interpreter, cache off, not a @triton.jit kernel, or an argument missing
        return fn[grid](*args, **kwargs, num_warps=num_warps, num_stages=num_stages, **opts)
    device = torch.cuda.current_device()  # Triton compiles for and launches on the current device, as here
    key = _cache_key(vals, layouts, device, num_warps, num_stages, maxnreg)
    entry = cache.get(key)
    if entry is None:
        stats["misses"] += 1
        kernel = fn[grid](*args, **kwargs, num_warps=num_warps, num_stages=num_stages, **opts)
        if hasattr(kernel, "result"):  # asynchronous compilation mode: a future
            kernel = kernel.result()
        if len(cache) >= _MAX_ENTRIES:
            cache.clear()
        cache[key] = (kernel, _direct(kernel))
        return kernel
    stats["hits"] += 1
    kernel, direct = entry
    stream = _raw_stream(device)
    g1 = grid[1] if len(grid) > 1 else 1
    g2 = grid[2] if len(grid) > 2 else 1
    enter, leave = triton.knobs.runtime.launch_enter_hook, triton.knobs.runtime.launch_exit_hook
    if _idle(enter) and _idle(leave):  # no profiler hooked in: skip building the launch metadata
        if direct is not None and _DIRECT:
            raw, descs, coop, pdl = direct
            raw(grid[0], g1, g2, stream, kernel.function, coop, pdl, None, None, kernel.packed_metadata, None, None,
                None, *(_expand(vals, descs) if descs else vals))
            return kernel
        meta = enter = leave = None
    else:
        meta = kernel.launch_metadata(grid, stream, *vals)
    kernel.run(grid[0], g1, g2, stream, kernel.function, kernel.packed_metadata, meta, enter, leave, *vals)
    return kernel


@contextlib.contextmanager
def recording():
    """Record every ``launch`` call inside the block (its arguments as given): yields the list that ``plan`` turns
    into ``LaunchPlan`` objects."""
    global _RECORD
    outer, _RECORD = _RECORD, []
    record = _RECORD
    try:
        yield record
    finally:
        _RECORD = outer
        if outer is not None:
            outer.extend(record)


class _DescView:
    """What ``make_tensordesc_arg`` reads of a host descriptor (base, shape, strides, padding), over a new base."""
    __slots__ = ("base", "shape", "strides", "padding")

    def __init__(self, base, shape, strides, padding):
        self.base, self.shape, self.strides, self.padding = base, shape, strides, padding


def plans_ready() -> bool:
    """Whether ``LaunchPlan.launch`` may run now: no launch hook set (a profiler wants Triton's own path)."""
    knobs = triton.knobs.runtime
    return _idle(knobs.launch_enter_hook) and _idle(knobs.launch_exit_hook)


class LaunchPlan:
    """One compiled kernel's launch with every argument fixed but the tensors of named roles (``plan``): a call of
    the same shapes, strides, dtypes, scalars, flags and alignment as the one it was made from replays it with its
    own tensors through Triton's C launcher, without building the argument list, the cache key or the host
    descriptors again (each role's descriptor is re-encoded per base address, cached). Call ``launch`` only while
    ``plans_ready()`` and ``current()`` hold."""
    __slots__ = ("raw", "function", "packed", "coop", "pdl", "grid", "device", "debug", "template", "tensor_slots",
                 "desc_slots", "keep", "encoded")

    def current(self) -> bool:
        """Triton's debug knob (part of the compiled kernel's key) is what it was when the plan was made."""
        return triton.knobs.runtime.debug == self.debug

    def launch(self, tensors):
        flat = self.template.copy()
        for pos, role in self.tensor_slots:
            flat[pos] = tensors[role]
        encoded = self.encoded
        for pos, n, role, shape, strides, padding, meta in self.desc_slots:
            t = tensors[role]
            enc = encoded.get((pos, t.data_ptr()))
            if enc is None:
                from triton.backends.nvidia.driver import make_tensordesc_arg
                if len(encoded) >= _MAX_PLAN_ENCODED:
                    encoded.clear()
                enc = encoded[(pos, t.data_ptr())] = make_tensordesc_arg(_DescView(t, shape, strides, padding), meta)
            flat[pos:pos + n] = enc
        g = self.grid
        self.raw(g[0], g[1], g[2], _raw_stream(self.device), self.function, self.coop, self.pdl, None, None,
                 self.packed, None, None, None, *flat)


_MAX_PLAN_ENCODED = 64  # per plan: (descriptor, base address) encodings kept


def plan(fn, grid, args, kwargs, num_warps: int, num_stages: int, maxnreg=None, *, roles, keep=(), views=()):
    """A ``LaunchPlan`` of a launch that ``launch`` made with these arguments (a ``recording`` entry; its compiled
    kernel is then cached), or None where the direct launcher does not apply (interpreter, cache or direct launch
    off, a launcher of another form) or an argument tensor (or descriptor base) is none of these:

    - ``roles``: {role name: tensor} of the tensors a replay passes anew, matched by identity;
    - ``views``: role names whose tensor may also appear as another tensor object starting at the same address
      (a view such as ``stats.view(-1)``): matched by address, replayed as the role's tensor (the launcher reads a
      tensor's address only, and a host descriptor's base address only, its geometry being fixed);
    - ``keep``: tensors the plan holds as they are (e.g. a cached work list).

    The caller keys its plans on everything else the arguments depend on — shapes, strides, dtypes, scalars,
    flags, the 16-byte alignment of every role's tensor and which roles share a tensor — so that a replay's
    arguments equal a fresh launch's but for the roles' addresses."""
    st = _kernel_state(fn) if _ENABLED and _DIRECT else None
    if st is None:
        return None
    names, defaults, cache, layouts = st
    try:
        vals = list(args) + [kwargs[n] if n in kwargs else defaults[n] for n in names[len(args):]]
    except KeyError:
        return None
    device = torch.cuda.current_device()
    entry = cache.get(_cache_key(vals, layouts, device, num_warps, num_stages, maxnreg))
    if entry is None or entry[1] is None:
        return None
    kernel, (raw, descs, coop, pdl) = entry
    from triton.backends.nvidia.driver import make_tensordesc_arg
    by_id = {id(t): name for name, t in roles.items() if t is not None}
    by_address = {roles[name].data_ptr(): name for name in views if roles.get(name) is not None}
    kept = {id(t): t for t in keep}
    used = {}

    def role_of(t):
        """(role name or None, known): a role, a kept tensor (None, True), or unknown (None, False)."""
        name = by_id.get(id(t))
        if name is None:
            name = by_address.get(t.data_ptr())
        if name is not None:
            return name, True
        if id(t) in kept:
            used[id(t)] = t
            return None, True
        return None, False

    metas = {i: meta for i, meta, _ in descs}
    template, tensor_slots, desc_slots = [], [], []
    for i, val in enumerate(vals):
        if i in metas:
            role, known = role_of(val.base)
            if not known:
                return None
            enc = make_tensordesc_arg(val, metas[i])
            if role is not None:
                desc_slots.append((len(template), len(enc), role, list(val.shape), list(val.strides), val.padding,
                                   metas[i]))
            template += enc
        elif isinstance(val, _TENSOR):
            role, known = role_of(val)
            if not known:
                return None
            if role is not None:
                tensor_slots.append((len(template), role))
            template.append(None if role is not None else val)  # no reference to this call's tensors
        else:
            template.append(val)
    lp = LaunchPlan()
    lp.raw, lp.function, lp.packed, lp.coop, lp.pdl = raw, kernel.function, kernel.packed_metadata, coop, pdl
    lp.grid = (grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1)
    lp.device, lp.debug, lp.template = device, triton.knobs.runtime.debug, template
    lp.tensor_slots, lp.desc_slots = tuple(tensor_slots), tuple(desc_slots)
    lp.keep, lp.encoded = tuple(used.values()), {}
    return lp
