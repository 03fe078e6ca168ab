// Logic of tree_verify shared by the CPU kernel and the CUDA kernel (host and device code), so
// the CPU tests exercise the rules the GPU runs. Semantics: eagle2_kernels.reference.tree_verify
// and sampling_probs.
//
// The reference does its acceptance arithmetic on Python floats (double) and compares float32
// cumulative sums; the helpers below reproduce those precisions so that the kernels take the
// same decisions, not merely statistically equivalent ones.
#pragma once
#include <cstdint>

#include "eagle2_kernels/common.h"

namespace e2k {

// Next child of `node` after node index `after` (children are tried in node order), or -1.
// Children have larger indices than their parent, so every scan moves forward and ends at m.
E2K_HD int64_t verify_next_child(const int32_t* parents, int64_t m, int64_t node, int64_t after) {
  for (int64_t c = after + 1; c < m; ++c)
    if (parents[c] == node) return c;
  return -1;
}

// A token the kernels may index with; others (possible on a GPU, where the wrapper cannot check
// without a host sync) never match an argmax and carry no probability.
E2K_HD bool verify_token_ok(int32_t token, int64_t V) { return token >= 0 && token < V; }

// Logit after temperature, as reference.sampling_probs computes it (float32 division).
E2K_HD float verify_scaled_logit(float raw, float temperature) { return sanitize(sanitize(raw) / temperature); }

// Sampling coin for a child with (residual) probability p: accept iff u * total < p.
E2K_HD bool verify_coin_accepts(float u, double total, float p) { return double(u) * total < double(p); }

// Inverse CDF: torch rounds the Python float u * total to float32 before comparing it with the
// float32 running sums, and the running sums are accumulated in double (torch's CPU cumsum).
E2K_HD float verify_cdf_threshold(float u, double total) { return float(double(u) * total); }
E2K_HD bool verify_cdf_crossed(double running_sum, float threshold) { return float(running_sum) > threshold; }

// Total of a distribution as the reference sees it: a float32 sum read as a Python float.
E2K_HD double verify_total(double sum) { return double(float(sum)); }

// float_order_key with -0.0 read as 0.0, for radix selection on the device: equal floats must
// get equal keys. order_key_float maps the key back (to 0.0 for either zero).
E2K_HD uint32_t verify_order_key(float f) { return float_order_key(f + 0.0f); }

// top_p among tokens of equal probability v: with mass `above` on strictly larger tokens, the
// r-th of the n_eq ties (in id order) is preceded by mass fl32(fl32(above + (r+1) v) - v), as
// torch computes `cumsum - p` in reference.sampling_probs; it is kept iff that is < top_p.
// The mass grows with r, so the kept ties are the first ones; returns how many.
E2K_HD int64_t verify_top_p_ties_kept(double above, float v, int64_t n_eq, float top_p) {
  int64_t lo = 0, hi = n_eq;
  while (lo < hi) {
    const int64_t r = lo + (hi - lo) / 2;
    const float before = float(float(above + double(r + 1) * double(v)) - v);
    if (before < top_p)
      lo = r + 1;
    else
      hi = r;
  }
  return lo;
}

// The acceptance walk. `node` supplies the per-node rules:
//   void enter(int64_t n)             the walk arrives at node n (compute its target decision)
//   bool try_child(int64_t c, int32_t token)   accept child c? (sampling: removes it if not)
// Writes the path to `path` (L entries, -1 padded) unless it is null (extra device threads run
// the walk only to take part in the per-node collectives) and returns its length (>= 1). At
// most L nodes and m child tries per node, whatever the parents hold.
template <class Node>
E2K_HD int64_t verify_walk(const int32_t* tokens, const int32_t* parents, int64_t m, int64_t L, Node& node,
                           int32_t* path) {
  int64_t cur = 0, len = 1;
  node.enter(0);
  while (len < L) {
    int64_t next = -1;
    for (int64_t c = verify_next_child(parents, m, cur, cur); c >= 0; c = verify_next_child(parents, m, cur, c)) {
      if (node.try_child(c, tokens[c])) {
        next = c;
        break;
      }
    }
    if (next < 0) break;
    if (path) path[len] = int32_t(next);
    cur = next;
    ++len;
    node.enter(cur);
  }
  if (path) {
    path[0] = 0;
    for (int64_t i = len; i < L; ++i) path[i] = -1;
  }
  return len;
}

}  // namespace e2k
