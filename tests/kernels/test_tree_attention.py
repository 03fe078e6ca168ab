"""tree_attention: every backend against eagle2_kernels.reference on fresh random inputs (GQA
groups, ragged prefixes including 0, verify-sized and draft-sized tree regions, ancestor-closed
and arbitrary masks, bit 31, rows that see nothing, caches that cut the tree region, sliding
windows), plus out= and argument checks."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

import eagle2_kernels as ek
from eagle2_kernels import reference
from kernel_helpers import DTYPES, backends_under_test, device_of

BACKENDS = backends_under_test("tree_attention")
# Hypothesis examples per backend: the Triton CPU interpreter takes up to ~1 s per example.
EXAMPLES = {"cpu": 80, "cuda": 80, "triton": 80 if torch.cuda.is_available() else 30}
# float32: the kernels sum in another order than torch.matmul. float16 / bfloat16: the output is
# rounded to the dtype (and the GPU kernels round the softmax weights to it before P @ V).
TOL = {
    torch.float32: dict(atol=2e-5, rtol=1e-5),
    torch.float16: dict(atol=4e-3, rtol=4e-3),
    torch.bfloat16: dict(atol=3e-2, rtol=3e-2),
}


def ancestor_rows(parents: list[int], queries: int) -> torch.Tensor:
    """Bool [queries, T]: the ancestor-closed mask rows (node and its ancestors) of the last
    `queries` of the T nodes, parents[j] < j (-1 for the root)."""
    T = len(parents)
    anc = torch.zeros(T, T, dtype=torch.bool)
    for j, p in enumerate(parents):
        if p >= 0:
            anc[j] = anc[p]
        anc[j, j] = True
    return anc[T - queries:]


def check(backend: str, q, k, v, bits, prefix_len, scale=None, positions=None, window=None) -> torch.Tensor:
    """Run backend on (copies of) the CPU inputs; compare with the reference. Rows that see no
    key must be exactly zero."""
    dev = device_of(backend)
    out = ek.tree_attention(*(t.to(dev) for t in (q, k, v, bits, prefix_len)), scale, backend=backend,
                            positions=None if positions is None else positions.to(dev), sliding_window=window)
    assert out.dtype == q.dtype and out.shape == q.shape and out.device.type == dev.type
    out = out.cpu()
    d = q.shape[-1]
    ref = reference.tree_attention(q, k, v, bits, prefix_len, d**-0.5 if scale is None else scale, positions, window)
    torch.testing.assert_close(out.float(), ref.float(), **TOL[q.dtype])
    visible = reference.tree_mask_visible(bits, prefix_len, k.shape[2])
    if window is not None:
        visible &= reference.window_visible(positions, prefix_len, k.shape[2], window)
    assert torch.all(out.transpose(1, 2)[~visible.any(-1)] == 0)  # rows that see no key
    return out


@st.composite
def attention_inputs(draw):
    """(q, k, v, tree_mask_bits, prefix_len, scale, positions, sliding_window) on CPU."""
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
    B, Hkv, group = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 4))
    n, d = draw(st.integers(1, 40)), draw(st.sampled_from([8, 16, 64]))
    # Tree region: the n queries themselves (verify) or every node drafted so far (draft).
    tree = n + draw(st.sampled_from([0, 0, 7, 45]))
    W = (tree + 31) // 32 + draw(st.integers(0, 1))
    prefix_len = torch.randint(0, draw(st.sampled_from([1, 30, 150])), (B,), generator=g)
    if draw(st.booleans()):
        prefix_len[torch.randint(0, B, (1,), generator=g)] = 0
    # The cache may end inside the tree region: keys at or past S are never read, whatever the bits.
    S = int(prefix_len.max()) + draw(st.integers(0, tree + 3))

    kind = draw(st.sampled_from(["tree", "random", "sparse"]))
    # Query positions: each node's prefix_len + depth, as rerank gives them, or anything.
    positions = torch.randint(0, S + 40, (B, n), generator=g)
    if kind == "tree":  # ancestor-closed rows of random trees, as rerank builds them
        rows = []
        for _ in range(B):
            parents = [-1] + [int(torch.randint(0, j, (1,), generator=g)) for j in range(1, tree)]
            rows.append(ancestor_rows(parents, n))
        visible = torch.nn.functional.pad(torch.stack(rows), (0, 32 * W - tree))
        positions = prefix_len[:, None] + visible[:, :, :tree].sum(-1) - 1
        bits = ek.pack_mask_bits(visible)
    elif kind == "random":  # every bit pattern, bit 31 and bits past the tree included
        bits = torch.randint(-(2**31), 2**31, (B, n, W), generator=g, dtype=torch.int64).int()
    else:
        bits = ek.pack_mask_bits(torch.rand(B, n, 32 * W, generator=g) < 0.1)
    if draw(st.booleans()):  # rows that see no tree key (and nothing at all where prefix_len is 0)
        bits[torch.rand(B, n, generator=g) < 0.3] = 0

    dtype = draw(st.sampled_from(DTYPES))
    amp = draw(st.sampled_from([1.0, 4.0]))  # 4: peaked softmax rows
    q = (torch.randn(B, Hkv * group, n, d, generator=g) * amp).to(dtype)
    k = torch.randn(B, Hkv, S, d, generator=g).to(dtype)
    v = torch.randn(B, Hkv, S, d, generator=g).to(dtype)
    scale = draw(st.sampled_from([None, 0.3]))
    window = draw(st.sampled_from([None, None, 1, 3, 20, 64, 100, 1000]))
    return q, k, v, bits, prefix_len.int(), scale, positions.int(), window


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_reference(backend):
    @settings(max_examples=EXAMPLES[backend])
    @given(inputs=attention_inputs())
    def run(inputs):
        check(backend, *inputs)

    run()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("window", [None, 300])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_long_ragged_prefixes(backend, dtype, window):
    """Thousands of prefix keys (many tiles; several flash-decoding splits on CUDA), ragged; with
    a sliding window, the splits cover only the keys inside some window."""
    g = torch.Generator().manual_seed(1)
    B, Hkv, group, n, d, S = 3, 2, 4, 12, 64, 2100
    prefix_len = torch.tensor([2000, 700, 0], dtype=torch.int32)
    parents = [-1] + [int(torch.randint(0, j, (1,), generator=g)) for j in range(1, n)]
    bits = ek.pack_mask_bits(torch.nn.functional.pad(ancestor_rows(parents, n), (0, 32 - n)).expand(B, n, 32))
    q = torch.randn(B, Hkv * group, n, d, generator=g).to(dtype)
    k, v = (torch.randn(B, Hkv, S, d, generator=g).to(dtype) for _ in range(2))
    depth = ancestor_rows(parents, n).sum(-1) - 1
    check(backend, q, k, v, bits, prefix_len, positions=(prefix_len[:, None] + depth).int(), window=window)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("prefix, n, first_position, window", [(63, 2, 64, 1), (0, 100, 1000, 4), (130, 5, 400, 2)])
def test_window_over_tree_keys_positioned_past_their_index(backend, prefix, n, first_position, window):
    """Tree keys take their queries' positions, which may lie past their cache index (as with a
    draft cache one token behind): a window starting beyond a tree key's index must still see it."""
    g = torch.Generator().manual_seed(n)
    B, Hkv, group, d = 1, 2, 2, 16
    S = prefix + n
    q = torch.randn(B, Hkv * group, n, d, generator=g)
    k, v = torch.randn(B, Hkv, S, d, generator=g), torch.randn(B, Hkv, S, d, generator=g)
    bits = ek.pack_mask_bits(torch.ones(n, n, dtype=torch.bool).tril())[None].contiguous()
    positions = (first_position + torch.arange(n, dtype=torch.int32))[None]
    check(backend, q, k, v, bits, torch.tensor([prefix], dtype=torch.int32), positions=positions, window=window)


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_visible_key_bit31(backend):
    """With prefix 0, a query whose only bit is bit 31 of word 0 (or bit 0 of word 1) sees
    exactly one key: its output is that key's value row."""
    g = torch.Generator().manual_seed(2)
    B, H, n, d, S = 1, 2, 40, 16, 64
    words = torch.zeros(B, n, 2, dtype=torch.int32)
    words[0, 0, 0] = -(2**31)  # bit 31: tree key 31
    words[0, 1, 1] = 1  # bit 32: tree key 32
    words[0, 2, 0] = -1  # all of keys 0..31
    q = torch.randn(B, H, n, d, generator=g)
    k, v = torch.randn(B, H, S, d, generator=g), torch.randn(B, H, S, d, generator=g)
    out = check(backend, q, k, v, words, torch.zeros(B, dtype=torch.int32))
    torch.testing.assert_close(out[0, :, 0], v[0, :, 31], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out[0, :, 1], v[0, :, 32], atol=1e-6, rtol=1e-6)
    assert torch.all(out[0, :, 3:] == 0)


