// 4-bit group-quantized weights times a few bf16 rows: y[M, N] = x[M, K] @ W.T,
// W[n, k] = d[n, g] * q[n, k] + m[n, g], q in [0, 15], g = k / group_size.
//
// Why our own kernel: decode on a CPU reads every weight once per step, so a step's
// cost is the weights' bytes, not the rows. torch's int4 CPU kernel takes rows four at a
// time (1 row 34 us, 4 rows 48 us, 5 rows 91 us on the default model's gate_up), so a
// speculative step that verifies 5 tokens costs twice a plain one. This kernel reads
// each weight once for up to 8 rows (more rows: blocks of 8), so verifying drafts is
// nearly free and batches of a few requests stay cheap.
//
// Layout (pagoda/model/quant/packed.py, `pack_int4_gemv`): columns in blocks of 16.
// Block b, k-chunk c (k = 4c .. 4c+3) is 32 bytes; byte j holds column 16b + j/2:
// low nibble q[k = 4c + j%2], high nibble q[k = 4c + 2 + j%2]. Zero-extended to 16-bit
// lanes and mapped through a 16-entry table to bf16 (exact: 0..15), the low nibbles are
// the (k, k+1) pairs of 16 columns that one vdpbf16ps multiplies with a broadcast pair of
// x; the high nibbles likewise for (k+2, k+3). Scales: per block and group, 16 fp16 d
// then 16 fp16 m (GGUF stores fp16: exact).
// Per row and column: acc_g = sum over the group of x_k q_k in fp32 (products of bf16
// values are exact; vdpbf16ps sums pairs; low and high nibbles in two sums, added at the
// group's end), y = sum_g d_g acc_g + m_g sx_g with
// sx_g = sum of the group's x (fp32; gemv_common.h's sum_bf16, a fixed order).
// Invariant: a row's result does not depend on M, the other rows or the thread count
// (fixed summation order per row), so a verifying step scores a token exactly as a
// one-token step would.
#include "ops_common.h"
#include "gemv_common.h"

#include <immintrin.h>

#include <cstring>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512BF16__)
#define PAGODA_HAVE_INT4_GEMV 1
#endif

