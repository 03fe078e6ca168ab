"""A preallocated KV cache with ragged rows, usable as a transformers `Cache`.

All layers live in ONE tensor `data` [2 * layers, B, Hkv, S, d] (layer i: keys data[2i],
values data[2i + 1]) so `eagle2_kernels.kv_compact` compacts every layer in one call. Each
batch row has its own valid length `lengths[b]`; a forward of q new tokens writes row b's
keys at slots lengths[b] .. lengths[b] + q - 1 (rows are ragged) and attention receives the
whole buffers, masked by the caller (tree_attention's prefix_len and tree bits). Nothing is
copied per step: writes are in place, acceptance compacts in place, and `select` (dropping
finished rows) is the only operation that reallocates.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

import eagle2_kernels

from .model import head_dim


class _LayerView(CacheLayerMixin):
    """One layer's slice of a KVCache, for the parts of transformers that inspect layers
    (is_sliding, get_seq_length, ...). Writes go through KVCache.update."""

    is_sliding = False

    def __init__(self, cache: "KVCache", index: int):
        super().__init__()
        self.cache, self.index = cache, index
        self.is_initialized = True

    @property
    def keys(self) -> torch.Tensor:
        return self.cache.data[2 * self.index]

    @keys.setter
    def keys(self, value) -> None:  # CacheLayerMixin.__init__ assigns None; the data lives in the cache
        pass

    @property
    def values(self) -> torch.Tensor:
        return self.cache.data[2 * self.index + 1]

    @values.setter
    def values(self, value) -> None:
        pass

    def lazy_initialization(self, key_states, value_states) -> None:
        pass

    def update(self, key_states, value_states, *args, **kwargs):
        return self.cache.update(key_states, value_states, self.index)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.cache.max_len, 0

    def get_seq_length(self) -> int:
        return self.cache.get_seq_length()

    def get_max_length(self) -> int:
        return self.cache.max_len


def _bits(t: torch.Tensor) -> torch.Tensor:
    """A 16-bit float tensor as int16 (the same memory): the CPU's scatter_ copies bfloat16 and
    float16 about 5x slower than integers (a write of 1-9 tokens: 28-34 against 5-6 us, of which
    a bfloat16 target's forward makes 2 per layer); other dtypes as they are."""
    return t.view(torch.int16) if t.dtype in (torch.bfloat16, torch.float16) else t


class KVCache(Cache):
    """Preallocated KV cache: data [2 * num_layers, B, kv_heads, max_len, head_dim].

    `lengths` [B] int32 is the number of valid entries per row. `update` (called by the
    attention layers) writes at each row's current length without advancing it; the decode
    loop advances lengths with `extend` / `compact` once the whole forward is done.
    """

    def __init__(self, num_layers: int, batch: int, kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu"):
        super().__init__(layers=[])
        self.data = torch.zeros((2 * num_layers, batch, kv_heads, max_len, head_dim), dtype=dtype, device=device)
        self.lengths = torch.zeros(batch, dtype=torch.int32, device=device)
        self.layers = [_LayerView(self, i) for i in range(num_layers)]
        self._slots: torch.Tensor | None = None  # [B, Hkv, q, d] write index, shared by all layers of one forward

    @classmethod
    def for_model(cls, config, batch: int, max_len: int, dtype: torch.dtype, device) -> "KVCache":
        """A cache shaped for a Llama-style config (num_hidden_layers, num_key_value_heads, head_dim)."""
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        return cls(config.num_hidden_layers, batch, kv_heads, max_len, head_dim(config), dtype, device)

    @property
    def max_len(self) -> int:
        return self.data.shape[3]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Write key/value_states [B, Hkv, q, d] at each row's length; return the full
        buffers [B, Hkv, S, d] of this layer."""
        _, B, H, S, d = self.data.shape
        q = key_states.shape[2]
        if layer_idx == 0 or self._slots is None or self._slots.shape[2] != q:
            # The bound check reads the lengths on the host: eager calls only (a compiled step
            # stays free of host syncs; the decode loop sizes its caches for the whole call).
            if not torch.compiler.is_compiling() and int(self.lengths.max()) + q > S:
                raise ValueError(f"KV cache: writing {q} tokens after {int(self.lengths.max())} overflows max_len = {S}")
            slots = self.lengths.long()[:, None] + torch.arange(q, device=self.data.device)  # [B, q]
            self._slots = slots[:, None, :, None].expand(B, H, q, d)
        keys, values = self.data[2 * layer_idx], self.data[2 * layer_idx + 1]
        _bits(keys).scatter_(2, self._slots, _bits(key_states.to(keys.dtype)))
        _bits(values).scatter_(2, self._slots, _bits(value_states.to(values.dtype)))
        return keys, values

    def extend(self, counts: torch.Tensor) -> None:
        """Mark counts[b] more entries of row b valid (the tokens the last forward wrote)."""
        self.lengths += counts.to(self.lengths)

    def compact(self, accepted: torch.Tensor, accept_len: torch.Tensor) -> None:
        """After a verify forward that wrote a tree at each row's length: keep the accepted
        nodes (tree_verify's accepted [B, L], accept_len [B]) contiguously, in place."""
        eagle2_kernels.kv_compact(self.data, self.lengths, accepted, accept_len)
        self.lengths += accept_len

    def select(self, rows: torch.Tensor) -> None:
        """Keep only the given batch rows (when rows finish); reallocates the buffers."""
        self.data = self.data.index_select(1, rows)
        self.lengths = self.lengths.index_select(0, rows)
        self._slots = None

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return int(self.lengths.max())

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return self.max_len

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.max_len, 0
