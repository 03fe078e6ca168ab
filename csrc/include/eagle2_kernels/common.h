// Helpers shared by the CPU (C++) and CUDA kernels: host/device qualifiers, float bit casts and
// the order key of float bits, 16-bit float decoding without CUDA headers, the input sanitising
// rule of eagle2_kernels.reference and the (value, index) order of top-k and argmax.
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

constexpr float kNegInf = -__builtin_huge_valf();

// The IEEE bit pattern of a float and back: CUDA's intrinsics in device code, memcpy in host code
// (the defined way to reinterpret an object's bits before C++20's std::bit_cast).
#if defined(__CUDA_ARCH__)
E2K_HD uint32_t float_to_bits(float f) { return __float_as_uint(f); }
E2K_HD float bits_to_float(uint32_t u) { return __uint_as_float(u); }
#else
template <class To, class From>
inline To host_bit_cast(From x) {
  static_assert(sizeof(To) == sizeof(From), "host_bit_cast: sizes differ");
  To y;
  std::memcpy(&y, &x, sizeof y);
  return y;
}
E2K_HD uint32_t float_to_bits(float f) { return host_bit_cast<uint32_t>(f); }
E2K_HD float bits_to_float(uint32_t u) { return host_bit_cast<float>(u); }
#endif

// Unsigned key with the order of the float values, so that integer compares, max and radix
// digits order floats. Flipping the magnitude bits of a negative float makes the bit patterns
// order like signed ints; flipping the sign bit then makes them order as unsigned ones. A
// bijection on 32-bit patterns: -0.0 keys just below +0.0 (callers that need equal keys for
// equal floats map -0.0 to +0.0 first) and NaNs sort beyond the infinity of their sign. No
// branch and no float compare, so CPU loops over it vectorise.
E2K_HD uint32_t float_order_key(float f) {
  const uint32_t u = float_to_bits(f);
  return (u ^ (uint32_t(int32_t(u) >> 31) >> 1)) ^ 0x80000000u;
}

// Inverse of float_order_key.
E2K_HD float order_key_float(uint32_t key) {
  const uint32_t s = key ^ 0x80000000u;
  return bits_to_float(s ^ (uint32_t(int32_t(s) >> 31) >> 1));
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
  if (x != x) return kNegInf;
  if (x == __builtin_huge_valf()) return kFloat32Max;
  return x;
}

// Whether (a, ia) comes before (b, ib) in the order of the top-k and argmax kernels: higher value
// first, ties to the lower index. On sanitized values (never NaN; -0.0 == +0.0) this is the order
// of torch.sort(stable=True, descending=True), whose first entry is torch.argmax's.
template <class Index>
E2K_HD bool ranks_before(float a, Index ia, float b, Index ib) {
  return a > b || (a == b && ia < ib);
}

}  // namespace e2k
