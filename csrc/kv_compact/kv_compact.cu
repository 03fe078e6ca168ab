// kv_compact on a CUDA device. One thread per (cache row (n, b, h), vector column of a slot),
// copying the widest vector (up to 16 bytes) that the slot size and the base address allow.
//
// Why no two threads race: copy i moves slot prefix + accepted[i] to slot prefix + i of the
// same row, and a thread owns one column of one row, so all accesses to a given element come
// from one thread. Copies of all i at once would not be safe: destination prefix + j can be
// the source of an earlier copy i < j (accepted[i] == j, e.g. accepted = [0, 2, 3]). So each
// thread goes through i in chunks, loading a chunk's sources before storing it (the
// reference's gather) and chunks in increasing i: a later source prefix + accepted[j] is past
// every earlier destination prefix + i (i < j <= accepted[j] when accepted increases).
#include <cuda_runtime.h>

#include <algorithm>
#include <stdexcept>
#include <string>

#include "eagle2_kernels/ops.h"
#include "kv_compact.h"

namespace e2k {
namespace {

constexpr int kChunk = 8;  // accepted paths are short (depth + 1): usually one chunk
constexpr int kThreads = 256;

template <typename Vec>
__global__ void kv_compact_kernel(Vec* cache, int64_t rows, int64_t B, int64_t H, int64_t S, int64_t vecs,
                                  const int32_t* __restrict__ prefix_len, const int32_t* __restrict__ accepted,
                                  int64_t L, const int32_t* __restrict__ accept_len) {
  const int64_t total = rows * vecs;
  for (int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; t < total; t += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = t / vecs;
    const int64_t b = row / H % B;
    const int64_t copies = kv_copies(accept_len, b, L);
    const int64_t prefix = prefix_len[b];
    Vec* col = cache + row * S * vecs + t % vecs;
    for (int64_t i0 = 0; i0 < copies; i0 += kChunk) {
      Vec val[kChunk];
      int64_t src[kChunk];
#pragma unroll
      for (int c = 0; c < kChunk; ++c) {
        const int64_t i = i0 + c;
        src[c] = i < copies ? kv_source(prefix, accepted[b * L + i], i, S) : -1;
        if (src[c] >= 0) val[c] = col[src[c] * vecs];
      }
#pragma unroll
      for (int c = 0; c < kChunk; ++c)
        if (src[c] >= 0) col[(prefix + i0 + c) * vecs] = val[c];
    }
  }
}

template <typename Vec>
void launch(void* cache, int64_t slot_bytes, int64_t rows, int64_t B, int64_t H, int64_t S,
            const int32_t* prefix_len, const int32_t* accepted, int64_t L, const int32_t* accept_len,
            cudaStream_t stream) {
  const int64_t vecs = slot_bytes / int64_t(sizeof(Vec));
  const int64_t blocks = std::min<int64_t>((rows * vecs + kThreads - 1) / kThreads, int64_t(1) << 20);
  kv_compact_kernel<Vec><<<unsigned(blocks), kThreads, 0, stream>>>(static_cast<Vec*>(cache), rows, B, H, S, vecs,
                                                                   prefix_len, accepted, L, accept_len);
}

}  // namespace

void kv_compact_cuda(void* cache, int64_t elem_size, int64_t N, int64_t B, int64_t H, int64_t S, int64_t d,
                     const int32_t* prefix_len, const int32_t* accepted, int64_t L, const int32_t* accept_len,
                     void* stream) {
  const int64_t slot = d * elem_size, rows = N * B * H;
  if (slot == 0 || rows == 0 || S == 0 || L == 0) return;
  // Every slot starts at cache + k * slot, so its alignment is that of both.
  const uint64_t align = uint64_t(reinterpret_cast<uintptr_t>(cache)) | uint64_t(slot);
  const auto s = static_cast<cudaStream_t>(stream);
  if (align % 16 == 0) launch<uint4>(cache, slot, rows, B, H, S, prefix_len, accepted, L, accept_len, s);
  else if (align % 8 == 0) launch<uint2>(cache, slot, rows, B, H, S, prefix_len, accepted, L, accept_len, s);
  else if (align % 4 == 0) launch<uint32_t>(cache, slot, rows, B, H, S, prefix_len, accepted, L, accept_len, s);
  else if (align % 2 == 0) launch<uint16_t>(cache, slot, rows, B, H, S, prefix_len, accepted, L, accept_len, s);
  else launch<uint8_t>(cache, slot, rows, B, H, S, prefix_len, accepted, L, accept_len, s);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) throw std::runtime_error(std::string("kv_compact_cuda: kernel launch: ") + cudaGetErrorString(err));
}

}  // namespace e2k
