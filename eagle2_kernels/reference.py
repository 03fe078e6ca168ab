"""Reference implementations of the eagle2_kernels ops in plain PyTorch.

These functions are the specification: every backend (C++ CPU, CUDA, Triton) is tested
against them. They are written to be read, vectorised over the batch where that stays
readable, and run on any device. They do no argument validation: the public functions in
`eagle2_kernels` validate and then dispatch here (backend="reference") or to a kernel.

Conventions shared by all ops
-----------------------------
* Index tensors are int32, scores float32; logits may be float32, float16 or bfloat16 and are
  always read as float32.
* Non-finite inputs have a defined meaning (see `sanitize`): NaN means "impossible" (-inf) and
  +inf is clamped to the largest float32, so no NaN ever reaches a comparison and every walk
  terminates.
* Ties are always broken towards the lower index (token id, candidate index, flattened child
  index), so every op has exactly one correct answer.
* Trees are stored in topological order: node 0 is the root and parents[i] < i for i > 0.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

FLOAT32_MAX = torch.finfo(torch.float32).max
NEG_INF = float("-inf")


class FrontierExpansion(NamedTuple):
    """Result of `frontier_expand`.

    child_tokens    [B, K, k] int32    per frontier row, its top-k tokens (best first)
    child_scores    [B, K, k] float32  parent score + log p(child)
    frontier_index  [B, k]    int32    the next frontier: indices into the K*k children
                                       (row-major: parent row = index // k)
    frontier_scores [B, k]    float32  their scores, best first
    """

    child_tokens: torch.Tensor
    child_scores: torch.Tensor
    frontier_index: torch.Tensor
    frontier_scores: torch.Tensor


class Tree(NamedTuple):
    """A draft tree of m nodes per batch row, as built by `rerank`.

    tokens     [B, m]        int32  node 0 is the root (the last committed token)
    parents    [B, m]        int32  parent node index, -1 for the root; parents[i] < i
    depth      [B, m]        int32  root = 0
    positions  [B, m]        int32  prefix_len + depth (the position id of each node)
    mask_bits  [B, m, W]     int32  W = ceil(m / 32); bit (j % 32) of word j // 32 in row i is
                                    set iff node j is node i or one of its ancestors
    paths      [B, m, L]     int32  L = max_depth + 1; row r < num_leaves holds the r-th leaf's
                                    root-to-leaf node indices (leaves in node order), -1 padded;
                                    rows >= num_leaves are all -1
    num_leaves [B]           int32
    """

    tokens: torch.Tensor
    parents: torch.Tensor
    depth: torch.Tensor
    positions: torch.Tensor
    mask_bits: torch.Tensor
    paths: torch.Tensor
    num_leaves: torch.Tensor


class VerifyResult(NamedTuple):
    """Result of `tree_verify`.

    accepted   [B, L] int32  accepted node indices from the root (accepted[:, 0] == 0), -1 padded
    accept_len [B]    int32  number of accepted nodes including the root (>= 1); it is also the
                             number of new tokens committed: the accepted drafts plus the bonus
    bonus      [B]    int32  the token sampled (or argmax) at the last accepted node
    """

    accepted: torch.Tensor
    accept_len: torch.Tensor
    bonus: torch.Tensor


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for the kernel dtypes; float64 stays float64 (reference-only, for exact tests)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def sanitize(x: torch.Tensor) -> torch.Tensor:
    """float32 copy of x (float64 stays float64) with NaN -> -inf and +inf -> the largest
    float32 (-inf stays)."""
    return torch.nan_to_num(x.to(compute_dtype(x.dtype)), nan=NEG_INF, posinf=FLOAT32_MAX, neginf=NEG_INF)


def log_softmax(x: torch.Tensor) -> torch.Tensor:
    """log_softmax over the last dim of a sanitized float32 tensor.

    Computed as x - (max + log(sum(exp(x - max)))). A row with no finite entry (all -inf) has
    log-probabilities -inf everywhere instead of NaN.
    """
    row_max = x.amax(dim=-1, keepdim=True)
    shift = torch.where(row_max == NEG_INF, torch.zeros_like(row_max), row_max)
    lse = shift + torch.log(torch.exp(x - shift).sum(dim=-1, keepdim=True))
    return torch.where(lse == NEG_INF, torch.full_like(x, NEG_INF), x - lse)


def topk_desc(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k over the last dim, best first, ties broken towards the lower index."""
    values, index = torch.sort(x, dim=-1, descending=True, stable=True)
    return values[..., :k], index[..., :k]


def frontier_expand(logits: torch.Tensor, parent_scores: torch.Tensor, k: int) -> FrontierExpansion:
    """One depth of EAGLE-2 tree expansion.

    logits [B, K, V] (draft logits of the K frontier nodes), parent_scores [B, K] float32
    (their cumulative log-probabilities; -inf marks an unused row). Each frontier row gets its
    top-k tokens by logit; a child's score is its parent's score plus log p_draft(child). The
    next frontier is the top-k of all K*k children by score.
    """
    B, K, _ = logits.shape
    x = sanitize(logits)
    logp = log_softmax(x)
    _, child_tokens = topk_desc(x, k)  # [B, K, k]; ranking by logit == ranking by logp
    child_scores = sanitize(parent_scores)[..., None] + logp.gather(-1, child_tokens).float()
    frontier_scores, frontier_index = topk_desc(child_scores.reshape(B, K * k), k)
    return FrontierExpansion(
        child_tokens.int(), child_scores, frontier_index.int(), frontier_scores.contiguous()
    )


def _depths(parents: torch.Tensor) -> torch.Tensor:
    """Depth of every node of a forest given parents [B, N] (-1 = attached to a virtual root
    at depth 0, so those nodes have depth 1). Bounded: at most N rounds."""
    depth = torch.ones_like(parents)
    cur = parents.long()
    for _ in range(parents.shape[1]):
        has_parent = cur >= 0
        if not bool(has_parent.any()):
            break
        depth += has_parent.to(depth.dtype)
        cur = torch.where(has_parent, parents.long().gather(1, cur.clamp(min=0)), cur)
    return depth


def rerank(
    cand_scores: torch.Tensor,
    cand_parents: torch.Tensor,
    cand_tokens: torch.Tensor,
    root_tokens: torch.Tensor,
    prefix_len: torch.Tensor,
    m: int,
    max_depth: int | None = None,
) -> Tree:
    """Build the draft tree from the expansion candidates.

    cand_scores [B, N] float32, cand_parents [B, N] int32 (index of the parent candidate, -1 for
    a child of the root; cand_parents[i] < i), cand_tokens [B, N] int32, root_tokens [B] int32,
    prefix_len [B] int32 (tokens already in the KV cache; the root sits at position prefix_len).

    Keeps the m-1 candidates with the highest effective score, where a candidate's effective
    score is the minimum of its own score and its ancestors' (NaN counts as -inf). Ties go to
    the shallower candidate, then the lower candidate index. Because an ancestor's effective
    score is never below its descendant's and it is shallower, the kept set is closed under
    ancestors for any input. Kept candidates become nodes 1..m-1 in ascending candidate order,
    so parents precede children. max_depth (default m - 1) sets the width L = max_depth + 1 of
    `paths`; a deeper tree is an error.
    """
    B, N = cand_scores.shape
    L = (m - 1 if max_depth is None else max_depth) + 1
    dev = cand_scores.device
    parents64 = cand_parents.long()

    # Effective scores: running minimum along the ancestor chain (at most N rounds).
    eff = sanitize(cand_scores)
    cur = parents64
    for _ in range(N):
        has_parent = cur >= 0
        if not bool(has_parent.any()):
            break
        eff = torch.where(has_parent, torch.minimum(eff, eff.gather(1, cur.clamp(min=0))), eff)
        cur = torch.where(has_parent, parents64.gather(1, cur.clamp(min=0)), cur)
    cand_depth = _depths(cand_parents)

    # Order by (-eff, depth, index): stable sorts from the last key to the first.
    order = torch.arange(N, device=dev).expand(B, N)
    order = order.gather(1, torch.sort(cand_depth.gather(1, order), dim=1, stable=True).indices)
    order = order.gather(1, torch.sort(eff.gather(1, order), dim=1, descending=True, stable=True).indices)
    kept = torch.sort(order[:, : m - 1], dim=1).values  # [B, m-1] candidate indices, ascending

    # Candidate index -> node index (1..m-1); -1 for dropped candidates.
    node_of = torch.full((B, N + 1), -1, dtype=torch.long, device=dev)
    node_of[:, :N].scatter_(1, kept, torch.arange(1, m, device=dev).expand(B, m - 1))
    kept_parent = parents64.gather(1, kept)  # candidate index or -1
    node_parent = torch.where(kept_parent >= 0, node_of.gather(1, kept_parent.clamp(min=0)), 0)

    tokens = torch.cat([root_tokens.long()[:, None], cand_tokens.long().gather(1, kept)], dim=1)
    parents = torch.cat([torch.full((B, 1), -1, device=dev, dtype=torch.long), node_parent], dim=1)
    depth = torch.cat([torch.zeros((B, 1), device=dev, dtype=torch.long), cand_depth.long().gather(1, kept)], dim=1)
    if int(depth.max()) > L - 1:
        raise ValueError(f"max_depth: expected >= {int(depth.max())} (the deepest kept node), got {L - 1}")
    positions = prefix_len.long()[:, None] + depth

    # Ancestor chains: anc[b, i, d] = the ancestor of node i at depth d (i itself at its depth).
    # Column L is a sink for finished walks, dropped afterwards.
    anc = torch.full((B, m, L + 1), -1, dtype=torch.long, device=dev)
    node = torch.arange(m, device=dev).expand(B, m)
    for _ in range(L):
        alive = node >= 0
        slot = torch.where(alive, depth.gather(1, node.clamp(min=0)), L)
        anc.scatter_(2, slot[..., None], node[..., None])
        node = torch.where(alive, parents.gather(1, node.clamp(min=0)), node)
    anc = anc[..., :L]

    visible = torch.zeros((B, m, m + 1), dtype=torch.bool, device=dev)  # last column: sink for -1
    visible.scatter_(2, torch.where(anc >= 0, anc, m), True)
    mask_bits = pack_mask_bits(visible[..., :m])

    has_child = torch.zeros((B, m + 1), dtype=torch.bool, device=dev)
    has_child.scatter_(1, (parents + 1).clamp(min=0)[:, 1:], True)  # parent p -> slot p + 1
    is_leaf = ~has_child[:, 1:]
    num_leaves = is_leaf.sum(1)
    # Leaves first (in node order), then the rest; keep the first num_leaves rows.
    leaf_order = torch.sort((~is_leaf).int(), dim=1, stable=True).indices
    paths = anc.gather(1, leaf_order[..., None].expand(B, m, L))
    row = torch.arange(m, device=dev)[None, :, None]
    paths = torch.where(row < num_leaves[:, None, None], paths, -1)

    return Tree(
        tokens.int(), parents.int(), depth.int(), positions.int(), mask_bits,
        paths.int().contiguous(), num_leaves.int(),
    )


def pack_mask_bits(visible: torch.Tensor) -> torch.Tensor:
    """Bool [..., n] -> the kernels' mask words int32 [..., ceil(n / 32)]: bit j % 32 of word
    j // 32 is visible[..., j] (bit 31 is the sign bit). The inverse is `tree_mask_visible`."""
    n = visible.shape[-1]
    W = (n + 31) // 32
    padded = torch.zeros((*visible.shape[:-1], W * 32), dtype=torch.int64, device=visible.device)
    padded[..., :n] = visible.long()
    words = (padded.view(*visible.shape[:-1], W, 32) << torch.arange(32, device=visible.device)).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).int()  # reinterpret bit 31 as the sign


