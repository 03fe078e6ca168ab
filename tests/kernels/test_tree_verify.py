"""tree_verify: every backend against eagle2_kernels.reference (accepted, accept_len and bonus
must be identical), the sampling rule checked statistically (chi-square against the target's
distribution, with a check that the test rejects a wrong rule), and argument validation."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from scipy.stats import chisquare

import eagle2_kernels as ek
from eagle2_kernels import reference
from eagle2_kernels.reference import VerifyResult
from kernel_helpers import DTYPES, backends_under_test, device_of

BACKENDS = backends_under_test("tree_verify")


def random_case(seed: int, B: int, m: int, V: int, special: str = "finite", dtype=torch.float32):
    """Random trees and logits built to exercise the walk: parents often among the last few
    nodes (deep trees), duplicate tokens among siblings, and at most nodes one child's token
    boosted to (or tied with) the row maximum so the target often agrees with the draft.
    special: "nonfinite" sprinkles NaN / +inf / -inf, "dead" makes some rows all NaN / -inf."""
    g = torch.Generator().manual_seed(seed)

    def coin(p: float) -> bool:
        return float(torch.rand((), generator=g)) < p

    def pick(n: int) -> int:
        return int(torch.randint(0, n, (), generator=g))

    parents = torch.full((B, m), -1, dtype=torch.int32)
    tokens = torch.randint(0, V, (B, m), generator=g, dtype=torch.int32)
    for b in range(B):
        for i in range(1, m):
            parents[b, i] = i - 1 - pick(min(i, 3)) if coin(0.5) else pick(i)
            siblings = [j for j in range(1, i) if parents[b, j] == parents[b, i]]
            if siblings and coin(0.2):
                tokens[b, i] = tokens[b, siblings[pick(len(siblings))]]
    logits = torch.randn(B, m, V, generator=g) * 2
    for b in range(B):
        for n in range(m):
            children = [c for c in range(n + 1, m) if parents[b, c] == n]
            if children and coin(0.75):  # a quarter of the boosts tie with the maximum
                boost = 0.0 if coin(0.25) else 3.0 * float(torch.rand((), generator=g))
                logits[b, n, tokens[b, children[pick(len(children))]]] = logits[b, n].max() + boost
            if coin(0.2):  # a tie with the row maximum at a random id
                logits[b, n, pick(V)] = logits[b, n].max()
    if special == "nonfinite":
        values = torch.tensor([float("nan"), float("inf"), float("-inf")])
        where = torch.rand(B, m, V, generator=g) < 0.15
        logits[where] = values[torch.randint(0, 3, (int(where.sum()),), generator=g)]
    elif special == "dead":
        rows = torch.rand(B, m, generator=g) < 0.4
        logits[rows] = torch.where(torch.rand(int(rows.sum()), V, generator=g) < 0.5, float("nan"), float("-inf"))
    uniforms = torch.rand(B, m, generator=g)
    return tokens, parents, logits.to(dtype), uniforms


@st.composite
def cases(draw):
    B = draw(st.integers(1, 4))
    m = draw(st.integers(1, 20))
    V = draw(st.integers(2, 64))
    special = draw(st.sampled_from(["finite", "nonfinite", "dead"]))
    dtype = draw(st.sampled_from(DTYPES))
    max_depth = draw(st.none() | st.integers(0, m - 1))
    return random_case(draw(st.integers(0, 2**32 - 1)), B, m, V, special, dtype), max_depth


def assert_matches_reference(backend: str, tokens, parents, logits, uniforms, **kw) -> VerifyResult:
    """Run the reference and `backend` (into a garbage-filled `out`) and require equality."""
    want = ek.tree_verify(tokens, parents, logits, uniforms=uniforms, backend="reference", **kw)
    dev = device_of(backend)
    out = VerifyResult(*(torch.full_like(t, 7, device=dev) for t in want))
    got = ek.tree_verify(tokens.to(dev), parents.to(dev), logits.to(dev), uniforms=uniforms.to(dev), out=out,
                         backend=backend, **kw)
    assert got is out
    for name, w, o in zip(VerifyResult._fields, want, got):
        assert torch.equal(o.cpu(), w), f"{name}: {backend} {o.tolist()} != reference {w.tolist()}"
    return want


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=25)
@given(case=cases())
def test_greedy_matches_reference(backend, case):
    (tokens, parents, logits, uniforms), max_depth = case
    assert_matches_reference(backend, tokens, parents, logits, uniforms, max_depth=max_depth)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # numpy in Triton's interpreter: x / t -> inf, then clamped
@settings(max_examples=20)
@given(
    case=cases(),
    temperature=st.sampled_from([0.5, 1.0, 2.0]),
    top_k=st.sampled_from([0, 3]),
    top_p=st.sampled_from([1.0, 0.8]),
)
def test_sampling_matches_reference(backend, case, temperature, top_k, top_p):
    (tokens, parents, logits, uniforms), max_depth = case
    assert_matches_reference(backend, tokens, parents, logits, uniforms, max_depth=max_depth,
                             temperature=temperature, top_k=top_k, top_p=top_p)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_chain_is_accepted_up_to_max_depth(backend, temperature):
    # A chain whose every node predicts the next token almost surely: the walk ends at the
    # leaf or after L = max_depth + 1 nodes, and the bonus is the next token of the chain.
    m, V = 12, 16
    parents = (torch.arange(m, dtype=torch.int32) - 1)[None]
    tokens = torch.arange(m, dtype=torch.int32)[None]
    logits = torch.zeros(1, m, V)
    logits[0, torch.arange(m), (torch.arange(m) + 1) % V] = 40.0
    uniforms = torch.full((1, m), 0.5)
    for max_depth in (None, 0, 3, m - 1):
        L = m if max_depth is None else max_depth + 1
        res = assert_matches_reference(backend, tokens, parents, logits, uniforms, max_depth=max_depth,
                                       temperature=temperature)
        assert res.accept_len.tolist() == [L]
        assert res.accepted[0].tolist() == list(range(L))
        assert res.bonus.tolist() == [L % V]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "root_logits, argmax",
    [
        ([float("nan"), 3.0, 7.0, 7.0, float("-inf")], 2),  # NaN is -inf; tie: lowest id
        ([float("inf"), 3.0, float("inf"), float("nan"), 0.0], 0),  # +inf is the largest float, tied
        ([float("nan")] * 5, 0),  # no finite logit: every entry ties at -inf
    ],
)
def test_greedy_ties_and_nonfinite(backend, root_logits, argmax):
    tokens = torch.tensor([[0, 3, 2, 0]], dtype=torch.int32)  # root with children tokens 3, 2, 0
    parents = torch.tensor([[-1, 0, 0, 0]], dtype=torch.int32)
    logits = torch.zeros(1, 4, 5)
    logits[0, 0] = torch.tensor(root_logits)
    logits[0, 1:, 4] = 1.0  # every child predicts token 4
    res = assert_matches_reference(backend, tokens, parents, logits, torch.zeros(1, 4))
    child = 1 + [3, 2, 0].index(argmax)  # the first child whose token is the root's argmax
    assert res.accepted.tolist() == [[0, child, -1, -1]] and res.bonus.tolist() == [4]


# --- the sampling rule is exact: committed tokens follow the target's distribution ----------

MC_V = 6
MC_TOKENS = [0, 2, 0, 4, 2, 1, 3, 5, 2]  # node 4 repeats its sibling's token 2
MC_PARENTS = [-1, 0, 0, 0, 0, 1, 1, 2, 5]  # depth 3 at node 8
MC_ROWS = 20000


def mc_target():
    """A toy target model: logits for every context used (root, the root's continuations, and
    the deeper tree nodes), as one [m, V] tensor for the tree plus [V, V] for context (root, t)."""
    g = torch.Generator().manual_seed(1234)
    after_root = torch.randn(MC_V, MC_V, generator=g) * 1.5  # context (root, t) -> logits
    node_logits = torch.randn(len(MC_TOKENS), MC_V, generator=g) * 1.5
    # Drafts likely enough that depth 2 is reached often, with mass left for rejections.
    node_logits[0] = torch.tensor([1.2, 0.0, 1.8, -0.5, 0.8, -1.0])
    after_root[2] = torch.tensor([-0.5, 1.5, 0.0, 1.2, -1.0, 0.3])
    after_root[0] = torch.tensor([0.0, -1.0, 0.5, -0.5, 0.2, 1.5])
    for node, parent in enumerate(MC_PARENTS):
        if parent == 0:
            node_logits[node] = after_root[MC_TOKENS[node]]
    return node_logits, after_root


def first_two_tokens(accept_len, accepted, bonus, after_probs, rng):
    """The first two committed tokens of each row; when only the bonus is committed, the second
    token is what the next step would sample from the target after (root, bonus)."""
    tok = np.asarray(MC_TOKENS)
    acc = np.asarray(accepted)
    n = np.asarray(accept_len)
    t1 = np.where(n >= 2, tok[np.maximum(acc[:, 1], 0)], bonus)
    t2 = np.where(n >= 3, tok[np.maximum(acc[:, 2], 0)], bonus)
    fresh = n == 1
    cdf = np.cumsum(after_probs[t1[fresh]], axis=1)
    draw = (cdf < rng.random((int(fresh.sum()), 1)) * cdf[:, -1:]).sum(1)
    t2[fresh] = np.minimum(draw, MC_V - 1)
    return t1, t2


def chi2_pvalue(observed: np.ndarray, expected_probs: np.ndarray) -> float:
    """Chi-square p-value of counts against probabilities; cells expecting < 5 are pooled, and
    any count in an impossible cell is an outright rejection (p = 0)."""
    expected = expected_probs * observed.sum()
    if observed[expected_probs == 0].sum() > 0:
        return 0.0
    big = expected >= 5
    small = (~big) & (expected_probs > 0)
    obs = np.append(observed[big], observed[small].sum())
    exp = np.append(expected[big], expected[small].sum())
    keep = exp > 0
    return float(chisquare(obs[keep], exp[keep] * obs.sum() / exp[keep].sum()).pvalue)


def verify_without_residual(probs: np.ndarray, uniforms: np.ndarray):
    """A WRONG rule, to show the test has power: a rejected child's mass is not removed (each
    child accepted with probability p(x) on the full distribution) and the bonus is drawn from
    the full distribution instead of the residual."""
    B = uniforms.shape[0]
    accepted = np.full((B, len(MC_TOKENS)), -1)
    accept_len = np.ones(B, dtype=np.int64)
    bonus = np.zeros(B, dtype=np.int64)
    for b in range(B):
        cur, path = 0, [0]
        while True:
            nxt = next((c for c, p in enumerate(MC_PARENTS) if p == cur and uniforms[b, c] < probs[cur, MC_TOKENS[c]]), -1)
            if nxt < 0:
                break
            cur = nxt
            path.append(cur)
        accepted[b, : len(path)] = path
        accept_len[b] = len(path)
        cdf = np.cumsum(probs[cur])
        bonus[b] = min(int((cdf <= uniforms[b, 0] * cdf[-1]).sum()), MC_V - 1)
    return accept_len, accepted, bonus


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 1.0), (0.7, 4, 0.9)])
def test_sampling_distribution_is_the_target(backend, temperature, top_k, top_p):
    node_logits, after_root = mc_target()
    m = len(MC_TOKENS)
    tokens = torch.tensor(MC_TOKENS, dtype=torch.int32).expand(MC_ROWS, m).contiguous()
    parents = torch.tensor(MC_PARENTS, dtype=torch.int32).expand(MC_ROWS, m).contiguous()
    logits = node_logits.expand(MC_ROWS, m, MC_V).contiguous()
    g = torch.Generator().manual_seed(99)
    res = ek.tree_verify(tokens, parents, logits, temperature=temperature, top_k=top_k, top_p=top_p,
                         generator=g, backend=backend)

    probs = reference.sampling_probs(node_logits, temperature, top_p, top_k).double().numpy()
    after_probs = reference.sampling_probs(after_root, temperature, top_p, top_k).double().numpy()
    want_t1 = probs[0]
    want_pair = (want_t1[:, None] * after_probs).ravel()

    rng = np.random.default_rng(7)
    t1, t2 = first_two_tokens(res.accept_len.numpy(), res.accepted.numpy(), res.bonus.numpy(), after_probs, rng)
    assert (res.accept_len >= 3).float().mean() > 0.1  # the depth-2 decisions are exercised
    assert chi2_pvalue(np.bincount(t1, minlength=MC_V), want_t1) > 1e-3
    assert chi2_pvalue(np.bincount(t1 * MC_V + t2, minlength=MC_V * MC_V), want_pair) > 1e-3

    wrong = verify_without_residual(probs, torch.rand(MC_ROWS, m, generator=g).numpy())
    w1, w2 = first_two_tokens(*wrong, after_probs, rng)
    assert chi2_pvalue(np.bincount(w1, minlength=MC_V), want_t1) < 1e-6
    assert chi2_pvalue(np.bincount(w1 * MC_V + w2, minlength=MC_V * MC_V), want_pair) < 1e-6


# --- bad input ----------------------------------------------------------------------------


def good_args():
    tokens = torch.tensor([[5, 1, 2]], dtype=torch.int32)
    parents = torch.tensor([[-1, 0, 0]], dtype=torch.int32)
    return dict(tokens=tokens, parents=parents, target_logits=torch.randn(1, 3, 8), temperature=1.0,
                uniforms=torch.rand(1, 3))


@pytest.mark.parametrize(
    "change, name",
    [
        (dict(uniforms=torch.rand(1, 4)), "uniforms"),
        (dict(uniforms=torch.rand(1, 3, dtype=torch.float64)), "uniforms"),
        (dict(temperature=-0.5), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-1), "top_k"),
        (dict(parents=torch.tensor([[0, 0, 0]], dtype=torch.int32)), "parents"),
        (dict(parents=torch.tensor([[-1, 0, 2]], dtype=torch.int32)), "parents"),
        (dict(tokens=torch.tensor([[5, 1, 8]], dtype=torch.int32)), "tokens"),
        (dict(tokens=torch.tensor([[5, -1, 2]], dtype=torch.int32)), "tokens"),
        (dict(target_logits=torch.randn(1, 4, 8)), "target_logits"),
        (dict(target_logits=torch.randn(3, 8)), "target_logits"),
        (dict(target_logits=torch.zeros(1, 3, 8, dtype=torch.int32)), "target_logits"),
        (dict(uniforms=torch.tensor([[0.5, 1.0, 0.2]])), "uniforms"),  # outside [0, 1)
        (dict(uniforms=torch.tensor([[0.5, -0.1, 0.2]])), "uniforms"),
        (dict(uniforms=torch.tensor([[0.5, float("nan"), 0.2]])), "uniforms"),
        (dict(temperature=0.0, uniforms=torch.rand(2, 3)), "uniforms"),  # wrong shape, even when greedy
        (dict(uniforms=None, generator=123), "generator"),
        (dict(target_logits=torch.randn(1, 3, 0)), "target_logits"),
    ],
)
def test_bad_input_names_the_argument(change, name):
    with pytest.raises(ValueError, match=f"^{name}"):
        ek.tree_verify(**{**good_args(), **change})
