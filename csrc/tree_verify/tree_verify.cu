// tree_verify on CUDA: one block per batch row. Every thread of the block runs the walk of
// tree_verify.h in lockstep (all its decisions come from block-wide results, so control flow is
// uniform); each per-node step is vocabulary-parallel across the block: argmax, the sampling
// distribution (softmax with temperature, top_k and top_p by radix selection, no sort) and the
// residual sample (inverse CDF by segment sums, then one warp scanning in id order).
// Semantics: eagle2_kernels.reference.tree_verify; shared rules: tree_verify.h.
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "eagle2_kernels/ops.h"
#include "tree_verify.h"

namespace e2k {
namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr unsigned kFullMask = 0xffffffffu;

struct Shared {
  double sums[kWarps];
  float maxes[kWarps];
  int64_t ids[kWarps];
  double hist[kWarps][16];
  int64_t found;
};

// Combine of identical values in every thread: warp shuffles, then each thread folds the
// per-warp partials in the same order.
template <class T, class Op>
__device__ T block_reduce(T v, Op op, T* partial) {
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(kFullMask, v, o));
  __syncthreads();  // partial may still be read by the previous reduction
  if ((threadIdx.x & 31) == 0) partial[threadIdx.x >> 5] = v;
  __syncthreads();
  T r = partial[0];
  for (int w = 1; w < kWarps; ++w) r = op(r, partial[w]);
  return r;
}

__device__ double block_sum(double v, Shared& sh) {
  return block_reduce(v, [](double a, double b) { return a + b; }, sh.sums);
}
__device__ float block_max(float v, Shared& sh) {
  return block_reduce(v, [](float a, float b) { return fmaxf(a, b); }, sh.maxes);
}
__device__ int64_t block_max(int64_t v, Shared& sh) {
  return block_reduce(v, [](int64_t a, int64_t b) { return a > b ? a : b; }, sh.ids);
}

// Argmax of (value, id) pairs, ties to the lower id.
__device__ int64_t block_argmax(float v, int64_t i, Shared& sh) {
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(kFullMask, v, o);
    const int64_t oi = __shfl_xor_sync(kFullMask, i, o);
    if (ranks_before(ov, oi, v, i)) v = ov, i = oi;
  }
  __syncthreads();
  if ((threadIdx.x & 31) == 0) sh.maxes[threadIdx.x >> 5] = v, sh.ids[threadIdx.x >> 5] = i;
  __syncthreads();
  for (int w = 0; w < kWarps; ++w)
    if (ranks_before(sh.maxes[w], sh.ids[w], v, i)) v = sh.maxes[w], i = sh.ids[w];
  return i;
}

// First id i in [0, V) whose inclusive running sum of value(i) in id order satisfies the
// monotone predicate crossed(sum); -1 if none. The block sums one contiguous segment of ids
// per warp; then warp 0 scans 32 ids at a time from the first segment whose end crosses (and
// on past it, should rounding in the two summation orders disagree).
template <class Value, class Crossed>
__device__ int64_t block_first_crossing(int64_t V, Value value, Crossed crossed, Shared& sh) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t seg = (V + kWarps - 1) / kWarps;
  const int64_t lo = min(V, warp * seg), hi = min(V, lo + seg);
  double s = 0.0;
  for (int64_t i = lo + lane; i < hi; i += 32) s += value(i);
  for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(kFullMask, s, o);
  __syncthreads();
  if (lane == 0) sh.sums[warp] = s;
  __syncthreads();
  double base = 0.0;
  int owner = -1;
  for (int w = 0; w < kWarps && owner < 0; ++w) {
    if (crossed(base + sh.sums[w]))
      owner = w;
    else
      base += sh.sums[w];
  }
  if (owner < 0) return -1;
  if (warp == 0) {
    double run = base;
    int64_t found = -1;
    for (int64_t start = min(V, owner * seg); start < V && found < 0; start += 32) {
      const int64_t i = start + lane;
      double x = i < V ? value(i) : 0.0;
      for (int o = 1; o < 32; o <<= 1) {
        const double t = __shfl_up_sync(kFullMask, x, o);
        if (lane >= o) x += t;
      }
      const unsigned hit = __ballot_sync(kFullMask, i < V && crossed(run + x));
      if (hit) found = start + __ffs(hit) - 1;
      run += __shfl_sync(kFullMask, x, 31);
    }
    if (lane == 0) sh.found = found;
  }
  __syncthreads();
  return sh.found;
}

// Id of the n-th (n >= 1, id order) entry of w[0..V) whose key is `key`.
__device__ int64_t nth_with_key(const float* w, int64_t V, uint32_t key, int64_t n, Shared& sh) {
  return block_first_crossing(
      V, [&](int64_t i) { return verify_order_key(w[i]) == key ? 1.0 : 0.0; },
      [&](double count) { return count >= double(n); }, sh);
}

