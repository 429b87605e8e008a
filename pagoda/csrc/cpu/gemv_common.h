// What pagoda's two GEMV files (int4_gemv.cpp: bf16 activations; q8_gemv.cpp: int8 ones)
// share: the dispatch of a pass's row count (1..8) to a kernel compiled for it, and the
// bf16 row helpers both use to read activations.
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

namespace pagoda_gemv {

constexpr int kMaxRows = 8;  // rows per pass: each weight is read once per pass

// f(std::integral_constant<int, rows>{}) for rows in 1..kMaxRows; false for any other count.
template <typename F>
inline bool with_rows(int rows, F&& f) {
  switch (rows) {
    case 1: f(std::integral_constant<int, 1>{}); return true;
    case 2: f(std::integral_constant<int, 2>{}); return true;
    case 3: f(std::integral_constant<int, 3>{}); return true;
    case 4: f(std::integral_constant<int, 4>{}); return true;
    case 5: f(std::integral_constant<int, 5>{}); return true;
    case 6: f(std::integral_constant<int, 6>{}); return true;
    case 7: f(std::integral_constant<int, 7>{}); return true;
    case 8: f(std::integral_constant<int, 8>{}); return true;
  }
  return false;
}

inline float bf16_to_float(uint16_t v) {
  const uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

#if defined(__AVX512F__)
inline __m512 load_bf16x16(const uint16_t* x) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// Sum of n bf16 values, in an order fixed by n alone: vectors of 16 lanes summed lane-wise,
// then one shuffle tree, then a tail in order. (A sequential fp32 sum is a chain of n
// dependent adds, ~4 cycles each: at 64 rows it cost ~40% of the 1536-wide down
// projection's GEMV.) The sum is part of both kernels' rounding, so it must not change
// with M or the thread count -- it depends on the values only.
inline float sum_bf16(const uint16_t* x, int64_t n) {
  int64_t i = 0;
  float s = 0.0f;
  if (n >= 16) {
    __m512 acc = _mm512_setzero_ps();
    for (; i + 16 <= n; i += 16) acc = _mm512_add_ps(acc, load_bf16x16(x + i));
    s = _mm512_reduce_add_ps(acc);
  }
  for (; i < n; ++i) s += bf16_to_float(x[i]);
  return s;
}
#endif

}  // namespace pagoda_gemv
