// Picks ATen's Vectorized<T> implementation for the ISA this file is compiled
// for (-march=native): AVX-512, AVX2, or ATen's portable DEFAULT (plain loops).
// Include it FIRST, before any ATen header, so that ATen/cpu/vec sees the
// macro. ATen puts each ISA's Vectorized in its own inline namespace
// (at::vec::AVX512, ...), so files built with other choices do not clash.
// Using ATen's vectors (rather than our own intrinsics) gives the same
// float32 exp (SLEEF, exported by libtorch_cpu), the same bf16/fp16
// round-to-nearest-even conversions and the same vector widths as torch's
// own CPU kernels: what lets the fused ops round exactly as torch does.
#pragma once
#if !defined(CPU_CAPABILITY)
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VL__)
#define CPU_CAPABILITY_AVX512
#define CPU_CAPABILITY AVX512
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define CPU_CAPABILITY_AVX2
#define CPU_CAPABILITY AVX2
#else
#define CPU_CAPABILITY DEFAULT
#endif
#endif
#include <ATen/cpu/vec/vec.h>
#include <ATen/cpu/vec/functional.h>
