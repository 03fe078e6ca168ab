// Helpers shared by the CPU (C++) and CUDA kernels: host/device qualifiers, float bit casts and
// the order key of float bits, 16-bit float decoding and rounding without CUDA headers, the input sanitising
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

// float -> IEEE half bits, round to nearest even (overflow -> inf, subnormals exact, NaN kept NaN).
E2K_HD uint16_t float_to_half_bits(float f) {
  const uint32_t x = float_to_bits(f);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t ax = x & 0x7fffffffu;
  if (ax > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u);
  if (ax >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // >= 65520 rounds to inf
  if (ax >= 0x38800000u) {  // normal half: rebias the exponent, round the 13 dropped bits
    const uint32_t r = ax - 0x38000000u;
    return static_cast<uint16_t>(sign | ((r + 0xfffu + ((r >> 13) & 1u)) >> 13));
  }
  // Subnormal half (or zero): the value in units of 2^-24 is mant * 2^-(126 - exp).
  const uint32_t shift = 126u - (ax >> 23);
  if (shift > 24u) return static_cast<uint16_t>(sign);
  const uint32_t mant = (ax & 0x7fffffu) | 0x800000u;
  uint32_t h = mant >> shift;
  const uint32_t rem = mant & ((1u << shift) - 1u), half = 1u << (shift - 1u);
  if (rem > half || (rem == half && (h & 1u))) ++h;
  return static_cast<uint16_t>(sign | h);
}

// float -> bfloat16 bits, round to nearest even (NaN kept NaN).
E2K_HD uint16_t float_to_bf16_bits(float f) {
  const uint32_t x = float_to_bits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((x >> 16) | 0x40u);
  return static_cast<uint16_t>((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

// Stores v as element i of a float32/float16/bfloat16 buffer.
E2K_HD void store_float(void* p, int dtype, int64_t i, float v) {
  if (dtype == kFloat32) {
    static_cast<float*>(p)[i] = v;
  } else {
    static_cast<uint16_t*>(p)[i] = dtype == kFloat16 ? float_to_half_bits(v) : float_to_bf16_bits(v);
  }
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