namespace {

// Bits 4: a chunk is k = 4c .. 4c+3 of 16 columns (two vectors of (k, k+1) pairs).
// Bits 8: a chunk is k = 2c, 2c+1 of 16 columns, one int8 per byte, split as
// q = l + 16 h (l = q & 15 unsigned, h = q >> 4 signed): two vectors on the same x pair.
template <int Bits>
struct Format {
  static constexpr int64_t kPerChunk = Bits == 4 ? 4 : 2;
  static constexpr int64_t kScales = Bits == 4 ? 32 : 16;  // fp16 per block and group
};

#ifdef PAGODA_HAVE_INT4_GEMV

constexpr int64_t kCols = 16;
constexpr int64_t kChunkBytes = 32;
// Software prefetch, kPrefetchBytes ahead in a thread's weight stream (and the scales
// kPrefetchGroups groups ahead). Measured from DRAM (Zen 5, 2 threads, 576x1536 .. 3072x576
// int4 matrices cycled through 60 MB): without it, blocks with a long K (the down projection,
// 12 KB per block) ran at ~60% of short ones' MACs per second at 8 rows (40.9 vs 25.2 us for
// the same bytes), and every shape lost ~15% at one row; 4 KB ahead brings both to ~the
// speed of short blocks (25.0 us; one row 16.8 -> 14.0 us). 1 KB ahead was too close (slower
// at one row), 8 KB no better than 4.
constexpr int64_t kPrefetchBytes = 4096;
constexpr int64_t kPrefetchGroups = 8;
using pagoda_gemv::kMaxRows;

struct Problem {
  const uint8_t* w;       // [N/16, K/kPerChunk, 32]
  const uint16_t* sc;     // fp16 [N/16, G, 32 (int4: d, m) or 16 (int8: d)]
  const uint16_t* x;      // bf16 [M, K]
  const float* sx;        // [M, G] (int4 only)
  uint16_t* y;            // bf16 [M, ldy]
  int64_t K, G, group_size, ldy;
};


inline __m512i table_low() {  // index & 15 -> bf16(index & 15)
  return _mm512_set_epi16(0x4170, 0x4160, 0x4150, 0x4140, 0x4130, 0x4120, 0x4110, 0x4100, 0x40E0, 0x40C0, 0x40A0,
                          0x4080, 0x4040, 0x4000, 0x3F80, 0x0000, 0x4170, 0x4160, 0x4150, 0x4140, 0x4130, 0x4120,
                          0x4110, 0x4100, 0x40E0, 0x40C0, 0x40A0, 0x4080, 0x4040, 0x4000, 0x3F80, 0x0000);
}

inline __m512i table_high_signed() {  // index in 0..15 -> bf16(16 * (index - 16 * (index >= 8)))
  return _mm512_set_epi16(
      // 31..16 (repeat of 15..0)
      (short)0xC180, (short)0xC200, (short)0xC240, (short)0xC280, (short)0xC2A0, (short)0xC2C0, (short)0xC2E0,
      (short)0xC300, 0x42E0, 0x42C0, 0x42A0, 0x4280, 0x4240, 0x4200, 0x4180, 0x0000,
      // 15..0: 15 -> -16, 14 -> -32, ..., 8 -> -128, 7 -> 112, ..., 1 -> 16, 0 -> 0
      (short)0xC180, (short)0xC200, (short)0xC240, (short)0xC280, (short)0xC2A0, (short)0xC2C0, (short)0xC2E0,
      (short)0xC300, 0x42E0, 0x42C0, 0x42A0, 0x4280, 0x4240, 0x4200, 0x4180, 0x0000);
}

template <int Bits, int M>
inline void run_block(const Problem& p, int64_t block) {
  using F = Format<Bits>;
  const int64_t block_bytes = p.K / F::kPerChunk * kChunkBytes;
  const int64_t chunks_per_group = p.group_size / F::kPerChunk;
  const __m512i t_lo = table_low();
  const __m512i t_hi = Bits == 4 ? t_lo : table_high_signed();
  __m512 tot[M];
#pragma GCC unroll 8
  for (int m = 0; m < M; ++m) tot[m] = _mm512_setzero_ps();
  const uint8_t* w = p.w + block * block_bytes;
  const uint16_t* sc = p.sc + block * p.G * F::kScales;
  // Locals, and the loops unrolled: the compiler then keeps the row pointers in registers
  // (576->3072 at 8-64 rows ~8% faster than reading them through `p`; Zen 5).
  const uint16_t* xbase = p.x;
  const float* sxp = p.sx;
  const int64_t K = p.K, G = p.G;
  for (int64_t g = 0; g < G; ++g) {
    __m512 acc_lo[M], acc_hi[M];
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) acc_lo[m] = acc_hi[m] = _mm512_setzero_ps();
    const int64_t c0 = g * chunks_per_group;
    // Past the end of the weights or scales the prefetches touch other memory, never read.
    for (int64_t off = 0; off < chunks_per_group * kChunkBytes; off += 64)
      _mm_prefetch(reinterpret_cast<const char*>(w + c0 * kChunkBytes + off + kPrefetchBytes), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(sc + (g + kPrefetchGroups) * F::kScales), _MM_HINT_T0);
#pragma GCC unroll 8
    for (int64_t c = c0; c < c0 + chunks_per_group; ++c) {
      const __m512i v =
          _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + c * kChunkBytes)));
      const __m512i lo = _mm512_permutexvar_epi16(v, t_lo);  // the tables repeat: index bits 4.. do not matter
      const __m512i hi = _mm512_permutexvar_epi16(_mm512_srli_epi16(v, 4), t_hi);
#pragma GCC unroll 8
      for (int m = 0; m < M; ++m) {
        int32_t pair_lo, pair_hi;
        std::memcpy(&pair_lo, xbase + m * K + F::kPerChunk * c, 4);
        if constexpr (Bits == 4) {
          std::memcpy(&pair_hi, xbase + m * K + 4 * c + 2, 4);
        } else {
          pair_hi = pair_lo;
        }
        const __m512bh xl = (__m512bh)_mm512_set1_epi32(pair_lo);
        const __m512bh xh = (__m512bh)_mm512_set1_epi32(pair_hi);
        acc_lo[m] = _mm512_dpbf16_ps(acc_lo[m], (__m512bh)lo, xl);
        acc_hi[m] = _mm512_dpbf16_ps(acc_hi[m], (__m512bh)hi, xh);
      }
    }
    const uint16_t* s = sc + g * F::kScales;
    const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s)));
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) tot[m] = _mm512_fmadd_ps(_mm512_add_ps(acc_lo[m], acc_hi[m]), d, tot[m]);
    if constexpr (Bits == 4) {
      const __m512 off = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + 16)));
#pragma GCC unroll 8
      for (int m = 0; m < M; ++m) tot[m] = _mm512_fmadd_ps(off, _mm512_set1_ps(sxp[m * G + g]), tot[m]);
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < M; ++m) {
    const __m256bh out = _mm512_cvtneps_pbh(tot[m]);
    std::memcpy(p.y + m * p.ldy + block * kCols, &out, sizeof(out));
  }
}

// One task is one block of 16 columns, walked down K as a single stream (measured from DRAM
// on Zen 5: walking 2 or 4 blocks at once is 1.7-2x slower at 1-3 rows, whatever it saves
// in vdpbf16ps latency). Each row has two accumulators (low and high nibbles: independent
// chains) and a total: 3 * M vectors.
template <int Bits, int M>
void run_rows(const Problem& p, int64_t num_blocks) {
  at::parallel_for(0, num_blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t block = begin; block < end; ++block) run_block<Bits, M>(p, block);
  });
}

