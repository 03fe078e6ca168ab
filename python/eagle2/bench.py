"""`eagle2 bench`: end-to-end decoding speed of EAGLE-2 against baselines, in one process.

    eagle2 bench --prompts ../shared/data/dev_prompts.jsonl --per-category 5 --max-new-tokens 64 \\
        --methods eagle2,vanilla,hf,hf-prompt-lookup --json bench/results/bench_t0.json

Methods (comma separated):
    eagle2            EAGLE-2 with the tree shape given by --total-tokens/--depth/--topk
                      (default: the Generator's, "auto" = measured on this machine, eagle2.autotune)
    eagle2@M/D/K      EAGLE-2 with total_tokens M, depth D, topk K (eagle2@auto: the tuned shape)
    vanilla           our loop without speculation: one token per target forward (the baseline)
    hf                transformers' own `generate`
    hf-prompt-lookup  transformers' prompt-lookup decoding (generate(prompt_lookup_num_tokens=10))

Every prompt is run by every method before the next prompt starts, and the method order rotates
from prompt to prompt, so slow drifts of a shared machine hit all methods alike. A warm-up
generation per method comes first. Reported per method and prompt group (the `source` field of
dev_prompts.jsonl: mt_bench, humaneval, gsm8k; else `category`): tokens/s (generated tokens over
wall time), tau (tokens committed per target forward after the prefill) and the speedups over
`vanilla` and `hf` (ratios of tokens/s). Greedy runs also check each method's output against
vanilla's, token for token.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import re
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

BASELINES = ("vanilla", "hf", "hf-prompt-lookup")
PROMPT_LOOKUP_TOKENS = 10
_SHAPE_RE = re.compile(r"^eagle2@(\d+)/(\d+)/(\d+)$")


@dataclass(frozen=True)
class Method:
    """One benchmarked configuration. shape: None (the Generator's own), "auto" or (m, depth, topk)."""

    label: str
    kind: str  # "eagle2" | "vanilla" | "hf" | "hf-prompt-lookup"
    shape: object = None


def parse_methods(spec: str, default_shape=None) -> list[Method]:
    """Parse --methods: "eagle2,vanilla,eagle2@60/6/10,eagle2@auto,...". default_shape is what a
    bare "eagle2" uses (None = the Generator's default)."""
    out = []
    for label in (s.strip() for s in spec.split(",")):
        if label in BASELINES:
            out.append(Method(label, label))
        elif label == "eagle2":
            out.append(Method(label, "eagle2", default_shape))
        elif label == "eagle2@auto":
            out.append(Method(label, "eagle2", "auto"))
        elif m := _SHAPE_RE.match(label):
            out.append(Method(label, "eagle2", tuple(int(g) for g in m.groups())))
        else:
            raise ValueError(f"--methods: unknown method {label!r} (expected eagle2, eagle2@M/D/K, eagle2@auto, "
                             f"{', '.join(BASELINES)})")
    if len({m.label for m in out}) != len(out):
        raise ValueError(f"--methods: a method is listed twice in {spec!r}")
    return out


def load_items(path: str, limit: int | None = None, per_category: int | None = None) -> list[dict]:
    """Prompts of a JSONL file as dicts {id, group, prompt}: group = `source` (else `category`,
    else "all"). per_category keeps the first N of each group, then limit the first N overall."""
    items, seen = [], defaultdict(int)
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not JSON ({e})")
            if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str):
                raise ValueError(f"{path}:{lineno}: expected an object with a string 'prompt' field")
            group = str(rec.get("source") or rec.get("category") or "all")
            if per_category is not None and seen[group] >= per_category:
                continue
            seen[group] += 1
            items.append({"id": str(rec.get("id", lineno)), "group": group, "prompt": rec["prompt"]})
    return items[:limit]


