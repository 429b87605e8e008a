// SwiGLU on a fused gate/up projection: out = silu(x[..., :I]) * x[..., I:].
// Rounds exactly as torch's F.silu(gate) * up: silu is computed in float32 as
// x / (1 + exp(-x)) (SLEEF's exp in vectors of 2 x Vectorized<T>, std::exp
// on the tail, like torch's cpu_kernel_vec), rounded to the activation dtype,
// then multiplied by up (one more rounding).
//
// x: [N, 2I] (or [2I]), last dim contiguous, rows may be strided. Returns a
// contiguous [N, I].
#include "vec_isa.h"
#include "fused_common.h"

#include <cmath>

namespace {
using namespace pagoda_fused;

template <typename T>
inline void silu_mul_row(T* out, const T* gate, const T* up, int64_t n) {
  const fVec one(1.0f);
  int64_t i = 0;
  if constexpr (std::is_same_v<T, float>) {
    // torch's float silu: Vectorized<float>, two vectors per step.
    for (; i + kStep <= n; i += kStep) {
      fVec a, b, ua, ub;
      load2(gate + i, a, b);
      load2(up + i, ua, ub);
      a = a / (one + a.neg().exp());
      b = b / (one + b.neg().exp());
      store2(out + i, a * ua, b * ub);
    }
  } else {
    // torch's bf16/fp16 silu: 2 x Vectorized<T> per step, i.e. 2 * kStep elements.
    for (; i + 2 * kStep <= n; i += kStep) {
      fVec a, b, ua, ub;
      load2(gate + i, a, b);
      load2(up + i, ua, ub);
      a = a / (one + a.neg().exp());
      b = b / (one + b.neg().exp());
      round2<T>(a, b);
      store2(out + i, a * ua, b * ub);
      i += kStep;
      load2(gate + i, a, b);
      load2(up + i, ua, ub);
      a = a / (one + a.neg().exp());
      b = b / (one + b.neg().exp());
      round2<T>(a, b);
      store2(out + i, a * ua, b * ub);
    }
  }
  for (; i < n; ++i) {
    const float g = static_cast<float>(gate[i]);
    const float s = round1<T>(g / (1.0f + std::exp(-g)));
    out[i] = static_cast<T>(s * static_cast<float>(up[i]));
  }
}

at::Tensor silu_and_mul(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu(), "pagoda::silu_and_mul: CPU tensors only");
  TORCH_CHECK(x.dim() == 1 || x.dim() == 2, "pagoda::silu_and_mul: x must be [2I] or [N, 2I]");
  TORCH_CHECK(x.size(-1) % 2 == 0, "pagoda::silu_and_mul: last dim must be even, got ", x.size(-1));
  TORCH_CHECK(x.size(-1) == 0 || x.stride(-1) == 1, "pagoda::silu_and_mul: the last dim must be contiguous");
  const int64_t inter = x.size(-1) / 2;
  const int64_t rows = x.dim() == 2 ? x.size(0) : 1;
  const int64_t rs = x.dim() == 2 ? x.stride(0) : 0;
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = inter;
  at::Tensor out = at::empty(shape, x.options());
  if (out.numel() == 0) return out;
  PAGODA_DISPATCH_FLOAT3(x.scalar_type(), "pagoda::silu_and_mul", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, grain_for(8 * inter), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* row = xp + r * rs;
        silu_mul_row(op + r * inter, row, row + inter, inter);
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pagoda, m) {
  m.def("silu_and_mul(Tensor x) -> Tensor");
  m.impl("silu_and_mul", c10::DispatchKey::CPU, &silu_and_mul);
}