template <int Bits>
void run(const Problem& p, int rows, int64_t num_blocks) {
  const bool ok = pagoda_gemv::with_rows(rows, [&](auto m) { run_rows<Bits, decltype(m)::value>(p, num_blocks); });
  TORCH_CHECK(ok, "pagoda::int4_gemv: ", rows, " rows in a block");
}

#endif  // PAGODA_HAVE_INT4_GEMV

bool int4_gemv_available() {
#ifdef PAGODA_HAVE_INT4_GEMV
  return true;
#else
  return false;
#endif
}

template <int Bits>
at::Tensor gemv(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales, int64_t group_size) {
  const char* name = Bits == 4 ? "pagoda::int4_gemv" : "pagoda::int8_gemv";
  using F = Format<Bits>;
  TORCH_CHECK(int4_gemv_available(), name, " needs AVX-512 BF16, which this build lacks");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16, name, ": x must be bf16 [M, K]");
  TORCH_CHECK(packed.dim() == 3 && packed.scalar_type() == (Bits == 4 ? at::kByte : at::kChar) &&
                  packed.size(2) == 32 && packed.is_contiguous(),
              name, ": packed must be contiguous ", Bits == 4 ? "uint8" : "int8", " [N/16, K/", F::kPerChunk, ", 32]");
  const int64_t M = x.size(0), K = x.size(1), blocks = packed.size(0), N = blocks * 16;
  TORCH_CHECK(group_size > 0 && group_size % 4 == 0 && K % group_size == 0,
              name, ": group_size ", group_size, " must be a multiple of 4 dividing K=", K);
  TORCH_CHECK(packed.size(1) * F::kPerChunk == K, name, ": packed holds K=", packed.size(1) * F::kPerChunk,
              ", x has K=", K);
  const int64_t G = K / group_size;
  TORCH_CHECK(scales.scalar_type() == at::kHalf && scales.is_contiguous() && scales.dim() == 3 &&
                  scales.size(0) == blocks && scales.size(1) == G && scales.size(2) == F::kScales,
              name, ": scales must be contiguous fp16 [N/16, G, ", F::kScales, "]");
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0) return y;
#ifdef PAGODA_HAVE_INT4_GEMV
  const at::Tensor xc = x.contiguous();
  const at::BFloat16* xp = xc.data_ptr<at::BFloat16>();
  // int4: each row's group sums of x, in a fixed order (part of the result's rounding).
  at::Tensor sx = at::empty({Bits == 4 ? M : 0, G}, x.options().dtype(at::kFloat));
  float* sxp = sx.data_ptr<float>();
  if constexpr (Bits == 4) {
    at::parallel_for(0, M, M >= 16 ? 8 : M, [&](int64_t begin, int64_t end) {
      for (int64_t m = begin; m < end; ++m)
        for (int64_t g = 0; g < G; ++g)
          sxp[m * G + g] = pagoda_gemv::sum_bf16(reinterpret_cast<const uint16_t*>(xp + m * K + g * group_size), group_size);
    });
  }
  for (int64_t m0 = 0; m0 < M; m0 += kMaxRows) {
    const int rows = static_cast<int>(std::min<int64_t>(kMaxRows, M - m0));
    Problem p{reinterpret_cast<const uint8_t*>(packed.data_ptr()),
              reinterpret_cast<const uint16_t*>(scales.data_ptr<at::Half>()),
              reinterpret_cast<const uint16_t*>(xp + m0 * K),
              Bits == 4 ? sxp + m0 * G : nullptr,
              reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>() + m0 * N),
              K, G, group_size, N};
    run<Bits>(p, rows, blocks);
  }
#endif
  return y;
}

// x: bf16 [M, K]; packed: uint8 [N/16, K/4, 32]; scales: fp16 [N/16, K/group_size, 32].
at::Tensor int4_gemv(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales, int64_t group_size) {
  return gemv<4>(x, packed, scales, group_size);
}

// x: bf16 [M, K]; packed: int8 [N/16, K/2, 32]; scales: fp16 [N/16, K/group_size, 16].
at::Tensor int8_gemv(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales, int64_t group_size) {
  return gemv<8>(x, packed, scales, group_size);
}

}  // namespace

namespace pagoda {
// For decoder_stack.cpp (same extension): the op without the dispatcher.
at::Tensor int4_gemv_direct(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                            int64_t group_size) {
  return int4_gemv(x, packed, scales, group_size);
}
at::Tensor int8_gemv_direct(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                            int64_t group_size) {
  return int8_gemv(x, packed, scales, group_size);
}
}  // namespace pagoda

TORCH_LIBRARY_FRAGMENT(pagoda, m) {
  m.def("int4_gemv_available() -> bool", &int4_gemv_available);
  m.def("int4_gemv(Tensor x, Tensor packed, Tensor scales, int group_size) -> Tensor", &int4_gemv);
  m.def("int8_gemv(Tensor x, Tensor packed, Tensor scales, int group_size) -> Tensor", &int8_gemv);
}
