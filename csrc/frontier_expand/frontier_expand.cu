// frontier_expand on the GPU, two launches on the caller's stream and no host synchronisation:
//   1. one block per (batch, frontier row): a single pass over the row's logits with 16-byte
//      loads feeds each thread's online log-sum-exp and its own sorted top-KT list; the block
//      then reduces the log-sum-exp and merges the lists by rounds of block-wide argmax, and
//      writes the row's children (tokens, parent score + log p).
//   2. one block per batch row: the same top-k machinery over its K*k child scores gives the
//      next frontier.
// For k > KT a block repeats the pass, each round collecting the next KT candidates strictly
// worse than the last one taken, so any k works with register-sized lists.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "eagle2_kernels/ops.h"
#include "frontier_expand.h"

namespace e2k {
namespace {

constexpr int kThreads = 512;  // enough 16-byte loads in flight per SM to stream a row
constexpr int kWarps = kThreads / 32;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <int kDType>
struct Elem;
template <>
struct Elem<kFloat32> { using T = float; };
template <>
struct Elem<kFloat16> { using T = __half; };
template <>
struct Elem<kBFloat16> { using T = __nv_bfloat16; };

// One thread's share of a row: its best KT candidates strictly worse than the bound (the last
// candidate taken by the previous round), and optionally its part of the log-sum-exp.
template <int KT>
struct ThreadScan {
  float vals[KT];
  int32_t idx[KT];
  float bound_v;
  int32_t bound_i;
  bool with_lse;
  fe::LogSumExp lse;

  __device__ void offer(float x, int32_t i) {
    if (ranks_before(bound_v, bound_i, x, i)) fe::topk_insert(vals, idx, KT, x, i);
  }
  // n sanitized values of consecutive tokens from i0.
  template <int n>
  __device__ void offer_all(const float (&x)[n], int32_t i0) {
    if (with_lse) {
      float m = x[0];
#pragma unroll
      for (int j = 1; j < n; ++j) m = fmaxf(m, x[j]);
      lse.raise_max(m);
#pragma unroll
      for (int j = 0; j < n; ++j) lse.add(x[j]);
    }
#pragma unroll
    for (int j = 0; j < n; ++j) offer(x[j], i0 + j);
  }
};

template <int kDType, int KT>
__device__ void scan_row(const typename Elem<kDType>::T* row, int64_t n, ThreadScan<KT>& st) {
  using T = typename Elem<kDType>::T;
  constexpr int kVec = 16 / sizeof(T);
  // Vector loads need a 16-byte aligned address: scalar loads up to the first aligned element
  // (rows of 16-bit logits with V * 2 % 16 != 0 start anywhere), vectors, then a scalar tail.
  const uintptr_t addr = reinterpret_cast<uintptr_t>(row);
  int64_t head = addr % sizeof(T) ? n : int64_t((16 - addr % 16) % 16 / sizeof(T));
  head = head < n ? head : n;
  const int64_t nvec = (n - head) / kVec;
  for (int64_t i = threadIdx.x; i < head; i += kThreads) {
    const float x[1] = {sanitize(to_float(row[i]))};
    st.offer_all(x, int32_t(i));
  }
  const uint4* vrow = reinterpret_cast<const uint4*>(row + head);
#pragma unroll 4
  for (int64_t v = threadIdx.x; v < nvec; v += kThreads) {
    const uint4 raw = vrow[v];
    const T* e = reinterpret_cast<const T*>(&raw);
    float x[kVec];
#pragma unroll
    for (int j = 0; j < kVec; ++j) x[j] = sanitize(to_float(e[j]));
    st.offer_all(x, int32_t(head + v * kVec));
  }
  for (int64_t i = head + nvec * kVec + threadIdx.x; i < n; i += kThreads) {
    const float x[1] = {sanitize(to_float(row[i]))};
    st.offer_all(x, int32_t(i));
  }
}

// Block-wide best (value, index) by ranks_before; every thread gets the winner.
__device__ void block_best(float& v, int32_t& i) {
  __shared__ float warp_v[kWarps];
  __shared__ int32_t warp_i[kWarps];
  __shared__ float best_v;
  __shared__ int32_t best_i;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int off = 16; off > 0; off /= 2) {
    const float ov = __shfl_xor_sync(0xffffffffu, v, off);
    const int32_t oi = __shfl_xor_sync(0xffffffffu, i, off);
    if (ranks_before(ov, oi, v, i)) v = ov, i = oi;
  }
  if (lane == 0) warp_v[warp] = v, warp_i[warp] = i;
  __syncthreads();
  if (warp == 0) {
    v = lane < kWarps ? warp_v[lane] : kNegInf;
    i = lane < kWarps ? warp_i[lane] : fe::kNoIndex;
    for (int off = 16; off > 0; off /= 2) {
      const float ov = __shfl_xor_sync(0xffffffffu, v, off);
      const int32_t oi = __shfl_xor_sync(0xffffffffu, i, off);
      if (ranks_before(ov, oi, v, i)) v = ov, i = oi;
    }
    if (lane == 0) best_v = v, best_i = i;
  }
  __syncthreads();
  v = best_v;
  i = best_i;
}

// Block-wide log-sum-exp of the threads' partial states; every thread gets the value.
__device__ float block_lse(fe::LogSumExp s) {
  __shared__ float warp_max[kWarps], warp_sum[kWarps];
  __shared__ float result;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int off = 16; off > 0; off /= 2) {
    s.merge({__shfl_xor_sync(0xffffffffu, s.max, off), __shfl_xor_sync(0xffffffffu, s.sum, off)});
  }
  if (lane == 0) warp_max[warp] = s.max, warp_sum[warp] = s.sum;
  __syncthreads();
  if (warp == 0) {
    s = lane < kWarps ? fe::LogSumExp{warp_max[lane], warp_sum[lane]} : fe::LogSumExp{};
    for (int off = 16; off > 0; off /= 2) {
      s.merge({__shfl_xor_sync(0xffffffffu, s.max, off), __shfl_xor_sync(0xffffffffu, s.sum, off)});
    }
    if (lane == 0) result = s.value();
  }
  __syncthreads();
  return result;
}

