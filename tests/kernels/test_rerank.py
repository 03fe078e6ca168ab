"""rerank: every backend against the reference and against a brute-force definition written
here, on EAGLE-shaped candidate sets and on arbitrary forests (ties, NaN, non-monotone scores)."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, strategies as st

import eagle2_kernels as ek
from eagle2_kernels import _backend, reference
from kernel_helpers import backends_under_test, device_of

BACKENDS = backends_under_test("rerank", reference=True)
NATIVE = backends_under_test("rerank", native=True)
FLOAT32_MAX = torch.finfo(torch.float32).max


def eagle_candidates(g: torch.Generator, B: int, k: int, depth: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidates as frontier expansion produces them: depth 1 = k children of the root, each
    later depth = k children of each of the k best candidates of the previous depth, with
    child score = parent score + a log-probability. Returns scores [B, N], parents [B, N]."""
    scores, parents = [], []
    for _ in range(B):
        s = torch.log_softmax(torch.randn(k, generator=g), 0).tolist()
        p = [-1] * k
        level = list(range(k))
        for _ in range(depth - 1):
            frontier = sorted(level, key=lambda i: (-s[i], i))[:k]
            level = []
            for f in frontier:
                for lp in torch.log_softmax(torch.randn(k, generator=g), 0).tolist():
                    level.append(len(s))
                    s.append(s[f] + lp)
                    p.append(f)
        scores.append(s)
        parents.append(p)
    return torch.tensor(scores, dtype=torch.float32), torch.tensor(parents, dtype=torch.int32)


def forest_parents(g: torch.Generator, B: int, N: int) -> torch.Tensor:
    """cand_parents[b, i] uniform in [-1, i): an arbitrary forest in topological order."""
    u = torch.rand(B, N, generator=g, dtype=torch.float64)
    return (torch.floor(u * (torch.arange(N) + 1)) - 1).int()


@st.composite
def rerank_inputs(draw):
    """(scores, parents, tokens, root_tokens, prefix_len, m) on CPU."""
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
    B = draw(st.integers(1, 4))
    if draw(st.booleans()):
        scores, parents = eagle_candidates(g, B, draw(st.integers(1, 6)), draw(st.integers(1, 5)))
        if draw(st.booleans()):  # arbitrary (non-monotone) scores on the same tree
            scores = torch.randn(scores.shape, generator=g)
    else:
        N = draw(st.integers(0, 120))
        scores, parents = torch.randn(B, N, generator=g), forest_parents(g, B, N)
    N = scores.shape[1]
    if draw(st.booleans()):  # ties
        scores = torch.round(scores * draw(st.sampled_from([0.0, 1.0, 2.0])))
    special = draw(st.sampled_from([None, float("nan"), float("inf"), float("-inf")]))
    if special is not None:
        scores = torch.where(torch.rand(scores.shape, generator=g) < 0.2, special, scores)
    tokens = torch.randint(0, 32000, (B, N), generator=g, dtype=torch.int32)
    root = torch.randint(0, 32000, (B,), generator=g, dtype=torch.int32)
    prefix = torch.randint(0, 4097, (B,), generator=g, dtype=torch.int32)
    m = draw(st.integers(1, N + 1))
    return scores, parents, tokens, root, prefix, m


