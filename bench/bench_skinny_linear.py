"""skinny_linear microbenchmark: a decode step's linears (1 to 64 rows) of SmolLM2-135M and
Llama-8B shapes, against the reference (F.linear in float32) and F.linear in the weights' own
dtype (the BLAS path a model takes without it). "cpu plan" is the same kernel through a
SkinnyLinearPlan (weights checked once, as the decode loop's linear layers call it): on the
smallest layers the per-call overhead it saves is a visible part of the time."""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

import eagle2_kernels as ek
from _harness import Case

# (name, N, K): SmolLM2-135M's k/v projection (its smallest layer), MLP up and lm_head, Llama-8B's MLP down.
SHAPES = [("kv_proj_135m", 192, 576), ("mlp_up_135m", 1536, 576), ("lm_head_135m", 49152, 576),
          ("mlp_down_8b", 4096, 14336)]


def cases(device: torch.device, quick: bool) -> list[Case]:
    """CPU only (on CUDA the BLAS already reads the weights once); rows 1, 4, 16, 64."""
    if device.type != "cpu":
        return []
    shapes = [("small", 256, 96)] if quick else SHAPES
    rows = [1, 8] if quick else [1, 4, 16, 64]
    dtypes = [torch.float32] if quick else [torch.float32, torch.bfloat16]
    impls = ["reference"] + (["cpu"] if ek.backends()["cpu"] == "available" else [])
    out = []
    for (name, N, K), dtype in [(s, d) for s in shapes for d in dtypes]:
        g = torch.Generator().manual_seed(0)
        weight = torch.randn(N, K, generator=g).to(dtype)
        for M in rows:
            x = torch.randn(M, K, generator=g).to(dtype)
            fns = {impl: functools.partial(ek.skinny_linear, x, weight, backend=impl) for impl in impls}
            if "cpu" in impls:
                fns["cpu plan"] = functools.partial(ek.SkinnyLinearPlan(weight), x)
            fns["F.linear"] = functools.partial(F.linear, x, weight)
            moved = (N * K + M * K + M * N) * weight.element_size()
            out.append(Case("skinny_linear", f"{name} M={M} N={N} K={K} {str(dtype).removeprefix('torch.')}", fns, moved))
    return out
