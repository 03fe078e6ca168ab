"""EAGLE-2 dynamic draft tree growth (README.md, "How EAGLE-2 decodes", steps 2-3).

Depth 1 = the root's top-k draft children. Each later depth runs the draft once over the k
frontier nodes (input: the parent's predicted feature + the node's own token, at the node's
position, attending to the committed prefix and the node's drafted ancestors), then
`frontier_expand` scores their k*k children; all children become rerank candidates and the
top-k by cumulative score form the next frontier. `rerank` keeps the best m - 1 candidates.

The drafted frontier nodes are appended to the draft's KV cache for the duration of the
growth (k entries per depth, a tree mask over them) and dropped afterwards: the committed
prefix of the draft cache is fed the target's true features once verification has decided
what was accepted.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

import eagle2_kernels
from eagle2_kernels import Tree


@dataclass(frozen=True)
class TreeShape:
    """total_tokens m (nodes per tree, root included), depth (deepest draft level), branching k
    (draft children per expanded node; EAGLE calls it the tree's top-k)."""

    total_tokens: int
    depth: int
    branching: int

    def __post_init__(self):
        for name in ("total_tokens", "depth", "branching"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {v!r}")

    def candidates(self, depth: int | None = None) -> int:
        """Number of rerank candidates a growth of `depth` levels produces."""
        d = self.depth if depth is None else depth
        return 0 if d == 0 else self.branching + (d - 1) * self.branching**2


@dataclass
class Candidates:
    """Every node an expansion drafted, in drafting order: scores [B, N] float32 (cumulative
    log-probabilities), parents [B, N] int32 (candidate index, -1 = the root), tokens [B, N]
    int32 (target ids). A parent always precedes its children."""

    scores: torch.Tensor
    parents: torch.Tensor
    tokens: torch.Tensor


def expand(head, cache, root_hidden: torch.Tensor, prefix_len: torch.Tensor, depth: int, k: int) -> Candidates:
    """Draft `depth` levels below each row's root, k children per frontier node.

    head: an attached DraftHead; cache: its KVCache holding the committed prefix, whose last
    entry is the root's; root_hidden [B, h]: the draft's predicted feature at the root;
    prefix_len [B] int32: the root's position (= the target cache length). The cache is left
    as it was found.
    """
    B, h = root_hidden.shape
    dev = root_hidden.device
    committed = cache.lengths.clone()
    exp = eagle2_kernels.frontier_expand(head.logits(root_hidden[:, None]), torch.zeros(B, 1, device=dev), k)
    tokens = [head.to_target_ids(exp.child_tokens[:, 0])]  # per depth: [B, k] or [B, k*k]
    scores = [exp.child_scores[:, 0]]
    parents = [torch.full((B, k), -1, dtype=torch.int32, device=dev)]
    frontier = exp.frontier_index.long()  # [B, k] candidate indices of the frontier
    frontier_scores = exp.frontier_scores
    parent_hidden = root_hidden[:, None].expand(B, k, h)
    T = k * (depth - 1)  # drafted tree entries in the draft cache
    visible = torch.zeros((B, T, T), dtype=torch.bool, device=dev)  # drafted node -> its drafted ancestors
    parent_slot = None
    try:
        for d in range(1, depth):
            slots = torch.arange((d - 1) * k, d * k, device=dev)
            if parent_slot is not None:
                visible[:, slots] = visible.gather(1, parent_slot[..., None].expand(B, k, T))
            visible[:, slots, slots] = True
            node_tokens = torch.cat(tokens, dim=1).gather(1, frontier)  # [B, k] target ids
            positions = prefix_len.long()[:, None] + d
            hidden = head(parent_hidden, node_tokens, positions, cache=cache,
                          mask_bits=eagle2_kernels.pack_mask_bits(visible[:, slots, : d * k]), prefix_len=committed)
            cache.extend(torch.full((B,), k, dtype=torch.int32, device=dev))
            exp = eagle2_kernels.frontier_expand(head.logits(hidden), frontier_scores.contiguous(), k)
            base = sum(t.shape[1] for t in tokens)
            tokens.append(head.to_target_ids(exp.child_tokens.reshape(B, k * k)))
            scores.append(exp.child_scores.reshape(B, k * k))
            parents.append(frontier.int().repeat_interleave(k, dim=1))
            row = exp.frontier_index.long() // k  # which frontier node each new frontier node hangs from
            parent_slot = (d - 1) * k + row
            parent_hidden = hidden.gather(1, row[..., None].expand(B, k, h))
            frontier = base + exp.frontier_index.long()
            frontier_scores = exp.frontier_scores
    finally:
        cache.lengths.copy_(committed)
    return Candidates(torch.cat(scores, dim=1).contiguous(), torch.cat(parents, dim=1).contiguous(),
                      torch.cat(tokens, dim=1).int().contiguous())


def rerank(cands: Candidates, root_tokens: torch.Tensor, prefix_len: torch.Tensor, m: int, depth: int) -> Tree:
    """The m-node tree (root included) of the best-scoring candidates."""
    return eagle2_kernels.rerank(cands.scores, cands.parents, cands.tokens, root_tokens, prefix_len, m, max_depth=depth)


def grow(head, cache, root_hidden: torch.Tensor, root_tokens: torch.Tensor, prefix_len: torch.Tensor,
         m: int, depth: int, k: int) -> Tree:
    """One EAGLE-2 draft tree per batch row (`expand`, then `rerank` to m nodes);
    m <= 1 + k + (depth - 1) k^2. Returns the rerank Tree (target token ids)."""
    return rerank(expand(head, cache, root_hidden, prefix_len, depth, k), root_tokens, prefix_len, m, depth)


def root_only(root_tokens: torch.Tensor, prefix_len: torch.Tensor) -> Tree:
    """The one-node tree (plain decoding step) without going through rerank."""
    B = root_tokens.shape[0]
    dev = root_tokens.device
    col = lambda t: t.int()[:, None].contiguous()  # noqa: E731
    zeros = torch.zeros((B, 1), dtype=torch.int32, device=dev)
    return Tree(col(root_tokens), zeros - 1, zeros, col(prefix_len), (zeros + 1)[..., None], zeros[..., None],
                torch.ones(B, dtype=torch.int32, device=dev))
