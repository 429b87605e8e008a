// The decoder stack of a Llama-family model, run from C++ for steps of a few tokens.
//
// A decode step of a small model on a CPU is hundreds of small ops; driven from
// Python, each costs a module call, argument parsing and a dispatch (about a
// third of a 135M model's step at batch 1). `pagoda.DecoderStack` holds the
// layers' tensors once and runs every layer with the same ops, in the same
// order, with the same arguments as the Python modules of pagoda/model/llama.py
// (DecoderLayer.forward), so its results are bitwise those of the Python path
// (tests/unit/test_decoder_stack.py). It does not own any arithmetic of its
// own: norms, rotary, SwiGLU and attention are the pagoda ops, matmuls the ATen
// ones the packed forms call (pagoda/model/quant/packed.py).
//
// Linear kinds (the packed form's small-batch matmul, `add_linear`):
//   0 float:  at::linear(x, a)                              (a: [N, K] in the activation dtype)
//   1 int4:   at::_weight_int4pack_mm_for_cpu(x, a, group, b) (a: packed codes, b: scales_zeros)
//   2 int8:   at::_weight_int8pack_mm(x, a, b)              (a: int8 [N, K], b: bf16 scales)
//   3 int4:   pagoda's int4_gemv(x, a, b, group)            (int4_gemv.cpp's layout: a codes, b fp16 scales)
//   4 int8:   pagoda's int8_gemv(x, a, b, group)            (the same file's 8-bit layout)
//   5 int4:   pagoda's int4_gemv_q8(x, a, b, group)         (kind 3's layout; int8 activations, q8_gemv.cpp)
//   6 int8:   pagoda's int8_gemv_q8(x, a, b)                (kind 4's layout; int8 activations, fp32 out)
// Packed kinds take bf16 activations: other dtypes are cast in and the result back.
#include "ops_common.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/custom_class.h>

#include <optional>
#include <vector>

namespace pagoda {
at::Tensor int4_gemv_direct(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                            int64_t group_size);  // int4_gemv.cpp
at::Tensor int8_gemv_direct(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                            int64_t group_size);  // int4_gemv.cpp
at::Tensor int4_gemv_q8_direct(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                               int64_t group_size);  // q8_gemv.cpp
at::Tensor int8_gemv_q8_direct(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales);
void write_kv_direct(at::Tensor k_cache, at::Tensor v_cache, const at::Tensor& k, const at::Tensor& v,
                     const at::Tensor& slots);  // attention.cpp
}  // namespace pagoda

namespace {

struct LinearSpec {
  int64_t kind;
  at::Tensor a, b;
  int64_t group_size;
  std::optional<at::Tensor> bias;

  at::Tensor operator()(const at::Tensor& x) const {
    at::Tensor y;
    if (kind == 0) {
      y = at::linear(x, a);
    } else {
      const bool cast = x.scalar_type() != at::kBFloat16;
      const at::Tensor xk = cast ? x.to(at::kBFloat16) : x;
      if (kind == 1) {
        y = at::_weight_int4pack_mm_for_cpu(xk, a, group_size, b);
      } else if (kind == 2) {
        y = at::_weight_int8pack_mm(xk, a, b);
      } else if (kind == 3) {
        y = pagoda::int4_gemv_direct(xk, a, b, group_size);
      } else if (kind == 4) {
        y = pagoda::int8_gemv_direct(xk, a, b, group_size);
      } else if (kind == 5) {
        y = pagoda::int4_gemv_q8_direct(xk, a, b, group_size);
      } else {
        y = pagoda::int8_gemv_q8_direct(xk, a, b);
      }
      if (y.scalar_type() != x.scalar_type()) y = y.to(x.scalar_type());  // cast in, or kind 6's fp32
    }
    return bias.has_value() ? y + *bias : y;
  }
};

struct LayerSpec {
  at::Tensor input_norm, post_norm;
  std::optional<at::Tensor> q_norm, k_norm;
  std::vector<LinearSpec> linears;  // qkv, o, gate_up, down (in that order)
};

// The pagoda ops this file calls, through the dispatcher (they live in other files).
struct Ops {
  c10::TypedOperatorHandle<at::Tensor(const at::Tensor&, const at::Tensor&, double)> rms_norm;
  c10::TypedOperatorHandle<void(at::Tensor&, at::Tensor&, const at::Tensor&, double)> add_rms_norm;
  c10::TypedOperatorHandle<void(const at::Tensor&, at::Tensor&, at::Tensor&, const at::Tensor&, const at::Tensor&)>
      rotary;
  c10::TypedOperatorHandle<at::Tensor(const at::Tensor&)> silu_and_mul;
  c10::TypedOperatorHandle<void(at::Tensor, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                const at::Tensor&, const at::Tensor&, const at::Tensor&, double, int64_t)>
      attention;

