"""Triton kernel for tree_attention (semantics: eagle2_kernels.reference.tree_attention).

Tiling. The Hq // Hkv query heads that read one KV head are packed with the n tree queries
into R = group * n rows (row r is query r % n of head kvh * group + r // n; those rows are
contiguous in q and out). One program owns BLOCK_M such rows of one (batch row, KV head)
and walks that row's keys [0, key_end) in BLOCK_N-key tiles, so each K/V tile is loaded once
for the whole group. Tiles that lie entirely in the cached prefix need no mask; the tiles from
there on decode the bit-packed tree mask (bit j of a query's words = tree key prefix_len + j).
Each row keeps an online softmax in float32: running max m, running sum l and the unnormalised
output acc, rescaled by exp(m_old - m_new) whenever the max grows. Keys at or past the cache
length S are never read. With a sliding window (WINDOW) the walk starts at the tile holding the
program's first key inside any of its rows' windows, and every tile also masks each key outside
its row's window (key positions as key_position in csrc/tree_attention/tree_attention.h).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634  # the kernel works in log2 units: exp(x) = exp2(x * log2(e))


@triton.jit
def _dot(a, b, F32: tl.constexpr):
    """a @ b with float32 accumulation; F32: multiply in exact float32 (float32 inputs, which
    tl.dot would otherwise round to tf32; bfloat16 in the interpreter, whose bfloat16 dot is
    unsupported: triton-lang/triton#11584)."""
    if F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _attend_tile(acc, m_i, l_i, q, k_rows, v_rows, keys, cols, d, key_end, prefix_end, p, word_rows, W, row_ok,
                 qk_scale, pos_row, n, qpos, window, TREE: tl.constexpr, WINDOW: tl.constexpr, DOT_F32: tl.constexpr):
    """One BLOCK_N-key tile of the online softmax. keys [BLOCK_N]; k_rows / v_rows point at the
    tile's K / V rows; word_rows [BLOCK_M] at each row's mask words. TREE: decode the mask bits
    (otherwise every key of the tile is a visible prefix key). WINDOW: also mask the keys outside
    each row's window (qpos [BLOCK_M] the rows' positions, pos_row the batch row's n positions)."""
    key_ok = keys < key_end
    kv_mask = key_ok[:, None] & (cols[None, :] < d)
    k = tl.load(k_rows + keys[:, None] * d + cols[None, :], mask=kv_mask, other=0.0)
    s = _dot(q, tl.trans(k), DOT_F32) * qk_scale  # log2 units
    if TREE:
        in_tree = key_ok & (keys >= prefix_end)
        rel = tl.where(in_tree, keys - p, 0)  # tree key index j (>= 0 where in_tree)
        words = tl.load(word_rows[:, None] + (rel // 32)[None, :], mask=row_ok[:, None] & in_tree[None, :], other=0)
        bit = (words >> (rel % 32)[None, :]) & 1
        visible = (keys < prefix_end)[None, :] | (bit != 0)
        s = tl.where(visible & key_ok[None, :], s, float("-inf"))
    if WINDOW:
        rel_q = keys - p  # tree key j < n is query j: its position is the query's
        is_query = (rel_q >= 0) & (rel_q < n) & key_ok
        key_pos = tl.load(pos_row + tl.where(is_query, rel_q, 0), mask=is_query, other=0)
        key_pos = tl.where(is_query, key_pos.to(tl.int64), keys)
        s = tl.where(qpos[:, None] - key_pos[None, :] < window, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet keeps weight 0
    alpha = tl.exp2(m_i - m_safe)
    w = tl.exp2(s - m_safe[:, None])
    v = tl.load(v_rows + keys[:, None] * d + cols[None, :], mask=kv_mask, other=0.0)
    acc = acc * alpha[:, None] + _dot(w.to(v.dtype), v, DOT_F32)  # weights rounded to the input dtype
    return acc, m_new, l_i * alpha + tl.sum(w, 1)


@triton.jit
def _tree_attention_kernel(q_ptr, k_ptr, v_ptr, bits_ptr, prefix_ptr, pos_ptr, out_ptr, Hq, Hkv, n, S, d, W, window,
                           qk_scale, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                           WINDOW: tl.constexpr, DOT_F32: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)  # b * Hkv + kvh; 64-bit offsets for large caches
    b = bh // Hkv
    kvh = bh % Hkv
    group = Hq // Hkv
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < group * n
    cols = tl.arange(0, BLOCK_D)
    io_rows = (b * Hq + kvh * group) * n * d + rows * d  # the group's rows are contiguous in q and out
    io_mask = row_ok[:, None] & (cols[None, :] < d)
    q = tl.load(q_ptr + io_rows[:, None] + cols[None, :], mask=io_mask, other=0.0)
    word_rows = bits_ptr + (b * n + rows % n) * W

    # Visible key range, clamped to the cache (as tree_keys in csrc/tree_attention/tree_attention.h).
    p = tl.load(prefix_ptr + b).to(tl.int64)
    prefix_end = tl.minimum(tl.maximum(p, 0), S)
    key_end = tl.minimum(tl.maximum(p + 32 * W, prefix_end), S)
    k_rows = k_ptr + bh * S * d
    v_rows = v_ptr + bh * S * d

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    tree_start = prefix_end // BLOCK_N * BLOCK_N  # first tile holding a tree key (or past the end)
    first = 0
    pos_row = pos_ptr + b * n
    qpos = tl.zeros([BLOCK_M], tl.int64)
    if WINDOW:
        qpos = tl.load(pos_row + rows % n, mask=row_ok, other=0).to(tl.int64)
        first_key = tl.min(tl.where(row_ok, qpos, 2**31 - 1)) - window + 1  # before it: outside every window
        # Never past the prefix end's tile: a tree key's position is its query's, not its index.
        first = tl.minimum(tl.maximum(first_key, 0) // BLOCK_N * BLOCK_N, tree_start)
    for start in range(first, tree_start, BLOCK_N):
        acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q, k_rows, v_rows, start + tl.arange(0, BLOCK_N), cols, d,
                                     key_end, prefix_end, p, word_rows, W, row_ok, qk_scale, pos_row, n, qpos, window,
                                     False, WINDOW, DOT_F32)
    for start in range(tree_start, key_end, BLOCK_N):
        acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q, k_rows, v_rows, start + tl.arange(0, BLOCK_N), cols, d,
                                     key_end, prefix_end, p, word_rows, W, row_ok, qk_scale, pos_row, n, qpos, window,
                                     True, WINDOW, DOT_F32)

    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]  # a row that saw no key keeps acc = 0
    tl.store(out_ptr + io_rows[:, None] + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=io_mask)


def tree_attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                          tree_mask_bits: torch.Tensor, prefix_len: torch.Tensor, scale: float,
                          positions: torch.Tensor | None, window: int, out: torch.Tensor) -> torch.Tensor:
    """Launch the kernel on validated, contiguous inputs (eagle2_kernels.tree_attention); writes
    and returns out [B, Hq, n, d]. No host synchronisation."""
    B, Hq, n, d = q.shape
    Hkv, S = k_cache.shape[1], k_cache.shape[2]
    rows = Hq // Hkv * n
    if rows == 0:
        return out
    # tl.dot needs every tile dim >= 16; 64 x 64 tiles keep a group's rows and a key tile in registers.
    block_m = max(16, min(64, triton.next_power_of_2(rows)))
    block_d = max(16, triton.next_power_of_2(d))
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    dot_f32 = q.dtype == torch.float32 or (q.dtype == torch.bfloat16 and interpreted)
    grid = (triton.cdiv(rows, block_m), B * Hkv)
    _tree_attention_kernel[grid](
        q, k_cache, v_cache, tree_mask_bits, prefix_len, prefix_len if positions is None else positions, out, Hq, Hkv,
        n, S, d, tree_mask_bits.shape[2], window, scale * _LOG2E, BLOCK_M=block_m, BLOCK_N=64, BLOCK_D=block_d,
        WINDOW=window > 0, DOT_F32=dot_f32,
    )
    return out
