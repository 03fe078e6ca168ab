"""`eagle2 generate`: JSON and streamed output, prompt files, and clear errors. Uses a tiny
random Llama saved with the default target's tokenizer, in float64 (exact)."""
import json

import pytest
import torch
from loop_helpers import random_head, tiny_target
from transformers import AutoTokenizer

from eagle2.cli import main
from eagle2.model import default_target_dir


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    tokenizer = AutoTokenizer.from_pretrained(default_target_dir())
    model = tiny_target(vocab=len(tokenizer), hidden=32, heads=2, kv_heads=1, layer_scale=0.5, eos=tokenizer.eos_token_id)
    model.save_pretrained(root / "target")
    tokenizer.save_pretrained(root / "target")
    random_head(model).save_pretrained(root / "head")
    (root / "prompts.jsonl").write_text(
        json.dumps({"id": "a", "prompt": "Name three colours."}) + "\n\n"
        + json.dumps({"id": "b", "prompt": "Count to five."}) + "\n")
    return root


def run(capsys, *argv):
    assert main(list(argv)) == 0
    return capsys.readouterr()


def base(folders):
    return ["--target", str(folders / "target"), "--draft", str(folders / "head"), "--dtype", "float64"]


def test_json_lines_and_methods_agree(folders, capsys):
    outs = {}
    for method in ("eagle2", "vanilla", "hf"):
        out = run(capsys, "generate", "--prompts", str(folders / "prompts.jsonl"), "--json", "--max-new-tokens", "6",
                  "--method", method, "--total-tokens", "6", "--depth", "3", "--topk", "2", "--batch-size", "2",
                  *base(folders))
        outs[method] = [json.loads(line) for line in out.out.splitlines()]
    rows = outs["eagle2"]
    assert [r["id"] for r in rows] == ["a", "b"]
    assert set(rows[0]) == {"id", "output_ids", "text", "new_tokens", "target_forwards", "tau", "seconds"}
    assert all(r["new_tokens"] == len(r["output_ids"]) for r in rows)
    for method in ("vanilla", "hf"):
        assert [r["output_ids"] for r in outs[method]] == [r["output_ids"] for r in rows], method
    # The head in another dtype than the float64 target proposes differently, outputs the same.
    out = run(capsys, "generate", "--prompts", str(folders / "prompts.jsonl"), "--json", "--max-new-tokens", "6",
              "--total-tokens", "6", "--depth", "3", "--topk", "2", "--draft-dtype", "float32", *base(folders))
    assert [json.loads(line)["output_ids"] for line in out.out.splitlines()] == [r["output_ids"] for r in rows]


def test_limit_and_streamed_text(folders, capsys):
    # An explicit shape: the default ("auto") would first measure this random model's costs.
    shape = ["--total-tokens", "6", "--depth", "3", "--topk", "2"]
    [row] = [json.loads(line) for line in run(capsys, "generate", "--prompts", str(folders / "prompts.jsonl"), "--limit",
                                              "1", "--json", "--max-new-tokens", "8", *shape, *base(folders)).out.splitlines()]
    streamed = run(capsys, "generate", "Name three colours.", "--max-new-tokens", "8", *shape, *base(folders))
    assert streamed.out == row["text"] + "\n"
    assert f"[eagle2] 0: {row['new_tokens']} tokens" in streamed.err


@pytest.mark.parametrize("argv, message", [
    (["generate"], "either a PROMPT or --prompts"),
    (["generate", "hi", "--prompts", "x.jsonl"], "either a PROMPT or --prompts"),
    (["generate", "--prompts", "PROMPTS", "--limit", "0"], "--limit: expected an int >= 1, got 0"),
    (["generate", "--prompts", "BAD"], "BAD:2: expected an object with a string 'prompt' field"),
    (["generate", "hi", "--temperature", "-1"], "temperature"),
    (["generate", "hi", "--topk", "0"], "topk"),
    (["generate", "hi", "--top-p", "1.5"], r"--top-p: expected a float in \(0, 1\]"),
    (["generate", "hi", "--max-new-tokens", "0"], "--max-new-tokens: expected an int >= 1, got 0"),
    (["generate", "hi", "--seed", str(2**70)], r"--seed: expected an int in \[0, 2\*\*63\)"),
    (["generate", "hi", "--total-tokens", "0"], "--total-tokens: expected an int >= 1 or 'auto'"),
    (["generate", "hi", "--topk", "100000"], "branching: expected at most 49152"),
    (["generate", "   "], "PROMPT is empty"),
    (["generate", "--prompts", "EMPTY"], "holds no prompts"),
    (["generate", "--prompts", "MISSING"], "--prompts: prompt file .* does not exist"),
    (["generate", "--prompts", "FOLDER"], "--prompts: prompt file .* is a folder"),
    (["generate", "hi", "--device", "gpu0"], "--device: expected 'cpu', 'cuda' or 'cuda:N', got 'gpu0'"),
    (["generate", "hi", "--device", "meta"], "--device: expected 'cpu', 'cuda' or 'cuda:N', got 'meta'"),
])
def test_bad_input_is_a_clear_error(folders, argv, message):
    (folders / "bad.jsonl").write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n')
    (folders / "empty.jsonl").write_text("\n")
    names = {"PROMPTS": folders / "prompts.jsonl", "BAD": folders / "bad.jsonl", "EMPTY": folders / "empty.jsonl",
             "MISSING": folders / "missing.jsonl", "FOLDER": folders}
    argv = [str(names[a]) if a in names else a for a in argv]
    with pytest.raises(SystemExit, match=message.replace("BAD", ".*bad.jsonl")):
        main(argv + base(folders))


