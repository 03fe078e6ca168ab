"""EAGLE-1/2 draft-head training (`eagle2 train`).

For a conversation t_0..t_{n-1} with target features f_0..f_{n-1} (the target's final-normed
last hidden states), the head reads (f_j + noise, t_{j+1}) at position j + 1 and is trained to
predict f_{j+1}:

    loss = SmoothL1(f'_j, f_{j+1}) + ce_weight * CE(softmax(lm_head f_{j+1}), log_softmax(lm_head f'_j))

on the loss-masked positions j + 1 only (the answers; all of a `text` conversation), with soft
targets (the target's whole distribution). The input features get uniform noise, as in EAGLE, so the head tolerates its own
imperfect predictions when it drafts several levels deep. The target features and argmax
tokens are computed once, in float32 with torch.no_grad, and cached next to the data
(`features/` in each data folder), so epochs cost only the head.

--draft-vocab N gives the head a reduced vocabulary (EAGLE-3 style): the N tokens it may
propose are the target tokens most frequent in the training answers (then, for unseen ones,
the lowest ids: BPE merge order approximates corpus frequency), stored as the `d2t` buffer.
Its lm_head is then N rows of the target's: on a small target the full-vocabulary lm_head
dominates the draft's cost. The CE then runs over those N tokens (positions whose target
argmax lies outside them are left out of it).

--head eagle3 trains an EAGLE-3 head (eagle2.draft3) instead: its input features are the
outputs of three target layers (cached beside the final features), it predicts tokens only
(loss = the soft cross-entropy against the target's distribution over the draft vocabulary,
ce_weight ignored, no feature regression), and --ttt-steps unrolls it on its own hidden states.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from eagle2.data import Conversation, fmt_seconds, read_shard, shard_paths
from eagle2.draft import DraftHead, Unroll
from eagle2.draft3 import Eagle3Head, default_layers, load_head
from eagle2.model import eos_ids, load_target


def _log(msg: str) -> None:
    print(f"[train] {msg}", file=sys.stderr, flush=True)


class Sequence:
    """A conversation with its cached target features [n, h], target argmax tokens [n] and,
    for an EAGLE-3 head, the outputs of its target layers [n, 3h] (else None)."""

    def __init__(self, conv: Conversation, features: torch.Tensor, argmax: torch.Tensor,
                 layers: torch.Tensor | None = None):
        self.input_ids, self.loss_mask, self.features, self.argmax = conv.input_ids, conv.loss_mask, features, argmax
        self.layers = layers

    def __len__(self) -> int:
        return len(self.input_ids)


@torch.no_grad()
def target_features(target, input_ids: torch.Tensor, layers: tuple[int, ...] | None = None):
    """Final-normed last hidden states [B, T, h], argmax tokens [B, T] and, given `layers`,
    those decoder layers' outputs concatenated [B, T, len(layers) h] (else None).

    Right padding is harmless here: causal attention never lets a real token see a later pad.
    """
    out = target.get_decoder()(input_ids=input_ids, use_cache=False, output_hidden_states=layers is not None)
    hidden = out.last_hidden_state
    picked = torch.cat([out.hidden_states[i + 1] for i in layers], -1) if layers is not None else None
    return hidden, target.get_output_embeddings()(hidden).argmax(-1), picked


def load_sequences(target, data_dir: str | Path, target_tag: str, max_len: int,
                   tokens_per_batch: int = 2048, precision: str = "float32",
                   layers: tuple[int, ...] | None = None) -> list[Sequence]:
    """The conversations of a `train-data` folder (cut to max_len tokens) with their target
    features, computed once per data shard and cached in data_dir/features/ (float16
    features + int32 argmax; with `layers`, an EAGLE-3 head's, in features-layers-<ids>/);
    a folder that grew gets features for its new shards only.
    precision "bfloat16" runs the target's matmuls in bfloat16 (autocast): several times
    faster on CPUs with AVX512-BF16, features within bfloat16 rounding of float32's."""
    cache_dir = Path(data_dir) / ("features" if layers is None else f"features-layers-{'-'.join(map(str, layers))}")
    cache_dir.mkdir(exist_ok=True)
    meta_path = cache_dir / "meta.json"
    meta = {"target": target_tag, "max_len": max_len, "precision": precision}
    if meta_path.exists() and json.loads(meta_path.read_text()) != meta:
        raise ValueError(f"{cache_dir} caches features of another target or setting "
                         f"({meta_path.read_text().strip()}); delete it to recompute")
    meta_path.write_text(json.dumps(meta) + "\n")
    out, start, done_tokens = [], time.time(), 0
    paths = shard_paths(data_dir)
    for k, shard in enumerate(paths):
        convs = [Conversation(c.input_ids[:max_len], c.loss_mask[:max_len]) for c in read_shard(shard)]
        lengths = torch.tensor([len(c.input_ids) for c in convs])
        path = cache_dir / f"{shard.stem}.safetensors"
        if path.exists():
            t = load_file(str(path))
            if not torch.equal(t["lengths"], lengths):
                raise ValueError(f"{path} does not match its data shard {shard}: delete it to recompute")
            feats, argmax, picked = t["features"], t["argmax"], t.get("layers")
        else:
            feats, argmax, picked = _features_of(target, convs, tokens_per_batch, precision, layers)
            if picked is not None and not bool(picked.isfinite().all()):
                raise ValueError(f"{shard}: a target layer's outputs overflow float16 (the feature cache's type)")
            extra = {"layers": picked} if picked is not None else {}
            save_file({"features": feats, "argmax": argmax, "lengths": lengths, **extra}, str(path.with_suffix(".tmp")))
            os.replace(path.with_suffix(".tmp"), path)
            done_tokens += int(lengths.sum())
            _log(f"features: shard {k + 1}/{len(paths)} of {data_dir} "
                 f"({done_tokens / (time.time() - start):.0f} tokens/s)")
        offsets = [0] + lengths.cumsum(0).tolist()
        out += [Sequence(c, feats[a:b], argmax[a:b], picked[a:b] if picked is not None else None)
                for c, a, b in zip(convs, offsets[:-1], offsets[1:])]
    return out


def _features_of(target, convs: list[Conversation], tokens_per_batch: int, precision: str = "float32",
                 layers: tuple[int, ...] | None = None):
    """Concatenated float16 features [sum n, h], int32 argmax [sum n] and float16 layer outputs
    [sum n, 3h] (None without `layers`) of `convs`, in order."""
    order = sorted(range(len(convs)), key=lambda i: len(convs[i].input_ids))
    feats, argmax, picked = [None] * len(convs), [None] * len(convs), [None] * len(convs)
    for batch in _length_batches(order, [len(c.input_ids) for c in convs], tokens_per_batch):
        width = max(len(convs[i].input_ids) for i in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        for r, i in enumerate(batch):
            ids[r, :len(convs[i].input_ids)] = convs[i].input_ids
        with torch.autocast(target.device.type, dtype=torch.bfloat16, enabled=precision == "bfloat16"):
            h, a, x = target_features(target, ids.to(target.device), layers)
        for r, i in enumerate(batch):
            n = len(convs[i].input_ids)
            feats[i], argmax[i] = h[r, :n].half().cpu(), a[r, :n].int().cpu()
            picked[i] = x[r, :n].half().cpu() if x is not None else None
    return torch.cat(feats), torch.cat(argmax), torch.cat(picked) if layers is not None else None


def _length_batches(order: list[int], lengths: list[int], tokens_per_batch: int) -> list[list[int]]:
    """Consecutive runs of `order` whose padded size (count x longest) stays within the budget."""
    batches, cur, width = [], [], 0
    for i in order:
        w = max(width, lengths[i])
        if cur and w * (len(cur) + 1) > tokens_per_batch:
            batches.append(cur)
            cur, w = [], lengths[i]
        cur.append(i)
        width = w
    if cur:
        batches.append(cur)
    return batches


def draft_vocab(sequences: list[Sequence], size: int, vocab_size: int, keep: set[int]) -> torch.Tensor:
    """d2t: the `size` target tokens most frequent in the answers (ties and unseen tokens by
    lowest id, i.e. BPE merge order), plus `keep` (e.g. EOS), sorted by id."""
    if not 0 < size <= vocab_size:
        raise ValueError(f"--draft-vocab must be in [1, {vocab_size}], got {size}")
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for s in sequences:
        counts += torch.bincount(s.input_ids[s.loss_mask], minlength=vocab_size)
    for t in keep:
        counts[t] = counts.max() + 1
    # Stable sort on -count keeps equal counts in id order.
    ranked = torch.sort(-counts, stable=True).indices
    return ranked[:size].sort().values


def _batch(seqs: list[Sequence], device) -> dict[str, torch.Tensor]:
    """Right-padded tensors of a list of sequences (pads have mask False)."""
    width = max(len(s) for s in seqs)
    h = seqs[0].features.shape[-1]
    b = {"features": torch.zeros(len(seqs), width, h), "tokens": torch.zeros(len(seqs), width, dtype=torch.long),
         "argmax": torch.zeros(len(seqs), width, dtype=torch.long), "mask": torch.zeros(len(seqs), width, dtype=torch.bool)}
    if seqs[0].layers is not None:
        b["layers"] = torch.zeros(len(seqs), width, seqs[0].layers.shape[-1])
    for r, s in enumerate(seqs):
        n = len(s)
        b["features"][r, :n] = s.features.float()
        if s.layers is not None:
            b["layers"][r, :n] = s.layers.float()
        b["tokens"][r, :n] = s.input_ids
        b["argmax"][r, :n] = s.argmax.long()
        b["mask"][r, :n] = s.loss_mask
    return {k: v.to(device) for k, v in b.items()}


def unrolled(head: DraftHead, features: torch.Tensor, tokens: torch.Tensor, steps: int,
             index: torch.Tensor | None = None) -> list[torch.Tensor]:
    """The head run as it drafts, `steps` levels deep from many positions at once (the
    training-time test; steps = 1 is EAGLE-1/2's teacher forcing).

    features [B, T, h] (f_j, possibly noised), tokens [B, T] (t_j). Step 1 reads (f_j, t_{j+1})
    at position j + 1 for every j; step k >= 2 carries on from the positions index [B, P]
    (default: all), reading at p its own step-(k-1) prediction and the token t_{j+k}, j =
    index[b, p], at position j + k, attending as the depth-k draft node below the root t_{j+1}
    would (DraftAttention). Returns the predictions of steps 1..steps: [B, T, h] for step 1,
    [B, P, h] after; entry p of step k predicts f_{j+k} (entries past the sequence hold
    padding)."""
    B, T, _ = features.shape
    state = Unroll()
    pos = torch.arange(1, T + 1, device=features.device).expand(B, -1)
    preds = [head(features, F.pad(tokens[:, 1:], (0, 1)), pos, unroll=state)]
    if steps > 1 and index is not None:
        state.index = index
    j = state.index if state.index is not None else torch.arange(T, device=features.device).expand(B, -1)
    x = preds[0].gather(1, j[..., None].expand(*j.shape, preds[0].shape[-1]))
    padded = F.pad(tokens, (0, steps))
    for k in range(2, steps + 1):
        x = head(x, padded.gather(1, j + k), j + k, unroll=state)
        preds.append(x)
    return preds


def ttt_positions(mask: torch.Tensor, fraction: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Sorted step-1 positions [B, P] for the unroll steps >= 2, P = ceil(fraction x T): drawn
    without replacement among the positions j whose step-2 target f_{j+2} is trained on
    (padded with other positions when a row has fewer; the loss masks those)."""
    B, T = mask.shape
    P = max(1, min(T, math.ceil(fraction * T)))
    weight = F.pad(mask[:, 2:], (0, 2)).float() + 1e-6
    return torch.multinomial(weight, P, replacement=False, generator=generator).sort(-1).values


def head_loss(head: DraftHead, batch: dict[str, torch.Tensor], noise: float, ce_weight: float,
              in_draft_vocab: torch.Tensor | None = None, steps: int = 1, step_decay: float = 0.8,
              ttt_fraction: float = 1.0, generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict]:
    """The training loss of one batch (see the module doc), averaged over the unroll steps with
    weights step_decay^(k-1), and its statistics: feature loss, CE and top-1 accuracy against
    the target argmax of step 1, the top-1 accuracy and count of every step (acc_steps,
    n_steps). Steps >= 2 run on a ttt_fraction of the positions (ttt_positions). An EAGLE-3
    head reads batch["layers"] and is trained on the CE alone (weight 1)."""
    feats, tokens, mask = batch["features"], batch["tokens"], batch["mask"]
    B, T, _ = feats.shape
    regress = head.target_layers is None  # EAGLE-1/2: its output predicts the next feature
    f_in = feats if regress else batch["layers"]
    f_in = f_in + (torch.rand_like(f_in) - 0.5) * noise if noise else f_in
    index = ttt_positions(mask, ttt_fraction, generator) if steps > 1 and ttt_fraction < 1 else None
    preds = unrolled(head, f_in, tokens, steps, index)
    n = int(mask[:, 1:].sum())
    if n == 0:
        raise ValueError("a training batch has no answer tokens")
    # The target's distribution at every trained-on position, once for all steps.
    row_of = torch.full((B, T), -1, dtype=torch.long, device=feats.device)
    row_of[mask] = torch.arange(int(mask.sum()), device=feats.device)
    with torch.no_grad():
        teacher = torch.softmax(head.target_logits(feats[mask]).float(), -1)
    top1 = batch["argmax"][mask]
    all_pos = torch.arange(T, device=feats.device).expand(B, -1)
    loss, weights, stats = 0.0, 0.0, {"acc_steps": [], "n_steps": []}
    for k, pred in enumerate(preds, 1):
        src = all_pos if k == 1 or index is None else index
        goal = (src + k).clamp(max=T - 1)  # entry p predicts f_{src + k}
        sel = (src + k < T) & mask.gather(1, goal)
        if not sel.any():
            break
        rows = row_of.gather(1, goal)[sel]
        pred_s = pred[sel]
        vloss = F.smooth_l1_loss(pred_s, feats.gather(1, goal[..., None].expand(*goal.shape, feats.shape[-1]))[sel]) \
            if regress else pred_s.new_zeros(())
        logq = torch.log_softmax(head.logits(pred_s).float(), -1)
        ce_rows = -(teacher[rows] * logq).sum(-1)
        keep = in_draft_vocab[top1[rows]] if in_draft_vocab is not None else torch.ones_like(rows, dtype=torch.bool)
        ce = ce_rows[keep].mean() if keep.any() else ce_rows.sum() * 0
        loss = loss + step_decay ** (k - 1) * (vloss + ce_weight * ce if regress else ce)
        weights += step_decay ** (k - 1)
        acc = float((head.to_target_ids(logq.argmax(-1)) == top1[rows]).float().mean())
        stats["acc_steps"].append(acc)
        stats["n_steps"].append(len(rows))
        if k == 1:
            stats.update(vloss=float(vloss.detach()), ce=float(ce.detach()), acc=acc, n=n)
    return loss / weights, stats


def _epoch_batches(seqs: list[Sequence], tokens_per_batch: int, seed: int, epoch: int) -> list[list[int]]:
    """Length-bucketed batches, shuffled per epoch (the same order again on resume)."""
    rng = random.Random(seed * 7919 + epoch)
    order = sorted(range(len(seqs)), key=lambda i: (len(seqs[i]), rng.random()))
    batches = _length_batches(order, [len(s) for s in seqs], tokens_per_batch)
    rng.shuffle(batches)
    return batches


@torch.no_grad()
def evaluate(head: DraftHead, seqs: list[Sequence], tokens_per_batch: int, ce_weight: float,
             in_draft_vocab: torch.Tensor | None, device, steps: int = 1, ttt_fraction: float = 1.0) -> dict:
    """Held-out loss and top-1 accuracy (no noise), at every unroll step (acc_steps; the same
    positions for steps >= 2 in every call)."""
    generator = torch.Generator().manual_seed(0)
    tot = {"vloss": 0.0, "ce": 0.0, "acc": 0.0, "n": 0}
    hits, counts = [0.0] * steps, [0] * steps
    for batch in _length_batches(list(range(len(seqs))), [len(s) for s in seqs], tokens_per_batch):
        _, st = head_loss(head, _batch([seqs[i] for i in batch], device), 0.0, ce_weight, in_draft_vocab, steps,
                          ttt_fraction=ttt_fraction, generator=generator)
        for k in ("vloss", "ce", "acc"):
            tot[k] += st[k] * st["n"]
        for k, (a, n) in enumerate(zip(st["acc_steps"], st["n_steps"])):
            hits[k] += a * n
            counts[k] += n
        tot["n"] += st["n"]
    out = {k: (v / tot["n"] if k != "n" else v) for k, v in tot.items()}
    out["acc_steps"] = [h / max(c, 1) for h, c in zip(hits, counts)]
    return out


def lr_at(step: int, total: int, warmup: int, lr: float) -> float:
    """Linear warm-up, then cosine decay to 10% of lr."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@dataclass
class TrainResult:
    """The trained head (float32, attached to the target) and held-out metrics before the
    first step of this run and after its last one (empty without held-out data)."""

    head: DraftHead | Eagle3Head
    eval_start: dict[str, float]
    eval_end: dict[str, float]


def train(args: argparse.Namespace) -> TrainResult:
    """`eagle2 train`: train (or resume training) a draft head, see the module doc."""
    eagle3 = args.head == "eagle3"
    if args.ttt_steps is None:
        args.ttt_steps = 3 if eagle3 else 1
    if args.noise is None:
        args.noise = 0.0 if eagle3 else 0.2
    if args.ttt_steps < 1:
        raise ValueError(f"--ttt-steps: expected an int >= 1, got {args.ttt_steps}")
    if args.head_layers is not None and (args.head_layers < 1 or (eagle3 and args.head_layers != 1)):
        raise ValueError(f"--head-layers: expected an int >= 1 (1 for an eagle3 head), got {args.head_layers}")
    torch.manual_seed(args.seed)
    out = Path(args.out)
    ckpt = out / "checkpoint"
    device = torch.device(args.device)
    target, _ = load_target(args.target, dtype=torch.float32, device=device)
    target.requires_grad_(False)
    state = torch.load(ckpt / "state.pt", weights_only=False) if (ckpt / "state.pt").exists() else None
    head = None
    if state is not None:
        head = load_head(ckpt, dtype=torch.float32, device=device).attach(target)
        _log(f"resuming from {ckpt} at step {state['step']}")
        if args.head_layers and args.head_layers != head.config.num_hidden_layers:
            raise ValueError(f"--head-layers: the checkpoint in {ckpt} has {head.config.num_hidden_layers} decoder "
                             f"layers, got {args.head_layers} (use another --out to train another head)")
    elif args.init:
        head = load_head(args.init, dtype=torch.float32, device=device).attach(target)
        _log(f"starting from the head in {args.init}")
    if head is not None and (head.target_layers is not None) != (args.head == "eagle3"):
        raise ValueError(f"--head {args.head}: the head to start from is an "
                         f"{'EAGLE-3' if head.target_layers is not None else 'EAGLE-1/2'} head")
    if state is None and head is not None and args.head_layers and args.head_layers != head.config.num_hidden_layers:
        if args.head_layers < head.config.num_hidden_layers:
            raise ValueError(f"--head-layers: the head in {args.init} has {head.config.num_hidden_layers} decoder "
                             f"layers, got {args.head_layers} (a head can grow, not shrink)")
        head = head.grown(args.head_layers)
        _log(f"grown to {args.head_layers} decoder layers (the new ones start as no-ops)")
    layers = head.target_layers if head is not None else \
        (default_layers(target.config.num_hidden_layers) if args.head == "eagle3" else None)

    train_seqs, eval_sets = [], {}  # eval_sets: data folder -> its held-out sequences
    for folder in args.data:
        seqs = load_sequences(target, folder, str(args.target or "default"), args.max_len,
                              precision=args.feature_precision, layers=layers)
        # Held out per folder, so that every data source is evaluated.
        n_eval = max(1, round(len(seqs) * args.eval_fraction)) if len(seqs) > 1 and args.eval_fraction else 0
        train_seqs += seqs[:len(seqs) - n_eval]
        if n_eval:
            eval_sets[folder] = seqs[len(seqs) - n_eval:]
    eval_seqs = [s for seqs in eval_sets.values() for s in seqs]
    n_tokens = sum(int(s.loss_mask.sum()) for s in train_seqs)
    _log(f"{len(train_seqs)} training conversations ({sum(map(len, train_seqs))} tokens, {n_tokens} answer "
         f"tokens), {len(eval_seqs)} held out")

    if head is None:
        d2t = None
        if args.draft_vocab:
            d2t = draft_vocab(train_seqs, args.draft_vocab, target.config.vocab_size, eos_ids(target))
        if args.head == "eagle3":  # starts as a logit lens on its highest layer (Eagle3Head.for_target)
            head = Eagle3Head.for_target(target, d2t=d2t, layers=layers, init_from_target=not args.random_init)
        else:
            head = DraftHead.for_target(target, init_from_last_layer=not args.random_init, d2t=d2t,
                                        layers=args.head_layers or 1)
        if args.head == "eagle2" and not args.random_init:
            # The copied layers' output projections write residual-stream-sized updates (the
            # target's last layer sees un-normed states of large norm), which swamp the normed
            # feature the head must predict (SmolLM2: feature loss 37 instead of 0.6). Zeroed,
            # the head starts as the identity f_j -> f_j and the pretrained q/k/v/gate/up
            # projections get gradients as soon as o_proj/down_proj move.
            for layer in head.layers:
                layer.mute()
    head.train()
    in_vocab = None
    if head.d2t is not None:
        in_vocab = torch.zeros(target.config.vocab_size, dtype=torch.bool, device=device)
        in_vocab[head.d2t] = True
        cover = sum(int(in_vocab[s.input_ids[s.loss_mask].to(device)].sum()) for s in eval_seqs)
        _log(f"draft vocabulary {len(head.d2t)}: covers {cover / max(1, sum(int(s.loss_mask.sum()) for s in eval_seqs)):.1%} "
             "of the held-out answer tokens")

    # bfloat16 autocast: the head's matmuls (the draft lm_head above all) run several times
    # faster on CPUs with AMX/AVX512-BF16; the weights and the optimizer stay float32.
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bfloat16")
    params = [p for p in head.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=args.weight_decay)
    batches_per_epoch = len(_epoch_batches(train_seqs, args.tokens_per_batch, args.seed, 0))
    total = args.steps or batches_per_epoch * args.epochs
    step = 0
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        step = state["step"]
        torch.set_rng_state(state["rng"])
    _log(f"{total} steps ({batches_per_epoch} per epoch), lr {args.lr}, warm-up {args.warmup}")

    def save(final: bool) -> None:
        head.save_pretrained(ckpt)
        torch.save({"step": step, "optimizer": opt.state_dict(), "rng": torch.get_rng_state(), "args": vars(args)},
                   ckpt / "state.tmp")
        os.replace(ckpt / "state.tmp", ckpt / "state.pt")
        if final:
            head.save_pretrained(out, dtype=getattr(torch, args.save_dtype))

    def run_eval() -> dict[str, float]:
        """Held-out metrics per data folder (logged) and over all of them (returned)."""
        head.eval()
        parts = {}
        with autocast:
            for folder, seqs in eval_sets.items():
                parts[folder] = evaluate(head, seqs, args.tokens_per_batch, args.ce_weight, in_vocab, device,
                                         args.ttt_steps, args.ttt_fraction)
                ev = parts[folder]
                _log(f"step {step} eval {folder}: top-1 {ev['acc']:.3f}  vloss {ev['vloss']:.4f}  ce {ev['ce']:.3f}"
                     f"  top-1 per unroll step {' '.join(f'{a:.3f}' for a in ev['acc_steps'])}  ({ev['n']} tokens)")
        head.train()
        n = sum(ev["n"] for ev in parts.values())
        if not n:
            return {}
        avg = {k: sum(ev[k] * ev["n"] for ev in parts.values()) / n for k in ("vloss", "ce", "acc")}
        avg["acc_steps"] = [sum(ev["acc_steps"][i] * ev["n"] for ev in parts.values()) / n for i in range(args.ttt_steps)]
        return avg

    start, start_step, window, epoch_batches = time.time(), step, [], (None, None)
    result = TrainResult(head, run_eval(), {})
    while step < total:
        epoch, k = divmod(step, batches_per_epoch)
        if epoch_batches[0] != epoch:
            epoch_batches = (epoch, _epoch_batches(train_seqs, args.tokens_per_batch, args.seed, epoch))
        batch_ids = epoch_batches[1][k]
        for g in opt.param_groups:
            g["lr"] = lr_at(step, total, args.warmup, args.lr)
        with autocast:
            loss, st = head_loss(head, _batch([train_seqs[i] for i in batch_ids], device), args.noise,
                                 args.ce_weight, in_vocab, args.ttt_steps, args.step_decay, args.ttt_fraction)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
        opt.step()
        step += 1
        window.append(st)
        elapsed = time.time() - start
        if step % args.log_every == 0 or step == total:
            n = sum(s["n"] for s in window)
            avg = {k: sum(s[k] * s["n"] for s in window) / n for k in ("vloss", "ce", "acc")}
            eta = elapsed / (step - start_step) * (total - step)
            steps_acc = " ".join(f"{sum(s['acc_steps'][i] for s in window) / len(window):.3f}"
                                 for i in range(min(len(s["acc_steps"]) for s in window)))
            _log(f"step {step}/{total} epoch {epoch}  vloss {avg['vloss']:.4f}  ce {avg['ce']:.3f}  top-1 {avg['acc']:.3f}"
                 f" (per unroll step {steps_acc})  lr {opt.param_groups[0]['lr']:.2e}  {elapsed / (step - start_step):.2f} s/step  ETA {fmt_seconds(eta)}")
            window = []
        out_of_time = args.max_minutes is not None and elapsed > args.max_minutes * 60
        if step % args.eval_every == 0 or step == total or out_of_time:
            result.eval_end = run_eval()
        if step % args.save_every == 0 or step == total or out_of_time:
            save(final=step == total or out_of_time)
        if out_of_time:
            _log(f"stopping at step {step}: --max-minutes {args.max_minutes} reached (resume with the same command)")
            break
    _log(f"head saved to {out} ({args.save_dtype}); resumable state in {ckpt}")
    head.eval()
    return result
