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
shapes) take Triton's normal path, which compiles if needed and returns the kernel cached here.

Off under the interpreter (its kernels are not compiled) and with ``TILEATTN_FAST_LAUNCH=0`` (read at import).
"""

import os

import torch
import triton

_ENABLED = not triton.knobs.runtime.interpret and os.environ.get("TILEATTN_FAST_LAUNCH", "1") != "0"
_MAX_ENTRIES = 4096  # per kernel; keys hold exact sizes, so a stream of new shapes must not grow it forever

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # older Triton: no host descriptors, nothing to key on
    class TensorDescriptor:  # noqa: D401 - placeholder type that no argument is an instance of
        pass

_TENSOR = torch.Tensor
_PLAIN = frozenset((int, float, bool, str, type(None)))  # keyed by value (with the types tuple beside)
_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", lambda d: torch.cuda.current_stream(d).cuda_stream)
_DESC = TensorDescriptor
_state = {}  # JITFunction -> (param names, defaults by name, {key: compiled kernel})
stats = {"hits": 0, "misses": 0}  # for tests and benchmarks/host_profile.py


def _spec(v):
    """An argument's part of the key (see the module docstring)."""
    if isinstance(v, _TENSOR):
        return v.dtype, v.data_ptr() % 16 == 0
    if isinstance(v, _DESC):
        b = v.base
        return (b.dtype, b.data_ptr() % 16 == 0, tuple(v.shape), tuple(v.strides), tuple(v.block_shape),
                v.padding)
    return v


def _idle(hook) -> bool:
    """No launch hook to call: None, or Triton 3.6's empty HookChain (which Triton's own path calls anyway)."""
    return hook is None or getattr(hook, "calls", None) == []


def _kernel_state(fn):
    """(param names, defaults, cache) of a kernel, or None for an object that only quacks like one (``fn[grid]``
    with no signature, e.g. a test's spy): those take the plain path."""
    st = _state.get(fn)
    if st is None:
        import inspect
        sig = getattr(fn, "signature", None)
        if not isinstance(sig, inspect.Signature):
            return None
        params = sig.parameters
        defaults = {n: p.default for n, p in params.items() if p.default is not inspect.Parameter.empty}
        st = _state[fn] = (tuple(params), defaults, {})
    return st


def launch(fn, grid, args, kwargs, num_warps: int, num_stages: int):
    """``fn[grid](*args, **kwargs, num_warps=num_warps, num_stages=num_stages)``, through the cache above.

    ``fn`` a ``@triton.jit`` kernel; ``grid`` a tuple of ints; ``args`` the leading positional arguments;
    ``kwargs`` the rest by name (constexprs included). No other launch options."""
    st = _kernel_state(fn) if _ENABLED else None
    vals = None
    if st is not None:
        names, defaults, cache = st
        try:
            vals = list(args) + [kwargs[n] if n in kwargs else defaults[n] for n in names[len(args):]]
        except KeyError:  # a missing argument: Triton's path reports it
            pass
    if vals is None:  # interpreter, cache off, not a @triton.jit kernel, or an argument missing
        return fn[grid](*args, **kwargs, num_warps=num_warps, num_stages=num_stages)
    device = torch.cuda.current_device()  # Triton compiles for and launches on the current device, as here
    key = (device, num_warps, num_stages, triton.knobs.runtime.debug, tuple(map(type, vals)),
           tuple([v if v.__class__ in _PLAIN else _spec(v) for v in vals]))
    kernel = cache.get(key)
    if kernel is None:
        stats["misses"] += 1
        kernel = fn[grid](*args, **kwargs, num_warps=num_warps, num_stages=num_stages)
        if hasattr(kernel, "result"):  # asynchronous compilation mode: a future
            kernel = kernel.result()
        if len(cache) >= _MAX_ENTRIES:
            cache.clear()
        cache[key] = kernel
        return kernel
    stats["hits"] += 1
    stream = _raw_stream(device)
    g1 = grid[1] if len(grid) > 1 else 1
    g2 = grid[2] if len(grid) > 2 else 1
    enter, leave = triton.knobs.runtime.launch_enter_hook, triton.knobs.runtime.launch_exit_hook
    if _idle(enter) and _idle(leave):  # no profiler hooked in: skip building the launch metadata
        meta = enter = leave = None
    else:
        meta = kernel.launch_metadata(grid, stream, *vals)
    kernel.run(grid[0], g1, g2, stream, kernel.function, kernel.packed_metadata, meta, enter, leave, *vals)
    return kernel
