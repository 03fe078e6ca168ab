"""The decode loop: EAGLE-2 speculative decoding, the plain baseline, and HF generate.

One loop serves both our methods: plain decoding is the EAGLE-2 loop with a one-node tree
and no draft (same cache, same model code, same acceptance rule through tree_verify), so the
two differ only in the speculation. `decode` is `prefill`, then per step, for every active row:

    speculate   draft catch-up: the draft consumes (target feature, next token) for every
                token committed by the previous step; its output at the root predicts the
                root's feature. Then tree.expand + tree.rerank: the dynamic tree of m nodes
    verify      one target forward over the m tree tokens (tree attention on the cache);
                tree_verify (greedy or lossless sampling) -> accepted nodes + bonus;
                kv_compact the target cache; commit tokens (EOS / max_new_tokens / context)

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
from eagle2_kernels import Tree

from .attention import chain_bits, target_forward, target_forward_layers, target_logits
from .cache import KVCache
from .linear import skinny_twin
from .threads import ThreadGovernor
from .tree import Candidates, TreeShape, expand, rerank, root_only


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


def tau(new_tokens: int, target_forwards: int, prompts: int = 1) -> float:
    """Mean tokens committed per target forward after the prefill, pooled over `prompts`
    prompts (each prefill yields exactly one token and is left out); 1.0 for plain decoding."""
    steps = target_forwards - prompts
    return (new_tokens - prompts) / steps if steps > 0 else new_tokens / max(prompts, 1)


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
        return tau(len(self.tokens), self.target_forwards)


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


@dataclass(frozen=True)
class Decoder:
    """What stays fixed during one decode call. head None = plain decoding. reduced_shape: the
    tree for the steps that the ThreadGovernor runs on at most half the caller's threads
    (None: shape for every step)."""

    model: object
    head: object
    shape: TreeShape | None
    reduced_shape: TreeShape | None
    sampling: Sampling
    eos_ids: frozenset[int]
    max_new_tokens: int
    stream: object = None  # stream(prompt index, new ids) as tokens are committed
    stop_at: object = None  # stop_at(tokens) -> tokens to keep when a stop string ends the output, else None

    @property
    def context(self) -> int:
        return self.model.config.max_position_embeddings

    def shape_for(self, threads: int, limit: int) -> TreeShape | None:
        """The step's tree on `threads` of the caller's `limit` threads."""
        return self.reduced_shape if 2 * threads <= limit and self.reduced_shape is not None else self.shape

    @property
    def cache_shape(self) -> tuple[int, int]:
        """(tree tokens, drafted entries) the caches must hold beyond the committed tokens: the
        most that any step's tree needs ((1, 0) for plain decoding)."""
        if self.head is None:
            return 1, 0
        shapes = [s for s in (self.shape, self.reduced_shape) if s is not None]
        return max(s.total_tokens for s in shapes), max(s.branching * s.depth for s in shapes)


@dataclass
class Batch:
    """The rows still decoding (row i of every tensor is active row i) and every prompt's result."""

    rows: list[int]           # prompt index of each active row
    lens: torch.Tensor        # [B] prompt lengths
    n: torch.Tensor           # [B] committed tokens: prompt + generated, the root included
    root: torch.Tensor        # [B] int32, the last committed token: the next tree's root
    tcache: KVCache           # target: positions 0 .. n-2
    dcache: KVCache | None    # draft: positions 1 .. n-1 once `pending` is fed to it
    pending: tuple | None     # draft catch-up: what the head reads [B, T, h or 3h], next tokens [B, T], first position [B], count [B]
    results: list[RowResult]  # one per prompt, finished or not
    gen: torch.Generator
    start: float

    def keep(self, keep: list[int]) -> None:
        """Drop every active row not listed in `keep` (their results stay)."""
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            return
        sel = torch.tensor(keep, device=self.n.device)
        self.lens, self.n, self.root = self.lens[sel], self.n[sel], self.root[sel]
        self.tcache.select(sel)
        if self.dcache is not None:
            self.dcache.select(sel)
            self.pending = tuple(t[sel] for t in self.pending)


