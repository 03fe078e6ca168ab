"""Triton kernel for tree_verify: one program per batch row walks the tree; every per-node step
(argmax, the sampling distribution with temperature / top_k / top_p, the residual sample) is a
vectorised pass over the vocabulary in BLOCK-sized chunks. No host synchronisation.

Semantics: eagle2_kernels.reference.tree_verify and sampling_probs. The selections need no
sort: top_k and top_p thresholds are radix selections over an order-preserving integer key of
the float values (ties at the threshold are then resolved in id order); the acceptance and
sampling arithmetic uses the reference's precisions (float64 for its Python floats, float32 for
its tensors), as csrc/tree_verify/tree_verify.h does for the native kernels.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..reference import VerifyResult
from ._common import order_key, sanitize

_INT32_MAX = tl.constexpr(2147483647)


@triton.jit
def _order_key(x):
    """_common.order_key with -0.0 and 0.0 sharing a key (0.0's): equal floats get equal keys."""
    return order_key(x + 0.0)


@triton.jit
def _row_argmax(row, V, BLOCK: tl.constexpr):
    """Index of the largest sanitized logit of row[0..V) (ties: lowest id)."""
    best = tl.full((), float("-inf"), tl.float32)
    best_i = tl.full((), 0, tl.int32)
    for start in range(0, V, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        x = sanitize(tl.load(row + offs, mask=offs < V, other=float("-inf")).to(tl.float32))
        cmax = tl.max(x, 0)
        cidx = tl.min(tl.where(x == cmax, offs, _INT32_MAX), 0)
        better = cmax > best  # strict: an earlier chunk keeps ties
        best_i = tl.where(better, cidx, best_i)
        best = tl.where(better, cmax, best)
    return best_i


@triton.jit
def _stats_above(w, V, t, BLOCK: tl.constexpr):
    """Over w[0..V): (count of keys > t, count of keys == t, float64 mass of keys > t)."""
    n_gt = tl.full((), 0, tl.int32)
    n_eq = tl.full((), 0, tl.int32)
    mass = tl.full((), 0.0, tl.float64)
    for start in range(0, V, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        valid = offs < V
        x = tl.load(w + offs, mask=valid, other=0.0)
        key = _order_key(x).to(tl.int64)
        gt = (key > t) & valid
        n_gt += tl.sum(gt.to(tl.int32), 0)
        n_eq += tl.sum(((key == t) & valid).to(tl.int32), 0)
        mass += tl.sum(tl.where(gt, x, 0.0).to(tl.float64), 0)
    return n_gt, n_eq, mass


@triton.jit
def _nth_equal(w, V, t, n, BLOCK: tl.constexpr):
    """Id of the n-th (1-based, in id order) entry of w[0..V) whose key is t; -1 when n == 0."""
    seen = tl.full((), 0, tl.int32)
    found = tl.full((), -1, tl.int32)
    for start in range(0, V, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        valid = offs < V
        eq = (_order_key(tl.load(w + offs, mask=valid, other=0.0)).to(tl.int64) == t) & valid
        rank = tl.cumsum(eq.to(tl.int32), 0) + seen
        found = tl.maximum(found, tl.max(tl.where(eq & (rank == n), offs, -1), 0))
        seen += tl.sum(eq.to(tl.int32), 0)
    return found


@triton.jit
def _keep(key, offs, t, cut):
    """Kept by a threshold: key above t, or key t and id at most cut (ties in id order)."""
    return (key > t) | ((key == t) & (offs <= cut))


@triton.jit
def _radix_select(w, V, goal, MASS: tl.constexpr, BLOCK: tl.constexpr):
    """Radix selection over the keys of w[0..V), 4 bits per pass from the top (8 passes).

    MASS=False: the goal-th largest key (the largest key t with at least goal keys >= t).
    MASS=True: the smallest key t of an entry with mass whose strictly larger entries hold mass
    < goal (entries are probabilities). Each pass histograms the next digit of the entries that
    share the digits chosen so far (count or mass per digit) and picks the digit holding t.
    The chunks are [16, BLOCK] one-hot tiles, so callers pass a smaller BLOCK than elsewhere.
    """
    digits = tl.arange(0, 16)
    prefix = tl.full((), 0, tl.int64)  # the chosen digits of the unsigned key (key + 2**31)
    above = tl.full((), 0.0, tl.float64)  # count or mass of the entries above the prefix
    for shift in tl.static_range(28, -4, -4):
        hist = tl.zeros([16], tl.float64)
        for start in range(0, V, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            valid = offs < V
            x = tl.load(w + offs, mask=valid, other=0.0)
            ukey = _order_key(x).to(tl.int64) + 2147483648
            hit = (((ukey >> shift) & 15)[None, :] == digits[:, None]) & (valid & ((ukey >> (shift + 4)) == prefix))[None, :]
            if MASS:
                hist += tl.sum(tl.where(hit, x[None, :], 0.0).to(tl.float64), 1)
            else:
                hist += tl.sum(hit.to(tl.float64), 1)
        higher = tl.sum(hist, 0) - tl.cumsum(hist, 0)  # per digit: the weight of larger digits
        if MASS:
            d = tl.min(tl.where((hist > 0.0) & (above + higher < goal), digits, 16), 0)
        else:
            d = tl.max(tl.where(above + higher + hist >= goal, digits, -1), 0)
        above += tl.sum(tl.where(digits == d, higher, 0.0), 0)
        prefix = prefix * 16 + d
    return prefix - 2147483648


@triton.jit
def _top_k_threshold(w, V, k, BLOCK: tl.constexpr, RBLOCK: tl.constexpr):
    """(t, cut) such that _keep selects the k largest of w[0..V), ties to the lower ids."""
    t = _radix_select(w, V, k, False, RBLOCK)
    n_gt, _, _ = _stats_above(w, V, t, BLOCK)
    return t, _nth_equal(w, V, t, k - n_gt, BLOCK)


@triton.jit
def _top_p_threshold(w, V, top_p, BLOCK: tl.constexpr, RBLOCK: tl.constexpr):
    """(t, cut) such that _keep selects reference.sampling_probs' top_p set of the distribution
    w[0..V). Everything above the boundary key t is kept, everything below is not; the r-th tie
    at t (id order) is preceded by mass fl32(fl32(above + (r + 1) v) - v), as torch computes
    `cumsum - p`, and is kept iff that is < top_p."""
    t = _radix_select(w, V, top_p, True, RBLOCK)
    _, n_eq, above = _stats_above(w, V, t, BLOCK)
    v = t.to(tl.int32).to(tl.float32, bitcast=True)
    kept = tl.full((), 0, tl.int32)
    for start in range(0, n_eq, BLOCK):
        r = start + tl.arange(0, BLOCK)
        before = (above + (r + 1).to(tl.float64) * v.to(tl.float64)).to(tl.float32) - v
        kept += tl.sum(((before < top_p) & (r < n_eq)).to(tl.int32), 0)
    return t, _nth_equal(w, V, t, kept, BLOCK)


@triton.jit
def _sampling_probs(row, w, V, temperature, top_p, top_k, BLOCK: tl.constexpr, RBLOCK: tl.constexpr):
    """reference.sampling_probs of the logits row[0..V) into w[0..V); returns its total (the
    float32 sum, as a float64 like the reference's Python float)."""
    tl.debug_barrier()  # w still holds the previous node's residual, read by the child tries
    mx = tl.full((), float("-inf"), tl.float32)
    for start in range(0, V, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        valid = offs < V
        raw = tl.load(row + offs, mask=valid, other=float("-inf")).to(tl.float32)
        x = sanitize(tl.math.div_rn(sanitize(raw), temperature))
        tl.store(w + offs, x, mask=valid)
        mx = tl.maximum(mx, tl.max(x, 0))
    tl.debug_barrier()
    total = tl.full((), 1.0, tl.float64)
    if mx == float("-inf"):  # dead row: point mass on token 0
        for start in range(0, V, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            tl.store(w + offs, tl.where(offs == 0, 1.0, 0.0), mask=offs < V)
    else:
        t = tl.full((), -2147483648, tl.int64)  # below every key: keep all
        cut = V
        if (top_k > 0) & (top_k < V):
            t, cut = _top_k_threshold(w, V, top_k, BLOCK, RBLOCK)
        _keep_normalized(w, V, t, cut, mx, True, BLOCK)
        if top_p < 1.0:
            t, cut = _top_p_threshold(w, V, top_p, BLOCK, RBLOCK)
            _keep_normalized(w, V, t, cut, mx, False, BLOCK)
        total = tl.full((), 0.0, tl.float64)
        for start in range(0, V, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            total += tl.sum(tl.load(w + offs, mask=offs < V, other=0.0).to(tl.float64), 0)
        total = total.to(tl.float32).to(tl.float64)
    tl.debug_barrier()
    return total


@triton.jit
def _keep_normalized(w, V, t, cut, mx, EXP: tl.constexpr, BLOCK: tl.constexpr):
    """Zeroes the entries of w[0..V) that the threshold (t, cut) does not keep (_keep), then
    normalises. EXP: w holds logits (row maximum mx) and each kept x becomes exp(x - mx)."""
    tl.debug_barrier()
    norm = tl.full((), 0.0, tl.float64)
    for start in range(0, V, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        valid = offs < V
        x = tl.load(w + offs, mask=valid, other=float("-inf"))
        # With BLOCK < 32 * num_warps several threads hold each element: all must have read it
        # before any writes it back (in place, exponentiated).
        tl.debug_barrier()
        kept = _keep(_order_key(x).to(tl.int64), offs, t, cut) & valid
        if EXP:
            x = tl.exp(x - mx)
        x = tl.where(kept, x, 0.0)
        tl.store(w + offs, x, mask=valid)
        norm += tl.sum(x.to(tl.float64), 0)
    _normalize(w, V, norm.to(tl.float32), BLOCK)


@triton.jit
def _normalize(w, V, norm, BLOCK: tl.constexpr):
    """w[0..V) /= norm (float32, correctly rounded like torch)."""
    tl.debug_barrier()
    for start in range(0, V, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        valid = offs < V
        x = tl.load(w + offs, mask=valid, other=0.0)
        tl.debug_barrier()  # in place: every thread holding an element has read it (_keep_normalized)
        tl.store(w + offs, tl.math.div_rn(x, norm), mask=valid)
    tl.debug_barrier()


@triton.jit
def _sample_from(w, V, total, u, BLOCK: tl.constexpr):
    """reference.sample_from on w[0..V): the first id whose float32 running sum (accumulated in
    float64, like torch's CPU cumsum) exceeds fl32(u * total); else the last id with mass."""
    threshold = (u.to(tl.float64) * total).to(tl.float32)
    run = tl.full((), 0.0, tl.float64)
    found = tl.full((), _INT32_MAX, tl.int32)
    last = tl.full((), -1, tl.int32)
    for start in range(0, V, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        valid = offs < V
        p = tl.load(w + offs, mask=valid, other=0.0)
        cum = tl.cumsum(p.to(tl.float64), 0) + run
        found = tl.minimum(found, tl.min(tl.where((cum.to(tl.float32) > threshold) & valid, offs, _INT32_MAX), 0))
        last = tl.maximum(last, tl.max(tl.where((p > 0.0) & valid, offs, -1), 0))
        run += tl.sum(p.to(tl.float64), 0)
    return tl.where(found < _INT32_MAX, found, tl.maximum(last, 0))


# m and L are often 1 (a one-node tree, max_depth 0): Triton would make them constants and, with
# the walk loop provably dead, Triton 3.6 fails to compile (PassManager::run failed).
@triton.jit(do_not_specialize=["m", "L"])
def _tree_verify_kernel(
    tokens, parents, logits, uniforms, work, accepted, accept_len, bonus,
    m, V, L, temperature, top_p, top_k,
    GREEDY: tl.constexpr, BLOCK: tl.constexpr, RBLOCK: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    tok = tokens + b * m
    par = parents + b * m
    rows = logits + b * m * V
    u = uniforms + b * m
    w = work + b * V
    path = accepted + b * L

    cur = tl.full((), 0, tl.int32)
    n = tl.full((), 1, tl.int32)
    if GREEDY:
        target = _row_argmax(rows, V, BLOCK)
    else:
        total = _sampling_probs(rows, w, V, temperature, top_p, top_k, BLOCK, RBLOCK)
    going = n < L
    while going:
        nxt = tl.full((), -1, tl.int32)
        c = cur + 1
        while (c < m) & (nxt < 0):  # children of cur in node order
            if tl.load(par + c) == cur:
                x = tl.load(tok + c)
                if GREEDY:
                    nxt = tl.where(x == target, c, -1)
                else:
                    ok = (x >= 0) & (x < V)  # an invalid token carries no mass
                    px = tl.load(w + x, mask=ok, other=0.0)
                    if tl.load(u + c).to(tl.float64) * total < px.to(tl.float64):
                        nxt = c
                    else:
                        total -= px.to(tl.float64)
                        tl.debug_barrier()  # every thread has read w[x] (scalars are per thread)
                        tl.store(w + x, 0.0, mask=ok)
                        tl.debug_barrier()
            c += 1
        if nxt >= 0:
            cur = nxt
            tl.store(path + n, cur)
            n += 1
            node = rows + cur.to(tl.int64) * V
            if GREEDY:
                target = _row_argmax(node, V, BLOCK)
            else:
                total = _sampling_probs(node, w, V, temperature, top_p, top_k, BLOCK, RBLOCK)
        going = (nxt >= 0) & (n < L)

    for start in range(0, L, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        tl.store(path + idx, -1, mask=(idx >= n) & (idx < L))
    tl.store(path, 0)
    tl.store(accept_len + b, n)
    if GREEDY:
        tl.store(bonus + b, target)
    else:
        tl.store(bonus + b, _sample_from(w, V, total, tl.load(u), BLOCK))


def tree_verify_triton(
    tokens: torch.Tensor,
    parents: torch.Tensor,
    target_logits: torch.Tensor,
    temperature: float,
    top_p: float,
    top_k: int,
    uniforms: torch.Tensor | None,
    out: VerifyResult,
) -> None:
    """Fill `out` (accepted [B, L], accept_len [B], bonus [B]; L = out.accepted.shape[1]) with
    reference.tree_verify of the validated inputs (see eagle2_kernels.tree_verify). Sampling
    when temperature > 0 (uniforms [B, m] required), greedy otherwise."""
    B, m, V = target_logits.shape
    L = out.accepted.shape[1]
    greedy = temperature == 0.0
    # Sampling keeps each row's residual distribution in a [B, V] float32 workspace.
    work = out.bonus if greedy else torch.empty((B, V), dtype=torch.float32, device=tokens.device)
    _tree_verify_kernel[(B,)](
        tokens, parents, target_logits, tokens if greedy else uniforms, work,
        out.accepted, out.accept_len, out.bonus,
        m, V, L, 1.0 if greedy else float(temperature), float(top_p), int(top_k),
        GREEDY=greedy, BLOCK=min(triton.next_power_of_2(V), 1024), RBLOCK=min(triton.next_power_of_2(V), 256),
        num_warps=8,
    )
