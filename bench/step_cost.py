"""Where a decode step's time goes, on this machine, for one target + draft head.

    python bench/step_cost.py [--threads N] [--dtype float32|bfloat16] [--shape M/D/K] --json OUT

Measured in one process, each phase alone at a prefix of 256 tokens (median of --repeats,
phases interleaved round-robin so machine drift hits all alike):
  target(m)    the verify step over m tree tokens (a chain), for m in 1..64, split into the
               forward body (every decoder layer), the lm_head over the m nodes, tree_verify
               (greedy) and kv_compact; with our CPU linears (skinny_linear) and, for the
               comparison, with the BLAS (`target_blas_ms`)
  draft        catch-up (the draft over the 3 tokens a step typically commits), each depth of
               the tree growth of --shape (draft forward + its lm_head + frontier_expand), rerank
  loop         a real EAGLE-2 generation with --shape from a prompt of about PREFIX tokens: wall
               time per step (the prefill excluded: a 1-token generation's time subtracted), and
               what the phases above do not explain (Python, commit, cache bookkeeping)
  hf           transformers' own greedy `generate` per generated token on the same model: the
               baseline the decode loop must beat
  flops        the linear layers' work per token (decoder layers, lm_head; every nn.Linear,
               so for mixture-of-experts targets all experts), and the 15 extra tokens' linear
               work of a 16-token verify over its extra time (`marginal_gflop_per_s`: the body's
               extra time includes attention and norms; where a one-token forward waits on
               memory the extra arithmetic overlaps it and the figure can exceed the peak)
The JSON holds at least {"target_ms": {"1": ..., "16": ...}, "hf_token_ms": ..., "machine": ...}.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

import eagle2
import eagle2_kernels
from eagle2.attention import chain_bits, target_forward, target_logits
from eagle2.autotune import median_times
from eagle2.cache import KVCache
from eagle2.generate import hf_generate
from eagle2.linear import blas_linears, skinny_twin
from eagle2.tree import TreeShape, expand, rerank

SIZES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
PREFIX = 256
PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
# The loop's prompt: PROMPT after a passage that brings it to about PREFIX tokens, so that its
# steps attend over as many keys as the phases timed alone.
PASSAGE = ("The lighthouse stood on a rock a mile from the coast, and for forty years its lamp had turned every "
           "night from dusk to dawn. Ships passing the headland watched for its beam, counted the seconds between "
           "the flashes and knew where they were. The keeper lived in the small house at its foot, climbed the "
           "hundred and twelve steps twice a night to trim the wick and wind the clockwork, and wrote the weather, "
           "the ships and the hours of the lamp in a log that the harbour master read once a month. ")


def medians(fns: dict, repeats: int) -> dict:
    """Median milliseconds per zero-argument callable (eagle2.autotune.median_times: round-robin,
    rotated, after a warm-up)."""
    return {k: round(1e3 * v, 3) for k, v in median_times(fns, repeats).items()}


@torch.inference_mode()
def target_phases(gen, sizes, repeats: int) -> dict:
    """{m: {body, lm_head, tree_verify, kv_compact}} in ms for a chain of m tree tokens."""
    model = skinny_twin(gen.model)  # as the decode loop runs it
    lm_head = model.get_output_embeddings()
    dev, dtype = lm_head.weight.device, lm_head.weight.dtype
    g = torch.Generator().manual_seed(0)
    ids = lambda n: torch.randint(lm_head.weight.shape[0], (1, n), generator=g).to(dev)  # noqa: E731
    plen = torch.tensor([PREFIX], dtype=torch.int32, device=dev)
    cache = KVCache.for_model(model.config, 1, PREFIX + max(sizes) + 1, dtype, dev)
    target_forward(model, ids(PREFIX), torch.arange(PREFIX, device=dev)[None], cache, chain_bits(PREFIX, 1, dev), cache.lengths)
    cache.extend(plen)
    fns, state = {}, {}
    for m in sizes:  # every call writes past the prefix without extending it: each sees the same cache
        toks, pos, bits = ids(m), PREFIX + torch.arange(m, device=dev)[None], chain_bits(m, 1, dev)
        parents = torch.arange(-1, m - 1, dtype=torch.int32, device=dev)[None]
        feats = target_forward(model, toks, pos, cache, bits, plen)
        logits = target_logits(model, feats)
        res = eagle2_kernels.tree_verify(toks.int(), parents, logits, max_depth=m - 1)
        state[m] = (feats, logits, res)
        fns[(m, "body")] = lambda toks=toks, pos=pos, bits=bits: target_forward(model, toks, pos, cache, bits, plen)
        fns[(m, "lm_head")] = lambda m=m: target_logits(model, state[m][0])
        fns[(m, "tree_verify")] = lambda m=m, toks=toks, parents=parents: eagle2_kernels.tree_verify(
            toks.int(), parents, state[m][1], max_depth=m - 1)
        fns[(m, "kv_compact")] = lambda m=m: eagle2_kernels.kv_compact(cache.data, plen, state[m][2].accepted,
                                                                       state[m][2].accept_len)
    got = medians(fns, repeats)
    return {m: {part: got[(m, part)] for part in ("body", "lm_head", "tree_verify", "kv_compact")} for m in sizes}


@torch.inference_mode()
def draft_phases(gen, shape: TreeShape, repeats: int) -> dict:
    """Catch-up, each growth depth (cumulative growth times differenced) and rerank, in ms."""
    model, head = gen.model, skinny_twin(gen.head)
    dev, dtype = model.get_output_embeddings().weight.device, model.get_output_embeddings().weight.dtype
    g = torch.Generator().manual_seed(1)
    V = model.get_output_embeddings().weight.shape[0]
    ids = lambda n: torch.randint(V, (1, n), generator=g).to(dev)  # noqa: E731
    plen = torch.tensor([PREFIX], dtype=torch.int32, device=dev)
    feats = torch.randn(1, PREFIX, model.config.hidden_size, generator=g).to(dev, dtype)
    cache = KVCache.for_model(head.config, 1, PREFIX + shape.depth * shape.branching + 8, head.dtype, dev)
    with torch.inference_mode():
        hidden = head(feats, ids(PREFIX), torch.arange(1, PREFIX + 1, device=dev)[None], cache=cache,
                      mask_bits=chain_bits(PREFIX, 1, dev), prefix_len=cache.lengths)
        cache.extend(plen)
        root_hidden, root = hidden[:, -1], ids(1)[:, 0].int()
        cands = expand(head, cache, root_hidden, plen, shape.depth, shape.branching)
        m = min(shape.total_tokens, 1 + shape.candidates())
        fns = {"catch_up": lambda: head(feats[:, -3:], ids(3), PREFIX + 1 + torch.arange(3, device=dev)[None],
                                        cache=cache, mask_bits=chain_bits(3, 1, dev), prefix_len=cache.lengths),
               "rerank": lambda: rerank(cands, root, plen, m, shape.depth)}
        for d in range(1, shape.depth + 1):
            fns[f"grow_{d}"] = lambda d=d: expand(head, cache, root_hidden, plen, d, shape.branching)
        got = medians(fns, repeats)
    depths = {str(d): round(got[f"grow_{d}"] - (got[f"grow_{d - 1}"] if d > 1 else 0.0), 3) for d in range(1, shape.depth + 1)}
    return {"catch_up": got["catch_up"], "depth": depths, "growth": got[f"grow_{shape.depth}"], "rerank": got["rerank"]}


def linear_mflop(model) -> dict:
    """MFLOP per token of the target's linear layers (2 x in x out each): decoder layers, lm_head."""
    lm_head = model.get_output_embeddings()
    body = sum(2 * m.in_features * m.out_features for m in model.modules()
               if isinstance(m, torch.nn.Linear) and m is not lm_head)
    return {"body": round(body / 1e6, 2), "lm_head": round(2 * lm_head.in_features * lm_head.out_features / 1e6, 2)}


