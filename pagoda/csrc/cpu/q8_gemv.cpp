// Packed 4- and 8-bit weights times a few rows of int8-quantized activations, with VNNI:
//   int4_gemv_q8: y = x @ W.T, W[n, k] = d[n, g] q[n, k] + m[n, g], q in [0, 15]
//   int8_gemv_q8: y = x @ W.T, W[n, k] = s[n] q[n, k], q in [-127, 127]    (fp32 y: logits)
// The 4-bit form reads int4_gemv.cpp's layout; the 8-bit form its own, ready for vpdpbusd:
// [N/16, K/4, 64] uint8, bytes 4j .. 4j+3 of a 64-byte vector are q + 128 of column j for
// k = 4c .. 4c+3 (no unpacking: the weights go straight into the instruction).
//
// Why: from 8 rows on, int4_gemv.cpp's bf16 kernel is bound by its vdpbf16ps count (two
// per 4 weights and row; the 8-bit form four), not by memory. One vpdpbusd multiplies 4
// weights by 4 activations per column (64 products per instruction), and the integer sums
// are exact. Measured on Zen 5 (benchmarks/gemv_kernels.py): the 8-bit form runs ~2.2x
// faster than int4_gemv.cpp's from 8 rows on, so the int8 lm_head uses it; the 4-bit form
// only ~1.3x (Zen 5 issues vdpbf16ps twice as fast as vpdpbusd, and the nibbles must still
// be unpacked), not worth what its activations cost.
//
// Activations: each row is quantized per group of 32 k (the int4 weights' own groups):
// xq = round(x / s_g) in [-127, 127], s_g = max|x| / 127 -- llama.cpp's Q8 activations.
// What that costs (benchmarks/quant_quality.py, default model, against float32): on the
// lm_head alone nothing measurable (perplexity -0.09% vs -0.05% with bf16 activations); on
// the 4-bit layers +1.3%, over the 1% budget, so they keep bf16 activations
// (pagoda/model/quant/packed.py, GEMV_Q8_ACTIVATIONS).
//
// Per row, group g and column (exact int32 sums, then fp32):
//   int4: y = sum_g d_g * s_g * sum_k q_k xq_k + m_g * sx_g   (sx_g: the group's exact sum of x)
//   int8: y = s * sum_g s_g * (sum_k (q_k + 128) xq_k - 128 * sum_k xq_k)
//         (vpdpbusd wants one unsigned operand: the weights are stored as q + 128, and the
//          row's own sum of xq takes the 128 back out)
// Invariant: a row's result depends only on that row and the weights -- not on M, the other
// rows or the thread count -- so a speculative step verifies a token exactly as a one-token
// decode step scores it.
#include "ops_common.h"
#include "gemv_common.h"

#include <immintrin.h>

#include <cmath>
#include <cstring>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512BF16__) && defined(__AVX512VNNI__)
#define PAGODA_HAVE_Q8_GEMV 1
#endif

