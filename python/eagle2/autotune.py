"""Tree shape "auto": choose total_tokens, depth and branching from measured costs.

EAGLE-2's best tree depends on the hardware: on a GPU a 60-token verify costs about one
single-token forward, on a CPU it costs several (README.md, "Measured numbers"). So the shape is chosen to maximise
the expected committed tokens per second,

    rate(m, d, k) = E[accepted + 1 | m, d, k] / (catch_up + draft(d, k) + target(m))

with every term measured on this machine for this model:

target(m)   one verify step over m tree tokens at a realistic prefix (PREFIX): the target
            forward with tree attention, its lm_head over the m nodes, tree_verify. Measured
            for TREE_SIZES, linear in between (a monotone fit: more tokens never cost less).
draft(d, k) one tree growth of depth d and top-k k (the draft forwards, its lm_head over the
            head's vocabulary, frontier_expand, rerank; monotone fit in d); catch_up: the
            draft forward over the tokens committed by the previous step.
E[...]      1 + the sum over the tree's nodes of their acceptance probability. A few short
            calibration generations grow a large tree (CALIBRATION_SHAPE) at every step and
            record all candidates; a node counts as accepted when its path from the root
            equals the committed continuation (what the verify of any tree containing it
            would accept). The candidate sets of smaller shapes are replayed from the large
            tree (the same beam growth, limited to d levels and k children, reranked by
            score), so every (m, d, k) is evaluated on the same steps. Two estimates per
            shape: `scored`, each kept node's cumulative draft score exp(sum log p) mapped
            through a calibration of exp(score) against the outcomes (smooth, but blind to
            whatever the score does not rank well), and `observed`, the acceptance the
            replayed tree actually got (unbiased, noisy with few steps). E = their blend,
            the score estimate counting as PRIOR_STEPS steps.

The decode loop's ThreadGovernor runs a step on fewer threads while other processes keep cores
busy, and a tree tuned for all of them then costs more than it gains: `eagle2 tune` also measures
the costs at 1 thread, and steps on at most half the threads use that tree (`reduced_shape`).
Costs are cached per machine + model + dtype + threads, acceptance per model + head +
regime (greedy, or sampling at any temperature), as JSON under $EAGLE2_CACHE/autotune (default
~/.cache/eagle2/autotune); `forget(gen)` drops them (`eagle2 tune` and `--retune`: the costs and
the acceptance of the regime they tune). Measuring takes about a minute on a 2-core CPU, so it
runs only when asked (`eagle2 tune`, total_tokens "auto"); until then a Generator whose shape is
"auto" uses api.DEFAULT_SHAPE.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
import time
import weakref
from dataclasses import asdict, dataclass

import numpy as np
import torch

import eagle2_kernels

from .attention import chain_bits, target_logits
from .cache import KVCache
from .generate import forward_for_draft
from .linear import skinny_twin
from .tree import TreeShape, expand, rerank

TREE_SIZES = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64)
DEPTHS = tuple(range(1, 9))
BRANCHINGS = (1, 2, 4, 6, 8, 10)
# A busy machine shows as an inconsistent baseline: the one-token verify, timed first and last,
# differing by more than this fraction; the costs are then measured again (at most MAX_ROUNDS).
NOISE = 0.2
MAX_ROUNDS = 3
PREFIX = 256
CALIBRATION_SHAPE = TreeShape(total_tokens=16, depth=max(DEPTHS), branching=max(BRANCHINGS))
CALIBRATION_PROMPTS = (
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Write a Python function that returns the n-th Fibonacci number, with a docstring.",
    "A shop sells pencils at 3 for $1. How much do 18 pencils cost? Explain step by step.",
)
CALIBRATION_TOKENS = 64
PRIOR_STEPS = 20
# exp(score) bin edges of the calibration map (finer where draft confidences cluster).
BIN_EDGES = np.array([0.0, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0 + 1e-9])
FORMAT = 8  # bump when the cached measurements change meaning (3: skinny_linear verify costs; 4: on the skinny twin;
#            5: skinny_linear prefetches the next weight tile and threads one-row products; 6: tree_attention
#            splits a step's rows over the threads, skinny_linear's cheaper epilogue; 7: skinny_linear's
#            4-row tiles; 8: its non-temporal weight prefetch, the bfloat16 draft default)

_MEMO: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


@dataclass
class Costs:
    """Measured seconds: target[i] verifies sizes[i] tree tokens; draft["d,k"] grows a tree;
    catch_up feeds the draft one step's committed tokens."""

    sizes: list[int]
    target: list[float]
    draft: dict[str, float]
    catch_up: float

    def step_seconds(self, m: int, depth: int, branching: int) -> float:
        """Predicted wall time of one EAGLE-2 step (m = 1: the loop verifies the root alone)."""
        grow_s = self.draft[f"{depth},{branching}"] if m > 1 else 0.0
        return self.catch_up + grow_s + float(np.interp(m, self.sizes, self.target))


