"""Target families beyond Llama (tiny random float64 models, no downloads): greedy EAGLE-2
equals plain decoding and transformers' greedy generate on Qwen2 (QKV bias), Qwen3 (q/k norms),
Mistral (a sliding window longer than the context), Phi3 (fused projections) and OLMo2
(post-norms); targets whose attention tree_attention cannot compute are refused up front."""
import pytest
from loop_helpers import ragged_prompts, random_head, tiny_target

from eagle2 import Generator, TreeShape

FAMILIES = {
    "Llama": {},
    "Qwen2": {},
    "Qwen3": {"head_dim": 16},
    "Mistral": {"sliding_window": 200},
    "Phi3": {},
    "Olmo2": {},
}
SHAPES = [TreeShape(6, 5, 1), TreeShape(8, 3, 3), TreeShape(16, 4, 4)]


def tiny(family: str, **extra):
    return tiny_target(family=family, **extra)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_greedy_equals_plain_and_transformers(family):
    target = tiny(family, **FAMILIES[family])
    gen = Generator(target, head=random_head(target))
    prompts = ragged_prompts(3, 160, seed=2, max_len=20)
    vanilla = [r.tokens for r in gen.generate(prompts, max_new_tokens=20, method="vanilla")]
    assert vanilla == [r.tokens for r in gen.generate(prompts, max_new_tokens=20, method="hf")]
    for shape in SHAPES:
        out = gen.generate(prompts, max_new_tokens=20, total_tokens=shape.total_tokens, depth=shape.depth,
                           branching=shape.branching)
        assert [r.tokens for r in out] == vanilla, (family, shape)


def test_soft_capping_is_refused():
    target = tiny("Gemma2", head_dim=16, sliding_window=200)
    with pytest.raises(ValueError, match="attention logit soft-capping"):
        Generator(target, head=random_head(target))


def test_sliding_window_beyond_the_context_is_refused():
    target = tiny("Mistral", sliding_window=24)
    gen = Generator(target, head=random_head(target))
    gen.generate([[5, 6, 7]], max_new_tokens=8, total_tokens=4, depth=2, branching=2)  # fits: fine
    with pytest.raises(ValueError, match="sliding-window attention \\(window 24\\)"):
        gen.generate([[5, 6, 7] * 5], max_new_tokens=16, total_tokens=4, depth=2, branching=2)


@pytest.mark.parametrize("family", ["Qwen2", "Qwen3", "Phi3", "Olmo2"])
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
