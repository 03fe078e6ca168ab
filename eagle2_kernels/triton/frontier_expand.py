"""Triton kernels for `frontier_expand` (semantics: eagle2_kernels.reference.frontier_expand).

Two launches, no host synchronisation:
  1. `_expand_rows_kernel`, one program per (batch, frontier row): one pass over the row's logits
     in BLOCK_V tiles computes the online log-sum-exp and the row's top-k, then writes the
     children's tokens and scores.
  2. `_next_frontier_kernel`, one program per batch row: the top-k of its K*k children.

Top-k in Triton: each candidate (value, index) is packed into one int64 key that orders like
the reference (higher value first, ties to the lower index), so a max-reduction over keys yields the
best value and its index at once. A running top-KP list (KP = k rounded up to a power of two,
for tl.arange) is merged with each tile by KP rounds of masked argmax (`tl.topk` would sort the
whole tile: slower, and far slower in the CPU interpreter).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..reference import FrontierExpansion
from ._common import order_key, order_key_float, sanitize

_EMPTY = tl.constexpr(-(2**63))  # smallest int64: the key of a padding lane or an unfilled slot

# Logits per tile: a power of two (tl.arange) large enough to amortise the per-tile reductions
# and small enough to stay in registers across 4 warps.
BLOCK_V = 1024
# Children per tile in the second kernel (K*k is small in practice: 100 for K = k = 10).
BLOCK_N = 256


@triton.jit
def _pack(x, idx, valid):
    """int64 keys ordered like (x desc, idx asc); invalid lanes get the smallest key."""
    x = tl.where(x == 0.0, 0.0, x)  # -0.0 ties with +0.0, as in the reference's float compare
    ordered = order_key(x)
    # ordered * 2^32 + (2^32 - 1 - idx): the low word is larger for a lower index.
    key = ((ordered.to(tl.int64) + 1) << 32) - idx.to(tl.int64) - 1
    return tl.where(valid, key, _EMPTY)


@triton.jit
def _unpack(key):
    """(x, idx) of packed keys."""
    ordered = key >> 32
    idx = (4294967296 - (key - (ordered << 32))) - 1
    return order_key_float(ordered.to(tl.int32)), idx.to(tl.int32)


@triton.jit
def _merge_topk(best, keys, KP: tl.constexpr):
    """Top-KP, best first, of the running list `best` [KP] and a tile of keys."""
    # Most tiles hold nothing better than the running list's worst entry: skip them.
    if tl.max(keys, 0) > tl.min(best, 0):
        # KP rounds of "take the largest key and blank it out". Keys are unique (they embed
        # the index), so each round removes exactly the key it took.
        slots = tl.arange(0, KP)
        merged = tl.full([KP], _EMPTY, tl.int64)
        for j in range(KP):
            top = tl.maximum(tl.max(keys, 0), tl.max(best, 0))
            merged = tl.where(slots == j, top, merged)
            keys = tl.where(keys == top, _EMPTY, keys)
            best = tl.where(best == top, _EMPTY, best)
        best = merged
    return best


@triton.jit
def _expand_rows_kernel(logits_ptr, parent_ptr, tokens_ptr, scores_ptr, V, k,
                        KP: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0)  # flattened (batch, frontier row)
    base = logits_ptr + row.to(tl.int64) * V
    lanes = tl.arange(0, BLOCK_V)
    best = tl.full([KP], _EMPTY, tl.int64)
    run_max = float("-inf")
    run_sum = 0.0
    # One pass over the row, BLOCK_V logits at a time: the tile is read once and feeds both the
    # log-sum-exp (rescaled to the new running max) and the top-k merge.
    for start in range(0, V, BLOCK_V):
        idx = start + lanes
        valid = idx < V
        x = sanitize(tl.load(base + idx, mask=valid, other=float("-inf")).to(tl.float32))
        new_max = tl.maximum(run_max, tl.max(x, 0))
        if new_max != float("-inf"):  # while the row is all -inf its sum stays 0
            run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(x - new_max), 0)
        run_max = new_max
        best = _merge_topk(best, _pack(x, idx, valid), KP)
    # A row with no finite logit has lse = -inf and every x = -inf; the inner where()s keep that
    # case free of log(0) and -inf - -inf, so logp comes out -inf as the reference has it.
    dead = run_max == float("-inf")
    lse = run_max + tl.log(tl.where(dead, 1.0, run_sum))
    x, tok = _unpack(best)
    logp = x - tl.where(dead, 0.0, lse)
    parent = sanitize(tl.load(parent_ptr + row))
    out = tl.arange(0, KP)
    tl.store(tokens_ptr + row.to(tl.int64) * k + out, tok, mask=out < k)
    tl.store(scores_ptr + row.to(tl.int64) * k + out, parent + logp, mask=out < k)


@triton.jit
def _next_frontier_kernel(scores_ptr, index_ptr, frontier_ptr, N, k,
                          KP: tl.constexpr, BLOCK_N: tl.constexpr):
    b = tl.program_id(0)
    base = scores_ptr + b.to(tl.int64) * N
    lanes = tl.arange(0, BLOCK_N)
    best = tl.full([KP], _EMPTY, tl.int64)
    for start in range(0, N, BLOCK_N):
        idx = start + lanes
        valid = idx < N
        x = tl.load(base + idx, mask=valid, other=float("-inf"))
        best = _merge_topk(best, _pack(x, idx, valid), KP)
    x, i = _unpack(best)
    out = tl.arange(0, KP)
    tl.store(index_ptr + b.to(tl.int64) * k + out, i, mask=out < k)
    tl.store(frontier_ptr + b.to(tl.int64) * k + out, x, mask=out < k)


def frontier_expand_triton(logits: torch.Tensor, parent_scores: torch.Tensor, k: int, out: FrontierExpansion) -> None:
    """Fill `out` (preallocated, validated by eagle2_kernels.frontier_expand) in place.

    logits [B, K, V] contiguous float32/float16/bfloat16, parent_scores [B, K] float32, 1 <= k <= V.
    """
    B, K, V = logits.shape
    KP = triton.next_power_of_2(k)
    # A tile must hold at least KP lanes for tl.topk; a short row needs no wider tile than itself.
    block_v = max(KP, min(BLOCK_V, triton.next_power_of_2(V)))
    _expand_rows_kernel[(B * K,)](
        logits, parent_scores, out.child_tokens, out.child_scores, V, k, KP=KP, BLOCK_V=block_v,
    )
    N = K * k
    block_n = max(KP, min(BLOCK_N, triton.next_power_of_2(N)))
    _next_frontier_kernel[(B,)](
        out.child_scores, out.frontier_index, out.frontier_scores, N, k, KP=KP, BLOCK_N=block_n,
    )
