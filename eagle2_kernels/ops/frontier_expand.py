from __future__ import annotations

import functools

import torch

from .. import _backend, _validate as check, reference
from ..reference import FrontierExpansion

DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def frontier_expand(
    logits: torch.Tensor,
    parent_scores: torch.Tensor,
    k: int,
    *,
    out: FrontierExpansion | None = None,
    backend: str | None = None,
) -> FrontierExpansion:
    """One depth of EAGLE-2 tree expansion, fused: log-softmax, per-row top-k, cumulative
    score, and the global top-k that becomes the next frontier.

    Args:
        logits: [B, K, V] float32/float16/bfloat16 (float64: reference backend only), the draft's logits for the K frontier nodes.
        parent_scores: [B, K] float32, the frontier nodes' cumulative log-probabilities
            (-inf marks an unused row; NaN is read as -inf).
        k: children per node and size of the next frontier, 1 <= k <= V.
        out: optional preallocated FrontierExpansion (shapes and dtypes as returned).
        backend: None (fastest available) or one of 'reference', 'cpu', 'cuda', 'triton'.

    Returns:
        FrontierExpansion(child_tokens [B, K, k] int32, child_scores [B, K, k] float32,
        frontier_index [B, k] int32 into the K*k children (parent row = index // k),
        frontier_scores [B, k] float32), best first; ties go to the lower index.
    """
    check.tensor("logits", logits, dtypes=check.FLOATS_OR_F64, shape=(None, None, None))
    B, K, V = logits.shape
    dev = logits.device
    check.tensor("parent_scores", parent_scores, dtypes=check.SCORE, shape=(B, K), device=dev)
    if B == 0 or K == 0 or V == 0:
        check.fail("logits", "B, K and V (the vocabulary) >= 1", tuple(logits.shape))
    check.integer("k", k, 1, V)
    like = {
        "child_tokens": ((B, K, k), torch.int32, dev),
        "child_scores": ((B, K, k), torch.float32, dev),
        "frontier_index": ((B, k), torch.int32, dev),
        "frontier_scores": ((B, k), torch.float32, dev),
    }
    out = check.outputs(out, FrontierExpansion, like)

    backend = check.f64_backend("logits", logits, backend)
    _frontier_expand(logits, parent_scores, k, backend, *out)
    return out


@_backend.custom_op("frontier_expand", ("child_tokens", "child_scores", "frontier_index", "frontier_scores"))
def _frontier_expand(logits: torch.Tensor, parent_scores: torch.Tensor, k: int, backend: str | None,
                     child_tokens: torch.Tensor, child_scores: torch.Tensor, frontier_index: torch.Tensor,
                     frontier_scores: torch.Tensor) -> None:
    """torch.ops.eagle2_kernels.frontier_expand: `frontier_expand` on validated inputs, into its outputs."""
    out = FrontierExpansion(child_tokens, child_scores, frontier_index, frontier_scores)
    _backend.dispatch("frontier_expand", logits.device, backend)(logits, parent_scores, k, out)


def _reference(logits, parent_scores, k, out) -> None:
    for o, r in zip(out, reference.frontier_expand(logits, parent_scores, k)):
        o.copy_(r)


def _native(backend, logits, parent_scores, k, out) -> None:
    B, K, V = logits.shape
    _backend.call_native(
        backend, "frontier_expand", logits,
        logits.data_ptr(), DTYPE_CODE[logits.dtype], parent_scores.data_ptr(), B, K, V, k,
        *(t.data_ptr() for t in out),
    )


_backend.implements("frontier_expand", reference=_reference, cpu=functools.partial(_native, "cpu"),
                    cuda=functools.partial(_native, "cuda"),
                    triton=lambda logits, *args: _backend.call_triton("frontier_expand", logits, logits, *args))