namespace {

constexpr int64_t kActGroup8 = 32;  // activation group of the 8-bit form (its weights have one scale per row)

#ifdef PAGODA_HAVE_Q8_GEMV

constexpr int64_t kCols = 16;
constexpr int64_t kChunkBytes = 32;
using pagoda_gemv::bf16_to_float;
using pagoda_gemv::kMaxRows;
using pagoda_gemv::load_bf16x16;

// One row's activations, quantized per group.
struct QuantRows {
  const int8_t* xq;      // [M, K]
  const float* scale;    // [M, G]: s_g
  const float* sum_x;    // [M, G]: exact sums of x (int4's m term)
  const int32_t* sum_q;  // [M, G]: sums of xq (int8's correction)
  int64_t K, G;
};

// Quantizes row `x` (K bf16) in groups of `gs`: fixed arithmetic per element and a fixed
// summation order per group (sum_bf16), so a row's codes and sums never depend on anything
// but the row.
void quantize_row(const uint16_t* x, int64_t K, int64_t gs, int8_t* xq, float* scale, float* sum_x,
                  int32_t* sum_q) {
  for (int64_t g0 = 0; g0 < K; g0 += gs) {
    const uint16_t* xg = x + g0;
    int64_t i = 0;
    float amax = 0.0f;  // a maximum: any order gives the same
    if (gs >= 16) {
      __m512 vmax = _mm512_setzero_ps();
      for (; i + 16 <= gs; i += 16) vmax = _mm512_max_ps(vmax, _mm512_abs_ps(load_bf16x16(xg + i)));
      amax = _mm512_reduce_max_ps(vmax);
    }
    for (int64_t t = i; t < gs; ++t) amax = std::max(amax, std::fabs(bf16_to_float(xg[t])));
    const float sx = pagoda_gemv::sum_bf16(xg, gs);
    const float s = amax / 127.0f;
    const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
    int32_t sq = 0;
    for (int64_t t = 0; t < gs; ++t) {
      const float v = bf16_to_float(xg[t]) * inv;
      const int32_t q = static_cast<int32_t>(std::nearbyint(std::min(127.0f, std::max(-127.0f, v))));
      xq[g0 + t] = static_cast<int8_t>(q);
      sq += q;
    }
    const int64_t g = g0 / gs;
    scale[g] = s;
    sum_x[g] = sx;
    sum_q[g] = sq;
  }
}

// 16 columns x 4 k as 16 int32 lanes of 4 unsigned bytes (k order), from 32 bytes of the
// 4-bit layout: byte j holds column j/2, low nibble k = 4c + j%2, high nibble k = 4c + 2 + j%2.
inline __m512i unpack_int4(const uint8_t* chunk) {
  const __m512i t = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(chunk)));
  // t = lo0 | hi0 << 4 | lo1 << 8 | hi1 << 12 -> bytes (lo0, lo1, hi0, hi1) = k 4c .. 4c+3
  return _mm512_or_si512(_mm512_and_si512(t, _mm512_set1_epi32(0x0F0F)),
                         _mm512_and_si512(_mm512_slli_epi32(t, 12), _mm512_set1_epi32(0x0F0F0000)));
}

// acc += w . (4 bytes at p, in every lane): vpdpbusd with an embedded-broadcast memory
// operand, which compilers do not fold from intrinsics (one instruction instead of two).
inline __m512i dot4(__m512i acc, __m512i w, const int8_t* p) {
  asm("vpdpbusd %[x]%{1to16%}, %[w], %[acc]" : [acc] "+v"(acc) : [w] "v"(w), [x] "m"(*reinterpret_cast<const int32_t*>(p)));
  return acc;
}

// Two consecutive weight vectors (k = 4c .. 4c+7 of 16 columns) into every row's pair of
// accumulators: even[m] += w0 . x[m][4c..4c+3], odd[m] += w1 . x[m][4c+4..4c+7]. Chunks
// alternate between the two (exact int32 sums: no bit changes), which hides vpdpbusd's
// latency when few rows share a weight vector. `xr` is row 0's activations at k = 4c.
template <int M>
inline void dot_rows(__m512i* even, __m512i* odd, __m512i w0, __m512i w1, const int8_t* xr, int64_t K) {
#pragma GCC unroll 8
  for (int m = 0; m < M; ++m) {
    even[m] = dot4(even[m], w0, xr + m * K);
    odd[m] = dot4(odd[m], w1, xr + m * K + 4);
  }
}

struct Problem {
  const uint8_t* w;    // int4: [N/16, K/4, 32] (int4_gemv.cpp's nibbles); int8: [N/16, K/4, 64] (q + 128)
  const uint16_t* sc;  // fp16; int4: [N/16, G, 32] (d then m); int8: [N/16, 1, 16]
  QuantRows x;         // rows m0 ..
  uint16_t* y;         // bf16 [M, ldy] (int4)
  float* y32;          // fp32 [M, ldy] (int8: the lm_head's logits, unrounded)
  int64_t K, G, group_size, ldy;
};

template <int M>
inline void run_block_int4_two_chains(const Problem& p, int64_t block) {
  const int64_t K = p.K, G = p.G, gs = p.group_size;
  const uint8_t* w = p.w + block * (K / 4) * kChunkBytes;
  const uint16_t* sc = p.sc + block * G * 32;
  __m512 tot[M];
#pragma GCC unroll 8
  for (int m = 0; m < M; ++m) tot[m] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m512i even[M], odd[M];  // see dot_rows
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) even[m] = odd[m] = _mm512_setzero_si512();
    const int64_t c0 = g * gs / 4, c1 = c0 + gs / 4;  // gs / 4 is even: gs is a multiple of 8
    for (int64_t c = c0; c < c1; c += 2) {
      const __m512i w0 = unpack_int4(w + c * kChunkBytes);
      const __m512i w1 = unpack_int4(w + (c + 1) * kChunkBytes);
      dot_rows<M>(even, odd, w0, w1, p.x.xq + 4 * c, K);
    }
    const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sc + g * 32)));
    const __m512 off = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sc + g * 32 + 16)));
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) {
      const __m512 ds = _mm512_mul_ps(d, _mm512_set1_ps(p.x.scale[m * G + g]));
      tot[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(even[m], odd[m])), ds, tot[m]);
      tot[m] = _mm512_fmadd_ps(off, _mm512_set1_ps(p.x.sum_x[m * G + g]), tot[m]);
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < M; ++m) {
    const __m256bh out = _mm512_cvtneps_pbh(tot[m]);
    std::memcpy(p.y + m * p.ldy + block * kCols, &out, sizeof(out));
  }
}

