from __future__ import annotations

import math

import torch

from .. import _backend, _validate as check, reference
from .frontier_expand import DTYPE_CODE

# Rows at most: past this a GEMM re-reading the weights is as fast (the BLAS is used instead).
MAX_ROWS = 64


def skinny_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    out: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """y = x weight^T + bias for a few rows (a decode step's tokens), each row's result
    independent of the other rows.

    Args:
        x: [..., K] float32/float16/bfloat16 (float64: reference backend only), its rows
            flattened to M = x.numel() / K <= 64.
        weight: [N, K] in x's dtype (an nn.Linear weight); bias: [N] in x's dtype, or None.
        out: optional preallocated [..., N] output in x's dtype; backend: as for every op.

    Returns [..., N] in x's dtype: each entry is a float32 sum rounded once (bias added in
    float32). The C++ kernel reads the weight once for all rows and sums every output in one
    fixed order, so row i of a call on M rows is bitwise equal to a call on row i alone (a
    verify forward over m tree tokens computes what m one-token forwards would); the BLAS
    does neither for 2 <= M <= 64. Results agree with the reference (torch.nn.functional.linear
    in float32) within float32 rounding.
    """
    check.tensor("x", x, dtypes=check.FLOATS_OR_F64)
    if x.dim() == 0:
        check.fail("x", "at least 1 dim [..., K]", "a 0-dim tensor")
    K, M = x.shape[-1], math.prod(x.shape[:-1])
    if M > MAX_ROWS:
        check.fail("x", f"at most {MAX_ROWS} rows (use torch.nn.functional.linear for more)", f"{M} rows")
    dev = x.device
    check.tensor("weight", weight, dtypes=(x.dtype,), shape=(None, K), device=dev)
    N = weight.shape[0]
    if bias is not None:
        check.tensor("bias", bias, dtypes=(x.dtype,), shape=(N,), device=dev)
    shape = (*x.shape[:-1], N)
    if out is None:
        out = torch.empty(shape, dtype=x.dtype, device=dev)
    else:
        check.tensor("out", out, dtypes=(x.dtype,), shape=shape, device=dev)
    backend = check.f64_backend("x", x, backend)
    _skinny_linear(x, weight, bias, backend, out)
    return out


def skinny_linear_bf16_dot() -> bool:
    """Whether the CPU kernel multiplies bfloat16 with AVX512-BF16's dot-product instruction on
    this machine: then a bfloat16 layer costs about half a float32 one (half the bytes read,
    twice the multiply-adds per instruction); otherwise bfloat16 is widened to float32 first.
    False without the CPU kernels."""
    return _backend.backends()["cpu"] == "available" and _backend.native("cpu").skinny_linear_bf16_dot()


class SkinnyLinearPlan:
    """`skinny_linear` with its weight (and bias) checked once, for a caller that multiplies the
    same weights every step (a decode loop's linear layers): `plan(x)` is
    `skinny_linear(x, weight, bias, backend=backend)`. Per call it checks only x and that the
    tensors still have the shape, dtype and place it checked (`module.to(...)` replaces a
    parameter's data in place), then calls the CPU kernel directly: the op's own checks and
    dispatch cost several times the kernel's time on one row of a small layer. Any call it
    cannot take that way (another backend, `out=`, inside torch.compile, arguments the op would
    refuse) runs the op itself, with its errors. The plan holds the tensors, not copies."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, *, backend: str | None = None):
        check.tensor("weight", weight, dtypes=check.FLOATS_OR_F64, shape=(None, None))
        N, K = weight.shape
        if bias is not None:
            check.tensor("bias", bias, dtypes=(weight.dtype,), shape=(N,), device=weight.device)
        self.weight, self.bias, self.backend = weight, bias, backend
        self.dtype, self.N, self.K = weight.dtype, N, K
        # The kernel directly only where the op would pick it; K = 0 leaves nothing to compute.
        resolved = _backend.resolve("skinny_linear", weight.device, check.f64_backend("weight", weight, backend))
        self._direct = resolved == "cpu" and K > 0

    def _unchanged(self, t: torch.Tensor, shape: tuple) -> bool:
        return t.shape == shape and t.dtype == self.dtype and t.is_cpu and t.is_contiguous()

    def __call__(self, x: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
        """skinny_linear(x, weight, bias, out=out, backend=backend) of the plan's tensors."""
        w, b = self.weight, self.bias
        if (not self._direct or out is not None or type(x) is not torch.Tensor or x.dtype != self.dtype
                or not x.is_cpu or x.dim() == 0 or x.shape[-1] != self.K or not x.is_contiguous()
                or x.numel() > MAX_ROWS * self.K or not self._unchanged(w, (self.N, self.K))
                or (b is not None and not self._unchanged(b, (self.N,))) or torch.compiler.is_compiling()):
            return skinny_linear(x, w, b, out=out, backend=self.backend)
        y = torch.empty((*x.shape[:-1], self.N), dtype=self.dtype)
        _cpu(x, w, b, y)
        return y


@_backend.custom_op("skinny_linear", ("out",))
def _skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, backend: str | None,
                   out: torch.Tensor) -> None:
    """torch.ops.eagle2_kernels.skinny_linear: `skinny_linear` on validated inputs, into out."""
    _backend.dispatch("skinny_linear", x.device, backend)(x, weight, bias, out)


def _reference(x, weight, bias, out) -> None:
    out.copy_(reference.skinny_linear(x, weight, bias))


def _cpu(x, weight, bias, out) -> None:
    N, K = weight.shape
    _backend.call_native(
        "cpu", "skinny_linear", x,
        x.data_ptr(), weight.data_ptr(), bias.data_ptr() if bias is not None else 0, DTYPE_CODE[x.dtype],
        math.prod(x.shape[:-1]), K, N, out.data_ptr(),
    )


_backend.implements("skinny_linear", reference=_reference, cpu=_cpu)
