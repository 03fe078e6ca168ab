// The one pybind11 binding file. Built twice: as eagle2_kernels._C (CPU kernels) and, with
// E2K_WITH_CUDA defined, as eagle2_kernels._cuda (CUDA kernels). Both modules expose the same
// functions with the same arguments: raw data pointers and sizes as Python ints (from
// torch.Tensor.data_ptr(); torch is not needed to build), then the most CPU threads the op may
// use (ignored by the CUDA module and by the single-threaded CPU ops) and the CUDA stream handle
// (ignored by the CPU module). Validation happens in eagle2_kernels/ops/*.py.
#include <pybind11/pybind11.h>

#include "eagle2_kernels/ops.h"

namespace py = pybind11;
using u = std::uintptr_t;
using i64 = std::int64_t;

template <typename T>
static T* ptr(u p) { return reinterpret_cast<T*>(p); }

#ifdef E2K_WITH_CUDA
#define E2K_MODULE _cuda
#define E2K_OP(name) e2k::name##_cuda
#define E2K_STREAM , ptr<void>(stream)
#define E2K_THREADS
#else
#define E2K_MODULE _C
#define E2K_OP(name) e2k::name##_cpu
#define E2K_STREAM
#define E2K_THREADS , threads
#endif

PYBIND11_MODULE(E2K_MODULE, mod) {
  mod.doc() = "eagle2_kernels native kernels (raw-pointer ABI; use the eagle2_kernels functions)";
#ifdef E2K_WITH_CUDA
  mod.def("device_count", &e2k::cuda_device_count, "Visible CUDA devices (0 when no driver or device).");
#endif
  mod.def("frontier_expand", [](u logits, int dtype, u parent_scores, i64 B, i64 K, i64 V, i64 k, u child_tokens,
                                u child_scores, u frontier_index, u frontier_scores, i64 threads, u stream) {
    (void)threads;
    (void)stream;
    py::gil_scoped_release nogil;
    E2K_OP(frontier_expand)(ptr<const void>(logits), dtype, ptr<const float>(parent_scores), B, K, V, k,
                            ptr<int32_t>(child_tokens), ptr<float>(child_scores), ptr<int32_t>(frontier_index),
                            ptr<float>(frontier_scores) E2K_THREADS E2K_STREAM);
  });
  mod.def("rerank", [](u cand_scores, u cand_parents, u cand_tokens, u root_tokens, u prefix_len, i64 B, i64 N,
                       i64 m, i64 L, u tokens, u parents, u depth, u positions, u mask_bits, u paths,
                       u num_leaves, i64 threads, u stream) {
    (void)threads;
    (void)stream;
    py::gil_scoped_release nogil;
    E2K_OP(rerank)(ptr<const float>(cand_scores), ptr<const int32_t>(cand_parents), ptr<const int32_t>(cand_tokens),
                   ptr<const int32_t>(root_tokens), ptr<const int32_t>(prefix_len), B, N, m, L, ptr<int32_t>(tokens),
                   ptr<int32_t>(parents), ptr<int32_t>(depth), ptr<int32_t>(positions), ptr<int32_t>(mask_bits),
                   ptr<int32_t>(paths), ptr<int32_t>(num_leaves) E2K_STREAM);
  });
  mod.def("tree_attention", [](u q, u k_cache, u v_cache, int dtype, u tree_mask_bits, u prefix_len, u positions,
                               i64 window, i64 B, i64 Hq, i64 Hkv, i64 n, i64 S, i64 d, i64 W, float scale, u out,
                               i64 threads, u stream) {
    (void)threads;
    (void)stream;
    py::gil_scoped_release nogil;
    E2K_OP(tree_attention)(ptr<const void>(q), ptr<const void>(k_cache), ptr<const void>(v_cache), dtype,
                           ptr<const int32_t>(tree_mask_bits), ptr<const int32_t>(prefix_len),
                           ptr<const int32_t>(positions), window, B, Hq, Hkv, n, S, d, W, scale,
                           ptr<void>(out) E2K_THREADS E2K_STREAM);
  });
  mod.def("tree_verify", [](u tokens, u parents, u target_logits, int dtype, i64 B, i64 m, i64 V, i64 L,
                            float temperature, float top_p, i64 top_k, u uniforms, u workspace, u accepted,
                            u accept_len, u bonus, i64 threads, u stream) {
    (void)threads;
    (void)stream;
    py::gil_scoped_release nogil;
    E2K_OP(tree_verify)(ptr<const int32_t>(tokens), ptr<const int32_t>(parents), ptr<const void>(target_logits),
                        dtype, B, m, V, L, temperature, top_p, top_k, ptr<const float>(uniforms),
                        ptr<float>(workspace), ptr<int32_t>(accepted), ptr<int32_t>(accept_len),
                        ptr<int32_t>(bonus) E2K_THREADS E2K_STREAM);
  });
#ifndef E2K_WITH_CUDA
  mod.def("skinny_linear", [](u x, u w, u bias, int dtype, i64 M, i64 K, i64 N, u y, i64 threads, u stream) {
    (void)stream;
    py::gil_scoped_release nogil;
    e2k::skinny_linear_cpu(ptr<const void>(x), ptr<const void>(w), ptr<const void>(bias), dtype, M, K, N,
                           ptr<void>(y), threads);
  });
  mod.def("skinny_linear_bf16_dot", &e2k::skinny_linear_bf16_dot,
          "Whether skinny_linear multiplies bfloat16 with AVX512-BF16's dot product on this CPU.");
#endif
  mod.def("kv_compact", [](u cache, i64 elem_size, i64 N, i64 B, i64 H, i64 S, i64 d, u prefix_len, u accepted,
                           i64 L, u accept_len, i64 threads, u stream) {
    (void)threads;
    (void)stream;
    py::gil_scoped_release nogil;
    E2K_OP(kv_compact)(ptr<void>(cache), elem_size, N, B, H, S, d, ptr<const int32_t>(prefix_len),
                       ptr<const int32_t>(accepted), L, ptr<const int32_t>(accept_len) E2K_STREAM);
  });
}
