"""Target families beyond Llama (tiny random float64 models, no downloads): greedy EAGLE-2
equals plain decoding and transformers' greedy generate on Qwen2 (QKV bias, a sliding window on
its upper layer), Qwen3 (q/k norms), Mistral (a sliding window on every layer), Gemma 2 and 3
(alternating sliding and full layers, embedding scaling, final logit soft-capping), Phi3 (fused
projections), OLMo2 (post-norms) and Qwen2-MoE (a window kept on the attention module), with
contexts well past the windows; targets whose attention tree_attention cannot compute are
refused up front."""
import pytest
import torch
import transformers
from loop_helpers import ragged_prompts, random_head, tiny_target

from eagle2 import Generator, TreeShape
from eagle2.attention import sliding_window

WINDOW = 12  # every prompt + answer below is longer: the windows cut in on every sliding layer
FAMILIES = {
    "Llama": {},
    "Qwen2": {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 1},
    "Qwen3": {"head_dim": 16},
    "Mistral": {"sliding_window": WINDOW},
    "Gemma2": {"head_dim": 16, "sliding_window": WINDOW, "attn_logit_softcapping": None},
    "Gemma3": {"head_dim": 16, "sliding_window": WINDOW, "layer_types": ["sliding_attention", "full_attention"]},
    "Phi3": {},
    "Olmo2": {},
}
SHAPES = [TreeShape(6, 5, 1), TreeShape(8, 3, 3), TreeShape(16, 4, 4)]


def tiny(family: str, **extra):
    return tiny_target(family=family, **extra)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_greedy_equals_plain_and_transformers(family):
    target = tiny(family, **FAMILIES[family])
    if "sliding_window" in FAMILIES[family]:
        assert sliding_window(target.config) == WINDOW
    gen = Generator(target, head=random_head(target))
    prompts = ragged_prompts(3, 160, seed=2, max_len=20)
    assert max(len(p) for p in prompts) + 24 > 2 * WINDOW
    vanilla = [r.tokens for r in gen.generate(prompts, max_new_tokens=24, method="vanilla")]
    # transformers one prompt at a time: its left-padded batches put NaN into Gemma's padded rows.
    assert vanilla == [gen.generate([p], max_new_tokens=24, method="hf")[0].tokens for p in prompts]
    for shape in SHAPES:
        out = gen.generate(prompts, max_new_tokens=24, total_tokens=shape.total_tokens, depth=shape.depth,
                           branching=shape.branching)
        assert [r.tokens for r in out] == vanilla, (family, shape)


def test_window_changes_the_output():
    """The windowed families above are not exact by accident: the same Mistral without its window
    (every layer sees the whole context) generates something else from the same weights."""
    prompts = ragged_prompts(3, 160, seed=2, max_len=20)
    outs = []
    for window in (WINDOW, None):
        target = tiny("Mistral", sliding_window=window)
        outs.append([r.tokens for r in Generator(target, head=random_head(target)).generate(
            prompts, max_new_tokens=24, total_tokens=8, depth=3, branching=3)])
    assert outs[0] != outs[1]


def test_qwen2_moe_window_kept_on_the_attention_module():
    """Qwen2-MoE keeps a sliding layer's window on its attention module instead of passing it to
    the attention function: eagle2 reads it there and stays exact past the window."""
    torch.manual_seed(0)
    config = transformers.Qwen2MoeConfig(
        vocab_size=160, hidden_size=64, intermediate_size=64, moe_intermediate_size=32,
        shared_expert_intermediate_size=32, num_experts=2, num_experts_per_tok=1, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True, sliding_window=WINDOW,
        max_window_layers=2, max_position_embeddings=256, eos_token_id=2, bos_token_id=1, pad_token_id=0,
        experts_implementation="eager")  # the grouped matmul has no float64
    target = transformers.Qwen2MoeForCausalLM(config).double().eval()
    assert any(getattr(m, "sliding_window", None) == WINDOW for m in target.modules())
    gen = Generator(target, head=random_head(target))
    prompts = ragged_prompts(3, 160, seed=2, max_len=20)
    vanilla = [r.tokens for r in gen.generate(prompts, max_new_tokens=24, method="vanilla")]
    assert vanilla == [gen.generate([p], max_new_tokens=24, method="hf")[0].tokens for p in prompts]
    out = gen.generate(prompts, max_new_tokens=24, total_tokens=8, depth=3, branching=3)
    assert [r.tokens for r in out] == vanilla


def test_window_only_in_the_mask_is_refused():
    """PhiMoE applies its window only through the attention mask, which eagle2 never builds."""
    torch.manual_seed(0)
    config = transformers.PhimoeConfig(vocab_size=160, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, num_local_experts=2,
                                       num_experts_per_tok=2, sliding_window=WINDOW, max_position_embeddings=256)
    target = transformers.PhimoeForCausalLM(config).eval()
    with pytest.raises(ValueError, match="a sliding window applied only through the attention mask \\(PhimoeAttention"):
        Generator(target, head=random_head(target))


def test_soft_capping_is_refused():
    target = tiny("Gemma2", head_dim=16, sliding_window=200)
    with pytest.raises(ValueError, match="attention logit soft-capping"):
        Generator(target, head=random_head(target))


def test_attention_sinks_are_refused():
    torch.manual_seed(0)
    config = transformers.GptOssConfig(vocab_size=160, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                       num_local_experts=2, num_experts_per_tok=1, sliding_window=WINDOW)
    target = transformers.GptOssForCausalLM(config).eval()
    with pytest.raises(ValueError, match="GptOssForCausalLM: attention sinks is not supported"):
        Generator(target, head=random_head(target))


@pytest.mark.parametrize("family", ["Qwen2", "Qwen3", "Mistral", "Gemma3", "Phi3", "Olmo2"])
def test_head_for_target_trains_on_other_families(family):
    """DraftHead.for_target follows the target's config (head_dim, norms' eps, rope) and starts
    from its last layer where the shapes allow; a training step runs and lowers the loss."""
    import torch

    from eagle2.draft import DraftHead
    from eagle2.train import head_loss, target_features

    target = tiny(family, **FAMILIES[family]).float()
    target.requires_grad_(False)
    head = DraftHead.for_target(target, init_from_last_layer=True)
    assert head.config.head_dim == (getattr(target.config, "head_dim", None) or 64 // 4)
    ids = torch.randint(3, 160, (2, 24), generator=torch.Generator().manual_seed(0))
    feats, argmax, _ = target_features(target, ids)
    batch = {"features": feats, "tokens": ids, "argmax": argmax, "mask": torch.ones_like(ids, dtype=torch.bool)}
    opt = torch.optim.Adam(head.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        loss, _ = head_loss(head, batch, 0.0, 0.1, steps=2)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
