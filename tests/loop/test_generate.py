"""The decode loop on tiny random float64 Llamas: greedy EAGLE-2 == plain greedy == HF greedy,
token for token (ragged batches, several tree shapes, EOS, max_new_tokens, the context limit),
and clear errors for bad input."""
import pytest
import torch
from loop_helpers import cheat_head, ragged_prompts, random_head, tiny_target

from eagle2 import Generator, TreeShape

SHAPES = [
    TreeShape(1, 1, 1),    # root only: every step is a plain step
    TreeShape(6, 5, 1),    # a chain (k = 1)
    TreeShape(8, 3, 3),    # small
    TreeShape(16, 6, 2),   # deep
    TreeShape(24, 3, 5),   # wide
]


@pytest.fixture(scope="module")
def target():
    return tiny_target(layer_scale=0.5)


@pytest.fixture(scope="module")
def heads(target):
    # 2 layers: a random one (its drafts attend through both layers' caches) and the cheat grown
    # by a no-op layer (accurate, so the multi-token path runs with a 2-layer draft cache).
    return {"random": random_head(target), "cheat": cheat_head(target),
            "random-2layers": random_head(target, seed=2, layers=2), "cheat-2layers": cheat_head(target).grown(2)}


def test_greedy_equals_vanilla_and_hf(target, heads):
    prompts = ragged_prompts(5, 160, seed=1)
    gen = Generator(target, head=heads["random"])
    vanilla = gen.generate(prompts, max_new_tokens=24, method="vanilla")
    hf = gen.generate(prompts, max_new_tokens=24, method="hf")
    assert [r.tokens for r in vanilla] == [r.tokens for r in hf]
    assert all(r.tau == 1.0 and r.target_forwards == r.new_tokens for r in vanilla)
    for shape in SHAPES:
        for kind, head in heads.items():
            gen.head = head
            out = gen.generate(prompts, max_new_tokens=24, total_tokens=shape.total_tokens, depth=shape.depth,
                               branching=shape.branching)
            assert [r.tokens for r in out] == [r.tokens for r in vanilla], (kind, shape)
            if kind.startswith("cheat") and shape.total_tokens > 1:
                # the multi-token path must really be exercised
                assert max(r.tau for r in out) > 1.5, (shape, [r.tau for r in out])
                assert sum(r.target_forwards for r in out) < sum(r.target_forwards for r in vanilla)


def test_reduced_draft_vocabulary(target):
    """Drafts from a d2t subset are proposed as target ids; the output is still exact."""
    prompts = ragged_prompts(4, 160, seed=8)
    head = cheat_head(target, d2t=torch.randperm(160, generator=torch.Generator().manual_seed(0))[:60])
    gen = Generator(target, head=head, shape=TreeShape(10, 4, 3))
    out = gen.generate(prompts, max_new_tokens=20)
    assert [r.tokens for r in out] == [r.tokens for r in gen.generate(prompts, max_new_tokens=20, method="vanilla")]
    assert max(r.tau for r in out) > 1.2


@pytest.mark.parametrize("seed", [2, 3])
def test_greedy_many_prompts_one_by_one_and_batched(target, heads, seed):
    prompts = ragged_prompts(6, 160, seed=seed, max_len=40)
    gen = Generator(target, head=heads["cheat"], shape=TreeShape(10, 4, 3))
    batched = gen.generate(prompts, max_new_tokens=20)
    single = [gen.generate([p], max_new_tokens=20, method="vanilla")[0] for p in prompts]
    assert [r.tokens for r in batched] == [r.tokens for r in single]


def test_eos_truncates_and_rows_finish_independently(target, heads):
    prompts = ragged_prompts(4, 160, seed=4)
    free = Generator(target, head=heads["cheat"], eos_token_ids=[]).generate(prompts, max_new_tokens=30, method="vanilla")

    def cut_at(eos):
        return [r.tokens[: r.tokens.index(eos) + 1] if eos in r.tokens else r.tokens for r in free]

    # an EOS that stops row 0 mid-output and leaves the rows with different lengths
    row0 = free[0].tokens
    eos = next(t for j, t in enumerate(row0) if j >= 3 and row0.index(t) == j and len({len(c) for c in cut_at(t)}) > 1)
    expected = cut_at(eos)
    assert 3 < len(expected[0]) < 30
    gen = Generator(target, head=heads["cheat"], eos_token_ids=[eos])
    for method in ("eagle2", "vanilla", "hf"):
        out = gen.generate(prompts, max_new_tokens=30, method=method)
        assert [r.tokens for r in out] == expected, method
    # A tree that accepts past the EOS still stops there.
    out = gen.generate(prompts, max_new_tokens=30, total_tokens=16, depth=6, branching=2)
    assert [r.tokens for r in out] == expected