@torch.inference_mode()
def decode(model, prompts: list[list[int]], max_new_tokens: int, *, head=None, shape: TreeShape | None = None,
           reduced_shape: TreeShape | None = None, sampling: Sampling = Sampling(),
           eos_ids: frozenset[int] = frozenset(), seed: int | None = None, stream=None,
           stop_at=None) -> list[RowResult]:
    """Generate for a batch of token-id prompts with EAGLE-2 (head and shape given) or plain
    decoding (head None). reduced_shape: the tree for steps that other processes leave at most
    half the cores to (eagle2.threads; autotune.reduced_shape), else shape's. stream(row, new_ids)
    is called as tokens are committed; stop_at(tokens) -> how many of a row's tokens to keep
    when they hold a stop, else None."""
    check_prompts(prompts, model.config.max_position_embeddings, model.get_output_embeddings().weight.shape[0])
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: expected an int >= 1, got {max_new_tokens!r}")
    if head is not None and shape is None:
        raise ValueError("shape: EAGLE-2 decoding needs a TreeShape")
    dec = Decoder(skinny_twin(model), skinny_twin(head), shape, reduced_shape, sampling, frozenset(eos_ids),
                  max_new_tokens, stream, stop_at)
    with ThreadGovernor(model.device) as threads:
        threads.step()
        batch = prefill(dec, prompts, seed)
        while batch.rows:
            shape = dec.shape_for(threads.step(), threads.limit)
            tree, _ = speculate(dec, batch, shape)
            verify(dec, batch, tree)
    return batch.results


def prefill(dec: Decoder, prompts: list[list[int]], seed: int | None) -> Batch:
    """The target over the prompts (a padded chain from position 0 in every row), the first
    token of each, and the caches sized for the whole call."""
    model, head = dec.model, dec.head
    param = next(model.parameters())
    dev, dtype = param.device, param.dtype
    B = len(prompts)
    lens = torch.tensor([len(p) for p in prompts], device=dev)
    total = int((lens + dec.max_new_tokens).clamp(max=dec.context).max())
    tree_tokens, drafted = dec.cache_shape
    tcache = KVCache.for_model(model.config, B, total + tree_tokens + 1, dtype, dev)
    gen = torch.Generator(device=dev)
    gen.manual_seed(seed) if seed is not None else gen.seed()
    start = time.perf_counter()
    L = int(lens.max())
    ids = torch.tensor([p + [p[-1]] * (L - len(p)) for p in prompts], device=dev)
    pos = torch.minimum(torch.arange(L, device=dev)[None], lens[:, None] - 1)
    feats, dfeats = forward_for_draft(model, head, ids, pos, tcache, chain_bits(L, B, dev), tcache.lengths)  # [B, L, h]
    tcache.extend(lens)
    last = (lens - 1)[:, None]
    logits = target_logits(model, feats.gather(1, last[..., None].expand(B, 1, feats.shape[-1])))
    first = _accept(dec.sampling, root_only(ids.gather(1, last)[:, 0], lens - 1), logits, gen).bonus
    batch = Batch(list(range(B)), lens, lens + 1, first.int(), tcache, None, None,
                  [RowResult(target_forwards=1) for _ in range(B)], gen, start)
    if head is not None:
        batch.dcache = KVCache.for_model(head.config, B, total + drafted + 1, head.dtype, dev)
        pend_tokens = torch.cat([ids[:, 1:], torch.zeros_like(ids[:, :1])], dim=1)
        pend_tokens.scatter_(1, last, first[:, None].to(ids.dtype))  # t_{i+1} for every f_i
        batch.pending = (dfeats, pend_tokens, torch.ones_like(lens), lens)
    _commit(dec, batch, first[:, None].tolist(), [1] * B)
    return batch


