"""frontier_expand microbenchmark: the paper's K = k = 10 over Llama-2 and Llama-3 vocabularies."""
from __future__ import annotations

import torch

import eagle2_kernels as ek
from _harness import Case


def torch_topk(logits: torch.Tensor, parent_scores: torch.Tensor, k: int):
    """The unfused version a user would write: log_softmax, per-row topk, add, topk over K*k."""
    B, K, _ = logits.shape
    top, tokens = torch.log_softmax(logits.float(), dim=-1).topk(k, dim=-1)
    scores = parent_scores[..., None] + top
    frontier_scores, frontier_index = scores.reshape(B, K * k).topk(k, dim=-1)
    return tokens, scores, frontier_index, frontier_scores


def cases(device: torch.device, quick: bool) -> list[Case]:
    """B in {1, 8} x V in {32000, 128256}, K = k = 10; float32 (and bfloat16 on CUDA).
    quick: one small case."""
    shapes = [(1, 10, 1000, 10)] if quick else [(B, 10, V, 10) for B in (1, 8) for V in (32000, 128256)]
    dtypes = [torch.float32] + ([torch.bfloat16] if device.type == "cuda" else [])
    status = ek.backends()
    impls = [b for b in (("cuda", "triton") if device.type == "cuda" else ("cpu",)) if status[b] == "available"]
    out = []
    for dtype in dtypes:
        for B, K, V, k in shapes:
            g = torch.Generator().manual_seed(0)
            logits = (torch.randn(B, K, V, generator=g) * 3).to(dtype).to(device)
            parents = torch.log_softmax(torch.randn(B, K, generator=g), -1).to(device)
            res = ek.frontier_expand(logits, parents, k)  # preallocated, as a decode loop would

            def run(impl: str, logits=logits, parents=parents, k=k, res=res):
                return ek.frontier_expand(logits, parents, k, out=res, backend=impl)

            fns = {impl: (lambda impl=impl, run=run: run(impl)) for impl in ["reference", *impls]}
            fns["torch_topk"] = lambda logits=logits, parents=parents, k=k: torch_topk(logits, parents, k)
            name = str(dtype).removeprefix("torch.")
            # The logits dominate: parents and the [B, K, k] / [B, k] outputs are a few KB.
            moved = logits.numel() * logits.element_size()
            out.append(Case("frontier_expand", f"B={B} K={K} V={V} k={k} {name}", fns, moved))
    return out
