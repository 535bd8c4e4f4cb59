// C++ CPU kernels of the paged two-level attention ops but decode (cascade_decode.cpp): prefill,
// the merge of two states, write_kv.
//
// One routine does prefill's work: a set of query rows (query tokens x the query heads of one KV
// head) reads one level's keys block by block with an online softmax (running max m, running
// sum l, unnormalised accumulator acc), each row with a causal limit.
#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "attention.h"
#include "common.h"
#include "cpu/lanes.h"

namespace ttscale {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Copies and merges smaller than this run on the calling thread: a decode step writes a few KB
// per layer, and an OpenMP fork and barrier costs more than that copy (much more when the cores
// are shared and a spinning thread is descheduled).
constexpr int64_t kParallelBytes = int64_t{1} << 20;

// Running softmax state of `rows` query rows of dimension `dim`.
struct SoftmaxState {
  std::vector<float> m, l, acc;
  SoftmaxState(int64_t rows, int64_t dim) : m(rows, kNegInf), l(rows, 0.f), acc(rows * dim, 0.f) {}
};

// s[i * s_stride + t] = q_i . k_t for R rows q_i = q + i * D and the keys t < n of a block held
// transposed, kt[d * k_stride + t] (both strides multiples of kLanes). A multiply-add waits for
// the one before it in its chain, so each row keeps two partial sums (even and odd d) and R
// rows run together: 2R independent chains, and each key vector loaded once for R rows.
template <int64_t R>
inline void block_scores(const float* q, int64_t D, const float* kt, int64_t k_stride, int64_t n,
                         float* s, int64_t s_stride) {
  for (int64_t t0 = 0; t0 < n; t0 += kLanes) {
    Lanes even[R] = {}, odd[R] = {};
    int64_t d = 0;
    for (; d + 1 < D; d += 2) {
      const Lanes k0 = load_lanes(kt + d * k_stride + t0);
      const Lanes k1 = load_lanes(kt + (d + 1) * k_stride + t0);
      for (int64_t i = 0; i < R; ++i) {
        even[i] += q[i * D + d] * k0;
        odd[i] += q[i * D + d + 1] * k1;
      }
    }
    if (d < D) {
      const Lanes k0 = load_lanes(kt + d * k_stride + t0);
      for (int64_t i = 0; i < R; ++i) even[i] += q[i * D + d] * k0;
    }
    for (int64_t i = 0; i < R; ++i) store_lanes(s + i * s_stride + t0, even[i] + odd[i]);
  }
}

// acc[d] = alpha acc[d] + sum over t < n of w[t] v[t * v_stride + d]; four kLanes-wide slices of
// d at a time, so that four chains of multiply-adds run together.
inline void block_values(const float* w, const float* v, int64_t v_stride, int64_t D, int64_t n,
                         float alpha, float* acc) {
  int64_t d0 = 0;
  for (; d0 + 4 * kLanes <= D; d0 += 4 * kLanes) {
    Lanes a[4];
    for (int64_t c = 0; c < 4; ++c) a[c] = alpha * load_lanes(acc + d0 + c * kLanes);
    for (int64_t t = 0; t < n; ++t) {
      for (int64_t c = 0; c < 4; ++c) a[c] += w[t] * load_lanes(v + t * v_stride + d0 + c * kLanes);
    }
    for (int64_t c = 0; c < 4; ++c) store_lanes(acc + d0 + c * kLanes, a[c]);
  }
  for (; d0 + kLanes <= D; d0 += kLanes) {
    Lanes a = alpha * load_lanes(acc + d0);
    for (int64_t t = 0; t < n; ++t) a += w[t] * load_lanes(v + t * v_stride + d0);
    store_lanes(acc + d0, a);
  }
  for (; d0 < D; ++d0) {  // head dims that are not a multiple of kLanes
    float a = acc[d0] * alpha;
    for (int64_t t = 0; t < n; ++t) a += w[t] * v[t * v_stride + d0];
    acc[d0] = a;
  }
}

// s[t] = q . k_t for one query row and keys read in place, k_t = k + t * k_stride (an fp32 cache):
// a row or two (prefill of one token with a small GQA group) do not amortise attend_level's
// transposed copy of a block.
inline void direct_scores(const float* q, int64_t D, const float* k, int64_t k_stride, int64_t n,
                          float* s) {
  for (int64_t t = 0; t < n; ++t) {
    const float* kt = k + t * k_stride;
    Lanes a = {}, b = {};
    int64_t d = 0;
    for (; d + 2 * kLanes <= D; d += 2 * kLanes) {
      a += load_lanes(q + d) * load_lanes(kt + d);
      b += load_lanes(q + d + kLanes) * load_lanes(kt + d + kLanes);
    }
    for (; d + kLanes <= D; d += kLanes) a += load_lanes(q + d) * load_lanes(kt + d);
    a += b;
    float sum = 0.f;
    for (int64_t i = 0; i < kLanes; ++i) sum += a[i];
    for (; d < D; ++d) sum += q[d] * kt[d];
    s[t] = sum;
  }
}

// Rows scored together by block_scores.
constexpr int64_t kRowGroup = 4;

// Row r's online softmax takes in the scores s[0, visible) of a block (overwritten with their
// weights) and the values v + t * v_stride.
inline void update_row(SoftmaxState& st, int64_t r, float* s, int64_t visible, const float* v,
                       int64_t v_stride, int64_t D) {
  float block_max = kNegInf;
  for (int64_t t = 0; t < visible; ++t) block_max = std::max(block_max, s[t]);
  const float m_new = std::max(st.m[r], block_max);
  const float alpha = st.m[r] == kNegInf ? 0.f : std::exp(st.m[r] - m_new);
  float sum = 0.f;
  for (int64_t t = 0; t < visible; ++t) {
    s[t] = exp_nonpositive(s[t] - m_new);
    sum += s[t];
  }
  block_values(s, v, v_stride, D, visible, alpha, &st.acc[r * D]);
  st.l[r] = st.l[r] * alpha + sum;
  st.m[r] = m_new;
}

// Rows read the keys of one level: tokens [0, level_len) stored in `table`'s blocks, at context
// positions level_pos0 + t. Row r sees a key only when its position is < limit[r]. A block's
// keys are converted once for every row, into kbuf transposed ([D][block_size rounded up to
// kLanes]), so that scores are vector multiply-adds across keys, not a dot product (and a
// horizontal sum) per key. kbuf, vbuf and scores are sized by AttentionBuffers.
template <typename E>
void attend_level(const AttentionParams& p, const int32_t* table, int64_t level_len,
                  int64_t level_pos0, int64_t kv_head, const float* q_rows, const int64_t* limit,
                  int64_t rows, SoftmaxState& st, std::vector<float>& kbuf,
                  std::vector<float>& vbuf, std::vector<float>& scores) {
  using S = typename E::storage;
  const int64_t D = p.head_dim, BS = p.block_size, Hkv = p.num_kv_heads;
  const int64_t stride = round_up_lanes(BS);
  const S* kc = as_ptr<const S>(p.k_cache);
  const S* vc = as_ptr<const S>(p.v_cache);
  float* kt = kbuf.data();
  if constexpr (std::is_same_v<S, float>) {
    if (rows < kRowGroup) {  // read the fp32 cache in place: see direct_scores
      const int64_t token_stride = Hkv * D;
      for (int64_t start = 0; start < level_len; start += BS) {
        const int64_t n = std::min(BS, level_len - start);
        const int64_t base = (table[start / BS] * BS * Hkv + kv_head) * D;
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t visible = std::min<int64_t>(n, limit[r] - (level_pos0 + start));
          if (visible <= 0) continue;
          direct_scores(q_rows + r * D, D, kc + base, token_stride, visible, scores.data());
          update_row(st, r, scores.data(), visible, vc + base, token_stride, D);
        }
      }
      return;
    }
  }
  for (int64_t start = 0; start < level_len; start += BS) {
    const int64_t n = std::min(BS, level_len - start);
    const int64_t block = table[start / BS];
    for (int64_t t = 0; t < n; ++t) {
      const int64_t base = ((block * BS + t) * Hkv + kv_head) * D;
      for (int64_t d = 0; d < D; ++d) {
        kt[d * stride + t] = E::load(kc[base + d]);
        vbuf[t * D + d] = E::load(vc[base + d]);
      }
    }
    for (int64_t r0 = 0; r0 < rows; r0 += kRowGroup) {
      const int64_t group = std::min(kRowGroup, rows - r0);
      if (group == kRowGroup) {
        block_scores<kRowGroup>(q_rows + r0 * D, D, kt, stride, n, scores.data(), stride);
      } else {
        for (int64_t i = 0; i < group; ++i)
          block_scores<1>(q_rows + (r0 + i) * D, D, kt, stride, n, &scores[i * stride], stride);
      }
      for (int64_t i = 0; i < group; ++i) {
        const int64_t r = r0 + i;
        const int64_t visible = std::min<int64_t>(n, limit[r] - (level_pos0 + start));
        if (visible > 0) update_row(st, r, &scores[i * stride], visible, vbuf.data(), D, D);
      }
    }
  }
}

// Per-thread scratch of attend_level: a block's keys (transposed, padded), values, scores.
struct AttentionBuffers {
  std::vector<float> kbuf, vbuf, scores;
  AttentionBuffers(int64_t block_size, int64_t head_dim)
      : kbuf(round_up_lanes(block_size) * head_dim, 0.f),
        vbuf(block_size * head_dim, 0.f),
        scores(kRowGroup * round_up_lanes(block_size), 0.f) {}
};

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
    AttentionBuffers buf(BS, D);
    auto& [kbuf, vbuf, scores] = buf;
    std::vector<float> q_rows(kQueriesPerTile * G * D);
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
#pragma omp parallel for if (n * D * static_cast<int64_t>(sizeof(S)) >= kParallelBytes)
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
#pragma omp parallel for if (p.num_rows * row * elem >= kParallelBytes)
  for (int64_t i = 0; i < p.num_rows; ++i) {
    const int64_t slot = slots[i];
    if (slot < 0) continue;  // padded row
    std::memcpy(kc + slot * row * elem, k + i * row * elem, row * elem);
    std::memcpy(vc + slot * row * elem, v + i * row * elem, row * elem);
  }
}

}  // namespace ttscale
