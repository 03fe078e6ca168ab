// tree_attention on a CUDA device, flash-decoding style (semantics:
// eagle2_kernels.reference.tree_attention).
//
// Work split. The Hq/Hkv query heads sharing a KV head are packed with the n queries into
// R = group * n rows (contiguous in q and out). A block owns kRows (16, 32 or 64) of those rows
// of one (batch row, KV head) and one split of that row's visible keys [0, key_end): the splits
// cut key_end (read on the device, so ragged prefixes need no host sync) into equal runs of
// whole kTileKeys tiles. Tree keys are simply the last keys of the range; the split covering
// them decodes the bit mask (tree_keys / tree_bit in tree_attention.h, shared with the CPU
// kernel). With a sliding window the range starts at the tile holding the block's first key
// inside any of its rows' windows (in_window in tree_attention.h masks the rest). The split
// count comes from the SM count and the cache length S. With one split the
// block writes the output; otherwise every split writes its unnormalised partial (acc, max, sum)
// and a merge kernel combines them.
//
// Per key tile: K and V are staged in shared memory (16-byte vector loads when aligned), the
// scores S = Q K^T go to shared memory, each warp runs the online softmax (float32, log2 domain)
// over its rows, and O = O * corr + P V accumulates in float32 shared memory. For float16 and
// bfloat16 the two products use tensor cores (wmma 16x16x16, float32 accumulation; the weights
// P are rounded to the input dtype as in flash attention); float32 inputs use CUDA cores with
// 4x4 register tiles, so their products stay exact float32.
//
// Workspace for the partials (splits > 1 only): cudaMallocAsync / cudaFreeAsync on the caller's
// stream. It is stream-ordered (no host sync), sized to the call, served from the device's
// memory pool after the first calls, and allowed inside CUDA graph capture.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <algorithm>
#include <climits>
#include <mutex>
#include <stdexcept>
#include <string>
#include <unordered_map>

#include "eagle2_kernels/ops.h"
#include "tree_attention.h"

