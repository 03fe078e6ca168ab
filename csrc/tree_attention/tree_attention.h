// Rules of tree_attention shared by the CPU and CUDA kernels (eagle2_kernels.reference
// tree_attention / tree_mask_visible): which keys of a batch row can be visible, the bit test for
// tree keys, and the float -> float16/bfloat16 rounding of the output.
#pragma once
#include <cstdint>

#include "eagle2_kernels/common.h"

namespace e2k {

// Keys [0, prefix_end) are visible to every query of the row; keys [prefix_end, key_end) are tree
// keys, visible by their bit; no key at or past key_end is visible. Both ends are clamped to the
// cache length S so no kernel reads past it, whatever prefix_len holds.
struct TreeKeys {
  int64_t prefix_end;
  int64_t key_end;
};

E2K_HD TreeKeys tree_keys(int32_t prefix_len, int64_t S, int64_t W) {
  const int64_t p = prefix_len;
  const int64_t prefix_end = p < 0 ? 0 : (p > S ? S : p);
  const int64_t tree_end = p + 32 * W;
  return {prefix_end, tree_end < prefix_end ? prefix_end : (tree_end > S ? S : tree_end)};
}

// Whether tree key j (key prefix_len + j, 0 <= j < 32 * W) is visible through a query's mask words.
E2K_HD bool tree_bit(const int32_t* words, int64_t j) {
  return (static_cast<uint32_t>(words[j >> 5]) >> (j & 31)) & 1u;
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

}  // namespace e2k
