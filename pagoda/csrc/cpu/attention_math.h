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

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

// The helpers below sit in the innermost loops: a call per element (GCC does not always
// inline across the vectoriser's cost model) costs more than the work.
#define PAGODA_INLINE inline __attribute__((always_inline))

namespace pagoda_attention {

// e^x for x <= 0 (softmax weights: score minus the running max), fp32.
// Cephes' expf: x = n ln2 + r with |r| <= ln2/2, a degree-6 polynomial for e^r,
// then 2^n built in the exponent bits. Relative error ~2e-7; inputs below -87
// are clamped (the result ~1e-38, then multiplied into sums that are >= 1).
// Branch-free, so a loop of calls vectorizes.
PAGODA_INLINE float exp_nonpositive(float x) {
  x = x < -87.0f ? -87.0f : x;
  // n = round(x / ln2) by the 1.5 * 2^23 trick (round-to-nearest in the FPU's default mode):
  // std::floor would keep GCC from vectorising the loops that call this.
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  union { int32_t bits; float value; } two_n;  // 2^n, built in the exponent bits
  two_n.bits = (static_cast<int32_t>(n) + 127) << 23;
  return p * two_n.value;
}

// Element conversions to and from the fp32 the kernel accumulates in.
PAGODA_INLINE float to_float(float x) { return x; }
PAGODA_INLINE float to_float(c10::BFloat16 x) {
  // bf16 is the top half of an fp32: a shift, which vectorizes.
  const uint32_t bits = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}
PAGODA_INLINE float to_float(c10::Half x) { return static_cast<float>(x); }

template <typename T>
PAGODA_INLINE T from_float(float x) { return static_cast<T>(x); }  // round to nearest even for bf16/fp16

// Sum and max of 16 floats. The portable version is a tree (4 steps), not 15 dependent
// adds; with AVX-512 or AVX2 it is a few shuffles in registers. These finish every dot
// product and every block's softmax, so they matter.
PAGODA_INLINE float hsum16(const float* v) {
#if defined(__AVX512F__)
  return _mm512_reduce_add_ps(_mm512_loadu_ps(v));
#elif defined(__AVX2__)
  __m256 s8 = _mm256_add_ps(_mm256_loadu_ps(v), _mm256_loadu_ps(v + 8));
  __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
  s4 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
  s4 = _mm_add_ss(s4, _mm_movehdup_ps(s4));
  return _mm_cvtss_f32(s4);
#else
  float t[16];
  for (int i = 0; i < 16; ++i) t[i] = v[i];
  for (int w = 8; w >= 1; w /= 2)
    for (int i = 0; i < w; ++i) t[i] += t[i + w];
  return t[0];
#endif
}

PAGODA_INLINE float hmax16(const float* v) {
#if defined(__AVX512F__)
  return _mm512_reduce_max_ps(_mm512_loadu_ps(v));
#elif defined(__AVX2__)
  __m256 m8 = _mm256_max_ps(_mm256_loadu_ps(v), _mm256_loadu_ps(v + 8));
  __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m8), _mm256_extractf128_ps(m8, 1));
  m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
  m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
  return _mm_cvtss_f32(m4);
#else
  float t[16];
  for (int i = 0; i < 16; ++i) t[i] = v[i];
  for (int w = 8; w >= 1; w /= 2)
    for (int i = 0; i < w; ++i) t[i] = t[i] > t[i + w] ? t[i] : t[i + w];
  return t[0];
#endif
}

}  // namespace pagoda_attention
