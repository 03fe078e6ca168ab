"""EAGLE-3 heads: the official checkpoint layout (round trip, strict keys, d2t offsets / t2d),
the target layers' features taken from the verify forward itself, and greedy decoding equal to
plain decoding on tiny float64 targets."""
import json

import pytest
import torch
from loop_helpers import assert_edited_checkpoint_refused, random_eagle3_head, ragged_prompts, tiny_target
from safetensors.torch import load_file, save_file

import eagle2
from eagle2 import Generator, TreeShape
from eagle2.attention import chain_bits, target_forward_layers
from eagle2.cache import KVCache
from eagle2.draft import DraftHead
from eagle2.draft3 import Eagle3Head, default_layers, load_head

V, LAYERS = 40, 8
OFFICIAL_KEYS = {
    "fc.weight", "norm.weight", "lm_head.weight", "d2t", "t2d",
    *(f"midlayer.{n}.weight" for n in ("hidden_norm", "input_layernorm", "post_attention_layernorm")),
    *(f"midlayer.self_attn.{p}_proj.weight" for p in "qkvo"),
    *(f"midlayer.mlp.{p}_proj.weight" for p in ("gate", "up", "down")),
}


@pytest.fixture(scope="module")
def target():
    return tiny_target(vocab=V, layers=LAYERS, layer_scale=0.5)


@pytest.fixture
def saved(tmp_path, target):
    d2t = torch.randperm(V, generator=torch.Generator().manual_seed(0))[:24].sort().values
    head = random_eagle3_head(target, layers=(1, 3, 5), d2t=d2t)
    head.save_pretrained(tmp_path)
    return head, tmp_path


def test_default_layers_are_the_official_ones():
    # The inputs of layers 2, L/2 and L-3 (SafeAILab/EAGLE), as layer outputs.
    assert default_layers(32) == (1, 15, 28)
    head = Eagle3Head.for_target(tiny_target(vocab=V, layers=LAYERS))
    assert head.target_layers == (1, 3, 4) and head.fc.in_features == 3 * 64


def test_round_trip_in_the_official_layout(saved, target):
    head, path = saved
    state = load_file(str(path / "model.safetensors"))
    assert set(state) == OFFICIAL_KEYS
    assert state["fc.weight"].shape == (64, 3 * 64) and state["midlayer.self_attn.q_proj.weight"].shape == (64, 128)
    assert torch.equal(state["d2t"] + torch.arange(24), head.d2t)  # offsets on disk
    assert state["t2d"].dtype == torch.bool and torch.equal(state["t2d"].nonzero()[:, 0], head.d2t)
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLMEagle3"] and config["draft_vocab_size"] == 24
    assert config["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [1, 3, 5]  # SGLang: layer outputs
    assert config["eagle_aux_hidden_state_layer_ids"] == [2, 4, 6]  # vLLM: layer inputs
    loaded = load_head(path, dtype=torch.float64).attach(target)
    assert isinstance(loaded, Eagle3Head) and loaded.target_layers == (1, 3, 5)
    assert torch.equal(loaded.d2t, head.d2t)
    for k, v in head.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    g = torch.Generator().manual_seed(1)
    x, t, p = torch.randn(2, 5, 192, generator=g, dtype=torch.float64), torch.randint(0, V, (2, 5)), torch.arange(1, 6).expand(2, 5)
    with torch.no_grad():
        assert torch.equal(head.logits(head(x, t, p)), loaded.logits(loaded(x, t, p)))
    gen = eagle2.load(target, draft=str(path), shape=TreeShape(8, 3, 3))
    assert isinstance(gen.head, Eagle3Head)


def test_official_extras_and_defaults(saved, target, tmp_path_factory):
    """An official checkpoint may carry embed_tokens and omit the layer ids (defaults apply);
    a full-vocabulary head may omit d2t / t2d."""
    head, path = saved
    state = load_file(str(path / "model.safetensors"))
    state["embed_tokens.weight"] = torch.zeros(V, 64)
    save_file(state, str(path / "model.safetensors"))
    config = json.loads((path / "config.json").read_text())
    del config["eagle_config"]
    config["eagle_aux_hidden_state_layer_ids"] = [1, 3, 5]  # vLLM's spelling: layer inputs
    (path / "config.json").write_text(json.dumps(config))
    assert load_head(path).attach(target).target_layers == (0, 2, 4)
    del config["eagle_aux_hidden_state_layer_ids"]
    (path / "config.json").write_text(json.dumps(config))
    assert load_head(path).attach(target).target_layers == default_layers(LAYERS)
    full = tmp_path_factory.mktemp("full")
    random_eagle3_head(target).save_pretrained(full)
    assert not {"d2t", "t2d"} & set(load_file(str(full / "model.safetensors")))
    assert load_head(full).d2t is None


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.pop("norm.weight"), "missing key 'norm.weight'"),
    (lambda s: s.update({"layers.0.mlp.up_proj.weight": torch.zeros(1)}), "unexpected key 'layers.0.mlp.up_proj.weight'"),
    (lambda s: s.update({"fc.weight": torch.zeros(64, 128)}), "fc.weight has shape"),
    (lambda s: s.pop("t2d"), "missing key 't2d'"),
    (lambda s: s["t2d"].fill_(True), "t2d does not mark exactly"),
    (lambda s: s.update({"d2t": s["d2t"] + 1000}), "outside the target vocabulary"),
    (lambda s: s.update({"embed_tokens.weight": torch.zeros(3, 3)}), "embed_tokens.weight has shape"),
])
def test_strict_keys(saved, edit, message):
    assert_edited_checkpoint_refused(saved[1], edit, message, load_head)


