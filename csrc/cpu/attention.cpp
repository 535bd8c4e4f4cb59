// C++ CPU kernels of the paged two-level attention ops.
//
// One routine does the work: a set of query rows (query tokens x the query heads of one KV
// head) reads one level's keys block by block with an online softmax (running max m, running
// sum l, unnormalised accumulator acc). Decode runs level 0 once per (problem, kv head) for all
// of the problem's sequences, so the prompt's K/V are converted and read once per problem, then
// continues each sequence's state over its own suffix. Prefill gives each row a causal limit.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "attention.h"
#include "common.h"

namespace ttscale {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Running softmax state of `rows` query rows of dimension `dim`.
struct SoftmaxState {
  std::vector<float> m, l, acc;
  SoftmaxState(int64_t rows, int64_t dim) : m(rows, kNegInf), l(rows, 0.f), acc(rows * dim, 0.f) {}
};

// Rows read the keys of one level: tokens [0, level_len) stored in `table`'s blocks, at context
// positions level_pos0 + t. Row r sees a key only when its position is < limit[r].
template <typename E>
void attend_level(const AttentionParams& p, const int32_t* table, int64_t level_len,
                  int64_t level_pos0, int64_t kv_head, const float* q_rows, const int64_t* limit,
                  int64_t rows, SoftmaxState& st, std::vector<float>& kbuf,
                  std::vector<float>& vbuf, std::vector<float>& scores) {
  using S = typename E::storage;
  const int64_t D = p.head_dim, BS = p.block_size, Hkv = p.num_kv_heads;
  const S* kc = as_ptr<const S>(p.k_cache);
  const S* vc = as_ptr<const S>(p.v_cache);
  for (int64_t start = 0; start < level_len; start += BS) {
    const int64_t n = std::min(BS, level_len - start);
    const int64_t block = table[start / BS];
    // Convert this block's K/V rows once for every query row.
    for (int64_t t = 0; t < n; ++t) {
      const int64_t base = ((block * BS + t) * Hkv + kv_head) * D;
      for (int64_t d = 0; d < D; ++d) {
        kbuf[t * D + d] = E::load(kc[base + d]);
        vbuf[t * D + d] = E::load(vc[base + d]);
      }
    }
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t visible = std::min<int64_t>(n, limit[r] - (level_pos0 + start));
      if (visible <= 0) continue;
      const float* qr = q_rows + r * D;
      float block_max = kNegInf;
      for (int64_t t = 0; t < visible; ++t) {
        float s = 0.f;
        const float* kt = &kbuf[t * D];
        for (int64_t d = 0; d < D; ++d) s += qr[d] * kt[d];
        scores[t] = s;
        block_max = std::max(block_max, s);
      }
      const float m_new = std::max(st.m[r], block_max);
      const float alpha = st.m[r] == kNegInf ? 0.f : std::exp(st.m[r] - m_new);
      float* acc = &st.acc[r * D];
      float sum = 0.f;
      for (int64_t d = 0; d < D; ++d) acc[d] *= alpha;
      for (int64_t t = 0; t < visible; ++t) {
        const float w = std::exp(scores[t] - m_new);
        sum += w;
        const float* vt = &vbuf[t * D];
        for (int64_t d = 0; d < D; ++d) acc[d] += w * vt[d];
      }
      st.l[r] = st.l[r] * alpha + sum;
      st.m[r] = m_new;
    }
  }
}

// out = acc / l and lse = m + log(l) (natural log, in units of the scaled scores); a row that saw
// nothing gets 0 and -inf.
template <typename E>
void finish_row(const SoftmaxState& st, int64_t r, int64_t D, typename E::storage* out,
                float* lse) {
  if (st.l[r] == 0.f) {
    for (int64_t d = 0; d < D; ++d) out[d] = E::store(0.f);
    *lse = kNegInf;
    return;
  }
  const float inv = 1.f / st.l[r];
  for (int64_t d = 0; d < D; ++d) out[d] = E::store(st.acc[r * D + d] * inv);
  *lse = st.m[r] + std::log(st.l[r]);
}

