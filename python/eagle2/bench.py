"""`eagle2 bench`: end-to-end decoding speed of EAGLE-2 against baselines, in one process.

    eagle2 bench --prompts data/dev_prompts.jsonl --per-category 5 --max-new-tokens 64 \\
        --methods eagle2,vanilla,hf,hf-prompt-lookup --json bench/results/bench_t0.json

Methods (comma separated):
    eagle2            EAGLE-2 with the tree shape given by --total-tokens/--depth/--branching
                      (default: the Generator's, "auto" = measured on this machine, eagle2.autotune)
    eagle2@M/D/K      EAGLE-2 with total_tokens M, depth D, branching K (eagle2@auto: the tuned shape)
    vanilla           our loop without speculation: one token per target forward (the baseline)
    hf                transformers' own `generate`
    hf-prompt-lookup  transformers' prompt-lookup decoding (generate(prompt_lookup_num_tokens=10))

Every prompt is run by every method before the next prompt starts, and the method order rotates
from prompt to prompt, so slow drifts of a shared machine hit all methods alike. A warm-up
generation per method comes first. Reported per method and prompt group (the `source` field of
dev_prompts.jsonl: mt_bench, humaneval, gsm8k; else `category`): tokens/s (generated tokens over
wall time), tau (tokens committed per target forward after the prefill) and the speedups over
`vanilla` and `hf` (ratios of tokens/s). Greedy runs also check each method's output against
vanilla's, token for token, and report where each differing output first leaves it and the
target's top-2 logit margin there (only a near-tie may flip). --busy N runs N CPU-bound competing
processes meanwhile (a shared machine), to compare the speedups with a quiet run's.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .generate import tau
from .prompts import load_items

BASELINES = ("vanilla", "hf", "hf-prompt-lookup")
PROMPT_LOOKUP_TOKENS = 10
_SHAPE_RE = re.compile(r"^eagle2@(\d+)/(\d+)/(\d+)$")


@dataclass(frozen=True)
class Method:
    """One benchmarked configuration. shape: None (the Generator's own), "auto", or
    (total_tokens, depth, branching) with None where the Generator's shape fills in."""

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
                if not row["same_as_vanilla"]:
                    row["divergence"] = first_divergence(gen.model, p, ref["tokens"], r["tokens"])
            rows.append(row)
        if progress:
            done = ", ".join(f"{m.label} {out[m.label]['new_tokens'] / out[m.label]['seconds']:.1f}" for m in methods)
            print(f"[bench] {i + 1}/{len(items)} {item['id']} ({time.perf_counter() - t0:.0f} s): {done} tokens/s",
                  file=sys.stderr, flush=True)
    from .autotune import reduced_shape

    reduced = {m.label: reduced_shape(gen, temperature) for m in methods if m.shape == "auto"}
    return {"rows": rows, "summary": summarise(rows, [m.label for m in methods]),
            "shapes": {k: list(dataclasses.astuple(v)) for k, v in shapes.items()},
            "reduced_shapes": {k: v and list(dataclasses.astuple(v)) for k, v in reduced.items()}}


def first_divergence(model, prompt_ids: list[int], reference: list[int], other: list[int]) -> dict:
    """Where a greedy output leaves the reference one: the first differing position, and the
    target's top-2 logit margin there (after the prompt and the common tokens). A greedy
    divergence is only legitimate at a near-tie, where rounding can swap the top two."""
    import torch

    j = next((i for i, (a, b) in enumerate(zip(reference, other)) if a != b), min(len(reference), len(other)))
    dev = next(model.parameters()).device
    with torch.inference_mode():
        top = model(torch.tensor([prompt_ids + reference[:j]], device=dev)).logits[0, -1].float().topk(2).values
    return {"at": j, "top2_margin": float(top[0] - top[1])}


@contextlib.contextmanager
def busy_load(processes: int, limit_s: float = 4 * 3600):
    """`processes` CPU-bound competitors (another job on the machine) while the block runs; each
    also stops by itself after limit_s seconds."""
    spin = f"import time\nend = time.time() + {limit_s}\nwhile time.time() < end: pass"
    procs = [subprocess.Popen([sys.executable, "-c", spin]) for _ in range(processes)]
    try:
        yield
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def _resolve_shape(gen, method: Method, temperature: float):
    if method.shape == "auto":
        return gen.tree_shape(temperature, total_tokens="auto")
    return gen.tree_shape(temperature, *(method.shape or (None, None, None)))


def _run_one(gen, method: Method, shape, prompt_ids: list[int], max_new_tokens: int, temperature: float,
             seed: int) -> dict:
    """One prompt, one method: generated tokens, wall seconds, target forwards, tau."""
    if method.kind in ("hf", "hf-prompt-lookup"):
        from .generate import Sampling, hf_generate

        lookup = PROMPT_LOOKUP_TOKENS if method.kind == "hf-prompt-lookup" else None
        [r] = hf_generate(gen.model, [prompt_ids], max_new_tokens, sampling=Sampling(temperature), eos_ids=gen.eos_ids, seed=seed,
                          prompt_lookup=lookup)
        return _row(r.tokens, r.seconds, r.target_forwards)
    # eagle2@auto asks for "auto" itself, so that its steps on a busy machine take the tree tuned
    # for fewer threads (autotune.reduced_shape), as a user's call would.
    m, d, b = ("auto", None, None) if method.shape == "auto" else \
        dataclasses.astuple(shape) if shape is not None else (None, None, None)
    start = time.perf_counter()
    [r] = gen.generate([prompt_ids], max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                       method=method.kind, total_tokens=m, depth=d, branching=b)
    seconds = time.perf_counter() - start
    return _row(r.tokens, seconds, r.target_forwards)


def _row(tokens: list[int], seconds: float, forwards: int) -> dict:
    return {"tokens": tokens, "new_tokens": len(tokens), "seconds": seconds, "target_forwards": forwards,
            "tau": tau(len(tokens), forwards)}


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
            s = {"prompts": len(rs), "tokens": tokens, "seconds": round(seconds, 4),
                 "tokens_per_s": tokens / seconds if seconds > 0 else 0.0,
                 "tau": tau(tokens, sum(r["target_forwards"] for r in rs), len(rs))}
            if rs and "same_as_vanilla" in rs[0]:
                s["same_as_vanilla"] = sum(r["same_as_vanilla"] for r in rs) / len(rs)
                s["divergence_margins"] = [round(r["divergence"]["top2_margin"], 6) for r in rs if "divergence" in r]
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

    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "machine": {"host": platform.node(), "cpu": eagle2_kernels.device_name("cpu"), "cores": os.cpu_count(),
                       "platform": platform.platform(),
                       "torch_threads": torch.get_num_threads(), "loadavg": [round(x, 2) for x in os.getloadavg()]},
           "versions": {"python": platform.python_version(), "torch": torch.__version__,
                        "transformers": transformers.__version__, "eagle2_kernels": eagle2_kernels.backends()}}
    if gen is not None:
        env["target"] = str(getattr(gen.model.config, "_name_or_path", "") or type(gen.model).__name__)
        env["dtype"] = str(next(gen.model.parameters()).dtype).removeprefix("torch.")
        if gen.head is not None:
            from .autotune import head_digest

            env["head_sha256"] = head_digest(gen.head)
            env["draft_dtype"] = str(gen.head.dtype).removeprefix("torch.")
    return env


def run_cli(args, shape) -> int:
    """`eagle2 bench` (arguments defined in eagle2.cli); shape: what a bare 'eagle2' uses."""
    for name in ("limit", "per_category", "max_new_tokens"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise SystemExit(f"eagle2 bench: --{name.replace('_', '-')} must be >= 1")
    try:
        methods = parse_methods(args.methods, shape)
        items = load_items(args.prompts, args.limit, args.per_category)
    except (ValueError, OSError) as e:
        raise SystemExit(f"eagle2 bench: {e}")
    import torch

    from .api import load

    gen = load(args.target, args.draft, dtype=getattr(torch, args.dtype), device=args.device, draft_dtype=args.draft_dtype)
    if args.retune:
        from .autotune import forget

        forget(gen, args.temperature)
    env = environment(gen)
    env["busy_processes"] = args.busy
    try:
        with busy_load(args.busy):
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
                          "shapes": res["shapes"], "reduced_shapes": res["reduced_shapes"]},
               "summary": res["summary"], "rows": res["rows"]}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
        print(f"[bench] wrote {args.json}", file=sys.stderr)
    return 0