@pytest.mark.filterwarnings("ignore:All-NaN slice")  # the Triton interpreter's max over NaN rows
@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_propagates_from_what_a_query_sees(backend, dtype):
    """NaN in a query, or in the key of a key it sees, makes its output NaN; NaN in a value column
    of a key it sees makes that output column NaN; keys past the row's tree region never matter,
    whatever they hold. Many prefix keys, so the CUDA kernel splits them over blocks and merges."""
    dev = device_of(backend)
    g = torch.Generator().manual_seed(4)
    B, Hkv, group, n, d, P = 2, 2, 2, 3, 16, 700
    S = P + 32 + 8  # 8 slots past the tree region's 32 keys
    q = torch.randn(B, Hkv * group, n, d, generator=g)
    k, v = torch.randn(B, Hkv, S, d, generator=g), torch.randn(B, Hkv, S, d, generator=g)
    visible = torch.zeros(B, n, 32, dtype=torch.bool)
    visible[:, :, 0] = True  # every query sees tree key 0 ...
    visible[:, 2, 1] = True  # ... and query 2 also tree key 1
    bits = ek.pack_mask_bits(visible)
    prefix_len = torch.tensor([P, 40], dtype=torch.int32)
    q[0, 1, 0, 3] = float("nan")  # row 0, head 1, query 0
    k[1, 0, 10] = float("nan")  # row 1, KV head 0 (heads 0-1): a prefix key, seen by every query
    v[0, 1, 100, 5] = float("nan")  # row 0, KV head 1 (heads 2-3): a prefix key, value column 5
    k[0, :, P + 32:] = float("nan")  # past each row's tree region: never read
    v[0, :, P + 32:] = float("nan")
    k[1, :, 40 + 32:] = float("nan")
    v[1, :, 40 + 32:] = float("nan")
    args = [t.to(dtype) for t in (q, k, v)] + [bits, prefix_len]
    out = ek.tree_attention(*(t.to(dev) for t in args), backend=backend).cpu().float()
    want = torch.zeros(B, Hkv * group, n, d, dtype=torch.bool)
    want[0, 1, 0] = True
    want[1, 0:2] = True
    want[0, 2:4, :, 5] = True
    assert torch.equal(out.isnan(), want), torch.nonzero(out.isnan() != want)[:8].tolist()
    ref = reference.tree_attention(*args, d**-0.5).float()
    torch.testing.assert_close(out, ref, equal_nan=True, **TOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_preallocated(backend):
    dev = device_of(backend)
    g = torch.Generator().manual_seed(3)
    B, Hkv, group, n, d, S = 2, 2, 2, 5, 16, 40
    q = torch.randn(B, Hkv * group, n, d, generator=g)
    k, v = torch.randn(B, Hkv, S, d, generator=g), torch.randn(B, Hkv, S, d, generator=g)
    bits = ek.pack_mask_bits(torch.rand(B, n, 32, generator=g) < 0.5)
    prefix_len = torch.tensor([30, 12], dtype=torch.int32)
    out = torch.full((B, Hkv * group, n, d), float("nan"), device=dev)
    args = [t.to(dev) for t in (q, k, v, bits, prefix_len)]
    assert ek.tree_attention(*args, out=out, backend=backend) is out
    ref = reference.tree_attention(q, k, v, bits, prefix_len, d**-0.5)
    torch.testing.assert_close(out.cpu(), ref, **TOL[torch.float32])


def test_bad_inputs_cpu():
    B, H, n, d, S = 1, 4, 3, 8, 10
    q, k, v = torch.randn(B, H, n, d), torch.randn(B, 2, S, d), torch.randn(B, 2, S, d)
    bits, prefix_len = torch.zeros(B, n, 1, dtype=torch.int32), torch.tensor([4], dtype=torch.int32)
    ek.tree_attention(q, k, v, bits, prefix_len, backend="cpu")  # the valid call the others break
    with pytest.raises(ValueError, match="k_cache"):  # Hq % Hkv != 0
        ek.tree_attention(torch.randn(B, 3, n, d), k, v, bits, prefix_len, backend="cpu")
    with pytest.raises(ValueError, match="k_cache"):  # dtype mismatch
        ek.tree_attention(q, k.half(), v, bits, prefix_len, backend="cpu")
    with pytest.raises(ValueError, match="v_cache"):
        ek.tree_attention(q, k, v.bfloat16(), bits, prefix_len, backend="cpu")
    with pytest.raises(ValueError, match="q"):  # non-contiguous
        ek.tree_attention(torch.randn(B, n, H, d).transpose(1, 2), k, v, bits, prefix_len, backend="cpu")
    with pytest.raises(ValueError, match="prefix_len"):  # past the cache
        ek.tree_attention(q, k, v, bits, torch.tensor([S + 1], dtype=torch.int32), backend="cpu")
    with pytest.raises(ValueError, match="tree_mask_bits"):
        ek.tree_attention(q, k, v, bits.long(), prefix_len, backend="cpu")
    for backend in ("cpu", "reference"):  # a zero-width mask: refused alike by every backend
        with pytest.raises(ValueError, match="tree_mask_bits: expected at least 1 word"):
            ek.tree_attention(q, k, v, bits[:, :, :0], prefix_len, backend=backend)
    positions = torch.tensor([[4, 5, 6]], dtype=torch.int32)
    with pytest.raises(ValueError, match="sliding_window: expected an int in \\[1, "):
        ek.tree_attention(q, k, v, bits, prefix_len, positions=positions, sliding_window=0, backend="cpu")
    with pytest.raises(ValueError, match="positions: expected the queries' positions"):
        ek.tree_attention(q, k, v, bits, prefix_len, sliding_window=4, backend="cpu")
    with pytest.raises(ValueError, match="positions: expected shape"):
        ek.tree_attention(q, k, v, bits, prefix_len, positions=positions[:, :2], sliding_window=4, backend="cpu")
    with pytest.raises(ValueError, match="positions: expected dtype torch.int32"):
        ek.tree_attention(q, k, v, bits, prefix_len, positions=positions.long(), sliding_window=4, backend="cpu")


def assert_rows_equal_one_token_steps(parents: list[int], prefix: int, window, dtype, g: torch.Generator,
                                      Hq: int = 4, Hkv: int = 2, d: int = 32) -> None:
    """Each row of a verify over the tree `parents` (parents[j] < j, -1 for the root) equals,
    bitwise, the one-token decode step of that node once its ancestors are committed (the same
    visible keys, laid out contiguously), with positions for the sliding window."""
    m = len(parents)
    ancestors = []
    for i in range(m):
        chain = [i]
        while parents[chain[-1]] >= 0:
            chain.append(parents[chain[-1]])
        ancestors.append(chain[::-1])  # root first, the node itself last
    S = prefix + m
    k = torch.randn(1, Hkv, S, d, generator=g).to(dtype)
    v = torch.randn(1, Hkv, S, d, generator=g).to(dtype)
    q = torch.randn(1, Hq, m, d, generator=g).to(dtype)
    visible = torch.zeros(m, m, dtype=torch.bool)
    for i, chain in enumerate(ancestors):
        visible[i, chain] = True
    bits = reference.pack_mask_bits(visible)[None]
    positions = torch.tensor([[prefix + len(chain) - 1 for chain in ancestors]], dtype=torch.int32)
    tree = ek.tree_attention(q, k, v, bits, torch.tensor([prefix], dtype=torch.int32), backend="cpu",
                             positions=positions, sliding_window=window)
    for i, chain in enumerate(ancestors):
        slots = list(range(prefix)) + [prefix + a for a in chain]  # the node's keys, contiguous
        n = len(slots)
        one = ek.tree_attention(q[:, :, i:i + 1].contiguous(), k[:, :, slots].contiguous(), v[:, :, slots].contiguous(),
                                torch.ones(1, 1, 1, dtype=torch.int32), torch.tensor([n - 1], dtype=torch.int32),
                                backend="cpu", positions=torch.tensor([[n - 1]], dtype=torch.int32),
                                sliding_window=window)
        assert torch.equal(one[:, :, 0], tree[:, :, i]), (i, chain)


@pytest.mark.parametrize("window", [None, 7, 70])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("prefix", [5, 60, 63, 64, 130])
def test_cpu_rows_equal_one_token_steps_bitwise(dtype, prefix, window):
    """Each row of a tree verify computes bitwise what a one-token decode step of that node
    computes once its ancestors are committed: the property that makes greedy EAGLE-2 equal
    plain decoding in any dtype. Random trees with branches, prefixes on both sides of the 64-key
    tiles, with and without a sliding window."""
    g = torch.Generator().manual_seed(prefix)
    m = 24
    parents = [-1] + [int(torch.randint(0, i, (1,), generator=g)) for i in range(1, m)]
    assert_rows_equal_one_token_steps(parents, prefix, window, dtype, g)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("window", [None, 7])
@pytest.mark.parametrize("prefix", [130, 2000])
def test_cpu_chain_rows_then_branch_rows_bitwise(prefix, window, threads):
    """The kernel takes the tiles from the prefix end on for the chain rows alone (rows whose
    visible tree keys are the first c) and redoes the branch rows from their own keys: a 7-node
    chain with 2 branches off it (one block of 6 chain rows, then a block of 6 holding the 7th
    chain row and both branch rows), and at prefix 2000 on 2 threads the same rows split over two
    tasks. Every row is still bitwise its one-token step."""
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert_rows_equal_one_token_steps([-1, 0, 1, 2, 3, 4, 5, 3, 5], prefix, window, torch.float32,
                                          torch.Generator().manual_seed(prefix), Hq=1, Hkv=1)
    finally:
        torch.set_num_threads(saved)


@pytest.mark.parametrize("B, Hkv", [(1, 3), (1, 1), (4, 2)])
def test_cpu_thread_count_does_not_change_results(B, Hkv):
    """Threads split the work by (batch row, KV head) and, when those are few (one sequence's
    decode step), by blocks of a head's query rows: every row is still computed alone, so 1, 2
    and 3 threads give bitwise the same output. A branching tree over a 300-key prefix."""
    g = torch.Generator().manual_seed(B)
    Hq, d, m, prefix = 3 * Hkv, 64, 20, 300
    parents = [-1] + [int(torch.randint(0, i, (1,), generator=g)) for i in range(1, m)]
    q = torch.randn(B, Hq, m, d, generator=g)
    k, v = torch.randn(B, Hkv, prefix + m, d, generator=g), torch.randn(B, Hkv, prefix + m, d, generator=g)
    bits = reference.pack_mask_bits(ancestor_rows(parents, m))[None].expand(B, -1, -1).contiguous()
    prefix_len = torch.full((B,), prefix, dtype=torch.int32)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ek.tree_attention(q, k, v, bits, prefix_len, backend="cpu")
        for n in (2, 3):
            torch.set_num_threads(n)
            assert torch.equal(ek.tree_attention(q, k, v, bits, prefix_len, backend="cpu"), one), n
    finally:
        torch.set_num_threads(threads)
