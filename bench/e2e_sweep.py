"""End-to-end sweep of the EAGLE-2 tree shape: speedup over plain decoding and tau against
total_tokens (and a few depth / top-k variants), the tuned "auto" shape and the paper's fixed
60/6/10, all interleaved per prompt in one process (eagle2.bench.run_bench).

    OMP_NUM_THREADS=2 python bench/e2e_sweep.py --prompts data/dev_prompts.jsonl \\
        --per-category 2 --max-new-tokens 64 --out bench/results/sweep

writes bench/results/sweep.json (header: machine, date, versions, command; rows; summary) and
bench/results/sweep.png. The total_tokens series run for each --families depth/top-k pair
("auto": the pair the tuned shape uses; default: that and the paper's 6/10).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from eagle2 import bench
from eagle2.prompts import load_items

PAPER = (60, 6, 10)


def shapes_to_sweep(auto, families, sizes, variants) -> list[tuple[int, int, int]]:
    """The total_tokens series of each (depth, branching) family, the depth/branching variants at the
    auto shape's total_tokens (at least 8), the auto shape itself and the paper's; no
    duplicates, order kept."""
    out = [(m, d, k) for d, k in families for m in sizes if m <= 1 + k + (d - 1) * k * k]
    m = max(auto[0], 8)  # a useless draft tunes to m = 1, where every variant is the same
    out += [(min(m, 1 + vk + (vd - 1) * vk * vk), vd, vk) for vd, vk in variants]
    out += [tuple(auto), PAPER]
    return list(dict.fromkeys(out))


def plot(summary: dict, shapes: dict, families, auto_label: str, path: Path, title: str) -> None:
    """Speedup over vanilla and tau against total_tokens: each family as a line, the variants,
    auto and the paper's setting as labelled points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    stats = summary["all"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, ylabel in ((axes[0], "speedup_vs_vanilla", "speedup over vanilla (tokens/s ratio)"),
                            (axes[1], "tau", "tau (tokens per target forward)")):
        for family in families:
            line = sorted((shapes[lab][0], stats[lab][key]) for lab in shapes if tuple(shapes[lab][1:]) == family)
            ax.plot(*zip(*line), "o-", label=f"depth {family[0]}, top-k {family[1]}")
        for lab, (m, d, k) in shapes.items():
            if lab == auto_label:
                ax.plot(m, stats[lab][key], "*", ms=16, color="tab:green", label=f"auto ({m}/{d}/{k})")
            elif (m, d, k) == PAPER:
                ax.plot(m, stats[lab][key], "s", ms=9, color="tab:red", label="paper 60/6/10")
            elif (d, k) not in families:
                ax.plot(m, stats[lab][key], "^", color="tab:gray")
                ax.annotate(f"d{d} k{k}", (m, stats[lab][key]), textcoords="offset points", xytext=(4, 4), fontsize=7)
        if key == "speedup_vs_vanilla":
            ax.axhline(1.0, color="black", lw=0.8, ls=":")
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_xlabel("total_tokens m (tree nodes, root included)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", required=True, metavar="FILE.jsonl")
    p.add_argument("--per-category", type=int, default=2, metavar="N")
    p.add_argument("--limit", type=int, metavar="N")
    p.add_argument("--max-new-tokens", type=int, default=64, metavar="N")
    p.add_argument("--temperature", type=float, default=0.0, metavar="T")
    p.add_argument("--sizes", default="2,4,8,16,32", help="total_tokens of the series")
    p.add_argument("--families", default="auto,6/10", metavar="D/K,...", help="depth/top-k of the series")
    p.add_argument("--variants", default="2/2,3/4,6/2,8/4", help="D/K shapes evaluated at auto's total_tokens (at least 8)")
    p.add_argument("--extra", default="10/4/4", help="more M/D/K shapes (default: the Generator's former fixed default)")
    p.add_argument("--retune", action="store_true", help="re-measure the auto cost model")
    p.add_argument("--target", metavar="PATH", help="local HF checkpoint (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--draft", metavar="PATH", help="EAGLE-1/2 head folder (default: the shipped head)")
    p.add_argument("--out", default="bench/results/sweep", help="writes OUT.json and OUT.png")
    args = p.parse_args(argv)

    import eagle2
    from eagle2.autotune import forget, tuned_shape

    pair = lambda s: tuple(int(x) for x in s.split("/"))  # noqa: E731
    gen = eagle2.load(args.target, args.draft)
    if args.retune:
        forget(gen)
    env = bench.environment(gen)
    auto = tuned_shape(gen, args.temperature)
    auto = (auto.total_tokens, auto.depth, auto.branching)
    families = list(dict.fromkeys(auto[1:] if f == "auto" else pair(f) for f in args.families.split(",")))
    shapes = shapes_to_sweep(auto, families, [int(x) for x in args.sizes.split(",")],
                             [pair(v) for v in args.variants.split(",") if v])
    shapes += [pair(s) for s in args.extra.split(",") if s and pair(s) not in shapes]
    labels = ["vanilla", "eagle2@auto"] + [f"eagle2@{m}/{d}/{k}" for m, d, k in shapes if (m, d, k) != auto]
    methods = bench.parse_methods(",".join(labels))
    items = load_items(args.prompts, args.limit, args.per_category)
    print(f"[sweep] {len(items)} prompts x {len(methods)} methods; auto = {auto}", file=sys.stderr, flush=True)
    res = bench.run_bench(gen, items, methods, max_new_tokens=args.max_new_tokens, temperature=args.temperature)
    env["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    print(bench.format_table({"all": res["summary"]["all"]}))

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    header = {**env, "command": " ".join(["python", *sys.argv]), "auto": list(auto), "families": families,
              "settings": {k: v for k, v in vars(args).items() if k != "retune"}, "shapes": res["shapes"]}
    out.with_suffix(".json").write_text(json.dumps({"header": header, "summary": res["summary"], "rows": res["rows"]},
                                                   indent=1) + "\n")
    title = (f"{env['target'].split('/')[-1]} + EAGLE-2 head, {env['machine']['cpu']}, "
             f"{env['machine']['torch_threads']} threads, {len(items)} dev prompts x {args.max_new_tokens} tokens, "
             f"T={args.temperature:g}, {env['date'][:10]}")
    plot(res["summary"], res["shapes"], families, "eagle2@auto", out.with_suffix(".png"), title)
    print(f"[sweep] wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
