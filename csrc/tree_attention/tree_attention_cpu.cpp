// CPU tree attention (eagle2_kernels.reference.tree_attention).
//
// One task per (batch row b, KV head): the Hq/Hkv query heads that share the KV head are packed
// with the n queries into R = group * n rows (these rows are contiguous in q and out), and the
// visible keys [0, key_end) are walked once in tiles of kTileKeys, so each K/V element is
// converted to float32 and read once for the whole group instead of once per query head. Every
// row keeps an online softmax (running max m, running sum l, unnormalised output o; float32).
// Tasks are (b, KV head) pairs, or blocks of a pair's rows when there are few pairs (one
// sequence's decode step), spread dynamically over OpenMP threads (torch's pool, at most the
// caller's count; one when the work is small), which balances ragged prefix lengths. With a
// sliding window the walk starts at the tile holding the group's first key inside any window.
//
// The arithmetic is written with GCC/Clang vector types of kLanes floats: auto-vectorised loops
// of the same maths spill their accumulators and run several times slower. The whole task body
// is compiled for the baseline ISA (4 lanes: SSE2/NEON) and, on x86-64, also for AVX2+FMA
// (8 lanes) and AVX-512 (16 lanes); the widest the CPU runs is picked at run time.
#include <algorithm>
#include <cmath>
#include <vector>

#include <omp.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "eagle2_kernels/ops.h"
#include "tree_attention.h"