def speculate(dec: Decoder, batch: Batch, shape: TreeShape | None = None) -> tuple[Tree, Candidates | None]:
    """The next tree of every active row (of `shape`, default dec.shape): the draft catches up
    on what the last step committed, then expands and reranks (the one-node tree without a
    head, or when no room is left). Returns the tree and the candidates it was reranked from
    (None for a one-node tree)."""
    prefix = batch.tcache.lengths.clone()  # = n - 1, the root's position
    if dec.head is None:
        return root_only(batch.root, prefix), None
    root_hidden = _draft_catch_up(dec.head, batch.dcache, *batch.pending)
    # A step commits at most depth + 1 tokens; never draft past what some row may still
    # commit, nor place a node at a position from which the bonus would leave the context.
    room = int((dec.context - batch.n).min())
    need = int((batch.lens + dec.max_new_tokens - batch.n).max())
    shape = shape or dec.shape
    depth = min(shape.depth, room - 1, need - 1)
    m = min(shape.total_tokens, 1 + shape.candidates(depth)) if depth > 0 else 1
    if m == 1:
        return root_only(batch.root, prefix), None
    cands = expand(dec.head, batch.dcache, root_hidden, prefix, depth, shape.branching)
    return rerank(cands, batch.root, prefix, m, depth), cands


def verify(dec: Decoder, batch: Batch, tree: Tree) -> None:
    """verify_tree, then the accepted tokens + bonus committed."""
    prefix = batch.tcache.lengths.clone()
    feats, res = verify_tree(dec.model, tree, batch.tcache, prefix, dec.sampling, batch.gen, dec.head)
    a = res.accept_len.long()
    A = int(a.max())
    acc = res.accepted[:, :A].long().clamp(min=0)
    new = torch.cat([tree.tokens.long().gather(1, acc)[:, 1:], torch.zeros_like(acc[:, :1])], dim=1)
    new.scatter_(1, (a - 1)[:, None], res.bonus.long()[:, None])  # accepted drafts, then the bonus
    for r in batch.rows:
        batch.results[r].target_forwards += 1
    if dec.head is not None:
        batch.pending = (feats.gather(1, acc[..., None].expand(*acc.shape, feats.shape[-1])), new, prefix + 1, a)
    batch.n = batch.n + a
    batch.root = res.bonus.int()
    _commit(dec, batch, new.tolist(), a.tolist())


def verify_tree(model, tree: Tree, cache: KVCache, prefix: torch.Tensor, sampling: Sampling, gen=None, head=None):
    """One target forward over the tree (tree attention on the cache after prefix [B]), the
    acceptance walk, and the cache compacted to the accepted path. Returns what the draft head
    reads of the m nodes (forward_for_draft) and tree_verify's result. No host sync:
    torch.compile(fullgraph=True) traces it (greedy; a torch.Generator for sampling is not
    traceable)."""
    feats, dfeats = forward_for_draft(model, head, tree.tokens, tree.positions, cache, tree.mask_bits, prefix)
    res = _accept(sampling, tree, target_logits(model, feats), gen)
    if tree.tokens.shape[1] > 1:
        cache.compact(res.accepted, res.accept_len)
    else:
        cache.extend(res.accept_len)
    return dfeats, res


def forward_for_draft(model, head, input_ids, position_ids, cache, mask_bits, prefix_len):
    """target_forward, returning (the final features [B, n, h], what the draft head reads):
    the same features for an EAGLE-1/2 head (or none), its layers' outputs for an EAGLE-3 head."""
    layers = head.target_layers if head is not None else None
    if layers is None:
        feats = target_forward(model, input_ids, position_ids, cache, mask_bits, prefix_len)
        return feats, feats
    return target_forward_layers(model, input_ids, position_ids, cache, mask_bits, prefix_len, layers)


