"""DraftHead: EAGLE-1/2 checkpoint layout (round trip, strict keys), target checks, reduced
vocabulary; for both head kinds (EAGLE-1/2, EAGLE-3) the cached tree forward and the
training-time-test unroll against the causal training forward."""
import json

import pytest
import torch
from loop_helpers import assert_edited_checkpoint_refused, random_eagle3_head, random_head, tiny_target
from safetensors.torch import load_file, save_file

from eagle2.attention import chain_bits
from eagle2_kernels import pack_mask_bits
from eagle2.cache import KVCache
from eagle2.draft import DraftHead

EAGLE_KEYS = {
    "fc.weight", "fc.bias", "layers.0.post_attention_layernorm.weight",
    *(f"layers.0.self_attn.{p}_proj.weight" for p in "qkvo"),
    *(f"layers.0.mlp.{p}_proj.weight" for p in ("gate", "up", "down")),
}


@pytest.fixture(scope="module")
def target():
    return tiny_target()


@pytest.fixture
def saved(tmp_path, target):
    head = random_head(target)
    head.save_pretrained(tmp_path)
    return head, tmp_path


@pytest.fixture(params=["eagle2", "eagle2-2layers", "eagle3"])
def any_head(request, target):
    if request.param == "eagle3":
        return random_eagle3_head(target)
    return random_head(target, layers=2 if request.param == "eagle2-2layers" else 1)


def feature_width(head) -> int:
    """What the head reads from the target: h (EAGLE-1/2) or one h per feature layer (EAGLE-3)."""
    return head.config.hidden_size * len(head.target_layers or (1,))


def inputs(target, B=2, T=7, seed=0, width=None):
    """Random features [B, T, width (default h)], tokens t_{i+1} and positions i + 1."""
    g = torch.Generator().manual_seed(seed)
    h, V = target.config.hidden_size, target.config.vocab_size
    feats = torch.randn(B, T, width or h, generator=g, dtype=torch.float64)
    toks = torch.randint(0, V, (B, T), generator=g)
    return feats, toks, torch.arange(1, T + 1).expand(B, T)


def test_round_trip_in_the_eagle_layout(saved, target):
    head, path = saved
    assert set(load_file(str(path / "model.safetensors"))) == EAGLE_KEYS
    config = json.loads((path / "config.json").read_text())
    assert config["num_hidden_layers"] == 1 and config["hidden_size"] == 64 and config["bias"] is True
    loaded = DraftHead.from_pretrained(path, dtype=torch.float64).attach(target)
    for k, v in head.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    f, t, p = inputs(target)
    assert torch.equal(loaded(f, t, p), head(f, t, p))


def test_loads_pytorch_model_bin_with_official_embed_tokens(saved, target):
    head, path = saved
    state = load_file(str(path / "model.safetensors"))
    # Official EAGLE checkpoints carry an (untrained) copy of the target embedding: accepted, unused.
    state["embed_tokens.weight"] = torch.zeros(160, 64, dtype=torch.float64)
    (path / "model.safetensors").unlink()
    torch.save(state, path / "pytorch_model.bin")
    loaded = DraftHead.from_pretrained(path, dtype=torch.float64).attach(target)
    f, t, p = inputs(target)
    assert torch.equal(loaded(f, t, p), head(f, t, p))
    assert "embed_tokens.weight" not in loaded.state_dict()


def test_bias_inferred_when_the_config_does_not_say(saved):
    _, path = saved
    config = json.loads((path / "config.json").read_text())
    del config["bias"]
    (path / "config.json").write_text(json.dumps(config))
    assert DraftHead.from_pretrained(path).fc.bias is not None
    state = load_file(str(path / "model.safetensors"))
    del state["fc.bias"]
    save_file(state, str(path / "model.safetensors"))
    assert DraftHead.from_pretrained(path).fc.bias is None


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.pop("layers.0.mlp.up_proj.weight"), "missing key 'layers.0.mlp.up_proj.weight'"),
    (lambda s: s.pop("fc.bias"), "missing key 'fc.bias'"),  # the config says bias: true
    (lambda s: s.update({"layers.0.input_layernorm.weight": torch.ones(64)}), "unexpected key 'layers.0.input_layernorm.weight'"),
    (lambda s: s.update({"lm_head.weight": torch.ones(160, 64)}), "unexpected key 'lm_head.weight'"),
    (lambda s: s.update({"fc.weight": torch.ones(64, 64)}), r"fc.weight has shape \(64, 64\), expected \(64, 128\)"),
    (lambda s: s.update({"embed_tokens.weight": torch.ones(10, 64)}), r"embed_tokens.weight has shape \(10, 64\)"),
])
def test_strict_keys(saved, edit, message):
    assert_edited_checkpoint_refused(saved[1], edit, message, DraftHead.from_pretrained)


