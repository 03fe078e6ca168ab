"""The decode loop: EAGLE-2 speculative decoding, the plain baseline, and HF generate.

One loop serves both our methods: plain decoding is the EAGLE-2 loop with a one-node tree
and no draft (same cache, same model code, same acceptance rule through tree_verify), so the
two differ only in the speculation. Per EAGLE-2 step and batch row:

    draft catch-up   the draft consumes (target feature, next token) for every token committed
                     by the previous step; its output at the root predicts the root's feature
    grow             tree.grow: the dynamic draft tree, reranked to m nodes
    verify           one target forward over the m tree tokens (tree attention on the cache)
    accept           tree_verify (greedy or lossless sampling) -> accepted nodes + bonus
    commit           kv_compact the target cache; emit tokens (EOS / max_new_tokens / context)

Cache invariants for a row with n committed tokens (prompt + generated, the last one being the
root): the target cache holds positions 0..n-2, the draft cache holds the entries for the
tokens at positions 1..n-1. Rows are ragged (each has its own n) and leave the batch when they
finish.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

import eagle2_kernels

from .attention import chain_bits, target_forward
from .cache import KVCache
from .tree import TreeShape, grow, root_only


@dataclass(frozen=True)
class Sampling:
    """temperature 0 = greedy; else sampling after temperature, top_k (0 = off), top_p."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0

    def __post_init__(self):
        t, p, k = self.temperature, self.top_p, self.top_k
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not t >= 0 or t == float("inf"):
            raise ValueError(f"temperature: expected a finite float >= 0, got {t!r}")
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1:
            raise ValueError(f"top_p: expected a float in (0, 1], got {p!r}")
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"top_k: expected an int >= 0, got {k!r}")


@dataclass
class RowResult:
    """What one prompt produced: the generated ids, the target forwards it took part in (the
    prefill included), wall seconds from the start of the call until it finished."""

    tokens: list[int] = field(default_factory=list)
    target_forwards: int = 0
    seconds: float = 0.0
    finished: bool = False

    @property
    def tau(self) -> float:
        """Mean tokens committed per target forward after the prefill (which always yields
        exactly one); 1.0 for plain decoding."""
        steps = self.target_forwards - 1
        return (len(self.tokens) - 1) / steps if steps > 0 else float(len(self.tokens))


def check_prompts(prompts: list[list[int]], context: int, vocab: int) -> None:
    """Reject empty prompts, prompts that leave no room in the context, out-of-range ids."""
    if not prompts:
        raise ValueError("prompts: expected at least one prompt")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty")
        if len(p) >= context:
            raise ValueError(f"prompt {i} has {len(p)} tokens: no room left in the model's context of {context}")
        if min(p) < 0 or max(p) >= vocab:
            raise ValueError(f"prompt {i} holds token ids outside [0, {vocab})")


@torch.inference_mode()
def decode(model, prompts: list[list[int]], max_new_tokens: int, *, head=None, shape: TreeShape | None = None,
           sampling: Sampling = Sampling(), eos_ids: frozenset[int] = frozenset(), seed: int | None = None,
           stream=None) -> list[RowResult]:
    """Generate for a batch of token-id prompts with EAGLE-2 (head and shape given) or plain
    decoding (head None). stream(row, new_ids) is called as tokens are committed."""
    config = model.config
    context = config.max_position_embeddings
    lm_head = model.get_output_embeddings()
    check_prompts(prompts, context, lm_head.weight.shape[0])
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: expected an int >= 1, got {max_new_tokens!r}")
    speculate = head is not None
    if speculate and shape is None:
        raise ValueError("shape: EAGLE-2 decoding needs a TreeShape")
    param = next(model.parameters())
    dev, dtype = param.device, param.dtype
    B = len(prompts)
    lens = torch.tensor([len(p) for p in prompts], device=dev)
    total = int((lens + max_new_tokens).clamp(max=context).max())
    tcache = KVCache.for_model(config, B, total + (shape.total_tokens if speculate else 1) + 1, dtype, dev)
    gen = torch.Generator(device=dev)
    gen.manual_seed(seed) if seed is not None else gen.seed()
    results = [RowResult() for _ in range(B)]
    start = time.perf_counter()

    # Prefill: the padded prompt block is a chain (causal bits) from position 0 in every row.
    L = int(lens.max())
    ids = torch.tensor([p + [p[-1]] * (L - len(p)) for p in prompts], device=dev)
    pos = torch.minimum(torch.arange(L, device=dev)[None], lens[:, None] - 1)
    feats = target_forward(model, ids, pos, tcache, chain_bits(L, B, dev), tcache.lengths)
    tcache.extend(lens)
    last = (lens - 1)[:, None]
    logits = lm_head(feats.gather(1, last[..., None].expand(B, 1, feats.shape[-1])))
    root_tokens = ids.gather(1, last)[:, 0]
    first = _accept(root_only(root_tokens, lens - 1), logits, sampling, gen, 0).bonus
    rows = list(range(B))  # original index of each active batch row
    n = lens + 1  # committed tokens per row, the root included
    for r in rows:
        results[r].target_forwards = 1
    done = _commit(results, rows, first[:, None].tolist(), [1] * B, lens, max_new_tokens, context,
                   eos_ids, stream, start)
    root = first.int()

    if speculate:
        dcache = KVCache(1, B, head.config.num_key_value_heads, total + shape.topk * shape.depth + 1,
                         head.config.head_dim, dtype, dev)
        pend_tokens = torch.cat([ids[:, 1:], torch.zeros_like(ids[:, :1])], dim=1)
        pend_tokens.scatter_(1, last, first[:, None].to(ids.dtype))  # t_{i+1} for every f_i
        pend = (feats, pend_tokens, torch.ones_like(lens), lens)  # features, tokens, first position, count

    while True:
        keep = [i for i, r in enumerate(rows) if r not in done]
        if not keep:
            break
        if len(keep) < len(rows):
            sel = torch.tensor(keep, device=dev)
            rows = [rows[i] for i in keep]
            tcache.select(sel)
            root, n, lens = root[sel], n[sel], lens[sel]
            if speculate:
                dcache.select(sel)
                pend = tuple(t[sel] for t in pend)
        Ba = len(rows)
        prefix = tcache.lengths.clone()  # = n - 1, the root's position
        if speculate:
            root_hidden = _draft_catch_up(head, dcache, *pend)
            # A step commits at most depth + 1 tokens; never draft past what some row may still
            # commit, nor place a node at a position from which the bonus would leave the context.
            room = int((context - n).min())
            need = int((lens + max_new_tokens - n).max())
            depth = min(shape.depth, room - 1, need - 1)
        else:
            depth = 0
        m = min(shape.total_tokens, 1 + shape.candidates(depth)) if depth > 0 else 1
        if m > 1:
            tree = grow(head, dcache, root_hidden, root, prefix, m, depth, shape.topk)
        else:
            tree = root_only(root, prefix)
        feats = target_forward(model, tree.tokens, tree.positions, tcache, tree.mask_bits, prefix)
        res = _accept(tree, lm_head(feats), sampling, gen, depth)
        if m > 1:
            tcache.compact(res.accepted, res.accept_len)
        else:
            tcache.extend(res.accept_len)
        a = res.accept_len.long()
        A = int(a.max())
        acc = res.accepted[:, :A].long().clamp(min=0)
        new = torch.cat([tree.tokens.long().gather(1, acc)[:, 1:], torch.zeros_like(acc[:, :1])], dim=1)
        new.scatter_(1, (a - 1)[:, None], res.bonus.long()[:, None])  # accepted drafts, then the bonus
        for r in rows:
            results[r].target_forwards += 1
        done |= _commit(results, rows, new.tolist(), a.tolist(), lens, max_new_tokens, context,
                        eos_ids, stream, start)
        if speculate:
            pend = (feats.gather(1, acc[..., None].expand(Ba, A, feats.shape[-1])), new, prefix + 1, a)
        n = n + a
        root = res.bonus.int()
    return results


