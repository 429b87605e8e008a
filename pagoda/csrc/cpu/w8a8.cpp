// W8A8 linear: int8 weights times per-row dynamically quantized int8 activations.
//
//   xq[m, k] = round(x[m, k] * (127 / amax_m)),  sx[m] = amax_m / 127   (amax_m = max_k |x[m, k]|)
//   acc      = xq @ q.T                      (int32, exact: torch._int_mm, oneDNN VNNI/AMX)
//   out[m,n] = round_T(float(acc[m, n]) * sx[m] * sw[n])
//
// Rounding is round-half-to-even throughout (as torch.round); each float op is a separate
// IEEE op in this order, so `quantize_rows_int8` and the dequantization equal their torch
// expressions bit for bit (tests check it). A row of zeros quantizes to zeros with scale 0;
// a row holding a NaN or an infinity gets a NaN scale, so its outputs are NaN, never a
// plausible number.
//
// `w8a8_linear` runs the three steps in chunks of rows, so the int32 products of a chunk
// are dequantized while they are still in cache and no [M, N] int32 tensor is allocated.
#include "vec_isa.h"
#include "fused_common.h"

#include <cmath>
#include <limits>
#include <optional>
#include <tuple>

#if defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

namespace {
using namespace pagoda_fused;

constexpr int64_t kChunkRows = 1024;

template <typename T>
inline float amax_row(const T* x, int64_t k) {
  float amax = 0.0f;
  bool finite = true;
  for (int64_t i = 0; i < k; ++i) {
    const float v = static_cast<float>(x[i]);
    finite &= std::isfinite(v);
    amax = std::max(amax, std::fabs(v));
  }
  return finite ? amax : std::numeric_limits<float>::quiet_NaN();
}

#if defined(CPU_CAPABILITY_AVX512)
// Vectorized amax for 16-bit and float rows (same result: max is exact).
template <typename T>
inline float amax_row_vec(const T* x, int64_t k) {
  fVec m0(0.0f), m1(0.0f);
  __mmask16 bad = 0;
  int64_t i = 0;
  const __m512 inf = _mm512_set1_ps(std::numeric_limits<float>::infinity());
  for (; i + kStep <= k; i += kStep) {
    fVec a, b;
    load2(x + i, a, b);
    const __m512 aa = a.abs(), ab = b.abs();
    // Not finite <=> |v| is not < inf (NaN compares false).
    bad |= _mm512_cmp_ps_mask(aa, inf, _CMP_NLT_UQ) | _mm512_cmp_ps_mask(ab, inf, _CMP_NLT_UQ);
    m0 = _mm512_max_ps(m0, aa);
    m1 = _mm512_max_ps(m1, ab);
  }
  float amax = _mm512_reduce_max_ps(_mm512_max_ps(m0, m1));
  const float tail = amax_row(x + i, k - i);
  if (bad || std::isnan(tail)) return std::numeric_limits<float>::quiet_NaN();
  return std::max(amax, tail);
}
#endif

// Quantizes one row into q (int8) and returns its scale (amax / 127).
template <typename T>
inline float quantize_row(const T* x, int8_t* q, int64_t k) {
#if defined(CPU_CAPABILITY_AVX512)
  const float amax = amax_row_vec(x, k);
#else
  const float amax = amax_row(x, k);
#endif
  if (!(amax > 0.0f)) {  // zeros (scale 0) or a NaN (scale NaN): codes 0 either way
    std::fill(q, q + k, int8_t{0});
    return amax == 0.0f ? 0.0f : amax;
  }
  const float inv = 127.0f / amax;
  int64_t i = 0;
#if defined(CPU_CAPABILITY_AVX512)
  const fVec vinv(inv);
  for (; i + kStep <= k; i += kStep) {
    fVec a, b;
    load2(x + i, a, b);
    // cvtps rounds to nearest even (the default MXCSR mode); |x * inv| <= 127 up to an ulp,
    // and cvtsepi32 saturates to int8 anyway.
    const __m512i ia = _mm512_cvtps_epi32(opaque(a * vinv));
    const __m512i ib = _mm512_cvtps_epi32(opaque(b * vinv));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + i), _mm512_cvtsepi32_epi8(ia));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + i + fVec::size()), _mm512_cvtsepi32_epi8(ib));
  }
#endif
  for (; i < k; ++i) {
    const float v = std::nearbyint(opaque1(static_cast<float>(x[i]) * inv));
    q[i] = static_cast<int8_t>(std::min(127.0f, std::max(-127.0f, v)));
  }
  return amax / 127.0f;
}