@pytest.mark.parametrize("field, message", [
    ({"norm_before_residual": True}, "norm_before_residual: true"),
    ({"eagle_config": {"use_aux_hidden_state": False}}, "use_aux_hidden_state: false"),
    ({"transformer_layer_config": {}}, "speculators"),
    ({"target_hidden_size": 128}, "target_hidden_size 128"),
    ({"eagle_config": {}, "eagle_aux_hidden_state_layer_ids": [0, 3, 5]}, "0, the embeddings"),
])
def test_variants_eagle2_does_not_run_are_refused(saved, field, message):
    _, path = saved
    config = json.loads((path / "config.json").read_text())
    config.update(field)
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        load_head(path)


def test_for_target_on_a_family_with_fused_projections():
    """Phi3 fuses q/k/v and gate/up: the head still starts as a logit lens on its highest layer."""
    target = tiny_target(vocab=V, layers=6, family="Phi3")
    head = Eagle3Head.for_target(target).double()
    ids = torch.randint(3, V, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = target.model(input_ids=ids, output_hidden_states=True).hidden_states
        feats = torch.cat([ref[i + 1] for i in head.target_layers], -1)
        lens = target.lm_head(target.model.norm(ref[head.target_layers[-1] + 1]))
        torch.testing.assert_close(head.logits(head(feats, ids, torch.arange(1, 10)[None])), lens)


def test_kind_detection_and_bad_layers(saved, target, tmp_path):
    random_head = DraftHead.for_target(target)
    random_head.save_pretrained(tmp_path)
    assert type(load_head(tmp_path)) is DraftHead
    head, _ = saved
    with pytest.raises(ValueError, match=r"feature layers \[1, 3, 5\] do not fit the target"):
        head.attach(tiny_target(vocab=V, layers=4))  # layer outputs 0..2 only (the last is excluded)


@torch.no_grad()
def test_layer_features_are_the_targets_hidden_states(target):
    """target_forward_layers returns, from the tree-attention forward itself, the outputs of the
    named decoder layers: transformers' own hidden states of a causal forward."""
    ids = torch.randint(3, V, (2, 11), generator=torch.Generator().manual_seed(2))
    ref = target.model(input_ids=ids, output_hidden_states=True)
    cache = KVCache.for_model(target.config, 2, 16, torch.float64, "cpu")
    feats, layers = target_forward_layers(target, ids, torch.arange(11).expand(2, 11), cache, chain_bits(11, 2),
                                          cache.lengths.clone(), (1, 3, 6))
    torch.testing.assert_close(feats, ref.last_hidden_state)
    torch.testing.assert_close(layers, torch.cat([ref.hidden_states[i + 1] for i in (1, 3, 6)], -1))


SHAPES = [TreeShape(6, 5, 1), TreeShape(8, 3, 3), TreeShape(16, 6, 2), TreeShape(30, 3, 10)]


def test_greedy_equals_plain_decoding(target):
    """Ragged batches, several tree shapes; the wide tree accepts drafts, so the multi-token
    path (catch-up over accepted nodes' layer features) really runs."""
    gen = Generator(target, head=random_eagle3_head(target, layers=(1, 3, 5)))
    prompts = ragged_prompts(5, V, seed=1)
    vanilla = [r.tokens for r in gen.generate(prompts, max_new_tokens=24, method="vanilla")]
    assert vanilla == [r.tokens for r in gen.generate(prompts, max_new_tokens=24, method="hf")]
    for shape in SHAPES:
        out = gen.generate(prompts, max_new_tokens=24, total_tokens=shape.total_tokens, depth=shape.depth,
                           branching=shape.branching)
        assert [r.tokens for r in out] == vanilla, shape
    assert max(r.tau for r in out) > 1.3, [r.tau for r in out]


@torch.no_grad()
def test_head_reads_the_committed_tokens_layer_outputs(target):
    """Every catch-up input of the head is (layer outputs at token i, token i+1) of the final
    sequence at position i+1: the features of accepted tree nodes come from the verify forward
    and land where the committed tokens are."""
    head = random_eagle3_head(target, layers=(0, 2, 6))
    calls = []
    hook = head.register_forward_hook(
        lambda mod, args, kwargs, out: calls.append(args[:3]) if args[0].shape[-1] == 3 * 64 else None, with_kwargs=True)
    gen = Generator(target, head=head, shape=TreeShape(30, 3, 10))
    prompts = ragged_prompts(3, V, seed=4, min_len=4)
    try:
        out = gen.generate(prompts, max_new_tokens=16)
    finally:
        hook.remove()
    assert max(r.tau for r in out) > 1.3
    seqs = [p + r.tokens for p, r in zip(prompts, out)]
    checked = 0
    for feats, toks, pos in calls:
        # A call holds the rows still active; match each row to its sequence by content.
        for b in range(feats.shape[0]):
            for j in range(feats.shape[1]):
                if j and pos[b, j] == pos[b, j - 1]:
                    break  # padding past the row's count (its position repeats; never kept in the cache)
                p = int(pos[b, j])
                cands = [s for s in seqs if p < len(s) and s[p] == int(toks[b, j])]
                hits = []
                for s in cands:
                    ref = target.model(input_ids=torch.tensor([s[:p]]), output_hidden_states=True).hidden_states
                    want = torch.cat([ref[i + 1][0, p - 1] for i in (0, 2, 6)])
                    hits.append(torch.allclose(feats[b, j], want, atol=1e-10))
                assert any(hits), (b, j, p)
                checked += 1
    assert checked > sum(len(p) for p in prompts) + 8  # the prefill's and several steps' catch-ups
