"""What the kernel tests share: the backends each op is tested on here, and their device."""
from __future__ import annotations

import os

import torch

import eagle2_kernels as ek

# EAGLE2_COLLECT_CUDA=1 parametrizes the CUDA tests without a GPU, for `pytest --collect-only`
# (bench/gpu_check.sh --dry-run counts what a GPU run would select); running them needs a GPU.
CUDA = ek.backends()["cuda"] == "available" or os.environ.get("EAGLE2_COLLECT_CUDA") == "1"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def backends_under_test(op: str, reference: bool = False, native: bool = False) -> list[str]:
    """The implementations of `op` (eagle2_kernels.IMPLEMENTATIONS) tested on this machine:
    CUDA only where a device is visible, Triton always (its CPU interpreter runs without a GPU),
    the reference only when asked (most tests use it as the oracle), native = C++ and CUDA only."""
    keep = ("cpu", "cuda") if native else ("reference", "cpu", "cuda", "triton") if reference else ("cpu", "cuda", "triton")
    return [b for b in ek.IMPLEMENTATIONS[op] if b in keep and (b != "cuda" or CUDA)]


def device_of(backend: str) -> torch.device:
    """Where a backend's inputs live: CUDA for cuda, and for triton when a GPU is present."""
    return torch.device("cuda" if backend == "cuda" or (backend == "triton" and torch.cuda.is_available()) else "cpu")