@pytest.mark.parametrize("max_new", [1, 2, 7])
def test_max_new_tokens_exact(target, heads, max_new):
    prompts = ragged_prompts(3, 160, seed=5)
    gen = Generator(target, head=heads["cheat"], eos_token_ids=[])
    out = gen.generate(prompts, max_new_tokens=max_new, total_tokens=12, depth=5, branching=3)
    van = gen.generate(prompts, max_new_tokens=max_new, method="vanilla")
    assert [len(r.tokens) for r in out] == [max_new] * 3
    assert [r.tokens for r in out] == [r.tokens for r in van]


def test_context_limit_exact():
    context = 40
    model = tiny_target(layer_scale=0.5, context=context, seed=7)
    gen = Generator(model, head=cheat_head(model), eos_token_ids=[], shape=TreeShape(16, 6, 2))
    seen = []

    def record(module, args, kwargs):
        seen.append(int(kwargs["position_ids"].max() if "position_ids" in kwargs else args[1].max()))

    hook = model.model.rotary_emb.register_forward_pre_hook(record, with_kwargs=True)
    prompts = [list(range(3, 33)), list(range(3, 10)), [5] * 38]  # room: 10, 33, 2 tokens
    try:
        out = gen.generate(prompts, max_new_tokens=100)
        van = gen.generate(prompts, max_new_tokens=100, method="vanilla")
    finally:
        hook.remove()
    assert [len(r.tokens) for r in out] == [context - len(p) for p in prompts]
    assert [r.tokens for r in out] == [r.tokens for r in van]
    assert max(seen) == context - 2  # the last token is generated, never fed back


def test_stream_reports_every_token(target, heads):
    prompts = ragged_prompts(3, 160, seed=6)
    got = {i: [] for i in range(3)}
    out = Generator(target, head=heads["cheat"]).generate(
        prompts, max_new_tokens=15, stream=lambda i, ids: got[i].extend(ids))
    assert [got[i] for i in range(3)] == [r.tokens for r in out]


