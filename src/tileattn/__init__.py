"""tileattn: exact FlashAttention forward and backward in Triton kernels, wrapped for PyTorch."""

__version__ = "0.1.0"

from .api import attention  # noqa: E402

__all__ = ["attention", "__version__"]
