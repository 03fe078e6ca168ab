// tree_verify on the CPU: one walk per batch row (rows in parallel on std::threads); the target
// decision (argmax or sampling distribution) is computed only at the nodes the walk visits.
// Semantics: eagle2_kernels.reference.tree_verify; shared rules: tree_verify.h.
#include <algorithm>
#include <array>
#include <cmath>
#include <functional>
#include <utility>
#include <vector>

#include <omp.h>

#include "eagle2_kernels/ops.h"
#include "tree_verify.h"

namespace e2k {
namespace {

// Calls fn(load), load(i) = element offset + i of the logits as float, with the dtype switch
// hoisted out of the per-token loops.
template <class Fn>
void with_row(const void* logits, int dtype, int64_t offset, Fn&& fn) {
  if (dtype == kFloat16) {
    const uint16_t* h = static_cast<const uint16_t*>(logits) + offset;
    fn([h](int64_t i) { return half_bits_to_float(h[i]); });
  } else if (dtype == kBFloat16) {
    const uint16_t* h = static_cast<const uint16_t*>(logits) + offset;
    fn([h](int64_t i) { return bf16_bits_to_float(h[i]); });
  } else {
    const float* f = static_cast<const float*>(logits) + offset;
    fn([f](int64_t i) { return f[i]; });
  }
}

// Keeps the top_k largest of x[0..V) (ties: lower id), sets the others to -inf. nth_element on
// a copy finds the k-th largest value t in O(V); ties at t are then kept in id order.
void keep_top_k(float* x, int64_t V, int64_t k, std::vector<float>& scratch) {
  scratch.assign(x, x + V);
  std::nth_element(scratch.begin(), scratch.begin() + (k - 1), scratch.end(), std::greater<float>());
  const float t = scratch[k - 1];
  int64_t ties = k - std::count_if(scratch.begin(), scratch.begin() + (k - 1), [t](float v) { return v > t; });
  for (int64_t i = 0; i < V; ++i) {
    if (x[i] > t) continue;
    if (x[i] == t && ties > 0) {
      --ties;
      continue;
    }
    x[i] = kNegInf;
  }
}

// The top_p boundary: the smallest probability v whose strictly larger tokens hold mass
// `above` < top_p, and how many tokens equal v. Every token above v is kept, the ones below
// are not, and verify_top_p_ties_kept decides the ties.
struct TopPBoundary {
  float v;
  double above;
  int64_t n_eq;
};

// Weighted quickselect on a[0..n) (reordered; expected O(n), no sort), given that the values
// above all of a[] hold mass `above` < top_p and that a[] holds the boundary.
TopPBoundary top_p_boundary(float* a, int64_t n, float top_p, double above) {
  int64_t lo = 0, hi = n;  // invariant: the boundary is in a[lo..hi), `above` the mass over it
  for (;;) {
    float q0 = a[lo], q1 = a[lo + (hi - lo) / 2], q2 = a[hi - 1];
    const float q = std::max(std::min(q0, q1), std::min(std::max(q0, q1), q2));  // median of three
    // Three-way partition: [lo, gt) > q, [gt, lt) == q, [lt, hi) < q.
    int64_t gt = lo, i = lo, lt = hi;
    double mass_gt = 0.0;
    while (i < lt) {
      if (a[i] > q) {
        mass_gt += a[i];
        std::swap(a[i++], a[gt++]);
      } else if (a[i] < q) {
        std::swap(a[i], a[--lt]);
      } else {
        ++i;
      }
    }
    if (above + mass_gt < top_p) {
      const double mass_eq = double(lt - gt) * double(q);
      if (lt < hi && above + mass_gt + mass_eq < top_p) {  // a smaller value still qualifies
        above += mass_gt + mass_eq;
        lo = lt;
        continue;
      }
      return {q, above + mass_gt, lt - gt};
    }
    hi = gt;  // nonempty: above < top_p <= above + mass_gt
  }
}

// Zeroes the tokens outside the top_p set of the distribution p[0..V) and renormalises. A
// radix pass first narrows the boundary to one bucket of values (the top bits of a
// non-negative float order it like its value), so the quickselect only sees that bucket.
void keep_top_p(float* p, int64_t V, float top_p, std::vector<float>& scratch) {
  constexpr int kShift = 20;  // 2048 buckets: exponent and 3 mantissa bits
  auto bucket = [](float x) { return float_to_bits(x) >> kShift; };
  std::array<double, (size_t(1) << (31 - kShift))> mass{};  // sign bit 0
  for (int64_t i = 0; i < V; ++i) mass[bucket(p[i])] += p[i];
  // The boundary's bucket: the lowest one with mass whose larger buckets hold mass < top_p.
  double above = 0.0, above_pick = 0.0;
  uint32_t pick = 0;
  for (size_t k = mass.size(); k-- > 0;) {
    if (mass[k] > 0.0) {
      if (above >= top_p) break;
      pick = uint32_t(k);
      above_pick = above;
    }
    above += mass[k];
  }
  scratch.clear();
  for (int64_t i = 0; i < V; ++i)
    if (p[i] > 0.0f && bucket(p[i]) == pick) scratch.push_back(p[i]);
  const TopPBoundary bd = top_p_boundary(scratch.data(), int64_t(scratch.size()), top_p, above_pick);
  int64_t ties = verify_top_p_ties_kept(bd.above, bd.v, bd.n_eq, top_p);
  double kept = 0.0;
  for (int64_t i = 0; i < V; ++i) {
    if (p[i] > bd.v || (p[i] == bd.v && ties > 0)) {
      ties -= p[i] == bd.v;
      kept += p[i];
    } else {
      p[i] = 0.0f;
    }
  }
  const float norm = float(kept);
  for (int64_t i = 0; i < V; ++i) p[i] /= norm;
}

// reference.sampling_probs of one logits row into p[0..V); returns its total (verify_total).
template <class Load>
double sampling_probs(Load load, int64_t V, float temperature, float top_p, int64_t top_k, float* p,
                      std::vector<float>& scratch) {
  float mx = kNegInf;
  for (int64_t i = 0; i < V; ++i) {
    p[i] = verify_scaled_logit(load(i), temperature);
    mx = std::max(mx, p[i]);
  }
  if (mx == kNegInf) {  // dead row: point mass on token 0
    std::fill(p, p + V, 0.0f);
    p[0] = 1.0f;
    return 1.0;
  }
  if (top_k > 0 && top_k < V) keep_top_k(p, V, top_k, scratch);  // keeps mx
  double sum = 0.0;
  for (int64_t i = 0; i < V; ++i) {
    p[i] = std::exp(p[i] - mx);
    sum += p[i];
  }
  const float norm = float(sum);
  for (int64_t i = 0; i < V; ++i) p[i] /= norm;
  if (top_p < 1.0f) keep_top_p(p, V, top_p, scratch);
  double total = 0.0;
  for (int64_t i = 0; i < V; ++i) total += p[i];
  return verify_total(total);
}

struct GreedyNode {
  const void* logits;  // this batch row's [m, V] logits
  int dtype;
  int64_t V;
  int32_t argmax = 0;

