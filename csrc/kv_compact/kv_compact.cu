// PLACEHOLDER: replaced by the real kernel
#include <stdexcept>
#include "eagle2_kernels/ops.h"
namespace e2k {
void kv_compact_cuda(void* cache, int64_t elem_size, int64_t N, int64_t B, int64_t H, int64_t S, int64_t d,
                     const int32_t* prefix_len, const int32_t* accepted, int64_t L, const int32_t* accept_len,
                     void* stream) {
  throw std::runtime_error("kv_compact_cuda: not written yet");
}
}
