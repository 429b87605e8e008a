// Paged attention on the CPU, reading K/V blocks in place (no gather copy).
//
//   torch.ops.pagoda.paged_attention(out, q, k_cache, v_cache, block_tables,
//                                    query_start_loc, seq_lens, scale, num_splits)
//
// Layout (the same as pagoda/model/attention/torch_paged.py):
//   q            [N, H, D]      this step's queries (any row/head strides, D contiguous)
//   k/v_cache    [num_blocks, block_size, KVH, D], contiguous; this step's K/V already written
//   block_tables [R, max_blocks] int32, row r's blocks in order (entries past its last: padding)
//   query_start_loc [R + 1] int32; seq_lens [R] int32
//   out          [N, H * D]      written (same dtype as q)
// Row r's queries are tokens query_start_loc[r] .. query_start_loc[r+1]-1, at sequence
// positions seq_lens[r] - query_len .. seq_lens[r] - 1; query i sees keys 0 .. its own
// position (causal). That covers decodes (one query) and prefill chunks over a cached
// prefix with one rule, so decodes and chunks go in one call, in any row order.
//
// Work is split into items (row, query tile, KV head, key-block range); one item
// loads each K/V block of its range once, converts it to fp32, and runs all its
// queries -- every query head sharing the KV head, for every token of the tile --
// against it (GQA without repeating K/V). Softmax is online (running max and sum
// per query, fp32). When there are fewer items than threads can use (few decodes,
// long contexts), a decode row's blocks are split into `splits` ranges computed by
// separate items (flash-decoding); each writes an unnormalised partial result and a
// second pass merges them.
#include "ops_common.h"
#include "attention_math.h"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace pagoda_attention {
namespace {

constexpr int kQueryTile = 16;          // prefill tokens per work item
constexpr int kMinBlocksPerSplit = 4;   // a split below this costs more to merge than it saves
constexpr int kItemsPerThread = 4;      // aim for this many items per thread (load balance)
// From this many queries per item on, a block's keys are transposed once so that scores
// are a small matrix product vectorised over keys; below, per-key dot products are cheaper.
// (bf16 caches with AVX-512 BF16 take neither: see run_item's score_block16_bf16 path.)
// Rows of at most this many tokens (decodes; speculative verification of up to 7 drafts)
// score each key with one dot product per query: a query's result then does not depend on
// how many tokens share its row, so verifying drafts reproduces decoding bit for bit.
// Longer rows (prefill chunks) score a transposed block 8 queries at a time (faster, other
// rounding), in every tile, their last short one too.
constexpr int64_t kMaxDotProductTokens = 8;
constexpr int64_t kScoreTile = 8;  // queries scored together against a transposed block

struct WorkItem {
  int32_t row;
  int32_t q_begin;   // first query of the tile, relative to the row's first query
  int32_t q_len;     // queries in the tile
  int32_t kb_begin;  // key blocks [kb_begin, kb_end) of the row's table
  int32_t kb_end;
  int32_t partial;   // -1: write `out` directly; else this item's slot in the partial buffers
};

struct SplitRow {  // a decode row computed in several ranges, merged afterwards
  int32_t token;
  int32_t first_partial;
  int32_t num_partials;
};

struct Plan {
  std::vector<WorkItem> items;
  std::vector<SplitRow> split_rows;
  int32_t num_partials = 0;
};

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Cuts the step into work items. `forced_splits` > 0 splits every decode row into that
// many ranges (tests); 0 decides from the thread count.
Plan make_plan(const int32_t* qsl, const int32_t* seq_lens, int64_t rows, int64_t block_size,
               int64_t kv_heads, int64_t threads, int64_t forced_splits) {
  int64_t base_items = 0;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t q_len = qsl[r + 1] - qsl[r];
    base_items += ceil_div(q_len, kQueryTile) * kv_heads;
  }
  int64_t want_splits = 1;
  if (forced_splits > 0) {
    want_splits = forced_splits;
  } else if (threads > 1 && base_items > 0 && base_items < threads * kItemsPerThread) {
    want_splits = ceil_div(threads * kItemsPerThread, base_items);
  }
  Plan plan;
  for (int64_t r = 0; r < rows; ++r) {
    const int32_t q_len = qsl[r + 1] - qsl[r];
    const int32_t seq_len = seq_lens[r];
    if (q_len <= 0 || seq_len <= 0) continue;
    const int32_t num_blocks = static_cast<int32_t>(ceil_div(seq_len, block_size));
    if (q_len == 1) {
      int64_t splits = std::min<int64_t>(want_splits, forced_splits > 0 ? num_blocks
                                                                       : num_blocks / kMinBlocksPerSplit);
      splits = std::max<int64_t>(splits, 1);
      if (splits == 1) {
        plan.items.push_back({static_cast<int32_t>(r), 0, 1, 0, num_blocks, -1});
        continue;
      }
      plan.split_rows.push_back({qsl[r], plan.num_partials, static_cast<int32_t>(splits)});
      for (int64_t s = 0; s < splits; ++s) {  // even ranges; every range has >= 1 block
        const int32_t begin = static_cast<int32_t>(num_blocks * s / splits);
        const int32_t end = static_cast<int32_t>(num_blocks * (s + 1) / splits);
        plan.items.push_back({static_cast<int32_t>(r), 0, 1, begin, end, plan.num_partials++});
      }
      continue;
    }
    const int32_t context = seq_len - q_len;  // keys cached before the chunk
    // A short row (a decode verifying drafts) would be one item per KV head: with few items
    // in the step, its tokens are cut into one tile per thread so every thread has work. Its
    // queries are scored one dot product per key whatever the tile (kMaxDotProductTokens),
    // so the cut does not change a result.
    int32_t query_tile = kQueryTile;
    if (q_len <= kMaxDotProductTokens && threads > 1 && base_items < threads * kItemsPerThread) {
      query_tile = static_cast<int32_t>(ceil_div(q_len, std::min<int64_t>(q_len, threads)));
    }
    for (int32_t q0 = 0; q0 < q_len; q0 += query_tile) {
      const int32_t tile = std::min<int32_t>(query_tile, q_len - q0);
      // The tile's last query sees keys up to position context + q0 + tile - 1.
      const int32_t end = static_cast<int32_t>(ceil_div(context + q0 + tile, block_size));
      plan.items.push_back({static_cast<int32_t>(r), q0, tile, 0, end, -1});
    }
  }
  return plan;
}

