"""Lossless sampling: the first tokens committed by EAGLE-2 sampling follow the target's exact
sampling distribution (temperature, top_k, top_p), like plain sampling. Chi-square against the
exact joint distribution, computed by enumerating every continuation of a tiny-vocabulary
target."""
import itertools

import pytest
import torch
from loop_helpers import cheat_head, random_eagle3_head, tiny_target
from scipy.stats import chisquare

from eagle2 import Generator, TreeShape
from eagle2_kernels.reference import sampling_probs

V = 12
PROMPT = [3, 7, 5, 9]
ROWS, SEEDS = 600, (0, 1, 2)


@pytest.fixture(scope="module", params=["Llama", "Qwen3", "Llama, EAGLE-3 head", "Llama, bfloat16 head"])
def gen(request):
    """A Llama, a family beyond it (Qwen3: q/k norms), a Llama drafted by an EAGLE-3 head, and one
    drafted by a head in another dtype than the target's (its proposals change, not the output)."""
    family = request.param.split(",")[0]
    extra = {"head_dim": 16} if family == "Qwen3" else {}
    model = tiny_target(vocab=V, layer_scale=0.5, logit_scale=15.0, seed=5, family=family, **extra)
    if "EAGLE-3" in request.param:  # a random head: drafting 10 of the 12 tokens gets drafts accepted
        return Generator(model, head=random_eagle3_head(model), eos_token_ids=[], shape=TreeShape(11, 1, 10))
    head = cheat_head(model)
    if "bfloat16" in request.param:
        head = head.to(torch.bfloat16)
    return Generator(model, head=head, eos_token_ids=[], shape=TreeShape(8, 3, 3))


@torch.no_grad()
def exact_joint(model, temperature, top_p, top_k) -> torch.Tensor:
    """P(t1, t2, t3) [V, V, V] under the target's sampling distribution."""
    def probs(seqs):
        logits = model(torch.tensor(seqs)).logits[:, -1]
        return sampling_probs(logits, temperature, top_p, top_k)

    p1 = probs([PROMPT])[0]  # [V]
    p2 = probs([PROMPT + [a] for a in range(V)])  # [V, V]
    p3 = probs([PROMPT + [a, b] for a, b in itertools.product(range(V), repeat=2)]).view(V, V, V)
    return p1[:, None, None] * p2[:, :, None] * p3


def chi2_pvalue(observed: torch.Tensor, expected_p: torch.Tensor) -> float:
    """Chi-square goodness of fit; cells expecting fewer than 5 samples are pooled."""
    n = int(observed.sum())
    expected = expected_p.flatten() * n
    observed = observed.flatten().double()
    big = expected >= 5
    obs = torch.cat([observed[big], observed[~big].sum()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    obs, exp = obs[exp > 0], exp[exp > 0]
    return float(chisquare(obs.numpy(), exp.numpy() * obs.sum().item() / exp.sum().item()).pvalue)


@pytest.mark.parametrize("temperature, top_p, top_k", [(1.0, 1.0, 0), (0.7, 0.9, 6)])
def test_first_tokens_follow_the_target_distribution(gen, temperature, top_p, top_k):
    joint = exact_joint(gen.model, temperature, top_p, top_k)
    for method in ("eagle2", "vanilla"):
        counts = torch.zeros(V, V, V)
        forwards = 0
        for seed in SEEDS:
            out = gen.generate([PROMPT] * ROWS, max_new_tokens=3, temperature=temperature, top_p=top_p, top_k=top_k,
                               seed=seed, method=method)
            for r in out:
                assert len(r.tokens) == 3
                counts[tuple(r.tokens)] += 1
                forwards += r.target_forwards
        p12 = chi2_pvalue(counts.sum(2), joint.sum(2))
        p23 = chi2_pvalue(counts.sum(0), joint.sum(0))
        assert min(p12, p23) > 1e-3, (method, p12, p23)
        if method == "eagle2":  # drafts were accepted, so the tree path was really exercised
            assert forwards < 0.95 * 3 * ROWS * len(SEEDS), forwards


def test_seed_reproducible(gen):
    a = gen.generate([PROMPT] * 4, max_new_tokens=8, temperature=1.0, seed=7)
    b = gen.generate([PROMPT] * 4, max_new_tokens=8, temperature=1.0, seed=7)
    assert [r.tokens for r in a] == [r.tokens for r in b]
    assert len({tuple(r.tokens) for r in a}) > 1  # rows draw different uniforms