def run_bench(gen, items: list[dict], methods: list[Method], *, max_new_tokens: int = 64, temperature: float = 0.0,
              seed: int = 0, warmup_tokens: int = 8, progress: bool = True) -> dict:
    """Run every method on every item, interleaved per prompt with the order rotated; return
    {"rows": per (prompt, method) dicts, "summary": {group: {method: stats}}, "shapes": ...}."""
    if not items:
        raise ValueError("no prompts to benchmark")
    shapes = {m.label: _resolve_shape(gen, m, temperature) for m in methods if m.kind == "eagle2"}
    ids = [gen.encode(it["prompt"]) for it in items]
    run = lambda m, p, n, s: _run_one(gen, m, shapes.get(m.label), p, n, temperature, s)  # noqa: E731
    for m in methods:  # warm-up: first calls pay for allocations, lazy imports, thread pools
        run(m, ids[0], warmup_tokens, seed)
    rows = []
    t0 = time.perf_counter()
    for i, (item, p) in enumerate(zip(items, ids)):
        order = methods[i % len(methods):] + methods[: i % len(methods)]
        out = {}
        for m in order:
            out[m.label] = run(m, p, max_new_tokens, seed + i)
        ref = out.get("vanilla")
        for m in methods:
            r = out[m.label]
            row = {"id": item["id"], "group": item["group"], "method": m.label, "prompt_tokens": len(p), **r}
            if temperature == 0 and ref is not None:
                row["same_as_vanilla"] = r["tokens"] == ref["tokens"]
            rows.append(row)
        if progress:
            done = ", ".join(f"{m.label} {out[m.label]['new_tokens'] / out[m.label]['seconds']:.1f}" for m in methods)
            print(f"[bench] {i + 1}/{len(items)} {item['id']} ({time.perf_counter() - t0:.0f} s): {done} tokens/s",
                  file=sys.stderr, flush=True)
    return {"rows": rows, "summary": summarise(rows, [m.label for m in methods]),
            "shapes": {k: list(v) for k, v in shapes.items()}}


def _resolve_shape(gen, method: Method, temperature: float) -> tuple[int, int, int]:
    shape = gen.shape if method.shape is None else method.shape
    if shape == "auto":
        from .autotune import tuned_shape

        shape = tuned_shape(gen, temperature)
    return tuple(shape) if isinstance(shape, tuple) else (shape.total_tokens, shape.depth, shape.topk)


def _run_one(gen, method: Method, shape, prompt_ids: list[int], max_new_tokens: int, temperature: float,
             seed: int) -> dict:
    """One prompt, one method: generated tokens, wall seconds, target forwards, tau."""
    if method.kind in ("hf", "hf-prompt-lookup"):
        return _run_hf(gen, prompt_ids, max_new_tokens, temperature, seed,
                       PROMPT_LOOKUP_TOKENS if method.kind == "hf-prompt-lookup" else None)
    m, d, k = shape if shape is not None else (None, None, None)
    start = time.perf_counter()
    [r] = gen.generate([prompt_ids], max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                       method=method.kind, total_tokens=m, depth=d, topk=k)
    seconds = time.perf_counter() - start
    return _row(r.tokens, seconds, r.target_forwards)


def _run_hf(gen, prompt_ids, max_new_tokens, temperature, seed, lookup: int | None) -> dict:
    """transformers' generate (plain or prompt lookup), counting the model's forward calls."""
    import torch

    model = gen.model
    calls = [0]
    hook = model.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    dev = next(model.parameters()).device
    ids = torch.tensor([prompt_ids], device=dev)
    kwargs = dict(do_sample=False) if temperature == 0 else dict(do_sample=True, temperature=temperature, top_p=1.0,
                                                                 top_k=0)
    if lookup is not None:
        kwargs["prompt_lookup_num_tokens"] = lookup
    eos = sorted(gen.eos_ids) or None
    torch.manual_seed(seed)
    try:
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 eos_token_id=eos, pad_token_id=eos[0] if eos else 0, **kwargs)
        seconds = time.perf_counter() - start
    finally:
        hook.remove()
    tokens = out[0, len(prompt_ids):].tolist()
    cut = next((j + 1 for j, t in enumerate(tokens) if t in gen.eos_ids), len(tokens))
    return _row(tokens[:cut], seconds, calls[0])


