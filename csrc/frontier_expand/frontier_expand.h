// frontier_expand logic shared by the CPU and CUDA kernels: the candidate order, the small sorted
// top-k list, the online log-sum-exp and the child score. Semantics: reference.frontier_expand.
#pragma once
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "eagle2_kernels/common.h"

namespace e2k {
namespace fe {

// Index of an empty list slot: loses to every real candidate, even a -inf one.
constexpr int32_t kNoIndex = INT32_MAX;

// Token ids and child indices are int32, and kNoIndex must stay above every real one.
inline void check_sizes(const char* op, int64_t B, int64_t K, int64_t V, int64_t k) {
  if (V >= kNoIndex || K * k >= kNoIndex || B * K >= kNoIndex) {
    throw std::invalid_argument(std::string(op) + ": V, K * k and B * K must be below 2^31 - 1");
  }
}

// Offer (v, i) to a list of n candidates sorted best first by ranks_before, the one total order
// of the op. Written as a bubble of fixed-position swaps so that, for a compile-time n, the list
// stays in GPU registers.
E2K_HD void topk_insert(float* vals, int32_t* idx, int n, float v, int32_t i) {
  if (!ranks_before(v, i, vals[n - 1], idx[n - 1])) return;
  vals[n - 1] = v;
  idx[n - 1] = i;
  for (int j = n - 1; j > 0; --j) {
    if (!ranks_before(vals[j], idx[j], vals[j - 1], idx[j - 1])) break;
    float tv = vals[j];
    vals[j] = vals[j - 1];
    vals[j - 1] = tv;
    int32_t ti = idx[j];
    idx[j] = idx[j - 1];
    idx[j - 1] = ti;
  }
}

// Running (max, sum of exp(x - max)) over a stream of sanitized values, so the log-sum-exp needs
// one pass. While every value seen is -inf the state is (-inf, 0).
struct LogSumExp {
  float max = kNegInf;
  float sum = 0.f;

  // Move the reference point to new_max (if larger) before adding terms exp(x - max).
  E2K_HD void raise_max(float new_max) {
    if (new_max > max) {
      sum = max == kNegInf ? 0.f : sum * expf(max - new_max);
      max = new_max;
    }
  }
  // Caller has raised max to >= x; a -inf max means x is -inf too and contributes nothing.
  E2K_HD void add(float x) {
    if (max != kNegInf) sum += expf(x - max);
  }
  E2K_HD void merge(LogSumExp o) {
    raise_max(o.max);
    if (o.max != kNegInf) sum += o.sum * expf(o.max - max);
  }
  // max + log(sum), as reference.log_softmax (-inf for a row with no finite value).
  E2K_HD float value() const { return max == kNegInf ? kNegInf : max + logf(sum); }
};

// parent + log p(x): the float32 operations of the reference, in its order.
E2K_HD float child_score(float parent, float x, float lse) {
  float logp = lse == kNegInf ? kNegInf : x - lse;
  return sanitize(parent) + logp;
}

}  // namespace fe
}  // namespace e2k
