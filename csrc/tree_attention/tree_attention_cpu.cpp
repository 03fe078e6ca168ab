// CPU tree attention (eagle2_kernels.reference.tree_attention).
//
// One task per (batch row b, KV head): the Hq/Hkv query heads that share the KV head are packed
// with the n queries into R = group * n rows (these rows are contiguous in q and out), and the
// visible keys [0, key_end) are walked once in tiles of kTileKeys, so each K/V element is
// converted to float32 and read once for the whole group instead of once per query head. Every
// row keeps an online softmax (running max m, running sum l, unnormalised output o; float32).
// Tasks run on std::threads taking (b, KV head) pairs from a shared counter, which balances
// ragged prefix lengths.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <system_error>
#include <thread>
#include <vector>

#include "eagle2_kernels/ops.h"
#include "tree_attention.h"

namespace e2k {
namespace {

// Keys per tile: the transposed K tile, the V tile and the scores of all rows stay in L1/L2
// while the group's rows use them.
constexpr int64_t kTileKeys = 64;
// Column block of the tile products: the head dim is padded to it, and the key tile is a multiple.
constexpr int64_t kColBlock = 16;
// Rows are padded to a multiple of every register block height used below (3 and 6).
constexpr int64_t kRowPad = 6;
// Below this many multiply-adds per thread, starting threads costs more than it saves.
constexpr int64_t kMinWorkPerThread = int64_t(1) << 21;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

constexpr int64_t round_up(int64_t x, int64_t to) { return (x + to - 1) / to * to; }

struct Problem {
  const void* q;
  const void* k;
  const void* v;
  const int32_t* bits;
  const int32_t* prefix_len;
  int64_t B, Hq, Hkv, n, S, d, W;
  float scale;
  void* out;
};

// Per-thread buffers, allocated by the calling thread before any worker starts. Rows are padded
// to kRowPad and the head dim to kColBlock with zeros, so the tile products need no edge cases.
struct Scratch {
  int64_t rows, dim;                 // padded R and d
  std::vector<float> q, o, s, m, l;  // [rows][dim], [rows][dim], [rows][kTileKeys], [rows], [rows]
  std::vector<float> kt, v;          // K tile transposed [dim][kTileKeys], V tile [kTileKeys][dim]
  explicit Scratch(const Problem& p)
      : rows(round_up(p.Hq / p.Hkv * p.n, kRowPad)),
        dim(round_up(p.d, kColBlock)),
        q(rows * dim),
        o(rows * dim),
        s(rows * kTileKeys),
        m(rows),
        l(rows),
        kt(dim * kTileKeys),
        v(kTileKeys * dim) {}
};

// c[rows][cols] += a[rows][inner] . b[inner][cols] (row strides lda, ldb, ldc; rows a multiple of
// kRows, cols of kColBlock). A kRows x kColBlock block of c stays in registers (vectors of kLanes
// floats) over the whole inner loop and is updated from one row of b and kRows scalars of a per
// step. The block is sized to the register file: 12 accumulators of 4 lanes for SSE/NEON, of 8
// lanes for AVX2. Written with GCC/Clang vector types because auto-vectorised loops spill the
// accumulators and run at a fraction of the speed.
template <int64_t kRows, int64_t kLanes>
inline __attribute__((always_inline)) void tile_product_block(const float* a, int64_t lda, const float* b,
                                                              int64_t ldb, float* c, int64_t ldc, int64_t rows,
                                                              int64_t cols, int64_t inner) {
  // aligned(4): unaligned loads and stores through Vec pointers (GCC/Clang let a float vector alias float).
  typedef float Vec __attribute__((vector_size(kLanes * sizeof(float)), aligned(alignof(float))));
  constexpr int64_t kVecs = kColBlock / kLanes;
  for (int64_t r0 = 0; r0 < rows; r0 += kRows) {
    for (int64_t j0 = 0; j0 < cols; j0 += kColBlock) {
      Vec acc[kRows][kVecs];
      for (int64_t r = 0; r < kRows; ++r)
        for (int64_t v = 0; v < kVecs; ++v) acc[r][v] = *reinterpret_cast<const Vec*>(c + (r0 + r) * ldc + j0 + v * kLanes);
      for (int64_t k = 0; k < inner; ++k) {
        const Vec* bk = reinterpret_cast<const Vec*>(b + k * ldb + j0);
        for (int64_t r = 0; r < kRows; ++r) {
          const float ar = a[(r0 + r) * lda + k];
          for (int64_t v = 0; v < kVecs; ++v) acc[r][v] += ar * bk[v];
        }
      }
      for (int64_t r = 0; r < kRows; ++r)
        for (int64_t v = 0; v < kVecs; ++v) *reinterpret_cast<Vec*>(c + (r0 + r) * ldc + j0 + v * kLanes) = acc[r][v];
    }
  }
}

#if defined(__x86_64__)
__attribute__((target("avx2,fma"))) void tile_product_avx2(const float* a, int64_t lda, const float* b, int64_t ldb,
                                                            float* c, int64_t ldc, int64_t rows, int64_t cols,
                                                            int64_t inner) {
  tile_product_block<6, 8>(a, lda, b, ldb, c, ldc, rows, cols, inner);
}
const bool kHasAvx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif

void tile_product(const float* a, int64_t lda, const float* b, int64_t ldb, float* c, int64_t ldc, int64_t rows,
                  int64_t cols, int64_t inner) {
#if defined(__x86_64__)
  if (kHasAvx2) return tile_product_avx2(a, lda, b, ldb, c, ldc, rows, cols, inner);
#endif
  tile_product_block<3, 4>(a, lda, b, ldb, c, ldc, rows, cols, inner);
}

template <int DT>
void attend_group(const Problem& P, int64_t b, int64_t kvh, Scratch& w) {
  const int64_t group = P.Hq / P.Hkv, R = group * P.n, d = P.d, rows = w.rows, dim = w.dim;
  const int64_t row0 = (b * P.Hq + kvh * group) * P.n * d;  // first q/out element of the group
  const int64_t kv0 = (b * P.Hkv + kvh) * P.S * d;
  const int32_t p = P.prefix_len[b];
  const TreeKeys keys = tree_keys(p, P.S, P.W);
  float *q = w.q.data(), *o = w.o.data(), *s = w.s.data(), *m = w.m.data(), *l = w.l.data();
  float *kt = w.kt.data(), *v = w.v.data();

  for (int64_t r = 0; r < R; ++r)
    for (int64_t c = 0; c < d; ++c) q[r * dim + c] = load_float(P.q, DT, row0 + r * d + c);
  std::fill(o, o + rows * dim, 0.0f);
  std::fill(m, m + rows, kNegInf);
  std::fill(l, l + rows, 0.0f);

  for (int64_t k0 = 0; k0 < keys.key_end; k0 += kTileKeys) {
    const int64_t kb = std::min(kTileKeys, keys.key_end - k0);
    const int64_t prefix_keys = std::clamp<int64_t>(keys.prefix_end - k0, 0, kb);  // seen by all rows
    if (kb < kTileKeys) {  // last tile: the keys past the end add 0 to scores and outputs
      std::fill(kt, kt + dim * kTileKeys, 0.0f);
      std::fill(v, v + kTileKeys * dim, 0.0f);
    }
    for (int64_t j = 0; j < kb; ++j) {
      for (int64_t c = 0; c < d; ++c) {
        kt[c * kTileKeys + j] = load_float(P.k, DT, kv0 + (k0 + j) * d + c);
        v[j * dim + c] = load_float(P.v, DT, kv0 + (k0 + j) * d + c);
      }
    }

    std::fill(s, s + rows * kTileKeys, 0.0f);
    tile_product(q, dim, kt, kTileKeys, s, kTileKeys, rows, kTileKeys, dim);

    for (int64_t r = 0; r < R; ++r) {
      float* sr = s + r * kTileKeys;
      const int32_t* words = P.bits + (b * P.n + r % P.n) * P.W;
      float mx = kNegInf;
      for (int64_t j = 0; j < kTileKeys; ++j) {
        const bool visible = j < prefix_keys || (j < kb && tree_bit(words, k0 + j - p));
        sr[j] = visible ? sr[j] * P.scale : kNegInf;
        mx = std::max(mx, sr[j]);
      }
      // A row that sees nothing in this tile gets weight 0 everywhere and keeps its state.
      const float m_new = std::max(m[r], mx);
      const float shift = m_new == kNegInf ? 0.0f : m_new;
      const float corr = std::exp(m[r] - shift);  // 0 while the row has seen nothing
      float sum = 0.0f;
      for (int64_t j = 0; j < kTileKeys; ++j) {
        sr[j] = std::exp(sr[j] - shift);
        sum += sr[j];
      }
      m[r] = m_new;
      l[r] = l[r] * corr + sum;
      if (corr != 1.0f)
        for (int64_t c = 0; c < dim; ++c) o[r * dim + c] *= corr;
    }
    tile_product(s, kTileKeys, v, dim, o, dim, rows, dim, kTileKeys);
  }

  for (int64_t r = 0; r < R; ++r) {
    const float inv = l[r] > 0.0f ? 1.0f / l[r] : 0.0f;  // a row that saw no key outputs zeros
    for (int64_t c = 0; c < d; ++c) store_float(P.out, DT, row0 + r * d + c, o[r * dim + c] * inv);
  }
}

template <int DT>
void run(const Problem& P) {
  const int64_t tasks = P.B * P.Hkv;
  int64_t work = 0;  // multiply-adds, to decide whether threads pay off
  for (int64_t b = 0; b < P.B; ++b) work += tree_keys(P.prefix_len[b], P.S, P.W).key_end;
  work *= 2 * P.Hq * P.n * P.d;
  const int64_t hw = std::max<int64_t>(1, std::thread::hardware_concurrency());
  const int64_t threads = std::clamp<int64_t>(work / kMinWorkPerThread, 1, std::min(hw, tasks));

  std::vector<Scratch> scratch;
  scratch.reserve(threads);
  for (int64_t t = 0; t < threads; ++t) scratch.emplace_back(P);
  std::atomic<int64_t> next{0};
  auto worker = [&](int64_t t) {
    for (int64_t task; (task = next.fetch_add(1)) < tasks;) attend_group<DT>(P, task / P.Hkv, task % P.Hkv, scratch[t]);
  };
  std::vector<std::thread> pool;
  try {
    for (int64_t t = 1; t < threads; ++t) pool.emplace_back(worker, t);
  } catch (const std::system_error&) {
    // No more threads to be had: the running ones (this one included) take the remaining tasks.
  }
  worker(0);
  for (auto& th : pool) th.join();
}

}  // namespace

void tree_attention_cpu(const void* q, const void* k_cache, const void* v_cache, int dtype,
                        const int32_t* tree_mask_bits, const int32_t* prefix_len, int64_t B, int64_t Hq,
                        int64_t Hkv, int64_t n, int64_t S, int64_t d, int64_t W, float scale, void* out) {
  if (B <= 0 || Hq <= 0 || Hkv <= 0 || n <= 0 || d <= 0) return;
  const Problem P{q, k_cache, v_cache, tree_mask_bits, prefix_len, B, Hq, Hkv, n, S, d, W, scale, out};
  if (dtype == kFloat32) {
    run<kFloat32>(P);
  } else if (dtype == kFloat16) {
    run<kFloat16>(P);
  } else {
    run<kBFloat16>(P);
  }
}

}  // namespace e2k