def brute_force(scores, parents, tokens, root, prefix, m, L):
    """The tree by the definition, one row at a time in plain Python."""
    out = {f: [] for f in reference.Tree._fields}
    W = (m + 31) // 32
    for b in range(scores.shape[0]):
        s = [-math.inf if math.isnan(x) else min(x, FLOAT32_MAX) for x in scores[b].tolist()]
        par = parents[b].tolist()
        eff, depth = [], []
        for i in range(len(s)):
            chain = [i]
            while par[chain[-1]] >= 0:
                chain.append(par[chain[-1]])
            eff.append(min(s[a] for a in chain))
            depth.append(len(chain))
        kept = sorted(sorted(range(len(s)), key=lambda i: (-eff[i], depth[i], i))[: m - 1])
        node = {c: j + 1 for j, c in enumerate(kept)}
        assert all(par[c] < 0 or par[c] in node for c in kept), "kept set not closed under ancestors"
        npar = [-1] + [node[par[c]] if par[c] >= 0 else 0 for c in kept]
        ndep = [0] + [depth[c] for c in kept]
        chains = []  # root-to-node
        for j in range(m):
            c = [j]
            while npar[c[-1]] >= 0:
                c.append(npar[c[-1]])
            chains.append(c[::-1])
        mask = torch.zeros(m, m, dtype=torch.bool)
        for j, c in enumerate(chains):
            mask[j, c] = True
        leaves = [j for j in range(m) if j not in npar]
        paths = [(chains[j] + [-1] * L)[:L] for j in leaves] + [[-1] * L] * (m - len(leaves))
        out["tokens"].append([int(root[b])] + [int(tokens[b, c]) for c in kept])
        out["parents"].append(npar)
        out["depth"].append(ndep)
        out["positions"].append([int(prefix[b]) + d for d in ndep])
        out["mask_bits"].append(reference.pack_mask_bits(mask).tolist())
        out["paths"].append(paths)
        out["num_leaves"].append(len(leaves))
    shapes = dict(mask_bits=(-1, m, W), paths=(-1, m, L), num_leaves=(-1,))
    return reference.Tree(*(torch.tensor(v, dtype=torch.int32).reshape(shapes.get(f, (-1, m))) for f, v in out.items()))


def check_properties(tree: reference.Tree, prefix: torch.Tensor) -> None:
    """Structural facts every tree satisfies, checked independently of any implementation."""
    B, m = tree.tokens.shape
    for b in range(B):
        par, dep = tree.parents[b].tolist(), tree.depth[b].tolist()
        assert par[0] == -1 and dep[0] == 0
        assert all(0 <= par[i] < i and dep[i] == dep[par[i]] + 1 for i in range(1, m))
        assert tree.positions[b].tolist() == [int(prefix[b]) + d for d in dep]
        for i in range(m):
            bits = [w & 0xFFFFFFFF for w in tree.mask_bits[b, i].tolist()]
            assert sum(bin(w).count("1") for w in bits) == dep[i] + 1
            assert all(bits[a // 32] >> (a % 32) & 1 for a in _ancestors(par, i))
        leaves = [j for j in range(m) if j not in par]
        assert int(tree.num_leaves[b]) == len(leaves)
        ends = []
        for r, row in enumerate(tree.paths[b].tolist()):
            path = [x for x in row if x >= 0]
            assert row == path + [-1] * (len(row) - len(path)), "paths are -1 padded at the end"
            if r >= len(leaves):
                assert not path
                continue
            assert path[0] == 0 and all(par[c] == p for p, c in zip(path, path[1:]))
            ends.append(path[-1])
        assert ends == leaves, "one row per leaf, leaves in node order"


def _ancestors(par, i):
    while i >= 0:
        yield i
        i = par[i]


def run(backend, scores, parents, tokens, root, prefix, m, max_depth=None, out=None):
    dev = device_of(backend)
    return ek.rerank(scores.to(dev), parents.to(dev), tokens.to(dev), root.to(dev), prefix.to(dev), m,
                     max_depth=max_depth, out=out, backend=backend)


def assert_trees_equal(got: reference.Tree, want: reference.Tree) -> None:
    for field, g, w in zip(reference.Tree._fields, got, want):
        assert torch.equal(g.cpu(), w.cpu()), f"{field}: got {g.cpu().tolist()}, want {w.cpu().tolist()}"


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: f"backend={b}")
@given(inputs=rerank_inputs())
def test_matches_reference_and_definition(backend, inputs):
    scores, parents, tokens, root, prefix, m = inputs
    got = run(backend, *inputs)
    want = reference.rerank(*inputs)
    assert_trees_equal(got, want)
    assert_trees_equal(got, brute_force(*inputs, L=m))
    check_properties(got, prefix)


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: f"backend={b}")
def test_wide_paths_and_preallocated_out(backend):
    g = torch.Generator().manual_seed(1)
    scores, parents = eagle_candidates(g, 2, 10, 6)  # the paper's shape: N = 510
    tokens = torch.randint(0, 128256, scores.shape, generator=g, dtype=torch.int32)
    root, prefix = torch.tensor([5, 6], dtype=torch.int32), torch.tensor([512, 4000], dtype=torch.int32)
    dev = device_of(backend)
    out = reference.Tree(*(torch.full_like(t, 77, device=dev) for t in reference.rerank(
        scores, parents, tokens, root, prefix, 60, max_depth=70)))
    got = run(backend, scores, parents, tokens, root, prefix, 60, max_depth=70, out=out)
    assert got is out
    assert_trees_equal(got, brute_force(scores, parents, tokens, root, prefix, 60, L=71))


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: f"backend={b}")
@pytest.mark.parametrize("N", [8192, 8193])
def test_large_candidate_sets(backend, N):
    """The CUDA kernel keeps a row's candidates in shared memory and refuses N > 8192."""
    g = torch.Generator().manual_seed(N)
    scores, parents = torch.randn(1, N, generator=g), forest_parents(g, 1, N)
    tokens, root, prefix = torch.arange(N, dtype=torch.int32)[None], torch.tensor([1], dtype=torch.int32), torch.tensor([9], dtype=torch.int32)
    inputs = (scores, parents, tokens, root, prefix, 300)
    if backend == "cuda" and N > 8192:
        with pytest.raises(RuntimeError, match="8192"):
            run(backend, *inputs)
        return
    assert_trees_equal(run(backend, *inputs), reference.rerank(*inputs))


