// skinny_linear on the CPU: y[M, N] = x[M, K] W[N, K]^T (+ bias) for few rows M (a decode step's
// tokens), reading each weight once for all rows and computing every output the same way
// whatever M is (eagle2_kernels.reference.skinny_linear).
//
// Why not the BLAS: for M of 2 to 64 MKL and oneDNN switch from their GEMV to GEMM paths that
// re-read W (a 49152 x 576 float32 lm_head costs 2x more at M = 2 than at M = 1) and sum in an
// order that depends on M, so a tree token's logits differ in the last bits from the same token's
// in a one-token forward. Here:
//   - W is read once: a tile of R weight rows (R x K values, R = 8 or 4: 18 or 9 KiB for K = 576
//     in float32) is streamed from memory and multiplied with every x row, MB x rows at a time
//     (R * MB accumulators in registers), before the next tile, whose weights the blocks
//     prefetch meanwhile (spread over their k steps; AVX-512 paths): a decode step's weights come
//     from DRAM (the default target's layers are 425 MB in float32), and without the prefetch
//     the arithmetic waited on them (README, "Measured numbers");
//   - y[m, n] is always the same float32 sum: lane l of a kLanes-wide accumulator adds the
//     products of k = l, l + kLanes, ... in increasing k (fused multiply-add; bfloat16 adds the
//     pair 2l, 2l + 1 per step with AVX512-BF16's dot product; the tail zero-padded), then the
//     lanes are added in a fixed tree, then the bias, then one rounding to the output dtype.
//     Neither M, nor the row's place in x, nor the blocking, nor the thread count changes it.
// x is copied once per call (small), zero-padded to whole vectors: float32 for float32 and
// float16 weights, bfloat16 for bfloat16 weights on AVX512-BF16 CPUs. Threads (OpenMP, the
// runtime torch itself uses, so the two share one pool) split the N tiles; the caller passes how
// many, 1 for small problems.
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstring>
#include <vector>

#include "eagle2_kernels/common.h"
#include "eagle2_kernels/ops.h"

namespace e2k {
namespace {

// Part of the next tile's weights to pull into the cache while a block computes: `lines` cache
// lines per step of k from `at` on (none when at is null).
struct Prefetch {
  const char* at;
  int64_t lines;
};

struct Problem {
  const void* x;  // [M, Kp] padded copy (float32, or bfloat16 for the dot-product path)
  const void* w;
  const void* bias;
  int dtype;
  int64_t M, K, Kp, N;
  void* y;
};

inline void finish(const Problem& P, int64_t m, int64_t n, float v) {
  if (P.bias != nullptr) v += load_float(P.bias, P.dtype, n);
  store_float(P.y, P.dtype, m * P.N + n, v);
}

#if defined(__x86_64__)
#define E2K_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl"), always_inline)) inline
#define E2K_AVX512_KERNEL __attribute__((target("avx512f,avx512bw,avx512vl")))
#define E2K_AVX512_BF16_KERNEL __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

// 16 weights from float32 / float16 / bfloat16 memory as float32 (masked lanes read as 0).
template <int DT>
E2K_AVX512 __m512 load16(const void* w, int64_t i, __mmask16 mask) {
  if constexpr (DT == kFloat32) {
    return _mm512_maskz_loadu_ps(mask, static_cast<const float*>(w) + i);
  } else {
    const __m256i h = _mm256_maskz_loadu_epi16(mask, static_cast<const uint16_t*>(w) + i);
    if constexpr (DT == kFloat16) return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
}

// Step s of a block's k loop pulls its share of the next tile's weights into L1, non-temporal:
// a weight is used once per forward and the next forward comes after every other weight, so
// keeping it in L2/L3 only evicts what is reused (the KV cache, activations, the draft head
// between a verify's layers). On the 2-core dev EPYC the linears alone run as fast as with
// T0 hints, and decoding a few per cent faster (README, "Measured numbers").
E2K_AVX512 void prefetch_step(Prefetch pf, int64_t s) {
  if (pf.at == nullptr) return;
  for (int64_t j = 0; j < pf.lines; ++j) _mm_prefetch(pf.at + (s * pf.lines + j) * 64, _MM_HINT_NTA);
}

// Reduces 16 accumulators at once: lane j of the result is the sum of v[j]'s 16 lanes, added in
// the fixed tree every output uses (halves: lane l + lane l + 8, then l + 4, l + 2, l + 1), the
// same additions one vector at a time would make, but with the vectors transposed through the
// shuffles so that each add works on 16 lanes of useful data: 15 adds and 31 shuffles for 16
// outputs instead of 4 adds and 4 shuffles each (at K = 576, 24 outputs one at a time cost about
// a fifth of a 3 x 8 block's 864 FMAs).
E2K_AVX512 __m512 reduce16(const __m512* v) {
  __m512 u[8], w[4], z[2];
  #pragma GCC unroll 8
  for (int j = 0; j < 8; ++j)  // [v2j lanes l + l+8 (8), v2j+1 lanes l + l+8 (8)]
    u[j] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * j], v[2 * j + 1], 0x44),
                         _mm512_shuffle_f32x4(v[2 * j], v[2 * j + 1], 0xEE));
  #pragma GCC unroll 4
  for (int j = 0; j < 4; ++j)  // 128-bit block b: v4j+b's lanes l + l+4 (4)
    w[j] = _mm512_add_ps(_mm512_shuffle_f32x4(u[2 * j], u[2 * j + 1], 0x88),
                         _mm512_shuffle_f32x4(u[2 * j], u[2 * j + 1], 0xDD));
  #pragma GCC unroll 2
  for (int j = 0; j < 2; ++j)  // block b: [v8j+b: l + l+2 (2), v8j+4+b: l + l+2 (2)]
    z[j] = _mm512_add_ps(_mm512_shuffle_ps(w[2 * j], w[2 * j + 1], 0x44),
                         _mm512_shuffle_ps(w[2 * j], w[2 * j + 1], 0xEE));
  // block b: [vb, v4+b, v8+b, v12+b], each lane 0 + lane 1; then lane 4b + c -> lane 4c + b.
  const __m512 s = _mm512_add_ps(_mm512_shuffle_ps(z[0], z[1], 0x88), _mm512_shuffle_ps(z[0], z[1], 0xDD));
  return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15), s);
}