def test_bad_checkpoint_folders(tmp_path, saved):
    with pytest.raises(ValueError, match="config.json not found"):
        DraftHead.from_pretrained(tmp_path / "nowhere")
    _, path = saved
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 2}))
    with pytest.raises(ValueError, match="missing key 'layers.1.self_attn.q_proj.weight'"):
        DraftHead.from_pretrained(path)
    (path / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 0}))
    with pytest.raises(ValueError, match="num_hidden_layers >= 1, got 0"):
        DraftHead.from_pretrained(path)
    (path / "config.json").write_text(json.dumps(config))
    (path / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="no weights"):
        DraftHead.from_pretrained(path)


def test_grown_head_computes_the_same_and_round_trips(target, tmp_path):
    """grown(n) appends layers that start as no-ops (the same output), trains them (gradients
    reach the new layers), and saves / loads as an n-layer head of our extended layout."""
    head = random_head(target)
    deep = head.grown(3)
    assert deep.config.num_hidden_layers == 3 and len(deep.layers) == 3 and head.config.num_hidden_layers == 1
    f, t, p = inputs(target)
    with torch.no_grad():
        torch.testing.assert_close(deep(f, t, p), head(f, t, p), rtol=0, atol=0)
    deep(f, t, p).square().sum().backward()
    assert deep.layers[2].self_attn.o_proj.weight.grad.abs().sum() > 0
    deep.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["num_hidden_layers"] == 3
    assert "layers.2.input_layernorm.weight" in load_file(str(tmp_path / "model.safetensors"))
    assert "layers.0.input_layernorm.weight" not in load_file(str(tmp_path / "model.safetensors"))
    loaded = DraftHead.from_pretrained(tmp_path, dtype=torch.float64).attach(target)
    with torch.no_grad():
        torch.testing.assert_close(loaded(f, t, p), deep(f, t, p), rtol=0, atol=0)
    with pytest.raises(ValueError, match="at least the head's 3, got 2"):
        deep.grown(2)


def test_refuses_a_mismatched_target(target):
    head = random_head(target)
    with pytest.raises(ValueError, match="hidden_size 64 does not match the target's 32"):
        head.attach(tiny_target(hidden=32, heads=2, kv_heads=1))
    with pytest.raises(ValueError, match="vocab_size 160 does not match the target's 96"):
        head.attach(tiny_target(vocab=96))
    with pytest.raises(RuntimeError, match="attach"):
        DraftHead(head.config)(*inputs(target))


def test_reduced_vocabulary(tmp_path, target):
    d2t = torch.tensor([7, 3, 150, 42, 0])
    torch.manual_seed(3)
    head = DraftHead.for_target(target, init_from_last_layer=False, d2t=d2t).double().attach(target)
    full = DraftHead(head.config).double()
    full.load_state_dict({k: v for k, v in head.state_dict().items() if k != "d2t"})
    full.attach(target)
    f, t, p = inputs(target)
    hidden = head(f, t, p)
    # The reduced lm_head is a [5, h] GEMM, the full one [160, h]: BLAS may sum each dot product
    # in another order for another shape (MKL does on AMD EPYC), so equal only within rounding.
    torch.testing.assert_close(head.logits(hidden), full.logits(hidden)[..., d2t], rtol=1e-12, atol=1e-12)
    assert head.to_target_ids(torch.tensor([2, 0], dtype=torch.int32)).tolist() == [150, 7]
    head.save_pretrained(tmp_path)
    assert torch.equal(load_file(str(tmp_path / "model.safetensors"))["d2t"], d2t)
    loaded = DraftHead.from_pretrained(tmp_path, dtype=torch.float64).attach(target)
    assert torch.equal(loaded.d2t, d2t) and torch.equal(loaded.logits(hidden), head.logits(hidden))
    with pytest.raises(ValueError, match="d2t holds ids outside"):
        DraftHead(head.config, d2t=torch.tensor([1, 160])).attach(target)


@torch.no_grad()
def test_cached_tree_forward_matches_causal_forward(target, any_head):
    """The drafting path (KV cache + tree_attention) computes what training computes."""
    head = any_head
    B, T = 2, 9
    f, t, p = inputs(target, B, T, width=feature_width(head))
    want = head(f, t, p)
    cache = KVCache.for_model(head.config, B, 32, torch.float64, "cpu")
    got = []
    for lo, hi in ((0, 4), (4, 5), (5, 9)):  # chunks, like prefill then catch-ups
        n = hi - lo
        got.append(head(f[:, lo:hi], t[:, lo:hi], p[:, lo:hi], cache=cache, mask_bits=chain_bits(n, B),
                        prefix_len=cache.lengths.clone()))
        cache.extend(torch.full((B,), n))
    torch.testing.assert_close(torch.cat(got, 1), want, rtol=1e-12, atol=1e-12)


