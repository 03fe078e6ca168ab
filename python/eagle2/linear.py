"""Linear layers of a decode step on the CPU: `skinny_linears()` sends them to
eagle2_kernels.skinny_linear.

A decode step multiplies a few rows (1 token for plain decoding, m tree tokens for a verify,
k frontier nodes per draft depth) by every weight matrix. The BLAS re-reads a weight matrix
several times for 2 to 64 rows and sums in an order that depends on the row count; the skinny
kernel reads each weight once and computes each row the same way whatever the count, so a
verify over m tokens costs about what one token costs and its rows are bitwise the rows a
one-token forward computes (see eagle2_kernels.skinny_linear). A TorchFunctionMode, active only
around our own forwards, routes `torch.nn.functional.linear` (what nn.Linear calls) there:
the model object is left as it is, so `model.generate` and everything else run unchanged.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

import eagle2_kernels

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_force_blas = False  # set only inside blas_linears()


class _SkinnyLinears(TorchFunctionMode):
    """F.linear without autograd on CPU tensors of a kernel dtype with at most
    SKINNY_LINEAR_MAX_ROWS rows -> skinny_linear."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x, weight = args[0], args[1]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if (not torch.is_grad_enabled() and x.device.type == "cpu" and x.dtype in DTYPES and weight.dtype == x.dtype
                    and math.prod(x.shape[:-1]) <= eagle2_kernels.SKINNY_LINEAR_MAX_ROWS and x.is_contiguous() and weight.is_contiguous()
                    and (bias is None or bias.dtype == x.dtype)):
                return eagle2_kernels.skinny_linear(x, weight, bias)
        return func(*args, **kwargs)


@torch.compiler.assume_constant_result  # a compiled step takes the answer, not a trace of the import
def _cpu_kernels() -> bool:
    return eagle2_kernels.backends()["cpu"] == "available"


def skinny_linears(device: torch.device | str):
    """Context manager: inside it, linear layers on `device` run on skinny_linear when it is the
    CPU (unless inside `blas_linears`); a no-op on other devices, where the BLAS already streams
    weights once."""
    if not _force_blas and torch.device(device).type == "cpu" and _cpu_kernels():
        return _SkinnyLinears()
    return contextlib.nullcontext()


@contextlib.contextmanager
def blas_linears():
    """Inside it, our forwards keep the BLAS for every linear layer (benchmarks compare the two)."""
    global _force_blas
    saved, _force_blas = _force_blas, True
    try:
        yield
    finally:
        _force_blas = saved
