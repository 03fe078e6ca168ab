"""What users expect beyond generate(): EAGLE-2 behind transformers' own model.generate
(custom_generate), stop strings, streaming (an iterator, transformers streamers), in-memory
models and raw prompts. Tiny float64 Llamas (exact), with the default target's tokenizer where
text is involved."""
import pytest
import torch
from loop_helpers import cheat_head, ragged_prompts, tiny_target
from transformers import AutoTokenizer, TextStreamer

import eagle2
from eagle2 import Generator, TreeShape
from eagle2.model import default_target_dir

SHAPE = TreeShape(8, 4, 2)


@pytest.fixture(scope="module")
def target():
    return tiny_target(layer_scale=0.3, logit_scale=4.0)


@pytest.fixture(scope="module")
def text_gen():
    tokenizer = AutoTokenizer.from_pretrained(default_target_dir())
    model = tiny_target(vocab=len(tokenizer), hidden=32, heads=2, kv_heads=1, layer_scale=0.3, logit_scale=4.0,
                        eos=tokenizer.eos_token_id)
    return Generator(model, tokenizer, cheat_head(model), shape=SHAPE)


@pytest.mark.parametrize("sample", [False, True])
def test_transformers_generate_drives_eagle2(target, sample):
    """model.generate(custom_generate=eagle2.custom_generate): greedy equals transformers'
    greedy on a left-padded batch; sampling runs with transformers' settings."""
    head = cheat_head(target)
    rows = ragged_prompts(3, 160, seed=7, min_len=3, max_len=9)
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    kw = dict(attention_mask=mask, max_new_tokens=20, pad_token_id=0, do_sample=sample)
    if sample:
        kw.update(temperature=0.8, top_k=20)
    ours = target.generate(ids, custom_generate=eagle2.custom_generate, draft_head=head, tree_shape=SHAPE, **kw)
    assert ours.shape[0] == 3 and torch.equal(ours[:, :width], ids)
    if not sample:
        assert torch.equal(ours, target.generate(ids, **kw))
    with pytest.raises(ValueError, match="repetition_penalty"):
        target.generate(ids, custom_generate=eagle2.custom_generate, draft_head=head, repetition_penalty=1.2, **kw)


def test_stop_strings_end_the_output(text_gen):
    full = text_gen.generate("Count.", max_new_tokens=24)[0]
    assert len(full.text) > 6
    stop = full.text[3:6]
    [cut] = text_gen.generate("Count.", max_new_tokens=24, stop=[stop])
    assert cut.text.endswith(stop) or stop in cut.text
    assert cut.tokens == full.tokens[:len(cut.tokens)] and len(cut.tokens) < len(full.tokens)
    assert stop not in text_gen.tokenizer.decode(cut.tokens[:-1], skip_special_tokens=True)  # the first place it occurs
    with pytest.raises(ValueError, match="stop: expected a list"):
        text_gen.generate("Count.", stop="x")


def test_streaming_iterator_and_transformers_streamer(text_gen, capsys):
    [whole] = text_gen.generate("Name a colour.", max_new_tokens=16)
    pieces = list(text_gen.stream_text("Name a colour.", max_new_tokens=16))
    assert len(pieces) > 1 and "".join(pieces) == whole.text
    text_gen.generate("Name a colour.", max_new_tokens=16, streamer=TextStreamer(text_gen.tokenizer, skip_special_tokens=True))
    assert capsys.readouterr().out.strip() == whole.text.strip()


def test_in_memory_model_and_raw_prompts(text_gen):
    gen = eagle2.load(text_gen.model, draft=text_gen.head, tokenizer=text_gen.tokenizer, shape=SHAPE)
    assert gen.model is text_gen.model and gen.tokenizer is text_gen.tokenizer
    assert gen.generate("Hi.", max_new_tokens=8)[0].tokens == text_gen.generate("Hi.", max_new_tokens=8)[0].tokens
    raw = gen.encode("Hi.", chat=False)
    assert raw == list(gen.tokenizer("Hi.").input_ids) and raw != gen.encode("Hi.")
    assert gen.generate("Hi.", max_new_tokens=8, chat=False)[0].tokens == gen.generate([raw], max_new_tokens=8)[0].tokens


@pytest.mark.parametrize("kwargs, match", [
    (dict(dtype="float8"), "dtype: expected one of"),
    (dict(shape="big"), "shape: expected a TreeShape or 'auto'"),
    (dict(device="gpu0"), "device: expected 'cpu'"),
])
def test_load_checks_its_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        eagle2.load(**kwargs)


def test_generate_checks_the_seed(text_gen):
    with pytest.raises(ValueError, match="seed: expected an int"):
        text_gen.generate("Hi.", seed="abc")
