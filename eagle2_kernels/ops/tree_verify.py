from __future__ import annotations

import functools

import torch

from .. import _backend, _validate as check, reference
from ..reference import VerifyResult
from .frontier_expand import DTYPE_CODE


def tree_verify(
    tokens: torch.Tensor,
    parents: torch.Tensor,
    target_logits: torch.Tensor,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    uniforms: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    max_depth: int | None = None,
    out: VerifyResult | None = None,
    backend: str | None = None,
) -> VerifyResult:
    """Accept the longest valid path of a draft tree given the target's logits at every node.

    Args:
        tokens, parents: [B, m] int32, a tree in topological order (node 0 = root,
            parents[i] < i), e.g. `rerank(...).tokens / .parents`.
        target_logits: [B, m, V] float32/float16/bfloat16, the target's logits at each node.
        temperature: 0 = greedy (the output equals plain greedy decoding); > 0 = sampling from
            the target's distribution after temperature, then top_k (0 = off), then top_p.
        uniforms: [B, m] float32 in [0, 1) for sampling: uniforms[b, c] decides node c,
            uniforms[b, 0] draws the bonus token. Drawn with `generator` when omitted.
        max_depth: longest accepted path minus one (width of `accepted`); default m - 1.
        out: optional preallocated VerifyResult; backend: as for every op.

    Sampling is multi-draft recursive rejection with a deterministic draft: children are tried
    in node order, child x is accepted with probability p(x) / (remaining mass); a rejected
    token's mass is removed; when all children are rejected the bonus is drawn from the
    residual. The committed tokens are distributed exactly as plain sampling from the target.

    Returns:
        VerifyResult(accepted [B, L] int32 node indices from the root, -1 padded;
        accept_len [B] int32 accepted nodes including the root = tokens committed including
        the bonus; bonus [B] int32).
    """
    check.tensor("tokens", tokens, dtypes=check.INDEX, shape=(None, None))
    B, m = tokens.shape
    dev = tokens.device
    check.tensor("parents", parents, dtypes=check.INDEX, shape=(B, m), device=dev)
    check.tensor("target_logits", target_logits, dtypes=check.FLOATS_OR_F64, shape=(B, m, None), device=dev)
    V = target_logits.shape[2]
    if B == 0 or m == 0 or V == 0:
        check.fail("target_logits", "B, m, V >= 1", tuple(target_logits.shape))
    temperature = check.real("temperature", temperature, 0.0, float("inf"))
    top_p = check.real("top_p", top_p, 0.0, 1.0, lo_open=True)
    top_k = check.integer("top_k", top_k, 0)
    L = (m - 1 if max_depth is None else check.integer("max_depth", max_depth, 0)) + 1
    sampling = temperature > 0.0
    if generator is not None and not isinstance(generator, torch.Generator):
        check.fail("generator", "a torch.Generator or None", type(generator).__name__)
    if uniforms is not None:  # checked in greedy mode too, where it is not used: a wrong one is a bug
        check.tensor("uniforms", uniforms, dtypes=check.SCORE, shape=(B, m), device=dev)
    if sampling and uniforms is None:
        uniforms = torch.rand((B, m), generator=generator, device=dev)
    like = {
        "accepted": ((B, L), torch.int32, dev),
        "accept_len": ((B,), torch.int32, dev),
        "bonus": ((B,), torch.int32, dev),
    }
    out = check.outputs(out, VerifyResult, like)
    backend = check.f64_backend("target_logits", target_logits, backend)
    _tree_verify(tokens, parents, target_logits, temperature, top_p, top_k,
                                         uniforms if sampling else None, backend, *out)
    return out


@_backend.custom_op("tree_verify", VerifyResult._fields)
def _tree_verify(tokens: torch.Tensor, parents: torch.Tensor, target_logits: torch.Tensor, temperature: float,
                 top_p: float, top_k: int, uniforms: torch.Tensor | None, backend: str | None, accepted: torch.Tensor,
                 accept_len: torch.Tensor, bonus: torch.Tensor) -> None:
    """torch.ops.eagle2_kernels.tree_verify: `tree_verify` on validated inputs (uniforms given
    exactly when sampling), into its outputs."""
    B, m, V = target_logits.shape
    dev = tokens.device
    if dev.type == "cpu" and uniforms is not None and not bool(((uniforms >= 0) & (uniforms < 1)).all()):
        check.fail("uniforms", "values in [0, 1)", float(uniforms[~((uniforms >= 0) & (uniforms < 1))][0]))  # NaN too
    if dev.type == "cpu":
        idx = torch.arange(m, dtype=torch.int32)
        bad = ((parents < -1) | (parents >= idx))[:, 1:]
        if bool(bad.any()) or bool((parents[:, 0] != -1).any()):
            check.fail("parents", "parents[:, 0] == -1 and -1 <= parents[b, i] < i", parents.tolist())
        if bool(((tokens < 0) | (tokens >= V)).any()):
            check.fail("tokens", f"token ids in [0, {V})", tokens.tolist())
    out = VerifyResult(accepted, accept_len, bonus)
    _backend.dispatch("tree_verify", dev, backend)(tokens, parents, target_logits, temperature, top_p, top_k,
                                                   uniforms, out)


def _reference(tokens, parents, target_logits, temperature, top_p, top_k, uniforms, out) -> None:
    L = out.accepted.shape[1]
    res = reference.tree_verify(tokens, parents, target_logits, temperature, top_p, top_k, uniforms, L - 1)
    for o, r in zip(out, res):
        o.copy_(r)


def _native(backend, tokens, parents, target_logits, temperature, top_p, top_k, uniforms, out) -> None:
    B, m, V = target_logits.shape
    sampling = uniforms is not None
    # Sampling keeps each row's residual distribution in a [B, V] float32 workspace.
    workspace = torch.empty((B, V) if sampling else (1,), dtype=torch.float32, device=tokens.device)
    _backend.call_native(
        backend, "tree_verify", tokens,
        tokens.data_ptr(), parents.data_ptr(), target_logits.data_ptr(), DTYPE_CODE[target_logits.dtype],
        B, m, V, out.accepted.shape[1], temperature, top_p, top_k, uniforms.data_ptr() if sampling else 0,
        workspace.data_ptr(), *(t.data_ptr() for t in out),
    )


_backend.implements("tree_verify", reference=_reference, cpu=functools.partial(_native, "cpu"),
                    cuda=functools.partial(_native, "cuda"),
                    triton=lambda tokens, *args: _backend.call_triton("tree_verify", tokens, tokens, *args))
