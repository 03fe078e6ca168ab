"""Self-distillation data for draft-head training (`eagle2 train-data`).

The target answers training prompts in its own chat template; a draft head trained on the
target's own answers learns the distribution it will have to predict at decode time. Each shard
(`shard-NNNNN.safetensors`, a fixed slice of a seeded prompt order) holds the token ids of its
conversations concatenated, their offsets and a loss mask that is 1 on the assistant's tokens
only. Mode "text" instead stores the prompt itself as plain text, all of it trained on: the
target's features still supply the targets, and text costs no generation (cheap extra data).
Shards are written atomically, so an interrupted run resumes by skipping the shards that exist;
`meta.json` records the settings and a resumed run must use the same ones.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from eagle2.generate import Sampling, hf_generate
from eagle2.model import chat_prompt_ids, eos_ids, load_target
from eagle2.prompts import read_records

MODES = ("greedy", "sample", "text")
# Prompts are shuffled, then sorted by source and length inside windows of this many batches:
# batches of similar prompts waste less padding and finish together, yet every stretch of the
# order still mixes sources.
_SORT_WINDOW_BATCHES = 8


@dataclass
class Conversation:
    """One tokenised conversation: prompt (chat template) + the target's answer."""

    input_ids: torch.Tensor  # int64 [n]
    loss_mask: torch.Tensor  # bool [n], True on the answer's tokens


def read_prompts(paths: list[Path], sources: list[str] | None = None) -> list[dict]:
    """Records of JSONL prompt files (fields id, source, prompt), optionally only some sources."""
    records = [r for path in paths for r in read_records(path)]
    if sources:
        unknown = set(sources) - {r.get("source") for r in records}
        if unknown:
            raise ValueError(f"no prompts with source {sorted(unknown)} in {[str(p) for p in paths]}")
        records = [r for r in records if r.get("source") in sources]
    if not records:
        raise ValueError(f"no prompts in {[str(p) for p in paths]}")
    return records


def prompt_order(records: list[dict], seed: int, batch_size: int) -> list[dict]:
    """The seeded processing order (independent of --limit, so a longer run reuses shards)."""
    order = list(records)
    random.Random(seed).shuffle(order)
    window = batch_size * _SORT_WINDOW_BATCHES
    for i in range(0, len(order), window):
        order[i:i + window] = sorted(order[i:i + window],
                                     key=lambda r: (r.get("source", ""), len(r["prompt"])))
    return order


@torch.no_grad()
def generate_answers(model, tokenizer, prompts: list[list[int]], max_new_tokens: int,
                     mode: str, temperature: float = 1.0, top_p: float = 1.0) -> list[list[int]]:
    """The target's answers to a batch of tokenised prompts (transformers' `generate`), each
    cut after its first stop token (the target's EOS ids)."""
    stop = eos_ids(model, tokenizer)
    if not stop:
        raise ValueError("the target defines no EOS token: cannot tell where an answer ends")
    sampling = Sampling(temperature, top_p) if mode == "sample" else Sampling()
    rows = hf_generate(model, prompts, max_new_tokens, sampling=sampling, eos_ids=frozenset(stop),
                       pad_id=tokenizer.pad_token_id)
    return [r.tokens for r in rows]


def save_shard(path: Path, conversations: list[Conversation], meta: dict) -> None:
    """Write one shard atomically (a temporary file renamed into place)."""
    lengths = torch.tensor([len(c.input_ids) for c in conversations])
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    tensors = {
        "input_ids": torch.cat([c.input_ids for c in conversations]).to(torch.int32),
        "loss_mask": torch.cat([c.loss_mask for c in conversations]).to(torch.uint8),
        "offsets": offsets,
    }
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"eagle2": json.dumps(meta)})
    os.replace(tmp, path)


def shard_paths(data_dir: str | Path) -> list[Path]:
    """The shards of a `train-data` output folder, in order."""
    paths = sorted(Path(data_dir).glob("shard-*.safetensors"))
    if not paths:
        raise FileNotFoundError(f"no shard-*.safetensors in {str(data_dir)!r} (run `eagle2 train-data`)")
    return paths


def read_shard(path: Path) -> list[Conversation]:
    """The conversations of one shard."""
    t = load_file(str(path))
    offsets = t["offsets"].tolist()
    return [Conversation(t["input_ids"][a:b].long(), t["loss_mask"][a:b].bool())
            for a, b in zip(offsets[:-1], offsets[1:])]