def test_bad_input(target, heads):
    gen = Generator(target, head=heads["random"])
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        gen.generate([[5, 6], []])
    with pytest.raises(ValueError, match="no room left"):
        gen.generate([[5] * 256])
    with pytest.raises(ValueError, match="outside"):
        gen.generate([[5, 999]])
    with pytest.raises(ValueError, match="method"):
        gen.generate([[5]], method="beam")
    with pytest.raises(TypeError):
        gen.generate([[5]], num_beams=2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        gen.generate([[5]], max_new_tokens=0)
    with pytest.raises(ValueError, match="temperature"):
        gen.generate([[5]], temperature=-1.0)
    with pytest.raises(ValueError, match="top_p"):
        gen.generate([[5]], temperature=1.0, top_p=0.0)
    with pytest.raises(ValueError, match="branching"):
        gen.generate([[5]], branching=-2)
    with pytest.warns(DeprecationWarning, match="branching"), pytest.raises(ValueError, match="branching"):
        gen.generate([[5]], topk=-2)  # the old name still works, with a warning
    with pytest.raises(ValueError, match="text needs a tokenizer"):
        gen.generate(["hello"])
    with pytest.raises(ValueError, match="draft head"):
        Generator(target).generate([[5]])
    other = tiny_target(hidden=32, heads=2, kv_heads=1)
    with pytest.raises(ValueError, match="hidden_size 32 does not match the target's 64"):
        Generator(target, head=random_head(other))
    with pytest.raises(ValueError, match="vocab_size 100 does not match the target's 160"):
        Generator(target, head=random_head(tiny_target(vocab=100)))



@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_greedy_is_exact_in_every_dtype_on_the_cpu(dtype):
    """With skinny_linear and tree_attention computing each row as a one-token step would,
    greedy EAGLE-2 equals plain greedy decoding token for token in float32 and 16-bit floats
    too, not only in float64, whatever the tree."""
    target = tiny_target(layer_scale=0.5, logit_scale=2.0).to(dtype)
    gen = Generator(target, head=cheat_head(tiny_target(layer_scale=0.5, logit_scale=2.0)).to(dtype).attach(target))
    prompts = ragged_prompts(4, 160, seed=11)
    vanilla = [r.tokens for r in gen.generate(prompts, max_new_tokens=40, method="vanilla")]
    for shape in SHAPES[1:]:
        out = gen.generate(prompts, max_new_tokens=40, total_tokens=shape.total_tokens, depth=shape.depth,
                           branching=shape.branching)
        assert [r.tokens for r in out] == vanilla, shape


def test_the_draft_dtype_defaults_to_bfloat16_where_the_cpu_multiplies_it(tmp_path):
    """load() without draft_dtype: a head read from a folder runs in bfloat16 beside a float32
    target on a CPU whose skinny_linear has the bfloat16 dot product, else in the target's
    dtype (a bfloat16 or float16 target: its own); an in-memory head keeps its dtype."""
    import eagle2
    import eagle2_kernels

    cheat_head(tiny_target(layer_scale=0.5, logit_scale=2.0)).save_pretrained(tmp_path)
    native = eagle2_kernels.skinny_linear_bf16_dot()
    for dtype, want in ((torch.float32, torch.bfloat16 if native else torch.float32),
                        (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16)):
        target = tiny_target(layer_scale=0.5, logit_scale=2.0).to(dtype)
        assert eagle2.load(target, draft=tmp_path, shape=TreeShape(4, 2, 2)).head.dtype == want, dtype
        head = cheat_head(tiny_target(layer_scale=0.5, logit_scale=2.0))  # float64
        assert eagle2.load(target, draft=head, shape=TreeShape(4, 2, 2)).head.dtype == torch.float64


@pytest.mark.parametrize("head_dtype", [torch.bfloat16, torch.float16], ids=str)
def test_a_draft_head_in_its_own_dtype_changes_nothing_but_speed(head_dtype):
    """eagle2.load(draft_dtype=...): the head (its draft cache, its share of the lm_head) runs in
    its own dtype beside a float32 target; greedy output is still plain greedy decoding's."""
    import eagle2

    target = tiny_target(layer_scale=0.5, logit_scale=2.0).to(torch.float32)
    gen = eagle2.load(target, draft=cheat_head(tiny_target(layer_scale=0.5, logit_scale=2.0)),
                      draft_dtype=str(head_dtype).removeprefix("torch."), shape=TreeShape(10, 4, 3))
    assert next(gen.head.parameters()).dtype == head_dtype and next(gen.model.parameters()).dtype == torch.float32
    assert gen.head._lm_weight().dtype == head_dtype
    prompts = ragged_prompts(4, 160, seed=12)
    out = gen.generate(prompts, max_new_tokens=30)
    assert [r.tokens for r in out] == [r.tokens for r in gen.generate(prompts, max_new_tokens=30, method="vanilla")]
    assert max(r.tau for r in out) > 1.5  # drafts were accepted: the tree path ran


@pytest.mark.parametrize("threads", [1, 2])
def test_steps_on_fewer_threads_take_the_reduced_tree(monkeypatch, threads):
    """decode(reduced_shape=...): a step that the ThreadGovernor runs on at most half the
    caller's threads drafts the reduced tree, the others the full one. With a one-node reduced
    tree a step on 1 of 2 threads is a plain decoding step; either way the output is plain
    decoding's."""
    import eagle2.generate as G

    class FixedGovernor:  # the governor as a busy (1 thread) or quiet (2) machine would set it
        limit = 2

        def __init__(self, device):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            pass

        def step(self):
            return threads

    target = tiny_target(layer_scale=0.5, logit_scale=2.0).to(torch.float32)
    head = cheat_head(tiny_target(layer_scale=0.5, logit_scale=2.0)).to(torch.float32).attach(target)
    prompts = ragged_prompts(3, 160, seed=13)
    plain = G.decode(target, prompts, 24)
    monkeypatch.setattr(G, "ThreadGovernor", FixedGovernor)
    out = G.decode(target, prompts, 24, head=head, shape=TreeShape(10, 4, 3), reduced_shape=TreeShape(1, 1, 1))
    assert [r.tokens for r in out] == [r.tokens for r in plain]
    forwards = [r.target_forwards for r in out]
    assert (forwards == [r.target_forwards for r in plain]) == (threads == 1)


def test_shape_for_threads():
    dec = _decoder(TreeShape(9, 2, 6), TreeShape(4, 1, 8))
    assert [dec.shape_for(n, 2) for n in (1, 2)] == [TreeShape(4, 1, 8), TreeShape(9, 2, 6)]
    assert [dec.shape_for(n, 16) for n in (1, 8, 9, 16)] == [TreeShape(4, 1, 8)] * 2 + [TreeShape(9, 2, 6)] * 2
    assert dec.cache_shape == (9, 12)
    assert _decoder(TreeShape(9, 2, 6), None).shape_for(1, 2) == TreeShape(9, 2, 6)


def _decoder(shape, reduced):
    from eagle2.generate import Decoder, Sampling

    return Decoder(model=None, head=object(), shape=shape, reduced_shape=reduced, sampling=Sampling(),
                   eos_ids=frozenset(), max_new_tokens=8)
