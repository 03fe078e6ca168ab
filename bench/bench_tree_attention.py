"""tree_attention microbenchmark: Llama-3-8B attention (32 query heads, 8 KV heads, head dim 128)
of an m-node draft tree to a cached prefix, float32 on CPU and bfloat16 on CUDA; on the CPU also
a decode step of the default target SmolLM2-135M (9 query heads, 3 KV heads, head dim 64): one
token (plain decoding) and a 10-node tree at prefix 256.

Baselines besides the reference: "sdpa" (torch's scaled_dot_product_attention with a boolean
[B, 1, m, S] mask and enable_gqa) and, on CUDA, "flex" (compiled flex_attention whose mask_mod
reads the bit-packed tree mask). Their masks (the dense bool mask, the flex BlockMask) are built
once per case outside the timed call: a decode loop builds them once per step and reuses them
in every layer, so only the attention call is per-layer work. tree_attention and the reference
take the bit-packed mask directly and pay for its decoding on every call.
"""
from __future__ import annotations

import functools

import torch

import eagle2_kernels as ek
from _harness import Case
from eagle2_kernels import reference

# (label suffix, query heads, KV heads, head dim)
LLAMA_8B, SMOLLM2_135M = ("", 32, 8, 128), (" smollm2", 9, 3, 64)


def tree_bits(B: int, m: int, g: torch.Generator) -> torch.Tensor:
    """int32 [B, m, ceil(m / 32)] ancestor masks of random trees (node j's parent < j)."""
    anc = torch.zeros(B, m, m, dtype=torch.bool)
    for b in range(B):
        for j in range(m):
            if j:
                anc[b, j] = anc[b, int(torch.randint(0, j, (1,), generator=g))]
            anc[b, j, j] = True
    return ek.pack_mask_bits(anc)


def sdpa_fn(q, k, v, bits, prefix_len, scale):
    mask = reference.tree_mask_visible(bits, prefix_len, k.shape[2])[:, None]  # [B, 1, m, S]
    sdpa = torch.nn.functional.scaled_dot_product_attention
    return functools.partial(sdpa, q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)


def flex_fn(q, k, v, bits, prefix_len, scale):
    """Compiled flex_attention with the tree mask, or None when flex_attention is unavailable."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return None
    B, _, m, _ = q.shape
    S, W = k.shape[2], bits.shape[2]

    def mask_mod(b, h, q_idx, kv_idx):
        rel = kv_idx - prefix_len[b]
        word = bits[b, q_idx, rel.clamp(0, 32 * W - 1) // 32]
        return (rel < 0) | ((rel < 32 * W) & (((word >> (rel % 32)) & 1) == 1))

    try:
        block_mask = create_block_mask(mask_mod, B, None, m, S, device=q.device)
        fn = functools.partial(torch.compile(flex_attention), q, k, v, block_mask=block_mask, scale=scale,
                               enable_gqa=True)
        fn()  # compile now: a failure drops the baseline instead of failing the run
    except Exception as e:  # noqa: BLE001 - any compile/lowering problem means "unavailable here"
        print(f"tree_attention: flex baseline skipped ({type(e).__name__}: {e})")
        return None
    return fn


def cases(device: torch.device, quick: bool) -> list[Case]:
    """B in {1, 8} x m in {16, 60} x prefix in {512, 4096}, plus ragged prefixes for B = 8, and on
    the CPU a SmolLM2-135M decode step (m 1 and 10 at prefix 256); quick: one small ragged case."""
    if quick:
        shapes = [(2, 16, 64, True, LLAMA_8B)]
    else:
        shapes = [(B, m, P, False, LLAMA_8B) for B in (1, 8) for m in (16, 60) for P in (512, 4096)]
        shapes += [(8, m, P, True, LLAMA_8B) for m in (16, 60) for P in (512, 4096)]
        if device.type == "cpu":
            shapes += [(1, m, 256, False, SMOLLM2_135M) for m in (1, 10)]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    status = ek.backends()
    native = ["cpu"] if device.type == "cpu" else ["cuda", "triton"]
    impls = ["reference"] + [b for b in native if status[b] == "available"]
    out = []
    for B, m, P, ragged, (model, HQ, HKV, D) in shapes:
        g = torch.Generator().manual_seed(0)
        # Ragged: prefixes spread over [P / 8, P]; the cache holds the longest prefix plus the tree.
        prefix_len = torch.randint(P // 8, P + 1, (B,), generator=g) if ragged else torch.full((B,), P)
        prefix_len[0] = P
        S = P + m
        q = torch.randn(B, HQ, m, D, generator=g)
        k, v = torch.randn(B, HKV, S, D, generator=g), torch.randn(B, HKV, S, D, generator=g)
        args = [q.to(device, dtype), k.to(device, dtype), v.to(device, dtype),
                tree_bits(B, m, g).to(device), prefix_len.int().to(device)]
        scale = D**-0.5
        fns = {impl: functools.partial(ek.tree_attention, *args, scale, backend=impl) for impl in impls}
        fns["sdpa"] = sdpa_fn(*args, scale)
        if device.type == "cuda":
            flex = flex_fn(*args, scale)
            if flex is not None:
                fns["flex"] = flex
        # K and V of every visible key (prefix + tree) read once, q read, out written.
        elem = torch.finfo(dtype).bits // 8
        moved = elem * (2 * HKV * D * int((prefix_len + m).sum()) + 2 * B * HQ * m * D) + args[3].numel() * 4
        shape = f"B={B} m={m} prefix={P}{' ragged' if ragged else ''}{model}"
        out.append(Case("tree_attention", shape, fns, moved))
    return out