// Query rows are pre-scaled so that q.k is the scaled score.
template <typename E>
void load_scaled(const typename E::storage* src, float scale, int64_t D, float* dst) {
  for (int64_t d = 0; d < D; ++d) dst[d] = E::load(src[d]) * scale;
}

// Sequences of one problem are taken this many at a time for the level-0 pass: large enough to
// amortise the prompt read, small enough that the rows' accumulators stay in cache.
constexpr int64_t kSeqsPerTile = 16;

template <typename E>
void decode_impl(const AttentionParams& p) {
  using S = typename E::storage;
  const int64_t B = p.num_seqs, Hq = p.num_q_heads, Hkv = p.num_kv_heads, D = p.head_dim;
  const int64_t G = Hq / Hkv, BS = p.block_size;
  const S* q = as_ptr<const S>(p.q);
  S* out = as_ptr<S>(p.out);
  float* lse = as_ptr<float>(p.lse);
  const int32_t* prompt_tables = as_ptr<const int32_t>(p.prompt_block_tables);
  const int32_t* prompt_lens = as_ptr<const int32_t>(p.prompt_lens);
  const int32_t* suffix_tables = as_ptr<const int32_t>(p.suffix_block_tables);
  const int32_t* suffix_lens = as_ptr<const int32_t>(p.suffix_lens);
  const int32_t* order = as_ptr<const int32_t>(p.seq_order);
  const int32_t* starts = as_ptr<const int32_t>(p.problem_starts);
  TTSCALE_CHECK(order != nullptr && starts != nullptr, "cascade decode needs a plan");

  // Level-0 state per (sequence, query head), handed to the level-1 pass.
  std::vector<float> m0(B * Hq, kNegInf), l0(B * Hq, 0.f), acc0(B * Hq * D, 0.f);

  // Work items of level 0: (problem, tile of its sequences, kv head).
  std::vector<int64_t> item_problem, item_first;
  for (int64_t prob = 0; prob < p.num_problems; ++prob) {
    for (int64_t i = starts[prob]; i < starts[prob + 1]; i += kSeqsPerTile) {
      item_problem.push_back(prob);
      item_first.push_back(i);
    }
  }
  const int64_t items = static_cast<int64_t>(item_problem.size()) * Hkv;

#pragma omp parallel
  {
    std::vector<float> kbuf(BS * D), vbuf(BS * D), scores(BS), q_rows(kSeqsPerTile * G * D);
    std::vector<int64_t> limit(kSeqsPerTile * G, std::numeric_limits<int64_t>::max());
#pragma omp for schedule(dynamic)
    for (int64_t item = 0; item < items; ++item) {
      const int64_t tile = item / Hkv, h = item % Hkv;
      const int64_t prob = item_problem[tile], first = item_first[tile];
      const int64_t nseq = std::min<int64_t>(kSeqsPerTile, starts[prob + 1] - first);
      const int64_t rows = nseq * G;
      for (int64_t i = 0; i < nseq; ++i) {
        const int64_t b = order[first + i];
        for (int64_t g = 0; g < G; ++g)
          load_scaled<E>(q + (b * Hq + h * G + g) * D, p.scale, D, &q_rows[(i * G + g) * D]);
      }
      SoftmaxState st(rows, D);
      attend_level<E>(p, prompt_tables + prob * p.max_prompt_blocks, prompt_lens[prob], 0, h,
                      q_rows.data(), limit.data(), rows, st, kbuf, vbuf, scores);
      for (int64_t i = 0; i < nseq; ++i) {
        const int64_t b = order[first + i];
        for (int64_t g = 0; g < G; ++g) {
          const int64_t r = i * G + g, row = b * Hq + h * G + g;
          m0[row] = st.m[r];
          l0[row] = st.l[r];
          std::copy(&st.acc[r * D], &st.acc[r * D] + D, &acc0[row * D]);
        }
      }
    }

    // Level 1: each sequence continues its own state over its suffix.
#pragma omp for schedule(dynamic)
    for (int64_t item = 0; item < B * Hkv; ++item) {
      const int64_t b = item / Hkv, h = item % Hkv;
      SoftmaxState st(G, D);
      for (int64_t g = 0; g < G; ++g) {
        const int64_t row = b * Hq + h * G + g;
        load_scaled<E>(q + row * D, p.scale, D, &q_rows[g * D]);
        st.m[g] = m0[row];
        st.l[g] = l0[row];
        std::copy(&acc0[row * D], &acc0[row * D] + D, &st.acc[g * D]);
      }
      attend_level<E>(p, suffix_tables + b * p.max_suffix_blocks, suffix_lens[b], 0, h,
                      q_rows.data(), limit.data(), G, st, kbuf, vbuf, scores);
      for (int64_t g = 0; g < G; ++g) {
        const int64_t row = b * Hq + h * G + g;
        finish_row<E>(st, g, D, out + row * D, lse + row);
      }
    }
  }
}