// out[r, n] = round_T(float(acc[r, n]) * sx[r] * sw[n]) for one row.
template <typename T>
inline void dequant_row(T* out, const int32_t* acc, float sx, const float* sw, int64_t n) {
  int64_t i = 0;
#if defined(CPU_CAPABILITY_AVX512)
  const fVec vsx(sx);
  for (; i + kStep <= n; i += kStep) {
    const fVec a = _mm512_cvtepi32_ps(_mm512_loadu_si512(acc + i));
    const fVec b = _mm512_cvtepi32_ps(_mm512_loadu_si512(acc + i + fVec::size()));
    store2(out + i, opaque(a * vsx) * fVec::loadu(sw + i), opaque(b * vsx) * fVec::loadu(sw + i + fVec::size()));
  }
#endif
  for (; i < n; ++i) {
    out[i] = static_cast<T>(opaque1(static_cast<float>(acc[i]) * sx) * sw[i]);
  }
}

template <typename T>
void quantize_rows(const T* x, int64_t x_stride, int8_t* q, float* scale, int64_t rows, int64_t k) {
  at::parallel_for(0, rows, grain_for(k), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) scale[r] = quantize_row(x + r * x_stride, q + r * k, k);
  });
}

void check_x(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.device().is_cpu(), op, ": CPU tensors only");
  TORCH_CHECK(x.dim() == 2, op, ": x must be [M, K], got ", x.dim(), " dims");
  TORCH_CHECK(x.size(1) == 0 || x.stride(1) == 1, op, ": x's last dim must be contiguous");
}

std::tuple<at::Tensor, at::Tensor> quantize_rows_int8(const at::Tensor& x) {
  check_x(x, "pagoda::quantize_rows_int8");
  const int64_t rows = x.size(0), k = x.size(1);
  at::Tensor q = at::empty({rows, k}, x.options().dtype(at::kChar));
  at::Tensor scale = at::empty({rows}, x.options().dtype(at::kFloat));
  if (rows == 0) return {q, scale};
  PAGODA_DISPATCH_FLOAT3(x.scalar_type(), "pagoda::quantize_rows_int8", [&] {
    quantize_rows(x.const_data_ptr<scalar_t>(), x.stride(0), q.data_ptr<int8_t>(), scale.data_ptr<float>(), rows, k);
  });
  return {q, scale};
}

// x [M, K] (float32/bf16/fp16), q int8 [N, K] contiguous, w_scale float32 [N] -> [M, N] in
// out_dtype (float32/bf16/fp16; default: x's dtype).
at::Tensor w8a8_linear(const at::Tensor& x, const at::Tensor& q, const at::Tensor& w_scale,
                       std::optional<at::ScalarType> out_dtype) {
  check_x(x, "pagoda::w8a8_linear");
  TORCH_CHECK(q.scalar_type() == at::kChar && q.dim() == 2 && q.is_contiguous(),
              "pagoda::w8a8_linear: q must be a contiguous int8 [N, K]");
  TORCH_CHECK(q.size(1) == x.size(1), "pagoda::w8a8_linear: x has K=", x.size(1), ", q has K=", q.size(1));
  TORCH_CHECK(w_scale.scalar_type() == at::kFloat && w_scale.is_contiguous() && w_scale.numel() == q.size(0),
              "pagoda::w8a8_linear: w_scale must be a contiguous float32 [N]");
  const int64_t rows = x.size(0), k = x.size(1), n = q.size(0);
  at::Tensor out = at::empty({rows, n}, x.options().dtype(out_dtype.value_or(x.scalar_type())));
  if (rows == 0 || n == 0) return out;
  const int64_t chunk = std::min(rows, kChunkRows);
  at::Tensor xq = at::empty({chunk, k}, x.options().dtype(at::kChar));
  at::Tensor sx = at::empty({chunk}, x.options().dtype(at::kFloat));
  at::Tensor acc = at::empty({chunk, n}, x.options().dtype(at::kInt));
  const at::Tensor q_t = q.t();
  const float* sw = w_scale.const_data_ptr<float>();
  for (int64_t r0 = 0; r0 < rows; r0 += chunk) {
    const int64_t m = std::min(chunk, rows - r0);
    at::Tensor xq_m = xq.narrow(0, 0, m), acc_m = acc.narrow(0, 0, m);
    PAGODA_DISPATCH_FLOAT3(x.scalar_type(), "pagoda::w8a8_linear", [&] {
      quantize_rows(x.const_data_ptr<scalar_t>() + r0 * x.stride(0), x.stride(0), xq_m.data_ptr<int8_t>(),
                    sx.data_ptr<float>(), m, k);
    });
    at::_int_mm_out(acc_m, xq_m, q_t);
    const int32_t* ap = acc_m.const_data_ptr<int32_t>();
    const float* sxp = sx.const_data_ptr<float>();
    PAGODA_DISPATCH_FLOAT3(out.scalar_type(), "pagoda::w8a8_linear", [&] {
      scalar_t* op = out.data_ptr<scalar_t>() + r0 * n;
      at::parallel_for(0, m, grain_for(n), [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) dequant_row(op + r * n, ap + r * n, sxp[r], sw, n);
      });
    });
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pagoda, m) {
  m.def("quantize_rows_int8(Tensor x) -> (Tensor, Tensor)", &quantize_rows_int8);
  m.def("w8a8_linear(Tensor x, Tensor q, Tensor w_scale, ScalarType? out_dtype=None) -> Tensor", &w8a8_linear);
}