  void enter(int64_t n) {
    with_row(logits, dtype, n * V, [&](auto load) {
      float best = sanitize(load(0));
      int64_t best_i = 0;
      for (int64_t i = 1; i < V; ++i) {
        const float v = sanitize(load(i));
        if (ranks_before(v, i, best, best_i)) {
          best = v;
          best_i = i;
        }
      }
      argmax = int32_t(best_i);
    });
  }
  bool try_child(int64_t, int32_t token) const { return token == argmax; }
};

struct SamplingNode {
  const void* logits;  // this batch row's [m, V] logits
  int dtype;
  int64_t V;
  float temperature, top_p;
  int64_t top_k;
  const float* u;  // this row's uniforms [m]
  float* p;        // the current node's residual distribution [V]
  std::vector<float>& scratch;
  double total = 0.0;

  void enter(int64_t n) {
    with_row(logits, dtype, n * V,
             [&](auto load) { total = sampling_probs(load, V, temperature, top_p, top_k, p, scratch); });
  }
  bool try_child(int64_t c, int32_t token) {
    const bool ok = verify_token_ok(token, V);
    const float px = ok ? p[token] : 0.0f;
    if (verify_coin_accepts(u[c], total, px)) return true;
    total -= px;
    if (ok) p[token] = 0.0f;
    return false;
  }
  // reference.sample_from on the residual with uniforms[b, 0].
  int32_t bonus() const {
    const float threshold = verify_cdf_threshold(u[0], total);
    double run = 0.0;
    for (int64_t i = 0; i < V; ++i) {
      run += p[i];
      if (verify_cdf_crossed(run, threshold)) return int32_t(i);
    }
    for (int64_t i = V - 1; i >= 0; --i)
      if (p[i] > 0.0f) return int32_t(i);
    return 0;
  }
};

}  // namespace

void tree_verify_cpu(const int32_t* tokens, const int32_t* parents, const void* target_logits, int dtype,
                     int64_t B, int64_t m, int64_t V, int64_t L, float temperature, float top_p, int64_t top_k,
                     const float* uniforms, float* workspace, int32_t* accepted, int32_t* accept_len,
                     int32_t* bonus, int64_t threads) {
  const int64_t elem = dtype == kFloat32 ? 4 : 2;
  // Small problems run on the caller's thread; otherwise rows spread over OpenMP threads (torch's
  // pool, at most the caller's count).
  const int64_t n_threads = B * V < (int64_t(1) << 16) ? 1 : std::max<int64_t>(1, std::min(B, threads));
  std::vector<std::vector<float>> scratch(n_threads);  // allocated here so bad_alloc reaches the caller
  if (uniforms)
    for (auto& s : scratch) s.reserve(size_t(V));

#pragma omp parallel num_threads(int(n_threads)) if (n_threads > 1)
  {
    const int64_t first = omp_get_thread_num(), stride = omp_get_num_threads();
    for (int64_t b = first; b < B; b += stride) {
      const void* logits = static_cast<const char*>(target_logits) + b * m * V * elem;
      const int32_t* tok = tokens + b * m;
      const int32_t* par = parents + b * m;
      int32_t* path = accepted + b * L;
      if (uniforms) {
        SamplingNode node{logits, dtype, V, temperature, top_p, top_k, uniforms + b * m, workspace + b * V,
                          scratch[first]};
        accept_len[b] = int32_t(verify_walk(tok, par, m, L, node, path));
        bonus[b] = node.bonus();
      } else {
        GreedyNode node{logits, dtype, V};
        accept_len[b] = int32_t(verify_walk(tok, par, m, L, node, path));
        bonus[b] = node.argmax;
      }
    }
  }
}

}  // namespace e2k