namespace e2k {
namespace {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kTileKeys = 64;
constexpr int kMaxSplits = 64;
constexpr int kMinSplitKeys = 256;  // a split shorter than this costs more in merging than it saves
constexpr float kLog2e = 1.4426950408889634f;

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
constexpr bool kArchHasBf16Mma = false;  // wmma on bfloat16 needs sm_80
#else
constexpr bool kArchHasBf16Mma = true;
#endif

template <typename T>
struct Dtype;
template <>
struct Dtype<float> {
  static constexpr int code = kFloat32;
  static constexpr bool tensor_cores = false;
};
template <>
struct Dtype<__half> {
  static constexpr int code = kFloat16;
  static constexpr bool tensor_cores = true;
  static __device__ __half from_float(float x) { return __float2half_rn(x); }
};
template <>
struct Dtype<__nv_bfloat16> {
  static constexpr int code = kBFloat16;
  static constexpr bool tensor_cores = true;
  static __device__ __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
};

__host__ __device__ constexpr int round_up(int x, int to) { return (x + to - 1) / to * to; }

// Shared memory of one block: byte offsets (each 128-byte aligned, as wmma needs 32) and row
// pitches in elements. The input tiles are padded by 16 bytes per row, which spreads the rows of
// a 16x16 wmma fragment over all banks; pitches stay multiples of 16 bytes for vector stores.
// The 16-bit weights P of a row overwrite the start of that row's float scores (ld_p = the score
// pitch in T elements), which keeps two blocks of 64 rows x d = 128 within an SM.
struct Smem {
  int ld_in, ld_s, ld_p, ld_o;  // Q/K/V tiles (T), scores (float), weights (T), output (float)
  int q, k, v, s, o, m, l, corr, first, bytes;
};

template <typename T>
__host__ __device__ Smem smem_layout(int rows, int dp) {
  Smem L{};
  L.ld_in = dp + 16 / int(sizeof(T));
  L.ld_s = kTileKeys + 4;
  L.ld_p = L.ld_s * int(sizeof(float) / sizeof(T));
  L.ld_o = dp + 4;
  int at = 0;
  auto take = [&at](int bytes) {
    const int off = at;
    at = round_up(at + bytes, 128);
    return off;
  };
  L.q = take(rows * L.ld_in * int(sizeof(T)));
  L.k = take(kTileKeys * L.ld_in * int(sizeof(T)));
  L.v = take(kTileKeys * L.ld_in * int(sizeof(T)));
  L.s = take(rows * L.ld_s * int(sizeof(float)));
  L.o = take(rows * L.ld_o * int(sizeof(float)));
  L.m = take(rows * int(sizeof(float)));
  L.l = take(rows * int(sizeof(float)));
  L.corr = take(rows * int(sizeof(float)));
  L.first = take(int(sizeof(int)));  // dynamic, not static: the opt-in limit counts only dynamic bytes
  L.bytes = at;
  return L;
}

// Copies `valid` rows of d contiguous elements (row pitch d in src) into a tile of `tile_rows`
// rows of pitch ld, zero-filling the padding columns [d, dp) and the rows past `valid`.
template <typename T>
__device__ void stage_tile(T* dst, int ld, const T* src, int valid, int tile_rows, int d, int dp, bool vec) {
  constexpr int V = 16 / sizeof(T);
  if (vec) {  // d % V == 0 and src 16-byte aligned
    const int per_row = dp / V;
    for (int i = threadIdx.x; i < tile_rows * per_row; i += kThreads) {
      const int r = i / per_row, c = (i % per_row) * V;
      uint4 x = make_uint4(0, 0, 0, 0);
      if (r < valid && c < d) x = *reinterpret_cast<const uint4*>(src + int64_t(r) * d + c);
      *reinterpret_cast<uint4*>(dst + r * ld + c) = x;
    }
  } else {
    for (int i = threadIdx.x; i < tile_rows * dp; i += kThreads) {
      const int r = i / dp, c = i % dp;
      dst[r * ld + c] = r < valid && c < d ? src[int64_t(r) * d + c] : T(0.0f);
    }
  }
}

// S[rows][kTileKeys] = Q K^T (float32) for the staged tiles.
template <typename T>
__device__ void tile_scores(const T* Qs, const T* Ks, float* Ss, const Smem& L, int rows, int dp) {
  if constexpr (Dtype<T>::tensor_cores && kArchHasBf16Mma) {
    using namespace nvcuda;
    constexpr int kTilesN = kTileKeys / 16;
    for (int t = threadIdx.x / 32; t < rows / 16 * kTilesN; t += kWarps) {
      const int tm = t / kTilesN, tn = t % kTilesN;
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      wmma::fill_fragment(acc, 0.0f);
      for (int kk = 0; kk < dp; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b;  // K^T: K rows are its columns
        wmma::load_matrix_sync(a, Qs + tm * 16 * L.ld_in + kk, L.ld_in);
        wmma::load_matrix_sync(b, Ks + tn * 16 * L.ld_in + kk, L.ld_in);
        wmma::mma_sync(acc, a, b, acc);
      }
      wmma::store_matrix_sync(Ss + tm * 16 * L.ld_s + tn * 16, acc, L.ld_s, wmma::mem_row_major);
    }
  } else {
    // Thread tile: rows 4 * tr + i, keys tk + 16 * j (i, j < 4); a warp reads 16 consecutive K rows.
    for (int t = threadIdx.x; t < rows / 4 * 16; t += kThreads) {
      const int tr = t / 16, tk = t % 16;
      float acc[4][4] = {};
      for (int c = 0; c < dp; ++c) {
        float a[4], b[4];
        for (int i = 0; i < 4; ++i) a[i] = float(Qs[(4 * tr + i) * L.ld_in + c]);
        for (int j = 0; j < 4; ++j) b[j] = float(Ks[(tk + 16 * j) * L.ld_in + c]);
        for (int i = 0; i < 4; ++i)
          for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
      }
      for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 4; ++j) Ss[(4 * tr + i) * L.ld_s + tk + 16 * j] = acc[i][j];
    }
  }
}

// O = O * corr + P V over the tile (P: the weights, in Ps for tensor cores, else in Ss).
template <typename T>
__device__ void tile_accumulate(const float* Ss, const T* Ps, const T* Vs, float* Os, const float* corr, const Smem& L,
                                int rows, int dp) {
  if constexpr (Dtype<T>::tensor_cores && kArchHasBf16Mma) {
    using namespace nvcuda;
    for (int i = threadIdx.x; i < rows * dp; i += kThreads) Os[i / dp * L.ld_o + i % dp] *= corr[i / dp];
    __syncthreads();
    const int tiles_n = dp / 16;
    for (int t = threadIdx.x / 32; t < rows / 16 * tiles_n; t += kWarps) {
      const int tm = t / tiles_n, tn = t % tiles_n;
      float* o = Os + tm * 16 * L.ld_o + tn * 16;
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      wmma::load_matrix_sync(acc, o, L.ld_o, wmma::mem_row_major);
      for (int kk = 0; kk < kTileKeys; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> b;
        wmma::load_matrix_sync(a, Ps + tm * 16 * L.ld_p + kk, L.ld_p);
        wmma::load_matrix_sync(b, Vs + kk * L.ld_in + tn * 16, L.ld_in);
        wmma::mma_sync(acc, a, b, acc);
      }
      wmma::store_matrix_sync(o, acc, L.ld_o, wmma::mem_row_major);
    }
  } else {
    // Thread tile: rows 4 * tr + i, columns tc + (dp / 4) * j; a warp reads consecutive V columns.
    const int cols4 = dp / 4;
    for (int t = threadIdx.x; t < rows / 4 * cols4; t += kThreads) {
      const int tr = t / cols4, tc = t % cols4;
      float acc[4][4];
      for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 4; ++j) acc[i][j] = Os[(4 * tr + i) * L.ld_o + tc + cols4 * j] * corr[4 * tr + i];
      for (int key = 0; key < kTileKeys; ++key) {
        float p[4], v[4];
        for (int i = 0; i < 4; ++i) p[i] = Ss[(4 * tr + i) * L.ld_s + key];
        for (int j = 0; j < 4; ++j) v[j] = float(Vs[key * L.ld_in + tc + cols4 * j]);
        for (int i = 0; i < 4; ++i)
          for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(p[i], v[j], acc[i][j]);
      }
      for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 4; ++j) Os[(4 * tr + i) * L.ld_o + tc + cols4 * j] = acc[i][j];
    }
  }
}