// Per-thread scratch, reused across items (sizes only grow).
struct Scratch {
  std::vector<float> q, acc, max, sum, key, key_t, value, scores, tile, block_scores, correction;
  std::vector<uint16_t> q_bf16;
  void resize_bf16(int64_t queries, int64_t head_dim) {
    if (static_cast<int64_t>(q_bf16.size()) < queries * head_dim) q_bf16.resize(queries * head_dim);
    if (static_cast<int64_t>(block_scores.size()) < queries * 16) block_scores.resize(queries * 16);
    if (static_cast<int64_t>(correction.size()) < queries) correction.resize(queries);
  }
  void resize(int64_t queries, int64_t head_dim, int64_t block_size) {
    auto grow = [](std::vector<float>& v, int64_t n) { if (static_cast<int64_t>(v.size()) < n) v.resize(n); };
    grow(q, (queries + kScoreTile) * head_dim);  // padded: score_tile16 reads whole tiles
    grow(tile, kScoreTile * 16);
    grow(acc, queries * head_dim);
    grow(max, queries);
    grow(sum, queries);
    grow(key, block_size * head_dim);
    grow(key_t, head_dim * block_size);
    grow(value, block_size * head_dim);
    grow(scores, block_size);
  }
};

// `rows` of a block for one KV head (row t at src + t * stride) as fp32: read in place for
// fp32 caches, else converted into `buffer` (row stride D). Returns the row stride used.
template <typename T>
int64_t rows_as_float(const T* src, int64_t stride, int64_t rows, int64_t D, float* buffer, const float** out) {
  if constexpr (std::is_same_v<T, float>) {
    *out = src;
    return stride;
  } else {
    for (int64_t t = 0; t < rows; ++t) {
      const T* s = src + t * stride;
      float* d = buffer + t * D;
#pragma omp simd
      for (int64_t i = 0; i < D; ++i) d[i] = to_float(s[i]);
    }
    *out = buffer;
    return D;
  }
}

// acc[0:D] = acc * correction + sum_{t < n} p[t] * values[t]. D is walked in chunks of
// kChunk floats held in a local array, so each chunk stays in a register across all n
// keys instead of going through memory once per key.
constexpr int64_t kChunk = 16;
template <int DD>
PAGODA_INLINE void accumulate_values_fixed(float* acc, float correction, const float* p, const float* values,
                                    int64_t stride, int64_t n) {
  float a[DD];  // DD/16 vector registers: independent FMA chains, one per chunk
#pragma omp simd
  for (int i = 0; i < DD; ++i) a[i] = acc[i] * correction;
  for (int64_t t = 0; t < n; ++t) {
    const float pt = p[t];
    const float* vt = values + t * stride;
#pragma omp simd
    for (int i = 0; i < DD; ++i) a[i] += pt * vt[i];
  }
#pragma omp simd
  for (int i = 0; i < DD; ++i) acc[i] = a[i];
}

PAGODA_INLINE void accumulate_values(float* acc, float correction, const float* p, const float* values, int64_t stride,
                              int64_t n, int64_t D) {
  if (D == 64) return accumulate_values_fixed<64>(acc, correction, p, values, stride, n);
  if (D == 128) return accumulate_values_fixed<128>(acc, correction, p, values, stride, n);
  int64_t d0 = 0;
  for (; d0 + kChunk <= D; d0 += kChunk) {
    float chunk[kChunk];
#pragma omp simd
    for (int64_t i = 0; i < kChunk; ++i) chunk[i] = acc[d0 + i] * correction;
    for (int64_t t = 0; t < n; ++t) {
      const float pt = p[t];
      const float* vt = values + t * stride + d0;
#pragma omp simd
      for (int64_t i = 0; i < kChunk; ++i) chunk[i] += pt * vt[i];
    }
#pragma omp simd
    for (int64_t i = 0; i < kChunk; ++i) acc[d0 + i] = chunk[i];
  }
  for (; d0 < D; ++d0) {  // head_dim not a multiple of kChunk: the tail, plainly
    float a = acc[d0] * correction;
    for (int64_t t = 0; t < n; ++t) a += p[t] * values[t * stride + d0];
    acc[d0] = a;
  }
}

// q . k over D floats: 16 lanes of partial sums, then one tree.
PAGODA_INLINE float dot(const float* q, const float* k, int64_t D) {
  float part[16] = {};
  int64_t d0 = 0;
  for (; d0 + 16 <= D; d0 += 16) {
#pragma omp simd
    for (int i = 0; i < 16; ++i) part[i] += q[d0 + i] * k[d0 + i];
  }
  float sum = hsum16(part);
  for (; d0 < D; ++d0) sum += q[d0] * k[d0];
  return sum;
}