def tree_mask_visible(tree_mask_bits: torch.Tensor, prefix_len: torch.Tensor, num_keys: int) -> torch.Tensor:
    """Boolean visibility [B, n, S] of the keys 0..S-1 for each query row.

    Keys before prefix_len[b] (the cached prefix) are visible to every query; key prefix_len[b] + j
    is visible to query i iff bit j of tree_mask_bits[b, i] is set (j < 32 * W); other keys are not.
    """
    B, n, W = tree_mask_bits.shape
    rel = torch.arange(num_keys, device=tree_mask_bits.device)[None, :] - prefix_len.long()[:, None]  # [B, S]
    in_tree = (rel >= 0) & (rel < 32 * W)
    relc = rel.clamp(0, 32 * W - 1)
    words = tree_mask_bits.long().gather(2, (relc // 32)[:, None, :].expand(B, n, num_keys))
    bit = ((words >> (relc % 32)[:, None, :]) & 1).bool()
    return (rel < 0)[:, None, :] | (in_tree[:, None, :] & bit)


def window_visible(positions: torch.Tensor, prefix_len: torch.Tensor, num_keys: int, window: int) -> torch.Tensor:
    """Sliding-window visibility [B, n, S] of keys 0..S-1: a query at position positions[b, i]
    may see a key only if its position minus the key's is below window. A key's position is its
    cache index, except the n tree keys prefix_len[b] + j (j < n), whose positions are the
    queries' own, positions[b, j] (in a verify step the tree tokens are both)."""
    B, n = positions.shape
    index = torch.arange(num_keys, device=positions.device).expand(B, num_keys)
    rel = index - prefix_len.long()[:, None]
    is_tree = (rel >= 0) & (rel < n)
    key_pos = torch.where(is_tree, positions.long().gather(1, rel.clamp(0, n - 1)), index)  # [B, S]
    return positions.long()[:, :, None] - key_pos[:, None, :] < window


def tree_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    tree_mask_bits: torch.Tensor,
    prefix_len: torch.Tensor,
    scale: float,
    positions: torch.Tensor | None = None,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Attention of n tree queries to a cached prefix plus the tree itself.

    q [B, Hq, n, d]; k_cache, v_cache [B, Hkv, S, d] (Hq % Hkv == 0; query head h reads KV head
    h // (Hq // Hkv)); tree_mask_bits [B, n, W] int32; prefix_len [B] int32, ragged across the
    batch. Visibility is `tree_mask_visible`, and with sliding_window also `window_visible` over
    the query positions positions [B, n] int32 (required then). Softmax in float32 (float64 for float64 inputs); the
    output [B, Hq, n, d] has q's dtype. A query that sees no key gets zeros.

    NaN, on every backend: NaN in a query, or in the key of a key it sees, makes its whole output
    row NaN; NaN in a value column of a key it sees makes that output column NaN (as
    softmax(q k^T) v does). Keys past a row's tree region (prefix_len + 32 W on) are never read,
    so they may hold anything. A non-finite value of a key inside the region that a query does not
    see may still reach that query's output (tiled kernels multiply whole tiles by weight 0).
    """
    B, Hq, n, d = q.shape
    Hkv, S = k_cache.shape[1], k_cache.shape[2]
    group = Hq // Hkv
    acc = compute_dtype(q.dtype)
    # Keys past a row's tree region are never read (their 0 weights would still carry NaN).
    W = tree_mask_bits.shape[2]
    in_range = (torch.arange(S, device=q.device) < (prefix_len.long() + 32 * W)[:, None])[:, None, :, None]
    k = torch.where(in_range, k_cache.to(acc), 0.0).repeat_interleave(group, dim=1)
    v = torch.where(in_range, v_cache.to(acc), 0.0).repeat_interleave(group, dim=1)
    scores = torch.matmul(q.to(acc), k.transpose(-1, -2)) * scale  # [B, Hq, n, S]
    visible = tree_mask_visible(tree_mask_bits, prefix_len, S)  # [B, n, S]
    if sliding_window is not None:
        visible = visible & window_visible(positions, prefix_len, S, sliding_window)
    visible = visible[:, None]  # [B, 1, n, S]
    scores = scores.masked_fill(~visible, NEG_INF)
    probs = torch.softmax(scores, dim=-1)
    probs = torch.where(visible.any(-1, keepdim=True), probs, 0.0)  # fully masked rows -> zeros; NaN inputs propagate
    return torch.matmul(probs, v).to(q.dtype)


def sampling_probs(logits: torch.Tensor, temperature: float, top_p: float = 1.0, top_k: int = 0) -> torch.Tensor:
    """The target's sampling distribution over the last dim (float32, sums to 1).

    softmax(sanitize(sanitize(logits) / temperature)); then top_k > 0 keeps the top_k tokens (ties: lower
    id); then top_p < 1 keeps, in descending probability order (ties: lower id), each token
    whose preceding mass is < top_p (so at least one); renormalised after each step. A row
    with no finite logit is the point mass on token 0.
    """
    x = sanitize(sanitize(logits) / temperature)  # re-clamp: FLOAT32_MAX / t overflows when t < 1
    dead = (x == NEG_INF).all(dim=-1, keepdim=True)
    x = torch.where(dead, torch.zeros_like(x), x)
    V = x.shape[-1]
    if top_k > 0 and top_k < V:
        _, idx = topk_desc(x, top_k)
        keep = torch.zeros_like(x, dtype=torch.bool).scatter_(-1, idx, True)
        x = x.masked_fill(~keep, NEG_INF)
    probs = torch.softmax(x, dim=-1)
    if top_p < 1.0:
        sorted_p, idx = torch.sort(probs, dim=-1, descending=True, stable=True)
        before = sorted_p.cumsum(-1) - sorted_p
        keep = torch.zeros_like(probs, dtype=torch.bool).scatter_(-1, idx, before < top_p)
        probs = probs.masked_fill(~keep, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    point = torch.zeros_like(probs)
    point[..., 0] = 1.0
    return torch.where(dead, point, probs)


def sample_from(p: torch.Tensor, total: float, u: float) -> int:
    """Inverse-CDF sample from unnormalised weights p [V] with sum `total`: the first token
    whose running sum exceeds u * total; if rounding leaves none, the last token with p > 0."""
    cum = torch.cumsum(p, 0)
    hit = torch.nonzero(cum > u * total)
    if hit.numel():
        return int(hit[0])
    nz = torch.nonzero(p > 0)
    return int(nz[-1]) if nz.numel() else 0


def tree_verify(
    tokens: torch.Tensor,
    parents: torch.Tensor,
    target_logits: torch.Tensor,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    uniforms: torch.Tensor | None = None,
    max_depth: int | None = None,
) -> VerifyResult:
    """Accept a path of the draft tree against the target's logits at every node.

    tokens, parents [B, m] int32 (a tree in topological order, e.g. from `rerank`);
    target_logits [B, m, V]: the target's logits at each node (predicting the next token).
    Children of a node are tried in node order. L = max_depth + 1 (default m) bounds the path.

    temperature == 0 (greedy): at the current node take t = argmax (ties: lowest id, NaN = -inf);
    move to the first child whose token is t; stop when none is. bonus = argmax at the last node.

    temperature > 0 (sampling; uniforms [B, m] float32 in [0, 1) required): p = sampling_probs at
    the current node, total = sum(p). For each child c with token x, in order: accept iff
    uniforms[b, c] * total < p[x]; else total -= p[x], p[x] = 0. On acceptance move to c (fresh
    p). When every child is rejected, or at a leaf, or at depth L - 1, bonus = sample_from(p,
    total, uniforms[b, 0]). The committed tokens are then distributed exactly as the target's
    sampling distribution (multi-draft recursive rejection with a deterministic draft).
    """
    B, m = tokens.shape
    L = m if max_depth is None else max_depth + 1
    greedy = temperature == 0.0
    if greedy:
        argmax = sanitize(target_logits).argmax(-1).tolist()  # [B][m]; torch.argmax returns the first maximum
    else:
        probs = sampling_probs(target_logits, temperature, top_p, top_k)
    tok, par = tokens.tolist(), parents.tolist()
    accepted = torch.full((B, L), -1, dtype=torch.int32)
    accept_len = torch.zeros(B, dtype=torch.int32)
    bonus = torch.zeros(B, dtype=torch.int32)
    for b in range(B):
        path, cur = [0], 0
        if not greedy:
            p = probs[b, 0].clone()
            total = float(p.sum())
        while len(path) < L:
            children = [c for c in range(cur + 1, m) if par[b][c] == cur]
            nxt = -1
            for c in children:
                x = tok[b][c]
                if greedy:
                    if x == argmax[b][cur]:
                        nxt = c
                        break
                elif float(uniforms[b, c]) * total < float(p[x]):
                    nxt = c
                    break
                else:
                    total -= float(p[x])
                    p[x] = 0.0
            if nxt < 0:
                break
            cur = nxt
            path.append(cur)
            if not greedy:
                p = probs[b, cur].clone()
                total = float(p.sum())
        accepted[b, : len(path)] = torch.tensor(path, dtype=torch.int32)
        accept_len[b] = len(path)
        bonus[b] = argmax[b][cur] if greedy else sample_from(p, total, float(uniforms[b, 0]))
    dev = tokens.device
    return VerifyResult(accepted.to(dev), accept_len.to(dev), bonus.to(dev))


def kv_compact(cache: torch.Tensor, prefix_len: torch.Tensor, accepted: torch.Tensor, accept_len: torch.Tensor) -> None:
    """Move the accepted tree entries of a KV cache to contiguous slots after the prefix, in place.

    cache [B, H, S, d] or [N, B, H, S, d] (N stacked caches, e.g. every layer's K and V);
    for each row b and i < accept_len[b]: slot prefix_len[b] + i <- slot prefix_len[b] +
    accepted[b, i]. accepted is increasing along a path, so sources never precede their
    destination; slots past prefix_len + accept_len keep stale data (the caller's length says
    what is valid).
    """
    c = cache if cache.dim() == 5 else cache.unsqueeze(0)
    for b in range(c.shape[1]):
        n = int(accept_len[b])
        base = int(prefix_len[b])
        src = base + accepted[b, :n].long().to(c.device)
        c[:, b, :, base : base + n] = c[:, b, :, src]


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x weight^T + bias ([..., K] x [N, K] -> [..., N]) in float32 (float64 stays float64),
    rounded once to x's dtype."""
    dt = compute_dtype(x.dtype)
    y = torch.nn.functional.linear(x.to(dt), weight.to(dt), None if bias is None else bias.to(dt))
    return y.to(x.dtype)