struct Args {
  const int32_t* bits;
  const int32_t* prefix_len;
  const int32_t* positions;  // [B][n], read only when window > 0
  int64_t window;
  int Hkv, group, n, d, dp, W, rows, row_tiles, splits;
  int64_t S;
  float scale_log2;  // softmax scale * log2(e): the softmax runs on exp2
  bool vec;          // 16-byte loads are aligned
};

// One block: rows [r0, r0 + rows) of one (batch row, KV head) against one split of its keys.
// splits == 1: writes out; else writes part_acc [splits][B * Hkv * R][d] (unnormalised) and
// part_ml [splits][B * Hkv * R][2] (max in log2 units, sum).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    tree_attention_split_kernel(const T* __restrict__ q, const T* __restrict__ k_cache, const T* __restrict__ v_cache,
                                Args A, void* out, float* part_acc, float* part_ml) {
  extern __shared__ __align__(128) unsigned char smem[];
  const Smem L = smem_layout<T>(A.rows, A.dp);
  T* Qs = reinterpret_cast<T*>(smem + L.q);
  T* Ks = reinterpret_cast<T*>(smem + L.k);
  T* Vs = reinterpret_cast<T*>(smem + L.v);
  float* Ss = reinterpret_cast<float*>(smem + L.s);
  T* Ps = reinterpret_cast<T*>(smem + L.s);
  float* Os = reinterpret_cast<float*>(smem + L.o);
  float* sm_m = reinterpret_cast<float*>(smem + L.m);
  float* sm_l = reinterpret_cast<float*>(smem + L.l);
  float* sm_corr = reinterpret_cast<float*>(smem + L.corr);

  const int R = A.group * A.n;
  const int64_t bh = blockIdx.x / A.row_tiles;  // b * Hkv + kv head
  const int r0 = blockIdx.x % A.row_tiles * A.rows;
  const int64_t b = bh / A.Hkv;
  const int valid_rows = min(A.rows, R - r0);
  const int32_t p = A.prefix_len[b];
  const TreeKeys keys = tree_keys(p, A.S, A.W);
  const int32_t* positions = A.window > 0 ? A.positions + b * A.n : nullptr;
  int* first_pos = reinterpret_cast<int*>(smem + L.first);  // the smallest query position of the block
  if (threadIdx.x == 0) *first_pos = INT_MAX;
  __syncthreads();
  if (positions && threadIdx.x < valid_rows) atomicMin(first_pos, positions[(r0 + threadIdx.x) % A.n]);
  __syncthreads();
  // The first key inside some row's window; never past the tile holding the prefix end, since a
  // tree key's position is its query's, not its index.
  const int64_t first_key = positions ? max(int64_t(*first_pos) - A.window + 1, int64_t(0)) : 0;
  const int64_t k_first = min(first_key, keys.prefix_end) / kTileKeys * kTileKeys;
  // This split's run of keys: [k_first, key_end) cut into `splits` equal runs of whole tiles.
  const int64_t chunk = (keys.key_end - k_first + A.splits - 1) / A.splits;
  const int64_t run = (chunk + kTileKeys - 1) / kTileKeys * kTileKeys;
  const int64_t k_begin = min(k_first + int64_t(blockIdx.y) * run, keys.key_end);
  const int64_t k_end = min(k_begin + run, keys.key_end);

  stage_tile(Qs, L.ld_in, q + (bh * R + r0) * A.d, valid_rows, A.rows, A.d, A.dp, A.vec);
  for (int i = threadIdx.x; i < A.rows * L.ld_o; i += kThreads) Os[i] = 0.0f;
  for (int r = threadIdx.x; r < A.rows; r += kThreads) {
    sm_m[r] = kNegInf;
    sm_l[r] = 0.0f;
  }
  __syncthreads();
  const T* k_rows = k_cache + bh * A.S * A.d;
  const T* v_rows = v_cache + bh * A.S * A.d;
  const int lane = threadIdx.x % 32;

  for (int64_t k0 = k_begin; k0 < k_end; k0 += kTileKeys) {
    const int kb = int(min(int64_t(kTileKeys), k_end - k0));
    stage_tile(Ks, L.ld_in, k_rows + k0 * A.d, kb, kTileKeys, A.d, A.dp, A.vec);
    stage_tile(Vs, L.ld_in, v_rows + k0 * A.d, kb, kTileKeys, A.d, A.dp, A.vec);
    __syncthreads();
    tile_scores(Qs, Ks, Ss, L, A.rows, A.dp);
    __syncthreads();

    // Online softmax, one warp per row, lane j covers keys j and j + 32 of the tile.
    for (int r = threadIdx.x / 32; r < A.rows; r += kWarps) {
      const int32_t* words = A.bits + (b * A.n + (r0 + r) % A.n) * A.W;
      const int64_t qpos = positions ? positions[(r0 + r) % A.n] : 0;
      float x[2];
      float tile_max = kNegInf;
      for (int h = 0; h < 2; ++h) {
        const int j = lane + 32 * h;
        const int64_t key = k0 + j;
        const bool visible = r < valid_rows && j < kb && (key < keys.prefix_end || tree_bit(words, key - p)) &&
                             (!positions || in_window(qpos, key_position(positions, p, A.n, key), A.window));
        x[h] = visible ? Ss[r * L.ld_s + j] * A.scale_log2 : kNegInf;
        tile_max = fmaxf(tile_max, x[h]);
      }
      for (int o = 16; o > 0; o >>= 1) tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, o));
      __syncwarp();  // the row's scores are all read before its weights overwrite them
      const float m_old = sm_m[r];
      const float m_new = fmaxf(m_old, tile_max);
      const float shift = m_new == kNegInf ? 0.0f : m_new;  // nothing visible yet: weights 0
      float sum = 0.0f;
      for (int h = 0; h < 2; ++h) {
        const int j = lane + 32 * h;
        const float w = exp2f(x[h] - shift);
        sum += w;
        if constexpr (Dtype<T>::tensor_cores && kArchHasBf16Mma) {
          Ps[r * L.ld_p + j] = Dtype<T>::from_float(w);
        } else {
          Ss[r * L.ld_s + j] = w;
        }
      }
      for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
      __syncwarp();  // every lane has read sm_m[r] before lane 0 replaces it
      if (lane == 0) {
        const float corr = exp2f(m_old - shift);  // 0 while the row had seen nothing
        sm_corr[r] = corr;
        sm_l[r] = sm_l[r] * corr + sum;
        sm_m[r] = m_new;
      }
    }
    __syncthreads();
    tile_accumulate(Ss, Ps, Vs, Os, sm_corr, L, A.rows, A.dp);
    __syncthreads();
  }

  const int64_t row0 = bh * R + r0;  // global row index (= q/out row)
  if (A.splits == 1) {
    for (int i = threadIdx.x; i < valid_rows * A.d; i += kThreads) {
      const int r = i / A.d, c = i % A.d;
      const float l = sm_l[r];  // a row that saw no key outputs zeros; a NaN score made l NaN
      store_float(out, Dtype<T>::code, (row0 + r) * A.d + c, l != 0.0f ? Os[r * L.ld_o + c] / l : 0.0f);
    }
  } else {
    const int64_t total_rows = int64_t(gridDim.x / A.row_tiles) * R;
    const int64_t part_row0 = blockIdx.y * total_rows + row0;
    for (int i = threadIdx.x; i < valid_rows * A.d; i += kThreads) {
      const int r = i / A.d, c = i % A.d;
      part_acc[(part_row0 + r) * A.d + c] = Os[r * L.ld_o + c];
    }
    for (int r = threadIdx.x; r < valid_rows; r += kThreads) {
      part_ml[(part_row0 + r) * 2] = sm_m[r];
      part_ml[(part_row0 + r) * 2 + 1] = sm_l[r];
    }
  }
}