  static const Ops& get() {
    static const Ops ops = [] {
      auto& d = c10::Dispatcher::singleton();
      return Ops{
          d.findSchemaOrThrow("pagoda::rms_norm", "").typed<at::Tensor(const at::Tensor&, const at::Tensor&, double)>(),
          d.findSchemaOrThrow("pagoda::fused_add_rms_norm", "")
              .typed<void(at::Tensor&, at::Tensor&, const at::Tensor&, double)>(),
          d.findSchemaOrThrow("pagoda::rotary_embedding", "")
              .typed<void(const at::Tensor&, at::Tensor&, at::Tensor&, const at::Tensor&, const at::Tensor&)>(),
          d.findSchemaOrThrow("pagoda::silu_and_mul", "").typed<at::Tensor(const at::Tensor&)>(),
          d.findSchemaOrThrow("pagoda::paged_attention", "")
              .typed<void(at::Tensor, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                          const at::Tensor&, const at::Tensor&, double, int64_t)>(),
      };
    }();
    return ops;
  }
};

struct DecoderStack : torch::CustomClassHolder {
  int64_t num_heads, num_kv_heads, head_dim;
  double eps, scale;
  at::Tensor cos_cache, sin_cache, final_norm;
  std::vector<LayerSpec> layers;
  std::vector<at::Tensor> k_caches, v_caches;

  DecoderStack(int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, double eps, double scale,
               at::Tensor cos_cache, at::Tensor sin_cache, at::Tensor final_norm)
      : num_heads(num_heads), num_kv_heads(num_kv_heads), head_dim(head_dim), eps(eps), scale(scale),
        cos_cache(std::move(cos_cache)), sin_cache(std::move(sin_cache)), final_norm(std::move(final_norm)) {}

  void add_layer(at::Tensor input_norm, at::Tensor post_norm, std::optional<at::Tensor> q_norm,
                 std::optional<at::Tensor> k_norm) {
    TORCH_CHECK(q_norm.has_value() == k_norm.has_value(), "DecoderStack: q_norm and k_norm go together");
    layers.push_back(LayerSpec{std::move(input_norm), std::move(post_norm), std::move(q_norm), std::move(k_norm), {}});
  }

  void add_linear(int64_t kind, at::Tensor a, std::optional<at::Tensor> b, int64_t group_size,
                  std::optional<at::Tensor> bias) {
    TORCH_CHECK(!layers.empty(), "DecoderStack: add_layer before add_linear");
    TORCH_CHECK(kind >= 0 && kind <= 6, "DecoderStack: linear kind ", kind, " is not 0 to 6");
    TORCH_CHECK(kind == 0 || b.has_value(), "DecoderStack: packed linear kinds need their scales");
    auto& linears = layers.back().linears;
    TORCH_CHECK(linears.size() < 4, "DecoderStack: a layer has four linears (qkv, o, gate_up, down)");
    linears.push_back(LinearSpec{kind, std::move(a), b.value_or(at::Tensor()), group_size, std::move(bias)});
  }

