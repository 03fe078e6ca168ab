// Helpers shared by the CPU (C++) and CUDA kernels: host/device qualifiers, 16-bit float
// decoding without CUDA headers, and the input sanitising rule of eagle2_kernels.reference.
#pragma once
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define E2K_HD __host__ __device__ __forceinline__
#else
#define E2K_HD inline
#endif

namespace e2k {

enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

E2K_HD float bits_to_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

// IEEE half -> float, exact for every value (subnormals, inf, NaN included).
E2K_HD float half_bits_to_float(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t man = h & 0x3ffu;
  if (exp == 0x1fu) return bits_to_float(sign | 0x7f800000u | (man << 13));
  if (exp == 0) {
    if (man == 0) return bits_to_float(sign);
    // Subnormal half: value = man * 2^-24.
    float v = float(man) * 5.9604644775390625e-8f;
    return sign ? -v : v;
  }
  return bits_to_float(sign | ((exp + 112u) << 23) | (man << 13));
}

E2K_HD float bf16_bits_to_float(uint16_t b) { return bits_to_float(uint32_t(b) << 16); }

// Element i of a float32/float16/bfloat16 buffer, as float.
E2K_HD float load_float(const void* p, int dtype, int64_t i) {
  if (dtype == kFloat32) return static_cast<const float*>(p)[i];
  uint16_t h = static_cast<const uint16_t*>(p)[i];
  return dtype == kFloat16 ? half_bits_to_float(h) : bf16_bits_to_float(h);
}

constexpr float kFloat32Max = 3.402823466e+38f;

// NaN -> -inf, +inf -> largest float32 (reference.sanitize).
E2K_HD float sanitize(float x) {
  if (x != x) return -__builtin_huge_valf();
  if (x == __builtin_huge_valf()) return kFloat32Max;
  return x;
}

}  // namespace e2k