// One warp per output row: out = sum_s acc_s 2^(m_s - M) / sum_s l_s 2^(m_s - M), M = max_s m_s.
// A split that saw no key (l = 0) adds nothing; one whose l is NaN (a NaN score: NaN in q or in a
// visible key) makes the row NaN, as in the reference.
template <int DT>
__global__ void __launch_bounds__(kThreads)
    tree_attention_merge_kernel(const float* __restrict__ part_acc, const float* __restrict__ part_ml, int splits,
                                int64_t total_rows, int d, void* out) {
  const int64_t row = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (row >= total_rows) return;
  float M = kNegInf;
  for (int s = 0; s < splits; ++s) M = fmaxf(M, part_ml[(s * total_rows + row) * 2]);
  float total = 0.0f;
  for (int s = 0; s < splits; ++s) {
    const float l = part_ml[(s * total_rows + row) * 2 + 1];
    if (l != 0.0f) total += l * exp2f(part_ml[(s * total_rows + row) * 2] - M);
  }
  const float inv = total != 0.0f ? 1.0f / total : 0.0f;  // a row that saw no key outputs zeros
  for (int c = threadIdx.x % 32; c < d; c += 32) {
    float acc = 0.0f;
    for (int s = 0; s < splits; ++s) {
      if (part_ml[(s * total_rows + row) * 2 + 1] != 0.0f)
        acc += part_acc[(s * total_rows + row) * d + c] * exp2f(part_ml[(s * total_rows + row) * 2] - M);
    }
    store_float(out, DT, row * d + c, acc * inv);
  }
}

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("tree_attention_cuda: ") + what + ": " + cudaGetErrorString(err));
}

