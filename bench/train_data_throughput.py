"""Self-distillation throughput: answer tokens per second of `eagle2 train-data --mode greedy`'s
batched generation (transformers' `generate` on the chat-templated prompts, as eagle2.data runs
it) on the default target, per batch size and dtype.

    python bench/train_data_throughput.py [--batches 1,16,64] [--dtypes float32,bfloat16]
        [--max-new-tokens 64] [--json OUT]

Batch size b answers the first max(b, 8) prompts of data/train_prompts.jsonl in train-data's own
order for that batch size (seed 0: shuffled, then sorted by source and length within windows,
so a batch pads little), b at a time; tokens/s = answer tokens (EOS included) / wall seconds of
the generate calls.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import eagle2
from eagle2.bench import environment
from eagle2.data import read_sources, record_order
from eagle2.generate import hf_generate
from eagle2.model import eos_ids


def throughput(gen, prompts: list[list[int]], batch: int, max_new_tokens: int) -> dict:
    """Answer tokens per second generating `prompts`, `batch` at a time."""
    stop = frozenset(eos_ids(gen.model, gen.tokenizer))
    tokens, start = 0, time.perf_counter()
    for i in range(0, len(prompts), batch):
        rows = hf_generate(gen.model, prompts[i:i + batch], max_new_tokens, eos_ids=stop, pad_id=gen.tokenizer.pad_token_id)
        tokens += sum(len(r.tokens) for r in rows)
    seconds = time.perf_counter() - start
    return {"batch": batch, "prompts": len(prompts), "answer_tokens": tokens, "seconds": round(seconds, 2),
            "tokens_per_s": round(tokens / seconds, 1)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", default="1,16,64")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    root = Path(__file__).resolve().parents[1]
    records = read_sources([root / "data" / "train_prompts.jsonl"], [])
    rows, header = [], None
    for dtype in args.dtypes.split(","):
        gen = eagle2.load(dtype=dtype, draft=None)
        header = header or environment(gen)
        for b in batches:
            prompts = [gen.encode(r["turns"][0]["content"]) for r in record_order(records, 0, b)[:max(b, 8)]]
            row = {"dtype": dtype, **throughput(gen, prompts, b, args.max_new_tokens)}
            rows.append(row)
            print(f"[throughput] {dtype} batch {b}: {row['tokens_per_s']} answer tokens/s "
                  f"({row['answer_tokens']} tokens, {row['seconds']} s)", file=sys.stderr, flush=True)
    print("| dtype | batch | answer tokens/s |\n| --- | ---: | ---: |")
    for r in rows:
        print(f"| {r['dtype']} | {r['batch']} | {r['tokens_per_s']} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"header": {**header, "command": " ".join(["python", *sys.argv])},
                                               "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