// One block of a query's online softmax: scores[0:visible) are its scores. Returns the new
// running max (>= old_max); scores[t] becomes e^(score - new max) (0 past visible), and
// *block_sum their sum.
template <int BS>
PAGODA_INLINE float softmax_block(float* scores, int64_t bs, int64_t visible, float old_max, float* block_sum) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  if constexpr (BS == 16) {
    float masked[16];
#pragma omp simd
    for (int t = 0; t < 16; ++t) masked[t] = t < visible ? scores[t] : kNegInf;
    const float new_max = std::max(old_max, hmax16(masked));  // finite: visible >= 1
    // Three branch-free loops (select, exp, select) so each vectorises to a few instructions.
    float p[16];
#pragma omp simd
    for (int t = 0; t < 16; ++t) p[t] = masked[t] - new_max;  // -inf past visible
#pragma omp simd
    for (int t = 0; t < 16; ++t) p[t] = exp_nonpositive(p[t]);  // clamps -inf to -87
#pragma omp simd
    for (int t = 0; t < 16; ++t) p[t] = t < visible ? p[t] : 0.0f;
#pragma omp simd
    for (int t = 0; t < 16; ++t) scores[t] = p[t];
    *block_sum = hsum16(p);
    return new_max;
  } else {
    float block_max = kNegInf;
    for (int64_t t = 0; t < visible; ++t) block_max = std::max(block_max, scores[t]);
    const float new_max = std::max(old_max, block_max);
    float sum = 0.0f;
    for (int64_t t = 0; t < bs; ++t) {
      const float p = t < visible ? exp_nonpositive(scores[t] - new_max) : 0.0f;
      scores[t] = p;
      sum += p;
    }
    *block_sum = sum;
    return new_max;
  }
}

