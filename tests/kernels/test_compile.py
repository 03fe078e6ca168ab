"""The ops as torch custom ops: registered under torch.ops.eagle2_kernels with their mutations
declared, traced by torch.compile(fullgraph=True) with results equal to eager, and compiled once
for changing batch size, tree size and prefix lengths (dynamic shapes)."""
from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import eagle2_kernels as ek

# inductor's own use of a deprecated torch.jit API
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")


def decode_step(logits, parent_scores, cand_scores, cand_parents, cand_tokens, root, prefix, q, k, v, target_logits,
                cache, m: int, backend: str):
    """One draft depth and one verify, as a decode loop calls the five ops (bench/gpu_capture.py
    captures it in a CUDA graph)."""
    exp = ek.frontier_expand(logits, parent_scores, 2, backend=backend)
    tree = ek.rerank(cand_scores, cand_parents, cand_tokens, root, prefix, m, backend=backend)
    att = ek.tree_attention(q, k, v, tree.mask_bits, prefix, backend=backend)
    res = ek.tree_verify(tree.tokens, tree.parents, target_logits, backend=backend)
    ek.kv_compact(cache, prefix, res.accepted, res.accept_len, backend=backend)
    return exp, tree, att, res


def step_inputs(B: int, m: int, prefix: int, seed: int) -> dict:
    """Inputs of decode_step: 4 frontier rows, N = 2m candidates (a random forest, parents first),
    V = 50 tokens, rows of the batch with ragged prefix lengths up to `prefix`."""
    g = torch.Generator().manual_seed(seed)
    V, N, H, d = 50, 2 * m, 2, 16
    S = prefix + m + 4
    parents = torch.stack([torch.tensor([-1] + [int(torch.randint(-1, i, (1,), generator=g)) for i in range(1, N)])
                           for _ in range(B)]).int()
    scores = -torch.rand(B, N, generator=g) * 5
    scores = torch.where(parents >= 0, scores - 1.0, scores)  # children score below their roots' level
    tokens = torch.randint(0, V, (B, N), generator=g, dtype=torch.int32)
    lens = torch.randint(1, prefix + 1, (B,), generator=g, dtype=torch.int32)
    target = torch.randn(B, m, V, generator=g)
    return dict(logits=torch.randn(B, 4, V, generator=g), parent_scores=torch.zeros(B, 4), cand_scores=scores,
                cand_parents=parents, cand_tokens=tokens, root=torch.randint(0, V, (B,), generator=g, dtype=torch.int32),
                prefix=lens, q=torch.randn(B, H, m, d, generator=g), k=torch.randn(B, H, S, d, generator=g),
                v=torch.randn(B, H, S, d, generator=g), target_logits=target,
                cache=torch.randn(2, B, H, S, d, generator=g))


def assert_same(got, want):
    """Outputs of the same kernels on the same inputs: identical, bit for bit."""
    for g_out, w_out in zip(got, want):
        for a, b in zip(g_out if isinstance(g_out, tuple) else (g_out,), w_out if isinstance(w_out, tuple) else (w_out,)):
            assert torch.equal(a, b)


def test_ops_are_registered_with_their_mutations():
    for op in ek.OPS:
        schema = str(getattr(torch.ops.eagle2_kernels, op).default._schema)
        assert "!" in schema and schema.endswith("-> ()"), schema  # writes its outputs, returns nothing
    assert "Tensor(a0!) cache" in str(torch.ops.eagle2_kernels.kv_compact.default._schema)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_fullgraph_compile_equals_eager(backend):
    eager_in, compiled_in = step_inputs(2, 6, 20, seed=0), step_inputs(2, 6, 20, seed=0)
    want = decode_step(**eager_in, m=6, backend=backend)
    step = torch.compile(decode_step, fullgraph=True, backend="aot_eager")
    got = step(**compiled_in, m=6, backend=backend)
    assert_same(got, want)
    assert torch.equal(compiled_in["cache"], eager_in["cache"])  # the in-place compaction happened


def test_inductor_compiles_the_step():
    """The default torch.compile backend (inductor, generating C++ for the CPU)."""
    eager_in, compiled_in = step_inputs(2, 5, 12, seed=1), step_inputs(2, 5, 12, seed=1)
    want = decode_step(**eager_in, m=5, backend="cpu")
    got = torch.compile(decode_step, fullgraph=True)(**compiled_in, m=5, backend="cpu")
    assert_same(got, want)
    assert torch.equal(compiled_in["cache"], eager_in["cache"])


def test_dynamic_shapes_compile_once():
    """Batch size, tree size (an int argument) and prefix lengths change from call to call; one
    graph serves them all. (The first call's sizes differ from each other: dynamo would tie two
    dims of equal size together, "duck sizing".)"""
    torch._dynamo.reset()  # forget decode_step's graphs of the other tests
    counter = CompileCounterWithBackend("aot_eager")
    step = torch.compile(decode_step, fullgraph=True, dynamic=True, backend=counter)
    compiles = []
    for i, (B, m, prefix) in enumerate([(3, 5, 9), (5, 7, 14), (4, 6, 30), (6, 9, 11)]):
        eager_in, compiled_in = step_inputs(B, m, prefix, seed=10 + i), step_inputs(B, m, prefix, seed=10 + i)
        assert_same(step(**compiled_in, m=m, backend="cpu"), decode_step(**eager_in, m=m, backend="cpu"))
        compiles.append(counter.frame_count)
    assert compiles == compiles[:1] * 4, compiles  # nothing recompiled after the first call
    assert sum(len(g.graph.nodes) > 0 for g in counter.graphs) == 1  # (dynamo also hands over an empty frame)
