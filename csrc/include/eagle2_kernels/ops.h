// Entry points of the native kernels. Each op has a CPU function (csrc/<op>/<op>_cpu.cpp) and a
// CUDA launcher (csrc/<op>/<op>.cu, taking the cudaStream_t as a void*). CPU functions that can
// use several threads take `threads`, the most they may use (torch.get_num_threads()): they run
// on OpenMP, the runtime torch's own CPU ops use, so both share one pool of threads. Arguments mirror the
// Python wrappers in eagle2_kernels/ops/<op>.py, which validate shapes, dtypes and devices;
// every buffer is contiguous. Semantics: eagle2_kernels/reference.py.
#pragma once
#include <cstdint>

namespace e2k {

void frontier_expand_cpu(const void* logits, int dtype, const float* parent_scores, int64_t B, int64_t K,
                         int64_t V, int64_t k, int32_t* child_tokens, float* child_scores,
                         int32_t* frontier_index, float* frontier_scores, int64_t threads);

void rerank_cpu(const float* cand_scores, const int32_t* cand_parents, const int32_t* cand_tokens,
                const int32_t* root_tokens, const int32_t* prefix_len, int64_t B, int64_t N, int64_t m,
                int64_t L, int32_t* tokens, int32_t* parents, int32_t* depth, int32_t* positions,
                int32_t* mask_bits, int32_t* paths, int32_t* num_leaves);

void tree_attention_cpu(const void* q, const void* k_cache, const void* v_cache, int dtype,
                        const int32_t* tree_mask_bits, const int32_t* prefix_len, const int32_t* positions,
                        int64_t window, int64_t B, int64_t Hq, int64_t Hkv, int64_t n, int64_t S, int64_t d,
                        int64_t W, float scale, void* out, int64_t threads);

void tree_verify_cpu(const int32_t* tokens, const int32_t* parents, const void* target_logits, int dtype,
                     int64_t B, int64_t m, int64_t V, int64_t L, float temperature, float top_p, int64_t top_k,
                     const float* uniforms, float* workspace, int32_t* accepted, int32_t* accept_len,
                     int32_t* bonus, int64_t threads);

void kv_compact_cpu(void* cache, int64_t elem_size, int64_t N, int64_t B, int64_t H, int64_t S, int64_t d,
                    const int32_t* prefix_len, const int32_t* accepted, int64_t L, const int32_t* accept_len);

// CPU only (on CUDA the BLAS already reads a skinny GEMM's weights once).
void skinny_linear_cpu(const void* x, const void* w, const void* bias, int dtype, int64_t M, int64_t K, int64_t N,
                       void* y, int64_t threads);
// Whether skinny_linear_cpu multiplies bfloat16 with AVX512-BF16's dot product on this CPU (then a
// bfloat16 layer costs about half a float32 one: half the bytes, twice the multiply-adds per
// instruction); otherwise bfloat16 is widened to float32 first.
bool skinny_linear_bf16_dot();

#ifdef E2K_WITH_CUDA
int cuda_device_count();

void frontier_expand_cuda(const void* logits, int dtype, const float* parent_scores, int64_t B, int64_t K,
                          int64_t V, int64_t k, int32_t* child_tokens, float* child_scores,
                          int32_t* frontier_index, float* frontier_scores, void* stream);

void rerank_cuda(const float* cand_scores, const int32_t* cand_parents, const int32_t* cand_tokens,
                 const int32_t* root_tokens, const int32_t* prefix_len, int64_t B, int64_t N, int64_t m,
                 int64_t L, int32_t* tokens, int32_t* parents, int32_t* depth, int32_t* positions,
                 int32_t* mask_bits, int32_t* paths, int32_t* num_leaves, void* stream);

void tree_attention_cuda(const void* q, const void* k_cache, const void* v_cache, int dtype,
                         const int32_t* tree_mask_bits, const int32_t* prefix_len, const int32_t* positions,
                         int64_t window, int64_t B, int64_t Hq, int64_t Hkv, int64_t n, int64_t S, int64_t d,
                         int64_t W, float scale, void* out, void* stream);

void tree_verify_cuda(const int32_t* tokens, const int32_t* parents, const void* target_logits, int dtype,
                      int64_t B, int64_t m, int64_t V, int64_t L, float temperature, float top_p, int64_t top_k,
                      const float* uniforms, float* workspace, int32_t* accepted, int32_t* accept_len,
                      int32_t* bonus, void* stream);

void kv_compact_cuda(void* cache, int64_t elem_size, int64_t N, int64_t B, int64_t H, int64_t S, int64_t d,
                     const int32_t* prefix_len, const int32_t* accepted, int64_t L, const int32_t* accept_len,
                     void* stream);
#endif

}  // namespace e2k
