"""Triton kernels, split by phase: ``forward``, ``backward``; shared helpers in ``common``."""
