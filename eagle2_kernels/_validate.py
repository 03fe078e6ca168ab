"""Argument checks shared by the public ops. Every failure is a ValueError that names the
argument, what was expected and what was given."""
from __future__ import annotations

import torch

INDEX = (torch.int32,)
SCORE = (torch.float32,)
FLOATS = (torch.float32, torch.float16, torch.bfloat16)
# float64 is accepted by the ops but only runs on the reference backend (exact decode-loop tests).
FLOATS_OR_F64 = FLOATS + (torch.float64,)


def fail(name: str, expected: str, got) -> None:
    raise ValueError(f"{name}: expected {expected}, got {got}")


def tensor(name: str, t, *, dtypes=None, shape=None, device=None, contiguous=True) -> torch.Tensor:
    """Check a tensor argument. shape is a tuple of ints or None (any size) per dim."""
    if not isinstance(t, torch.Tensor):
        fail(name, "a torch.Tensor", type(t).__name__)
    if dtypes is not None and t.dtype not in dtypes:
        fail(name, "dtype " + " or ".join(str(d) for d in dtypes), t.dtype)
    if shape is not None:
        if t.dim() != len(shape):
            fail(name, f"{len(shape)} dims {_fmt(shape)}", f"{t.dim()} dims {tuple(t.shape)}")
        if any(s is not None and s != a for s, a in zip(shape, t.shape)):
            fail(name, f"shape {_fmt(shape)}", tuple(t.shape))
    if device is not None and t.device != device:
        fail(name, f"a tensor on {device} (like the other inputs)", t.device)
    if contiguous and not t.is_contiguous():
        fail(name, "a contiguous tensor", f"strides {t.stride()} for shape {tuple(t.shape)}")
    return t


def integer(name: str, v, lo: int | None = None, hi: int | None = None) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        fail(name, "an int", type(v).__name__)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        fail(name, f"an int in [{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]", v)
    return v


def real(name: str, v, lo: float, hi: float, *, lo_open: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        fail(name, "a float", type(v).__name__)
    v = float(v)
    if not (v > lo if lo_open else v >= lo) or not v <= hi or v != v:
        fail(name, f"a float in {'(' if lo_open else '['}{lo}, {hi}]", v)
    return v


def outputs(out, cls, like: dict[str, tuple]):
    """The op's output tuple: `out` checked field by field (like maps field -> (shape, dtype,
    device)), or a fresh `cls` of empty tensors when out is None."""
    if out is None:
        return cls(*(torch.empty(shape, dtype=dtype, device=device) for shape, dtype, device in like.values()))
    if len(out) != len(like):
        fail("out", f"a tuple of {len(like)} tensors ({', '.join(like)})", f"{len(out)} items")
    for t, (field, (shape, dtype, device)) in zip(out, like.items()):
        tensor(f"out.{field}", t, dtypes=(dtype,), shape=shape, device=device)
    return out


def _fmt(shape) -> str:
    return "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"


def f64_backend(name: str, t: torch.Tensor, backend: str | None) -> str | None:
    """float64 inputs run on the reference backend only: choose it, or refuse another."""
    if t.dtype != torch.float64:
        return backend
    if backend not in (None, "reference"):
        fail("backend", f"'reference' or None for float64 {name}", repr(backend))
    return "reference"