@torch.no_grad()
def test_tree_mask_sees_only_ancestors(target, any_head):
    """A node attending to [prefix, its ancestors] equals the causal forward of that path."""
    head = any_head
    f, t, p = inputs(target, 1, 6, width=feature_width(head))
    cache = KVCache.for_model(head.config, 1, 32, torch.float64, "cpu")
    head(f[:, :3], t[:, :3], p[:, :3], cache=cache, mask_bits=chain_bits(3, 1), prefix_len=cache.lengths.clone())
    cache.extend(torch.tensor([3]))
    # Tree below the prefix: nodes a, b (siblings at position 4), c (child of b at position 5).
    tree_f = torch.stack([f[0, 3], f[0, 4], f[0, 5]])[None]
    tree_t = torch.stack([t[0, 3], t[0, 4], t[0, 5]])[None]
    tree_p = torch.tensor([[4, 4, 5]])
    visible = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 1, 1]], dtype=torch.bool)[None]
    out = head(tree_f, tree_t, tree_p, cache=cache, mask_bits=pack_mask_bits(visible), prefix_len=cache.lengths.clone())
    path_b_c = torch.cat([f[:, :3], tree_f[:, 1:]], 1), torch.cat([t[:, :3], tree_t[:, 1:]], 1), torch.tensor([[1, 2, 3, 4, 5]])
    path_a = torch.cat([f[:, :3], tree_f[:, :1]], 1), torch.cat([t[:, :3], tree_t[:, :1]], 1), torch.tensor([[1, 2, 3, 4]])
    torch.testing.assert_close(out[:, 1:], head(*path_b_c)[:, 3:], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out[:, :1], head(*path_a)[:, 3:], rtol=1e-12, atol=1e-12)


def test_for_target_copies_the_last_layer(target):
    head = DraftHead.for_target(target)
    last = target.model.layers[-1]
    assert torch.equal(head.layers[0].self_attn.q_proj.weight, last.self_attn.q_proj.weight)
    assert torch.equal(head.layers[0].mlp.down_proj.weight, last.mlp.down_proj.weight)
    f, t, p = inputs(target)
    x = head.fc(torch.cat([target.model.embed_tokens(t), f], -1))
    torch.testing.assert_close(x, f)  # fc passes the feature through


def test_training_time_test_unroll_equals_drafting(target, any_head):
    """Step k of train.unrolled at index j computes what the draft computes at depth k below the
    root t_{j+1}: the committed prefix in its cache, its ancestors and itself in the tree."""
    from eagle2.train import unrolled

    head = any_head
    B, T, steps = 2, 9, 3
    feats, toks, _ = inputs(target, B, T, seed=3, width=feature_width(head))
    with torch.no_grad():
        preds = unrolled(head, feats, toks, steps)
        for j in range(T - steps):
            cache = KVCache.for_model(head.config, B, T + steps, torch.float64, "cpu")
            chain = head(feats[:, :j + 1], toks[:, 1:j + 2], torch.arange(1, j + 2).expand(B, -1), cache=cache,
                         mask_bits=chain_bits(j + 1, B), prefix_len=cache.lengths)
            cache.extend(torch.full((B,), j + 1, dtype=torch.int32))
            assert torch.allclose(chain[:, j], preds[0][:, j], atol=1e-12)
            hidden, committed = chain[:, j:j + 1], torch.full((B,), j + 1, dtype=torch.int32)
            for k in range(2, steps + 1):  # depth k sees its k - 2 drafted ancestors and itself
                bits = torch.full((B, 1, 1), (1 << (k - 1)) - 1, dtype=torch.int32)
                hidden = head(hidden, toks[:, j + k:j + k + 1], torch.full((B, 1), j + k), cache=cache,
                              mask_bits=bits, prefix_len=committed)
                cache.extend(torch.ones(B, dtype=torch.int32))
                assert torch.allclose(hidden[:, 0], preds[k - 1][:, j], atol=1e-12), (j, k)
        # Steps >= 2 from a subset of the positions compute the same predictions there.
        index = torch.tensor([[1, 4, 5], [0, 2, 6]])
        part = unrolled(head, feats, toks, steps, index)
        assert torch.equal(part[0], preds[0])
        for k in range(2, steps + 1):
            assert torch.allclose(part[k - 1], preds[k - 1].gather(1, index[..., None].expand(2, 3, 64)), atol=1e-12)
