// Per-copy rule of kv_compact shared by the CPU and CUDA kernels. Semantics:
// eagle2_kernels.reference.kv_compact.
#pragma once
#include <cstdint>

#include "eagle2_kernels/common.h"

namespace e2k {

// Number of copies of batch row b: accept_len clamped to [0, L] (the wrapper checks it on CPU
// tensors; on a GPU the clamp keeps reads of `accepted` in bounds).
E2K_HD int64_t kv_copies(const int32_t* accept_len, int64_t b, int64_t L) {
  const int64_t n = accept_len[b];
  return n < 0 ? 0 : (n > L ? L : n);
}

// Source slot of copy i (destination slot prefix + i), or -1 when there is nothing to do: the
// entry is already in place, or either slot lies outside [0, S).
E2K_HD int64_t kv_source(int64_t prefix, int32_t accepted_i, int64_t i, int64_t S) {
  const int64_t dst = prefix + i, src = prefix + accepted_i;
  return src == dst || prefix < 0 || accepted_i < 0 || dst >= S || src >= S ? -1 : src;
}

}  // namespace e2k