// Frees the partial buffers on the stream when the launcher returns or throws.
struct AsyncBuffer {
  void* ptr = nullptr;
  cudaStream_t stream;
  ~AsyncBuffer() {
    if (ptr) cudaFreeAsync(ptr, stream);
  }
};

// What a launch needs to know of the device and of the split kernel, queried once per device
// (and shared-memory size): this launcher runs for every layer of every decode step, and each
// query is a driver call. The kernel's shared-memory opt-in is set once, to the device's limit.
struct DeviceFacts {
  int sms = 0, max_smem = 0;
  std::unordered_map<int, int> blocks_per_sm;  // dynamic shared-memory bytes -> occupancy
};

// Returns the split kernel's blocks per SM at `smem` bytes of dynamic shared memory (0 for smem 0).
template <typename T>
int blocks_per_sm(int dev, int smem, int* sms, int* max_smem) {
  static std::mutex mu;
  static std::unordered_map<int, DeviceFacts> devices;
  std::lock_guard<std::mutex> lock(mu);
  auto [it, first] = devices.try_emplace(dev);
  DeviceFacts& f = it->second;
  if (first) {
    try {
      check(cudaDeviceGetAttribute(&f.sms, cudaDevAttrMultiProcessorCount, dev), "SM count");
      check(cudaDeviceGetAttribute(&f.max_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev), "shared memory limit");
      check(cudaFuncSetAttribute(tree_attention_split_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                 f.max_smem), "shared memory opt-in");
    } catch (...) {
      devices.erase(it);  // a failed query is not cached
      throw;
    }
  }
  *sms = f.sms;
  *max_smem = f.max_smem;
  if (smem <= 0 || smem > f.max_smem) return 0;  // the device facts only; a too-large smem: the caller reports it
  auto occ = f.blocks_per_sm.find(smem);
  if (occ == f.blocks_per_sm.end()) {
    int per_sm = 0;
    check(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, tree_attention_split_kernel<T>, kThreads, smem),
          "occupancy");
    occ = f.blocks_per_sm.emplace(smem, per_sm).first;
  }
  return occ->second;
}

