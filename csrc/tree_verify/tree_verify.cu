// PLACEHOLDER: replaced by the real kernel
#include <stdexcept>
#include "eagle2_kernels/ops.h"
namespace e2k {
void tree_verify_cuda(const int32_t* tokens, const int32_t* parents, const void* target_logits, int dtype,
                      int64_t B, int64_t m, int64_t V, int64_t L, float temperature, float top_p, int64_t top_k,
                      const float* uniforms, float* workspace, int32_t* accepted, int32_t* accept_len,
                      int32_t* bonus, void* stream) {
  throw std::runtime_error("tree_verify_cuda: not written yet");
}
}
