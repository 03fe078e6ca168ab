// PLACEHOLDER: replaced by the real kernel
#include <stdexcept>
#include "eagle2_kernels/ops.h"
namespace e2k {
void frontier_expand_cpu(const void* logits, int dtype, const float* parent_scores, int64_t B, int64_t K,
                         int64_t V, int64_t k, int32_t* child_tokens, float* child_scores,
                         int32_t* frontier_index, float* frontier_scores) {
  throw std::runtime_error("frontier_expand_cpu: not written yet");
}
}
