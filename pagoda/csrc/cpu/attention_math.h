// Small numeric helpers for pagoda's CPU paged attention (attention.cpp).
//
// Everything here is plain scalar C++ written so that GCC/Clang vectorize the
// loops that call it (no intrinsics): the same source compiles for AVX2,
// AVX-512 or any x86-64, and -march=native picks the widest vectors.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <cstring>

namespace pagoda_attention {

// e^x for x <= 0 (softmax weights: score minus the running max), fp32.
// Cephes' expf: x = n ln2 + r with |r| <= ln2/2, a degree-6 polynomial for e^r,
// then 2^n built in the exponent bits. Relative error ~2e-7; inputs below -87
// are clamped (the result ~1e-38, then multiplied into sums that are >= 1).
// Branch-free, so a loop of calls vectorizes.
inline float exp_nonpositive(float x) {
  x = x < -87.0f ? -87.0f : x;
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof(two_n));
  return p * two_n;
}

// Element conversions to and from the fp32 the kernel accumulates in.
inline float to_float(float x) { return x; }
inline float to_float(c10::BFloat16 x) {
  // bf16 is the top half of an fp32: a shift, which vectorizes.
  const uint32_t bits = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}
inline float to_float(c10::Half x) { return static_cast<float>(x); }

template <typename T>
inline T from_float(float x) { return static_cast<T>(x); }  // round to nearest even for bf16/fp16

}  // namespace pagoda_attention
