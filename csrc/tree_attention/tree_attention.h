// Rules of tree_attention shared by the CPU and CUDA kernels (eagle2_kernels.reference
// tree_attention / tree_mask_visible / window_visible): which keys of a batch row can be visible,
// the bit test for tree keys and the sliding window.
#pragma once
#include <cstdint>

#include "eagle2_kernels/common.h"

namespace e2k {

// Keys [0, prefix_end) are visible to every query of the row; keys [prefix_end, key_end) are tree
// keys, visible by their bit; no key at or past key_end is visible. Both ends are clamped to the
// cache length S so no kernel reads past it, whatever prefix_len holds.
struct TreeKeys {
  int64_t prefix_end;
  int64_t key_end;
};

E2K_HD TreeKeys tree_keys(int32_t prefix_len, int64_t S, int64_t W) {
  const int64_t p = prefix_len;
  const int64_t prefix_end = p < 0 ? 0 : (p > S ? S : p);
  const int64_t tree_end = p + 32 * W;
  return {prefix_end, tree_end < prefix_end ? prefix_end : (tree_end > S ? S : tree_end)};
}

// Whether tree key j (key prefix_len + j, 0 <= j < 32 * W) is visible through a query's mask words.
E2K_HD bool tree_bit(const int32_t* words, int64_t j) {
  return (static_cast<uint32_t>(words[j >> 5]) >> (j & 31)) & 1u;
}

// Sliding window (window > 0; 0: none). A key is visible to a query only if the query's position
// minus the key's is below window. A key's position is its cache index, except the n tree keys
// (key prefix_len + j, j < n), whose positions are the queries' own: positions[j] of the row.
E2K_HD int64_t key_position(const int32_t* positions, int32_t prefix_len, int64_t n, int64_t key) {
  const int64_t j = key - prefix_len;
  return j >= 0 && j < n ? positions[j] : key;
}

E2K_HD bool in_window(int64_t query_pos, int64_t key_pos, int64_t window) {
  return window <= 0 || query_pos - key_pos < window;
}

}  // namespace e2k