@pytest.mark.parametrize("backend", NATIVE, ids=lambda b: f"backend={b}")
def test_too_deep_paths_are_truncated(backend):
    """A kept node deeper than max_depth: the CPU wrapper raises after the kernel ran, CUDA
    cannot raise; either way the kernel wrote only the first L entries of each path."""
    N, m, L = 12, 10, 4
    scores = -torch.arange(N, dtype=torch.float32)[None]
    parents = (torch.arange(N, dtype=torch.int32) - 1)[None]  # a chain: depth(i) = i + 1
    tokens, root, prefix = torch.arange(N, dtype=torch.int32)[None], torch.tensor([3], dtype=torch.int32), torch.tensor([0], dtype=torch.int32)
    dev = device_of(backend)
    out = reference.Tree(*(torch.empty(s, dtype=torch.int32, device=dev)
                           for s in [(1, m)] * 4 + [(1, m, 1), (1, m, L), (1,)]))
    if backend == "cpu":
        with pytest.raises(ValueError, match="max_depth"):
            run(backend, scores, parents, tokens, root, prefix, m, max_depth=L - 1, out=out)
    else:
        run(backend, scores, parents, tokens, root, prefix, m, max_depth=L - 1, out=out)
    full = reference.rerank(scores, parents, tokens, root, prefix, m)
    assert torch.equal(out.paths.cpu(), full.paths[..., :L])
    assert torch.equal(out.depth.cpu(), full.depth)