// The top-k (best first) of each of gridDim.x rows of n values. Child mode (parent_scores !=
// nullptr): rows are frontier rows of logits, out_val = parent + log p. Otherwise out_val = value.
template <int kDType, int KT>
__global__ void __launch_bounds__(kThreads)
    topk_rows_kernel(const void* in, const float* parent_scores, int64_t n, int64_t k, int32_t* out_idx,
                     float* out_val) {
  using T = typename Elem<kDType>::T;
  const int64_t r = blockIdx.x;
  const T* row = static_cast<const T*>(in) + r * n;
  out_idx += r * k;
  out_val += r * k;
  ThreadScan<KT> st;
  st.bound_v = __int_as_float(0x7f800000);  // +inf: nothing taken yet, every value qualifies
  st.bound_i = -1;
  st.with_lse = parent_scores != nullptr;
  float lse = 0.f;
  for (int64_t found = 0; found < k;) {
#pragma unroll
    for (int j = 0; j < KT; ++j) st.vals[j] = kNegInf, st.idx[j] = fe::kNoIndex;
    scan_row<kDType, KT>(row, n, st);
    if (st.with_lse) {
      lse = block_lse(st.lse);
      st.with_lse = false;  // later rounds only collect candidates
    }
    const int64_t take = k - found < KT ? k - found : KT;
    for (int64_t t = 0; t < take; ++t) {
      float v = st.vals[0];
      int32_t i = st.idx[0];
      block_best(v, i);
      if (st.idx[0] == i) {  // this thread held the winner: drop it from its list
#pragma unroll
        for (int j = 0; j + 1 < KT; ++j) st.vals[j] = st.vals[j + 1], st.idx[j] = st.idx[j + 1];
        st.vals[KT - 1] = kNegInf;
        st.idx[KT - 1] = fe::kNoIndex;
      }
      if (threadIdx.x == 0) {
        out_idx[found + t] = i;
        out_val[found + t] = parent_scores ? fe::child_score(parent_scores[r], v, lse) : v;
      }
      st.bound_v = v;
      st.bound_i = i;
    }
    found += take;
  }
}

// KT = 4 covers small k with fewer registers; larger k uses 16-wide lists (and rounds past 16).
template <int kDType>
void launch_topk_rows(const void* in, const float* parent_scores, int64_t rows, int64_t n, int64_t k,
                      int32_t* out_idx, float* out_val, cudaStream_t stream) {
  if (k <= 4) {
    topk_rows_kernel<kDType, 4><<<unsigned(rows), kThreads, 0, stream>>>(in, parent_scores, n, k, out_idx, out_val);
  } else {
    topk_rows_kernel<kDType, 16><<<unsigned(rows), kThreads, 0, stream>>>(in, parent_scores, n, k, out_idx, out_val);
  }
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) throw std::runtime_error(std::string("frontier_expand_cuda: ") + cudaGetErrorString(err));
}

}  // namespace

void frontier_expand_cuda(const void* logits, int dtype, const float* parent_scores, int64_t B, int64_t K,
                          int64_t V, int64_t k, int32_t* child_tokens, float* child_scores,
                          int32_t* frontier_index, float* frontier_scores, void* stream) {
  fe::check_sizes("frontier_expand_cuda", B, K, V, k);
  const auto s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case kFloat32:
      launch_topk_rows<kFloat32>(logits, parent_scores, B * K, V, k, child_tokens, child_scores, s);
      break;
    case kFloat16:
      launch_topk_rows<kFloat16>(logits, parent_scores, B * K, V, k, child_tokens, child_scores, s);
      break;
    case kBFloat16:
      launch_topk_rows<kBFloat16>(logits, parent_scores, B * K, V, k, child_tokens, child_scores, s);
      break;
    default:
      throw std::invalid_argument("frontier_expand_cuda: unknown dtype code " + std::to_string(dtype));
  }
  launch_topk_rows<kFloat32>(child_scores, nullptr, B, K * k, k, frontier_index, frontier_scores, s);
}

}  // namespace e2k
