// PLACEHOLDER: replaced by the real kernel
#include <stdexcept>
#include "eagle2_kernels/ops.h"
namespace e2k {
void rerank_cuda(const float* cand_scores, const int32_t* cand_parents, const int32_t* cand_tokens,
                 const int32_t* root_tokens, const int32_t* prefix_len, int64_t B, int64_t N, int64_t m,
                 int64_t L, int32_t* tokens, int32_t* parents, int32_t* depth, int32_t* positions,
                 int32_t* mask_bits, int32_t* paths, int32_t* num_leaves, void* stream) {
  throw std::runtime_error("rerank_cuda: not written yet");
}
}