def _row(tokens: list[int], seconds: float, forwards: int) -> dict:
    steps = forwards - 1  # the prefill yields exactly one token
    return {"tokens": tokens, "new_tokens": len(tokens), "seconds": seconds, "target_forwards": forwards,
            "tau": (len(tokens) - 1) / steps if steps > 0 else float(len(tokens))}


def summarise(rows: list[dict], labels: list[str]) -> dict:
    """Per group (and "all") and method: prompts, tokens, seconds, tokens_per_s, tau (committed
    tokens per target forward, pooled), speedup_vs_vanilla / _vs_hf (tokens/s ratios), and
    same_as_vanilla (fraction of prompts) for greedy runs."""
    groups = sorted({r["group"] for r in rows}) + ["all"]
    summary = {}
    for g in groups:
        sel = [r for r in rows if g == "all" or r["group"] == g]
        stats = {}
        for label in labels:
            rs = [r for r in sel if r["method"] == label]
            tokens, seconds = sum(r["new_tokens"] for r in rs), sum(r["seconds"] for r in rs)
            steps = sum(r["target_forwards"] - 1 for r in rs)
            s = {"prompts": len(rs), "tokens": tokens, "seconds": round(seconds, 4),
                 "tokens_per_s": tokens / seconds if seconds > 0 else 0.0,
                 "tau": (tokens - len(rs)) / steps if steps > 0 else 1.0}
            if rs and "same_as_vanilla" in rs[0]:
                s["same_as_vanilla"] = sum(r["same_as_vanilla"] for r in rs) / len(rs)
            stats[label] = s
        for label, s in stats.items():
            for base in ("vanilla", "hf"):
                if base in stats and stats[base]["tokens_per_s"] > 0:
                    s[f"speedup_vs_{base}"] = s["tokens_per_s"] / stats[base]["tokens_per_s"]
        summary[g] = stats
    return summary


def format_table(summary: dict, markdown: bool = False) -> str:
    """A table with one line per group and method: plain text, or a Markdown table."""
    cols = ("group", "method", "tok/s", "tau", "x vanilla", "x hf", "same as vanilla")
    lines = []
    for g, stats in summary.items():
        for label, s in stats.items():
            fmt = lambda key: f"{s[key]:.2f}" if key in s else "-"  # noqa: E731
            same = f"{s['same_as_vanilla']:.0%}" if "same_as_vanilla" in s else "-"
            lines.append((g, label, f"{s['tokens_per_s']:.2f}", f"{s['tau']:.2f}", fmt("speedup_vs_vanilla"),
                          fmt("speedup_vs_hf"), same))
    if markdown:
        return "\n".join("| " + " | ".join(r) + " |" for r in [cols, ("---",) * 2 + ("---:",) * 5, *lines])
    widths = [max(len(r[i]) for r in [cols, *lines]) for i in range(len(cols))]
    fmt_row = lambda r: "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([fmt_row(cols), "-" * (sum(widths) + 2 * (len(cols) - 1)), *map(fmt_row, lines)])


def environment(gen=None) -> dict:
    """Machine, date, load and versions for a results file's header."""
    import torch
    import transformers

    import eagle2_kernels

    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "machine": {"host": platform.node(), "cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(),
                       "torch_threads": torch.get_num_threads(), "loadavg": [round(x, 2) for x in os.getloadavg()]},
           "versions": {"python": platform.python_version(), "torch": torch.__version__,
                        "transformers": transformers.__version__, "eagle2_kernels": eagle2_kernels.backends()}}
    if gen is not None:
        env["target"] = str(getattr(gen.model.config, "_name_or_path", "") or type(gen.model).__name__)
        env["dtype"] = str(next(gen.model.parameters()).dtype).removeprefix("torch.")
        if gen.head is not None:
            from .autotune import head_digest

            env["head_sha256"] = head_digest(gen.head)
    return env


