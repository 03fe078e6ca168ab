// rerank on a CUDA device: one block per batch row, all of a row's candidates in shared
// memory. Selection: a bitonic sort of packed 64-bit keys (score key, depth, index), which
// orders exactly like rerank_before; the m-1 smallest keys are the kept candidates. The tree
// layout uses the walks shared with the CPU kernel (rerank.h).
#include <cuda_runtime.h>

#include <algorithm>
#include <stdexcept>
#include <string>

#include "eagle2_kernels/ops.h"
#include "rerank.h"

namespace e2k {
namespace {

// Largest candidate count per row. Depth and index are packed in 16 bits each, and the shared
// memory footprint (shared_bytes) stays under the opt-in limit of sm_80 and later (163 KB).
constexpr int64_t kMaxCandidates = 8192;
static_assert(kMaxCandidates < (1 << 16), "depth and index are packed in 16 bits");
constexpr int kMaxWarps = 32;

int64_t pow2_at_least(int64_t n) {
  int64_t p = 1;
  while (p < n) p <<= 1;
  return p;
}

// Sort keys (padded to a power of two), candidate parents, candidate -> node, node -> path row,
// and the scan scratch.
size_t shared_bytes(int64_t N, int64_t m) {
  return sizeof(uint64_t) * pow2_at_least(N) + sizeof(int32_t) * (2 * N + m + kMaxWarps);
}

__device__ uint64_t pack_key(float eff, int32_t depth, int32_t index) {
  return uint64_t(rerank_score_key(eff)) << 32 | uint64_t(depth) << 16 | uint64_t(index);
}

// Replaces each flag (nonzero = set) by base + the number of set flags before it, or -1 if
// unset; returns the number of set flags. All threads of the block must call it; blockDim.x
// is a multiple of 32. Each thread scans one contiguous chunk, so order is preserved.
__device__ int block_enumerate(int32_t* flags, int n, int base, int32_t* scratch) {
  const int t = threadIdx.x, lane = t & 31, warp = t >> 5, warps = blockDim.x >> 5;
  const int per = (n + blockDim.x - 1) / blockDim.x;
  const int lo = min(n, t * per), hi = min(n, lo + per);
  int count = 0;
  for (int i = lo; i < hi; ++i) count += flags[i] != 0;
  int incl = count;
  for (int o = 1; o < 32; o <<= 1) {
    const int y = __shfl_up_sync(0xffffffffu, incl, o);
    if (lane >= o) incl += y;
  }
  if (lane == 31) scratch[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    int w = lane < warps ? scratch[lane] : 0;
    for (int o = 1; o < 32; o <<= 1) {
      const int y = __shfl_up_sync(0xffffffffu, w, o);
      if (lane >= o) w += y;
    }
    scratch[lane] = w;  // inclusive warp totals
  }
  __syncthreads();
  int next = base + incl - count + (warp > 0 ? scratch[warp - 1] : 0);
  const int total = scratch[warps - 1];
  for (int i = lo; i < hi; ++i) flags[i] = flags[i] != 0 ? next++ : -1;
  __syncthreads();  // flags complete; scratch free for the next call
  return total;
}

__global__ void rerank_kernel(const float* __restrict__ cand_scores, const int32_t* __restrict__ cand_parents,
                              const int32_t* __restrict__ cand_tokens, const int32_t* __restrict__ root_tokens,
                              const int32_t* __restrict__ prefix_len, int N, int P, int m, int64_t L,
                              int32_t* tokens, int32_t* parents, int32_t* depth, int32_t* positions,
                              int32_t* mask_bits, int32_t* paths, int32_t* num_leaves) {
  extern __shared__ uint64_t s_key[];  // [P]
  int32_t* s_par = reinterpret_cast<int32_t*>(s_key + P);
  int32_t* s_node = s_par + N;  // kept flag, then candidate -> node index (-1: dropped)
  int32_t* s_leaf = s_node + N;  // leaf flag, then node -> path row (-1: not a leaf)
  int32_t* scratch = s_leaf + m;

  const int64_t b = blockIdx.x;
  const float* score = cand_scores + b * N;
  const int64_t W = (m + 31) / 32;
  tokens += b * m;
  parents += b * m;
  depth += b * m;
  positions += b * m;

  for (int i = threadIdx.x; i < N; i += blockDim.x) {
    s_par[i] = rerank_cand_parent(cand_parents + b * N, i);
    s_node[i] = 0;
  }
  for (int j = threadIdx.x; j < m; j += blockDim.x) s_leaf[j] = 1;
  __syncthreads();

  // Effective score and depth: each candidate walks its own (short) ancestor chain.
  for (int i = threadIdx.x; i < P; i += blockDim.x) {
    if (i >= N) {
      s_key[i] = ~uint64_t(0);  // padding sorts last
      continue;
    }
    float e = sanitize(score[i]);
    int32_t d = 1;
    for (int32_t p = s_par[i]; p >= 0; p = s_par[p]) {
      e = fminf(e, sanitize(score[p]));
      ++d;
    }
    s_key[i] = pack_key(e, d, i);
  }
  __syncthreads();

  for (int size = 2; size <= P; size <<= 1) {
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      for (int t = threadIdx.x; t < P / 2; t += blockDim.x) {
        const int lo = 2 * t - (t & (stride - 1)), hi = lo + stride;
        const uint64_t x = s_key[lo], y = s_key[hi];
        if ((x > y) == ((lo & size) == 0)) {
          s_key[lo] = y;
          s_key[hi] = x;
        }
      }
      __syncthreads();
    }
  }