// Query tokens of one sequence taken together in prefill.
constexpr int64_t kQueriesPerTile = 16;

template <typename E>
void prefill_impl(const AttentionParams& p) {
  using S = typename E::storage;
  const int64_t B = p.num_seqs, Hq = p.num_q_heads, Hkv = p.num_kv_heads, D = p.head_dim;
  const int64_t G = Hq / Hkv, BS = p.block_size;
  const S* q = as_ptr<const S>(p.q);
  S* out = as_ptr<S>(p.out);
  float* lse = as_ptr<float>(p.lse);
  const int32_t* prompt_tables = as_ptr<const int32_t>(p.prompt_block_tables);
  const int32_t* prompt_lens = as_ptr<const int32_t>(p.prompt_lens);
  const int32_t* problem_ids = as_ptr<const int32_t>(p.problem_ids);
  const int32_t* suffix_tables = as_ptr<const int32_t>(p.suffix_block_tables);
  const int32_t* suffix_lens = as_ptr<const int32_t>(p.suffix_lens);
  const int32_t* q_starts = as_ptr<const int32_t>(p.q_starts);

  std::vector<int64_t> item_seq, item_first;
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t i = q_starts[b]; i < q_starts[b + 1]; i += kQueriesPerTile) {
      item_seq.push_back(b);
      item_first.push_back(i);
    }
  }
  const int64_t items = static_cast<int64_t>(item_seq.size()) * Hkv;

#pragma omp parallel
  {
    std::vector<float> kbuf(BS * D), vbuf(BS * D), scores(BS), q_rows(kQueriesPerTile * G * D);
    std::vector<int64_t> limit(kQueriesPerTile * G);
#pragma omp for schedule(dynamic)
    for (int64_t item = 0; item < items; ++item) {
      const int64_t tile = item / Hkv, h = item % Hkv;
      const int64_t b = item_seq[tile], first = item_first[tile];
      const int64_t prob = problem_ids[b];
      const int64_t prompt_len = prompt_lens[prob], suffix_len = suffix_lens[b];
      const int64_t context = prompt_len + suffix_len;
      const int64_t q_len = q_starts[b + 1] - q_starts[b];
      const int64_t nq = std::min<int64_t>(kQueriesPerTile, q_starts[b + 1] - first);
      const int64_t rows = nq * G;
      for (int64_t i = 0; i < nq; ++i) {
        // Query i of this tile sits at context position context - q_len + (first + i - start).
        const int64_t pos = context - q_len + (first + i - q_starts[b]);
        for (int64_t g = 0; g < G; ++g) {
          load_scaled<E>(q + ((first + i) * Hq + h * G + g) * D, p.scale, D,
                         &q_rows[(i * G + g) * D]);
          limit[i * G + g] = pos + 1;
        }
      }
      SoftmaxState st(rows, D);
      attend_level<E>(p, prompt_tables + prob * p.max_prompt_blocks, prompt_len, 0, h,
                      q_rows.data(), limit.data(), rows, st, kbuf, vbuf, scores);
      attend_level<E>(p, suffix_tables + b * p.max_suffix_blocks, suffix_len, prompt_len, h,
                      q_rows.data(), limit.data(), rows, st, kbuf, vbuf, scores);
      for (int64_t i = 0; i < nq; ++i) {
        for (int64_t g = 0; g < G; ++g) {
          const int64_t row = (first + i) * Hq + h * G + g;
          finish_row<E>(st, i * G + g, D, out + row * D, lse + row);
        }
      }
    }
  }
}