def add_cli(sub) -> None:
    """Register `eagle2 bench`."""
    p = sub.add_parser("bench", help="end-to-end speed of EAGLE-2 vs plain decoding and transformers' generate",
                       description=__doc__.split("\n\n")[0] + " Progress on stderr, the table on stdout.")
    p.add_argument("--prompts", required=True, metavar="FILE.jsonl", help="JSONL with 'prompt' (+ 'source'/'category')")
    p.add_argument("--limit", type=int, metavar="N", help="first N prompts (after --per-category)")
    p.add_argument("--per-category", type=int, metavar="N", help="first N prompts of each group")
    p.add_argument("--methods", default="eagle2,vanilla,hf,hf-prompt-lookup",
                   help="comma separated: eagle2, eagle2@M/D/K, eagle2@auto, vanilla, hf, hf-prompt-lookup")
    p.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 = greedy (default)")
    p.add_argument("--max-new-tokens", type=int, default=64, metavar="N")
    p.add_argument("--total-tokens", metavar="M|auto", help="tree size of 'eagle2' (default: the Generator's)")
    p.add_argument("--depth", type=int, metavar="D")
    p.add_argument("--topk", type=int, metavar="K")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="prompt i samples with seed S + i")
    p.add_argument("--retune", action="store_true", help="re-measure the 'auto' cost model instead of using the cache")
    p.add_argument("--target", metavar="PATH", help="local HF checkpoint (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--draft", metavar="PATH", help="EAGLE-1/2 head folder (default: the shipped head)")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16", "float64"), default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", metavar="OUT", help="write rows, summary and a machine/date/versions header here")
    p.set_defaults(func=run_cli)


def run_cli(args) -> int:
    for name in ("limit", "per_category", "max_new_tokens"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise SystemExit(f"eagle2 bench: --{name.replace('_', '-')} must be >= 1")
    try:
        shape = _cli_shape(args)
        methods = parse_methods(args.methods, shape)
        items = load_items(args.prompts, args.limit, args.per_category)
    except (ValueError, OSError) as e:
        raise SystemExit(f"eagle2 bench: {e}")
    import torch

    import eagle2

    gen = eagle2.load(args.target, args.draft, dtype=getattr(torch, args.dtype), device=args.device)
    if args.retune:
        from .autotune import forget

        forget(gen)
    env = environment(gen)
    try:
        res = run_bench(gen, items, methods, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                        seed=args.seed)
    except ValueError as e:
        raise SystemExit(f"eagle2 bench: {e}")
    env["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    print(format_table(res["summary"]))
    if args.json:
        out = {"header": {**env, "command": "eagle2 " + " ".join(sys.argv[1:]) if sys.argv else "",
                          "settings": {"temperature": args.temperature, "max_new_tokens": args.max_new_tokens,
                                       "seed": args.seed, "prompts": args.prompts, "methods": [m.label for m in methods]},
                          "shapes": res["shapes"]},
               "summary": res["summary"], "rows": res["rows"]}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
        print(f"[bench] wrote {args.json}", file=sys.stderr)
    return 0


def _cli_shape(args):
    """What a bare 'eagle2' method uses: None (Generator default), "auto", or (m, d, k) with the
    Generator's defaults filling what is not given."""
    if args.total_tokens == "auto":
        if args.depth is not None or args.topk is not None:
            raise ValueError("--total-tokens auto chooses depth and topk too; drop --depth/--topk")
        return "auto"
    if args.total_tokens is None and args.depth is None and args.topk is None:
        return None
    from . import DEFAULT_SHAPE

    if args.total_tokens is not None and not args.total_tokens.isdigit():
        raise ValueError(f"--total-tokens: expected an int or 'auto', got {args.total_tokens!r}")
    m = int(args.total_tokens) if args.total_tokens is not None else DEFAULT_SHAPE.total_tokens
    return (m, args.depth or DEFAULT_SHAPE.depth, args.topk or DEFAULT_SHAPE.topk)