// Scores of kScoreTile queries (rows of q, D apart) against a block of 16 keys held
// transposed (key_t[d][0:16]): out[j][t]. One accumulator register per query, so the FMA
// chains are independent (a single chain is latency-bound: 4 cycles per FMA).
PAGODA_INLINE void score_tile16(const float* q, const float* key_t, int64_t D, float* out) {
  float acc[kScoreTile][16] = {};
  for (int64_t d = 0; d < D; ++d) {
    const float* kd = key_t + d * 16;
    for (int j = 0; j < kScoreTile; ++j) {
      const float qd = q[j * D + d];
#pragma omp simd
      for (int t = 0; t < 16; ++t) acc[j][t] += qd * kd[t];
    }
  }
  for (int j = 0; j < kScoreTile; ++j)
    for (int t = 0; t < 16; ++t) out[j * 16 + t] = acc[j][t];
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512BF16__)
#define PAGODA_ATTENTION_BF16_SCORES 1
// Scores of M bf16 queries (query m at q + m * D, unscaled) against a block of 16 bf16 keys
// (key t at k + t * stride; keys t >= n read as zero): out[m * 16 + t] = scale * (q_m . k_t),
// for head_dim D = 32 * DC. The keys stay in bf16: vdpbf16ps multiplies pairs exactly and
// leaves one vector of 16 partial sums per key; a shuffle tree then sums the 16 keys' vectors
// at once (45 instructions for 16 dot products, against a horizontal sum each).
// Invariant: a score's summation order depends on nothing but q_m and k_t (not on M, the
// other queries or the block's fill), so a verifying row scores a token exactly as a
// one-token decode does.
template <int DC>
PAGODA_INLINE void score_block16_bf16(const uint16_t* q, int64_t M, const uint16_t* k, int64_t stride, int64_t n,
                                      float scale, float* out) {
  constexpr int64_t D = 32 * DC;
  __m512i keys[16][DC];
  for (int64_t t = 0; t < 16; ++t)
    for (int c = 0; c < DC; ++c)
      keys[t][c] = t < n ? _mm512_loadu_si512(k + t * stride + 32 * c) : _mm512_setzero_si512();
  // Stage s pairs vectors whose lanes hold partial sums of 2^(s-1) keys each (16 / 2^(s-1)
  // lanes per key) into one with half the lanes per key: X takes each key's first half of
  // its lanes, Y the second half, and X + Y keeps the keys in order.
  const __m512i x1 = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23);
  const __m512i y1 = _mm512_setr_epi32(8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  const __m512i x2 = _mm512_setr_epi32(0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27);
  const __m512i y2 = _mm512_setr_epi32(4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
  const __m512i x3 = _mm512_setr_epi32(0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29);
  const __m512i y3 = _mm512_setr_epi32(2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
  const __m512i x4 = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i y4 = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
  auto fold = [](__m512 a, __m512 b, __m512i x, __m512i y) {
    return _mm512_add_ps(_mm512_permutex2var_ps(a, x, b), _mm512_permutex2var_ps(a, y, b));
  };
  for (int64_t m = 0; m < M; ++m) {
    __m512bh qv[DC];
    for (int c = 0; c < DC; ++c) qv[c] = (__m512bh)_mm512_loadu_si512(q + m * D + 32 * c);
    __m512 p[16];
    for (int t = 0; t < 16; ++t) {
      __m512 a = _mm512_setzero_ps();
      for (int c = 0; c < DC; ++c) a = _mm512_dpbf16_ps(a, qv[c], (__m512bh)keys[t][c]);
      p[t] = a;
    }
    __m512 s1[8], s2[4], s3[2];
    for (int i = 0; i < 8; ++i) s1[i] = fold(p[2 * i], p[2 * i + 1], x1, y1);
    for (int i = 0; i < 4; ++i) s2[i] = fold(s1[2 * i], s1[2 * i + 1], x2, y2);
    for (int i = 0; i < 2; ++i) s3[i] = fold(s2[2 * i], s2[2 * i + 1], x3, y3);
    _mm512_storeu_ps(out + m * 16, _mm512_mul_ps(fold(s3[0], s3[1], x4, y4), _mm512_set1_ps(scale)));
  }
}

// acc[m] = acc[m] * correction[m] + sum_{t < n} p[m][t] * v_t for queries m < M (acc [M][D],
// p [M][16], value row t at v + t * stride in bf16; D = 32 * DC). Queries go in groups whose
// accumulators stay in registers while each value row is converted once; a query's sum
// runs over t in order whatever its group, and a weight of 0 (a key the query does not see;
// n never exceeds the block's written keys) adds an exact zero.
template <int DC, int QG>
PAGODA_INLINE void accumulate_group_bf16(float* acc, const float* correction, const float* p, const uint16_t* v,
                                         int64_t stride, int64_t n) {
  constexpr int64_t D = 32 * DC;
  constexpr int VC = 2 * DC;  // fp32 vectors per row
  __m512 a[QG][VC];
  for (int j = 0; j < QG; ++j) {
    const __m512 c = _mm512_set1_ps(correction[j]);
    for (int i = 0; i < VC; ++i) a[j][i] = _mm512_mul_ps(_mm512_loadu_ps(acc + j * D + 16 * i), c);
  }
  for (int64_t t = 0; t < n; ++t) {
    __m512 vt[VC];
    for (int i = 0; i < VC; ++i) {
      const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(v + t * stride + 16 * i));
      vt[i] = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    for (int j = 0; j < QG; ++j) {
      const __m512 pj = _mm512_set1_ps(p[j * 16 + t]);
      for (int i = 0; i < VC; ++i) a[j][i] = _mm512_fmadd_ps(pj, vt[i], a[j][i]);
    }
  }
  for (int j = 0; j < QG; ++j)
    for (int i = 0; i < VC; ++i) _mm512_storeu_ps(acc + j * D + 16 * i, a[j][i]);
}

template <int DC>
PAGODA_INLINE void accumulate_block_bf16(float* acc, const float* correction, const float* p, const uint16_t* v,
                                         int64_t stride, int64_t n, int64_t M) {
  constexpr int64_t D = 32 * DC;
  constexpr int QG = DC == 2 ? 4 : 2;  // 4 * 4 or 2 * 8 accumulator registers
  int64_t m = 0;
  for (; m + QG <= M; m += QG)
    accumulate_group_bf16<DC, QG>(acc + m * D, correction + m, p + m * 16, v, stride, n);
  // The rest in one group too, so each value row is converted once per block, not once per
  // query (a decode of SmolLM2's 3 query heads per KV head: 3 queries, one pass instead of 3).
  const int64_t rest = M - m;  // < QG
  if constexpr (QG > 3) {
    if (rest == 3) return accumulate_group_bf16<DC, 3>(acc + m * D, correction + m, p + m * 16, v, stride, n);
  }
  if constexpr (QG > 2) {
    if (rest == 2) return accumulate_group_bf16<DC, 2>(acc + m * D, correction + m, p + m * 16, v, stride, n);
  }
  if (rest == 1) accumulate_group_bf16<DC, 1>(acc + m * D, correction + m, p + m * 16, v, stride, n);
}
#endif

// Asks for `rows` rows of D elements (row t at src + t * stride) to be brought into cache.
template <typename T>
inline void prefetch_rows(const T* src, int64_t stride, int64_t rows, int64_t D) {
  const int64_t bytes = D * static_cast<int64_t>(sizeof(T));
  for (int64_t t = 0; t < rows; ++t) {
    const char* row = reinterpret_cast<const char*>(src + t * stride);
    for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(row + b);
  }
}

struct Shapes {
  int64_t heads, kv_heads, group, head_dim, block_size, max_blocks;
  int64_t q_stride_token, q_stride_head;
};

// One work item for one KV head. BS > 0 fixes the block size at compile time (so a
// block's scores stay in one vector register); BS == 0 reads it from `shape`.
template <typename T, int BS>
void run_item(const WorkItem& item, int64_t kv_head, const T* q, const T* k_cache, const T* v_cache,
              const int32_t* block_tables, const int32_t* qsl, const int32_t* seq_lens, float scale,
              const Shapes& shape, T* out, float* partial_acc, float* partial_max, float* partial_sum,
              Scratch& scratch) {
  const int64_t D = shape.head_dim, G = shape.group, KVH = shape.kv_heads;
  const int64_t bs = BS > 0 ? BS : shape.block_size;
  const int64_t M = static_cast<int64_t>(item.q_len) * G;  // queries: m = token_in_tile * G + g
  scratch.resize(M, D, bs);
  float* qf = scratch.q.data();
  float* acc = scratch.acc.data();
  float* run_max = scratch.max.data();
  float* run_sum = scratch.sum.data();
  float* key_t = scratch.key_t.data();   // [D][bs]: the block's keys, transposed
  float* value = scratch.value.data();   // [bs][D]
  float* scores = scratch.scores.data();
  float* tile_scores = scratch.tile.data();

  const int64_t row = item.row;
  const int64_t seq_len = seq_lens[row];
  const int64_t q_len_row = qsl[row + 1] - qsl[row];
  const int64_t first_token = qsl[row] + item.q_begin;
  // Keys visible to tile token i: [0, key_limit0 + i) (causal; capped by the item's range).
  const int64_t key_limit0 = seq_len - q_len_row + item.q_begin + 1;

  std::fill(acc, acc + M * D, 0.0f);
  std::fill(run_max, run_max + M, -std::numeric_limits<float>::infinity());
  std::fill(run_sum, run_sum + M, 0.0f);

  const bool transpose = q_len_row > kMaxDotProductTokens;
#ifdef PAGODA_ATTENTION_BF16_SCORES
  // bf16 caches, blocks of 16, head_dim 64 or 128: every row scores whole blocks from bf16
  // (score_block16_bf16) and accumulates values from bf16 rows (accumulate_block_bf16),
  // instead of converting each block to fp32 first (and, for long rows, transposing it).
  // Per query the arithmetic is the same whatever the row's length, so decodes and
  // verifying rows still agree bit for bit; a 512-token prefill's attention took 35 ms
  // instead of 56 (30 layers, 2 threads, Zen 5).
  constexpr bool kBf16Scores = std::is_same_v<T, c10::BFloat16> && BS == 16;
  const bool bf16_scores = kBf16Scores && (D == 64 || D == 128);
  uint16_t* qb = nullptr;  // the queries, unscaled bf16 [M][D]
  float* block_scores = nullptr;  // [M][16]
  if (bf16_scores) {
    scratch.resize_bf16(M, D);
    qb = scratch.q_bf16.data();
    block_scores = scratch.block_scores.data();
    for (int64_t i = 0; i < item.q_len; ++i)
      for (int64_t g = 0; g < G; ++g)
        std::memcpy(qb + (i * G + g) * D,
                    q + (first_token + i) * shape.q_stride_token + (kv_head * G + g) * shape.q_stride_head,
                    D * sizeof(uint16_t));
  }
#else
  constexpr bool kBf16Scores = false;
  const bool bf16_scores = false;
  const uint16_t* qb = nullptr;
  float* block_scores = nullptr;
#endif
  if (!bf16_scores) {  // the fp32 paths' queries, pre-scaled
    for (int64_t i = 0; i < item.q_len; ++i) {
      for (int64_t g = 0; g < G; ++g) {
        const T* src = q + (first_token + i) * shape.q_stride_token + (kv_head * G + g) * shape.q_stride_head;
        float* dst = qf + (i * G + g) * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) dst[d] = to_float(src[d]) * scale;
      }
    }
    std::fill(qf + M * D, qf + (M + kScoreTile) * D, 0.0f);  // the padding queries
  }
  const int32_t* table = block_tables + row * shape.max_blocks;
  const int64_t token_stride = KVH * D;  // between consecutive tokens of a block
  for (int64_t kb = item.kb_begin; kb < item.kb_end; ++kb) {
    const int64_t key0 = kb * bs;
    const int64_t keys_here = std::min<int64_t>(bs, seq_len - key0);
    if (keys_here <= 0) break;
    const int64_t block = table[kb];
    const T* kb_ptr = k_cache + (block * bs * KVH + kv_head) * D;
    const T* vb_ptr = v_cache + (block * bs * KVH + kv_head) * D;
    if (kb + 1 < item.kb_end) {  // blocks are scattered: the hardware prefetcher cannot guess the next
      const int64_t next = table[kb + 1];
      prefetch_rows(k_cache + (next * bs * KVH + kv_head) * D, token_stride, bs, D);
      prefetch_rows(v_cache + (next * bs * KVH + kv_head) * D, token_stride, bs, D);
    }
    // One read of the block's K and V for this KV head, shared by all M queries. Only the
    // first keys_here rows are read: slots past them are stale and never touched.
    const float* keys = nullptr;
    const float* values;
    int64_t k_stride = 0;
    if constexpr (kBf16Scores) {
#ifdef PAGODA_ATTENTION_BF16_SCORES
      if (bf16_scores) {
        const auto* kb16 = reinterpret_cast<const uint16_t*>(kb_ptr);
        if (D == 64) score_block16_bf16<2>(qb, M, kb16, token_stride, keys_here, scale, block_scores);
        else score_block16_bf16<4>(qb, M, kb16, token_stride, keys_here, scale, block_scores);
      }
#endif
    }
    if (!bf16_scores) k_stride = rows_as_float<T>(kb_ptr, token_stride, keys_here, D, scratch.key.data(), &keys);
#ifdef PAGODA_ATTENTION_BF16_SCORES
    if constexpr (kBf16Scores) {
      if (bf16_scores) {
        // Softmax of every query's block scores in place (weights, 0 past its visible keys),
        // then all queries' values in one pass over the block's bf16 rows.
        float* correction = scratch.correction.data();
        int64_t max_visible = 0;
        for (int64_t m = 0; m < M; ++m) {
          const int64_t visible = std::min<int64_t>(keys_here, key_limit0 + m / G - key0);
          float* p = block_scores + m * 16;
          if (visible <= 0) {  // the whole block lies after this query (causal): unchanged
            correction[m] = 1.0f;
            std::fill(p, p + 16, 0.0f);
            continue;
          }
          max_visible = std::max(max_visible, visible);
          float block_sum;
          const float new_max = softmax_block<16>(p, 16, visible, run_max[m], &block_sum);
          correction[m] = run_max[m] == -std::numeric_limits<float>::infinity()
                              ? 0.0f : exp_nonpositive(run_max[m] - new_max);
          run_sum[m] = run_sum[m] * correction[m] + block_sum;
          run_max[m] = new_max;
        }
        const auto* vb16 = reinterpret_cast<const uint16_t*>(vb_ptr);
        if (D == 64) accumulate_block_bf16<2>(acc, correction, block_scores, vb16, token_stride, max_visible, M);
        else accumulate_block_bf16<4>(acc, correction, block_scores, vb16, token_stride, max_visible, M);
        continue;
      }
    }
#endif
    const int64_t v_stride = rows_as_float<T>(vb_ptr, token_stride, keys_here, D, value, &values);
    if (transpose) {  // key_t[d][t]; zero past keys_here so every score is finite
      for (int64_t t = 0; t < bs; ++t) {
        const float* kt = keys + t * k_stride;
        for (int64_t d = 0; d < D; ++d) key_t[d * bs + t] = t < keys_here ? kt[d] : 0.0f;
      }
    }
    for (int64_t m = 0; m < M; ++m) {
      if constexpr (BS == 16) {  // a tile at a time, whatever each query's visibility
        if (transpose && m % kScoreTile == 0) score_tile16(qf + m * D, key_t, D, tile_scores);
      }
      const int64_t visible = std::min<int64_t>(keys_here, key_limit0 + m / G - key0);
      if (visible <= 0) continue;  // the whole block lies after this query (causal)
      const float* qm = qf + m * D;
      if (transpose) {  // scores[0:bs] = q . key_t, vectorised over the block's keys
        if constexpr (BS == 16) {
          std::copy(tile_scores + (m % kScoreTile) * 16, tile_scores + (m % kScoreTile + 1) * 16, scores);
        } else {
#pragma omp simd
          for (int64_t t = 0; t < bs; ++t) scores[t] = 0.0f;
          for (int64_t d = 0; d < D; ++d) {
            const float qd = qm[d];
            const float* kd = key_t + d * bs;
#pragma omp simd
            for (int64_t t = 0; t < bs; ++t) scores[t] += qd * kd[t];
          }
        }
      } else if (bf16_scores) {  // the block's scores, computed above for every query
        for (int64_t t = 0; t < visible; ++t) scores[t] = block_scores[m * 16 + t];
        for (int64_t t = visible; t < bs; ++t) scores[t] = 0.0f;
      } else {  // one dot product per visible key
        for (int64_t t = 0; t < visible; ++t) scores[t] = dot(qm, keys + t * k_stride, D);
        for (int64_t t = visible; t < bs; ++t) scores[t] = 0.0f;
      }
      float block_sum;
      const float new_max = softmax_block<BS>(scores, bs, visible, run_max[m], &block_sum);
      // exp(-inf - finite) = 0 on the first block: the empty accumulator is simply replaced.
      const float correction = run_max[m] == -std::numeric_limits<float>::infinity()
                                   ? 0.0f : exp_nonpositive(run_max[m] - new_max);
      run_sum[m] = run_sum[m] * correction + block_sum;
      run_max[m] = new_max;
      accumulate_values(acc + m * D, correction, scores, values, v_stride, visible, D);
    }
  }

  if (item.partial < 0) {  // the whole row's keys: normalise and write
    for (int64_t m = 0; m < M; ++m) {
      const int64_t i = m / G, g = m % G;
      const float inv = run_sum[m] > 0.0f ? 1.0f / run_sum[m] : 0.0f;
      T* dst = out + (first_token + i) * shape.heads * D + (kv_head * G + g) * D;
      const float* am = acc + m * D;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) dst[d] = from_float<T>(am[d] * inv);
    }
    return;
  }
  // A split decode (M == G): keep the unnormalised sums for the merge.
  const int64_t slot = static_cast<int64_t>(item.partial) * KVH + kv_head;
  std::copy(acc, acc + G * D, partial_acc + slot * G * D);
  std::copy(run_max, run_max + G, partial_max + slot * G);
  std::copy(run_sum, run_sum + G, partial_sum + slot * G);
}

