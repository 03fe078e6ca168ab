// PLACEHOLDER: replaced by the real kernel
#include <stdexcept>
#include "eagle2_kernels/ops.h"
namespace e2k {
void tree_attention_cpu(const void* q, const void* k_cache, const void* v_cache, int dtype,
                        const int32_t* tree_mask_bits, const int32_t* prefix_len, int64_t B, int64_t Hq,
                        int64_t Hkv, int64_t n, int64_t S, int64_t d, int64_t W, float scale, void* out) {
  throw std::runtime_error("tree_attention_cpu: not written yet");
}
}