@pytest.mark.parametrize("argv", [["generate", "hi", "--method", "beam"], ["generate", "hi", "--bogus"], ["frobnicate"]])
def test_unknown_options_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert "error" in capsys.readouterr().err


def test_help_lists_the_subcommands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "generate" in capsys.readouterr().out


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the message without a GPU")
def test_cuda_without_a_gpu_is_refused_before_loading(folders):
    with pytest.raises(SystemExit, match="torch sees no CUDA device"):
        main(["generate", "hi", "--device", "cuda", *base(folders)])


def test_target_without_draft_names_the_flags(folders):
    with pytest.raises(SystemExit, match="give --draft HEAD .* or --method vanilla"):
        main(["generate", "hi", "--target", str(folders / "target")])


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
@pytest.mark.parametrize("which", ["draft", "target"])
def test_unreadable_checkpoints_are_clear_errors(folders, tmp_path, which, damage):
    import shutil

    broken = tmp_path / which
    shutil.copytree(folders / ("head" if which == "draft" else "target"), broken)
    weights = broken / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\x00garbage" * 100)
    argv = ["generate", "hi", *base(folders)]
    argv[argv.index(str(folders / ("head" if which == "draft" else "target")))] = str(broken)
    with pytest.raises(SystemExit, match="cannot be (read|loaded)"):
        main(argv)


def test_bad_config_json_is_a_clear_error(folders, tmp_path):
    import shutil

    shutil.copytree(folders / "head", tmp_path / "head")
    (tmp_path / "head" / "config.json").write_text("{not json")
    with pytest.raises(SystemExit, match="config.json is not readable JSON"):
        main(["generate", "hi", "--target", str(folders / "target"), "--draft", str(tmp_path / "head"),
              "--dtype", "float64"])


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("eagle2 ")


def test_mismatched_draft_is_refused(folders, tmp_path):
    other = tiny_target(vocab=50, hidden=32, heads=2, kv_heads=1)
    random_head(other).save_pretrained(tmp_path / "head")
    with pytest.raises(SystemExit, match="vocab_size 50 does not match"):
        main(["generate", "hi", "--target", str(folders / "target"), "--draft", str(tmp_path / "head"),
              "--dtype", "float64"])


def test_help_does_not_import_torch():
    """`eagle2 --help` answers at once: the CLI module imports nothing heavy until a command runs."""
    import subprocess
    import sys

    code = "import sys, eagle2.cli; assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_ctrl_c_stops_cleanly(folders, capsys, monkeypatch):
    from eagle2 import api

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(api.Generator, "generate", interrupted)
    assert main(["generate", "hi", *base(folders)]) == 130
    assert "interrupted" in capsys.readouterr().err


def test_chat_keeps_the_conversation(folders, capsys, monkeypatch):
    lines = iter(["Name a colour.", "And another?", ""])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert main(["chat", "--max-new-tokens", "6", "--total-tokens", "4", "--depth", "2", "--branching", "2",
                 *base(folders)]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") >= 2  # two answers, one line each


def test_tune_and_retune(folders, capsys, monkeypatch, tmp_path):
    from eagle2 import autotune

    monkeypatch.setenv("EAGLE2_CACHE", str(tmp_path))
    monkeypatch.setattr(autotune, "DEPTHS", (1, 2))
    monkeypatch.setattr(autotune, "BRANCHINGS", (1, 2))
    monkeypatch.setattr(autotune, "TREE_SIZES", (1, 2, 4))
    monkeypatch.setattr(autotune, "PREFIX", 16)
    monkeypatch.setattr(autotune, "CALIBRATION_TOKENS", 8)
    monkeypatch.setattr(autotune, "CALIBRATION_SHAPE", autotune.TreeShape(8, 2, 2))
    assert main(["tune", *base(folders)]) == 0
    shape = json.loads(capsys.readouterr().out)
    assert set(shape) == {"total_tokens", "depth", "branching", "reduced"}
    busy = torch.get_num_threads() > 1  # then also tuned at 1 thread: its tree, its costs file
    assert (shape["reduced"] is not None) == busy
    if busy:
        assert set(shape["reduced"]) == {"total_tokens", "depth", "branching"}
    assert len(list((tmp_path / "autotune").glob("*.json"))) == 2 + busy
    assert main(["generate", "hi", "--retune", "--max-new-tokens", "4", *base(folders)]) == 0
    assert "tuning" in capsys.readouterr().err  # measured again