def load_shards(data_dir: str | Path) -> list[Conversation]:
    """All conversations of a `train-data` output folder, in shard order."""
    return [c for path in shard_paths(data_dir) for c in read_shard(path)]


def _check_meta(out: Path, meta: dict) -> None:
    """Record the run's settings, or refuse to resume a folder made with other settings."""
    path = out / "meta.json"
    if path.exists():
        old = json.loads(path.read_text())
        diff = {k: (old.get(k), v) for k, v in meta.items() if old.get(k) != v}
        if diff:
            raise ValueError(f"{out} holds shards made with other settings {diff} "
                             "(old, new): use another --out or the same settings")
    else:
        path.write_text(json.dumps(meta, indent=1) + "\n")


def fmt_seconds(seconds: float) -> str:
    """h:mm:ss, for progress lines."""
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def build_dataset(args: argparse.Namespace) -> None:
    """`eagle2 train-data`: generate the target's answers shard by shard (see module doc)."""
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or set(modes) - set(MODES):
        raise ValueError(f"--modes must be a comma list of {MODES}, got {args.modes!r}")
    paths = [Path(p) for p in args.prompts]
    sources = args.sources.split(",") if args.sources else None
    order = prompt_order(read_prompts(paths, sources), args.seed, args.batch_size)
    n_shards = -(-min(args.limit or len(order), len(order)) // args.shard_size)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _check_meta(out, {
        "prompts": [str(p.resolve()) for p in paths], "sources": sources, "seed": args.seed,
        "batch_size": args.batch_size, "shard_size": args.shard_size, "modes": modes,
        "max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p,
        "target": args.target, "dtype": args.dtype,
    })
    todo = [i for i in range(n_shards) if not (out / f"shard-{i:05d}.safetensors").exists()]
    print(f"[train-data] {len(order)} prompts, {n_shards} shards of {args.shard_size}: "
          f"{n_shards - len(todo)} done, {len(todo)} to do -> {out}", file=sys.stderr, flush=True)
    if not todo:
        return
    model, tokenizer = load_target(args.target, dtype=getattr(torch, args.dtype))
    start, new_tokens, prompts_done = time.time(), 0, 0
    for shard_no, i in enumerate(todo):
        elapsed = time.time() - start
        if args.max_minutes and shard_no and elapsed / shard_no * (shard_no + 1) > args.max_minutes * 60:
            print(f"[train-data] stopping: the next shard would pass --max-minutes {args.max_minutes}",
                  file=sys.stderr, flush=True)
            break
        records = order[i * args.shard_size:(i + 1) * args.shard_size]
        torch.manual_seed(args.seed * 1_000_003 + i)  # resumed shards sample the same way
        conversations = []
        for b in range(0, len(records), args.batch_size):
            batch = records[b:b + args.batch_size]
            prompts = [chat_prompt_ids(tokenizer, r["prompt"]) for r in batch]
            for mode in modes:
                if mode == "text":
                    for r in batch:
                        ids = tokenizer(r["prompt"]).input_ids
                        conversations.append(Conversation(torch.tensor(ids), torch.ones(len(ids), dtype=torch.bool)))
                        new_tokens += len(ids)
                    continue
                answers = generate_answers(model, tokenizer, prompts, args.max_new_tokens, mode,
                                           args.temperature, args.top_p)
                for p, a in zip(prompts, answers):
                    conversations.append(Conversation(torch.tensor(p + a),
                                                      torch.tensor([False] * len(p) + [True] * len(a))))
                    new_tokens += len(a)
            prompts_done += len(prompts)
            rate = prompts_done / (time.time() - start)
            remaining = sum(len(order[j * args.shard_size:(j + 1) * args.shard_size]) for j in todo[shard_no:])
            remaining -= b + len(prompts)
            print(f"[train-data] shard {i + 1}/{n_shards}  prompts {prompts_done}  answer tokens "
                  f"{new_tokens} ({new_tokens / (time.time() - start):.1f}/s)  ETA {fmt_seconds(remaining / rate)}",
                  file=sys.stderr, flush=True)
        save_shard(out / f"shard-{i:05d}.safetensors", conversations,
                   {"ids": [r.get("id") for r in records], "modes": modes})
