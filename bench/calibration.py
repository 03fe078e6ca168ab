"""Is the draft head calibrated? EAGLE-2's central claim: a draft node's confidence (the product of
its path's draft probabilities, exp of its cumulative score) approximates the rate at which the
target accepts it, which is what lets the dynamic tree keep the nodes most likely to be accepted.

    python bench/calibration.py [--draft HEAD] [--per-category 10] [--shape 60/6/10] \\
        [--max-new-tokens 128] [--temperature 0] --out bench/results/calibration

Generates the first --per-category prompts of each source of --prompts with EAGLE-2 at --shape
and records every drafted candidate of every step (eagle2.autotune.capture_steps: a candidate
counts as accepted when its path from the root spells what was committed, i.e. what the verify of
any tree holding it accepts). Writes OUT.json and OUT.png:
  reliability  per confidence bin: candidates, mean confidence, observed acceptance rate; and the
               expected calibration error (ECE, the count-weighted |confidence - rate|)
  per_depth    for depth 1..D: the acceptance rate of all candidates at that depth, and, for the
               m-node tree the shape keeps, how often the accepted path reaches depth d given it
               reached d - 1 (the per-position acceptance the EAGLE papers report)
  tau          mean tokens per step of that tree (accepted drafts + the bonus)
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import numpy as np
import torch

import eagle2
from eagle2.autotune import capture_steps, replay_order
from eagle2.bench import environment
from eagle2.prompts import load_items
from eagle2.tree import TreeShape

EDGES = np.linspace(0.0, 1.0, 11)


def reliability(steps) -> dict:
    conf = np.exp(np.concatenate([s.scores for s in steps]))
    acc = np.concatenate([s.accepted for s in steps]).astype(float)
    idx = np.clip(np.searchsorted(EDGES, conf, side="right") - 1, 0, len(EDGES) - 2)
    bins = []
    for b in range(len(EDGES) - 1):
        sel = idx == b
        n = int(sel.sum())
        bins.append({"lo": float(EDGES[b]), "hi": float(EDGES[b + 1]), "nodes": n,
                     "confidence": float(conf[sel].mean()) if n else None, "acceptance": float(acc[sel].mean()) if n else None})
    ece = sum(b["nodes"] * abs(b["confidence"] - b["acceptance"]) for b in bins if b["nodes"]) / max(len(conf), 1)
    return {"bins": bins, "ece": round(float(ece), 4), "nodes": int(len(conf))}


def per_depth(steps, shape: TreeShape) -> tuple[list[dict], float]:
    """Per depth: candidate acceptance, and the kept tree's conditional path acceptance; tau."""
    reach = np.zeros(shape.depth + 1)  # steps whose accepted path in the kept tree reaches depth d
    rows, taus = [], []
    for s in steps:
        kept = replay_order(s, shape.depth, shape.branching)[: shape.total_tokens - 1]
        got = s.depth[kept][s.accepted[kept]]
        longest = int(got.max()) if len(got) else 0
        reach[: longest + 1] += 1
        taus.append(1 + longest)
    for d in range(1, shape.depth + 1):
        at_d = np.concatenate([s.accepted[s.depth == d] for s in steps])
        rows.append({"depth": d, "candidates": int(len(at_d)),
                     "candidate_acceptance": round(float(at_d.mean()), 4) if len(at_d) else None,
                     "path_acceptance": round(float(reach[d] / reach[d - 1]), 4) if reach[d - 1] else None})
    return rows, round(float(np.mean(taus)), 4)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.5))
    bins = [x for x in result["reliability"]["bins"] if x["nodes"]]
    a.plot([0, 1], [0, 1], "--", color="gray", label="perfectly calibrated")
    a.plot([x["confidence"] for x in bins], [x["acceptance"] for x in bins], "o-", label="draft head")
    for x in bins:
        a.annotate(str(x["nodes"]), (x["confidence"], x["acceptance"]), fontsize=7, xytext=(3, -10),
                   textcoords="offset points")
    a.set_xlabel("draft confidence exp(cumulative log-prob)")
    a.set_ylabel("observed acceptance rate")
    a.set_title(f"reliability (ECE {result['reliability']['ece']:.3f}, {result['reliability']['nodes']} nodes)")
    a.legend(loc="upper left")
    depths = result["per_depth"]
    xs = [r["depth"] for r in depths]
    b.bar([x - 0.2 for x in xs], [r["candidate_acceptance"] or 0 for r in depths], 0.4, label="any candidate at depth")
    b.bar([x + 0.2 for x in xs], [r["path_acceptance"] or 0 for r in depths], 0.4, label="path reaches depth | previous")
    b.set_xlabel("depth")
    b.set_ylabel("acceptance rate")
    b.set_ylim(0, 1)
    b.set_title(f"per depth, tree {result['settings']['shape']} (tau {result['tau']:.2f})")
    b.legend(loc="upper right")
    fig.suptitle(result["title"], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--draft", help="draft head folder (default: the shipped head)")
    p.add_argument("--prompts", default=str(Path(__file__).resolve().parents[1] / "data" / "dev_prompts.jsonl"))
    p.add_argument("--per-category", type=int, default=10)
    p.add_argument("--shape", default="60/6/10", help="tree shape M/D/K")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--out", required=True, help="output path without extension (.json and .png are written)")
    args = p.parse_args()
    shape = TreeShape(*map(int, args.shape.split("/")))
    items = load_items(args.prompts, per_category=args.per_category)
    gen = eagle2.load(draft=args.draft)
    steps = []
    for i, item in enumerate(items):
        steps += capture_steps(gen, [item["prompt"]], shape, args.temperature, args.max_new_tokens)
        print(f"[calibration] {i + 1}/{len(items)} prompts, {len(steps)} steps", file=sys.stderr, flush=True)
    depth_rows, tau = per_depth(steps, shape)
    result = {"title": f"{args.draft or 'shipped head'}: {len(items)} prompts of {Path(args.prompts).name}, "
                       f"{args.max_new_tokens} new tokens, temperature {args.temperature}",
              "header": {**environment(gen), "command": " ".join(["python", *sys.argv]),
                         "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")},
              "settings": {"shape": args.shape, "per_category": args.per_category, "prompts": args.prompts,
                           "max_new_tokens": args.max_new_tokens, "temperature": args.temperature},
              "steps": len(steps), "tau": tau, "per_depth": depth_rows, "reliability": reliability(steps)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    plot(result, out.with_suffix(".png"))
    print(json.dumps({k: result[k] for k in ("steps", "tau", "per_depth")}, indent=1))
    print(f"ECE {result['reliability']['ece']}; wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    with torch.inference_mode():
        sys.exit(main())
