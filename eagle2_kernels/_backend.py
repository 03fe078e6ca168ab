"""Which implementations exist on this machine, and which one an op call uses.

Backends:
  reference  plain PyTorch (eagle2_kernels.reference), any device, always available
  cpu        C++ kernels in the pybind11 module eagle2_kernels._C, CPU tensors
  cuda       CUDA kernels in eagle2_kernels._cuda, CUDA tensors (built when nvcc was found)
  triton     Triton kernels, CUDA tensors, or CPU tensors under TRITON_INTERPRET=1

The native modules take raw pointers and sizes (no torch at build time); the op wrappers
validate torch tensors and pass `tensor.data_ptr()`.
"""
from __future__ import annotations

import functools
import importlib
import os
import platform

import torch

NAMES = ("reference", "cpu", "cuda", "triton")
# The implementations of each public op: dispatch and the tests both read this table.
IMPLEMENTATIONS = {
    "frontier_expand": ("reference", "cpu", "cuda", "triton"),
    "rerank": ("reference", "cpu", "cuda"),
    "tree_attention": ("reference", "cpu", "cuda", "triton"),
    "tree_verify": ("reference", "cpu", "cuda", "triton"),
    "kv_compact": ("reference", "cpu", "cuda"),
}


@functools.cache
def _load(name: str):
    """(module, None) or (None, reason)."""
    try:
        return importlib.import_module(f"eagle2_kernels.{name}"), None
    except ImportError as e:
        return None, f"{name} not importable: {e}"


def _triton_status() -> str | None:
    """None when Triton can run, else why not."""
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return f"triton not installed ({e})"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return None
    if not torch.cuda.is_available():
        return "no CUDA device (set TRITON_INTERPRET=1 to run the kernels in Triton's CPU interpreter)"
    return None


def _cuda_status() -> str | None:
    mod, why = _load("_cuda")
    if mod is None:
        return why + " (the package was built without nvcc)"
    if mod.device_count() == 0:
        return "built, but no CUDA device is visible"
    return None


def backends() -> dict[str, str]:
    """Each backend's status: 'available' or the reason it is not."""
    cpu_mod, cpu_why = _load("_C")
    status = {
        "reference": None,
        "cpu": None if cpu_mod is not None else cpu_why,
        "cuda": _cuda_status(),
        "triton": _triton_status(),
    }
    return {k: "available" if v is None else v for k, v in status.items()}


def device_name(device: torch.device | str = "cpu") -> str:
    """What runs `device`'s kernels: the CUDA card's name, else the CPU model (for benchmark
    and cache headers)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def native(backend: str):
    """The pybind11 module behind backend 'cpu' or 'cuda'."""
    mod, why = _load("_C" if backend == "cpu" else "_cuda")
    if mod is None:
        raise RuntimeError(f"backend {backend!r} unavailable: {why}")
    return mod


def call_native(backend: str, op: str, like: torch.Tensor, *args) -> None:
    """Run a native op on `like`'s device, appending that device's current stream handle
    (0 for CPU), so kernels launch where the tensors live and stay stream-ordered."""
    fn = getattr(native(backend), op)
    if not like.is_cuda:
        fn(*args, 0)
        return
    with torch.cuda.device(like.device):
        fn(*args, torch.cuda.current_stream(like.device).cuda_stream)


def call_triton(op: str, like: torch.Tensor, *args) -> None:
    """Run `op`'s Triton launcher (eagle2_kernels.triton.<op>.<op>_triton) with `like`'s device
    current: Triton launches on the current CUDA device, not on the tensors' own."""
    fn = getattr(importlib.import_module(f"eagle2_kernels.triton.{op}"), f"{op}_triton")
    if not like.is_cuda:
        fn(*args)
        return
    with torch.cuda.device(like.device):
        fn(*args)


def resolve(op: str, device: torch.device, backend: str | None) -> str:
    """Pick the backend for one call: the explicit override, else the fastest that runs here."""
    supported = IMPLEMENTATIONS[op]
    if backend is not None:
        if backend not in NAMES:
            raise ValueError(f"backend: expected one of {NAMES} or None, got {backend!r}")
        if backend not in supported:
            raise ValueError(f"backend: {op} has no {backend!r} implementation (it has {supported})")
        why = backends()[backend]
        if why != "available":
            raise RuntimeError(f"backend {backend!r} for {op} unavailable: {why}")
        if backend == "cpu" and device.type != "cpu":
            raise ValueError(f"backend: 'cpu' needs CPU tensors, got tensors on {device}")
        if backend == "cuda" and device.type != "cuda":
            raise ValueError(f"backend: 'cuda' needs CUDA tensors, got tensors on {device}")
        if backend == "triton" and device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("backend: 'triton' on CPU tensors needs TRITON_INTERPRET=1")
        return backend
    status = backends()
    order = ("cuda", "triton") if device.type == "cuda" else ("cpu",)
    for name in order:
        if name in supported and status[name] == "available":
            return name
    return "reference"
