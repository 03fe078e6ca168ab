"""Helpers shared by the Triton kernels: the input sanitising rule of eagle2_kernels.reference
and the order key of float32 values (Triton counterparts of csrc/include/eagle2_kernels/common.h).
"""
from __future__ import annotations

import triton
import triton.language as tl

from ..reference import FLOAT32_MAX

_FLOAT32_MAX = tl.constexpr(FLOAT32_MAX)


@triton.jit
def sanitize(x):
    """reference.sanitize: NaN -> -inf, +inf -> the largest float32."""
    x = tl.where(x != x, float("-inf"), x)
    return tl.where(x == float("inf"), _FLOAT32_MAX, x)


@triton.jit
def _flip_negative(bits):
    # Flips the magnitude bits of negative int32s; its own inverse. On float32 bit patterns it
    # makes signed int32 order match float order.
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def order_key(x):
    """Signed int32 key with the order of the float32 values x (no NaN); for x >= 0 it is the bit
    pattern itself. -0.0 keys just below 0.0: callers that need equal keys for equal floats map
    -0.0 to 0.0 first."""
    return _flip_negative(x.to(tl.int32, bitcast=True))


@triton.jit
def order_key_float(key):
    """Inverse of order_key: the float32 values of int32 keys."""
    return _flip_negative(key).to(tl.float32, bitcast=True)
