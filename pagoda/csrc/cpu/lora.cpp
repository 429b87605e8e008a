// Batched multi-LoRA delta, one call per linear layer (Punica's BGMV on the CPU):
//
//   out[t, cols(i)] += (x[t] @ A[s, i]^T) @ B[s, i]     for each token t with slot s = slots[t] >= 0
//                                                       and each shard i of the fused layer
//
// Every token uses its own slot's weights: no masked work for the other slots, no
// gather of weights, no scatter of results, and one dispatch instead of the torch
// fallback's four or five (model/lora/layers.py computes the same thing with matmuls).
//
// Layout (LoRALinearWeights in model/lora/layers.py):
//   a     [L * W, K]  row s*W + i*R + r is rank vector r of slot s, shard i (PEFT's lora_A rows)
//   b     [L * W, N]  row s*W + i*R + r: that rank's output row (scaling folded in); only the
//                     columns of shard i are ever read (the rest are zero: block diagonal)
//   ranks [L, S] int32: the rank each slot gives each shard (0: the shard has no LoRA)
// with W = S * R, R = max_rank, N = sum(shard_sizes), shard i owning the output columns
// sum(shard_sizes[:i]) .. + shard_sizes[i].
//
// Rounding, as the torch path: x @ A^T accumulates in float32 and is rounded to the
// activation dtype (the torch path's intermediate tensor); the expand accumulates in
// float32 and adds into out with one rounding. Only the summation order differs.
//
// Two phases, each split over threads (large steps) or run on the caller (small ones):
// shrink over tokens (grouped by slot: a slot's A rows stay in cache), expand over
// column blocks of the output (each thread owns disjoint columns of out).
#include "vec_isa.h"
#include "fused_common.h"

#include <vector>

