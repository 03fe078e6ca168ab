"""Draft-head training end to end on a tiny random Llama: `eagle2 train-data`, `eagle2 train`."""
import json

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import eagle2
from eagle2 import cli
from eagle2.data import load_shards
from eagle2.draft import DraftHead
from eagle2.train import train

VOCAB = 64


@pytest.fixture(scope="module")
def tiny_target(tmp_path_factory):
    """A tiny random Llama checkpoint folder with a word-level tokenizer (w0..w61, EOS)."""
    path = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         eos_token_id=1, bos_token_id=None, pad_token_id=1, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(path)
    words = {"<unk>": 0, "<eos>": 1, **{f"w{i}": i + 2 for i in range(VOCAB - 2)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>",
                            pad_token="<eos>").save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_data(tiny_target, tmp_path_factory):
    """Self-distillation shards of the tiny target (greedy answers to random word prompts)."""
    root = tmp_path_factory.mktemp("data")
    gen = torch.Generator().manual_seed(1)
    with open(root / "prompts.jsonl", "w") as f:
        for i in range(40):
            words = torch.randint(2, VOCAB, (int(torch.randint(3, 12, (1,), generator=gen)),), generator=gen)
            f.write(json.dumps({"id": f"p{i}", "source": "rand" if i % 2 else "other",
                                "prompt": " ".join(f"w{int(w) - 2}" for w in words)}) + "\n")
    out = root / "shards"
    argv = ["train-data", "--out", str(out), "--prompts", str(root / "prompts.jsonl"), "--target", str(tiny_target),
            "--max-new-tokens", "24", "--batch-size", "8", "--shard-size", "16", "--limit", "40"]
    assert cli.main(argv) == 0
    return argv, out


def _train_args(data, out, target, *extra):
    return cli.build_parser().parse_args(
        ["train", "--data", str(data), "--out", str(out), "--target", str(target), "--tokens-per-batch", "256",
         "--lr", "3e-3", "--warmup", "5", "--eval-fraction", "0.15", "--eval-every", "1000", "--log-every", "1000",
         "--save-dtype", "float32", "--precision", "float32", *extra])


def test_train_data_shards_are_resumable(tiny_data):
    argv, out = tiny_data
    shards = sorted(out.glob("shard-*.npz"))
    assert len(shards) == 3  # 40 prompts in shards of 16
    mtimes = [p.stat().st_mtime_ns for p in shards]
    assert cli.main(argv) == 0  # everything done: nothing is regenerated
    assert [p.stat().st_mtime_ns for p in shards] == mtimes
    convs = load_shards(out)
    assert len(convs) == 40
    for c in convs:
        answer = c.loss_mask.nonzero().flatten()
        # the mask covers exactly the answer: one block at the end, after a non-empty prompt
        assert answer[0] > 0 and answer[-1] == len(c.input_ids) - 1
        assert len(answer) == answer[-1] - answer[0] + 1 <= 24
    with pytest.raises(SystemExit, match="other settings"):
        cli.main([*argv[:-2], "--max-new-tokens", "23", "--limit", "40"])


def test_training_lowers_loss_and_raises_accuracy(tiny_data, tiny_target, tmp_path):
    _, data = tiny_data
    res = train(_train_args(data, tmp_path / "head", tiny_target, "--steps", "80", "--random-init",
                           "--precision", "bfloat16"))
    start, end = res.eval_start, res.eval_end
    assert end["vloss"] < 0.7 * start["vloss"]
    assert end["ce"] < start["ce"]
    assert end["acc"] > start["acc"] + 0.2

    # The saved head (EAGLE layout) reloads to the same outputs.
    target, _ = eagle2.model.load_target(tiny_target)
    loaded = DraftHead.from_pretrained(tmp_path / "head").attach(target)
    feats = torch.randn(2, 7, 32)
    tokens = torch.randint(0, VOCAB, (2, 7))
    pos = torch.arange(1, 8).expand(2, -1)
    with torch.no_grad():
        assert torch.equal(loaded.logits(loaded(feats, tokens, pos)), res.head.logits(res.head(feats, tokens, pos)))


def test_resume_continues_where_it_stopped(tiny_data, tiny_target, tmp_path):
    _, data = tiny_data
    whole = train(_train_args(data, tmp_path / "a", tiny_target, "--steps", "12"))
    train(_train_args(data, tmp_path / "b", tiny_target, "--steps", "12", "--max-minutes", "0"))
    state = torch.load(tmp_path / "b" / "checkpoint" / "state.pt", weights_only=False)
    assert state["step"] == 1  # out of time after the first step
    resumed = train(_train_args(data, tmp_path / "b", tiny_target, "--steps", "12"))
    for (k, a), b in zip(whole.head.state_dict().items(), resumed.head.state_dict().values()):
        assert torch.equal(a, b), k


def test_reduced_vocab_commits_the_same_greedy_tokens(tiny_data, tiny_target, tmp_path):
    _, data = tiny_data
    full = train(_train_args(data, tmp_path / "full", tiny_target, "--steps", "30")).head
    small = train(_train_args(data, tmp_path / "small", tiny_target, "--steps", "30", "--draft-vocab", "24")).head
    assert small.d2t.shape == (24,) and 1 in small.d2t.tolist()  # EOS always kept
    target, _ = eagle2.model.load_target(tiny_target, dtype=torch.float64)
    prompts = [[5, 9, 17, 3], [40, 2, 2, 8, 61, 7]]
    outputs = []
    for head in (None, full, small):
        gen = eagle2.Generator(target, None, head.double() if head is not None else None,
                               shape=eagle2.TreeShape(total_tokens=8, depth=4, branching=3))
        res = gen.generate(prompts, max_new_tokens=24, method="vanilla" if head is None else "eagle2")
        outputs.append([r.tokens for r in res])
    assert outputs[1] == outputs[0] and outputs[2] == outputs[0]


def test_training_time_test_raises_accuracy_at_every_depth(tiny_data, tiny_target, tmp_path):
    _, data = tiny_data
    res = train(_train_args(data, tmp_path / "head", tiny_target, "--steps", "80", "--random-init",
                            "--ttt-steps", "3", "--ttt-fraction", "0.5"))
    start, end = res.eval_start["acc_steps"], res.eval_end["acc_steps"]
    assert len(end) == 3
    assert all(e > s + 0.1 for s, e in zip(start, end)), (start, end)


def test_head_layers_grow_a_trained_head(tiny_data, tiny_target, tmp_path):
    """--init with --head-layers 2 starts from the head's own function (the held-out metrics
    before the first step equal the 1-layer head's after its last) and saves 2 layers."""
    _, data = tiny_data
    one = train(_train_args(data, tmp_path / "one", tiny_target, "--steps", "10"))
    two = train(_train_args(data, tmp_path / "two", tiny_target, "--steps", "10", "--init", str(tmp_path / "one"),
                            "--head-layers", "2"))
    assert two.head.config.num_hidden_layers == 2
    assert two.eval_start["acc"] == pytest.approx(one.eval_end["acc"], abs=1e-6)
    assert two.eval_start["vloss"] == pytest.approx(one.eval_end["vloss"], rel=1e-3)  # the head was saved as float32
    target, _ = eagle2.model.load_target(tiny_target)
    assert len(DraftHead.from_pretrained(tmp_path / "two").attach(target).layers) == 2
    with pytest.raises(ValueError, match="checkpoint in .* has 2 decoder layers, got 3"):  # resuming another depth
        train(_train_args(data, tmp_path / "two", tiny_target, "--steps", "12", "--head-layers", "3"))
    with pytest.raises(ValueError, match="has 2 decoder layers, got 1 .a head can grow, not shrink."):
        train(_train_args(data, tmp_path / "one-again", tiny_target, "--init", str(tmp_path / "two"), "--head-layers", "1"))
    with pytest.raises(ValueError, match="--head-layers: expected an int >= 1 .1 for an eagle3 head., got 2"):
        train(_train_args(data, tmp_path / "e3", tiny_target, "--head", "eagle3", "--head-layers", "2"))
    fresh = train(_train_args(data, tmp_path / "fresh", tiny_target, "--steps", "2", "--head-layers", "2"))
    assert len(fresh.head.layers) == 2


def test_eagle3_head_trains_at_every_depth_and_round_trips(tiny_data, tiny_target, tmp_path):
    """--head eagle3: the CE on three layers' features (cached apart) falls and the top-1 rises
    at every unroll depth; the head is saved in the official EAGLE-3 layout and reloads."""
    from eagle2.draft3 import Eagle3Head, load_head

    _, data = tiny_data
    res = train(_train_args(data, tmp_path / "head", tiny_target, "--head", "eagle3", "--steps", "200",
                            "--draft-vocab", "40", "--ttt-steps", "3", "--ttt-fraction", "0.5"))
    start, end = res.eval_start, res.eval_end
    assert end["ce"] < start["ce"] and end["vloss"] == 0.0
    assert all(e > s + 0.1 for s, e in zip(start["acc_steps"], end["acc_steps"])), (start, end)
    assert (data / "features-layers-0-0-0").is_dir()
    target, _ = eagle2.model.load_target(tiny_target)
    loaded = load_head(tmp_path / "head").attach(target)
    assert isinstance(loaded, Eagle3Head) and torch.equal(loaded.d2t, res.head.d2t)
    feats, tokens, pos = torch.randn(2, 7, 3 * 32), torch.randint(0, VOCAB, (2, 7)), torch.arange(1, 8).expand(2, -1)
    with torch.no_grad():
        assert torch.equal(loaded.logits(loaded(feats, tokens, pos)), res.head.logits(res.head(feats, tokens, pos)))
    with pytest.raises(ValueError, match="--head eagle2: the head to start from is an EAGLE-3 head"):
        train(_train_args(data, tmp_path / "again", tiny_target, "--init", str(tmp_path / "head"), "--steps", "1"))


def test_bfloat16_features_are_close_to_float32(tiny_target):
    """--feature-precision bfloat16 (autocast) computes the cached training features within
    bfloat16 rounding of float32's (and the same argmax almost everywhere)."""
    from eagle2.data import Conversation
    from eagle2.train import _features_of

    target, _ = eagle2.model.load_target(tiny_target)
    g = torch.Generator().manual_seed(0)
    convs = [Conversation(torch.randint(0, VOCAB, (n,), generator=g), torch.ones(n, dtype=torch.bool)) for n in (5, 17, 9)]
    f32, a32, l32 = _features_of(target, convs, 32, "float32", layers=(0, 0))
    b16, a16, l16 = _features_of(target, convs, 32, "bfloat16", layers=(0, 0))
    assert f32.shape == b16.shape == (31, 32) and f32.dtype == b16.dtype == torch.float16
    assert l32.shape == l16.shape == (31, 64) and l16.dtype == torch.float16
    for x32, x16 in ((f32, b16), (l32, l16)):
        assert (x16.float() - x32.float()).abs().max() < 0.05 * x32.float().abs().max()
    assert (a16 == a32).float().mean() > 0.8
    assert _features_of(target, convs, 32, "float32")[2] is None