@dataclass
class Acceptance:
    """expected[f"d,k"][m - 1] = E[accepted + 1] per step for a tree of m nodes: the blend of
    scored (calibrated draft scores) and observed (counted on the calibration steps)."""

    expected: dict[str, list[float]]
    scored: dict[str, list[float]]
    observed: dict[str, list[float]]
    steps: int


def choose(costs: Costs, acceptance: Acceptance, max_m: int | None = None) -> tuple[TreeShape, list[dict]]:
    """The shape with the highest expected committed tokens per second, and every candidate
    [{m, depth, branching, tau, seconds, rate}] sorted best first. m is at most the largest measured
    tree size (or max_m) and the number of candidates the growth produces."""
    limit = min(max(costs.sizes), max_m or max(costs.sizes))
    rows = [{"m": 1, "depth": 1, "branching": 1, "tau": 1.0, "seconds": costs.step_seconds(1, 1, 1)}]
    for key, curve in acceptance.expected.items():
        if key not in costs.draft:
            continue
        d, k = map(int, key.split(","))
        top = min(limit, len(curve), 1 + TreeShape(1, d, k).candidates())
        for m in range(2, top + 1):
            rows.append({"m": m, "depth": d, "branching": k, "tau": curve[m - 1], "seconds": costs.step_seconds(m, d, k)})
    for r in rows:
        r["rate"] = r["tau"] / r["seconds"]
    # Prefer the cheaper shape among (near-)equal rates: smaller trees are less sensitive to noise.
    rows.sort(key=lambda r: (-round(r["rate"], 6), r["m"], r["depth"], r["branching"]))
    best = rows[0]
    return TreeShape(best["m"], best["depth"], best["branching"]), rows


# ---- acceptance ------------------------------------------------------------------------------
def calibration_map(scores: np.ndarray, accepted: np.ndarray) -> np.ndarray:
    """Acceptance rate per BIN_EDGES bin of exp(score): the observed rate, shrunk toward the
    bin's mean draft probability when few nodes fall in it, then made non-decreasing by a
    weighted isotonic fit (so a sparse bin cannot lift the bins above it)."""
    p = np.exp(scores)
    idx = np.clip(np.searchsorted(BIN_EDGES, p, side="right") - 1, 0, len(BIN_EDGES) - 2)
    n = np.bincount(idx, minlength=len(BIN_EDGES) - 1).astype(float)
    hits = np.bincount(idx, weights=accepted.astype(float), minlength=len(BIN_EDGES) - 1)
    mean_p = np.where(n > 0, np.bincount(idx, weights=p, minlength=len(BIN_EDGES) - 1) / np.maximum(n, 1),
                      (BIN_EDGES[:-1] + BIN_EDGES[1:]) / 2)
    prior = 2.0
    # An empty bin gets its mid-point but (almost) no weight: it must not drag its neighbours.
    return _isotonic((hits + prior * mean_p) / (n + prior), n + np.where(n > 0, prior, 1e-9))


