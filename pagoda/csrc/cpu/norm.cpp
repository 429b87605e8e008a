// RMSNorm and fused residual-add + RMSNorm, rounding exactly as HF's
// LlamaRMSNorm does in torch:
//   h = x.float(); h = h * rsqrt(mean(h^2) + eps); out = weight * h.to(dtype)
// i.e. normalize in float32, round to the activation dtype, then multiply by
// the weight (in the same dtype, so that product rounds once more). Only the
// order of the sum of squares differs from torch (a last-ulp change of the
// float32 scale at most).
//
// Tensors: the last dim is contiguous; up to two leading dims may have any
// strides (q/k heads viewed inside a fused qkv output).
#include "vec_isa.h"
#include "fused_common.h"

#include <cmath>

namespace {
using namespace pagoda_fused;

// Row r of a [A, B, H] view with strides (s0, s1, 1).
struct Rows {
  int64_t count, inner, s0, s1;
  int64_t offset(int64_t r) const { return (r / inner) * s0 + (r % inner) * s1; }
};

Rows rows_of(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.dim() >= 1 && t.dim() <= 3, what, " must have 1 to 3 dims, got ", t.dim());
  TORCH_CHECK(t.size(-1) == 0 || t.stride(-1) == 1, what, ": the last dim must be contiguous");
  if (t.dim() == 1) return {1, 1, 0, 0};
  if (t.dim() == 2) return {t.size(0), 1, t.stride(0), 0};
  return {t.size(0) * t.size(1), t.size(1), t.stride(0), t.stride(1)};
}

template <typename T>
inline float sum_squares(const T* x, int64_t n) {
  fVec acc0(0.f), acc1(0.f);
  int64_t d = 0;
  for (; d + kStep <= n; d += kStep) {
    fVec a, b;
    load2(x + d, a, b);
    acc0 = acc0 + a * a;
    acc1 = acc1 + b * b;
  }
  float sum = at::vec::vec_reduce_all<float>([](fVec& u, fVec& v) { return u + v; }, acc0 + acc1);
  for (; d < n; ++d) {
    float v = static_cast<float>(x[d]);
    sum += v * v;
  }
  return sum;
}

// out = w * T(x * scale), every product rounded as torch does.
template <typename T>
inline void scale_row(T* out, const T* x, const T* w, float scale, int64_t n) {
  const fVec vs(scale);
  int64_t d = 0;
  for (; d + kStep <= n; d += kStep) {
    fVec a, b, wa, wb;
    load2(x + d, a, b);
    a = a * vs;
    b = b * vs;
    round2<T>(a, b);
    load2(w + d, wa, wb);
    store2(out + d, wa * a, wb * b);
  }
  for (; d < n; ++d) {
    float h = round1<T>(static_cast<float>(x[d]) * scale);
    out[d] = static_cast<T>(static_cast<float>(w[d]) * h);
  }
}

inline float inv_rms(float sum, int64_t n, double eps) {
  float var = sum / static_cast<float>(n);
  return 1.0f / std::sqrt(var + static_cast<float>(eps));
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.device().is_cpu(), "pagoda::rms_norm: CPU tensors only");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "pagoda::rms_norm: weight dtype ",
              weight.scalar_type(), " != input dtype ", x.scalar_type());
  const int64_t H = x.size(-1);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == H && weight.is_contiguous(),
              "pagoda::rms_norm: weight must be contiguous [", H, "]");
  Rows rows = rows_of(x, "pagoda::rms_norm input");
  at::Tensor out = at::empty(x.sizes(), x.options());
  if (x.numel() == 0) return out;
  PAGODA_DISPATCH_FLOAT3(x.scalar_type(), "pagoda::rms_norm", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* wp = weight.const_data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows.count, grain_for(H), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* row = xp + rows.offset(r);
        scale_row(op + r * H, row, wp, inv_rms(sum_squares(row, H), H, eps), H);
      }
    });
  });
  return out;
}

// residual = T(x + residual); x = rms_norm(residual). Both in place.
void fused_add_rms_norm(at::Tensor& x, at::Tensor& residual, const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.device().is_cpu() && residual.device().is_cpu(), "pagoda::fused_add_rms_norm: CPU tensors only");
  TORCH_CHECK(x.sizes() == residual.sizes(), "pagoda::fused_add_rms_norm: x ", x.sizes(),
              " and residual ", residual.sizes(), " differ");
  TORCH_CHECK(x.scalar_type() == residual.scalar_type() && weight.scalar_type() == x.scalar_type(),
              "pagoda::fused_add_rms_norm: x, residual and weight must share a dtype");
  const int64_t H = x.size(-1);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == H && weight.is_contiguous(),
              "pagoda::fused_add_rms_norm: weight must be contiguous [", H, "]");
  Rows xr = rows_of(x, "pagoda::fused_add_rms_norm x");
  Rows rr = rows_of(residual, "pagoda::fused_add_rms_norm residual");
  if (x.numel() == 0) return;
  PAGODA_DISPATCH_FLOAT3(x.scalar_type(), "pagoda::fused_add_rms_norm", [&] {
    scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* rp = residual.data_ptr<scalar_t>();
    const scalar_t* wp = weight.const_data_ptr<scalar_t>();
    at::parallel_for(0, xr.count, grain_for(2 * H), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        scalar_t* xrow = xp + xr.offset(r);
        scalar_t* rrow = rp + rr.offset(r);
        fVec acc0(0.f), acc1(0.f);
        int64_t d = 0;
        for (; d + kStep <= H; d += kStep) {
          fVec a, b, c, e;
          load2(xrow + d, a, b);
          load2(rrow + d, c, e);
          a = a + c;
          b = b + e;
          round2<scalar_t>(a, b);  // the residual stream is stored in T
          store2(rrow + d, a, b);
          acc0 = acc0 + a * a;
          acc1 = acc1 + b * b;
        }
        float sum = at::vec::vec_reduce_all<float>([](fVec& u, fVec& v) { return u + v; }, acc0 + acc1);
        for (; d < H; ++d) {
          float v = round1<scalar_t>(static_cast<float>(xrow[d]) + static_cast<float>(rrow[d]));
          rrow[d] = static_cast<scalar_t>(v);
          sum += v * v;
        }
        scale_row(xrow, rrow, wp, inv_rms(sum, H, eps), H);
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pagoda, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.impl("rms_norm", c10::DispatchKey::CPU, &rms_norm);
  m.def("fused_add_rms_norm(Tensor(a!) x, Tensor(b!) residual, Tensor weight, float eps) -> ()");
  m.impl("fused_add_rms_norm", c10::DispatchKey::CPU, &fused_add_rms_norm);
}