// Merges a split decode row's partial results for one KV head:
//   out = sum_s e^(max_s - M) acc_s / sum_s e^(max_s - M) sum_s, M = max_s max_s.
template <typename T>
void merge_split(const SplitRow& split, int64_t kv_head, const Shapes& shape, const float* partial_acc,
                 const float* partial_max, const float* partial_sum, T* out, std::vector<float>& merged) {
  const int64_t D = shape.head_dim, G = shape.group, KVH = shape.kv_heads;
  if (static_cast<int64_t>(merged.size()) < D) merged.resize(D);
  for (int64_t g = 0; g < G; ++g) {
    float global_max = -std::numeric_limits<float>::infinity();
    for (int64_t s = 0; s < split.num_partials; ++s) {
      const int64_t slot = (split.first_partial + s) * KVH + kv_head;
      if (partial_sum[slot * G + g] > 0.0f) global_max = std::max(global_max, partial_max[slot * G + g]);
    }
    std::fill(merged.begin(), merged.begin() + D, 0.0f);
    float total = 0.0f;
    for (int64_t s = 0; s < split.num_partials; ++s) {
      const int64_t slot = (split.first_partial + s) * KVH + kv_head;
      if (!(partial_sum[slot * G + g] > 0.0f)) continue;  // a range with no visible key
      const float w = exp_nonpositive(partial_max[slot * G + g] - global_max);
      total += w * partial_sum[slot * G + g];
      const float* a = partial_acc + (slot * G + g) * D;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) merged[d] += w * a[d];
    }
    const float inv = total > 0.0f ? 1.0f / total : 0.0f;
    T* dst = out + split.token * shape.heads * D + (kv_head * G + g) * D;
    for (int64_t d = 0; d < D; ++d) dst[d] = from_float<T>(merged[d] * inv);
  }
}

