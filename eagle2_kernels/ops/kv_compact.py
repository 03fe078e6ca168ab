from __future__ import annotations

import torch

from .. import _backend, _validate as check, reference


def kv_compact(
    cache: torch.Tensor,
    prefix_len: torch.Tensor,
    accepted: torch.Tensor,
    accept_len: torch.Tensor,
    *,
    backend: str | None = None,
) -> None:
    """Compact a KV cache in place after verification.

    Args:
        cache: [B, H, S, d] or [N, B, H, S, d] (N stacked caches: pass every layer's K and V
            as one tensor to compact them in one call), any dtype, contiguous.
        prefix_len: [B] int32, the cache length before the tree was appended.
        accepted: [B, L] int32 accepted node indices (tree_verify's), strictly increasing
            along each row's first accept_len entries.
        accept_len: [B] int32, 0 <= accept_len <= L.

    For i < accept_len[b], slot prefix_len[b] + i receives slot prefix_len[b] + accepted[b, i];
    afterwards the valid length of row b is prefix_len[b] + accept_len[b]. A copy that would
    read or write past S is skipped (and refused on CPU tensors).
    """
    check.tensor("cache", cache)
    if cache.dim() not in (4, 5):
        check.fail("cache", "4 dims [B, H, S, d] or 5 dims [N, B, H, S, d]", f"{cache.dim()} dims {tuple(cache.shape)}")
    N = 1 if cache.dim() == 4 else cache.shape[0]
    B, H, S, d = cache.shape[-4:]
    dev = cache.device
    check.tensor("prefix_len", prefix_len, dtypes=check.INDEX, shape=(B,), device=dev)
    check.tensor("accepted", accepted, dtypes=check.INDEX, shape=(B, None), device=dev)
    L = accepted.shape[1]
    check.tensor("accept_len", accept_len, dtypes=check.INDEX, shape=(B,), device=dev)
    if dev.type == "cpu":
        _check_data(S, prefix_len, accepted, accept_len)

    name = _backend.resolve("kv_compact", dev, backend, ("reference", "cpu", "cuda"))
    if name == "reference":
        reference.kv_compact(cache, prefix_len, accepted, accept_len)
    else:
        _backend.call_native(
            name, "kv_compact", cache,
            cache.data_ptr(), cache.element_size(), N, B, H, S, d,
            prefix_len.data_ptr(), accepted.data_ptr(), L, accept_len.data_ptr(),
        )


def _check_data(S, prefix_len, accepted, accept_len) -> None:
    L = accepted.shape[1]
    for b, (p, n) in enumerate(zip(prefix_len.tolist(), accept_len.tolist())):
        if not 0 <= n <= L:
            check.fail("accept_len", f"accept_len[{b}] in [0, {L}]", n)
        row = accepted[b, :n].tolist()
        if any(x < 0 for x in row) or any(a >= c for a, c in zip(row, row[1:])):
            check.fail("accepted", f"accepted[{b}, :{n}] non-negative and strictly increasing", row)
        if n and not (0 <= p and p + row[-1] < S):
            check.fail("prefix_len", f"prefix_len[{b}] + accepted[{b}, {n - 1}] < S = {S}", p + row[-1])