// From 4 rows on: one accumulator chain per row (M >= 4 chains hide vpdpbusd's latency), the
// group's chunks unrolled and the row pointers in locals. Dropping the even/odd pair saves its
// zeroing and adds: 576->3072 at 8-64 rows 13-17% faster (Zen 5, 1 and 2 threads, weights
// from DRAM, A/B in one process). Below 4 rows the pair hides the latency (equal there). The
// integer sums are exact, so both kernels give the same bits.
template <int M>
inline void run_block_int4(const Problem& p, int64_t block) {
  if constexpr (M < 4) {
    run_block_int4_two_chains<M>(p, block);
  } else {
    const int64_t K = p.K, G = p.G, gs = p.group_size;
    const uint8_t* w = p.w + block * (K / 4) * kChunkBytes;
    const uint16_t* sc = p.sc + block * G * 32;
    const int8_t* xq = p.x.xq;  // locals: the compiler need not reload them after each asm
    const float* xs = p.x.scale;
    const float* xsum = p.x.sum_x;
    __m512 tot[M];
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) tot[m] = _mm512_setzero_ps();
    for (int64_t g = 0; g < G; ++g) {
      __m512i acc[M];
#pragma GCC unroll 8
      for (int m = 0; m < M; ++m) acc[m] = _mm512_setzero_si512();
      const int64_t c0 = g * gs / 4, c1 = c0 + gs / 4;
#pragma GCC unroll 8
      for (int64_t c = c0; c < c1; ++c) {
        const __m512i w0 = unpack_int4(w + c * kChunkBytes);
        const int8_t* xr = xq + 4 * c;
#pragma GCC unroll 8
        for (int m = 0; m < M; ++m) acc[m] = dot4(acc[m], w0, xr + m * K);
      }
      const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sc + g * 32)));
      const __m512 off = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sc + g * 32 + 16)));
#pragma GCC unroll 8
      for (int m = 0; m < M; ++m) {
        const __m512 ds = _mm512_mul_ps(d, _mm512_set1_ps(xs[m * G + g]));
        tot[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[m]), ds, tot[m]);
        tot[m] = _mm512_fmadd_ps(off, _mm512_set1_ps(xsum[m * G + g]), tot[m]);
      }
    }
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) {
      const __m256bh out = _mm512_cvtneps_pbh(tot[m]);
      std::memcpy(p.y + m * p.ldy + block * kCols, &out, sizeof(out));
    }
  }
}

template <int M>
inline void run_block_int8(const Problem& p, int64_t block) {
  const int64_t K = p.K, G = p.G;
  const uint8_t* w = p.w + block * (K / 4) * 64;  // the VNNI layout: 64 bytes per 4 k
  __m512 tot[M];
#pragma GCC unroll 8
  for (int m = 0; m < M; ++m) tot[m] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m512i even[M], odd[M];
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) even[m] = odd[m] = _mm512_setzero_si512();
    const int64_t v0 = g * kActGroup8 / 4, v1 = v0 + kActGroup8 / 4;  // vectors of 4 k (8 per group)
    for (int64_t v = v0; v < v1; v += 2) {
      const __m512i w0 = _mm512_loadu_si512(w + v * 64);
      const __m512i w1 = _mm512_loadu_si512(w + (v + 1) * 64);
      dot_rows<M>(even, odd, w0, w1, p.x.xq + 4 * v, K);
    }
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) {
      const __m512i s = _mm512_sub_epi32(_mm512_add_epi32(even[m], odd[m]),
                                         _mm512_set1_epi32(128 * p.x.sum_q[m * G + g]));
      tot[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_set1_ps(p.x.scale[m * G + g]), tot[m]);
    }
  }
  const __m512 col = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p.sc + block * 16)));
