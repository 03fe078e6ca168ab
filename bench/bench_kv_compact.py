"""kv_compact microbenchmark: every layer's K and V of a Llama-8B-like cache in one call."""
from __future__ import annotations

import functools

import torch

import eagle2_kernels as ek
from _harness import Case

TREE = 64  # slots appended after the prefix for the draft tree (m = 60 rounded up)


def cases(device: torch.device, quick: bool) -> list[Case]:
    """N = 32 layers x (K, V) = 64 stacked caches, 8 KV heads, head dim 128, bf16, prefix near
    4096 on CUDA; on CPU the B = 8 cache is shortened to a 512-token prefix (about 0.6 GB)."""
    if quick:
        shapes = [(2, 1, 2, 128, 64)]
    else:
        shapes = [(64, B, 8, 4096 if device.type == "cuda" or B == 1 else 512, 128) for B in (1, 8)]
    status = ek.backends()
    impls = ["reference"] + [b for b in ("cpu", "cuda") if b == device.type and status[b] == "available"]
    out = []
    for N, B, H, prefix, d in shapes:
        g = torch.Generator().manual_seed(0)
        S = prefix + TREE
        cache = torch.empty((N, B, H, S, d), dtype=torch.bfloat16, device=device).normal_()
        prefix_len = torch.randint(max(prefix - 256, 0), prefix + 1, (B,), generator=g, dtype=torch.int32)
        accept_len = torch.randint(4, 8, (B,), generator=g, dtype=torch.int32)
        accepted = torch.full((B, 8), -1, dtype=torch.int32)
        for b, n in enumerate(accept_len.tolist()):  # root, then n - 1 increasing tree nodes
            accepted[b, :n] = torch.cat([torch.zeros(1), (torch.randperm(59, generator=g)[: n - 1] + 1).sort().values]).int()
        moves = sum(int((accepted[b, :n] != torch.arange(n)).sum()) for b, n in enumerate(accept_len.tolist()))
        args = [t.to(device) for t in (prefix_len, accepted, accept_len)]
        fns = {impl: functools.partial(ek.kv_compact, cache, *args, backend=impl) for impl in impls}
        moved = 2 * moves * N * H * d * cache.element_size()  # each moved slot is read and written
        out.append(Case("kv_compact", f"N={N} B={B} H={H} S={S} d={d} bf16", fns, moved))
    return out
