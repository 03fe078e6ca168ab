// Tree logic of rerank shared by the CPU kernel and the CUDA kernel (host and device code), so
// the CPU tests exercise what the GPU runs. Semantics: eagle2_kernels.reference.rerank.
//
// Every walk below follows parent links that strictly decrease (malformed links end the walk),
// so it takes at most as many steps as there are nodes, whatever the input holds.
#pragma once
#include <cstdint>

#include "eagle2_kernels/common.h"

namespace e2k {

// Parent of candidate i as the kernels read it. The Python wrapper rejects a parent outside
// [-1, i) on CPU tensors; on a GPU it cannot check without a host sync, so such a parent is
// read as -1 (a child of the root), which keeps the candidates a forest in topological order.
E2K_HD int32_t rerank_cand_parent(const int32_t* cand_parents, int32_t i) {
  const int32_t p = cand_parents[i];
  return p >= 0 && p < i ? p : -1;
}

// Effective score as a key that increases as the score decreases (the complement of its order
// key), so ascending keys are the keep order. Scores are sanitized (no NaN); -0 and +0 compare
// equal and get the same key.
E2K_HD uint32_t rerank_score_key(float eff) {
  if (eff == 0.0f) eff = 0.0f;
  return ~float_order_key(eff);
}

// True when candidate a comes before candidate b in the keep order: effective score
// descending (score key ascending), then depth ascending, then candidate index ascending.
E2K_HD bool rerank_before(uint32_t key_a, int32_t depth_a, int32_t a, uint32_t key_b, int32_t depth_b, int32_t b) {
  if (key_a != key_b) return key_a < key_b;
  if (depth_a != depth_b) return depth_a < depth_b;
  return a < b;
}

// Node `node` of the tree (node 0 = the root, parent -1, depth 0). positions = prefix_len +
// depth, wrapping like the reference's int32 cast instead of overflowing.
E2K_HD void rerank_set_node(int32_t node, int32_t token, int32_t parent, int32_t depth, int32_t prefix_len,
                            int32_t* tokens, int32_t* parents, int32_t* depths, int32_t* positions) {
  tokens[node] = token;
  parents[node] = parent;
  depths[node] = depth;
  positions[node] = int32_t(uint32_t(prefix_len) + uint32_t(depth));
}

// Row `node` of the ancestor mask (W words): bit a is set for the node and each ancestor a.
// The walk visits strictly decreasing nodes, hence words in non-increasing order, so each word
// is built in a register and stored exactly once (no read-modify-write of the output).
E2K_HD void rerank_mask_row(const int32_t* parents, int32_t node, int64_t W, uint32_t* row) {
  int64_t w = W - 1;
  uint32_t acc = 0;
  for (int32_t a = node; a >= 0;) {
    for (; w > (a >> 5); --w) {
      row[w] = acc;
      acc = 0;
    }
    acc |= 1u << (a & 31);
    const int32_t p = parents[a];
    a = p < a ? p : -1;
  }
  for (; w >= 0; --w) {
    row[w] = acc;
    acc = 0;
  }
}

// Root-to-`node` path in one row of `paths` (L entries): entry d = the ancestor at depth d,
// -1 past the node's depth. A node deeper than L - 1 gets only its first L entries (the
// wrapper reports that as a max_depth error on CPU; the CUDA kernel cannot raise).
E2K_HD void rerank_path_row(const int32_t* parents, const int32_t* depth, int32_t node, int64_t L, int32_t* row) {
  for (int64_t d = int64_t(depth[node]) + 1; d < L; ++d) row[d] = -1;
  for (int32_t a = node; a >= 0;) {
    const int32_t da = depth[a];
    if (da >= 0 && da < L) row[da] = a;
    const int32_t p = parents[a];
    a = p < a ? p : -1;
  }
}

}  // namespace e2k
