"""PillarAttn Triton kernels, each next to its PyTorch reference."""