struct Selection {
  uint32_t key;  // the selected key
  double above;  // count (kMass = false) or mass (true) of the entries with larger keys
  double at;     // count or mass of the entries with the selected key
};

// Radix selection over the keys of w[0..V), 4 bits per pass from the top (8 passes); each
// thread keeps its 16-bin histogram in registers, so there are no atomics.
// kMass = false: the goal-th largest key (the largest key t with at least goal keys >= t).
// kMass = true: the smallest key t of an entry with mass whose strictly larger entries hold
// mass < goal (entries are probabilities).
template <bool kMass>
__device__ Selection radix_select(const float* w, int64_t V, double goal, Shared& sh) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  Selection sel{0u, 0.0, 0.0};
  for (int shift = 28; shift >= 0; shift -= 4) {
    const uint32_t chosen_bits = shift == 28 ? 0u : ~0u << (shift + 4);
    double h[16];
#pragma unroll
    for (int d = 0; d < 16; ++d) h[d] = 0.0;
    for (int64_t i = threadIdx.x; i < V; i += kThreads) {
      const float x = w[i];
      const uint32_t key = verify_order_key(x);
      if ((key & chosen_bits) != sel.key) continue;
      const uint32_t digit = (key >> shift) & 15u;
      const double weight = kMass ? double(x) : 1.0;
#pragma unroll
      for (int d = 0; d < 16; ++d) h[d] += digit == uint32_t(d) ? weight : 0.0;
    }
#pragma unroll
    for (int d = 0; d < 16; ++d)
      for (int o = 16; o > 0; o >>= 1) h[d] += __shfl_xor_sync(kFullMask, h[d], o);
    __syncthreads();
    if (lane == 0)
      for (int d = 0; d < 16; ++d) sh.hist[warp][d] = h[d];
    __syncthreads();
    double higher = 0.0, higher_sel = 0.0, at = 0.0;
    int pick = -1;
    for (int d = 15; d >= 0; --d) {
      double bin = 0.0;
      for (int w2 = 0; w2 < kWarps; ++w2) bin += sh.hist[w2][d];
      if (kMass) {
        if (bin > 0.0) {
          if (sel.above + higher >= goal) break;  // this and every lower digit hold too much above
          pick = d, higher_sel = higher, at = bin;
        }
      } else if (sel.above + higher + bin >= goal) {
        pick = d, higher_sel = higher, at = bin;
        break;
      }
      higher += bin;
    }
    sel.key |= uint32_t(pick) << shift;
    sel.above += higher_sel;
    sel.at = at;
  }
  return sel;
}

// Reads row n of this batch row's [m, V] logits.
struct Logits {
  const void* base;
  int dtype;
  int64_t V;
  __device__ float operator()(int64_t n, int64_t i) const { return load_float(base, dtype, n * V + i); }
};

struct GreedyNode {
  Logits logits;
  Shared& sh;
  int32_t argmax = 0;

  __device__ void enter(int64_t n) {
    float best = kNegInf;
    int64_t best_i = INT64_MAX;
    for (int64_t i = threadIdx.x; i < logits.V; i += kThreads) {
      const float v = sanitize(logits(n, i));
      if (ranks_before(v, i, best, best_i)) best = v, best_i = i;
    }
    argmax = int32_t(block_argmax(best, best_i, sh));
  }
  __device__ bool try_child(int64_t, int32_t token) const { return token == argmax; }
};

struct SamplingNode {
  Logits logits;
  float temperature, top_p;
  int64_t top_k;
  const float* u;  // this row's uniforms [m]
  float* w;        // the current node's residual distribution [V] (workspace row)
  Shared& sh;
  double total = 0.0;

  // Each pass reads entries other threads wrote in the previous one, hence the barriers.
  __device__ void enter(int64_t n) {
    const int64_t V = logits.V;
    __syncthreads();  // w still holds the previous node's residual, read by try_child
    float mx = kNegInf;
    for (int64_t i = threadIdx.x; i < V; i += kThreads) {
      w[i] = verify_scaled_logit(logits(n, i), temperature);
      mx = fmaxf(mx, w[i]);
    }
    mx = block_max(mx, sh);  // its barriers publish w
    if (mx == kNegInf) {  // dead row: point mass on token 0
      for (int64_t i = threadIdx.x; i < V; i += kThreads) w[i] = i == 0 ? 1.0f : 0.0f;
      total = 1.0;
      __syncthreads();
      return;
    }
    uint32_t t = 0u;  // keep keys > t, and keys == t with id <= cut
    int64_t cut = V;
    if (top_k > 0 && top_k < V) {
      const Selection s = radix_select<false>(w, V, double(top_k), sh);
      const int64_t need = top_k - int64_t(s.above);  // >= 1
      t = s.key;
      if (int64_t(s.at) > need) cut = nth_with_key(w, V, t, need, sh);
    }
    double sum = 0.0;
    for (int64_t i = threadIdx.x; i < V; i += kThreads) {
      const uint32_t key = verify_order_key(w[i]);
      w[i] = key > t || (key == t && i <= cut) ? expf(w[i] - mx) : 0.0f;
      sum += w[i];
    }
    normalize(float(block_sum(sum, sh)));
    if (top_p < 1.0f) top_p_filter();
    sum = 0.0;
    for (int64_t i = threadIdx.x; i < V; i += kThreads) sum += w[i];
    total = verify_total(block_sum(sum, sh));
  }