#define E2K_INLINE inline __attribute__((always_inline))
#if defined(__GNUC__) && !defined(__clang__)
// Every function returning 8- or 16-lane vectors is always inlined into the AVX2 / AVX-512 body, so
// the warning that its out-of-line ABI differs without AVX does not apply. (Vector arguments are
// passed by reference: GCC's note about their ABI ignores this pragma.)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace e2k {
namespace {

// Keys per tile: the transposed K tile, the V tile and the scores of all rows stay in L1/L2
// while the group's rows use them.
constexpr int64_t kTileKeys = 64;
// The head dim is padded to a multiple of every column block of the tile products (16, 32), as
// kTileKeys is, and the rows to a multiple of every block height (3, 6).
constexpr int64_t kDimPad = 32;
constexpr int64_t kRowPad = 6;
// Below this many multiply-adds per thread, waking threads costs more than it saves (2^19: a
// 4-token step of the default target at prefix 256 takes both cores of the dev VM, a 1-token
// step one; bench_tree_attention's smollm2 cases).
constexpr int64_t kMinWorkPerThread = int64_t(1) << 19;

constexpr int64_t round_up(int64_t x, int64_t to) { return (x + to - 1) / to * to; }

// Vectors of kLanes floats (F) and int32 masks (I). Memory is accessed through Unaligned: F with
// float alignment, allowed to alias the float buffers (as the compilers' own __m256_u is).
template <int64_t kLanes>
struct Simd {
  typedef float F __attribute__((vector_size(kLanes * sizeof(float))));
  typedef int32_t I __attribute__((vector_size(kLanes * sizeof(float))));
  typedef F Unaligned __attribute__((aligned(alignof(float)), may_alias));
  static E2K_INLINE F load(const float* p) { return *reinterpret_cast<const Unaligned*>(p); }
  static E2K_INLINE void store(float* p, const F& v) { *reinterpret_cast<Unaligned*>(p) = v; }
  static E2K_INLINE F splat(float x) { return F{} + x; }
  static E2K_INLINE F select(const I& mask, const F& a, const F& b) { return (F)(((I)a & mask) | ((I)b & ~mask)); }
};

// exp(x) for x <= 0 (or -inf), within 1e-7 relative: round(x / ln 2) and a degree-6 polynomial on
// the remainder (Cephes expf), scaled by 2^n built in the exponent bits. Below -87 (exp < 2e-38)
// it returns 0, which is how masked keys (-inf) get weight 0.
template <int64_t kLanes>
E2K_INLINE typename Simd<kLanes>::F exp_nonpositive(const typename Simd<kLanes>::F& arg) {
  using V = Simd<kLanes>;
  using F = typename V::F;
  using I = typename V::I;
  const I live = arg >= V::splat(-87.0f);
  const F x = V::select(live, arg, V::splat(-87.0f));
  const I n = __builtin_convertvector(x * 1.44269504088896341f - 0.5f, I);  // truncation rounds: x <= 0
  const F nf = __builtin_convertvector(n, F);
  const F r = (x - nf * 0.693359375f) - nf * -2.12194440e-4f;  // x - n ln 2 in two exact-ish steps
  F y = V::splat(1.9875691500e-4f);
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  return (F)((I)(y * (F)((n + 127) << 23)) & live);
}

// Online-softmax step of one row over a tile: s holds the tile's scaled scores (-inf where not
// visible) and becomes the weights exp(s - m_new); m and l are the row's running max and sum.
// Returns the factor by which the row's output so far must be rescaled. A NaN score (NaN in q or
// in a visible key) makes m NaN for good, and with it l, the rescale factors and the output, as in
// the reference; exp_nonpositive alone would give a NaN weight 0.
template <int64_t kLanes>
E2K_INLINE float softmax_tile_row(float* s, float& m, float& l) {
  using V = Simd<kLanes>;
  typename V::F mx = V::load(s);
  typename V::I nan = mx != mx;
  for (int64_t j = kLanes; j < kTileKeys; j += kLanes) {
    const typename V::F x = V::load(s + j);
    mx = V::select(x > mx, x, mx);
    nan |= x != x;
  }
  float m_new = m;
  for (int64_t i = 0; i < kLanes; ++i) m_new = nan[i] ? __builtin_nanf("") : std::max(m_new, mx[i]);
  if (m_new == kNegInf) {  // nothing visible yet: weight 0 everywhere, the row keeps its state
    std::fill(s, s + kTileKeys, 0.0f);
    return 1.0f;
  }
  const typename V::F shift = V::splat(m_new);
  typename V::F sum{};
  for (int64_t j = 0; j < kTileKeys; j += kLanes) {
    const typename V::F e = exp_nonpositive<kLanes>(V::load(s + j) - shift);
    V::store(s + j, e);
    sum += e;
  }
  const float corr = std::exp(m - m_new);  // 0 while the row had seen nothing
  float total = 0.0f;
  for (int64_t i = 0; i < kLanes; ++i) total += sum[i];
  m = m_new;
  l = l * corr + total;
  return corr;
}

// c[rows][cols] += a[rows][inner] . b[inner][cols] (row strides lda, ldb, ldc; rows a multiple of
// kRows, cols of kCols). A kRows x kCols block of c stays in registers over the whole inner loop
// and is updated from one row of b and kRows scalars of a per step; the instantiations below keep
// kRows * kCols / kLanes = 12 accumulators, which fit the 16 vector registers of SSE2 and AVX2
// (AVX-512 has 32).
template <int64_t kRows, int64_t kLanes, int64_t kCols>
E2K_INLINE void tile_product(const float* a, int64_t lda, const float* b, int64_t ldb, float* c, int64_t ldc,
                             int64_t rows, int64_t cols, int64_t inner) {
  using V = Simd<kLanes>;
  constexpr int64_t kVecs = kCols / kLanes;
  for (int64_t r0 = 0; r0 < rows; r0 += kRows) {
    for (int64_t j0 = 0; j0 < cols; j0 += kCols) {
      typename V::F acc[kRows][kVecs];
      for (int64_t r = 0; r < kRows; ++r)
        for (int64_t v = 0; v < kVecs; ++v) acc[r][v] = V::load(c + (r0 + r) * ldc + j0 + v * kLanes);
      for (int64_t k = 0; k < inner; ++k) {
        typename V::F bk[kVecs];
        for (int64_t v = 0; v < kVecs; ++v) bk[v] = V::load(b + k * ldb + j0 + v * kLanes);
        for (int64_t r = 0; r < kRows; ++r) {
          const float ar = a[(r0 + r) * lda + k];
          for (int64_t v = 0; v < kVecs; ++v) acc[r][v] += ar * bk[v];
        }
      }
      for (int64_t r = 0; r < kRows; ++r)
        for (int64_t v = 0; v < kVecs; ++v) V::store(c + (r0 + r) * ldc + j0 + v * kLanes, acc[r][v]);
    }
  }
}

struct Problem {
  const void* q;
  const void* k;
  const void* v;
  const int32_t* bits;
  const int32_t* prefix_len;
  const int32_t* positions;  // [B][n], read only when window > 0
  int64_t B, Hq, Hkv, n, S, d, W, window;
  float scale;
  void* out;
};

// Per-thread buffers, allocated by the calling thread before any worker starts. Rows are padded
// to kRowPad and the head dim to kDimPad with zeros, so the tile products need no edge cases.
struct Scratch {
  int64_t rows, dim, region;         // padded R, d, and the tree region's keys (branch rows)
  std::vector<float> q, o, s, m, l;  // [rows][dim], [rows][dim], [rows][kTileKeys], [rows], [rows]
  std::vector<float> kt, v;          // K tile transposed [dim][kTileKeys], V tile [kTileKeys][dim]
  std::vector<float> rkt, rv, rs;    // the same for the tree region: [dim][region], [region][dim], [rows][region]
  std::vector<int64_t> keys;         // one branch row's visible region keys, in order
  std::vector<int64_t> order;        // [rows]: the block row held at each scratch row (chain rows first)
  std::vector<int64_t> qpos;         // [rows]: the row's query position (sliding window only)
  std::vector<float> held;           // [kRowPad][dim]: outputs of branch rows that pad a chain-row tile
  explicit Scratch(const Problem& p)
      : rows(round_up(p.Hq / p.Hkv * p.n, kRowPad)),
        dim(round_up(p.d, kDimPad)),
        region(round_up(kTileKeys - 1 + 32 * p.W, kDimPad)),
        q(rows * dim),
        o(rows * dim),
        s(rows * kTileKeys),
        m(rows),
        l(rows),
        kt(dim * kTileKeys),
        v(kTileKeys * dim),
        rkt(dim * region),
        rv(region * dim),
        rs(rows * region),
        keys(region),
        order(rows),
        qpos(rows),
        held(kRowPad * dim) {}
};

#if defined(__x86_64__)
// dst[c][j] = src[j][c] for a 16 x 16 float32 block (row strides lds, ldd), through registers:
// pairs of rows interleaved, then 2 x 2 blocks, then 128-bit lanes (a scalar loop writes one
// float per cycle at best, and the transposed K tile is most of a decode step's attention).
// (A call, not inlined: the generic template it is called from is compiled for the baseline ISA.)
__attribute__((target("avx512f"))) void transpose16(const float* src, int64_t lds, float* dst, int64_t ldd) {
  __m512 r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(src + i * lds);
  for (int i = 0; i < 16; i += 2) {  // lane L: [r_i[4L], r_i+1[4L], r_i[4L+1], r_i+1[4L+1]] and the upper pair
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {  // r[i + k], lane L: column 4L + k of rows i .. i + 3
    r[i] = _mm512_shuffle_ps(t[i], t[i + 2], 0x44);
    r[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], 0xEE);
    r[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    r[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int k = 0; k < 4; ++k) {  // column 4L + k: lane L of r[k], r[4 + k], r[8 + k], r[12 + k]
    const __m512 x = _mm512_shuffle_f32x4(r[k], r[4 + k], 0x88), y = _mm512_shuffle_f32x4(r[k], r[4 + k], 0xDD);
    const __m512 x2 = _mm512_shuffle_f32x4(r[8 + k], r[12 + k], 0x88), y2 = _mm512_shuffle_f32x4(r[8 + k], r[12 + k], 0xDD);
    _mm512_storeu_ps(dst + k * ldd, _mm512_shuffle_f32x4(x, x2, 0x88));
    _mm512_storeu_ps(dst + (4 + k) * ldd, _mm512_shuffle_f32x4(y, y2, 0x88));
    _mm512_storeu_ps(dst + (8 + k) * ldd, _mm512_shuffle_f32x4(x, x2, 0xDD));
    _mm512_storeu_ps(dst + (12 + k) * ldd, _mm512_shuffle_f32x4(y, y2, 0xDD));
  }
}
#endif

// Keys [first, first + count) of a (batch row, KV head) as float32: K transposed into kt
// [dim][ldk], V into v [count][dim]. `first` is an element offset into the caches.
template <int DT, int64_t kLanes>
E2K_INLINE void load_keys(const Problem& P, int64_t first, int64_t count, float* kt, int64_t ldk, float* v, int64_t dim) {
  int64_t j0 = 0;  // keys before j0 are transposed already
#if defined(__x86_64__)
  if constexpr (DT == kFloat32 && kLanes == 16) {
    if (P.d % 16 == 0)
      for (const float* k = static_cast<const float*>(P.k) + first; j0 + 16 <= count; j0 += 16)
        for (int64_t c = 0; c < P.d; c += 16) transpose16(k + j0 * P.d + c, P.d, kt + c * ldk + j0, ldk);
  }
#endif
  for (int64_t j = j0; j < count; ++j)
    for (int64_t c = 0; c < P.d; ++c) kt[c * ldk + j] = load_float(P.k, DT, first + j * P.d + c);
  for (int64_t j = 0; j < count; ++j)
    for (int64_t c = 0; c < P.d; ++c) v[j * dim + c] = load_float(P.v, DT, first + j * P.d + c);
}

// Whether the visible keys among tree keys [0, n) are exactly 0 .. c-1 for some c (a chain: the
// rows of a prefill, of plain decoding, of a tree's first path): then a key's place in the
// row's own sequence of visible keys is its slot, and the shared tiles below are canonical.
E2K_INLINE bool chain_mask(const int32_t* words, int64_t n) {
  int64_t c = 0;
  while (c < n && tree_bit(words, c)) ++c;
  for (int64_t j = c; j < n; ++j)
    if (tree_bit(words, j)) return false;
  return true;
}

// The whole attention of one (batch row, KV head) group; see the file comment.
//
// Every query row computes the same float operations as it would for the same sequence of
// visible keys laid out contiguously (a one-token decode step of the same token): its online
// softmax runs over tiles of kTileKeys consecutive visible keys, counted from key 0. For the
// prefix and for chain rows that is what the shared tiles do. A branch row of a tree sees tree
// keys with gaps: its tiles from the one holding the prefix end on are redone from its own
// list of visible keys, with the same score, softmax and weighted-sum arithmetic (the scratch
// rows hold the chain rows first, so those shared tiles are computed for the chain rows only).
// This is what makes a verify forward's rows bitwise equal to plain decoding's in every dtype
// (with eagle2_kernels.skinny_linear for the linear layers). A sliding
// window keeps this: keys outside a row's window stay in its tiles with score -inf, as they do in
// the one-token step, and tiles before every row's window change no row's state, so are skipped.
// A task may take a block of the group's rows, [first, first + R): every row is computed on its
// own, so how the rows are split or ordered changes no result.
template <int DT, int64_t kRows, int64_t kLanes, int64_t kCols>
E2K_INLINE void attend_group(const Problem& P, int64_t b, int64_t kvh, int64_t first, int64_t R, Scratch& w) {
  const int64_t group = P.Hq / P.Hkv, d = P.d, rows = round_up(R, kRowPad), dim = w.dim;
  const int64_t row0 = ((b * P.Hq + kvh * group) * P.n + first) * d;  // first q/out element of the block
  const int64_t kv0 = (b * P.Hkv + kvh) * P.S * d;
  const int32_t p = P.prefix_len[b];
  const TreeKeys keys = tree_keys(p, P.S, P.W);
  const int64_t tree0 = keys.prefix_end / kTileKeys * kTileKeys;  // the tile holding the prefix end
  float *q = w.q.data(), *o = w.o.data(), *s = w.s.data(), *m = w.m.data(), *l = w.l.data();
  float *kt = w.kt.data(), *v = w.v.data();

  // Scratch row r holds block row order[r]: the chain rows, then the branch rows (r >= chains),
  // each in block order.
  const auto block_words = [&](int64_t i) { return P.bits + (b * P.n + (first + i) % P.n) * P.W; };
  const auto is_chain = [&](int64_t i) { return chain_mask(block_words(i), keys.key_end - keys.prefix_end); };
  int64_t chains = 0;
  for (int64_t i = 0; i < R; ++i)
    if (is_chain(i)) w.order[chains++] = i;
  for (int64_t i = 0, r = chains; i < R; ++i)
    if (!is_chain(i)) w.order[r++] = i;
  const bool any_branch = chains < R;
  const auto words_of = [&](int64_t r) { return block_words(w.order[r]); };
  for (int64_t r = 0; r < R; ++r)
    for (int64_t c = 0; c < d; ++c) q[r * dim + c] = load_float(P.q, DT, row0 + w.order[r] * d + c);
  std::fill(q + R * dim, q + rows * dim, 0.0f);  // padding rows (an earlier, larger block's are stale)
  std::fill(o, o + rows * dim, 0.0f);
  std::fill(m, m + rows, kNegInf);
  std::fill(l, l + rows, 0.0f);
  // The first key inside some row's window; never past the prefix end, since a tree key's
  // position is its query's, not its index.
  int64_t first_key = keys.prefix_end;
  const int32_t* positions = P.window > 0 ? P.positions + b * P.n : nullptr;
  for (int64_t r = 0; r < R; ++r) {
    w.qpos[r] = positions ? positions[(first + w.order[r]) % P.n] : 0;
    first_key = std::min(first_key, positions ? w.qpos[r] - P.window + 1 : 0);
  }
  const auto visible_in_window = [&](int64_t r, int64_t key) {
    return !positions || in_window(w.qpos[r], key_position(positions, p, P.n, key), P.window);
  };

  for (int64_t k0 = std::max<int64_t>(first_key, 0) / kTileKeys * kTileKeys; k0 < keys.key_end; k0 += kTileKeys) {
    const int64_t kb = std::min(kTileKeys, keys.key_end - k0);
    const int64_t prefix_keys = std::clamp<int64_t>(keys.prefix_end - k0, 0, kb);  // seen by all rows
    // From the tile holding the prefix end on, the branch rows are redone below: only the chain
    // rows take these tiles, and the branch rows that pad their last block of kRowPad keep their
    // outputs (held) from the zero weights of the scores they are given.
    const int64_t live = any_branch && k0 >= tree0 ? chains : R, padded = round_up(live, kRowPad);
    if (live == 0) break;
    const int64_t held = std::min(padded, R) - live;
    if (kb < kTileKeys) {  // last tile: the keys past the end add 0 to scores and outputs
      std::fill(kt, kt + dim * kTileKeys, 0.0f);
      std::fill(v, v + kTileKeys * dim, 0.0f);
    }
    load_keys<DT, kLanes>(P, kv0 + k0 * d, kb, kt, kTileKeys, v, dim);

    std::fill(s, s + padded * kTileKeys, 0.0f);
    tile_product<kRows, kLanes, kCols>(q, dim, kt, kTileKeys, s, kTileKeys, padded, kTileKeys, dim);

    for (int64_t r = 0; r < live; ++r) {
      float* sr = s + r * kTileKeys;
      const int32_t* words = words_of(r);
      for (int64_t j = 0; j < prefix_keys; ++j) sr[j] *= P.scale;
      for (int64_t j = prefix_keys; j < kb; ++j) sr[j] = tree_bit(words, k0 + j - p) ? sr[j] * P.scale : kNegInf;
      if (positions)
        for (int64_t j = 0; j < kb; ++j)
          if (!visible_in_window(r, k0 + j)) sr[j] = kNegInf;
      std::fill(sr + kb, sr + kTileKeys, kNegInf);
      const float corr = softmax_tile_row<kLanes>(sr, m[r], l[r]);
      if (corr != 1.0f)
        for (int64_t c = 0; c < dim; ++c) o[r * dim + c] *= corr;
    }
    std::fill(s + live * kTileKeys, s + padded * kTileKeys, 0.0f);  // rows past live: zero weights
    std::copy(o + live * dim, o + (live + held) * dim, w.held.data());
    // Padding rows (r >= R) have zero q, so zero scores and weights: they add nothing.
    tile_product<kRows, kLanes, kCols>(s, kTileKeys, v, dim, o, dim, padded, dim, kTileKeys);
    std::copy(w.held.data(), w.held.data() + held * dim, o + live * dim);
  }

  if (any_branch && tree0 < keys.key_end) {
    // The region's keys [tree0, key_end) once for the group, and the branch rows' scores for them
    // (from the row block holding the first branch row; the columns up to the region's end).
    const int64_t nk = keys.key_end - tree0, region = w.region, cols = round_up(nk, kDimPad);
    const int64_t from = chains / kRowPad * kRowPad;
    float *rkt = w.rkt.data(), *rv = w.rv.data(), *rs = w.rs.data();
    std::fill(rkt, rkt + dim * region, 0.0f);
    load_keys<DT, kLanes>(P, kv0 + tree0 * d, nk, rkt, region, rv, dim);
    std::fill(rs + from * region, rs + rows * region, 0.0f);
    tile_product<kRows, kLanes, kCols>(q + from * dim, dim, rkt, region, rs + from * region, region, rows - from, cols,
                                       dim);
    alignas(64) float st[kTileKeys];
    for (int64_t r = chains; r < R; ++r) {
      const int32_t* words = words_of(r);
      int64_t cnt = 0;  // the row's visible keys of the region, in order: the prefix tail, then its tree keys
      for (int64_t j = 0; j < nk; ++j)
        if (tree0 + j < keys.prefix_end || tree_bit(words, tree0 + j - p)) w.keys[cnt++] = j;
      for (int64_t t0 = 0; t0 < cnt; t0 += kTileKeys) {
        const int64_t tb = std::min(kTileKeys, cnt - t0);
        for (int64_t i = 0; i < tb; ++i) {
          const int64_t key = w.keys[t0 + i];
          st[i] = visible_in_window(r, tree0 + key) ? rs[r * region + key] * P.scale : kNegInf;
        }
        std::fill(st + tb, st + kTileKeys, kNegInf);
        const float corr = softmax_tile_row<kLanes>(st, m[r], l[r]);
        float* orow = o + r * dim;
        if (corr != 1.0f)
          for (int64_t c = 0; c < dim; ++c) orow[c] *= corr;
        for (int64_t i = 0; i < tb; ++i) {  // the shared tiles' weighted sum, in key order
          const float wi = st[i];
          const float* vrow = rv + w.keys[t0 + i] * dim;
          for (int64_t c = 0; c < dim; ++c) orow[c] += wi * vrow[c];
        }
      }
    }
  }

  for (int64_t r = 0; r < R; ++r) {
    const float inv = l[r] != 0.0f ? 1.0f / l[r] : 0.0f;  // a row that saw no key outputs zeros; NaN stays NaN
    for (int64_t c = 0; c < d; ++c) store_float(P.out, DT, row0 + w.order[r] * d + c, o[r * dim + c] * inv);
  }
}

// (problem, batch row, KV head, first row, rows, scratch)
using GroupFn = void (*)(const Problem&, int64_t, int64_t, int64_t, int64_t, Scratch&);

template <int DT>
void attend_group_baseline(const Problem& P, int64_t b, int64_t kvh, int64_t first, int64_t R, Scratch& w) {
  attend_group<DT, 3, 4, 16>(P, b, kvh, first, R, w);
}

#if defined(__x86_64__)
template <int DT>
__attribute__((target("avx2,fma"))) void attend_group_avx2(const Problem& P, int64_t b, int64_t kvh, int64_t first,
                                                          int64_t R, Scratch& w) {
  attend_group<DT, 6, 8, 16>(P, b, kvh, first, R, w);
}

template <int DT>
__attribute__((target("avx512f"))) void attend_group_avx512(const Problem& P, int64_t b, int64_t kvh, int64_t first,
                                                            int64_t R, Scratch& w) {
  attend_group<DT, 6, 16, 32>(P, b, kvh, first, R, w);
}
#endif

template <int DT>
GroupFn pick_group_fn() {
#if defined(__x86_64__)
  static const bool avx512 = __builtin_cpu_supports("avx512f");
  static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (avx512) return attend_group_avx512<DT>;
  if (avx2) return attend_group_avx2<DT>;
#endif
  return attend_group_baseline<DT>;
}

template <int DT>
void run(const Problem& P, int64_t max_threads) {
  const GroupFn attend = pick_group_fn<DT>();
  int64_t work = 0;  // multiply-adds, to decide whether threads pay off
  for (int64_t b = 0; b < P.B; ++b) work += tree_keys(P.prefix_len[b], P.S, P.W).key_end;
  work *= 2 * P.Hq * P.n * P.d;
  int64_t threads = std::clamp<int64_t>(work / kMinWorkPerThread, 1, max_threads);
  // Tasks are groups (batch row, KV head), or blocks of a group's rows when there are fewer than
  // two groups per thread (a decode step of one sequence: 3 groups on 2 threads would leave one
  // idle half the time); each block re-reads the group's keys, so no more blocks than that.
  const int64_t groups = P.B * P.Hkv, R = P.Hq / P.Hkv * P.n;
  const int64_t parts = groups >= 2 * threads ? 1 : std::min((2 * threads + groups - 1) / groups, (R + kRowPad - 1) / kRowPad);
  const int64_t block = round_up((R + parts - 1) / parts, kRowPad), per_group = (R + block - 1) / block;
  const int64_t tasks = groups * per_group;
  threads = std::min(threads, tasks);
  std::vector<Scratch> scratch;  // allocated here so bad_alloc reaches the caller
  scratch.reserve(threads);
  for (int64_t t = 0; t < threads; ++t) scratch.emplace_back(P);
#pragma omp parallel for num_threads(int(threads)) schedule(dynamic, 1) if (threads > 1)
  for (int64_t task = 0; task < tasks; ++task) {
    const int64_t g = task / per_group, first = task % per_group * block;
    attend(P, g / P.Hkv, g % P.Hkv, first, std::min(block, R - first), scratch[omp_get_thread_num()]);
  }
}

}  // namespace

void tree_attention_cpu(const void* q, const void* k_cache, const void* v_cache, int dtype,
                        const int32_t* tree_mask_bits, const int32_t* prefix_len, const int32_t* positions,
                        int64_t window, int64_t B, int64_t Hq, int64_t Hkv, int64_t n, int64_t S, int64_t d,
                        int64_t W, float scale, void* out, int64_t threads) {
  if (B <= 0 || Hq <= 0 || Hkv <= 0 || n <= 0 || d <= 0) return;
  const Problem P{q, k_cache, v_cache, tree_mask_bits, prefix_len, positions, B, Hq, Hkv, n, S, d, W, window, scale,
                  out};
  if (dtype == kFloat32) {
    run<kFloat32>(P, threads);
  } else if (dtype == kFloat16) {
    run<kFloat16>(P, threads);
  } else {
    run<kBFloat16>(P, threads);
  }
}

}  // namespace e2k
