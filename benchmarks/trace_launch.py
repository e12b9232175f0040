"""The program-trace tools' one hook (``bwd_trace.py``, ``fwd_trace.py``, ``decode_trace.py``): within
``extra_kwargs(module, kernel, extra)``, every launch of ``kernel`` through ``module.launch`` (the kernels'
launch helper, looked up at call time) gets ``extra(grid, kwargs)`` (a dict, or None for none) added to its
keyword arguments, e.g. a fresh TRACE buffer."""
import contextlib


@contextlib.contextmanager
def extra_kwargs(module, kernel, extra):
    real = module.launch

    def launch(fn, grid, args, kwargs, *rest, **opts):
        more = extra(grid, kwargs) if fn is kernel else None
        return real(fn, grid, args, dict(kwargs, **more) if more else kwargs, *rest, **opts)
    module.launch = launch
    try:
        yield
    finally:
        module.launch = real
