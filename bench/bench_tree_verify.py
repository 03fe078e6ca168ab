"""tree_verify microbenchmark: EAGLE-2 trees of 16 and 60 nodes against Llama-2 / Llama-3
vocabularies, greedy and sampling (temperature 1, top_p 0.9).

Trees come from the rerank benchmark's candidate sets (k = 10, depth 6) through the reference
rerank; the target agrees with the draft about half the time (at each node with children, a
fair coin decides whether the first child's token becomes the target's choice: its argmax, with
probability 0.75 when sampling).
bytes_moved is the minimum read: the logits rows of the nodes the walk visits (known from one
reference run on the same inputs), once each.
"""
from __future__ import annotations

import functools
import math

import torch

import eagle2_kernels as ek
from _harness import Case
from bench_rerank import candidates


def verify_inputs(B: int, m: int, V: int, device: torch.device, g: torch.Generator):
    """tokens, parents [B, m] and float32 target logits [B, m, V]."""
    scores, cand_parents = candidates(B, 10, 6, g)
    N = scores.shape[1]
    tree = ek.rerank(scores, cand_parents, torch.randint(0, V, (B, N), generator=g, dtype=torch.int32),
                     torch.randint(0, V, (B,), generator=g, dtype=torch.int32),
                     torch.zeros(B, dtype=torch.int32), m, max_depth=6, backend="reference")
    logits = torch.randn(B, m, V, generator=g)
    parents = tree.parents.long()
    for b in range(B):
        for n in range(m):
            children = (parents[b] == n).nonzero()
            if len(children) and bool(torch.rand((), generator=g) < 0.5):
                logits[b, n, tree.tokens[b, int(children[0])]] = torch.logsumexp(logits[b, n], 0) + math.log(3.0)
    return tree.tokens.to(device), tree.parents.to(device), logits.to(device)


def cases(device: torch.device, quick: bool) -> list[Case]:
    """B in {1, 8} x m in {16, 60} x V in {32000, 128256} x {greedy, sampling}; quick: B=2, m=8,
    V=1000."""
    shapes = [(2, 8, 1000)] if quick else [(B, m, V) for B in (1, 8) for m in (16, 60) for V in (32000, 128256)]
    status = ek.backends()
    on_device = ("cuda", "triton") if device.type == "cuda" else ("cpu",)
    impls = ["reference"] + [b for b in on_device if status[b] == "available"]
    out = []
    for B, m, V in shapes:
        g = torch.Generator().manual_seed(0)
        tokens, parents, logits = verify_inputs(B, m, V, device, g)
        uniforms = torch.rand(B, m, generator=g).to(device)
        for mode, kw in (("greedy", {}), ("sampling", dict(temperature=1.0, top_p=0.9, uniforms=uniforms))):
            fns = {impl: functools.partial(ek.tree_verify, tokens, parents, logits, backend=impl, **kw) for impl in impls}
            visited = int(fns["reference"]().accept_len.sum())
            out.append(Case("tree_verify", f"B={B} m={m} V={V} {mode}", fns, visited * V * logits.element_size()))
    return out
