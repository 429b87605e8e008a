// Rotary position embedding, applied in place to q and k (HF "rotate_half" /
// neox layout: element i pairs with i + D/2), from the float32 cos/sin tables
// of RotaryEmbedding and the tokens' positions. Rounds exactly as HF's
//   cos = cos[pos].to(dtype); sin = sin[pos].to(dtype)
//   out = q * cos + rotate_half(q) * sin        (each op rounds to dtype)
// so bf16/fp16 results are bitwise those of the torch code, and float32 too
// (products are kept from being contracted into FMAs).
//
// q: [N, Hq, D], k: [N, Hk, D], last dim contiguous, other strides free
// (views of a fused qkv projection output). cos/sin: [P, D] float32,
// contiguous, with cos[:, i] == cos[:, i + D/2] (the table is cat(f, f)).
#include "vec_isa.h"
#include "fused_common.h"

#include <vector>

namespace {
using namespace pagoda_fused;

// Rotates one head in place. c, s: this position's cos/sin already rounded to T.
template <typename T>
inline void rotate_head(T* x, const float* c, const float* s, int64_t half) {
  T* x2p = x + half;
  int64_t i = 0;
  for (; i + kStep <= half; i += kStep) {
    fVec a1, b1, a2, b2;
    load2(x + i, a1, b1);
    load2(x2p + i, a2, b2);
    const fVec c1a = fVec::loadu(c + i), c1b = fVec::loadu(c + i + fVec::size());
    const fVec s1a = fVec::loadu(s + i), s1b = fVec::loadu(s + i + fVec::size());
    const fVec c2a = fVec::loadu(c + half + i), c2b = fVec::loadu(c + half + i + fVec::size());
    const fVec s2a = fVec::loadu(s + half + i), s2b = fVec::loadu(s + half + i + fVec::size());
    // first half: x1*cos - x2*sin; second half: x2*cos + x1*sin
    fVec p1a = opaque(a1 * c1a), p1b = opaque(b1 * c1b);
    fVec q1a = opaque(a2 * s1a), q1b = opaque(b2 * s1b);
    fVec p2a = opaque(a2 * c2a), p2b = opaque(b2 * c2b);
    fVec q2a = opaque(a1 * s2a), q2b = opaque(b1 * s2b);
    round2<T>(p1a, p1b);
    round2<T>(q1a, q1b);
    round2<T>(p2a, p2b);
    round2<T>(q2a, q2b);
    store2(x + i, p1a - q1a, p1b - q1b);
    store2(x2p + i, p2a + q2a, p2b + q2b);
  }
  for (; i < half; ++i) {
    const float v1 = static_cast<float>(x[i]), v2 = static_cast<float>(x2p[i]);
    const float p1 = round1<T>(opaque1(v1 * c[i])), q1 = round1<T>(opaque1(v2 * s[i]));
    const float p2 = round1<T>(opaque1(v2 * c[half + i])), q2 = round1<T>(opaque1(v1 * s[half + i]));
    x[i] = static_cast<T>(p1 - q1);
    x2p[i] = static_cast<T>(p2 + q2);
  }
}

void check_heads(const at::Tensor& t, const char* what, int64_t n, int64_t d) {
  TORCH_CHECK(t.device().is_cpu(), "pagoda::rotary_embedding: ", what, " must be on the CPU");
  TORCH_CHECK(t.dim() == 3 && t.size(0) == n && t.size(2) == d, "pagoda::rotary_embedding: ", what,
              " must be [", n, ", heads, ", d, "], got ", t.sizes());
  TORCH_CHECK(t.stride(2) == 1 || t.numel() == 0, "pagoda::rotary_embedding: ", what,
              ": the last dim must be contiguous");
}

void rotary_embedding(const at::Tensor& positions, at::Tensor& q, at::Tensor& k,
                      const at::Tensor& cos_cache, const at::Tensor& sin_cache) {
  TORCH_CHECK(positions.dim() == 1 && positions.device().is_cpu(),
              "pagoda::rotary_embedding: positions must be a 1-D CPU tensor");
  TORCH_CHECK(positions.scalar_type() == at::kLong || positions.scalar_type() == at::kInt,
              "pagoda::rotary_embedding: positions must be int64 or int32");
  const int64_t n = positions.size(0);
  TORCH_CHECK(cos_cache.dim() == 2 && cos_cache.sizes() == sin_cache.sizes() &&
                  cos_cache.scalar_type() == at::kFloat && sin_cache.scalar_type() == at::kFloat &&
                  cos_cache.is_contiguous() && sin_cache.is_contiguous(),
              "pagoda::rotary_embedding: cos/sin caches must be contiguous float32 [P, D]");
  const int64_t max_pos = cos_cache.size(0), D = cos_cache.size(1);
  TORCH_CHECK(D % 2 == 0, "pagoda::rotary_embedding: head_dim must be even, got ", D);
  check_heads(q, "q", n, D);
  check_heads(k, "k", n, D);
  TORCH_CHECK(q.scalar_type() == k.scalar_type(), "pagoda::rotary_embedding: q and k dtypes differ");
  if (n == 0) return;
  const at::Tensor pos = positions.scalar_type() == at::kLong ? positions.contiguous()
                                                              : positions.to(at::kLong).contiguous();
  const int64_t* pp = pos.const_data_ptr<int64_t>();
  for (int64_t t = 0; t < n; ++t) {
    TORCH_CHECK(pp[t] >= 0 && pp[t] < max_pos, "pagoda::rotary_embedding: position ", pp[t],
                " is outside the table of ", max_pos, " positions");
  }
  const int64_t hq = q.size(1), hk = k.size(1), half = D / 2;
  const float* cp = cos_cache.const_data_ptr<float>();
  const float* sp = sin_cache.const_data_ptr<float>();
  PAGODA_DISPATCH_FLOAT3(q.scalar_type(), "pagoda::rotary_embedding", [&] {
    scalar_t* qp = q.data_ptr<scalar_t>();
    scalar_t* kp = k.data_ptr<scalar_t>();
    const int64_t qs0 = q.stride(0), qs1 = q.stride(1), ks0 = k.stride(0), ks1 = k.stride(1);
    at::parallel_for(0, n, grain_for((hq + hk) * D), [&](int64_t begin, int64_t end) {
      std::vector<float> table;
      if constexpr (!std::is_same_v<scalar_t, float>) table.resize(2 * D);
      for (int64_t t = begin; t < end; ++t) {
        const float* c = cp + pp[t] * D;
        const float* s = sp + pp[t] * D;
        if constexpr (!std::is_same_v<scalar_t, float>) {
          // HF casts the tables to the activation dtype before multiplying.
          for (int64_t i = 0; i < D; ++i) {
            table[i] = round1<scalar_t>(c[i]);
            table[D + i] = round1<scalar_t>(s[i]);
          }
          c = table.data();
          s = table.data() + D;
        }
        for (int64_t h = 0; h < hq; ++h) rotate_head(qp + t * qs0 + h * qs1, c, s, half);
        for (int64_t h = 0; h < hk; ++h) rotate_head(kp + t * ks0 + h * ks1, c, s, half);
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pagoda, m) {
  m.def("rotary_embedding(Tensor positions, Tensor(a!) q, Tensor(b!) k, Tensor cos_cache, "
        "Tensor sin_cache) -> ()");
  m.impl("rotary_embedding", c10::DispatchKey::CPU, &rotary_embedding);
}
