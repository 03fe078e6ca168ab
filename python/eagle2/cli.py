"""The `eagle2` command line.

    eagle2 generate "Write a haiku about the sea."
    eagle2 generate --prompts ../shared/data/dev_prompts.jsonl --limit 3 --json

Subcommands live in their modules: `generate` here, and any module eagle2.<name> among
EXTENSIONS that exists contributes its own by defining `add_cli(subparsers)`, which adds a
parser with `set_defaults(func=handler)`; handler(args) returns the exit status.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import sys

EXTENSIONS = ("train", "bench")
DTYPES = ("float32", "float16", "bfloat16", "float64")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `eagle2` script."""
    args = build_parser().parse_args(argv)
    return args.func(args) or 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="eagle2", description="EAGLE-2 speculative decoding for Hugging Face causal LMs")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_cli(sub)
    for name in EXTENSIONS:
        if importlib.util.find_spec(f"eagle2.{name}") is not None:
            importlib.import_module(f"eagle2.{name}").add_cli(sub)
    return parser


def add_cli(sub) -> None:
    """Register `generate`."""
    p = sub.add_parser("generate", help="generate text from a prompt or a JSONL file of prompts",
                       description="Generate with EAGLE-2 (default), plain decoding or transformers' generate. "
                                   "Prompts are wrapped in the target's chat template.")
    p.add_argument("prompt", nargs="?", help="the prompt text (or use --prompts)")
    p.add_argument("--prompts", metavar="FILE.jsonl", help="JSONL file; each line's 'prompt' field is one prompt")
    p.add_argument("--limit", type=int, metavar="N", help="only the first N prompts of --prompts")
    p.add_argument("--method", choices=("eagle2", "vanilla", "hf"), default="eagle2")
    p.add_argument("--max-new-tokens", type=int, default=128, metavar="N")
    p.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, metavar="P")
    p.add_argument("--top-k", type=int, default=0, metavar="K", help="0 = off")
    p.add_argument("--seed", type=int, metavar="S")
    p.add_argument("--total-tokens", type=tree_size, metavar="M|auto",
                   help="tree size m, root included; 'auto' = chosen from measured costs (eagle2.autotune)")
    p.add_argument("--depth", type=int, metavar="D", help="deepest draft level")
    p.add_argument("--topk", type=int, metavar="K", help="draft children per expanded node")
    p.add_argument("--target", metavar="PATH", help="local HF checkpoint folder (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--draft", metavar="PATH", help="EAGLE-1/2 draft head folder (default: the shipped head)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=DTYPES, default="float32")
    p.add_argument("--batch-size", type=int, default=1, metavar="B", help="prompts decoded together")
    p.add_argument("--json", action="store_true", help="one JSON object per prompt instead of streamed text")
    p.set_defaults(func=run_generate)


def tree_size(text: str):
    """--total-tokens: an int or 'auto'."""
    return text if text == "auto" else int(text)


def read_prompts(path: str, limit: int | None) -> list[tuple[str, str]]:
    """(id, prompt) pairs from a JSONL file with a 'prompt' field per line."""
    from .bench import load_items

    try:
        return [(item["id"], item["prompt"]) for item in load_items(path, limit)]
    except ValueError as e:
        raise SystemExit(f"eagle2: {e}")


def run_generate(args) -> int:
    if (args.prompt is None) == (args.prompts is None):
        raise SystemExit("eagle2 generate: give either a PROMPT or --prompts FILE.jsonl")
    if args.limit is not None and args.limit < 1:
        raise SystemExit("eagle2 generate: --limit must be >= 1")
    if args.batch_size < 1:
        raise SystemExit("eagle2 generate: --batch-size must be >= 1")
    items = [("0", args.prompt)] if args.prompt is not None else read_prompts(args.prompts, args.limit)

    import torch

    import eagle2

    try:
        gen = eagle2.load(args.target, args.draft, dtype=getattr(torch, args.dtype), device=args.device)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"eagle2 generate: {e}")
    opts = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                seed=args.seed, method=args.method, total_tokens=args.total_tokens, depth=args.depth, topk=args.topk)
    streaming = not args.json and args.batch_size == 1 and args.method != "hf"
    for start in range(0, len(items), args.batch_size):
        batch = items[start: start + args.batch_size]
        printer = _TextStream(gen.tokenizer) if streaming else None
        try:
            results = gen.generate([p for _, p in batch], stream=printer, **opts)
        except ValueError as e:
            raise SystemExit(f"eagle2 generate: {e}")
        for (pid, _), r in zip(batch, results):
            if args.json:
                print(json.dumps({"id": pid, "output_ids": r.tokens, "text": r.text, "new_tokens": r.new_tokens,
                                  "target_forwards": r.target_forwards, "tau": round(r.tau, 4),
                                  "seconds": round(r.seconds, 4)}), flush=True)
                continue
            if printer is None:
                print(r.text, end="")
            print(flush=True)
            print(f"[eagle2] {pid}: {r.new_tokens} tokens, {r.target_forwards} target forwards, tau {r.tau:.2f}, "
                  f"{r.seconds:.2f} s ({r.new_tokens / max(r.seconds, 1e-9):.1f} tokens/s)", file=sys.stderr, flush=True)
    return 0


class _TextStream:
    """Prints the decoded text of one row as its tokens are committed (holding back an
    incomplete multi-byte character)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.shown = tokenizer, [], 0

    def __call__(self, row: int, new_ids: list[int]) -> None:
        self.ids += new_ids
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return
        print(text[self.shown:], end="", flush=True)
        self.shown = len(text)


if __name__ == "__main__":
    sys.exit(main())