template <typename E>
void merge_impl(const MergeParams& p) {
  using S = typename E::storage;
  const S* o_a = as_ptr<const S>(p.o_a);
  const S* o_b = as_ptr<const S>(p.o_b);
  const float* lse_a = as_ptr<const float>(p.lse_a);
  const float* lse_b = as_ptr<const float>(p.lse_b);
  S* out = as_ptr<S>(p.out);
  float* lse = as_ptr<float>(p.lse);
  const int64_t n = p.rows * p.heads, D = p.head_dim;
#pragma omp parallel for
  for (int64_t i = 0; i < n; ++i) {
    const float a = lse_a[i], b = lse_b[i];
    const float m = std::max(a, b);
    // Weights relative to the larger side: an empty side (-inf) gets weight exactly 0.
    const float wa = a == kNegInf ? 0.f : std::exp(a - m);
    const float wb = b == kNegInf ? 0.f : std::exp(b - m);
    const float total = wa + wb;
    if (total == 0.f) {
      for (int64_t d = 0; d < D; ++d) out[i * D + d] = E::store(0.f);
      lse[i] = kNegInf;
      continue;
    }
    const float ca = wa / total, cb = wb / total;
    // A side of weight 0 is not read at all, so its output cannot leak in (even as NaN).
    for (int64_t d = 0; d < D; ++d) {
      float x = 0.f;
      if (wa != 0.f) x += ca * E::load(o_a[i * D + d]);
      if (wb != 0.f) x += cb * E::load(o_b[i * D + d]);
      out[i * D + d] = E::store(x);
    }
    lse[i] = m + std::log(total);
  }
}

}  // namespace

void cascade_decode_attention_cpu(const AttentionParams& p) {
  dispatch_dtype(p.dtype, [&](auto e) { decode_impl<decltype(e)>(p); });
}

void paged_prefill_attention_cpu(const AttentionParams& p) {
  dispatch_dtype(p.dtype, [&](auto e) { prefill_impl<decltype(e)>(p); });
}

void merge_attention_states_cpu(const MergeParams& p) {
  dispatch_dtype(p.dtype, [&](auto e) { merge_impl<decltype(e)>(p); });
}

void write_kv_cpu(const WriteKVParams& p) {
  const int64_t row = p.num_kv_heads * p.head_dim;
  const int64_t elem = p.dtype == static_cast<int>(DType::kFloat32) ? 4 : 2;
  const int64_t* slots = as_ptr<const int64_t>(p.slots);
  char* kc = as_ptr<char>(p.k_cache);
  char* vc = as_ptr<char>(p.v_cache);
  const char* k = as_ptr<const char>(p.k);
  const char* v = as_ptr<const char>(p.v);
#pragma omp parallel for
  for (int64_t i = 0; i < p.num_rows; ++i) {
    const int64_t slot = slots[i];
    if (slot < 0) continue;  // padded row
    std::memcpy(kc + slot * row * elem, k + i * row * elem, row * elem);
    std::memcpy(vc + slot * row * elem, v + i * row * elem, row * elem);
  }
}

}  // namespace ttscale
