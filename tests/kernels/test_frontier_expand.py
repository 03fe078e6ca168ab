"""frontier_expand: every backend against eagle2_kernels.reference on fresh random inputs
(shapes, dtypes, ties, NaN/inf logits, dead rows, -inf parents), plus out= and argument checks."""
from __future__ import annotations

import os
import subprocess
import sys
import types

import pytest
import torch
from hypothesis import given, settings, strategies as st

import eagle2_kernels as ek
from eagle2_kernels import reference
from kernel_helpers import DTYPES, backends_under_test, device_of

BACKENDS = backends_under_test("frontier_expand")
# Hypothesis examples per backend: the Triton CPU interpreter takes ~0.05 s per frontier row.
EXAMPLES = {"cpu": 100, "cuda": 100, "triton": 100 if torch.cuda.is_available() else 25}


def check(out: reference.FrontierExpansion, logits: torch.Tensor, parent_scores: torch.Tensor, k: int) -> None:
    """out against the reference. Tokens are exact. Scores may differ in the last bits (the
    log-sum-exp is summed in another order), so two children whose scores are that close may
    swap places in the frontier: the frontier must be exactly the top-k of out's own child
    scores, and its scores must match the reference's frontier scores within tolerance."""
    ref = reference.frontier_expand(logits.cpu(), parent_scores.cpu(), k)
    out = reference.FrontierExpansion(*(t.cpu() for t in out))
    B = logits.shape[0]
    assert torch.equal(out.child_tokens, ref.child_tokens)
    torch.testing.assert_close(out.child_scores, ref.child_scores, rtol=1e-5, atol=1e-5)
    own_scores, own_index = reference.topk_desc(out.child_scores.reshape(B, -1), k)
    assert torch.equal(out.frontier_index, own_index.int())
    assert torch.equal(out.frontier_scores, own_scores)
    torch.testing.assert_close(out.frontier_scores, ref.frontier_scores, rtol=1e-5, atol=1e-5)


@st.composite
def expand_inputs(draw):
    """(logits [B, K, V], parent_scores [B, K], k) on CPU."""
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
    B, K, V = draw(st.integers(1, 4)), draw(st.integers(1, 6)), draw(st.integers(1, 300))
    k = draw(st.integers(1, min(V, 8)))
    logits = torch.randn(B, K, V, generator=g) * draw(st.sampled_from([0.1, 3.0, 30.0]))
    parents = torch.randn(B, K, generator=g) * 5
    if draw(st.booleans()):  # integer values: many exact ties among tokens and among children
        logits, parents = logits.round(), parents.round()
    special = draw(st.sampled_from([None, float("nan"), float("inf"), float("-inf")]))
    if special is not None:
        logits = torch.where(torch.rand(logits.shape, generator=g) < 0.1, special, logits)
    if draw(st.booleans()):  # dead rows: no finite logit
        logits[torch.rand(B, K, generator=g) < 0.3] = draw(st.sampled_from([float("-inf"), float("nan")]))
    if draw(st.booleans()):  # unused frontier rows (and NaN / +inf parents, read as -inf / max)
        bad = draw(st.sampled_from([float("-inf"), float("nan"), float("inf")]))
        parents = torch.where(torch.rand(B, K, generator=g) < 0.4, bad, parents)
    return logits.to(draw(st.sampled_from(DTYPES))), parents, k


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_reference(backend):
    dev = device_of(backend)

    @settings(max_examples=EXAMPLES[backend])
    @given(inputs=expand_inputs())
    def run(inputs):
        logits, parents, k = (t.to(dev) if isinstance(t, torch.Tensor) else t for t in inputs)
        check(ek.frontier_expand(logits, parents, k, backend=backend), logits, parents, k)

    run()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k", [1, 4, 5, 17])
