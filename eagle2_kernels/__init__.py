"""eagle2_kernels: fused kernels for EAGLE-2 speculative decoding with dynamic draft trees.

Public ops (batched, leading dim B >= 1; indices int32, scores float32):
  frontier_expand  one depth of tree expansion (log-softmax, top-k, cumulative score, frontier)
  rerank           keep the best m-1 candidates and build the tree (mask bits, positions, paths)
  tree_attention   attention to a cached prefix plus a tree-masked block (GQA, ragged prefixes)
  tree_verify      greedy or lossless sampling acceptance of a tree against target logits
  kv_compact       move accepted tree entries of a KV cache into place
  skinny_linear    x W^T + b for a decode step's few rows: W read once, each row computed alike
                   (SkinnyLinearPlan: the same with the weights checked once, for per-step calls;
                   skinny_linear_bf16_dot: whether this CPU multiplies bfloat16 natively)

Each op validates its arguments (ValueError naming the argument), then dispatches by device
to the fastest available backend, or to the one named by `backend=`. `backends()` says what
this installation can run, `device_name(device)` what runs it. `eagle2_kernels.reference` holds the PyTorch specification.
`pack_mask_bits` builds the bit-packed tree masks that rerank returns and tree_attention takes.
"""
from ._backend import IMPLEMENTATIONS, backends, device_name
from .ops.frontier_expand import frontier_expand
from .ops.kv_compact import kv_compact
from .ops.rerank import rerank
from .ops.skinny_linear import (MAX_ROWS as SKINNY_LINEAR_MAX_ROWS, SkinnyLinearPlan, skinny_linear,
                                skinny_linear_bf16_dot)
from .ops.tree_attention import tree_attention
from .ops.tree_verify import tree_verify
from .reference import FrontierExpansion, Tree, VerifyResult, pack_mask_bits

# Every public op, in pipeline order (the tests, the benchmarks and CI iterate over this).
OPS = tuple(IMPLEMENTATIONS)

__all__ = [
    "OPS", "SKINNY_LINEAR_MAX_ROWS", "SkinnyLinearPlan", "FrontierExpansion", "Tree", "VerifyResult", "backends", "device_name", "frontier_expand", "kv_compact",
    "pack_mask_bits", "rerank", "skinny_linear", "skinny_linear_bf16_dot", "tree_attention", "tree_verify",
]
__version__ = "0.2.0"
