// kv_compact on the CPU: one memcpy of a whole slot (d elements) per accepted entry.
#include <cstring>

#include "eagle2_kernels/ops.h"
#include "kv_compact.h"

namespace e2k {

void kv_compact_cpu(void* cache, int64_t elem_size, int64_t N, int64_t B, int64_t H, int64_t S, int64_t d,
                    const int32_t* prefix_len, const int32_t* accepted, int64_t L, const int32_t* accept_len) {
  const int64_t slot = d * elem_size;
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t b = 0; b < B; ++b) {
      const int64_t copies = kv_copies(accept_len, b, L);
      for (int64_t h = 0; h < H; ++h) {
        char* row = static_cast<char*>(cache) + ((n * B + b) * H + h) * S * slot;
        // Increasing i: accepted is strictly increasing, so source prefix + accepted[j] of a
        // later copy is past every earlier destination prefix + i (i < j <= accepted[j]), and
        // this in-place order reads exactly what the reference's gather reads.
        for (int64_t i = 0; i < copies; ++i) {
          const int64_t src = kv_source(prefix_len[b], accepted[b * L + i], i, S);
          if (src >= 0) std::memcpy(row + (prefix_len[b] + i) * slot, row + src * slot, size_t(slot));
        }
      }
    }
  }
}

}  // namespace e2k
