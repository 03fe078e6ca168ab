"""kv_compact: every backend against the reference on random caches, paths and lengths; the
whole cache is compared, so slots that must stay untouched are checked too."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, strategies as st

import eagle2_kernels as ek
from eagle2_kernels import _backend, reference
from kernel_helpers import DTYPES, backends_under_test, device_of

BACKENDS = backends_under_test("kv_compact", reference=True)
NATIVE = backends_under_test("kv_compact", native=True)


@st.composite
def compact_inputs(draw):
    """(cache, prefix_len, accepted, accept_len) on CPU; accepted is -1 padded past accept_len."""
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
    stacked = draw(st.sampled_from([None, 1, 3]))
    B, H = draw(st.integers(1, 4)), draw(st.integers(1, 3))
    d = draw(st.sampled_from([1, 3, 8, 64, 128]))  # odd sizes exercise the narrow-vector paths
    L = draw(st.integers(1, 8))
    tree = draw(st.integers(L, 3 * L))  # tree nodes appended after each prefix
    prefix = torch.randint(0, 40, (B,), generator=g, dtype=torch.int32)
    S = int(prefix.max()) + tree + draw(st.integers(0, 3))
    accept_len = torch.tensor([draw(st.integers(0, L)) for _ in range(B)], dtype=torch.int32)
    accepted = torch.full((B, L), -1, dtype=torch.int32)
    for b, n in enumerate(accept_len.tolist()):
        nodes = torch.randperm(tree - 1, generator=g)[: max(n - 1, 0)] + 1
        path = torch.cat([torch.zeros(1, dtype=torch.long), nodes.sort().values])  # root first
        if draw(st.booleans()):  # any increasing sequence is allowed, not only tree_verify's
            path = torch.randperm(tree, generator=g)[:n].sort().values
        accepted[b, :n] = path[:n].int()
    shape = (B, H, S, d) if stacked is None else (stacked, B, H, S, d)
    cache = torch.randn(shape, generator=g).to(draw(st.sampled_from(DTYPES)))
    return cache, prefix, accepted, accept_len


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: f"backend={b}")
@given(inputs=compact_inputs())
def test_matches_reference(backend, inputs):
    cache, prefix, accepted, accept_len = inputs
    want = cache.clone()
    reference.kv_compact(want, prefix, accepted, accept_len)
    dev = device_of(backend)
    got = cache.to(dev)
    ek.kv_compact(got, prefix.to(dev), accepted.to(dev), accept_len.to(dev), backend=backend)
    assert torch.equal(got.cpu(), want)


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: f"backend={b}")
def test_overlapping_moves(backend):
    """Destination prefix + 2 is also the source of copy 1: the result is a gather, as if every
    source were read before any destination was written."""
    cache = torch.arange(12, dtype=torch.float32).reshape(1, 1, 12, 1)
    dev = device_of(backend)
    got = cache.to(dev)
    ek.kv_compact(got, torch.tensor([2], dtype=torch.int32, device=dev),
                  torch.tensor([[0, 2, 3, 7]], dtype=torch.int32, device=dev),
                  torch.tensor([4], dtype=torch.int32, device=dev), backend=backend)
    assert got.flatten().tolist() == [0, 1, 2, 4, 5, 9, 6, 7, 8, 9, 10, 11]


@pytest.mark.parametrize("backend", NATIVE, ids=lambda b: f"backend={b}")
def test_out_of_range_copies_skipped(backend):
    """Unchecked on a GPU: a copy whose source or destination is outside [0, S) is skipped,
    and an accept_len outside [0, L] is clamped; the rest of the row is compacted."""
    S = 10
    cache = torch.randn(2, 3, 2, S, 4)
    prefix = torch.tensor([6, -1, 4], dtype=torch.int32)
    accepted = torch.tensor([[0, 1, 3, 5], [0, 1, 2, 3], [1, 2, 5, 6]], dtype=torch.int32)
    accept_len = torch.tensor([4, 3, 9], dtype=torch.int32)
    want = cache.clone()
    # Row 0: source 6 + 5 >= S, skipped. Row 1: negative prefix, nothing moves. Row 2:
    # accept_len clamped to 4; source 4 + 6 >= S, skipped.
    reference.kv_compact(want, prefix.clamp(min=0), torch.tensor([[0, 1, 3], [0, 1, 2], [1, 2, 5]], dtype=torch.int32),
                         torch.tensor([3, 0, 3], dtype=torch.int32))
    dev = device_of(backend)
    got = cache.to(dev)
    args = [t.to(dev) for t in (prefix, accepted, accept_len)]
    _backend.call_native(backend, "kv_compact", got, got.data_ptr(), got.element_size(), 2, 3, 2, S, 4,
                         args[0].data_ptr(), args[1].data_ptr(), 4, args[2].data_ptr())
    assert torch.equal(got.cpu(), want)


def good_inputs():
    return dict(cache=torch.zeros(2, 3, 16, 4), prefix_len=torch.tensor([3, 5], dtype=torch.int32),
                accepted=torch.tensor([[0, 2, 4], [0, 1, -1]], dtype=torch.int32),
                accept_len=torch.tensor([3, 2], dtype=torch.int32))


@pytest.mark.parametrize("backend", ["reference", "cpu"], ids=lambda b: f"backend={b}")
@pytest.mark.parametrize("name, bad", [
    ("cache", lambda a: dict(a, cache=torch.zeros(3, 16, 4))),
    ("cache", lambda a: dict(a, cache=torch.zeros(2, 3, 4, 16).transpose(2, 3))),
    ("cache", lambda a: dict(a, cache=[0.0])),
    ("prefix_len", lambda a: dict(a, prefix_len=a["prefix_len"].long())),
    ("prefix_len", lambda a: dict(a, prefix_len=a["prefix_len"][:1])),
    ("prefix_len", lambda a: dict(a, prefix_len=torch.tensor([3, 15], dtype=torch.int32))),  # 15 + 1 >= S = 16
    ("accepted", lambda a: dict(a, accepted=a["accepted"][0])),
    ("accepted", lambda a: dict(a, accepted=torch.tensor([[0, 2, 2], [0, 1, -1]], dtype=torch.int32))),
    ("accepted", lambda a: dict(a, accepted=torch.tensor([[0, 2, 4], [-1, 1, 0]], dtype=torch.int32))),
    ("accept_len", lambda a: dict(a, accept_len=torch.tensor([3, 4], dtype=torch.int32))),
    ("accept_len", lambda a: dict(a, accept_len=torch.tensor([3, -1], dtype=torch.int32))),
    ("accept_len", lambda a: dict(a, accept_len=a["accept_len"].float())),
])
def test_bad_input_raises(backend, name, bad):
    with pytest.raises(ValueError, match=f"^{name}"):
        ek.kv_compact(**bad(good_inputs()), backend=backend)
