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
from typing import Callable

import torch

NAMES = ("reference", "cpu", "cuda", "triton")
# Each public op's implementations, backend -> callable, filled by the op modules (ops/*.py) with
# `implements`; dispatch and the tests both read it. Pipeline order.
IMPLEMENTATIONS: dict[str, dict[str, Callable]] = {
    op: {} for op in ("frontier_expand", "rerank", "tree_attention", "tree_verify", "kv_compact", "skinny_linear")
}


def implements(op: str, **by_backend: Callable) -> None:
    """Record `op`'s implementations (reference=..., cpu=..., cuda=..., triton=...)."""
    unknown = set(by_backend) - set(NAMES)
    if unknown:
        raise ValueError(f"backend: {op} names unknown backends {sorted(unknown)}")
    IMPLEMENTATIONS[op].update(by_backend)


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
        return why + " (the package was built without its CUDA module: no nvcc, or EAGLE2_NO_CUDA=1)"
    if mod.device_count() == 0:
        return "built, but no CUDA device is visible"
    return None


def backends() -> dict[str, str]:
    """Each backend's status: 'available' or the reason it is not (found once per process)."""
    return dict(_backends())


@functools.cache
def _backends() -> dict[str, str]:
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
    """Run a native op on `like`'s device, appending the most CPU threads it may use (torch's
    own setting: the kernels share torch's OpenMP pool) and that device's current stream handle
    (0 for CPU), so kernels launch where the tensors live and stay stream-ordered."""
    fn = getattr(native(backend), op)
    if not like.is_cuda:
        fn(*args, torch.get_num_threads(), 0)
        return
    with torch.cuda.device(like.device):
        fn(*args, 0, torch.cuda.current_stream(like.device).cuda_stream)


def custom_op(op: str, mutates: tuple[str, ...]):
    """Register the decorated implementation as torch.ops.eagle2_kernels.<op>. It writes the
    output tensors it is given (declared mutated, so torch.compile sees the writes) and returns
    nothing, which is all its fake implementation has to say. Returns the function the public
    op calls: the registered op while torch.compile traces, the implementation itself in eager
    mode, where the dispatcher would add about 100 us a call on a CPU (same computation)."""
    def register(impl):
        registered = torch.library.custom_op(f"eagle2_kernels::{op}", impl, mutates_args=mutates)
        registered.register_fake(lambda *args, **kwargs: None)

        @functools.wraps(impl)
        def call(*args) -> None:
            (registered if torch.compiler.is_compiling() else impl)(*args)
        return call
    return register


def call_triton(op: str, like: torch.Tensor, *args) -> None:
    """Run `op`'s Triton launcher (eagle2_kernels.triton.<op>.<op>_triton) with `like`'s device
    current: Triton launches on the current CUDA device, not on the tensors' own."""
    fn = getattr(importlib.import_module(f"eagle2_kernels.triton.{op}"), f"{op}_triton")
    if not like.is_cuda:
        fn(*args)
        return
    with torch.cuda.device(like.device):
        fn(*args)


def dispatch(op: str, device: torch.device, backend: str | None) -> Callable:
    """The implementation of `op` that a call on `device` with `backend=` runs."""
    return IMPLEMENTATIONS[op][resolve(op, device, backend)]


def resolve(op: str, device: torch.device, backend: str | None) -> str:
    """Pick the backend for one call: the explicit override, else the fastest that runs here."""
    supported = tuple(IMPLEMENTATIONS[op])
    if backend is not None:
        if backend not in NAMES:
            raise ValueError(f"backend: expected one of {NAMES} or None, got {backend!r}")
        if backend not in supported:
            raise ValueError(f"backend: {op} has no {backend!r} implementation (it has {supported})")
        why = _backends()[backend]
        if why != "available":
            raise RuntimeError(f"backend {backend!r} for {op} unavailable: {why}")
        if backend == "cpu" and device.type != "cpu":
            raise ValueError(f"backend: 'cpu' needs CPU tensors, got tensors on {device}")
        if backend == "cuda" and device.type != "cuda":
            raise ValueError(f"backend: 'cuda' needs CUDA tensors, got tensors on {device}")
        if backend == "triton" and device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("backend: 'triton' on CPU tensors needs TRITON_INTERPRET=1")
        return backend
    status = _backends()
    order = ("cuda", "triton") if device.type == "cuda" else ("cpu",)
    for name in order:
        if name in supported and status[name] == "available":
            return name
    return "reference"