// The R x MB accumulators' sums, finished (bias, rounding) into y.
template <int R, int MB>
E2K_AVX512 void finish_block(const Problem& P, int64_t n0, int64_t m0, const __m512 (&acc)[MB][R]) {
  constexpr int kCount = MB * R, kGroups = (kCount + 15) / 16;
  alignas(64) float sums[kGroups * 16];
  #pragma GCC unroll 8
  for (int g = 0; g < kGroups; ++g) {
    __m512 v[16];
    #pragma GCC unroll 16
    for (int j = 0; j < 16; ++j) v[j] = g * 16 + j < kCount ? acc[(g * 16 + j) / R][(g * 16 + j) % R] : _mm512_setzero_ps();
    _mm512_store_ps(sums + g * 16, reduce16(v));
  }
  #pragma GCC unroll 8
  for (int i = 0; i < MB; ++i)
    #pragma GCC unroll 8
    for (int r = 0; r < R; ++r) finish(P, m0 + i, n0 + r, sums[i * R + r]);
}

// float32 FMA path: R weight rows from n0 x MB x rows from m0 (x as float32). The loop is
// written out here, with the sizes in locals, and every loop over the accumulators fully
// unrolled, so they stay in registers (else GCC keeps the array in memory and stores it back
// on every step).
template <int DT, int R, int MB>
E2K_AVX512_KERNEL void tile_fma(const Problem& P, int64_t n0, int64_t m0, Prefetch pf) {
  const int64_t K = P.K, Kp = P.Kp;
  const float* x = static_cast<const float*>(P.x) + m0 * Kp;
  const void* w = P.w;
  __m512 acc[MB][R];
  #pragma GCC unroll 8
  for (int i = 0; i < MB; ++i)
    #pragma GCC unroll 8
    for (int r = 0; r < R; ++r) acc[i][r] = _mm512_setzero_ps();
  const __mmask16 tail = K % 16 ? __mmask16((1u << (K % 16)) - 1) : __mmask16(0xffff);
  for (int64_t k = 0; k < K; k += 16) {
    prefetch_step(pf, k / 16);
    const __mmask16 mask = k + 16 <= K ? __mmask16(0xffff) : tail;
    __m512 wv[R];
    #pragma GCC unroll 8
    for (int r = 0; r < R; ++r) wv[r] = load16<DT>(w, (n0 + r) * K + k, mask);
    #pragma GCC unroll 8
    for (int i = 0; i < MB; ++i) {
      const __m512 xv = _mm512_loadu_ps(x + i * Kp + k);  // zero-padded: no mask needed
      #pragma GCC unroll 8
      for (int r = 0; r < R; ++r) acc[i][r] = _mm512_fmadd_ps(xv, wv[r], acc[i][r]);
    }
  }
  finish_block<R, MB>(P, n0, m0, acc);
}

