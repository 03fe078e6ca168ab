"""`eagle2 bench`: method parsing, prompt selection, interleaving, the summary arithmetic, and
an end-to-end run on a tiny random float64 Llama (greedy: every method's output equals
vanilla's)."""
import json

import pytest
from loop_helpers import cheat_head, tiny_target
from transformers import AutoTokenizer

from eagle2 import Generator, Result, TreeShape, bench
from eagle2.cli import main
from eagle2.model import default_target_dir
from eagle2.prompts import load_items


def test_parse_methods():
    ms = bench.parse_methods("eagle2, vanilla,eagle2@60/6/10,eagle2@auto,hf,hf-prompt-lookup", (8, 4, 2))
    assert [(m.label, m.kind, m.shape) for m in ms] == [
        ("eagle2", "eagle2", (8, 4, 2)), ("vanilla", "vanilla", None), ("eagle2@60/6/10", "eagle2", (60, 6, 10)),
        ("eagle2@auto", "eagle2", "auto"), ("hf", "hf", None), ("hf-prompt-lookup", "hf-prompt-lookup", None)]
    for bad in ("eagle3", "eagle2@6/3", "vanilla,vanilla", ""):
        with pytest.raises(ValueError, match="--methods"):
            bench.parse_methods(bad)


def test_load_items_groups_and_selects(tmp_path):
    recs = [{"id": f"m{i}", "source": "mt_bench", "category": "writing", "prompt": "p"} for i in range(3)]
    recs += [{"id": f"g{i}", "source": "gsm8k", "prompt": "q"} for i in range(3)]
    recs += [{"id": "c", "category": "coding", "prompt": "r"}, {"prompt": "s"}]
    f = tmp_path / "p.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in recs) + "\n\n")
    items = load_items(str(f), per_category=2)
    assert [(i["id"], i["group"]) for i in items] == [("m0", "mt_bench"), ("m1", "mt_bench"), ("g0", "gsm8k"),
                                                      ("g1", "gsm8k"), ("c", "coding"), ("8", "all")]
    assert [i["id"] for i in load_items(str(f), limit=2)] == ["m0", "m1"]
    f.write_text('{"prompt": 3}\n')
    with pytest.raises(ValueError, match="string 'prompt'"):
        load_items(str(f))


class FakeGen:
    """Records the order of generate calls; vanilla is twice as slow as eagle2 (in forwards)."""

    shape, head, eos_ids = TreeShape(6, 3, 2), object(), frozenset()
    tree_shape, _shapes = Generator.tree_shape, Generator._shapes

    def __init__(self):
        self.calls = []

    def encode(self, prompt):
        return [len(prompt)]

    def generate(self, prompts, max_new_tokens, temperature, seed, method, total_tokens, depth, branching):
        self.calls.append((prompts[0][0], method, total_tokens))
        toks = list(range(max_new_tokens))
        forwards = max_new_tokens if method == "vanilla" else 1 + (max_new_tokens - 1) // 3
        return [Result(toks, "", len(toks), forwards, 0.0, 0.0)]


