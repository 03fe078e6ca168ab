"""The target side of verification: our KVCache inside transformers' own model code, the
"eagle2_tree" attention function, ragged rows, tree masks and in-place compaction."""
import pytest
import torch
from loop_helpers import tiny_target
from transformers.cache_utils import Cache

import eagle2_kernels
from eagle2.attention import NAME, chain_bits, target_forward
from eagle2_kernels import pack_mask_bits
from eagle2.cache import KVCache


@pytest.fixture(scope="module")
def model():
    return tiny_target(seed=11)


def plain_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def features_to_logits(model, feats):
    return model.lm_head(feats)


@torch.no_grad()
def test_ragged_chain_forward_matches_plain_forward(model):
    prompts = [[5, 9, 14, 3, 77, 8], [40, 41], [7, 7, 7, 100]]
    B, L = len(prompts), 6
    cache = KVCache.for_model(model.config, B, 16, torch.float64, "cpu")
    assert isinstance(cache, Cache)
    lens = torch.tensor([len(p) for p in prompts])
    ids = torch.tensor([p + [0] * (L - len(p)) for p in prompts])
    pos = torch.minimum(torch.arange(L)[None], lens[:, None] - 1)
    feats = target_forward(model, ids, pos, cache, chain_bits(L, B), cache.lengths.clone())
    cache.extend(lens)
    assert model.config._attn_implementation == "sdpa"  # restored after our forward
    logits = features_to_logits(model, feats)
    for b, p in enumerate(prompts):
        torch.testing.assert_close(logits[b, : len(p)], plain_logits(model, p), rtol=1e-10, atol=1e-10)
    # One more token per row at its own offset, then drop the middle row and continue.
    nxt = torch.tensor([[11], [12], [13]])
    feats = target_forward(model, nxt, lens[:, None], cache, chain_bits(1, B), cache.lengths.clone())
    cache.extend(torch.ones(B, dtype=torch.int32))
    for b, p in enumerate(prompts):
        torch.testing.assert_close(features_to_logits(model, feats)[b, 0], plain_logits(model, p + [11 + b])[-1])
    keep = torch.tensor([0, 2])
    cache.select(keep)
    feats = target_forward(model, torch.tensor([[20], [21]]), (lens[keep] + 1)[:, None], cache, chain_bits(1, 2),
                           cache.lengths.clone())
    torch.testing.assert_close(features_to_logits(model, feats)[0, 0], plain_logits(model, prompts[0] + [11, 20])[-1])
    torch.testing.assert_close(features_to_logits(model, feats)[1, 0], plain_logits(model, prompts[2] + [13, 21])[-1])


@torch.no_grad()
def test_tree_forward_and_compaction(model):
    prefix = [3, 50, 60, 70]
    # Tree (node: token, parent): 0: 71 (root), 1: 80 <- 0, 2: 81 <- 0, 3: 90 <- 2, 4: 91 <- 1, 5: 92 <- 3
    tokens = [71, 80, 81, 90, 91, 92]
    parents = [-1, 0, 0, 2, 1, 3]
    depth = [0, 1, 1, 2, 2, 3]
    visible = torch.zeros(6, 6, dtype=torch.bool)
    for i in range(6):
        j = i
        while j >= 0:
            visible[i, j] = True
            j = parents[j]
    cache = KVCache.for_model(model.config, 1, 16, torch.float64, "cpu")
    target_forward(model, torch.tensor([prefix]), torch.arange(4)[None], cache, chain_bits(4, 1), cache.lengths.clone())
    cache.extend(torch.tensor([4]))
    P = len(prefix)
    feats = target_forward(model, torch.tensor([tokens]), torch.tensor([[P + d for d in depth]]), cache,
                           pack_mask_bits(visible[None]), cache.lengths.clone())
    logits = features_to_logits(model, feats)[0]
    for i in range(6):
        path = [tokens[j] for j in range(6) if visible[i, j]]
        torch.testing.assert_close(logits[i], plain_logits(model, prefix + path)[-1], rtol=1e-10, atol=1e-10)
    # Accept root -> 2 -> 3 and compact: the cache must hold exactly prefix + that path.
    accepted = torch.tensor([[0, 2, 3, -1]], dtype=torch.int32)
    before = cache.data.clone()
    cache.compact(accepted, torch.tensor([3], dtype=torch.int32))
    assert cache.lengths.tolist() == [P + 3]
    ref = KVCache.for_model(model.config, 1, 16, torch.float64, "cpu")
    seq = prefix + [71, 81, 90]
    target_forward(model, torch.tensor([seq]), torch.arange(len(seq))[None], ref, chain_bits(len(seq), 1),
                   ref.lengths.clone())
    torch.testing.assert_close(cache.data[..., : P + 3, :], ref.data[..., : P + 3, :], rtol=1e-10, atol=1e-10)
    assert torch.equal(cache.data[..., P + 3:, :], before[..., P + 3:, :])  # the rest is untouched (no copy)


def test_attention_function_needs_its_arguments(model):
    model.config._attn_implementation = NAME
    try:
        with pytest.raises(RuntimeError, match="eagle2_mask_bits"):
            model(torch.tensor([[5, 6]]))
    finally:
        model.config._attn_implementation = "sdpa"


@torch.no_grad()
def test_cache_overflow_is_an_error(model):
    cache = KVCache.for_model(model.config, 1, 4, torch.float64, "cpu")
    with pytest.raises(ValueError, match="overflows max_len = 4"):
        target_forward(model, torch.tensor([[1, 2, 3, 4, 5]]), torch.arange(5)[None], cache, chain_bits(5, 1),
                       cache.lengths.clone())


def test_kv_compact_is_the_kernel_op(model):
    """compact() is one kv_compact over all layers at once (the stacked 5-D cache)."""
    cache = KVCache.for_model(model.config, 2, 8, torch.float32, "cpu")
    cache.data.copy_(torch.randn_like(cache.data))
    cache.lengths.copy_(torch.tensor([2, 3], dtype=torch.int32))
    acc = torch.tensor([[0, 2, 4], [0, 1, -1]], dtype=torch.int32)
    alen = torch.tensor([3, 2], dtype=torch.int32)
    want = cache.data.clone()
    eagle2_kernels.kv_compact(want, cache.lengths.clone(), acc, alen, backend="reference")
    cache.compact(acc, alen)
    assert torch.equal(cache.data, want) and cache.lengths.tolist() == [5, 5]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_update_writes_each_rows_states_at_its_length(dtype):
    """update() writes row b's q new keys / values at slots lengths[b] .. lengths[b] + q - 1 of
    every head, bit for bit (16-bit floats are scattered as integers), and leaves the rest."""
    cache = KVCache(2, 2, 3, 10, 4, dtype)
    cache.data.copy_(torch.randn_like(cache.data, dtype=torch.float32))
    cache.lengths.copy_(torch.tensor([2, 5], dtype=torch.int32))
    want = cache.data.clone()
    k, v = (torch.randn(2, 3, 4, 4).to(dtype).transpose(2, 3) for _ in range(2))  # non-contiguous, as a layer passes them
    keys, values = cache.update(k, v, 1)
    for b, n in enumerate([2, 5]):
        want[2, b, :, n:n + 4], want[3, b, :, n:n + 4] = k[b], v[b]
    assert torch.equal(cache.data.view(torch.uint8), want.view(torch.uint8))
    assert keys.data_ptr() == cache.data[2].data_ptr() and values.data_ptr() == cache.data[3].data_ptr()