// bfloat16 dot-product path (x as bfloat16, AVX512-BF16): 32 values of k per step.
template <int R, int MB>
E2K_AVX512_BF16_KERNEL void tile_dpbf16(const Problem& P, int64_t n0, int64_t m0, Prefetch pf) {
  const int64_t K = P.K, Kp = P.Kp;
  const uint16_t* x = static_cast<const uint16_t*>(P.x) + m0 * Kp;
  const uint16_t* w = static_cast<const uint16_t*>(P.w);
  __m512 acc[MB][R];
  #pragma GCC unroll 8
  for (int i = 0; i < MB; ++i)
    #pragma GCC unroll 8
    for (int r = 0; r < R; ++r) acc[i][r] = _mm512_setzero_ps();
  const __mmask32 tail = K % 32 ? __mmask32((1ull << (K % 32)) - 1) : __mmask32(0xffffffffu);
  for (int64_t k = 0; k < K; k += 32) {
    prefetch_step(pf, k / 32);
    const __mmask32 mask = k + 32 <= K ? __mmask32(0xffffffffu) : tail;
    __m512bh wv[R];
    #pragma GCC unroll 8
    for (int r = 0; r < R; ++r) wv[r] = (__m512bh)_mm512_maskz_loadu_epi16(mask, w + (n0 + r) * K + k);
    #pragma GCC unroll 8
    for (int i = 0; i < MB; ++i) {
      const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + i * Kp + k);
      #pragma GCC unroll 8
      for (int r = 0; r < R; ++r) acc[i][r] = _mm512_dpbf16_ps(acc[i][r], xv, wv[r]);
    }
  }
  finish_block<R, MB>(P, n0, m0, acc);
}
#endif

// Portable fallback: the FMA path's sums with 16 scalar lanes.
template <int R, int MB>
void tile_portable(const Problem& P, int64_t n0, int64_t m0, Prefetch /*pf*/) {
  const float* x = static_cast<const float*>(P.x) + m0 * P.Kp;
  float acc[MB][R][16] = {};
  for (int64_t k = 0; k < P.K; k += 16) {
    const int64_t width = std::min<int64_t>(16, P.K - k);
    float w[R][16] = {};
    #pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
      for (int64_t l = 0; l < width; ++l) w[r][l] = load_float(P.w, P.dtype, (n0 + r) * P.K + k + l);
    #pragma GCC unroll 8
    for (int i = 0; i < MB; ++i)
      #pragma GCC unroll 8
      for (int r = 0; r < R; ++r)
        for (int l = 0; l < 16; ++l) acc[i][r][l] = __builtin_fmaf(x[i * P.Kp + k + l], w[r][l], acc[i][r][l]);
  }
  #pragma GCC unroll 8
  for (int i = 0; i < MB; ++i) {
    #pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      float s[16];
      std::memcpy(s, acc[i][r], sizeof s);
      for (int half = 8; half >= 1; half /= 2)
        for (int l = 0; l < half; ++l) s[l] += s[l + half];
      finish(P, m0 + i, n0 + r, s[0]);
    }
  }
}

// (problem, first weight row, first x row, what to prefetch meanwhile)
using TileFn = void (*)(const Problem&, int64_t, int64_t, Prefetch);

enum class Path { kPortable, kFma, kDpbf16 };

Path pick_path(int dtype) {
#if defined(__x86_64__)
  static const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                             __builtin_cpu_supports("avx512vl");
  static const bool bf16 = avx512 && __builtin_cpu_supports("avx512bf16");
  if (dtype == kBFloat16 && bf16) return Path::kDpbf16;
  if (avx512) return Path::kFma;
#endif
  (void)dtype;
  return Path::kPortable;
}

template <int R, int MB>
TileFn tile_fn(Path path, int dtype) {
#if defined(__x86_64__)
  if (path == Path::kDpbf16) return tile_dpbf16<R, MB>;
  if (path == Path::kFma) {
    if (dtype == kFloat32) return tile_fma<kFloat32, R, MB>;
    if (dtype == kFloat16) return tile_fma<kFloat16, R, MB>;
    return tile_fma<kBFloat16, R, MB>;
  }
#endif
  (void)path;
  (void)dtype;
  return tile_portable<R, MB>;
}

// The tile functions for R weight rows: fns[MB - 1] handles MB x rows, MB = 1 .. MBMax.
template <int R, int MBMax>
void tiles_for(Path path, int dtype, std::vector<TileFn>& fns) {
  if constexpr (MBMax > 1) tiles_for<R, MBMax - 1>(path, dtype, fns);
  fns.push_back(tile_fn<R, MBMax>(path, dtype));
}

// The x blocks that M rows go in, at most mb rows each: the fewest.
inline int64_t x_blocks(int64_t M, int64_t mb) { return (M + mb - 1) / mb; }

// Rows of the next x block when `left` remain, at most `mb`: x_blocks(left, mb) blocks, as even as
// they go (a block of one row would do R multiply-adds per weight load instead of 2R or 3R: 4 rows
// at mb = 3 go as 2 + 2, 10 at mb = 6 as 5 + 5), so the rows left after it take one block fewer.
inline int64_t block_rows(int64_t left, int64_t mb) {
  const int64_t blocks = x_blocks(left, mb);
  return (left + blocks - 1) / blocks;
}