#pragma GCC unroll 8
  for (int m = 0; m < M; ++m) _mm512_storeu_ps(p.y32 + m * p.ldy + block * kCols, _mm512_mul_ps(tot[m], col));
}

template <int Bits, int M>
inline void run_block(const Problem& p, int64_t block) {
  if constexpr (Bits == 4) run_block_int4<M>(p, block);
  else run_block_int8<M>(p, block);
}

// Weights of at least kStreamedBytes come from DRAM on every pass of 8 rows (the 28 MB int8
// lm_head: eight times at 64 rows). For those, a thread takes a tile of column blocks whose
// weights (about kTileBytes) stay in its L2 and runs every pass over the tile before the next:
// the weights leave DRAM once per call. lm_head (576 -> 49152), 2 threads, Zen 5, A/B in one
// process: 16 rows 995 -> 900 us, 64 rows 4361 -> 3369 us; 1-8 rows (one pass) unchanged.
// Whole-matrix orders were slower: every block's 64 output rows at once (the 1 MB int4 layers
// 208 -> 253 us at 64 rows; they stay in L3 between passes anyway). Each (pass, block) writes
// its own outputs with its own sums: the order changes no bit.
constexpr int64_t kStreamedBytes = int64_t{8} << 20;
constexpr int64_t kTileBytes = int64_t{512} << 10;

// Calls f(m, p) for every pass of up to kMaxRows rows, in order: m the pass's row count as a
// compile-time constant, p the problem moved to the pass's first row.
template <typename F>
inline void for_each_pass(const Problem& p0, int64_t M, F&& f) {
  for (int64_t m0 = 0; m0 < M; m0 += kMaxRows) {
    Problem p = p0;
    p.x.xq += m0 * p.K;
    p.x.scale += m0 * p.G;
    p.x.sum_x += m0 * p.G;
    p.x.sum_q += m0 * p.G;
    if (p.y != nullptr) p.y += m0 * p.ldy;
    if (p.y32 != nullptr) p.y32 += m0 * p.ldy;
    pagoda_gemv::with_rows(static_cast<int>(std::min<int64_t>(kMaxRows, M - m0)), [&](auto m) { f(m, p); });
  }
}

template <int Bits>
void run(const Problem& p0, int64_t M, int64_t num_blocks, int64_t block_bytes) {
  if (M <= kMaxRows || num_blocks * block_bytes < kStreamedBytes) {  // passes outer: each streams every block
    for_each_pass(p0, M, [&](auto m, const Problem& p) {
      at::parallel_for(0, num_blocks, 1, [&](int64_t begin, int64_t end) {
        for (int64_t block = begin; block < end; ++block) run_block<Bits, decltype(m)::value>(p, block);
      });
    });
    return;
  }
  const int64_t tile = std::max<int64_t>(1, kTileBytes / block_bytes);
  const int64_t tiles = (num_blocks + tile - 1) / tile;
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b0 = t * tile, b1 = std::min(num_blocks, b0 + tile);
      for_each_pass(p0, M, [&](auto m, const Problem& p) {
        for (int64_t block = b0; block < b1; ++block) run_block<Bits, decltype(m)::value>(p, block);
      });
    }
  });
}

#endif  // PAGODA_HAVE_Q8_GEMV

bool q8_gemv_available() {
#ifdef PAGODA_HAVE_Q8_GEMV
  return true;
#else
  return false;
#endif
}