def _isotonic(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Weighted least-squares non-decreasing fit (pool adjacent violators)."""
    blocks = []  # [mean, weight, count]
    for v, w in zip(values, weights):
        blocks.append([float(v), float(w), 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            (v2, w2, c2), (v1, w1, c1) = blocks.pop(), blocks.pop()
            blocks.append([(v1 * w1 + v2 * w2) / (w1 + w2), w1 + w2, c1 + c2])
    return np.repeat([b[0] for b in blocks], [b[2] for b in blocks])


def apply_map(rates: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Calibrated acceptance probability of nodes with the given cumulative scores."""
    idx = np.clip(np.searchsorted(BIN_EDGES, np.exp(scores), side="right") - 1, 0, len(BIN_EDGES) - 2)
    return rates[idx]


@dataclass
class Step:
    """One captured growth: candidate scores, parents (-1 = the root), accepted flags and depths
    (1 = a child of the root)."""

    scores: np.ndarray
    parents: np.ndarray
    accepted: np.ndarray
    depth: np.ndarray | None = None


def label_step(scores, parents, tokens, continuation: list[int]) -> Step:
    """Mark a candidate accepted when its path from the root spells the committed continuation."""
    acc = np.zeros(len(scores), dtype=bool)
    depth = np.zeros(len(scores), dtype=int)
    for i, (p, t) in enumerate(zip(parents, tokens)):  # parents precede children
        depth[i] = 1 if p < 0 else depth[p] + 1
        ok = p < 0 or acc[p]
        acc[i] = ok and depth[i] <= len(continuation) and t == continuation[depth[i] - 1]
    return Step(np.asarray(scores, dtype=np.float64), np.asarray(parents), acc, depth)


def replay_order(step: Step, depth: int, branching: int) -> np.ndarray:
    """Candidate indices that a growth with (depth, branching) would produce, in rerank order, replayed
    from a larger captured growth. A frontier node that the large growth did not expand (rare:
    the smaller beam kept a node the larger one dropped) contributes no children."""
    s = step.scores
    children: dict[int, list[int]] = {}
    for i, p in enumerate(step.parents):
        children.setdefault(int(p), []).append(i)
    for c in children.values():
        c.sort(key=lambda i: (-s[i], i))
    frontier, picked, level = [-1], [], {}
    for d in range(1, depth + 1):
        new = [c for f in frontier for c in children.get(f, [])[:branching]]
        if not new:
            break
        picked += new
        level.update((c, d) for c in new)
        frontier = sorted(new, key=lambda i: (-s[i], i))[:branching]
    return np.array(sorted(picked, key=lambda i: (-s[i], level[i], i)), dtype=int)


def acceptance_curves(steps: list[Step], rates: np.ndarray, max_m: int) -> Acceptance:
    """E[accepted + 1] for m = 1..max_m nodes and every (depth, branching) in DEPTHS x BRANCHINGS."""
    expected, scored, observed = {}, {}, {}
    n = len(steps)
    for d in DEPTHS:
        for k in BRANCHINGS:
            e_sum, o_sum = np.zeros(max_m), np.zeros(max_m)
            for st in steps:
                order = replay_order(st, d, k)[: max_m - 1]
                e = np.concatenate([[1.0], 1.0 + np.cumsum(apply_map(rates, st.scores[order]))])
                o = np.concatenate([[1.0], 1.0 + np.cumsum(st.accepted[order])])
                e_sum += np.pad(e, (0, max_m - len(e)), mode="edge")  # fewer candidates: the tree stops growing
                o_sum += np.pad(o, (0, max_m - len(o)), mode="edge")
            key = f"{d},{k}"
            scored[key] = [round(float(x), 5) for x in e_sum / max(n, 1)]
            observed[key] = [round(float(x), 5) for x in o_sum / max(n, 1)]
            expected[key] = [round(float(x), 5) for x in (PRIOR_STEPS * e_sum / max(n, 1) + o_sum) / (PRIOR_STEPS + n)]
    return Acceptance(expected, scored, observed, n)


def capture_steps(gen, prompts, shape: TreeShape, temperature: float = 0.0,
                  max_new_tokens: int = CALIBRATION_TOKENS) -> list[Step]:
    """Generate each prompt (str or token ids) with `shape` and record every growth's candidates,
    labelled accepted or not against what was committed. Steps whose continuation is shorter
    than the shape's depth (the output's end) are kept only when the output ended with EOS."""
    from .generate import Decoder, Sampling, prefill, speculate, verify

    steps = []
    dec = Decoder(skinny_twin(gen.model), skinny_twin(gen.head), shape, None, Sampling(temperature), gen.eos_ids,
                  max_new_tokens)
    for i, prompt in enumerate(prompts):
        ids = gen.encode(prompt)
        drafted = []  # per step: the candidates and the root's position
        with torch.inference_mode():
            batch = prefill(dec, [ids], seed=i)
            while batch.rows:
                root_pos = int(batch.tcache.lengths[0])
                tree, cands = speculate(dec, batch)
                if cands is not None:
                    drafted.append((cands.scores[0].float().cpu().numpy(), cands.parents[0].cpu().numpy(),
                                    cands.tokens[0].cpu().numpy(), root_pos))
                verify(dec, batch, tree)
        row = batch.results[0]
        seq = ids + row.tokens
        for scores, parents, tokens, root_pos in drafted:
            cont = seq[root_pos + 1:]
            if len(cont) >= shape.depth or (row.tokens and row.tokens[-1] in gen.eos_ids):
                steps.append(label_step(scores, parents, tokens, cont))
    return steps


def measure_acceptance(gen, temperature: float = 0.0, prompts=None, max_new_tokens: int | None = None,
                       max_m: int | None = None) -> Acceptance:
    """Calibration generations with a large tree; acceptance curves for every candidate shape.
    prompts: str or token-id lists (default CALIBRATION_PROMPTS; random ids without a tokenizer)."""
    if prompts is None:
        g = torch.Generator().manual_seed(0)
        vocab = gen.model.get_output_embeddings().weight.shape[0]
        prompts = CALIBRATION_PROMPTS if gen.tokenizer is not None else \
            [torch.randint(vocab, (16,), generator=g).tolist() for _ in CALIBRATION_PROMPTS]
    steps = capture_steps(gen, prompts, CALIBRATION_SHAPE, temperature, max_new_tokens or CALIBRATION_TOKENS)
    if not steps:
        raise RuntimeError("autotune: the calibration generations produced no usable draft step")
    rates = calibration_map(np.concatenate([s.scores for s in steps]), np.concatenate([s.accepted for s in steps]))
    return acceptance_curves(steps, rates, max_m or max(TREE_SIZES))


# ---- costs -----------------------------------------------------------------------------------
def median_times(fns: dict, repeats: int) -> dict:
    """Median seconds per zero-arg callable, run round-robin (rotated) so drift hits all alike."""
    keys = list(fns)
    for k in keys:
        fns[k]()
    times = {k: [] for k in keys}
    for r in range(repeats):
        for k in keys[r % len(keys):] + keys[: r % len(keys)]:
            t = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t)
    return {k: float(np.median(v)) for k, v in times.items()}


