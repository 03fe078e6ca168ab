"""The decode loop's tensor steps compile as whole graphs (torch.compile(fullgraph=True)):
tree.expand, the draft step (the draft forwards and frontier_expand at every depth), and
generate.verify_tree, the verify step (the target's forward with tree attention, its lm_head,
tree_verify, kv_compact). Each equals eager bit for bit, and changing tree sizes, prefix lengths
and batch sizes do not recompile."""
import pytest
import torch
from loop_helpers import random_head, tiny_target
from torch._dynamo.testing import CompileCounterWithBackend

from eagle2 import tree as tree_mod
from eagle2.attention import chain_bits, target_forward
from eagle2.cache import KVCache
from eagle2.generate import Sampling, verify_tree

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")


@pytest.fixture(scope="module", params=[1, 2], ids=["head-1-layer", "head-2-layers"])
def models(request):
    target = tiny_target()
    return target, random_head(target, layers=request.param)


def prefilled(target, head, B: int, prefix: int, seed: int):
    """Target and draft caches holding a random prefix of ragged length per row (at most
    `prefix`), and the draft's feature at each row's last position."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(prefix // 2, prefix + 1, (B,), generator=g, dtype=torch.int32)
    ids = torch.randint(3, target.config.vocab_size, (B, prefix), generator=g)
    pos = torch.minimum(torch.arange(prefix)[None], lens[:, None].long() - 1)
    tcache = KVCache.for_model(target.config, B, prefix + 80, torch.float64, "cpu")
    feats = target_forward(target, ids, pos, tcache, chain_bits(prefix, B), tcache.lengths)
    tcache.extend(lens)
    dcache = KVCache.for_model(head.config, B, prefix + 80, torch.float64, "cpu")
    hidden = head(feats, ids, pos + 1, cache=dcache, mask_bits=chain_bits(prefix, B), prefix_len=dcache.lengths)
    dcache.extend(lens)
    root_hidden = hidden.gather(1, (lens.long() - 1)[:, None, None].expand(B, 1, hidden.shape[-1]))[:, 0]
    return tcache, dcache, root_hidden, ids.gather(1, (lens.long() - 1)[:, None])[:, 0].int(), lens.clone()


def draft_and_verify(target, head, expand, verify, B: int, prefix: int, m: int, depth: int, k: int, seed: int):
    tcache, dcache, root_hidden, root, lens = prefilled(target, head, B, prefix, seed)
    cands = expand(head, dcache, root_hidden, lens, depth, k)
    tree = tree_mod.rerank(cands, root, lens, m, depth)
    feats, res = verify(target, tree, tcache, lens, Sampling())
    return [cands.scores, cands.parents, cands.tokens, dcache.lengths, feats, *res, tcache.data, tcache.lengths]


@torch.no_grad()
def test_draft_and_verify_steps_compile_to_what_eager_computes(models):
    target, head = models
    want = draft_and_verify(*models, tree_mod.expand, verify_tree, B=2, prefix=12, m=8, depth=3, k=3, seed=0)
    expand = torch.compile(tree_mod.expand, fullgraph=True, backend="aot_eager")
    verify = torch.compile(verify_tree, fullgraph=True, backend="aot_eager")
    got = draft_and_verify(*models, expand, verify, B=2, prefix=12, m=8, depth=3, k=3, seed=0)
    for i, (a, b) in enumerate(zip(got, want)):
        assert torch.equal(a, b), i


@torch.no_grad()
def test_verify_step_compiles_once_for_changing_shapes(models):
    """Tree size, batch size and the prefix lengths vary as they do between decode steps."""
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    verify = torch.compile(verify_tree, fullgraph=True, dynamic=True, backend=counter)
    compiles = []
    for i, (B, m) in enumerate([(3, 5), (2, 9), (4, 7)]):
        got = draft_and_verify(*models, tree_mod.expand, verify, B=B, prefix=10 + 3 * i, m=m, depth=3, k=3, seed=i)
        want = draft_and_verify(*models, tree_mod.expand, verify_tree, B=B, prefix=10 + 3 * i, m=m, depth=3, k=3, seed=i)
        assert all(torch.equal(a, b) for a, b in zip(got, want))
        compiles.append(counter.frame_count)
    assert compiles == compiles[:1] * 3, compiles