  for (int r = threadIdx.x; r < m - 1; r += blockDim.x) s_node[s_key[r] & 0xffff] = 1;
  __syncthreads();
  block_enumerate(s_node, N, 1, scratch);

  if (threadIdx.x == 0) rerank_set_node(0, root_tokens[b], -1, 0, prefix_len[b], tokens, parents, depth, positions);
  for (int r = threadIdx.x; r < m - 1; r += blockDim.x) {
    const int32_t i = int32_t(s_key[r] & 0xffff), d = int32_t(s_key[r] >> 16 & 0xffff);
    const int32_t p = s_par[i];  // kept, since the kept set is closed under ancestors
    const int32_t pnode = p >= 0 ? s_node[p] : 0;
    rerank_set_node(s_node[i], cand_tokens[b * N + i], pnode, d, prefix_len[b], tokens, parents, depth, positions);
    s_leaf[pnode] = 0;
  }
  __syncthreads();  // also makes this block's global writes of parents/depth visible to it
  const int leaves = block_enumerate(s_leaf, m, 0, scratch);

  uint32_t* mask = reinterpret_cast<uint32_t*>(mask_bits) + b * m * W;
  int32_t* prow = paths + b * m * L;
  for (int j = threadIdx.x; j < m; j += blockDim.x) {
    rerank_mask_row(parents, j, W, mask + j * W);
    if (s_leaf[j] >= 0) rerank_path_row(parents, depth, j, L, prow + s_leaf[j] * L);
    if (j >= leaves)
      for (int64_t c = 0; c < L; ++c) prow[j * L + c] = -1;
  }
  if (threadIdx.x == 0) num_leaves[b] = leaves;
}

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw std::runtime_error(std::string("rerank_cuda: ") + what + ": " + cudaGetErrorString(err));
}

}  // namespace

void rerank_cuda(const float* cand_scores, const int32_t* cand_parents, const int32_t* cand_tokens,
                 const int32_t* root_tokens, const int32_t* prefix_len, int64_t B, int64_t N, int64_t m,
                 int64_t L, int32_t* tokens, int32_t* parents, int32_t* depth, int32_t* positions,
                 int32_t* mask_bits, int32_t* paths, int32_t* num_leaves, void* stream) {
  if (N > kMaxCandidates)
    throw std::runtime_error("rerank_cuda: at most " + std::to_string(kMaxCandidates) +
                             " candidates per row are supported (all of a row's candidates live in shared "
                             "memory), got N = " + std::to_string(N) + "; use the cpu or reference backend");
  if (B == 0) return;
  const size_t smem = shared_bytes(N, m);
  if (smem > 48 * 1024) {
    int dev = 0, limit = 0;
    check(cudaGetDevice(&dev), "cudaGetDevice");
    check(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev), "cudaDeviceGetAttribute");
    if (smem > size_t(limit))
      throw std::runtime_error("rerank_cuda: N = " + std::to_string(N) + " candidates need " + std::to_string(smem) +
                               " bytes of shared memory, this device allows " + std::to_string(limit));
    check(cudaFuncSetAttribute(rerank_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)),
          "cudaFuncSetAttribute");
  }
  // One thread per compare-exchange of the sort (P / 2) or per node, 64 to 1024.
  const int64_t P = pow2_at_least(N);
  const int threads = int(std::min<int64_t>(1024, std::max<int64_t>(64, (std::max(P / 2, m) + 31) / 32 * 32)));
  rerank_kernel<<<unsigned(B), threads, smem, static_cast<cudaStream_t>(stream)>>>(
      cand_scores, cand_parents, cand_tokens, root_tokens, prefix_len, int(N), int(P), int(m), L, tokens, parents,
      depth, positions, mask_bits, paths, num_leaves);
  check(cudaGetLastError(), "kernel launch");
}

}  // namespace e2k
