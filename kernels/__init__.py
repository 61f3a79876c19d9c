"""Triton kernels for Kimi Delta Attention, importable as ``kimi_linear.kernels``."""