  void set_kv_caches(std::vector<at::Tensor> k, std::vector<at::Tensor> v) {
    TORCH_CHECK(k.size() == layers.size() && v.size() == layers.size(), "DecoderStack: ", layers.size(),
                " layers but ", k.size(), " K and ", v.size(), " V caches");
    k_caches = std::move(k);
    v_caches = std::move(v);
  }

  // hidden: the embedded tokens [T, H]. Returns the final norm of the last layer's
  // output and residual (DecoderModel.forward's result).
  at::Tensor forward(at::Tensor hidden, const at::Tensor& positions, const at::Tensor& slot_mapping,
                     const at::Tensor& block_tables, const at::Tensor& query_start_loc, const at::Tensor& seq_lens,
                     int64_t num_splits) {
    TORCH_CHECK(k_caches.size() == layers.size(), "DecoderStack: set_kv_caches before forward");
    for (const auto& layer : layers) {
      TORCH_CHECK(layer.linears.size() == 4, "DecoderStack: a layer is missing linears");
    }
    const Ops& ops = Ops::get();
    const int64_t n = hidden.size(0);
    const int64_t q_size = num_heads * head_dim, kv_size = num_kv_heads * head_dim;
    at::Tensor x = hidden, residual;
    for (size_t i = 0; i < layers.size(); ++i) {
      const LayerSpec& layer = layers[i];
      if (i == 0) {
        residual = x;
        x = ops.rms_norm.call(x, layer.input_norm, eps);
      } else {
        ops.add_rms_norm.call(x, residual, layer.input_norm, eps);
      }
      // Attention (Attention.forward).
      at::Tensor qkv = layer.linears[0](x);
      auto parts = qkv.split_with_sizes({q_size, kv_size, kv_size}, -1);
      at::Tensor q = parts[0].view({n, num_heads, head_dim});
      at::Tensor k = parts[1].view({n, num_kv_heads, head_dim});
      at::Tensor v = parts[2].reshape({n, num_kv_heads, head_dim});
      if (layer.q_norm.has_value()) {
        q = ops.rms_norm.call(q, *layer.q_norm, eps);
        k = ops.rms_norm.call(k, *layer.k_norm, eps);
      }
      ops.rotary.call(positions, q, k, cos_cache, sin_cache);
      if (k.stride(2) == 1 && k.stride(1) == head_dim && v.stride(2) == 1 && v.stride(1) == head_dim) {
        pagoda::write_kv_direct(k_caches[i], v_caches[i], k, v, slot_mapping);  // attention.cpp
      } else {
        k_caches[i].view({-1, num_kv_heads, head_dim}).index_copy_(0, slot_mapping, k);
        v_caches[i].view({-1, num_kv_heads, head_dim}).index_copy_(0, slot_mapping, v);
      }
      if (q.stride(2) != 1) q = q.contiguous();
      at::Tensor attn = at::empty({n, q_size}, q.options());
      ops.attention.call(attn, q, k_caches[i], v_caches[i], block_tables, query_start_loc, seq_lens, scale,
                         num_splits);
      x = layer.linears[1](attn);
      // MLP (post-attention norm, then MLP.forward).
      ops.add_rms_norm.call(x, residual, layer.post_norm, eps);
      x = layer.linears[3](ops.silu_and_mul.call(layer.linears[2](x)));
    }
    if (layers.empty()) return ops.rms_norm.call(x, final_norm, eps);
    ops.add_rms_norm.call(x, residual, final_norm, eps);
    return x;
  }
};

}  // namespace

TORCH_LIBRARY_FRAGMENT(pagoda, m) {
  m.class_<DecoderStack>("DecoderStack")
      .def(torch::init<int64_t, int64_t, int64_t, double, double, at::Tensor, at::Tensor, at::Tensor>())
      .def("add_layer", &DecoderStack::add_layer)
      .def("add_linear", &DecoderStack::add_linear)
      .def("set_kv_caches", &DecoderStack::set_kv_caches)
      .def("forward", &DecoderStack::forward);
}