@pytest.mark.parametrize("backend", NATIVE, ids=lambda b: f"backend={b}")
def test_malformed_parents_read_as_root_children(backend):
    """Unchecked on a GPU (a check would sync): the kernels read a parent outside [-1, i) as -1."""
    g = torch.Generator().manual_seed(3)
    B, N, m = 2, 40, 25
    parents = torch.randint(-5, 60, (B, N), generator=g, dtype=torch.int32)
    fixed = torch.where((parents >= 0) & (parents < torch.arange(N)), parents, -1).int()
    scores = torch.randn(B, N, generator=g)
    tokens = torch.randint(0, 100, (B, N), generator=g, dtype=torch.int32)
    root, prefix = torch.zeros(B, dtype=torch.int32), torch.zeros(B, dtype=torch.int32)
    dev = device_of(backend)
    args = [t.to(dev) for t in (scores, parents, tokens, root, prefix)]
    out = reference.Tree(*(torch.empty_like(t, device=dev) for t in reference.rerank(scores, fixed, tokens, root, prefix, m)))
    _backend.call_native(backend, "rerank", args[0], *(t.data_ptr() for t in args), B, N, m, m,
                         *(t.data_ptr() for t in out))
    assert_trees_equal(out, reference.rerank(scores, fixed, tokens, root, prefix, m))


CPU_BACKENDS = ["reference", "cpu"]


def good_inputs():
    scores, parents = eagle_candidates(torch.Generator().manual_seed(0), 2, 3, 3)
    B, N = scores.shape
    return dict(cand_scores=scores, cand_parents=parents, cand_tokens=torch.zeros(B, N, dtype=torch.int32),
                root_tokens=torch.zeros(B, dtype=torch.int32), prefix_len=torch.zeros(B, dtype=torch.int32), m=8)


@pytest.mark.parametrize("backend", CPU_BACKENDS, ids=lambda b: f"backend={b}")
@pytest.mark.parametrize("name, bad", [
    ("m", lambda a: dict(a, m=a["cand_scores"].shape[1] + 2)),
    ("m", lambda a: dict(a, m=0)),
    ("cand_scores", lambda a: dict(a, cand_scores=a["cand_scores"].double())),
    ("cand_scores", lambda a: dict(a, cand_scores=a["cand_scores"].t().contiguous().t())),
    ("cand_parents", lambda a: dict(a, cand_parents=a["cand_parents"].long())),
    ("cand_parents", lambda a: dict(a, cand_parents=a["cand_parents"][:, 1:].contiguous())),
    ("cand_parents", lambda a: dict(a, cand_parents=torch.where(torch.arange(a["cand_parents"].shape[1]) == 4, 4, a["cand_parents"]).int())),
    ("cand_parents", lambda a: dict(a, cand_parents=torch.where(torch.arange(a["cand_parents"].shape[1]) == 0, -2, a["cand_parents"]).int())),
    ("cand_tokens", lambda a: dict(a, cand_tokens=a["cand_tokens"][:1])),
    ("root_tokens", lambda a: dict(a, root_tokens=a["root_tokens"].float())),
    ("prefix_len", lambda a: dict(a, prefix_len=a["prefix_len"][:1])),
    ("prefix_len", lambda a: dict(a, prefix_len=a["prefix_len"] - 1)),
    ("max_depth", lambda a: dict(a, m=13, max_depth=1)),  # 13 nodes of a depth-3 tree
])
def test_bad_input_raises(backend, name, bad):
    with pytest.raises(ValueError, match=f"^{name}"):
        ek.rerank(**bad(good_inputs()), backend=backend)


@given(st.integers(1, 100), st.integers(0, 2**32 - 1))
def test_pack_mask_bits_against_integer_arithmetic(n, seed):
    """Bit j % 32 of word j // 32, as a two's-complement int32; tree_mask_visible inverts it."""
    visible = torch.rand(3, n, generator=torch.Generator().manual_seed(seed)) < 0.5
    W = (n + 31) // 32
    want = [[sum(1 << (j % 32) for j in range(n) if row[j] and j // 32 == w) for w in range(W)] for row in visible.tolist()]
    want = [[w - 2**32 if w >= 2**31 else w for w in row] for row in want]
    bits = reference.pack_mask_bits(visible)
    assert bits.dtype == torch.int32 and bits.tolist() == want
    assert torch.equal(reference.tree_mask_visible(bits[:, None], torch.zeros(3, dtype=torch.int32), n)[:, 0], visible)