// Indices of `items`, by decreasing work (queries x key blocks).
std::vector<int32_t> costliest_first(const std::vector<WorkItem>& items) {
  std::vector<int32_t> order(items.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = static_cast<int32_t>(i);
  auto cost = [&](int32_t i) { return static_cast<int64_t>(items[i].q_len) * (items[i].kb_end - items[i].kb_begin); };
  std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return cost(a) > cost(b); });
  return order;
}

template <typename T, int BS>
void run_all(const Plan& plan, const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
             const int32_t* block_tables, const int32_t* qsl, const int32_t* seq_lens, double scale,
             const Shapes& shape, at::Tensor& out) {
  const int64_t KVH = shape.kv_heads;
  at::Tensor partial_acc, partial_max, partial_sum;
  float *pacc = nullptr, *pmax = nullptr, *psum = nullptr;
  if (plan.num_partials > 0) {
    const auto f32 = q.options().dtype(at::kFloat);
    partial_acc = at::empty({plan.num_partials, KVH, shape.group, shape.head_dim}, f32);
    partial_max = at::empty({plan.num_partials, KVH, shape.group}, f32);
    partial_sum = at::empty({plan.num_partials, KVH, shape.group}, f32);
    pacc = partial_acc.data_ptr<float>();
    pmax = partial_max.data_ptr<float>();
    psum = partial_sum.data_ptr<float>();
  }
  const T* qp = q.data_ptr<T>();
  const T* kp = k_cache.data_ptr<T>();
  const T* vp = v_cache.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const float fscale = static_cast<float>(scale);
  // Items differ in cost (a causal chunk's last tile sees far more keys than its first),
  // so threads take them from a shared counter, costliest first, instead of each getting a
  // fixed contiguous range: balanced, and robust to a thread losing its core for a while.
  const int64_t num_items = static_cast<int64_t>(plan.items.size()) * KVH;
  const std::vector<int32_t> order = costliest_first(plan.items);
  std::atomic<int64_t> next{0};
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), num_items));
  // With items to spare, a thread takes an item's KV heads together: one KV head's rows of a
  // block share their cache lines' neighbourhood with the other heads' (tokens interleave the
  // heads), so one core reading them all keeps what its prefetchers pull in; heads split
  // between cores had both cores fetching each other's lines.
  const int64_t heads_per_task =
      static_cast<int64_t>(plan.items.size()) >= workers * kItemsPerThread ? KVH : 1;
  const int64_t num_tasks = num_items / heads_per_task;
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    Scratch scratch;
    for (int64_t w = next.fetch_add(1); w < num_tasks; w = next.fetch_add(1)) {
      for (int64_t h = 0; h < heads_per_task; ++h) {
        const int64_t u = w * heads_per_task + h;
        run_item<T, BS>(plan.items[order[u / KVH]], u % KVH, qp, kp, vp, block_tables, qsl, seq_lens, fscale,
                        shape, op, pacc, pmax, psum, scratch);
      }
    }
  });
  if (plan.split_rows.empty()) return;
  const int64_t num_merges = static_cast<int64_t>(plan.split_rows.size()) * KVH;
  at::parallel_for(0, num_merges, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> merged;
    for (int64_t w = begin; w < end; ++w) {
      merge_split<T>(plan.split_rows[w / KVH], w % KVH, shape, pacc, pmax, psum, op, merged);
    }
  });
}

