"""Fused GPU kernels for the fan-out (Triton, imported lazily: only CUDA paths load it)."""
