"""Shared test setup: Triton kernels run in the interpreter on machines without CUDA, and SPARSESPEC
may be configured for (and run on) a CPU: the project's test mode (config.CPU_TEST_ENV)."""

import os

import torch

if not torch.cuda.is_available():
    # Must be set before any @triton.jit kernel module is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("SPARSESPEC_CPU_TEST", "1")