def _progress(what: str, done: int, total: int, start: float) -> None:
    left = (time.perf_counter() - start) / max(done, 1) * (total - done)
    print(f"\r[eagle2] tuning: {what} {done}/{total} (about {left:.0f} s left)   ", end="" if done < total else "\n",
          file=sys.stderr, flush=True)


@torch.inference_mode()
def measure_costs(gen, sizes=None, depths=None, branchings=None, prefix: int | None = None, repeats: int = 7,
                  progress: bool = False) -> Costs:
    """Time the verify step per tree size and the draft growth per (depth, branching) at
    `prefix`. The one-token verify is timed again at the end: when the two disagree by more
    than NOISE (another job took the cores), everything is measured again, at most MAX_ROUNDS
    times, keeping the round whose baseline agreed best."""
    sizes, depths, branchings, prefix = sizes or TREE_SIZES, depths or DEPTHS, branchings or BRANCHINGS, prefix or PREFIX
    best = None
    for attempt in range(MAX_ROUNDS):
        costs, drift = _measure_costs_once(gen, sizes, depths, branchings, prefix, repeats, progress)
        if best is None or drift < best[1]:
            best = (costs, drift)
        if drift <= NOISE:
            break
        print(f"[eagle2] tuning: the one-token verify took {drift:.0%} longer or shorter at the end than at the start "
              "(a busy machine?); measuring again", file=sys.stderr, flush=True)
    return best[0]


