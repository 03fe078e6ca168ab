from __future__ import annotations

import functools

import torch

from .. import _backend, _validate as check, reference
from ..reference import Tree


def rerank(
    cand_scores: torch.Tensor,
    cand_parents: torch.Tensor,
    cand_tokens: torch.Tensor,
    root_tokens: torch.Tensor,
    prefix_len: torch.Tensor,
    m: int,
    *,
    max_depth: int | None = None,
    out: Tree | None = None,
    backend: str | None = None,
) -> Tree:
    """Build the EAGLE-2 draft tree: keep the m-1 best candidates and lay out the tree.

    Args:
        cand_scores: [B, N] float32 cumulative log-probabilities of the expansion candidates.
        cand_parents: [B, N] int32, the parent candidate's index (-1: child of the root);
            parents precede children (cand_parents[b, i] < i).
        cand_tokens: [B, N] int32 candidate tokens.
        root_tokens: [B] int32, the last committed token of each row (node 0).
        prefix_len: [B] int32, tokens already in the KV cache (the root's position).
        m: tree size including the root, 1 <= m <= N + 1.
        max_depth: deepest node allowed (sets the width of `paths` to max_depth + 1);
            default m - 1. On CPU a deeper kept node raises ValueError; the CUDA kernel,
            which cannot raise, truncates those paths.
        out: optional preallocated Tree; backend: as for every op.

    Selection: highest effective score (a candidate's score capped by its ancestors'), ties
    shallower first, then lower candidate index; the kept set is closed under ancestors.

    Returns:
        Tree(tokens, parents, depth, positions [B, m] int32; mask_bits [B, m, ceil(m/32)] int32
        ancestor bits; paths [B, m, L] int32 root-to-leaf node indices; num_leaves [B] int32).
    """
    check.tensor("cand_scores", cand_scores, dtypes=check.SCORE, shape=(None, None))
    B, N = cand_scores.shape
    dev = cand_scores.device
    check.tensor("cand_parents", cand_parents, dtypes=check.INDEX, shape=(B, N), device=dev)
    check.tensor("cand_tokens", cand_tokens, dtypes=check.INDEX, shape=(B, N), device=dev)
    check.tensor("root_tokens", root_tokens, dtypes=check.INDEX, shape=(B,), device=dev)
    check.tensor("prefix_len", prefix_len, dtypes=check.INDEX, shape=(B,), device=dev)
    if B == 0:
        check.fail("cand_scores", "B >= 1", tuple(cand_scores.shape))
    check.integer("m", m, 1, N + 1)
    L = (m - 1 if max_depth is None else check.integer("max_depth", max_depth, 0)) + 1
    W = (m + 31) // 32
    like = {
        "tokens": ((B, m), torch.int32, dev),
        "parents": ((B, m), torch.int32, dev),
        "depth": ((B, m), torch.int32, dev),
        "positions": ((B, m), torch.int32, dev),
        "mask_bits": ((B, m, W), torch.int32, dev),
        "paths": ((B, m, L), torch.int32, dev),
        "num_leaves": ((B,), torch.int32, dev),
    }
    out = check.outputs(out, Tree, like)
    _rerank(cand_scores, cand_parents, cand_tokens, root_tokens, prefix_len, m, backend, *out)
    return out


@_backend.custom_op("rerank", Tree._fields)
def _rerank(cand_scores: torch.Tensor, cand_parents: torch.Tensor, cand_tokens: torch.Tensor, root_tokens: torch.Tensor,
            prefix_len: torch.Tensor, m: int, backend: str | None, tokens: torch.Tensor, parents: torch.Tensor,
            depth: torch.Tensor, positions: torch.Tensor, mask_bits: torch.Tensor, paths: torch.Tensor,
            num_leaves: torch.Tensor) -> None:
    """torch.ops.eagle2_kernels.rerank: `rerank` on validated inputs, into its outputs."""
    B, N = cand_scores.shape
    L = paths.shape[2]
    dev = cand_scores.device
    if dev.type == "cpu" and bool((prefix_len < 0).any()):  # data checks: CPU tensors only (no host sync)
        check.fail("prefix_len", "values >= 0 (the root's position)", prefix_len.tolist())
    if dev.type == "cpu" and N:  # data checks cost a host sync on a GPU; the kernels stay in bounds anyway
        idx = torch.arange(N, dtype=torch.int32)
        bad = (cand_parents < -1) | (cand_parents >= idx)
        if bool(bad.any()):
            b, i = (int(v) for v in bad.nonzero()[0])
            check.fail("cand_parents", f"-1 <= cand_parents[{b}, {i}] < {i} (parents precede children)",
                       int(cand_parents[b, i]))
    out = Tree(tokens, parents, depth, positions, mask_bits, paths, num_leaves)
    _backend.dispatch("rerank", dev, backend)(cand_scores, cand_parents, cand_tokens, root_tokens, prefix_len, m, out)
    if dev.type == "cpu" and int(depth.max()) > L - 1:
        check.fail("max_depth", f">= {int(depth.max())} (the deepest kept node)", L - 1)


def _reference(cand_scores, cand_parents, cand_tokens, root_tokens, prefix_len, m, out) -> None:
    L = out.paths.shape[2]
    for o, r in zip(out, reference.rerank(cand_scores, cand_parents, cand_tokens, root_tokens, prefix_len, m, L - 1)):
        o.copy_(r)


def _native(backend, cand_scores, cand_parents, cand_tokens, root_tokens, prefix_len, m, out) -> None:
    B, N = cand_scores.shape
    _backend.call_native(
        backend, "rerank", cand_scores,
        cand_scores.data_ptr(), cand_parents.data_ptr(), cand_tokens.data_ptr(),
        root_tokens.data_ptr(), prefix_len.data_ptr(), B, N, m, out.paths.shape[2],
        *(t.data_ptr() for t in out),
    )


_backend.implements("rerank", reference=_reference, cpu=functools.partial(_native, "cpu"),
                    cuda=functools.partial(_native, "cuda"))