template <typename T>
void dispatch_block_size(const Plan& plan, const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                         const int32_t* tables, const int32_t* qsl, const int32_t* lens, double scale,
                         const Shapes& shape, at::Tensor& out) {
  if (shape.block_size == 16) {
    run_all<T, 16>(plan, q, k_cache, v_cache, tables, qsl, lens, scale, shape, out);
  } else {
    run_all<T, 0>(plan, q, k_cache, v_cache, tables, qsl, lens, scale, shape, out);
  }
}

void paged_attention(at::Tensor out, const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                     const at::Tensor& block_tables, const at::Tensor& query_start_loc,
                     const at::Tensor& seq_lens, double scale, int64_t num_splits) {
  TORCH_CHECK(q.device().is_cpu(), "paged_attention: CPU tensors only");
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.dim() == 4, "paged_attention: q [N,H,D], caches [B,bs,KVH,D]");
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes(), "paged_attention: K and V caches differ in shape");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "paged_attention: caches must be contiguous");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && q.scalar_type() == v_cache.scalar_type() &&
                  out.scalar_type() == q.scalar_type(),
              "paged_attention: q, caches and out must share a dtype");
  TORCH_CHECK(q.stride(2) == 1, "paged_attention: q's head_dim must be contiguous");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && query_start_loc.scalar_type() == at::kInt &&
                  seq_lens.scalar_type() == at::kInt,
              "paged_attention: block_tables, query_start_loc and seq_lens must be int32");
  TORCH_CHECK(block_tables.is_contiguous() && query_start_loc.is_contiguous() && seq_lens.is_contiguous(),
              "paged_attention: index tensors must be contiguous");
  const int64_t N = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t bs = k_cache.size(1), KVH = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == D, "paged_attention: head_dim of q and cache differ");
  TORCH_CHECK(KVH > 0 && H % KVH == 0, "paged_attention: query heads must be a multiple of KV heads");
  TORCH_CHECK(out.is_contiguous() && out.numel() == N * H * D, "paged_attention: out must be contiguous [N, H*D]");
  const int64_t rows = seq_lens.size(0);
  TORCH_CHECK(query_start_loc.size(0) == rows + 1 && block_tables.dim() == 2 && block_tables.size(0) == rows,
              "paged_attention: rows of query_start_loc, seq_lens and block_tables disagree");
  const int32_t* qsl = query_start_loc.data_ptr<int32_t>();
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  const int64_t max_blocks = block_tables.size(1);
  for (int64_t r = 0; r < rows; ++r) {  // out-of-range reads would be silent: refuse them
    const int64_t q_len = qsl[r + 1] - qsl[r];
    TORCH_CHECK(q_len >= 0 && qsl[r] >= 0 && qsl[r + 1] <= N, "paged_attention: bad query_start_loc at row ", r);
    TORCH_CHECK(lens[r] >= q_len && ceil_div(lens[r], bs) <= max_blocks,
                "paged_attention: seq_len ", lens[r], " of row ", r, " does not fit its block table");
  }
  const Shapes shape{H, KVH, H / KVH, D, bs, max_blocks, q.stride(0), q.stride(1)};
  const Plan plan = make_plan(qsl, lens, rows, bs, KVH, at::get_num_threads(), num_splits);
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  switch (q.scalar_type()) {
    case at::kFloat: return dispatch_block_size<float>(plan, q, k_cache, v_cache, tables, qsl, lens, scale, shape, out);
    case at::kBFloat16:
      return dispatch_block_size<c10::BFloat16>(plan, q, k_cache, v_cache, tables, qsl, lens, scale, shape, out);
    case at::kHalf: return dispatch_block_size<c10::Half>(plan, q, k_cache, v_cache, tables, qsl, lens, scale, shape, out);
    default: TORCH_CHECK(false, "paged_attention: dtype ", q.scalar_type(), " is not float32, bfloat16 or float16");
  }
}