def test_interleaved_rotated_and_summarised():
    gen = FakeGen()
    items = [{"id": str(i), "group": "a" if i < 2 else "b", "prompt": "x" * (i + 1)} for i in range(3)]
    methods = bench.parse_methods("vanilla,eagle2,eagle2@8/2/2")
    res = bench.run_bench(gen, items, methods, max_new_tokens=7, warmup_tokens=2, progress=False)
    timed = gen.calls[len(methods):]  # after one warm-up call per method
    assert [c[1:] for c in gen.calls[:3]] == [("vanilla", None), ("eagle2", 6), ("eagle2", 8)]
    assert [c[1:] for c in timed] == [("vanilla", None), ("eagle2", 6), ("eagle2", 8),
                                      ("eagle2", 6), ("eagle2", 8), ("vanilla", None),
                                      ("eagle2", 8), ("vanilla", None), ("eagle2", 6)]
    assert [c[0] for c in timed] == [1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert len(res["rows"]) == 9 and all(r["same_as_vanilla"] for r in res["rows"])
    s = res["summary"]
    assert set(s) == {"a", "b", "all"} and s["a"]["eagle2"]["prompts"] == 2
    assert s["all"]["vanilla"]["tau"] == 1.0 and s["all"]["eagle2"]["tau"] == pytest.approx(3.0)
    assert res["shapes"] == {"eagle2": [6, 3, 2], "eagle2@8/2/2": [8, 2, 2]}


def test_summary_arithmetic():
    rows = [
        {"group": "g", "method": "vanilla", "new_tokens": 10, "seconds": 2.0, "target_forwards": 10, "same_as_vanilla": True},
        {"group": "g", "method": "hf", "new_tokens": 10, "seconds": 2.5, "target_forwards": 10, "same_as_vanilla": True},
        {"group": "g", "method": "eagle2", "new_tokens": 10, "seconds": 1.0, "target_forwards": 4, "same_as_vanilla": False},
        {"group": "h", "method": "vanilla", "new_tokens": 5, "seconds": 1.0, "target_forwards": 5, "same_as_vanilla": True},
        {"group": "h", "method": "hf", "new_tokens": 5, "seconds": 1.0, "target_forwards": 5, "same_as_vanilla": True},
        {"group": "h", "method": "eagle2", "new_tokens": 5, "seconds": 0.5, "target_forwards": 3, "same_as_vanilla": True},
    ]
    s = bench.summarise(rows, ["vanilla", "hf", "eagle2"])
    g = s["g"]["eagle2"]
    assert g["tokens_per_s"] == 10.0 and g["tau"] == 3.0 and g["speedup_vs_vanilla"] == 2.0
    assert g["speedup_vs_hf"] == 2.5 and g["same_as_vanilla"] == 0.0
    a = s["all"]["eagle2"]
    assert a["tokens_per_s"] == 10.0 and a["tau"] == pytest.approx(13 / 5) and a["same_as_vanilla"] == 0.5
    assert s["all"]["vanilla"]["speedup_vs_vanilla"] == 1.0
    table = bench.format_table(s)
    assert "eagle2" in table and "2.50" in table and "50%" in table
    md = bench.format_table(s, markdown=True).splitlines()
    assert len(md) == 2 + 9 and md[0].startswith("| group | method |")
    assert md[-1] == "| all | eagle2 | 10.00 | 2.60 | 2.00 | 2.33 | 50% |"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    tokenizer = AutoTokenizer.from_pretrained(default_target_dir())
    model = tiny_target(vocab=len(tokenizer), hidden=32, heads=2, kv_heads=1, layer_scale=0.3, logit_scale=4.0,
                        eos=tokenizer.eos_token_id)
    model.save_pretrained(root / "target")
    tokenizer.save_pretrained(root / "target")
    cheat_head(model).save_pretrained(root / "head")
    lines = [{"id": "a", "source": "mt_bench", "prompt": "Name three colours."},
             {"id": "b", "source": "gsm8k", "prompt": "What is 2 + 2? 2 + 2 is"},
             {"id": "c", "source": "gsm8k", "prompt": "Count to five: one two"}]
    (root / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return root


def test_cli_end_to_end(folders, capsys):
    out = folders / "res.json"
    argv = ["bench", "--prompts", str(folders / "prompts.jsonl"), "--max-new-tokens", "8", "--json", str(out),
            "--methods", "eagle2,eagle2@4/2/2,vanilla,hf,hf-prompt-lookup", "--total-tokens", "6", "--depth", "3",
            "--topk", "2", "--target", str(folders / "target"), "--draft", str(folders / "head"), "--dtype", "float64"]
    assert main(argv) == 0
    printed = capsys.readouterr()
    assert "hf-prompt-lookup" in printed.out and "[bench] 3/3" in printed.err
    res = json.loads(out.read_text())
    assert res["header"]["settings"]["methods"] == ["eagle2", "eagle2@4/2/2", "vanilla", "hf", "hf-prompt-lookup"]
    assert res["header"]["shapes"] == {"eagle2": [6, 3, 2], "eagle2@4/2/2": [4, 2, 2]}
    assert {"date", "machine", "versions", "head_sha256", "command"} <= set(res["header"])
    assert len(res["rows"]) == 15
    assert all(r["same_as_vanilla"] for r in res["rows"]), [(r["id"], r["method"]) for r in res["rows"]]
    assert set(res["summary"]) == {"gsm8k", "mt_bench", "all"}
    assert res["summary"]["all"]["vanilla"]["tau"] == 1.0 and res["summary"]["all"]["hf"]["tau"] == 1.0
    assert res["summary"]["all"]["eagle2"]["tau"] > 1.0  # the cheat head's drafts get accepted

    assert main(["bench", "--prompts", str(folders / "prompts.jsonl"), "--max-new-tokens", "8", "--json", str(out),
                 "--methods", "eagle2@4/2/2,vanilla,hf-prompt-lookup", "--temperature", "1", "--target", str(folders / "target"),
                 "--draft", str(folders / "head"), "--dtype", "float64"]) == 0
    res = json.loads(out.read_text())
    assert len(res["rows"]) == 9 and not any("same_as_vanilla" in r for r in res["rows"])
    assert all(r["new_tokens"] >= 1 for r in res["rows"])


def test_cli_errors(folders):
    base = ["bench", "--prompts", str(folders / "prompts.jsonl")]
    for extra, msg in ((["--methods", "bogus"], "unknown method"), (["--limit", "0"], "--limit"),
                       (["--total-tokens", "auto", "--depth", "3"], "auto"), (["--total-tokens", "x"], "int >= 1 or 'auto'")):
        with pytest.raises(SystemExit, match=msg):
            main(base + extra)
