"""Shared test setup: Triton kernels run in the interpreter on machines without CUDA."""

import os

import torch

if not torch.cuda.is_available():
    # Must be set before any @triton.jit kernel module is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")
