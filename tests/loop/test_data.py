"""Training data (eagle2.data): ShareGPT files read robustly, conversations tokenised in the
chat template with the loss mask on exactly the assistant's tokens, compact shards."""
import json

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from eagle2.data import Conversation, conversation_ids, read_shard, read_sharegpt, save_shard

# A word-level chat template: "<role> content <eos>" per turn, "w1" opens the assistant's.
TEMPLATE = ("{% for m in messages %}{{ {'system': 'w2', 'user': 'w0', 'assistant': 'w1'}[m['role']] }} "
            "{{ m['content'] }}{% if not (continue_final_message and loop.last) %} <eos>{% endif %} {% endfor %}"
            "{% if add_generation_prompt %}w1 {% endif %}")


@pytest.fixture(scope="module")
def tokenizer():
    words = {"<unk>": 0, "<eos>": 1, **{f"w{i}": i + 2 for i in range(30)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    t = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")
    t.chat_template = TEMPLATE
    return t


def test_sharegpt_keeps_every_complete_record_of_a_cut_off_file(tmp_path):
    records = [
        {"id": "a", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
        # a later part of a split chat starts mid-answer: the leading assistant turn goes
        {"id": "b", "conversations": [{"from": "gpt", "value": "...rest"}, {"from": "human", "value": "q"},
                                      {"from": "gpt", "value": "x"}, {"from": "gpt", "value": "y"}]},
        {"id": "c", "conversations": []},
        {"id": "d", "conversations": [{"from": "robot", "value": "?"}]},
        {"id": "e", "conversations": [{"from": "gpt", "value": "only an answer"}]},
        {"id": "f", "conversations": [{"from": "system", "value": "be brief"}, {"from": "human", "value": "q"},
                                      {"from": "chatgpt", "value": "a"}]},
    ]
    text = json.dumps(records, indent=1)
    cut = text + ',\n {"id": "g", "conversations": [{"from": "human", "val'
    (tmp_path / "sg.json").write_text(cut[: len(text) - 2] + cut[len(text):])  # drop the closing "\n]"
    kept, dropped = read_sharegpt(tmp_path / "sg.json")
    assert [r["id"] for r in kept] == ["a", "b", "f"]
    assert kept[1]["turns"] == [{"role": "user", "content": "q"}, {"role": "assistant", "content": "x\n\ny"}]
    assert kept[2]["turns"][0] == {"role": "system", "content": "be brief"}
    assert dropped == {"cut off (end of file inside a record)": 1, "no conversation": 1, "unknown role 'robot'": 1,
                       "no user turn followed by an assistant turn": 1}


def test_loss_mask_covers_the_assistant_turns_and_their_end(tokenizer):
    chat = [{"role": "user", "content": "w5 w6"}, {"role": "assistant", "content": "w7"},
            {"role": "user", "content": "w8"}, {"role": "assistant", "content": "w9 w10"}]
    conv = conversation_ids(tokenizer, chat)
    words = tokenizer.convert_ids_to_tokens(conv.input_ids.tolist())
    assert words == ["w0", "w5", "w6", "<eos>", "w1", "w7", "<eos>", "w0", "w8", "<eos>", "w1", "w9", "w10", "<eos>"]
    trained = [w for w, m in zip(words, conv.loss_mask.tolist()) if m]
    assert trained == ["w7", "<eos>", "w9", "w10", "<eos>"]
    # an answer cut off by max_new_tokens has no end of turn to learn
    cut = conversation_ids(tokenizer, chat, open_end=True)
    assert tokenizer.convert_ids_to_tokens(cut.input_ids[cut.loss_mask].tolist()) == ["w7", "<eos>", "w9", "w10"]
    # whole turns only: the second exchange does not fit in 10 tokens
    short = conversation_ids(tokenizer, chat, max_len=10)
    assert len(short.input_ids) == 7 and short.loss_mask.sum() == 2
    assert conversation_ids(tokenizer, chat, max_len=3) is None


def test_shards_round_trip_compactly(tmp_path):
    g = torch.Generator().manual_seed(0)
    convs = [Conversation(torch.randint(0, 49152, (n,), generator=g), torch.rand(n, generator=g) < 0.6)
             for n in (5, 1, 300, 17)]
    save_shard(tmp_path / "shard-00000.npz", convs, vocab_size=49152)
    back = read_shard(tmp_path / "shard-00000.npz")
    assert len(back) == 4
    for a, b in zip(convs, back):
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.loss_mask, b.loss_mask)
    with np.load(tmp_path / "shard-00000.npz") as z:  # 16-bit ids, 1-bit mask
        assert z["input_ids"].dtype == np.uint16 and z["loss_mask"].shape == (-(-323 // 8),)


def test_regenerate_skips_what_does_not_fit_and_continues_what_does(tokenizer):
    """Self-distillation (mode greedy): a first user turn too long for max_len leaves its record
    without answers (its later turns too, which would lack their context); the other records
    get the target's own answers, turn after turn."""
    from argparse import Namespace

    from loop_helpers import tiny_target

    from eagle2.data import regenerate

    target = tiny_target(vocab=len(tokenizer), eos=1)
    lm_head = torch.nn.Linear(target.config.hidden_size, len(tokenizer), dtype=torch.float64)
    with torch.no_grad():
        lm_head.weight.copy_(target.lm_head.weight)
        lm_head.bias.zero_()[1] = 1e3  # every answer ends at once (EOS), so every turn is answered
    target.lm_head = lm_head
    turns = [{"role": "user", "content": "w3 w4"}, {"role": "assistant", "content": "w5"},
             {"role": "user", "content": "w6"}, {"role": "assistant", "content": "w7"}]
    long = [{"role": "user", "content": " ".join(["w3"] * 40)}] + turns[1:]
    args = Namespace(mode="greedy", max_turns=2, max_new_tokens=4, max_len=24, batch_size=8, temperature=0.0, top_p=1.0)
    (skipped, _), (answered, _) = regenerate(target, tokenizer, [{"turns": long}, {"turns": turns}], args)
    assert skipped == []
    assert [m["role"] for m in answered] == ["user", "assistant", "user", "assistant"]
    assert [answered[0]["content"], answered[2]["content"]] == ["w3 w4", "w6"]


def test_committed_corpus_shards_are_whole():
    """Every committed corpus folder has its meta.json and consecutive shards (what a resumed
    `train-data` expects), and each shard holds at most shard_size conversations (records that
    do not fit are skipped) of in-vocabulary ids with answers."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "data" / "corpus"
    folders = sorted(p.parent for p in root.glob("*/*/meta.json"))
    assert folders, f"no corpus folders under {root}"
    for folder in folders:
        shard_size = json.loads((folder / "meta.json").read_text())["shard_size"]
        shards = sorted(folder.glob("shard-*.npz"))
        assert [p.name for p in shards] == [f"shard-{i:05d}.npz" for i in range(len(shards))], folder
        for path in shards:
            convs = read_shard(path)
            assert 0 < len(convs) <= shard_size  # records that do not fit are skipped
            for c in convs:
                assert len(c.input_ids) == len(c.loss_mask) and c.loss_mask.any() and int(c.input_ids.max()) < 49152