def _draft_catch_up(head, cache, feats, tokens, first_pos, count) -> torch.Tensor:
    """Feed the draft count[b] new (feature, next token) pairs per row, at positions first_pos[b]
    onwards; return its predicted feature at each row's last pair (the root) [B, h]."""
    B, T, h = feats.shape
    pos = first_pos[:, None] + torch.minimum(torch.arange(T, device=feats.device)[None], count[:, None] - 1)
    hidden = head(feats, tokens, pos, cache=cache, mask_bits=chain_bits(T, B, feats.device), prefix_len=cache.lengths)
    cache.extend(count)
    return hidden.gather(1, (count - 1)[:, None, None].expand(B, 1, h))[:, 0]


def _accept(tree, logits, sampling: Sampling, gen, depth: int):
    return eagle2_kernels.tree_verify(
        tree.tokens, tree.parents, logits, temperature=sampling.temperature, top_p=sampling.top_p,
        top_k=sampling.top_k, generator=gen, max_depth=depth)


def _commit(results, rows, new, counts, lens, max_new, context, eos_ids, stream, start) -> set[int]:
    """Append each row's new tokens, cut at EOS (kept), max_new_tokens and the context; return
    the original indices of rows that finished."""
    done = set()
    for i, r in enumerate(rows):
        res = results[r]
        budget = min(max_new - len(res.tokens), context - int(lens[i]) - len(res.tokens))
        toks = new[i][: min(counts[i], budget)]
        for j, t in enumerate(toks):
            if t in eos_ids:
                toks = toks[: j + 1]
                res.finished = True
                break
        res.tokens += toks
        if stream is not None and toks:
            stream(r, toks)
        if res.finished or len(toks) == budget:
            res.finished = True
            res.seconds = time.perf_counter() - start
            done.add(r)
    return done


def hf_generate(model, prompts: list[list[int]], max_new_tokens: int, *, sampling: Sampling = Sampling(),
                eos_ids: frozenset[int] = frozenset(), pad_id: int = 0, seed: int | None = None) -> list[RowResult]:
    """transformers' own `generate` on the same prompts (left-padded batch), for comparison."""
    config = model.config
    check_prompts(prompts, config.max_position_embeddings, model.get_output_embeddings().weight.shape[0])
    dev = next(model.parameters()).device
    L = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (L - len(p)) + p for p in prompts], device=dev)
    mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in prompts], device=dev)
    if seed is not None:
        torch.manual_seed(seed)
    greedy = sampling.temperature == 0
    kwargs = {} if greedy else dict(temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k)
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=not greedy,
                             eos_token_id=sorted(eos_ids) or None, pad_token_id=pad_id, **kwargs)
    seconds = time.perf_counter() - start
    results = []
    for row in out[:, L:].tolist():
        cut = next((j + 1 for j, t in enumerate(row) if t in eos_ids), len(row))
        results.append(RowResult(tokens=row[:cut], target_forwards=cut, seconds=seconds, finished=True))
    return results
