"""flash-attn 2.8's top-level package, backed by tileattn's Triton kernels.

Importable as ``tileattn.compat.flash_attn``, or as ``flash_attn`` after ``tileattn.compat.install()``.
The functions are tileattn's (``tileattn.flash_api``): flash-attn 2.8's names, arguments and return values,
plus a keyword-only ``sink=``. ``flash_attn_with_kvcache`` is tileattn's split-KV decode (contiguous or paged cache).
"""

__version__ = "2.8.3+tileattn"

from .flash_attn_interface import (  # noqa: E402
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
    flash_attn_with_kvcache,
)

__all__ = [
    "__version__",
    "flash_attn_func",
    "flash_attn_kvpacked_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func",
    "flash_attn_with_kvcache",
]