template <int Bits>
at::Tensor gemv_q8(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales, int64_t group_size) {
  const char* name = Bits == 4 ? "pagoda::int4_gemv_q8" : "pagoda::int8_gemv_q8";
  constexpr int64_t per_chunk = 4;  // k per chunk: 32 bytes of nibbles (int4), 64 bytes (int8)
  constexpr int64_t chunk_bytes = Bits == 4 ? 32 : 64;
  TORCH_CHECK(q8_gemv_available(), name, " needs AVX-512 BF16 and VNNI, which this build lacks");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16, name, ": x must be bf16 [M, K]");
  TORCH_CHECK(packed.dim() == 3 && packed.scalar_type() == at::kByte && packed.size(2) == chunk_bytes &&
                  packed.is_contiguous(),
              name, ": packed must be contiguous uint8 [N/16, K/4, ", chunk_bytes, "]");
  const int64_t M = x.size(0), K = x.size(1), blocks = packed.size(0), N = blocks * 16;
  TORCH_CHECK(packed.size(1) * per_chunk == K, name, ": packed holds K=", packed.size(1) * per_chunk,
              ", x has K=", K);
  // int4: the weights' groups; int8: groups of 32 (its weights have one scale per row).
  const int64_t gs = Bits == 4 ? group_size : kActGroup8;
  TORCH_CHECK(gs > 0 && gs % 8 == 0 && K % gs == 0, name, ": group size ", gs, " must be a multiple of 8 dividing K=", K);
  const int64_t G = K / gs;
  TORCH_CHECK(scales.scalar_type() == at::kHalf && scales.is_contiguous() && scales.dim() == 3 &&
                  scales.size(0) == blocks && scales.size(1) == (Bits == 4 ? G : 1) &&
                  scales.size(2) == (Bits == 4 ? 32 : 16),
              name, ": scales must be contiguous fp16 [N/16, ", Bits == 4 ? "G, 32" : "1, 16", "]");
  // int8 (the lm_head): fp32 out. Logits rounded to bf16 tie (a step of 1/8 at 16..32),
  // and a tie's winner is then the lower token id, not the likelier token.
  at::Tensor y = at::empty({M, N}, x.options().dtype(Bits == 4 ? at::kBFloat16 : at::kFloat));
  if (M == 0) return y;
#ifdef PAGODA_HAVE_Q8_GEMV
  const at::Tensor xc = x.contiguous();
  const auto* xp = reinterpret_cast<const uint16_t*>(xc.data_ptr<at::BFloat16>());
  at::Tensor xq = at::empty({M, K}, x.options().dtype(at::kChar));
  at::Tensor stats = at::empty({3, M, G}, x.options().dtype(at::kFloat));  // scale, sum_x, sum_q (int32 bits)
  int8_t* xqp = xq.data_ptr<int8_t>();
  float* sp = stats.data_ptr<float>();
  int32_t* sqp = reinterpret_cast<int32_t*>(sp + 2 * M * G);
  at::parallel_for(0, M, M >= 16 ? 4 : M, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m)
      quantize_row(xp + m * K, K, gs, xqp + m * K, sp + m * G, sp + M * G + m * G, sqp + m * G);
  });
  const Problem p{reinterpret_cast<const uint8_t*>(packed.data_ptr()),
                  reinterpret_cast<const uint16_t*>(scales.data_ptr<at::Half>()),
                  QuantRows{xqp, sp, sp + M * G, sqp, K, G},
                  Bits == 4 ? reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>()) : nullptr,
                  Bits == 8 ? y.data_ptr<float>() : nullptr,
                  K, G, gs, N};
  const int64_t block_bytes = (K / per_chunk) * chunk_bytes + scales.size(1) * scales.size(2) * 2;
  run<Bits>(p, M, blocks, block_bytes);
#endif
  return y;
}

// x: bf16 [M, K]; packed: uint8 [N/16, K/4, 32]; scales: fp16 [N/16, K/group_size, 32].
at::Tensor int4_gemv_q8(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales, int64_t group_size) {
  return gemv_q8<4>(x, packed, scales, group_size);
}

// x: bf16 [M, K] (K a multiple of 32); packed: uint8 [N/16, K/4, 64] (q + 128); scales: fp16 [N/16, 1, 16].
at::Tensor int8_gemv_q8(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales) {
  return gemv_q8<8>(x, packed, scales, kActGroup8);
}

}  // namespace

namespace pagoda {
// For decoder_stack.cpp (same extension): the ops without the dispatcher.
at::Tensor int4_gemv_q8_direct(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                               int64_t group_size) {
  return int4_gemv_q8(x, packed, scales, group_size);
}
at::Tensor int8_gemv_q8_direct(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales) {
  return int8_gemv_q8(x, packed, scales);
}
}  // namespace pagoda

TORCH_LIBRARY_FRAGMENT(pagoda, m) {
  m.def("q8_gemv_available() -> bool", &q8_gemv_available);
  m.def("int4_gemv_q8(Tensor x, Tensor packed, Tensor scales, int group_size) -> Tensor", &int4_gemv_q8);
  m.def("int8_gemv_q8(Tensor x, Tensor packed, Tensor scales) -> Tensor", &int8_gemv_q8);
}
