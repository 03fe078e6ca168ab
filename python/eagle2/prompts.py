"""JSONL prompt files: one JSON object per line with a string `prompt` (plus optional `id`,
`source`, `category`), as in data/dev_prompts.jsonl and data/train_prompts.jsonl."""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path


def read_records(path: str | Path) -> list[dict]:
    """Every record of a JSONL prompt file; a line that is not an object with a string
    'prompt' is a ValueError naming the file and line."""
    path = Path(path)
    if path.is_dir():
        raise FileNotFoundError(f"prompt file {str(path)!r} is a folder, not a JSONL file")
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {str(path)!r} does not exist")
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not JSON ({e})") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str):
                raise ValueError(f"{path}:{lineno}: expected an object with a string 'prompt' field")
            records.append({"id": str(rec.get("id", lineno)), **{k: v for k, v in rec.items() if k != "id"}})
    return records


def load_items(path: str | Path, limit: int | None = None, per_category: int | None = None) -> list[dict]:
    """Prompts of a JSONL file as dicts {id, group, prompt}: group = `source` (else `category`,
    else "all"). per_category keeps the first N of each group, then limit the first N overall."""
    items, seen = [], defaultdict(int)
    for rec in read_records(path):
        group = str(rec.get("source") or rec.get("category") or "all")
        if per_category is not None and seen[group] >= per_category:
            continue
        seen[group] += 1
        items.append({"id": rec["id"], "group": group, "prompt": rec["prompt"]})
    return items[:limit]