template <typename T>
void launch(const void* q, const void* k_cache, const void* v_cache, const int32_t* bits, const int32_t* prefix_len,
            const int32_t* positions, int64_t window, int64_t B, int64_t Hq, int64_t Hkv, int64_t n, int64_t S,
            int64_t d, int64_t W, float scale, void* out, cudaStream_t stream) {
  int dev = 0, sms = 0, max_smem = 0;
  check(cudaGetDevice(&dev), "cudaGetDevice");
  blocks_per_sm<T>(dev, 0, &sms, &max_smem);

  Args A{};
  A.bits = bits;
  A.prefix_len = prefix_len;
  A.positions = positions;
  A.window = window;
  A.Hkv = int(Hkv);
  A.group = int(Hq / Hkv);
  A.n = int(n);
  A.d = int(d);
  A.dp = round_up(int(d), 16);
  A.W = int(W);
  A.S = S;
  A.scale_log2 = scale * kLog2e;
  const int R = A.group * A.n;
  A.rows = R > 32 ? 64 : R > 16 ? 32 : 16;
  while (A.rows > 16 && smem_layout<T>(A.rows, A.dp).bytes > max_smem) A.rows /= 2;
  const int smem = smem_layout<T>(A.rows, A.dp).bytes;
  if (smem > max_smem)
    throw std::runtime_error("tree_attention_cuda: head dim " + std::to_string(d) + " needs " + std::to_string(smem) +
                             " bytes of shared memory per block, the device allows " + std::to_string(max_smem));
  constexpr int kVec = 16 / sizeof(T);
  const auto aligned = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; };
  A.vec = d % kVec == 0 && aligned(q) && aligned(k_cache) && aligned(v_cache);
  A.row_tiles = (R + A.rows - 1) / A.rows;

  auto split_kernel = tree_attention_split_kernel<T>;
  const int per_sm = blocks_per_sm<T>(dev, smem, &sms, &max_smem);
  // Enough splits to fill every SM slot once, but none shorter than kMinSplitKeys of the cache.
  const int64_t blocks = B * Hkv * A.row_tiles;
  const int64_t want = (int64_t(std::max(per_sm, 1)) * sms + blocks - 1) / blocks;
  A.splits = int(std::clamp<int64_t>(std::min(want, S / kMinSplitKeys), 1, kMaxSplits));

  AsyncBuffer partials{nullptr, stream};
  float *part_acc = nullptr, *part_ml = nullptr;
  const int64_t total_rows = B * Hkv * R;
  if (A.splits > 1) {
    const size_t count = size_t(A.splits) * total_rows * (d + 2);
    check(cudaMallocAsync(&partials.ptr, count * sizeof(float), stream), "cudaMallocAsync of the split partials");
    part_acc = static_cast<float*>(partials.ptr);
    part_ml = part_acc + size_t(A.splits) * total_rows * d;
  }
  split_kernel<<<dim3(unsigned(blocks), unsigned(A.splits)), kThreads, smem, stream>>>(
      static_cast<const T*>(q), static_cast<const T*>(k_cache), static_cast<const T*>(v_cache), A, out, part_acc,
      part_ml);
  check(cudaGetLastError(), "split kernel launch");
  if (A.splits > 1) {
    const unsigned merge_blocks = unsigned((total_rows + kWarps - 1) / kWarps);
    tree_attention_merge_kernel<Dtype<T>::code>
        <<<merge_blocks, kThreads, 0, stream>>>(part_acc, part_ml, A.splits, total_rows, int(d), out);
    check(cudaGetLastError(), "merge kernel launch");
  }
}

}  // namespace

void tree_attention_cuda(const void* q, const void* k_cache, const void* v_cache, int dtype,
                         const int32_t* tree_mask_bits, const int32_t* prefix_len, const int32_t* positions,
                         int64_t window, int64_t B, int64_t Hq, int64_t Hkv, int64_t n, int64_t S, int64_t d,
                         int64_t W, float scale, void* out, void* stream) {
  if (B <= 0 || Hq <= 0 || Hkv <= 0 || n <= 0 || d <= 0) return;
  auto s = static_cast<cudaStream_t>(stream);
  auto launch_as = [&](auto dtype_tag) {
    launch<decltype(dtype_tag)>(q, k_cache, v_cache, tree_mask_bits, prefix_len, positions, window, B, Hq, Hkv, n, S,
                                d, W, scale, out, s);
  };
  if (dtype == kFloat32) {
    launch_as(float{});
  } else if (dtype == kFloat16) {
    launch_as(__half{});
  } else {
    launch_as(__nv_bfloat16{});
  }
}

}  // namespace e2k
