from __future__ import annotations

import functools

import torch

from .. import _backend, _validate as check, reference
from .frontier_expand import DTYPE_CODE


def tree_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    tree_mask_bits: torch.Tensor,
    prefix_len: torch.Tensor,
    scale: float | None = None,
    *,
    positions: torch.Tensor | None = None,
    sliding_window: int | None = None,
    out: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Attention of n tree queries to each row's cached prefix plus the tree (GQA, ragged).

    Args:
        q: [B, Hq, n, d] float32/float16/bfloat16.
        k_cache, v_cache: [B, Hkv, S, d], q's dtype, Hq % Hkv == 0 (query head h reads KV
            head h // (Hq // Hkv)). Keys 0..prefix_len[b]-1 are the prefix; the tree's keys
            follow at prefix_len[b] + j.
        tree_mask_bits: [B, n, W] int32; query i sees tree key j iff bit j % 32 of word
            j // 32 is set (rerank's mask_bits for a verify step). Keys at or past S are never
            read, so prefix_len[b] + 32 * W may exceed S when the trailing bits are zero.
        prefix_len: [B] int32, ragged across the batch.
        scale: softmax scale, default d ** -0.5.
        positions: [B, n] int32, the queries' positions; needed with sliding_window.
        sliding_window: a window >= 1, or None (no window). A query at position P then sees only
            keys at positions above P - sliding_window (Mistral / Gemma sliding layers, as
            transformers' masks). A key's position is its cache index, except the n tree keys
            prefix_len[b] + j (j < n), which are the queries themselves: positions[b, j].
            Keys outside every query's window are not read.
        out: optional preallocated [B, Hq, n, d] output in q's dtype; backend: as for every op.

    Returns [B, Hq, n, d] in q's dtype (float32 accumulation). A query that sees no key
    gets zeros.
    """
    check.tensor("q", q, dtypes=check.FLOATS_OR_F64, shape=(None, None, None, None))
    B, Hq, n, d = q.shape
    dev = q.device
    check.tensor("k_cache", k_cache, dtypes=(q.dtype,), shape=(B, None, None, d), device=dev)
    Hkv, S = k_cache.shape[1], k_cache.shape[2]
    check.tensor("v_cache", v_cache, dtypes=(q.dtype,), shape=(B, Hkv, S, d), device=dev)
    if Hkv == 0 or Hq % Hkv:
        check.fail("k_cache", f"a KV head count dividing Hq = {Hq}", Hkv)
    check.tensor("tree_mask_bits", tree_mask_bits, dtypes=check.INDEX, shape=(B, n, None), device=dev)
    if tree_mask_bits.shape[2] == 0:
        check.fail("tree_mask_bits", "at least 1 word per query ([B, n, W], W >= 1)", tuple(tree_mask_bits.shape))
    check.tensor("prefix_len", prefix_len, dtypes=check.INDEX, shape=(B,), device=dev)
    if B == 0 or d == 0:
        check.fail("q", "B >= 1 and d >= 1", tuple(q.shape))
    scale = d**-0.5 if scale is None else check.real("scale", scale, 0.0, float("inf"), lo_open=True)
    window = 0 if sliding_window is None else check.integer("sliding_window", sliding_window, 1, 2**31 - 1)
    if window and positions is None:
        check.fail("positions", "the queries' positions [B, n] int32 (needed with sliding_window)", None)
    if positions is not None:
        check.tensor("positions", positions, dtypes=check.INDEX, shape=(B, n), device=dev)
    if out is None:
        out = torch.empty_like(q)
    else:
        check.tensor("out", out, dtypes=(q.dtype,), shape=(B, Hq, n, d), device=dev)
    backend = check.f64_backend("q", q, backend)
    _tree_attention(q, k_cache, v_cache, tree_mask_bits, prefix_len, scale, positions, window, backend, out)
    return out


@_backend.custom_op("tree_attention", ("out",))
def _tree_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, tree_mask_bits: torch.Tensor,
                    prefix_len: torch.Tensor, scale: float, positions: torch.Tensor | None, window: int,
                    backend: str | None, out: torch.Tensor) -> None:
    """torch.ops.eagle2_kernels.tree_attention: `tree_attention` on validated inputs, into out."""
    S = k_cache.shape[2]
    if q.device.type == "cpu":  # (a list: one host copy, cheaper than tensor ops at decode batch sizes)
        lens = prefix_len.tolist()
        if min(lens) < 0 or max(lens) > S:
            check.fail("prefix_len", f"values in [0, {S}] (the cache length)", lens)
    _backend.dispatch("tree_attention", q.device, backend)(q, k_cache, v_cache, tree_mask_bits, prefix_len, scale,
                                                           positions if window else None, window, out)


def _reference(q, k_cache, v_cache, tree_mask_bits, prefix_len, scale, positions, window, out) -> None:
    out.copy_(reference.tree_attention(q, k_cache, v_cache, tree_mask_bits, prefix_len, scale, positions,
                                       window or None))


def _native(backend, q, k_cache, v_cache, tree_mask_bits, prefix_len, scale, positions, window, out) -> None:
    B, Hq, n, d = q.shape
    Hkv, S, W = k_cache.shape[1], k_cache.shape[2], tree_mask_bits.shape[2]
    _backend.call_native(
        backend, "tree_attention", q,
        q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), DTYPE_CODE[q.dtype], tree_mask_bits.data_ptr(),
        prefix_len.data_ptr(), 0 if positions is None else positions.data_ptr(), window, B, Hq, Hkv, n, S, d, W,
        scale, out.data_ptr(),
    )


_backend.implements("tree_attention", reference=_reference, cpu=functools.partial(_native, "cpu"),
                    cuda=functools.partial(_native, "cuda"),
                    triton=lambda q, *args: _backend.call_triton("tree_attention", q, q, *args))