def _draft_catch_up(head, cache, feats, tokens, first_pos, count) -> torch.Tensor:
    """Feed the draft count[b] new (feature, next token) pairs per row, at positions first_pos[b]
    onwards; return its predicted feature at each row's last pair (the root) [B, h]."""
    B, T, _ = feats.shape
    pos = first_pos[:, None] + torch.minimum(torch.arange(T, device=feats.device)[None], count[:, None] - 1)
    hidden = head(feats, tokens, pos, cache=cache, mask_bits=chain_bits(T, B, feats.device), prefix_len=cache.lengths)
    cache.extend(count)
    return hidden.gather(1, (count - 1)[:, None, None].expand(B, 1, hidden.shape[-1]))[:, 0]


def _accept(sampling: Sampling, tree: Tree, logits: torch.Tensor, gen):
    s = sampling
    return eagle2_kernels.tree_verify(tree.tokens, tree.parents, logits, temperature=s.temperature, top_p=s.top_p,
                                      top_k=s.top_k, generator=gen, max_depth=tree.paths.shape[-1] - 1)


def _commit(dec: Decoder, batch: Batch, new: list[list[int]], counts: list[int]) -> None:
    """Append each row's new tokens, cut at EOS (kept), max_new_tokens and the context; drop
    the rows that finished."""
    keep = []
    for i, r in enumerate(batch.rows):
        res = batch.results[r]
        budget = min(dec.max_new_tokens - len(res.tokens), dec.context - int(batch.lens[i]) - len(res.tokens))
        toks = new[i][: min(counts[i], budget)]
        for j, t in enumerate(toks):
            if t in dec.eos_ids:
                toks = toks[: j + 1]
                res.finished = True
                break
        kept = dec.stop_at(res.tokens + toks) if dec.stop_at is not None and toks else None
        if kept is not None:  # a stop string: the output ends with the token that completes it
            toks = toks[: kept - len(res.tokens)]
            res.finished = True
        res.tokens += toks
        if dec.stream is not None and toks:
            dec.stream(r, toks)
        if res.finished or len(toks) == budget:
            res.finished = True
            res.seconds = time.perf_counter() - batch.start
        else:
            keep.append(i)
    if len(keep) < len(batch.rows):
        batch.keep(keep)


def hf_generate(model, prompts: list[list[int]], max_new_tokens: int, *, sampling: Sampling = Sampling(),
                eos_ids: frozenset[int] = frozenset(), pad_id: int | None = None, seed: int | None = None,
                prompt_lookup: int | None = None) -> list[RowResult]:
    """transformers' own `generate` on the same prompts (a left-padded batch; pad_id defaults
    to the lowest EOS id), each output cut after its first EOS. prompt_lookup N selects its
    prompt-lookup decoding with N tokens. target_forwards counts the model's forward calls, per
    row at most its token count (a batch runs until its longest row ends); seconds is the
    whole call's."""
    check_prompts(prompts, model.config.max_position_embeddings, model.get_output_embeddings().weight.shape[0])
    dev = next(model.parameters()).device
    pad = pad_id if pad_id is not None else min(eos_ids, default=0)
    L = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (L - len(p)) + p for p in prompts], device=dev)
    mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in prompts], device=dev)
    if seed is not None:
        torch.manual_seed(seed)
    s = sampling
    # None switches off any sampling setting the model's generation_config carries.
    kwargs = dict(do_sample=False, temperature=None, top_p=None, top_k=None) if s.temperature == 0 else \
        dict(do_sample=True, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k or None)
    if prompt_lookup is not None:
        kwargs["prompt_lookup_num_tokens"] = prompt_lookup
    calls = [0]
    hook = model.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    try:
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, pad_token_id=pad,
                                 eos_token_id=sorted(eos_ids) or None, **kwargs)
        seconds = time.perf_counter() - start
    finally:
        hook.remove()
    results = []
    for row in out[:, L:].tolist():
        cut = next((j + 1 for j, t in enumerate(row) if t in eos_ids), len(row))
        results.append(RowResult(tokens=row[:cut], target_forwards=min(calls[0], cut), seconds=seconds, finished=True))
    return results
