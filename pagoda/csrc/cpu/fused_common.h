// Helpers shared by the fused small ops (norm.cpp, rotary.cpp, activation.cpp).
// Include vec_isa.h before this (and before any ATen header).
#pragma once
#include "vec_isa.h"
#include "ops_common.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <tuple>
#include <type_traits>

namespace pagoda_fused {

using fVec = at::vec::Vectorized<float>;
// Elements handled per step: two float vectors, i.e. one vector of a 16-bit
// type (ATen's convert_to_float splits one bf16/fp16 vector into two floats).
constexpr int64_t kStep = 2 * fVec::size();

// Loads kStep elements of T as two float vectors.
template <typename T>
inline void load2(const T* p, fVec& a, fVec& b) {
  if constexpr (std::is_same_v<T, float>) {
    a = fVec::loadu(p);
    b = fVec::loadu(p + fVec::size());
  } else {
    std::tie(a, b) = at::vec::convert_to_float<T>(at::vec::Vectorized<T>::loadu(p));
  }
}

// Stores two float vectors as kStep elements of T (round to nearest even).
template <typename T>
inline void store2(T* p, const fVec& a, const fVec& b) {
  if constexpr (std::is_same_v<T, float>) {
    a.store(p);
    b.store(p + fVec::size());
  } else {
    at::vec::convert_from_float<T>(a, b).store(p);
  }
}

// Rounds two float vectors to T and back: what storing an intermediate
// tensor of dtype T does in torch's op-by-op code.
template <typename T>
inline void round2(fVec& a, fVec& b) {
  if constexpr (!std::is_same_v<T, float>) {
    std::tie(a, b) = at::vec::convert_to_float<T>(at::vec::convert_from_float<T>(a, b));
  }
}

template <typename T>
inline float round1(float v) {
  return static_cast<float>(static_cast<T>(v));
}

// Stops the compiler from fusing a product into a later add (an FMA rounds
// once where torch's separate mul and add round twice). g++ contracts
// vector intrinsics too (-ffp-contract=fast is its C++ default).
inline fVec opaque(fVec v) {
#if defined(CPU_CAPABILITY_AVX512)
  __m512 r = v;
  asm("" : "+v"(r));
  return fVec(r);
#elif defined(CPU_CAPABILITY_AVX2)
  __m256 r = v;
  asm("" : "+x"(r));
  return fVec(r);
#else
  return v;
#endif
}

inline float opaque1(float v) {
#if defined(__x86_64__)
  asm("" : "+x"(v));
#endif
  return v;
}

// Work below this many elements (weighted: an exp counts ~8) runs on the
// calling thread (~20-50 us of work): waking the pool costs more than it saves
// at small sizes, and on a core shared with other processes a parallel region
// can wait a scheduler slice (ms) for its second thread. Batch-1 decode is 1 row.
constexpr int64_t kMinParallelElements = 262144;

inline int64_t grain_for(int64_t elements_per_item) {
  return std::max<int64_t>(1, kMinParallelElements / std::max<int64_t>(1, elements_per_item));
}

}  // namespace pagoda_fused

// Dispatch over the float types the fused ops support.
#define PAGODA_DISPATCH_FLOAT3(DTYPE, NAME, ...)                                       \
  [&] {                                                                                \
    switch (DTYPE) {                                                                   \
      case at::kFloat: { using scalar_t = float; return __VA_ARGS__(); }               \
      case at::kBFloat16: { using scalar_t = c10::BFloat16; return __VA_ARGS__(); }    \
      case at::kHalf: { using scalar_t = c10::Half; return __VA_ARGS__(); }            \
      default: TORCH_CHECK(false, NAME, ": unsupported dtype ", DTYPE);                \
    }                                                                                  \
  }()