// This step's K and V rows into their cache slots: k_cache.view(-1, KVH, D)[slots[i]] = k[i]
// (and V alike), as two index_copy_ calls would, in one call without TensorIterator's
// per-call setup (two index_copy_ per layer were ~2.5% of a 64-row decode step).
// k, v: [N, KVH, D], each token's KVH * D values contiguous (any token stride: views of
// the fused qkv output); slots: int64 [N], each < num_blocks * block_size (checked).
void write_kv(at::Tensor k_cache, at::Tensor v_cache, const at::Tensor& k, const at::Tensor& v,
              const at::Tensor& slots) {
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes() && k_cache.is_contiguous() &&
                  v_cache.is_contiguous(),
              "write_kv: caches must be contiguous [num_blocks, block_size, KVH, D] of one shape");
  const int64_t KVH = k_cache.size(2), D = k_cache.size(3), row = KVH * D;
  const int64_t num_slots = k_cache.size(0) * k_cache.size(1);
  TORCH_CHECK(k.dim() == 3 && v.dim() == 3 && k.size(1) == KVH && k.size(2) == D && v.sizes() == k.sizes(),
              "write_kv: k and v must be [N, KVH, D] matching the caches");
  TORCH_CHECK(k.stride(2) == 1 && k.stride(1) == D && v.stride(2) == 1 && v.stride(1) == D,
              "write_kv: each token's K and V rows must be contiguous");
  TORCH_CHECK(k.scalar_type() == k_cache.scalar_type() && v.scalar_type() == k_cache.scalar_type() &&
                  v_cache.scalar_type() == k_cache.scalar_type(),
              "write_kv: k, v and the caches must share a dtype");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.dim() == 1 && slots.size(0) == k.size(0) &&
                  slots.is_contiguous(),
              "write_kv: slots must be contiguous int64 [N]");
  const int64_t N = k.size(0);
  const int64_t* sp = slots.data_ptr<int64_t>();
  for (int64_t i = 0; i < N; ++i)
    TORCH_CHECK(sp[i] >= 0 && sp[i] < num_slots, "write_kv: slot ", sp[i], " of token ", i, " is outside the cache (",
                num_slots, " slots)");
  const int64_t bytes = row * k.element_size();
  auto* kc = static_cast<char*>(k_cache.data_ptr());
  auto* vc = static_cast<char*>(v_cache.data_ptr());
  const auto* kp = static_cast<const char*>(k.data_ptr());
  const auto* vp = static_cast<const char*>(v.data_ptr());
  const int64_t ks = k.stride(0) * k.element_size(), vs = v.stride(0) * v.element_size();
  at::parallel_for(0, N, 256, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      std::memcpy(kc + sp[i] * bytes, kp + i * ks, bytes);
      std::memcpy(vc + sp[i] * bytes, vp + i * vs, bytes);
    }
  });
}

}  // namespace
}  // namespace pagoda_attention

namespace pagoda {
// For decoder_stack.cpp (same extension): the op without the dispatcher.
void write_kv_direct(at::Tensor k_cache, at::Tensor v_cache, const at::Tensor& k, const at::Tensor& v,
                     const at::Tensor& slots) {
  pagoda_attention::write_kv(std::move(k_cache), std::move(v_cache), k, v, slots);
}
}  // namespace pagoda

TORCH_LIBRARY_FRAGMENT(pagoda, m) {
  m.def("write_kv(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor k, Tensor v, Tensor slots) -> ()",
        &pagoda_attention::write_kv);
  m.def(
      "paged_attention(Tensor(a!) out, Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
      "Tensor query_start_loc, Tensor seq_lens, float scale, int num_splits) -> ()",
      &pagoda_attention::paged_attention);

}