def test_long_rows(backend, dtype, k):
    """Rows spanning several tiles and threads, V odd, 16-bit rows not 16-byte aligned (a
    storage offset of one element), and k beyond the GPU's per-thread list (16)."""
    dev = device_of(backend)
    g = torch.Generator().manual_seed(k)
    B, K, V = 2, 3, 5001
    flat = (torch.randn(B * K * V + 1, generator=g) * 4).round().to(dtype).to(dev)
    logits = flat[1:].view(B, K, V)  # every row starts one element off the allocation
    logits[0, 1] = float("-inf")
    parents = torch.randn(B, K, generator=g).to(dev)
    check(ek.frontier_expand(logits, parents, k, backend=backend), logits, parents, k)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
@pytest.mark.parametrize("k", [33, 200, 3000])
def test_large_k(backend, k):
    """k past the sorted-list limit (one partial sort per row): the same answer, ties included."""
    dev = device_of(backend)
    g = torch.Generator().manual_seed(k)
    logits = (torch.randn(2, 2, 3001, generator=g) * 2).round().to(dev)  # many ties
    logits[1, 0, ::7] = float("nan")
    parents = torch.randn(2, 2, generator=g).to(dev)
    check(ek.frontier_expand(logits, parents, k, backend=backend), logits, parents, k)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b == "cpu"])
def test_large_k_is_near_linear(backend):
    """k = 32000 of a 49152-token vocabulary: one partial sort, not k insertions per token (that
    took minutes). Generous bound: the reference's own time, times 20."""
    import time

    logits, parents = torch.randn(1, 1, 49152), torch.zeros(1, 1)
    start = time.perf_counter()
    reference.frontier_expand(logits, parents, 32000)
    ref_s = time.perf_counter() - start
    start = time.perf_counter()
    ek.frontier_expand(logits, parents, 32000, backend=backend)
    assert time.perf_counter() - start < 20 * ref_s + 1.0


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
def test_bench_shape(backend):
    """The paper's K = k = 10 over a Llama-3 vocabulary, B = 2 (threads on the CPU)."""
    dev = device_of(backend)
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(2, 10, 128256, generator=g) * 3).to(dev)
    parents = torch.log_softmax(torch.randn(2, 10, generator=g), -1).to(dev)
    check(ek.frontier_expand(logits, parents, 10, backend=backend), logits, parents, 10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dead_row_children(backend):
    """A row with no finite logit still yields k children: tokens 0..k-1 (ties go to the lower
    id) with score -inf, and they rank after every finite child."""
    dev = device_of(backend)
    logits = torch.randn(1, 2, 40)
    logits[0, 0] = float("nan")
    parents = torch.tensor([[0.0, -1.0]])
    out = ek.frontier_expand(logits.to(dev), parents.to(dev), 3, backend=backend)
    assert out.child_tokens[0, 0].tolist() == [0, 1, 2]
    assert out.child_scores[0, 0].tolist() == [float("-inf")] * 3
    assert (out.frontier_index[0] >= 3).all()  # all from the live row 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_preallocated_out(backend):
    dev = device_of(backend)
    logits, parents = torch.randn(2, 3, 50, device=dev), torch.randn(2, 3, device=dev)
    out = reference.FrontierExpansion(
        torch.full((2, 3, 4), -7, dtype=torch.int32, device=dev), torch.empty(2, 3, 4, device=dev),
        torch.full((2, 4), -7, dtype=torch.int32, device=dev), torch.empty(2, 4, device=dev),
    )
    got = ek.frontier_expand(logits, parents, 4, out=out, backend=backend)
    assert all(a is b for a, b in zip(got, out))
    check(out, logits, parents, 4)


COMPILE_FOR_SM90 = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from eagle2_kernels.triton import frontier_expand as kernels

rows = ASTSource(kernels._expand_rows_kernel, constexprs={"KP": 16, "BLOCK_V": kernels.BLOCK_V}, signature={
    "logits_ptr": "*bf16", "parent_ptr": "*fp32", "tokens_ptr": "*i32", "scores_ptr": "*fp32",
    "V": "i32", "k": "i32", "KP": "constexpr", "BLOCK_V": "constexpr"})
frontier = ASTSource(kernels._next_frontier_kernel, constexprs={"KP": 16, "BLOCK_N": kernels.BLOCK_N}, signature={
    "scores_ptr": "*fp32", "index_ptr": "*i32", "frontier_ptr": "*fp32", "N": "i32", "k": "i32",
    "KP": "constexpr", "BLOCK_N": "constexpr"})
for src in (rows, frontier):
    assert triton.compile(src, target=GPUTarget("cuda", 90, 32)).asm["cubin"]
"""


def test_triton_kernels_compile_for_sm90():
    """The interpreter is lenient about types; compiling for a real GPU target is not. This
    needs no GPU (Triton bundles ptxas), but must run without TRITON_INTERPRET: a subprocess."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", COMPILE_FOR_SM90], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.parametrize("make, match", [
    (lambda: (torch.randn(1, 2, 5, dtype=torch.float64), torch.zeros(1, 2), 2), "backend: expected 'reference'"),
    (lambda: (torch.randint(0, 9, (1, 2, 5)), torch.zeros(1, 2), 2), "logits: expected dtype"),
    (lambda: (torch.randn(2, 5), torch.zeros(2), 2), "logits: expected 3 dims"),
    (lambda: (torch.randn(1, 2, 5), torch.zeros(1, 3), 2), "parent_scores: expected shape"),
    (lambda: (torch.randn(1, 2, 5), torch.zeros(1, 2, dtype=torch.float16), 2), "parent_scores: expected dtype"),
    (lambda: (torch.randn(1, 2, 5), torch.zeros(1, 2), 6), r"k: expected an int in \[1, 5\]"),
    (lambda: (torch.randn(1, 2, 5), torch.zeros(1, 2), 0), r"k: expected an int in \[1, 5\]"),
    (lambda: (torch.randn(1, 2, 5), torch.zeros(1, 2), 2.0), "k: expected an int"),
    (lambda: (torch.randn(1, 5, 2).transpose(1, 2), torch.zeros(1, 2), 2), "logits: expected a contiguous"),
    (lambda: (torch.randn(1, 2, 5), torch.zeros(1, 4)[:, ::2], 2), "parent_scores: expected a contiguous"),
    (lambda: (torch.randn(0, 2, 5), torch.zeros(0, 2), 2), r"logits: expected B, K and V \(the vocabulary\) >= 1"),
    (lambda: (torch.randn(1, 2, 0), torch.zeros(1, 2), 1), r"logits: expected B, K and V \(the vocabulary\) >= 1"),
], ids=["f64", "int", "2d", "parent-shape", "parent-dtype", "k>V", "k=0", "k-float", "noncontig", "parent-noncontig",
        "empty", "V=0"])
