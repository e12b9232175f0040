"""Drop-in stand-ins for other attention libraries, running on tileattn's kernels.

``tileattn.compat.flash_attn`` is a package laid out like flash-attn 2.8 (``flash_attn``,
``flash_attn.flash_attn_interface``, ``flash_attn.bert_padding``, ``flash_attn.layers.rotary``). It can be
imported under its own name at any time; :func:`install` additionally makes ``import flash_attn`` (and those
submodules) resolve to it in the current process, so code written against flash-attn runs unchanged::

    import tileattn.compat
    tileattn.compat.install()
    from flash_attn import flash_attn_func          # tileattn's
    from flash_attn.bert_padding import unpad_input  # tileattn's

Only the modules listed above exist; any other ``flash_attn.*`` submodule (``flash_attn.modules.mha``,
``flash_attn.ops...``) raises ModuleNotFoundError. The install is per process and is not visible to package
metadata: ``importlib.metadata.version("flash_attn")`` still fails.
"""

import importlib
import importlib.machinery
import importlib.util
import os
import sys
import threading
from typing import Dict

__all__ = ["install", "uninstall", "is_installed", "SHIM_PACKAGE", "ALIASES"]

SHIM_PACKAGE = __name__ + ".flash_attn"

# alias in sys.modules -> the shim module it resolves to
ALIASES = {
    "flash_attn": SHIM_PACKAGE,
    "flash_attn.flash_attn_interface": SHIM_PACKAGE + ".flash_attn_interface",
    "flash_attn.bert_padding": SHIM_PACKAGE + ".bert_padding",
    "flash_attn.layers": SHIM_PACKAGE + ".layers",
    "flash_attn.layers.rotary": SHIM_PACKAGE + ".layers.rotary",
}

_MISSING = object()
_saved: Dict[str, object] = {}  # alias -> what sys.modules held before install() (or _MISSING)
_lock = threading.RLock()


def _shim_dir() -> str:
    return os.path.realpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "flash_attn"))


def _is_shim_module(module) -> bool:
    return getattr(module, "__name__", "").startswith(SHIM_PACKAGE) and module is sys.modules.get(module.__name__)


def is_installed() -> bool:
    """True when ``sys.modules["flash_attn"]`` is tileattn's shim."""
    module = sys.modules.get("flash_attn")
    return module is not None and module is sys.modules.get(SHIM_PACKAGE)


def _real_flash_attn():
    """Where a genuine flash-attn would come from (an imported module or a spec), or None.

    Our own shim never counts, whether already aliased in sys.modules or found on sys.path.
    """
    module = sys.modules.get("flash_attn", _MISSING)
    if module is not _MISSING:
        if module is None or _is_shim_module(module):
            return None
        return module
    try:
        spec = importlib.util.find_spec("flash_attn")  # looked up at call time (tests monkeypatch it)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    locations = [spec.origin] if spec.origin else []
    locations += list(spec.submodule_search_locations or [])
    for loc in locations:
        if loc and os.path.realpath(loc if os.path.isdir(loc) else os.path.dirname(loc)) == _shim_dir():
            return None
    return spec


def _describe(real) -> str:
    where = getattr(real, "origin", None) or getattr(real, "__file__", None)
    kind = "already imported" if not isinstance(real, importlib.machinery.ModuleSpec) else "importable"
    return f"flash-attn is {kind} in this process" + (f" ({where})" if where else "")


def install(force: bool = False):
    """Make ``import flash_attn`` resolve to tileattn's flash-attn 2.8 shim in this process.

    Aliases ``flash_attn``, ``flash_attn.flash_attn_interface``, ``flash_attn.bert_padding``,
    ``flash_attn.layers`` and ``flash_attn.layers.rotary`` in ``sys.modules``. Idempotent. Returns the shim's
    top-level module.

    If a genuine flash-attn is importable (``importlib.util.find_spec("flash_attn")``) or already imported,
    raises RuntimeError rather than shadowing it, unless ``force=True``. With ``force=True`` the aliases replace
    it for every later ``import``; modules that already hold references to the real one keep them, and
    :func:`uninstall` puts the previous ``sys.modules`` entries back.
    """
    with _lock:
        if is_installed():
            return sys.modules["flash_attn"]
        real = _real_flash_attn()
        if real is not None and not force:
            raise RuntimeError(
                f"{_describe(real)}; tileattn.compat.install() will not shadow a real flash-attn. Use the real "
                f"one, uninstall it, or call tileattn.compat.install(force=True) to make `import flash_attn` "
                f"resolve to tileattn's shim in this process anyway.")
        modules = {alias: importlib.import_module(target) for alias, target in ALIASES.items()}
        for alias, module in modules.items():
            current = sys.modules.get(alias, _MISSING)
            if current is not module and alias not in _saved:
                _saved[alias] = current
            sys.modules[alias] = module
        return modules["flash_attn"]


def uninstall() -> bool:
    """Undo :func:`install`: drop the aliases (restoring whatever ``sys.modules`` held before). Idempotent.

    Returns True if anything was removed. Names bound by earlier ``import flash_attn`` statements keep
    pointing at the shim.
    """
    with _lock:
        removed = False
        for alias, target in ALIASES.items():
            shim = sys.modules.get(target)
            if shim is not None and sys.modules.get(alias) is shim:
                previous = _saved.get(alias, _MISSING)
                if previous is _MISSING:
                    del sys.modules[alias]
                else:
                    sys.modules[alias] = previous
                removed = True
        _saved.clear()
        return removed
