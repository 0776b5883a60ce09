"""Kernels torch has no fast form of: C kernels for the CPU (built on first use) and a Triton kernel for CUDA."""