def _measure_costs_once(gen, sizes, depths, branchings, prefix, repeats, progress) -> tuple[Costs, float]:
    model, head = skinny_twin(gen.model), skinny_twin(gen.head)  # as the decode loop runs them
    config = model.config
    lm_head = model.get_output_embeddings()
    param = next(model.parameters())
    dev, dtype = param.device, param.dtype
    V = lm_head.weight.shape[0]
    prefix = max(1, min(prefix, config.max_position_embeddings - max(sizes) - 2))
    g = torch.Generator().manual_seed(0)
    rand_ids = lambda n: torch.randint(V, (1, n), generator=g).to(dev)  # noqa: E731
    plen = torch.tensor([prefix], dtype=torch.int32, device=dev)

    tcache = KVCache.for_model(config, 1, prefix + max(sizes) + 1, dtype, dev)
    _, feats = forward_for_draft(model, head, rand_ids(prefix), torch.arange(prefix, device=dev)[None], tcache,
                                 chain_bits(prefix, 1, dev), tcache.lengths)
    tcache.extend(plen)

    def verify(n):  # writes past the prefix without extending it: every call sees the same cache
        toks = rand_ids(n)
        out, _ = forward_for_draft(model, head, toks, prefix + torch.arange(n, device=dev)[None], tcache,
                                   chain_bits(n, 1, dev), plen)
        parents = torch.arange(-1, n - 1, dtype=torch.int32, device=dev)[None]
        eagle2_kernels.tree_verify(toks.int(), parents, target_logits(model, out), max_depth=n - 1)

    start = time.perf_counter()
    baseline = median_times({1: lambda: verify(1)}, repeats)[1]
    target = median_times({n: (lambda n=n: verify(n)) for n in sizes}, repeats)
    if progress:
        _progress("verify costs", 1, 3, start)

    dcache = KVCache.for_model(head.config, 1, prefix + max(depths) * max(branchings) + 8, head.dtype, dev)
    pos = torch.arange(1, prefix + 1, device=dev)[None]
    hidden = head(feats, rand_ids(prefix), pos, cache=dcache, mask_bits=chain_bits(prefix, 1, dev), prefix_len=dcache.lengths)
    dcache.extend(plen)
    root_hidden = hidden[:, -1]

    def catch_up(n=3):  # a typical step commits a few tokens
        head(feats[:, -n:], rand_ids(n), prefix + 1 + torch.arange(n, device=dev)[None], cache=dcache,
             mask_bits=chain_bits(n, 1, dev), prefix_len=dcache.lengths)

    def growth(d, k):
        cands = expand(head, dcache, root_hidden, plen, d, k)
        rerank(cands, rand_ids(1)[:, 0].int(), plen, min(max(sizes), 1 + TreeShape(1, d, k).candidates()), d)

    fns = {"catch_up": catch_up, **{f"{d},{k}": (lambda d=d, k=k: growth(d, k)) for d in depths for k in branchings}}
    draft = median_times(fns, max(3, repeats - 2))
    if progress:
        _progress("draft costs", 2, 3, start)
    drift = abs(median_times({1: lambda: verify(1)}, repeats)[1] / baseline - 1)
    if progress:
        _progress("consistency check", 3, 3, start)
    # A bigger tree never costs less: a monotone fit removes the noise that would say otherwise.
    for k in branchings:
        keys = [f"{d},{k}" for d in depths]
        draft.update(zip(keys, _isotonic(np.array([draft[x] for x in keys]), np.ones(len(keys)))))
    costs = Costs(list(sizes), [float(t) for t in _isotonic(np.array([target[n] for n in sizes]), np.ones(len(sizes)))],
                  {k: float(v) for k, v in draft.items() if k != "catch_up"}, draft["catch_up"])
    return costs, drift


