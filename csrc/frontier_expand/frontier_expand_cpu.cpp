// frontier_expand on the CPU: one pass over each frontier row's logits computes both its
// log-sum-exp (online max + rescaled sum) and its top-k (a k-sized sorted list), then the next
// frontier is the top-k of the row's K*k children. Rows are spread over OpenMP threads (torch's
// pool, at most the caller's count) when the work is large enough to pay for waking them.
#include <algorithm>
#include <stdexcept>
#include <string>
#include <vector>

#include "eagle2_kernels/ops.h"
#include "frontier_expand.h"

namespace e2k {
namespace {

// Logits are converted a chunk at a time into a small buffer that stays in L1, so the chunk's
// maximum is known before its exponentials are summed (one rescale per chunk, not per element)
// and the per-chunk partial sum keeps the float32 rounding error of long rows small. The buffer
// is padded with -inf to a fixed length and reduced in kLanes independent lanes so that the
// compiler vectorises the max and the exp-sum (a float reduction is otherwise kept in order).
constexpr int kChunk = 256;
constexpr int kLanes = 8;
// Below this many logits in total, waking threads costs more than it saves.
constexpr int64_t kMinParallelWork = int64_t(1) << 16;
// Logits per thread at least, so each thread's share dwarfs its wake-up cost.
constexpr int64_t kMinWorkPerThread = int64_t(1) << 15;

// Helpers for the chunk loops below. They avoid float compares on purpose: GCC (with its
// default -ftrapping-math) does not vectorise a loop that selects on a float compare, while
// integer selects vectorise fine.

// float_order_key with its sign bit flipped, as a signed int32: the same order, and the lane
// max below then is a signed one, which baseline x86-64 (SSE2) compares natively.
int32_t signed_order_key(float x) { return int32_t(float_order_key(x) ^ 0x80000000u); }
float signed_order_key_float(int32_t key) { return order_key_float(uint32_t(key) ^ 0x80000000u); }

// exp(x) for x <= 0 (-inf included) without a library call. Below -87 the result would be
// subnormal; it returns about 1.6e-38 instead, which is lost next to the row maximum's term
// exp(0) = 1 in every sum it enters. Error: below 1.2 ulp (checked against double exp).
float exp_nonpositive(float x) {
  // Clamp to -87 by the bits: for x <= 0 a larger bit pattern is a more negative float.
  x = bits_to_float(std::min(float_to_bits(x), float_to_bits(-87.f)));
  // x = n ln2 + r with |r| <= ln2 / 2; n by the round-to-nearest of adding 1.5 * 2^23.
  const float n = (x * 1.44269504f + 12582912.f) - 12582912.f;
  const float r = (x - n * 0.693145752f) - n * 1.42860677e-06f;
  float p = 1.f / 5040;
  p = p * r + 1.f / 720;
  p = p * r + 1.f / 120;
  p = p * r + 1.f / 24;
  p = p * r + 1.f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  return p * bits_to_float(uint32_t(int32_t(n) + 127) << 23);
}

float chunk_max(const float* buf) {
  int32_t m[kLanes];
  std::fill(m, m + kLanes, signed_order_key(kNegInf));
  for (int j = 0; j < kChunk; j += kLanes)
    for (int l = 0; l < kLanes; ++l) m[l] = std::max(m[l], signed_order_key(buf[j + l]));
  return signed_order_key_float(*std::max_element(m, m + kLanes));
}

// sum of exp(buf[j] - max); max is finite and >= every buf[j].
float chunk_exp_sum(const float* buf, float max) {
  float s[kLanes] = {};
  for (int j = 0; j < kChunk; j += kLanes)
    for (int l = 0; l < kLanes; ++l) s[l] += exp_nonpositive(buf[j + l] - max);
  float sum = 0.f;
  for (float v : s) sum += v;
  return sum;
}

// Above this k the sorted-list insertion (O(k) per candidate, so O(V k) a row) loses to one
// partial sort of the whole row (O(V + k log k)).
constexpr int64_t kListMaxK = 32;

// The k best of values[0, n) (ranks_before order: higher value, then lower index) into
// (vals, idx), best first; empty slots (k > n) keep (-inf, kNoIndex).
void topk_partial_sort(const float* values, int64_t n, int64_t k, float* vals, int32_t* idx) {
  std::vector<int32_t> order(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) order[size_t(i)] = int32_t(i);
  const auto better = [values](int32_t a, int32_t b) { return ranks_before(values[a], a, values[b], b); };
  const int64_t top = std::min(k, n);
  if (top < n) std::nth_element(order.begin(), order.begin() + top, order.end(), better);
  std::sort(order.begin(), order.begin() + top, better);
  for (int64_t j = 0; j < k; ++j) {
    vals[j] = j < top ? values[order[size_t(j)]] : kNegInf;
    idx[j] = j < top ? order[size_t(j)] : fe::kNoIndex;
  }
}

// Top-k of one row by logit into (vals, toks), best first; returns the row's log-sum-exp.
template <int kDType>
float scan_row(const void* row, int64_t V, int64_t k, float* vals, int32_t* toks) {
  if (k > kListMaxK) {  // large k: the row sanitised once, then one partial sort
    std::vector<float> all(static_cast<size_t>(V));
    fe::LogSumExp lse;
    float buf[kChunk];
    for (int64_t c = 0; c < V; c += kChunk) {
      const int n = int(std::min<int64_t>(kChunk, V - c));
      for (int j = 0; j < n; ++j) buf[j] = all[size_t(c + j)] = sanitize(load_float(row, kDType, c + j));
      std::fill(buf + n, buf + kChunk, kNegInf);
      lse.raise_max(chunk_max(buf));
      if (lse.max != kNegInf) lse.sum += chunk_exp_sum(buf, lse.max);
    }
    topk_partial_sort(all.data(), V, k, vals, toks);
    return lse.value();
  }
  std::fill(vals, vals + k, kNegInf);
  std::fill(toks, toks + k, fe::kNoIndex);
  fe::LogSumExp lse;
  float buf[kChunk];
  for (int64_t c = 0; c < V; c += kChunk) {
    const int n = int(std::min<int64_t>(kChunk, V - c));
    for (int j = 0; j < n; ++j) buf[j] = sanitize(load_float(row, kDType, c + j));
    std::fill(buf + n, buf + kChunk, kNegInf);
    const float m = chunk_max(buf);
    // Only a chunk holding a value >= the list's worst entry can change the list.
    if (m >= vals[k - 1]) {
      for (int j = 0; j < n; ++j) fe::topk_insert(vals, toks, int(k), buf[j], int32_t(c + j));
    }
    lse.raise_max(m);
    if (lse.max != kNegInf) lse.sum += chunk_exp_sum(buf, lse.max);
  }
  return lse.value();
}

// Rows [r0, r1) of the B*K frontier rows: their children's tokens and scores.
template <int kDType>
void expand_rows(const void* logits, const float* parent_scores, int64_t V, int64_t k, int64_t r0, int64_t r1,
                 int32_t* child_tokens, float* child_scores) {
  const int64_t row_bytes = V * (kDType == kFloat32 ? 4 : 2);
  for (int64_t r = r0; r < r1; ++r) {
    float* vals = child_scores + r * k;  // holds the logits until the log-sum-exp is known
    const float lse = scan_row<kDType>(static_cast<const char*>(logits) + r * row_bytes, V, k, vals,
                                       child_tokens + r * k);
    for (int64_t j = 0; j < k; ++j) vals[j] = fe::child_score(parent_scores[r], vals[j], lse);
  }
}

template <int kDType>
void expand_all_rows(const void* logits, const float* parent_scores, int64_t rows, int64_t V, int64_t k,
                     int32_t* child_tokens, float* child_scores, int64_t threads) {
  const int64_t work = rows * V;
  const int64_t n = work < kMinParallelWork ? 1 : std::clamp<int64_t>(work / kMinWorkPerThread, 1, std::min(rows, threads));
#pragma omp parallel for num_threads(int(n)) schedule(static) if (n > 1)
  for (int64_t r = 0; r < rows; ++r) expand_rows<kDType>(logits, parent_scores, V, k, r, r + 1, child_tokens, child_scores);
}

}  // namespace

void frontier_expand_cpu(const void* logits, int dtype, const float* parent_scores, int64_t B, int64_t K,
                         int64_t V, int64_t k, int32_t* child_tokens, float* child_scores,
                         int32_t* frontier_index, float* frontier_scores, int64_t threads) {
  fe::check_sizes("frontier_expand_cpu", B, K, V, k);
  switch (dtype) {
    case kFloat32:
      expand_all_rows<kFloat32>(logits, parent_scores, B * K, V, k, child_tokens, child_scores, threads);
      break;
    case kFloat16:
      expand_all_rows<kFloat16>(logits, parent_scores, B * K, V, k, child_tokens, child_scores, threads);
      break;
    case kBFloat16:
      expand_all_rows<kBFloat16>(logits, parent_scores, B * K, V, k, child_tokens, child_scores, threads);
      break;
    default:
      throw std::invalid_argument("frontier_expand_cpu: unknown dtype code " + std::to_string(dtype));
  }
  const int64_t n = K * k;  // children per batch row
  for (int64_t b = 0; b < B; ++b) {
    float* vals = frontier_scores + b * k;
    int32_t* idx = frontier_index + b * k;
    if (k > kListMaxK) {
      topk_partial_sort(child_scores + b * n, n, k, vals, idx);
      continue;
    }
    std::fill(vals, vals + k, kNegInf);
    std::fill(idx, idx + k, fe::kNoIndex);
    for (int64_t c = 0; c < n; ++c) fe::topk_insert(vals, idx, int(k), child_scores[b * n + c], int32_t(c));
  }
}

}  // namespace e2k