  __device__ void normalize(float norm) {
    for (int64_t i = threadIdx.x; i < logits.V; i += kThreads) w[i] /= norm;
    __syncthreads();
  }

  __device__ void top_p_filter() {
    const int64_t V = logits.V;
    const Selection s = radix_select<true>(w, V, double(top_p), sh);
    const float v = order_key_float(s.key);
    double n_eq = 0.0;
    for (int64_t i = threadIdx.x; i < V; i += kThreads) n_eq += w[i] == v ? 1.0 : 0.0;
    const int64_t n_ties = int64_t(block_sum(n_eq, sh));
    const int64_t kept = verify_top_p_ties_kept(s.above, v, n_ties, top_p);
    const int64_t cut = kept == 0 ? -1 : kept == n_ties ? V : nth_with_key(w, V, s.key, kept, sh);
    double sum = 0.0;
    for (int64_t i = threadIdx.x; i < V; i += kThreads) {
      if (w[i] > v || (w[i] == v && i <= cut))
        sum += w[i];
      else
        w[i] = 0.0f;
    }
    normalize(float(block_sum(sum, sh)));
  }

  __device__ bool try_child(int64_t c, int32_t token) {
    const bool ok = verify_token_ok(token, logits.V);
    const float px = ok ? w[token] : 0.0f;
    if (verify_coin_accepts(u[c], total, px)) return true;
    total -= px;
    __syncthreads();  // every thread has read w[token]
    if (threadIdx.x == 0 && ok) w[token] = 0.0f;
    __syncthreads();
    return false;
  }

  // reference.sample_from on the residual with uniforms[b, 0].
  __device__ int32_t bonus() {
    const int64_t V = logits.V;
    const float threshold = verify_cdf_threshold(u[0], total);
    const int64_t hit = block_first_crossing(
        V, [&](int64_t i) { return double(w[i]); },
        [&](double run) { return verify_cdf_crossed(run, threshold); }, sh);
    if (hit >= 0) return int32_t(hit);
    int64_t last = -1;
    for (int64_t i = threadIdx.x; i < V; i += kThreads)
      if (w[i] > 0.0f) last = i;
    return int32_t(max(block_max(last, sh), int64_t(0)));
  }
};

__global__ void __launch_bounds__(kThreads)
    tree_verify_kernel(const int32_t* tokens, const int32_t* parents, const void* target_logits, int dtype,
                       int64_t m, int64_t V, int64_t L, float temperature, float top_p, int64_t top_k,
                       const float* uniforms, float* workspace, int32_t* accepted, int32_t* accept_len,
                       int32_t* bonus) {
  __shared__ Shared sh;
  const int64_t b = blockIdx.x;
  const int64_t elem = dtype == kFloat32 ? 4 : 2;
  const Logits logits{static_cast<const char*>(target_logits) + b * m * V * elem, dtype, V};
  const int32_t* tok = tokens + b * m;
  const int32_t* par = parents + b * m;
  int32_t* path = threadIdx.x == 0 ? accepted + b * L : nullptr;  // one writer
  int64_t len;
  int32_t token;
  if (uniforms) {
    SamplingNode node{logits, temperature, top_p, top_k, uniforms + b * m, workspace + b * V, sh};
    len = verify_walk(tok, par, m, L, node, path);
    token = node.bonus();
  } else {
    GreedyNode node{logits, sh};
    len = verify_walk(tok, par, m, L, node, path);
    token = node.argmax;
  }
  if (threadIdx.x == 0) {
    accept_len[b] = int32_t(len);
    bonus[b] = token;
  }
}

}  // namespace

void tree_verify_cuda(const int32_t* tokens, const int32_t* parents, const void* target_logits, int dtype,
                      int64_t B, int64_t m, int64_t V, int64_t L, float temperature, float top_p, int64_t top_k,
                      const float* uniforms, float* workspace, int32_t* accepted, int32_t* accept_len,
                      int32_t* bonus, void* stream) {
  tree_verify_kernel<<<dim3(unsigned(B)), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      tokens, parents, target_logits, dtype, m, V, L, temperature, top_p, top_k, uniforms, workspace, accepted,
      accept_len, bonus);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) throw std::runtime_error(std::string("tree_verify_cuda: launch failed: ") + cudaGetErrorString(err));
}

}  // namespace e2k
