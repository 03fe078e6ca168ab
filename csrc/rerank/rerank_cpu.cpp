// rerank on the CPU: per batch row, effective scores and depths in one forward pass, an O(N)
// selection of the m-1 best candidates, then the tree layout (shared with CUDA: rerank.h).
#include <algorithm>
#include <numeric>
#include <vector>

#include "eagle2_kernels/ops.h"
#include "rerank.h"

namespace e2k {

void rerank_cpu(const float* cand_scores, const int32_t* cand_parents, const int32_t* cand_tokens,
                const int32_t* root_tokens, const int32_t* prefix_len, int64_t B, int64_t N, int64_t m,
                int64_t L, int32_t* tokens, int32_t* parents, int32_t* depth, int32_t* positions,
                int32_t* mask_bits, int32_t* paths, int32_t* num_leaves) {
  const int64_t W = (m + 31) / 32;
  std::vector<float> eff(N);
  std::vector<uint32_t> key(N);
  std::vector<int32_t> cdepth(N), node_of(N), order(N), leaf_row(m);
  for (int64_t b = 0; b < B; ++b) {
    const float* score = cand_scores + b * N;
    const int32_t* cpar = cand_parents + b * N;
    const int32_t* ctok = cand_tokens + b * N;
    int32_t* tok = tokens + b * m;
    int32_t* par = parents + b * m;
    int32_t* dep = depth + b * m;
    int32_t* pos = positions + b * m;

    // Parents precede children, so one pass in index order sees every parent finished.
    for (int32_t i = 0; i < N; ++i) {
      const int32_t p = rerank_cand_parent(cpar, i);
      const float s = sanitize(score[i]);
      eff[i] = p >= 0 ? std::min(s, eff[p]) : s;
      cdepth[i] = p >= 0 ? cdepth[p] + 1 : 1;
      key[i] = rerank_score_key(eff[i]);
    }

    // The m-1 best in any order; nodes are then numbered in candidate order.
    std::iota(order.begin(), order.end(), 0);
    std::nth_element(order.begin(), order.begin() + (m - 1), order.end(), [&](int32_t a, int32_t c) {
      return rerank_before(key[a], cdepth[a], a, key[c], cdepth[c], c);
    });
    std::fill(node_of.begin(), node_of.end(), 0);
    for (int64_t r = 0; r < m - 1; ++r) node_of[order[r]] = 1;
    int32_t next = 1;
    for (int32_t& v : node_of) v = v ? next++ : -1;

    rerank_set_node(0, root_tokens[b], -1, 0, prefix_len[b], tok, par, dep, pos);
    for (int32_t i = 0; i < N; ++i) {
      if (node_of[i] < 0) continue;
      const int32_t p = rerank_cand_parent(cpar, i);  // kept: the kept set is closed under ancestors
      rerank_set_node(node_of[i], ctok[i], p >= 0 ? node_of[p] : 0, cdepth[i], prefix_len[b], tok, par, dep, pos);
    }

    // Leaves get path rows in node order.
    std::fill(leaf_row.begin(), leaf_row.end(), 0);
    for (int64_t j = 1; j < m; ++j) leaf_row[par[j]] = -1;
    int32_t leaves = 0;
    for (int32_t& v : leaf_row) v = v < 0 ? -1 : leaves++;
    num_leaves[b] = leaves;

    int32_t* prow = paths + b * m * L;
    for (int32_t j = 0; j < m; ++j) {
      rerank_mask_row(par, j, W, reinterpret_cast<uint32_t*>(mask_bits) + (b * m + j) * W);
      if (leaf_row[j] >= 0) rerank_path_row(par, dep, j, L, prow + leaf_row[j] * L);
    }
    std::fill(prow + leaves * L, prow + m * L, -1);
  }
}

}  // namespace e2k