# ---- cache -----------------------------------------------------------------------------------
def head_digest(head) -> str:
    """sha256 of a draft head's weights (identifies which trained head was measured)."""
    h = hashlib.sha256()
    for k, v in sorted(head.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _model_id(model) -> str:
    """Config + a sample of the weights: tells checkpoints apart without hashing all of them
    (and without their folder: a moved checkpoint keeps its measurements)."""
    config = {k: v for k, v in model.config.to_dict().items() if k != "_name_or_path"}
    h = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for p in list(model.parameters())[:: max(1, len(list(model.parameters())) // 8)]:
        h.update(p.detach().reshape(-1)[:64].float().cpu().numpy().tobytes())
    return h.hexdigest()[:24]


def _machine() -> dict:
    return {"host": platform.node(), "cpu": eagle2_kernels.device_name("cpu"), "cores": os.cpu_count(),
            "torch": torch.__version__}


def regime(temperature: float) -> str:
    """Acceptance is measured per regime: "greedy" (temperature 0), or "sampling", measured once
    at temperature 1 and shared by every temperature > 0 (an approximation: lower temperatures
    accept somewhat more, so their trees come out a little small)."""
    return "greedy" if temperature == 0 else "sampling"


def cache_keys(gen, temperature: float, threads: int | None = None) -> dict:
    """What the cached costs (at `threads`, default torch's count) and acceptance depend on."""
    param = next(gen.model.parameters())
    model = {"model": _model_id(gen.model), "dtype": str(param.dtype), "device": str(param.device)}
    head = gen.head
    vocab = len(head.d2t) if head.d2t is not None else head.config.vocab_size
    costs = {"kind": "costs", "format": FORMAT, **model, "machine": _machine(),
             "threads": threads or torch.get_num_threads(),
             "draft_vocab": vocab, "draft_hidden": head.config.hidden_size,
             "draft_decoder_layers": head.config.num_hidden_layers, "draft_intermediate": head.config.intermediate_size,
             "draft_layers": list(head.target_layers or []),  # an EAGLE-3 head's verify also captures layers
             "draft_dtype": str(head.dtype)}
    acceptance = {"kind": "acceptance", "format": FORMAT, **model, "head": head_digest(head),
                  "draft_dtype": str(head.dtype), "regime": regime(temperature)}
    return {"costs": costs, "acceptance": acceptance}


def cache_path(key: dict):
    from .model import cache_dir

    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return cache_dir() / "autotune" / f"{key['kind']}-{digest}.json"


def _load(key: dict, cls):
    """The cached value of `key`, or None (missing, corrupt or outdated)."""
    path = cache_path(key)
    if path.is_file():
        try:
            return cls(**json.loads(path.read_text())["data"])
        except (ValueError, KeyError, TypeError):
            pass
    return None


def _store(key: dict, value) -> None:
    path = cache_path(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"key": key, "data": asdict(value)}) + "\n")
    os.replace(tmp, path)


def _measured(gen, keys: dict, temperature: float, measure: bool, threads: int):
    """(costs at `threads`, acceptance, measured now?) from the cache entries `keys`
    (cache_keys), measuring what is missing when `measure`; None when something is missing and
    measure is False."""
    costs, acc = _load(keys["costs"], Costs), _load(keys["acceptance"], Acceptance)
    if (costs is None or acc is None) and not measure:
        return None
    fresh = costs is None or acc is None
    if costs is None:
        saved = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            costs = measure_costs(gen, progress=True)
        finally:
            torch.set_num_threads(saved)
        _store(keys["costs"], costs)
    if acc is None:
        print("[eagle2] tuning: acceptance of the draft head (a few short generations) ...", file=sys.stderr, flush=True)
        acc = measure_acceptance(gen, 0.0 if regime(temperature) == "greedy" else 1.0)
        _store(keys["acceptance"], acc)
    return costs, acc, fresh


def explain(shape: TreeShape, rows: list[dict], costs: Costs) -> str:
    """One line on the chosen shape; when it is the one-node tree, why speculation does not pay."""
    best = rows[0]
    if shape.total_tokens > 1:
        return (f"tree shape total_tokens {shape.total_tokens}, depth {shape.depth}, branching {shape.branching}: "
                f"expected tau {best['tau']:.2f}, {best['seconds'] * 1e3:.0f} ms per step, "
                f"{best['rate']:.1f} tokens/s (plain decoding: {1 / costs.step_seconds(1, 1, 1):.1f})")
    runner = next((r for r in rows if r["m"] > 1), None)
    if runner is None:
        return "plain decoding: no tree shape was measured"
    return (f"plain decoding is faster on this machine: the best tree ({runner['m']}/{runner['depth']}/"
            f"{runner['branching']}) would commit {runner['tau']:.2f} tokens per step for {runner['seconds'] * 1e3:.0f} ms "
            f"(drafting and a {runner['m']}-token verify) against 1 token per {best['seconds'] * 1e3:.0f} ms")


def tuned_shape(gen, temperature: float = 0.0, measure: bool = True, threads: int | None = None) -> TreeShape | None:
    """The tree shape maximising expected committed tokens per second for this Generator, from
    costs measured on this machine at `threads` CPU threads (default torch's count) and the
    head's acceptance (cached per machine, model, head, threads and regime). measure=False:
    only what is cached (None if nothing is).

    Memoised per Generator: a found shape for good, a miss as the paths of the cache files that
    were missing, so that the next calls of an untuned Generator (every `generate` of
    `shape="auto"`) look for those files (another process's `eagle2 tune` writes them) instead
    of hashing the head's weights again (cache_keys: several ms)."""
    memo = _MEMO.setdefault(gen, {})
    n = threads or torch.get_num_threads()
    key = (regime(temperature), n)
    memoised = memo.get(key)
    if isinstance(memoised, TreeShape):
        return memoised
    if memoised is not None and not measure and not all(path.is_file() for path in memoised):
        return None
    if gen.head is None:
        raise ValueError("tree shape 'auto' needs a draft head")
    keys = cache_keys(gen, temperature, n)
    measured = _measured(gen, keys, temperature, measure, n)
    if measured is None:
        memo[key] = tuple(cache_path(k) for k in keys.values())
        return None
    costs, acc, fresh = measured
    shape, rows = choose(costs, acc)
    if fresh:  # said when measured, not on every later run that reads the cache
        print(f"[eagle2] {n} thread{'s' * (n > 1)}: {explain(shape, rows, costs)}", file=sys.stderr, flush=True)
    memo[key] = shape
    return shape


def reduced_shape(gen, temperature: float = 0.0, measure: bool = False) -> TreeShape | None:
    """The tree for the decode steps that other processes leave at most half the cores to (the
    ThreadGovernor runs them on at most half the caller's threads; on 2 cores, one): the shape
    tuned at 1 thread, where a large tree loses most. None on a GPU, at 1 thread already, or
    (measure=False) when the 1-thread costs were not measured."""
    if next(gen.model.parameters()).device.type != "cpu" or torch.get_num_threads() == 1:
        return None
    return tuned_shape(gen, temperature, measure, threads=1)


def forget(gen, temperature: float | None = None) -> None:
    """Drop this Generator's cached measurements: the costs, and the acceptance of temperature's
    regime (greedy or sampling), or of every regime when temperature is None. Re-tuning one
    regime keeps the other's acceptance, which was measured when the machine was as asked."""
    _MEMO.pop(gen, None)
    if gen.head is None:
        return
    temperatures = (0.0, 1.0) if temperature is None else (temperature,)
    keys = [cache_keys(gen, t)["acceptance"] for t in temperatures] + [cache_keys(gen, 0.0, n)["costs"]
                                                                        for n in {torch.get_num_threads(), 1}]
    for key in keys:
        cache_path(key).unlink(missing_ok=True)
