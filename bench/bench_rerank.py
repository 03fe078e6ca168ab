"""rerank microbenchmark: EAGLE-2 candidate sets of the paper's and smaller trees."""
from __future__ import annotations

import functools

import torch

import eagle2_kernels as ek
from _harness import Case


def candidates(B: int, k: int, depth: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores and parents [B, N] as frontier expansion produces them: k children of the root,
    then at each later depth k children of each of the previous depth's k best candidates."""
    level = torch.log_softmax(torch.randn(B, k, generator=g), -1)
    scores, parents, offset = [level], [torch.full((B, k), -1)], 0
    for _ in range(depth - 1):
        top, idx = level.topk(k, dim=-1)
        level = (top[..., None] + torch.log_softmax(torch.randn(B, k, k, generator=g), -1)).reshape(B, k * k)
        scores.append(level)
        parents.append((offset + idx).repeat_interleave(k, dim=-1))
        offset += scores[-2].shape[1]
    return torch.cat(scores, 1).float(), torch.cat(parents, 1).int()


def cases(device: torch.device, quick: bool) -> list[Case]:
    """B in {1, 8} x (k, depth, m) in {(10, 6, 60), (10, 6, 16), (4, 4, 16)}; quick: one small case."""
    shapes = [(1, 4, 3, 8)] if quick else [(B, *t) for B in (1, 8) for t in ((10, 6, 60), (10, 6, 16), (4, 4, 16))]
    status = ek.backends()
    impls = ["reference"] + [b for b in ("cpu", "cuda") if b == device.type and status[b] == "available"]
    out = []
    for B, k, depth, m in shapes:
        g = torch.Generator().manual_seed(0)
        scores, parents = candidates(B, k, depth, g)
        N = scores.shape[1]
        args = [t.to(device) for t in (
            scores, parents, torch.randint(0, 128256, (B, N), generator=g, dtype=torch.int32),
            torch.randint(0, 128256, (B,), generator=g, dtype=torch.int32),
            torch.randint(512, 4097, (B,), generator=g, dtype=torch.int32))]
        fns = {impl: functools.partial(ek.rerank, *args, m, max_depth=depth, backend=impl) for impl in impls}
        # Candidates read (score, parent, token); tree written (4 [B, m] fields, mask, paths).
        W, L = (m + 31) // 32, depth + 1
        moved = 4 * B * (3 * N + 2 + m * (4 + W + L) + 1)
        out.append(Case("rerank", f"B={B} k={k} depth={depth} m={m} N={N}", fns, moved))
    return out
