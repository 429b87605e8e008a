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
// Work split: the tokens are sorted by slot (counting sort) and the sorted positions cut into
// ranges, one per thread (large steps) or one for the caller (small ones). A range does its
// own shrink and expand: threads write disjoint rows of out, so one parallel region and no
// barrier. Within a range, tokens go in blocks of up to 4 of one slot, so each load of a
// weight vector feeds 4 tokens; a slot's weights are read once per range.
//
// At a decode step the op is memory-bound: 32 tokens x 4 rank-8 adapters read ~0.65 MB of
// A and B per SmolLM2-135M layer, ~9% of the base weights' bytes.
#include "vec_isa.h"
#include "fused_common.h"

#include <vector>

namespace {
using namespace pagoda_fused;

#if defined(CPU_CAPABILITY_AVX512) && defined(__AVX512BF16__)
#define PAGODA_LORA_BF16_DOT 1  // vdpbf16ps: 32 bf16 products (exact) summed into 16 float lanes
#else
#define PAGODA_LORA_BF16_DOT 0
#endif

constexpr int kTokenBlock = 4;                   // tokens sharing each weight load
constexpr int kVecs = 4;                         // float vectors per output column block
constexpr int64_t kColBlock = kVecs * fVec::size();

// Multiply-adds per thread below which the op runs on the calling thread (~5-10 us of work).
// A decode step's call (32 tokens: 0.3-1.1 M) splits over 2 threads: measured with
// benchmarks/multi_lora.py (2 threads, load ~4.5), mixed/base was 86.7% split vs 70.2% with
// the LoRA on the calling thread alone (its core does the LoRA while the other one idles).
constexpr int64_t kMinParallelMacs = int64_t{1} << 17;

// ---- shrink: xa[j, r] = x_j . a_row for NT tokens of one slot ----

// float32 path: NT rows of K floats (the tokens' inputs, converted once per token).
template <int NT, typename T>
inline void dots(float* out, const float* const* xf, const T* a_row, int64_t k) {
  fVec acc[NT];
  for (int j = 0; j < NT; ++j) acc[j] = fVec(0.f);
  int64_t d = 0;
  for (; d + kStep <= k; d += kStep) {
    fVec a0, a1;
    load2(a_row + d, a0, a1);
    for (int j = 0; j < NT; ++j) {
      acc[j] = at::vec::fmadd(fVec::loadu(xf[j] + d), a0, acc[j]);
      acc[j] = at::vec::fmadd(fVec::loadu(xf[j] + d + fVec::size()), a1, acc[j]);
    }
  }
  for (int j = 0; j < NT; ++j) {
    float sum = at::vec::vec_reduce_all<float>([](fVec& u, fVec& v) { return u + v; }, acc[j]);
    for (int64_t e = d; e < k; ++e) sum += xf[j][e] * static_cast<float>(a_row[e]);
    out[j] = sum;
  }
}

#if PAGODA_LORA_BF16_DOT
// bf16 path: x and A read as they are; the tail is a zero-filled masked load (exact zeros).
template <int NT>
inline void dots_bf16(float* out, const c10::BFloat16* const* x, const c10::BFloat16* a_row, int64_t k) {
  __m512 acc[NT];
  for (int j = 0; j < NT; ++j) acc[j] = _mm512_setzero_ps();
  for (int64_t d = 0; d < k; d += 32) {
    const __mmask32 mask = k - d >= 32 ? ~__mmask32{0} : static_cast<__mmask32>((uint64_t{1} << (k - d)) - 1);
    const __m512bh av = (__m512bh)_mm512_maskz_loadu_epi16(mask, a_row + d);
    for (int j = 0; j < NT; ++j) {
      acc[j] = _mm512_dpbf16_ps(acc[j], (__m512bh)_mm512_maskz_loadu_epi16(mask, x[j] + d), av);
    }
  }
  for (int j = 0; j < NT; ++j) out[j] = _mm512_reduce_add_ps(acc[j]);
}
#endif

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

// xa[j * W + i * R + r] = T(x_j . a[i * R + r]) for the NT tokens of one slot (a: the slot's rows).
template <int NT, typename T>
inline void shrink_block(float* xa, const T* const* x, const float* const* xf, const T* a,
                         const int32_t* ranks, int64_t num_shards, int64_t max_rank, int64_t k) {
  const int64_t width = num_shards * max_rank;
  float sums[NT];
  for (int64_t i = 0; i < num_shards; ++i) {
    for (int64_t r = 0; r < ranks[i]; ++r) {
      const T* a_row = a + (i * max_rank + r) * k;
#if PAGODA_LORA_BF16_DOT
      if constexpr (std::is_same_v<T, c10::BFloat16>) {
        dots_bf16<NT>(sums, x, a_row, k);
      } else {
        dots<NT>(sums, xf, a_row, k);
      }
#else
      dots<NT>(sums, xf, a_row, k);
#endif
      for (int j = 0; j < NT; ++j) xa[j * width + i * max_rank + r] = round1<T>(sums[j]);
    }
  }
}

// ---- expand: dst_j[0 .. kColBlock) += sum_r xa_j[r] * B[r, block] for NT tokens of one slot ----

// float32 path: bf holds the block's `rank` B rows in float, kColBlock each.
template <int NT, typename T>
inline void expand_block(T* const* dst, const float* const* coef, const float* bf, int64_t rank) {
  fVec acc[NT][kVecs];
  for (int j = 0; j < NT; ++j)
    for (int v = 0; v < kVecs; ++v) acc[j][v] = fVec(0.f);
  for (int64_t r = 0; r < rank; ++r) {
    fVec b[kVecs];
    for (int v = 0; v < kVecs; ++v) b[v] = fVec::loadu(bf + r * kColBlock + v * fVec::size());
    for (int j = 0; j < NT; ++j) {
      const fVec c(coef[j][r]);
      for (int v = 0; v < kVecs; ++v) acc[j][v] = at::vec::fmadd(c, b[v], acc[j][v]);
    }
  }
  for (int j = 0; j < NT; ++j) {
    for (int v = 0; v < kVecs; v += 2) {
      fVec o0, o1;
      load2(dst[j] + v * fVec::size(), o0, o1);
      store2(dst[j] + v * fVec::size(), o0 + acc[j][v], o1 + acc[j][v + 1]);
    }
  }
}

#if PAGODA_LORA_BF16_DOT
// bf16 path: B rows (2q, 2q + 1) interleaved into (B[2q, c], B[2q + 1, c]) pairs, so that one
// vdpbf16ps adds xa[2q] * B[2q, c] + xa[2q + 1] * B[2q + 1, c] into 16 columns. The shrink's
// outputs are already rounded to bf16, so their pairs (coef, as uint32) are exact.
inline __m512i pair_index(int half) {
  alignas(64) int16_t idx[32];
  for (int i = 0; i < 32; ++i) idx[i] = static_cast<int16_t>((i & 1 ? 32 : 0) + 16 * half + i / 2);
  return _mm512_load_si512(idx);
}

// pairs[0 .. 4): the kColBlock (64) columns of rows r0 and r1 (null: a zero row) as pairs.
inline void interleave_rows(__m512i* pairs, const c10::BFloat16* r0, const c10::BFloat16* r1,
                            const __m512i& lo, const __m512i& hi) {
  for (int h = 0; h < 2; ++h) {
    const __m512i a = _mm512_loadu_si512(r0 + 32 * h);
    const __m512i b = r1 != nullptr ? _mm512_loadu_si512(r1 + 32 * h) : _mm512_setzero_si512();
    pairs[2 * h] = _mm512_permutex2var_epi16(a, lo, b);
    pairs[2 * h + 1] = _mm512_permutex2var_epi16(a, hi, b);
  }
}

inline uint32_t coef_pair(float c0, float c1) {
  return static_cast<uint32_t>(c10::BFloat16(c0).x) | (static_cast<uint32_t>(c10::BFloat16(c1).x) << 16);
}

template <int NT>
inline void expand_block_bf16(c10::BFloat16* const* dst, const uint32_t* const* coef, const __m512i* pairs,
                              int64_t num_pairs) {
  static_assert(kVecs == 4 && kColBlock == 64, "pairs hold 64 columns");
  __m512 acc[NT][kVecs];
  for (int j = 0; j < NT; ++j)
    for (int v = 0; v < kVecs; ++v) acc[j][v] = _mm512_setzero_ps();
  for (int64_t q = 0; q < num_pairs; ++q) {
    for (int j = 0; j < NT; ++j) {
      const __m512bh c = (__m512bh)_mm512_set1_epi32(static_cast<int>(coef[j][q]));
      for (int v = 0; v < kVecs; ++v) acc[j][v] = _mm512_dpbf16_ps(acc[j][v], (__m512bh)pairs[kVecs * q + v], c);
    }
  }
  for (int j = 0; j < NT; ++j) {
    for (int v = 0; v < kVecs; v += 2) {
      fVec o0, o1;
      load2(dst[j] + v * fVec::size(), o0, o1);
      store2(dst[j] + v * fVec::size(), o0 + fVec(acc[j][v]), o1 + fVec(acc[j][v + 1]));
    }
  }
}
#endif

// Calls f.template operator()<NT>() with NT = n (1 .. kTokenBlock) as a compile-time constant.
template <typename F>
inline void with_block_size(int64_t n, F&& f) {
  switch (n) {
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    default: f(std::integral_constant<int, 1>{}); break;
  }
}

struct Problem {
  int64_t k, n, num_shards, max_rank, width;
  const std::vector<int64_t>* shard_sizes;
  const int32_t* ranks;        // [slots, shards]
  const int64_t* order;        // sorted position -> token
  const int64_t* slot_at;      // sorted position -> slot (ascending)
  const int64_t* slot_end;     // slot -> one past its last sorted position
};

// Shrink and expand of sorted positions [begin, end).
template <typename T>
void lora_range(const Problem& pb, const T* xp, int64_t xs, const T* ap, const T* bp, T* op, int64_t os,
                int64_t begin, int64_t end) {
  const int64_t k = pb.k, n = pb.n, num_shards = pb.num_shards, max_rank = pb.max_rank, width = pb.width;
  const int64_t count = end - begin;
  constexpr bool kNative = PAGODA_LORA_BF16_DOT && std::is_same_v<T, c10::BFloat16>;

  // Shrink, in runs of up to kTokenBlock positions of one slot.
  std::vector<float> xa(count * width, 0.f);
  std::vector<float> xf_buf(kNative ? 0 : kTokenBlock * k);
  for (int64_t p0 = begin; p0 < end;) {
    const int64_t s = pb.slot_at[p0];
    const int64_t nt = std::min<int64_t>({kTokenBlock, end - p0, pb.slot_end[s] - p0});
    const T* x_rows[kTokenBlock];
    const float* xf_rows[kTokenBlock] = {};
    for (int64_t j = 0; j < nt; ++j) {
      x_rows[j] = xp + pb.order[p0 + j] * xs;
      if (!kNative) {
        to_float(xf_buf.data() + j * k, x_rows[j], k);
        xf_rows[j] = xf_buf.data() + j * k;
      }
    }
    with_block_size(nt, [&](auto nt_c) {
      shrink_block<decltype(nt_c)::value>(xa.data() + (p0 - begin) * width, x_rows, xf_rows,
                                          ap + s * width * k, pb.ranks + s * num_shards, num_shards, max_rank, k);
    });
    p0 += nt;
  }

#if PAGODA_LORA_BF16_DOT
  // The shrink's outputs as bf16 pairs, per shard (bf16 expand).
  const int64_t pairs_per_shard = (max_rank + 1) / 2, pair_width = num_shards * pairs_per_shard;
  std::vector<uint32_t> xa_pairs(kNative ? count * pair_width : 0);
  if constexpr (kNative) {
    for (int64_t p = 0; p < count; ++p) {
      for (int64_t i = 0; i < num_shards; ++i) {
        const float* v = xa.data() + p * width + i * max_rank;
        for (int64_t q = 0; q < pairs_per_shard; ++q) {
          xa_pairs[p * pair_width + i * pairs_per_shard + q] = coef_pair(v[2 * q], 2 * q + 1 < max_rank ? v[2 * q + 1] : 0.f);
        }
      }
    }
  }
  std::vector<__m512i> pairs(kNative ? pairs_per_shard * kVecs : 0);
  const __m512i lo = pair_index(0), hi = pair_index(1);
#endif

  // Expand, slot by slot: a slot's B rows are read as `rank` sequential streams.
  std::vector<float> bf(kNative ? 0 : max_rank * kColBlock);
  for (int64_t seg = begin; seg < end;) {
    const int64_t s = pb.slot_at[seg];
    const int64_t seg_end = std::min(end, pb.slot_end[s]);
    for (int64_t i = 0, col = 0; i < num_shards; col += (*pb.shard_sizes)[i], ++i) {
      const int64_t rank = pb.ranks[s * num_shards + i];
      if (rank == 0) continue;
      const int64_t row0 = s * width + i * max_rank;
      const int64_t size = (*pb.shard_sizes)[i];
      for (int64_t c = 0; c < size; c += kColBlock) {
        const int64_t first = col + c, cols = std::min(kColBlock, size - c);
        if (cols < kColBlock) {  // the last block of a shard whose size is not a multiple: scalar
          for (int64_t p = seg; p < seg_end; ++p) {
            const float* coef = xa.data() + (p - begin) * width + i * max_rank;
            T* dst = op + pb.order[p] * os + first;
            for (int64_t e = 0; e < cols; ++e) {
              float acc = 0.f;
              for (int64_t r = 0; r < rank; ++r) acc += coef[r] * static_cast<float>(bp[(row0 + r) * n + first + e]);
              dst[e] = static_cast<T>(static_cast<float>(dst[e]) + acc);
            }
          }
          continue;
        }
#if PAGODA_LORA_BF16_DOT
        if constexpr (kNative) {
          const int64_t num_pairs = (rank + 1) / 2;
          for (int64_t q = 0; q < num_pairs; ++q) {
            const T* r0 = bp + (row0 + 2 * q) * n + first;
            interleave_rows(pairs.data() + kVecs * q, r0, 2 * q + 1 < rank ? r0 + n : nullptr, lo, hi);
          }
          for (int64_t p0 = seg; p0 < seg_end; p0 += kTokenBlock) {
            const int64_t nt = std::min<int64_t>(kTokenBlock, seg_end - p0);
            T* dst[kTokenBlock];
            const uint32_t* coef[kTokenBlock];
            for (int64_t j = 0; j < nt; ++j) {
              dst[j] = op + pb.order[p0 + j] * os + first;
              coef[j] = xa_pairs.data() + (p0 + j - begin) * pair_width + i * pairs_per_shard;
            }
            with_block_size(nt, [&](auto nt_c) {
              expand_block_bf16<decltype(nt_c)::value>(dst, coef, pairs.data(), num_pairs);
            });
          }
          continue;
        }
#endif
        for (int64_t r = 0; r < rank; ++r) to_float(bf.data() + r * kColBlock, bp + (row0 + r) * n + first, kColBlock);
        for (int64_t p0 = seg; p0 < seg_end; p0 += kTokenBlock) {
          const int64_t nt = std::min<int64_t>(kTokenBlock, seg_end - p0);
          T* dst[kTokenBlock];
          const float* coef[kTokenBlock];
          for (int64_t j = 0; j < nt; ++j) {
            dst[j] = op + pb.order[p0 + j] * os + first;
            coef[j] = xa.data() + (p0 + j - begin) * width + i * max_rank;
          }
          with_block_size(nt, [&](auto nt_c) {
            expand_block<decltype(nt_c)::value>(dst, coef, bf.data(), rank);
          });
        }
      }
    }
    seg = seg_end;
  }
}

template <typename T>
void lora_add_impl(at::Tensor& out, const at::Tensor& x, const at::Tensor& a, const at::Tensor& b,
                   const at::Tensor& token_slots, const at::Tensor& ranks, int64_t max_rank,
                   const std::vector<int64_t>& shard_sizes) {
  const int64_t m = x.size(0);
  const int64_t num_shards = static_cast<int64_t>(shard_sizes.size());
  const int64_t num_slots = ranks.size(0);
  const int64_t* slot_of = token_slots.const_data_ptr<int64_t>();

  // Tokens sorted by slot (counting sort): order[start[s] .. start[s + 1]) are slot s's tokens.
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
  std::vector<int64_t> order(used), slot_at(used), fill(start.begin(), start.end() - 1);
  for (int64_t t = 0; t < m; ++t) {
    const int64_t s = slot_of[t];
    if (s >= 0) {
      slot_at[fill[s]] = s;
      order[fill[s]++] = t;
    }
  }

  Problem pb{x.size(1), out.size(1), num_shards, max_rank, num_shards * max_rank, &shard_sizes,
             ranks.const_data_ptr<int32_t>(), order.data(), slot_at.data(), start.data() + 1};
  int64_t macs_per_token = 0;  // at most: every shard at max_rank
  for (int64_t size : shard_sizes) macs_per_token += max_rank * (pb.k + size);
  const int64_t grain = std::max<int64_t>(kTokenBlock, kMinParallelMacs / std::max<int64_t>(1, macs_per_token));
  const T* xp = x.const_data_ptr<T>();
  const T* ap = a.const_data_ptr<T>();
  const T* bp = b.const_data_ptr<T>();
  T* op = out.data_ptr<T>();
  at::parallel_for(0, used, grain, [&](int64_t begin, int64_t end) {
    lora_range<T>(pb, xp, x.stride(0), ap, bp, op, out.stride(0), begin, end);
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
  TORCH_CHECK(token_slots.device().is_cpu() && token_slots.scalar_type() == at::kLong &&
              token_slots.is_contiguous() && token_slots.numel() == x.size(0),
              "pagoda::lora_add_: token_slots must be int64 [M]");
  TORCH_CHECK(ranks.device().is_cpu() && ranks.scalar_type() == at::kInt && ranks.is_contiguous() &&
              ranks.dim() == 2 && ranks.size(1) == static_cast<int64_t>(shard_sizes.size()),
              "pagoda::lora_add_: ranks must be int32 [slots, shards]");
  TORCH_CHECK(max_rank >= 1, "pagoda::lora_add_: max_rank must be >= 1, got ", max_rank);
  std::vector<int64_t> sizes(shard_sizes.begin(), shard_sizes.end());
  int64_t total = 0;
  for (int64_t size : sizes) {
    TORCH_CHECK(size >= 0, "pagoda::lora_add_: negative shard size ", size);
    total += size;
  }
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