// Multiply-adds per vector load of M x rows against tiles of R weight rows, x blocks of at most
// mb rows: each k step of a block loads R weight vectors and one x vector per row.
inline double fma_per_load(int64_t M, int64_t R, int64_t mb) { return double(R * M) / double(R * x_blocks(M, mb) + M); }

// All x rows against weight rows [n0, n0 + R), a block at a time. Meanwhile the blocks prefetch
// the next tile's weights (`next`, `bytes` of them, if any), spread evenly over their steps, so
// one tile's memory reads overlap the previous tile's arithmetic.
inline void rows(const Problem& P, const std::vector<TileFn>& fns, int64_t n0, const char* next, int64_t bytes,
                 int64_t step) {
  const int64_t mb = int64_t(fns.size());
  const int64_t steps = x_blocks(P.M, mb) * ((P.K + step - 1) / step);
  const int64_t per_step = next != nullptr && steps > 0 ? (bytes / 64 + steps - 1) / steps : 0;  // K = 0: none
  const int64_t per_block = per_step * 64 * ((P.K + step - 1) / step);
  for (int64_t m0 = 0, b = 0; m0 < P.M; ++b) {
    const int64_t rows_here = block_rows(P.M - m0, mb);
    const bool any = next != nullptr && b * per_block < bytes;
    fns[size_t(rows_here - 1)](P, n0, m0, Prefetch{any ? next + b * per_block : nullptr, per_step});
    m0 += rows_here;
  }
}

}  // namespace

bool skinny_linear_bf16_dot() { return pick_path(kBFloat16) == Path::kDpbf16; }

void skinny_linear_cpu(const void* x, const void* w, const void* bias, int dtype, int64_t M, int64_t K, int64_t N,
                       void* y, int64_t threads) {
  if (M <= 0 || N <= 0) return;
  const Path path = pick_path(dtype);
  // The padded x copy: whole vectors of 32 bfloat16 (dot-product path) or 16 float32.
  const int64_t Kp = path == Path::kDpbf16 ? (K + 31) / 32 * 32 : (K + 15) / 16 * 16;
  std::vector<float> xf;
  std::vector<uint16_t> xh;
  if (path == Path::kDpbf16) {
    xh.assign(size_t(M * Kp), 0);
    for (int64_t m = 0; m < M; ++m) std::memcpy(&xh[size_t(m * Kp)], static_cast<const uint16_t*>(x) + m * K, size_t(K) * 2);
  } else {
    xf.assign(size_t(M * Kp), 0.0f);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t k = 0; k < K; ++k) xf[size_t(m * Kp + k)] = load_float(x, dtype, m * K + k);
  }
  const Problem P{path == Path::kDpbf16 ? static_cast<const void*>(xh.data()) : xf.data(), w, bias, dtype, M, K, Kp, N, y};
  // Tiles of R = 8 weight rows against blocks of up to 3 x rows (24 accumulators, the 8 weight
  // vectors and one x vector: the 32 registers), or of R = 4 against up to 6 (24 + 4 + 1),
  // whichever does more multiply-adds per load at this M (ties: 8): 8 for 1-3, 8 and 9 rows, 4
  // for the rest (at M = 10, 2 blocks of 5 instead of 3 + 3 + 2 + 2). The blocking changes no
  // sum. The last N % R weight rows go one at a time.
  const int64_t R = fma_per_load(M, 4, 6) > fma_per_load(M, 8, 3) ? 4 : 8;
  std::vector<TileFn> wide, single;
  if (R == 8) tiles_for<8, 3>(path, dtype, wide);
  else tiles_for<4, 6>(path, dtype, wide);
  tiles_for<1, 3>(path, dtype, single);
  const int64_t tiles = N / R;
  // Work per thread at least before another thread is worth waking: 2^20 multiply-adds, fewer
  // than 4 rows counting as 4 (their cost is streaming the weights from DRAM, which two cores do
  // faster than one).
  threads = std::clamp<int64_t>(std::max<int64_t>(M, 4) * N * K / (int64_t(1) << 20), 1, std::max<int64_t>(1, threads));
  const int64_t row_bytes = K * (dtype == kFloat32 ? 4 : 2);
  const char* wb = static_cast<const char*>(w);
  const int64_t step = path == Path::kDpbf16 ? 32 : 16;  // k per step
#pragma omp parallel for num_threads(int(std::max<int64_t>(1, threads))) schedule(static) if (threads > 1)
  for (int64_t t = 0; t < tiles; ++t)
    rows(P, wide, t * R, t + 1 < tiles ? wb + (t + 1) * R * row_bytes : nullptr, R * row_bytes, step);
  for (int64_t n = tiles * R; n < N; ++n) rows(P, single, n, nullptr, 0, step);
}

}  // namespace e2k