def test_bad_input_raises(make, match):
    logits, parents, k = make()
    with pytest.raises(ValueError, match=match):
        ek.frontier_expand(logits, parents, k, backend="cpu")


def test_bad_out_raises():
    logits, parents = torch.randn(1, 2, 5), torch.zeros(1, 2)
    good = ek.frontier_expand(logits, parents, 2)
    bad = good._replace(frontier_index=torch.zeros(1, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match="out.frontier_index: expected shape"):
        ek.frontier_expand(logits, parents, 2, out=bad)
    with pytest.raises(ValueError, match="out.child_scores: expected dtype"):
        ek.frontier_expand(logits, parents, 2, out=good._replace(child_scores=good.child_scores.double()))


def test_triton_launches_on_the_tensors_device(monkeypatch):
    """Triton launches on the current CUDA device: the dispatcher makes the tensors' device
    current around the launch (a cuda:1 tensor must not run on cuda:0)."""
    import eagle2_kernels.triton.frontier_expand as launcher
    from eagle2_kernels import _backend

    events = []

    class Device:  # stands in for torch.cuda.device
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            events.append(("enter", self.device))

        def __exit__(self, *exc):
            events.append(("exit", self.device))

    monkeypatch.setattr(torch.cuda, "device", Device)
    monkeypatch.setattr(launcher, "frontier_expand_triton", lambda *args: events.append(("launch", args)))
    like = types.SimpleNamespace(is_cuda=True, device=torch.device("cuda", 1))
    _backend.call_triton("frontier_expand", like, "a", "b")
    assert events == [("enter", like.device), ("launch", ("a", "b")), ("exit", like.device)]