namespace {
using namespace pagoda_fused;

constexpr int64_t kColBlock = 4 * fVec::size();  // output columns per expand work item

template <typename T>
inline float dot_row(const float* xf, const T* row, int64_t k) {
  fVec acc0(0.f), acc1(0.f);
  int64_t d = 0;
  for (; d + kStep <= k; d += kStep) {
    fVec a, b;
    load2(row + d, a, b);
    acc0 = at::vec::fmadd(fVec::loadu(xf + d), a, acc0);
    acc1 = at::vec::fmadd(fVec::loadu(xf + d + fVec::size()), b, acc1);
  }
  float sum = at::vec::vec_reduce_all<float>([](fVec& u, fVec& v) { return u + v; }, acc0 + acc1);
  for (; d < k; ++d) sum += xf[d] * static_cast<float>(row[d]);
  return sum;
}

template <typename T>
inline void to_float(float* dst, const T* src, int64_t n) {
  int64_t d = 0;
  for (; d + kStep <= n; d += kStep) {
    fVec a, b;
    load2(src + d, a, b);
    a.store(dst + d);
    b.store(dst + d + fVec::size());
  }
  for (; d < n; ++d) dst[d] = static_cast<float>(src[d]);
}

struct ColumnBlock {
  int64_t shard, first, count;
};

template <typename T>
void lora_add_impl(at::Tensor& out, const at::Tensor& x, const at::Tensor& a, const at::Tensor& b,
                   const at::Tensor& token_slots, const at::Tensor& ranks, int64_t max_rank,
                   const std::vector<int64_t>& shard_sizes) {
  const int64_t m = x.size(0), k = x.size(1), n = out.size(1);
  const int64_t num_shards = static_cast<int64_t>(shard_sizes.size());
  const int64_t width = num_shards * max_rank;
  const int64_t num_slots = ranks.size(0);
  const int64_t* slot_of = token_slots.const_data_ptr<int64_t>();
  const int32_t* rank_of = ranks.const_data_ptr<int32_t>();  // [num_slots, num_shards]

  // Tokens grouped by slot (counting sort): order[start[s] .. start[s + 1]) are slot s's tokens.
  std::vector<int64_t> start(num_slots + 1, 0);
  for (int64_t t = 0; t < m; ++t) {
    const int64_t s = slot_of[t];
    TORCH_CHECK(s >= -1 && s < num_slots, "pagoda::lora_add_: token ", t, " has slot ", s,
                ", outside -1 .. ", num_slots - 1);
    if (s >= 0) ++start[s + 1];
  }
  for (int64_t s = 0; s < num_slots; ++s) start[s + 1] += start[s];
  const int64_t used = start[num_slots];
  if (used == 0) return;
  std::vector<int64_t> order(used), fill(start.begin(), start.end() - 1);
  std::vector<int64_t> slot_at(used);
  for (int64_t t = 0; t < m; ++t) {
    const int64_t s = slot_of[t];
    if (s >= 0) {
      slot_at[fill[s]] = s;
      order[fill[s]++] = t;
    }
  }

  const T* xp = x.const_data_ptr<T>();
  const T* ap = a.const_data_ptr<T>();
  const T* bp = b.const_data_ptr<T>();
  T* op = out.data_ptr<T>();
  const int64_t xs = x.stride(0), os = out.stride(0);

  // Shrink: xa[p, i * R + r] = T(x[order[p]] . a[slot * W + i * R + r]) for r < rank.
  std::vector<float> xa(used * width, 0.f);
  at::parallel_for(0, used, grain_for(k * width), [&](int64_t begin, int64_t end) {
    std::vector<float> xf(k);
    for (int64_t p = begin; p < end; ++p) {
      const int64_t s = slot_at[p];
      to_float(xf.data(), xp + order[p] * xs, k);
      for (int64_t i = 0; i < num_shards; ++i) {
        const int64_t rank = rank_of[s * num_shards + i];
        for (int64_t r = 0; r < rank; ++r) {
          const int64_t row = s * width + i * max_rank + r;
          xa[p * width + i * max_rank + r] = round1<T>(dot_row(xf.data(), ap + row * k, k));
        }
      }
    }
  });

  // Expand: column blocks never straddle shards; each block reads only its shard's ranks.
  std::vector<ColumnBlock> blocks;
  for (int64_t i = 0, col = 0; i < num_shards; col += shard_sizes[i], ++i) {
    for (int64_t c = 0; c < shard_sizes[i]; c += kColBlock) {
      blocks.push_back({i, col + c, std::min(kColBlock, shard_sizes[i] - c)});
    }
  }
  const int64_t per_block = used * max_rank * kColBlock;
  at::parallel_for(0, static_cast<int64_t>(blocks.size()), grain_for(per_block), [&](int64_t begin, int64_t end) {
    std::vector<float> bf(max_rank * kColBlock);  // one slot's B rows for this block, in float
    for (int64_t q = begin; q < end; ++q) {
      const ColumnBlock blk = blocks[q];
      for (int64_t s = 0; s < num_slots; ++s) {
        const int64_t rank = rank_of[s * num_shards + blk.shard];
        if (rank == 0 || start[s] == start[s + 1]) continue;
        const int64_t row0 = s * width + blk.shard * max_rank;
        for (int64_t r = 0; r < rank; ++r) {
          to_float(bf.data() + r * kColBlock, bp + (row0 + r) * n + blk.first, blk.count);
        }
        for (int64_t p = start[s]; p < start[s + 1]; ++p) {
          const float* coef = xa.data() + p * width + blk.shard * max_rank;
          T* dst = op + order[p] * os + blk.first;
          if (blk.count == kColBlock) {
            fVec acc0(0.f), acc1(0.f), acc2(0.f), acc3(0.f);
            for (int64_t r = 0; r < rank; ++r) {
              const fVec c(coef[r]);
              const float* br = bf.data() + r * kColBlock;
              acc0 = at::vec::fmadd(c, fVec::loadu(br), acc0);
              acc1 = at::vec::fmadd(c, fVec::loadu(br + fVec::size()), acc1);
              acc2 = at::vec::fmadd(c, fVec::loadu(br + 2 * fVec::size()), acc2);
              acc3 = at::vec::fmadd(c, fVec::loadu(br + 3 * fVec::size()), acc3);
            }
            fVec o0, o1, o2, o3;
            load2(dst, o0, o1);
            load2(dst + kStep, o2, o3);
            store2(dst, o0 + acc0, o1 + acc1);
            store2(dst + kStep, o2 + acc2, o3 + acc3);
          } else {
            for (int64_t c = 0; c < blk.count; ++c) {
              float acc = 0.f;
              for (int64_t r = 0; r < rank; ++r) acc += coef[r] * bf[r * kColBlock + c];
              dst[c] = static_cast<T>(static_cast<float>(dst[c]) + acc);
            }
          }
        }
      }
    }
  });
}

void lora_add_(at::Tensor out, const at::Tensor& x, const at::Tensor& a, const at::Tensor& b,
               const at::Tensor& token_slots, const at::Tensor& ranks, int64_t max_rank,
               at::IntArrayRef shard_sizes) {
  TORCH_CHECK(out.device().is_cpu() && x.device().is_cpu() && a.device().is_cpu() && b.device().is_cpu(),
              "pagoda::lora_add_: CPU tensors only");
  TORCH_CHECK(x.dim() == 2 && out.dim() == 2 && x.size(0) == out.size(0),
              "pagoda::lora_add_: x [M, K] and out [M, N] must have the same rows");
  TORCH_CHECK(x.scalar_type() == out.scalar_type() && a.scalar_type() == x.scalar_type() &&
              b.scalar_type() == x.scalar_type(), "pagoda::lora_add_: x, out, a and b must share one dtype");
  TORCH_CHECK((x.size(1) == 0 || x.stride(1) == 1) && (out.size(1) == 0 || out.stride(1) == 1),
              "pagoda::lora_add_: the last dim of x and out must be contiguous");
  TORCH_CHECK(a.is_contiguous() && b.is_contiguous(), "pagoda::lora_add_: a and b must be contiguous");
  TORCH_CHECK(token_slots.scalar_type() == at::kLong && token_slots.is_contiguous() &&
              token_slots.numel() == x.size(0), "pagoda::lora_add_: token_slots must be int64 [M]");
  TORCH_CHECK(ranks.scalar_type() == at::kInt && ranks.is_contiguous() && ranks.dim() == 2 &&
              ranks.size(1) == static_cast<int64_t>(shard_sizes.size()),
              "pagoda::lora_add_: ranks must be int32 [slots, shards]");
  std::vector<int64_t> sizes(shard_sizes.begin(), shard_sizes.end());
  int64_t total = 0;
  for (int64_t size : sizes) total += size;
  const int64_t width = static_cast<int64_t>(sizes.size()) * max_rank;
  TORCH_CHECK(total == out.size(1), "pagoda::lora_add_: shard sizes add up to ", total, ", out has ",
              out.size(1), " columns");
  TORCH_CHECK(a.dim() == 2 && a.size(0) == ranks.size(0) * width && a.size(1) == x.size(1),
              "pagoda::lora_add_: a must be [slots * shards * max_rank, K]");
  TORCH_CHECK(b.dim() == 2 && b.size(0) == a.size(0) && b.size(1) == out.size(1),
              "pagoda::lora_add_: b must be [slots * shards * max_rank, N]");
  const int32_t* rp = ranks.const_data_ptr<int32_t>();
  for (int64_t j = 0; j < ranks.numel(); ++j) {
    TORCH_CHECK(rp[j] >= 0 && rp[j] <= max_rank, "pagoda::lora_add_: rank ", rp[j], " outside 0 .. ", max_rank);
  }
  if (x.size(0) == 0 || out.size(1) == 0) return;
  PAGODA_DISPATCH_FLOAT3(x.scalar_type(), "pagoda::lora_add_", [&] {
    lora_add_impl<scalar_t>(out, x, a, b, token_slots, ranks, max_rank, sizes);
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pagoda, m) {
  m.def("lora_add_(Tensor(a!) out, Tensor x, Tensor a, Tensor b, Tensor token_slots, Tensor ranks, "
        "int max_rank, int[] shard_sizes) -> ()");
  m.impl("lora_add_", c10::DispatchKey::CPU, &lora_add_);
}
