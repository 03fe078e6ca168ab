from __future__ import annotations

import functools

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
    B = cache.shape[-4]
    dev = cache.device
    check.tensor("prefix_len", prefix_len, dtypes=check.INDEX, shape=(B,), device=dev)
    check.tensor("accepted", accepted, dtypes=check.INDEX, shape=(B, None), device=dev)
    check.tensor("accept_len", accept_len, dtypes=check.INDEX, shape=(B,), device=dev)
    _kv_compact(cache, prefix_len, accepted, accept_len, backend)


@_backend.custom_op("kv_compact", ("cache",))
def _kv_compact(cache: torch.Tensor, prefix_len: torch.Tensor, accepted: torch.Tensor, accept_len: torch.Tensor,
                backend: str | None) -> None:
    """torch.ops.eagle2_kernels.kv_compact: `kv_compact` on validated inputs, in place."""
    if cache.device.type == "cpu":
        _check_data(cache.shape[-2], prefix_len, accepted, accept_len)
    _backend.dispatch("kv_compact", cache.device, backend)(cache, prefix_len, accepted, accept_len)


def _native(backend, cache, prefix_len, accepted, accept_len) -> None:
    N = 1 if cache.dim() == 4 else cache.shape[0]
    B, H, S, d = cache.shape[-4:]
    _backend.call_native(
        backend, "kv_compact", cache,
        cache.data_ptr(), cache.element_size(), N, B, H, S, d,
        prefix_len.data_ptr(), accepted.data_ptr(), accepted.shape[1], accept_len.data_ptr(),
    )


_backend.implements("kv_compact", reference=reference.kv_compact, cpu=functools.partial(_native, "cpu"),
                    cuda=functools.partial(_native, "cuda"))


def _check_data(S, prefix_len, accepted, accept_len) -> None:
    """Refuse CPU inputs that would copy out of bounds or overwrite a later source."""
    L = accepted.shape[1]
    n = accept_len.long()

    def first_bad(bad: torch.Tensor) -> int | None:
        rows = bad.nonzero()
        return int(rows[0, 0]) if rows.numel() else None

    if (b := first_bad((n < 0) | (n > L))) is not None:
        check.fail("accept_len", f"accept_len[{b}] in [0, {L}]", int(n[b]))
    used = torch.arange(L) < n[:, None]  # [B, L]
    rising = torch.cat([accepted[:, :1] >= 0, accepted[:, 1:] > accepted[:, :-1]], dim=1)
    if (b := first_bad((used & ~rising).any(1))) is not None:
        check.fail("accepted", f"accepted[{b}, :{int(n[b])}] non-negative and strictly increasing",
                   accepted[b, : int(n[b])].tolist())
    last = accepted.long().gather(1, (n - 1).clamp(min=0)[:, None])[:, 0]
    end = prefix_len.long() + last
    if (b := first_bad((n > 0) & ((prefix_len < 0) | (end >= S)))) is not None:
        check.fail("prefix_len", f"prefix_len[{b}] >= 0 and prefix_len[{b}] + accepted[{b}, {int(n[b]) - 1}] < S = {S}",
                   int(end[b]))