def loop_step(gen, shape: TreeShape, new_tokens: int) -> dict:
    """A real generation: ms per step without the prefill, and tau. The prompt is PASSAGE,
    repeated up to about PREFIX tokens, then PROMPT; the generation's time minus a 1-token
    generation's (the prefill and the first token: no step), interleaved, the second of each
    kept."""
    unit = len(gen.encode(PASSAGE))
    prompt = PASSAGE * max(1, round((PREFIX - len(gen.encode(PROMPT))) / unit)) + PROMPT
    kw = dict(total_tokens=shape.total_tokens, depth=shape.depth, branching=shape.branching)
    gen.generate(prompt, max_new_tokens=8, **kw)  # warm-up
    runs = {}
    for n in (1, new_tokens, 1, new_tokens):
        [runs[n]] = gen.generate(prompt, max_new_tokens=n, **kw)
    r = runs[new_tokens]
    steps = r.target_forwards - 1
    return {"ms_per_step": round(1e3 * (r.seconds - runs[1].seconds) / max(steps, 1), 3), "tau": round(r.tau, 3),
            "steps": steps, "tokens": r.new_tokens, "prompt_tokens": len(gen.encode(prompt)),
            "prefill_ms": round(1e3 * runs[1].seconds, 3)}


def hf_token_ms(gen, new_tokens: int) -> float:
    """transformers' greedy generate: (time for 1 + new_tokens tokens - time for 1) / new_tokens."""
    ids = [gen.encode(PROMPT)]
    runs = {}
    for n in (1, 1 + new_tokens, 1, 1 + new_tokens):  # interleaved, the second of each kept
        t = time.perf_counter()
        [r] = hf_generate(gen.model, ids, n, eos_ids=frozenset())  # no EOS: exactly n tokens
        runs[n] = time.perf_counter() - t
        assert len(r.tokens) == n
    return round(1e3 * (runs[1 + new_tokens] - runs[1]) / new_tokens, 3)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, help="torch threads (default: torch's default)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--draft-dtype", choices=["float32", "bfloat16", "float16"], help="the draft head's (default: eagle2.load's)")
    p.add_argument("--target", help="target checkpoint folder (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--draft", help="draft head folder (default: the shipped head)")
    p.add_argument("--shape", default="16/4/6", help="tree shape M/D/K for the draft phases and the loop")
    p.add_argument("--sizes", default=",".join(map(str, SIZES)), help="tree sizes m of the target curve")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--new-tokens", type=int, default=48, help="tokens of the loop and hf measurements")
    p.add_argument("--no-blas", action="store_true", help="skip the BLAS comparison curve")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    if args.new_tokens < 2:
        p.error(f"--new-tokens: expected an int >= 2 (the loop subtracts a 1-token generation), got {args.new_tokens}")
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = TreeShape(*map(int, args.shape.split("/")))
    sizes = [int(s) for s in args.sizes.split(",")]
    gen = eagle2.load(args.target, args.draft, dtype=getattr(torch, args.dtype), draft_dtype=args.draft_dtype)
    if gen.head is None:
        p.error("--draft: the draft phases need a head (another target has no shipped one)")
    start = time.time()
    out = {"machine": eagle2_kernels.device_name("cpu"), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
           "dtype": args.dtype, "draft_dtype": str(gen.head.dtype).removeprefix("torch."), "prefix": PREFIX,
           "shape": args.shape, "torch": torch.__version__,
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "loadavg_start": [round(x, 2) for x in os.getloadavg()], "command": " ".join(["python", *sys.argv])}
    parts = target_phases(gen, sizes, args.repeats)
    out["target_parts_ms"] = {str(m): v for m, v in parts.items()}
    out["target_ms"] = {str(m): round(sum(v.values()), 3) for m, v in parts.items()}
    out["linear_mflop_per_token"] = flop = linear_mflop(gen.model)
    if 1 in parts and 16 in parts:  # MFLOP per ms = GFLOP/s; None where noise left no extra time
        extra = {k: parts[16][k] - parts[1][k] for k in flop}
        out["marginal_gflop_per_s"] = {k: round(15 * flop[k] / extra[k], 1) if extra[k] > 0 else None for k in flop}
    if not args.no_blas:
        with blas_linears():
            blas = target_phases(gen, sizes, args.repeats)
        out["target_blas_ms"] = {str(m): round(sum(v.values()), 3) for m, v in blas.items()}
    out["draft_ms"] = draft_phases(gen, shape, args.repeats)
    out["loop"] = loop_step(gen, shape, args.new_tokens)
    m = min(shape.total_tokens, 1 + shape.candidates())
    t_m = float(np.interp(m, sizes, [out["target_ms"][str(s)] for s in sizes]))
    explained = out["draft_ms"]["catch_up"] + out["draft_ms"]["growth"] + out["draft_ms"]["rerank"] + t_m
    out["loop"]["unexplained_ms"] = round(out["loop"]["ms_per_step"] - explained, 3)
    out["hf_token_ms"] = hf_token_ms(gen, args.new_tokens)
    t = out["target_ms"]
    out["ratios"] = {"target16_over_target1": round(t["16"] / t["1"], 3) if "16" in t and "1" in t else None,
                     "target1_over_hf_token": round(t["1"] / out["hf_token_ms"], 3) if "1" in t else None}
    out["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    out["seconds"] = round(time.time() - start, 1)
    print(json.dumps(out, indent=1))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
