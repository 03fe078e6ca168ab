"""Linear layers of a decode step on the CPU, on eagle2_kernels.skinny_linear.

A decode step multiplies a few rows (1 token for plain decoding, m tree tokens for a verify,
k frontier nodes per draft depth) by every weight matrix. The BLAS re-reads a weight matrix
several times for 2 to 64 rows and sums in an order that depends on the row count; the skinny
kernel reads each weight once and computes each row the same way whatever the count, so a
verify over m tokens costs about what one token costs and its rows are bitwise the rows a
one-token forward computes (see eagle2_kernels.skinny_linear).

The decode loop runs the target and the draft head through `skinny_twin`: a copy of the
module tree (the module objects only: parameters, buffers and config are the model's own) whose
nn.Linear layers compute `linear`. The user's model object is left as it is, so
`model.generate` and everything else run unchanged, and nothing intercepts the other ops of a
forward (a TorchFunctionMode around each forward, which this replaces, cost about 9% of a
one-token forward of the default target).
"""
from __future__ import annotations

import contextlib
import copy
import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

import eagle2_kernels

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_force_blas = False  # set only inside blas_linears()


@torch.compiler.assume_constant_result  # a compiled step takes the answer, not a trace of the import
@functools.cache  # asked by every linear layer of a step; the answer is fixed per process
def _cpu_kernels() -> bool:
    return eagle2_kernels.backends()["cpu"] == "available"


def _skinny_rows(x: torch.Tensor) -> bool:
    """Whether a linear layer on x may use skinny_linear, as far as x and the mode decide: no
    autograd, a contiguous CPU tensor of a kernel dtype with at most SKINNY_LINEAR_MAX_ROWS rows
    (and not inside `blas_linears`)."""
    return (not _force_blas and not torch.is_grad_enabled() and x.is_cpu and x.dtype in DTYPES
            and x.is_contiguous() and math.prod(x.shape[:-1]) <= eagle2_kernels.SKINNY_LINEAR_MAX_ROWS)


def _skinny_weights(weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether skinny_linear takes these weights: a contiguous weight of a kernel dtype, the bias
    (if any) in the same dtype."""
    return weight.dtype in DTYPES and weight.is_contiguous() and (bias is None or bias.dtype == weight.dtype)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, computed by skinny_linear where that applies: `_skinny_rows(x)` and
    `_skinny_weights` in x's dtype."""
    if _skinny_rows(x) and weight.dtype == x.dtype and _skinny_weights(weight, bias) and _cpu_kernels():
        return eagle2_kernels.skinny_linear(x, weight, bias)
    return F.linear(x, weight, bias)


class SkinnyLinear(nn.Linear):
    """nn.Linear computed by `linear` (the class of the nn.Linear layers in a `skinny_twin`),
    through the SkinnyLinearPlan of its weights that the twin makes when they suit the kernel
    (the op's checks of the weights, skipped per call, are a visible share of a decode step)."""

    plan: eagle2_kernels.SkinnyLinearPlan | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        plan, params = self.plan, self._parameters  # a parameter replaced since: not the plan's
        if (plan is not None and plan.weight is params["weight"] and plan.bias is params["bias"]
                and x.dtype == plan.dtype and _skinny_rows(x)):
            return plan(x)
        return linear(x, self.weight, self.bias)


def skinny_twin(module: nn.Module | None) -> nn.Module | None:
    """The module our forwards run on the CPU: a copy of `module`'s tree of modules whose
    nn.Linear layers are SkinnyLinear. Every parameter, buffer and config is shared with
    `module` (in-place weight changes show through; no memory is copied); each copied module
    has its own hook dictionaries, so hooks transformers installs on the copy (output
    capturing) stay off the original. Costs a few ms for a 30-layer model: make one per decode
    call, since it does not follow later changes to `module`'s structure. On other devices, or
    without the CPU kernels, `module` itself."""
    if module is None or not _cpu_kernels():
        return module
    param = next(module.parameters(), None)
    if param is None or param.device.type != "cpu":
        return module
    return _twin(module, {})


def _twin(module: nn.Module, copies: dict[int, nn.Module]) -> nn.Module:
    if id(module) in copies:  # a module reached twice (shared submodules) is copied once
        return copies[id(module)]
    twin = copy.copy(module)  # shallow: the same parameter, buffer and config objects
    copies[id(module)] = twin
    for name, value in module.__dict__.items():
        if name.endswith("hooks") and isinstance(value, dict):
            setattr(twin, name, type(value)(value))
    twin._modules = {name: None if child is None else _twin(child, copies) for name, child in module._modules.items()}
    if type(module) is nn.Linear:
        twin.__class__ = SkinnyLinear
        if module.weight.is_cpu and _skinny_weights(module.weight, module.bias):
            twin.plan = eagle2_kernels.SkinnyLinearPlan(module.weight, module.bias)
    return twin


@contextlib.contextmanager
def blas_linears():
    """Inside it, `linear` keeps the BLAS for every linear layer (benchmarks compare the two)."""
    global _force_blas
    saved, _force_blas = _force_blas, True
    try:
        yield
    finally:
        _force_blas = saved
