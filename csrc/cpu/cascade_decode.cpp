// The C++ CPU kernel of cascade_decode_attention: one query token per sequence, keys in two
// levels (the problem's shared prompt, then the sequence's own suffix), online softmax.
//
// Level 0, the prompt, is a small matrix product per problem (Hydragen's observation): all of a
// problem's query rows (its sequences x the GQA group of a kv head, up to kItemRows) against the
// prompt's keys, kChunkKeys keys at a time. The rows are the vector lanes: a key's element is
// broadcast and multiplied into 16 rows at once, so keys and values are read in place from the
// paged cache (no transposed copy), the softmax's max, exp and rescale run 16 rows per
// instruction, and register tiles of 6 keys x 64 rows (scores) and 6 dims x 64 rows (values) do
// 24 multiply-adds per 10 loads, as a matrix product's inner kernel does. A prompt with fewer
// work items than kMinPromptItems is split into key ranges, whose partial states level 1 merges.
//
// Level 1, the suffix, is read by only the G query rows of each kv head, so it is bound by
// memory, not arithmetic: the head dim is the lanes, a token's keys for all of a work item's kv
// heads are read together (contiguous in the cache, so each page streams in address order), 16
// (row, key) dot products are summed across lanes in one transpose-and-add tree, and the values
// are added into 4 rows at a time, each value vector loaded once for the 4.
#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

#ifdef TTSCALE_WITH_OPENMP
#include <omp.h>
#endif

#include "attention.h"
#include "common.h"
#include "cpu/lanes.h"

namespace ttscale {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Keys per step of the online softmax: the scores of a 64-row tile (about 16 KB) stay in L1
// beside the register tiles' operands.
constexpr int64_t kChunkKeys = 64;
// Level 0: row vectors of a register tile (64 rows); keys of a score tile; dims of a value tile.
constexpr int kTileVecs = 4;
constexpr int64_t kTileRows = kTileVecs * kLanes;
constexpr int kScoreKeys = 6;
constexpr int kValueDims = 6;
// Rows of one level-0 work item: its state (head dim x 256 floats of queries and accumulators,
// 256 KB at head dim 128) stays in L2 while the prompt streams past it.
constexpr int64_t kItemRows = 256;
// A prompt is split into key ranges only while each range keeps at least this many keys.
constexpr int64_t kMinSplitKeys = 256;
// Level 0 splits prompts until it has this many work items (enough for 16 threads). The split
// depends on the shapes only, never on the thread count, so results are the same bits on any
// number of threads (a split changes the order of the sums).
constexpr int64_t kMinPromptItems = 16;

// The tokens [begin, begin + n) of one level as row pointers, each at head_offset in its token
// and `width` elements wide (one kv head or several adjacent ones): an fp32 cache is read in
// place unless `pack`; a 16-bit one is converted into buf ([n][width]). Level 0 packs when it
// has several 64-row tiles, which read a chunk's rows once each: in place, one kv head's rows lie
// Hkv * D apart, on a few of L1's sets (measured: 10-20% faster at N=64; with one tile the copy
// costs more than it saves, 5-10% at N=16). rows[n, padded) repeat the last token, so that tiles
// never run out of keys (their scores are computed and dropped).
template <typename E>
void gather_rows(const typename E::storage* cache, const int32_t* table, int64_t block_size,
                 int64_t token_stride, int64_t head_offset, int64_t begin, int64_t n,
                 int64_t padded, int64_t width, float* buf, const float** rows,
                 bool pack = false) {
  using S = typename E::storage;
  for (int64_t t = 0; t < n; ++t) {
    const int64_t pos = begin + t;
    const S* src = cache + (table[pos / block_size] * block_size + pos % block_size) *
                               token_stride + head_offset;
    if (std::is_same_v<S, float> && !pack) {
      rows[t] = reinterpret_cast<const float*>(src);
    } else {
      for (int64_t d = 0; d < width; ++d) buf[t * width + d] = E::load(src[d]);
      rows[t] = buf + t * width;
    }
  }
  for (int64_t t = n; t < padded; ++t) rows[t] = rows[n - 1];
}

// The lines of one kv head's key and value rows of the tokens [begin, begin + n), asked for ahead
// of their use a few at a time: level 0 asks for the next chunk's between the register tiles of
// this one. A row is D elements every Hkv * D and pages are scattered, so the hardware
// prefetchers see no stream; 2 x 64 rows asked for at once would hold the core's few fill
// buffers while the tiles load (in the measurements here the two were within the noise).
struct ChunkPrefetch {
  const char* rows[2 * kChunkKeys];
  int64_t num_rows = 0, row_bytes = 0, row = 0, byte = 0, per_step = 0;

  template <typename S>
  void assign(const S* kc, const S* vc, const int32_t* table, int64_t block_size,
              int64_t token_stride, int64_t head_offset, int64_t begin, int64_t n, int64_t D,
              int64_t steps) {
    num_rows = 0;
    for (int64_t t = 0; t < n; ++t) {
      const int64_t pos = begin + t;
      const int64_t at = (table[pos / block_size] * block_size + pos % block_size) * token_stride +
                         head_offset;
      rows[num_rows++] = reinterpret_cast<const char*>(kc + at);
      rows[num_rows++] = reinterpret_cast<const char*>(vc + at);
    }
    row_bytes = D * static_cast<int64_t>(sizeof(S));
    row = byte = 0;
    per_step = ((row_bytes + 63) / 64 * num_rows + steps - 1) / std::max<int64_t>(1, steps);
  }
  // Asks for the next per_step lines (all that are left if `all`), into L2.
  void step(bool all = false) {
    for (int64_t i = 0; (all || i < per_step) && row < num_rows; ++i) {
      __builtin_prefetch(rows[row] + byte, 0, 2);
      byte += 64;
      if (byte >= row_bytes) byte = 0, ++row;
    }
  }
};

// ---------------------------------------------------------------------------------------------
// Level 0: rows as lanes. qt and ot are [row tiles][D][kTileRows] (PromptState::at): a tile's
// operands are contiguous, where one [D][kItemRows] array put a tile's rows of successive dims
// 1 KB apart, on a quarter of L1's sets.

// s[kt * kTileRows + r] = q_r . k_kt for KT keys and RV * 16 rows.
template <int KT, int RV>
inline void prompt_scores(const float* qt, int64_t stride, const float* const* k, int64_t D,
                          float* s) {
  Lanes acc[KT][RV] = {};
  for (int64_t d = 0; d < D; ++d) {
    Lanes q[RV];
    for (int rv = 0; rv < RV; ++rv) q[rv] = load_lanes(qt + d * stride + rv * kLanes);
    for (int kt = 0; kt < KT; ++kt) {
      const float key = k[kt][d];
      for (int rv = 0; rv < RV; ++rv) acc[kt][rv] += key * q[rv];
    }
  }
  for (int kt = 0; kt < KT; ++kt) {
    for (int rv = 0; rv < RV; ++rv) store_lanes(s + kt * kTileRows + rv * kLanes, acc[kt][rv]);
  }
}

// ot[d][r] = alpha_r ot[d][r] + sum over t < n of w[t][r] v_t[d], for DT dims from d0.
template <int DT, int RV>
inline void prompt_values(const float* w, const float* const* v, int64_t n, int64_t d0,
                          const Lanes* alpha, float* ot, int64_t stride) {
  Lanes acc[DT][RV];
  for (int dd = 0; dd < DT; ++dd) {
    for (int rv = 0; rv < RV; ++rv)
      acc[dd][rv] = alpha[rv] * load_lanes(ot + (d0 + dd) * stride + rv * kLanes);
  }
  for (int64_t t = 0; t < n; ++t) {
    Lanes weight[RV];
    for (int rv = 0; rv < RV; ++rv) weight[rv] = load_lanes(w + t * kTileRows + rv * kLanes);
    for (int dd = 0; dd < DT; ++dd) {
      const float value = v[t][d0 + dd];
      for (int rv = 0; rv < RV; ++rv) acc[dd][rv] += value * weight[rv];
    }
  }
  for (int dd = 0; dd < DT; ++dd) {
    for (int rv = 0; rv < RV; ++rv)
      store_lanes(ot + (d0 + dd) * stride + rv * kLanes, acc[dd][rv]);
  }
}

// One level-0 work item's rows: queries (scaled, transposed), accumulators, max and sum.
struct PromptState {
  int64_t D;
  std::vector<float> qt, ot, m, l;
  PromptState(int64_t head_dim)
      : D(head_dim), qt(D * kItemRows), ot(D * kItemRows), m(kItemRows), l(kItemRows) {}
  // Index of row r, dim d in qt and ot; a tile starting at row r0 starts at r0 * D.
  int64_t at(int64_t r, int64_t d) const {
    return (r / kTileRows) * D * kTileRows + d * kTileRows + r % kTileRows;
  }
};

// The rows [r0, r0 + RV * 16) take in n keys and values: scores into s ([n][kTileRows]), the
// online softmax turns them into weights, the weights times the values into ot.
template <int RV>
void prompt_tile(PromptState& st, int64_t r0, const float* const* k, const float* const* v,
                 int64_t n, int64_t D, float* s, ChunkPrefetch& ahead) {
  const float* qt = st.qt.data() + r0 * D;
  for (int64_t t0 = 0; t0 < n; t0 += kScoreKeys) {
    prompt_scores<kScoreKeys, RV>(qt, kTileRows, k + t0, D, s + t0 * kTileRows);
    ahead.step();
  }
  Lanes alpha[RV];
  for (int rv = 0; rv < RV; ++rv) {
    float* s_rv = s + rv * kLanes;
    Lanes block_max = load_lanes(s_rv);
    for (int64_t t = 1; t < n; ++t)
      block_max = max_lanes(block_max, load_lanes(s_rv + t * kTileRows));
    const Lanes m_old = load_lanes(&st.m[r0 + rv * kLanes]);
    const Lanes m_new = max_lanes(m_old, block_max);
    alpha[rv] = exp_nonpositive(m_old - m_new);  // 0 while m_old is -inf
    Lanes sum = {};
    for (int64_t t = 0; t < n; ++t) {
      const Lanes e = exp_nonpositive(load_lanes(s_rv + t * kTileRows) - m_new);
      store_lanes(s_rv + t * kTileRows, e);
      sum += e;
    }
    store_lanes(&st.l[r0 + rv * kLanes], load_lanes(&st.l[r0 + rv * kLanes]) * alpha[rv] + sum);
    store_lanes(&st.m[r0 + rv * kLanes], m_new);
  }
  float* ot = st.ot.data() + r0 * D;
  int64_t d0 = 0;
  // Six dims a tile while that leaves no 2-dim edge (64 = 10 x 6 + 4, 128 = 20 x 6 + 2 x 4):
  // a 4-dim tile does 16 multiply-adds per 8 loads, a 2-dim one 8 per 6.
  for (; d0 + kValueDims <= D && D - d0 != 8; d0 += kValueDims) {
    prompt_values<kValueDims, RV>(s, v, n, d0, alpha, ot, kTileRows);
    ahead.step();
  }
  for (; d0 + 4 <= D; d0 += 4) prompt_values<4, RV>(s, v, n, d0, alpha, ot, kTileRows);
  for (; d0 + 2 <= D; d0 += 2) prompt_values<2, RV>(s, v, n, d0, alpha, ot, kTileRows);
  for (; d0 < D; ++d0) prompt_values<1, RV>(s, v, n, d0, alpha, ot, kTileRows);
}

// Per-thread scratch: key and value row pointers (and converted rows, up to row_width elements a
// token, for 16-bit caches), level 0's scores.
struct ChunkBuffers {
  std::vector<float> kbuf, vbuf, scores;
  std::vector<const float*> k, v;
  ChunkBuffers(int64_t row_width)
      : kbuf(kChunkKeys * row_width),
        vbuf(kChunkKeys * row_width),
        scores((kChunkKeys + kScoreKeys) * kTileRows),  // keys padded to whole score tiles
        k(kChunkKeys + kScoreKeys),
        v(kChunkKeys + kScoreKeys) {}
};

// ---------------------------------------------------------------------------------------------
// Level 1: the head dim as lanes. A sequence's keys are read token by token, the keys of all of
// the item's kv heads at once (contiguous in the cache), so the pass streams through each page in
// address order and the hardware prefetchers run ahead of it; each token's values are prefetched
// in the same order for the value pass, which goes head by head. A token's scores come out 16
// query rows to a vector, so the online softmax runs on 16 rows per instruction; scores are
// [token][padded rows].

// One level-1 work item's R = heads * G query rows (scaled), in blocks of 16 rows. A whole block
// whose rows fall on its kv heads evenly (G divides 16, or 16 divides G) is also kept packed as
// [D / 16][16 rows][16 lanes], so its scores load each key vector once for the G rows of its head
// and each query vector from a constant offset: 16 rows cost about 1.25 loads per multiply-add.
struct SuffixQueries {
  int64_t R = 0, padded = 0, G = 1, D = 0;
  int group = 0;  // rows per kv head in a packed block (G or 16), 0: no block is packed
  std::vector<float> rows, packed;

  void assign(int64_t num_rows, int64_t group_size, int64_t head_dim) {
    R = num_rows, padded = round_up_lanes(num_rows), G = group_size, D = head_dim;
    group = kLanes % G == 0 ? static_cast<int>(G) : G % kLanes == 0 ? static_cast<int>(kLanes) : 0;
    rows.resize(R * D);
    packed.resize(R / kLanes * kLanes * (D / kLanes * kLanes));
  }
  // Whether block b (rows 16 b ...) is read from `packed`: every row real, the grouping even.
  bool is_packed(int64_t b) const { return group != 0 && (b + 1) * kLanes <= R; }
  void pack() {
    const int64_t vecs = D / kLanes;
    for (int64_t b = 0; is_packed(b); ++b) {
      for (int64_t c = 0; c < vecs; ++c) {
        for (int64_t i = 0; i < kLanes; ++i) {
          const float* src = &rows[(b * kLanes + i) * D + c * kLanes];
          std::copy(src, src + kLanes, &packed[((b * vecs + c) * kLanes + i) * kLanes]);
        }
      }
    }
  }
};

// The 16 scores of packed block qp ([D / 16][16][16]) against one token's keys k, from the
// block's first kv head: rows i * GB ... of the block belong to kv head i. 16 dot products summed
// across lanes in one tree. Head dims past a multiple of 16 are added by the caller.
template <int GB>
inline Lanes packed_block_scores(const float* qp, const float* k, int64_t D) {
  constexpr int kHeads = kLanes / GB;
  Lanes acc[kLanes] = {};
  for (int64_t c = 0; c < D / kLanes; ++c) {
    for (int h = 0; h < kHeads; ++h) {
      const Lanes key = load_lanes(k + h * D + c * kLanes);
      for (int g = 0; g < GB; ++g)
        acc[h * GB + g] += load_lanes(qp + (c * kLanes + h * GB + g) * kLanes) * key;
    }
  }
  return sum_lanes16(acc);
}

// The scores of rows j0 <= j < j0 + count (count <= 16) of q ([rows][D]) against one token's keys
// k ([kv heads][D]), any grouping; lanes past count repeat the last row (computed, not used).
inline Lanes row_block_scores(const float* q, const float* k, int64_t j0, int64_t count,
                              int64_t G, int64_t D) {
  const float* qr[kLanes];
  const float* kr[kLanes];
  for (int64_t i = 0; i < kLanes; ++i) {
    const int64_t j = j0 + std::min(i, count - 1);
    qr[i] = q + j * D;
    kr[i] = k + (j / G) * D;
  }
  Lanes acc[kLanes] = {};
  for (int64_t d = 0; d + kLanes <= D; d += kLanes) {
    for (int64_t i = 0; i < kLanes; ++i) acc[i] += load_lanes(qr[i] + d) * load_lanes(kr[i] + d);
  }
  return sum_lanes16(acc);
}

// s[0 .. padded) = the scores of every row of sq against one token's keys k.
inline void token_scores(const SuffixQueries& sq, const float* k, float* s) {
  const int64_t D = sq.D, vecs = D / kLanes;
  for (int64_t j0 = 0; j0 < sq.R; j0 += kLanes) {
    const int64_t b = j0 / kLanes, count = std::min(kLanes, sq.R - j0);
    const float* kb = k + (j0 / sq.G) * D;
    Lanes dots;
    if (!sq.is_packed(b)) {
      dots = row_block_scores(sq.rows.data(), k, j0, count, sq.G, D);
    } else {
      const float* qp = sq.packed.data() + b * vecs * kLanes * kLanes;
      switch (sq.group) {
        case 1: dots = packed_block_scores<1>(qp, kb, D); break;
        case 2: dots = packed_block_scores<2>(qp, kb, D); break;
        case 4: dots = packed_block_scores<4>(qp, kb, D); break;
        case 8: dots = packed_block_scores<8>(qp, kb, D); break;
        default: dots = packed_block_scores<16>(qp, kb, D); break;
      }
    }
    for (int64_t d = vecs * kLanes; d < D; ++d) {  // head dims that are not a multiple of kLanes
      for (int64_t i = 0; i < count; ++i) {
        const int64_t j = j0 + i;
        dots[i] += sq.rows[j * D + d] * k[(j / sq.G) * D + d];
      }
    }
    store_lanes(s + j0, dots);
  }
}

// acc_g = alpha_g acc_g + sum over t < n of w[t * stride + g] v_t for RG rows, VC vectors of
// dims from d0: each value vector is loaded once for the RG rows.
template <int RG, int VC>
inline void suffix_values(const float* w, int64_t stride, const float* const* v,
                          int64_t v_offset, int64_t n, int64_t d0, const float* alpha,
                          float* acc, int64_t D) {
  Lanes a[RG][VC];
  for (int g = 0; g < RG; ++g) {
    for (int c = 0; c < VC; ++c) a[g][c] = alpha[g] * load_lanes(acc + g * D + d0 + c * kLanes);
  }
  for (int64_t t = 0; t < n; ++t) {
    Lanes value[VC];
    for (int c = 0; c < VC; ++c) value[c] = load_lanes(v[t] + v_offset + d0 + c * kLanes);
    for (int g = 0; g < RG; ++g) {
      const float weight = w[t * stride + g];
      for (int c = 0; c < VC; ++c) a[g][c] += weight * value[c];
    }
  }
  for (int g = 0; g < RG; ++g) {
    for (int c = 0; c < VC; ++c) store_lanes(acc + g * D + d0 + c * kLanes, a[g][c]);
  }
}

// suffix_values over all D dims of RG rows reading kv head row v[t] + v_offset.
template <int RG>
void suffix_rows_values(const float* w, int64_t stride, const float* const* v, int64_t v_offset,
                        int64_t n, int64_t D, const float* alpha, float* acc) {
  int64_t d0 = 0;
  for (; d0 + 4 * kLanes <= D; d0 += 4 * kLanes)
    suffix_values<RG, 4>(w, stride, v, v_offset, n, d0, alpha, acc, D);
  for (; d0 + kLanes <= D; d0 += kLanes)
    suffix_values<RG, 1>(w, stride, v, v_offset, n, d0, alpha, acc, D);
  for (; d0 < D; ++d0) {  // head dims that are not a multiple of kLanes
    for (int g = 0; g < RG; ++g) {
      float a = alpha[g] * acc[g * D + d0];
      for (int64_t t = 0; t < n; ++t) a += w[t * stride + g] * v[t][v_offset + d0];
      acc[g * D + d0] = a;
    }
  }
}

// How far ahead level 1 asks for keys: the hardware prefetchers restart at every scattered page,
// and 8 tokens (16-32 KB of keys for 8 kv heads) ahead keep the misses overlapped (measured: 10-15%
// faster than the prefetchers alone; 16 ahead is no faster).
constexpr int64_t kKeyPrefetchTokens = 8;

// Asks for the bytes [row, row + bytes) ahead of their use.
inline void prefetch_bytes(const float* row, int64_t bytes) {
  const char* p = reinterpret_cast<const char*>(row);
  for (int64_t byte = 0; byte < bytes; byte += 64) __builtin_prefetch(p + byte);
}

// The rows of sq continue their state (m, l, alpha: [padded]; acc: [R][D]) over n tokens: k[t]
// and v[t] point at the token's rows of the item's first kv head (heads contiguous); s is
// [n][padded]. With prefetch (k and v in the cache itself, not converted copies) each token's
// values, and the keys kKeyPrefetchTokens ahead, are asked for while its keys are scored: the
// value pass then finds them in cache. The keys ahead run on into the next chunk's first tokens
// (next_k, next_n of them), so a chunk does not start by waiting for its keys.
void suffix_chunk(const SuffixQueries& sq, int64_t heads, const float* const* k,
                  const float* const* v, int64_t n, bool prefetch, const float* const* next_k,
                  int64_t next_n, float* s, float* m, float* l, float* alpha, float* acc) {
  const int64_t G = sq.G, D = sq.D, P = sq.padded, bytes = heads * D * 4;
  for (int64_t t = 0; t < n; ++t) {
    if (prefetch) {
      prefetch_bytes(v[t], bytes);
      const int64_t ahead = t + kKeyPrefetchTokens;
      if (ahead < n) {
        prefetch_bytes(k[ahead], bytes);
      } else if (ahead - n < next_n) {
        prefetch_bytes(next_k[ahead - n], bytes);
      }
    }
    token_scores(sq, k[t], s + t * P);
  }
  for (int64_t j0 = 0; j0 < P; j0 += kLanes) {
    Lanes block_max = load_lanes(s + j0);
    for (int64_t t = 1; t < n; ++t) block_max = max_lanes(block_max, load_lanes(s + t * P + j0));
    const Lanes m_old = load_lanes(m + j0);
    const Lanes m_new = max_lanes(m_old, block_max);
    const Lanes a = exp_nonpositive(m_old - m_new);  // 0 while m_old is -inf
    Lanes sum = {};
    for (int64_t t = 0; t < n; ++t) {
      const Lanes e = exp_nonpositive(load_lanes(s + t * P + j0) - m_new);
      store_lanes(s + t * P + j0, e);
      sum += e;
    }
    store_lanes(l + j0, load_lanes(l + j0) * a + sum);
    store_lanes(m + j0, m_new);
    store_lanes(alpha + j0, a);
  }
  for (int64_t h = 0; h < heads; ++h) {
    int64_t g = 0;
    for (; g + 4 <= G; g += 4) {
      const int64_t j = h * G + g;
      suffix_rows_values<4>(s + j, P, v, h * D, n, D, alpha + j, acc + j * D);
    }
    for (; g < G; ++g) {
      const int64_t j = h * G + g;
      suffix_rows_values<1>(s + j, P, v, h * D, n, D, alpha + j, acc + j * D);
    }
  }
}

// ---------------------------------------------------------------------------------------------

// Level-0 work item: rows [first, first + nseq) of a problem's sequences (in plan order), one
// kv head, prompt keys [key_begin, key_end), written as partial state `split`.
struct PromptItem {
  int64_t problem, first, nseq, kv_head, key_begin, key_end, split;
};

// Splits per prompt: kMinPromptItems items in all, each range at least kMinSplitKeys keys.
int64_t prompt_splits(int64_t base_items, int64_t prompt_len) {
  const int64_t wanted = (kMinPromptItems + base_items - 1) / base_items;
  return std::max<int64_t>(1, std::min(wanted, prompt_len / kMinSplitKeys));
}

int max_threads() {
#ifdef TTSCALE_WITH_OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

template <typename E>
void decode_impl(const AttentionParams& p) {
  using S = typename E::storage;
  const int64_t B = p.num_seqs, Hq = p.num_q_heads, Hkv = p.num_kv_heads, D = p.head_dim;
  const int64_t G = Hq / Hkv, BS = p.block_size, token_stride = Hkv * D;
  const S* q = as_ptr<const S>(p.q);
  const S* kc = as_ptr<const S>(p.k_cache);
  const S* vc = as_ptr<const S>(p.v_cache);
  S* out = as_ptr<S>(p.out);
  float* lse = as_ptr<float>(p.lse);
  const int32_t* prompt_tables = as_ptr<const int32_t>(p.prompt_block_tables);
  const int32_t* prompt_lens = as_ptr<const int32_t>(p.prompt_lens);
  const int32_t* suffix_tables = as_ptr<const int32_t>(p.suffix_block_tables);
  const int32_t* suffix_lens = as_ptr<const int32_t>(p.suffix_lens);
  const int32_t* order = as_ptr<const int32_t>(p.seq_order);
  const int32_t* starts = as_ptr<const int32_t>(p.problem_starts);
  TTSCALE_CHECK(order != nullptr && starts != nullptr, "cascade decode needs a plan");
  TTSCALE_CHECK(G <= kItemRows, "cascade decode supports at most 256 query heads per kv head");

  // Level-0 work: (problem, rows of up to kItemRows, kv head, key range).
  const int64_t seqs_per_item = std::max<int64_t>(1, kItemRows / G);
  int64_t base_items = 0;
  for (int64_t prob = 0; prob < p.num_problems; ++prob) {
    const int64_t nseq = starts[prob + 1] - starts[prob];
    if (prompt_lens[prob] > 0) base_items += (nseq + seqs_per_item - 1) / seqs_per_item * Hkv;
  }
  const int64_t threads = max_threads();
  std::vector<PromptItem> items;
  int64_t num_splits = 1;
  for (int64_t prob = 0; prob < p.num_problems; ++prob) {
    const int64_t len = prompt_lens[prob];
    if (len == 0) continue;
    const int64_t splits = prompt_splits(base_items, len);
    const int64_t chunks = (len + kChunkKeys - 1) / kChunkKeys;
    const int64_t chunks_per_split = (chunks + splits - 1) / splits;
    num_splits = std::max(num_splits, splits);
    for (int64_t first = starts[prob]; first < starts[prob + 1]; first += seqs_per_item) {
      const int64_t nseq = std::min(seqs_per_item, starts[prob + 1] - first);
      for (int64_t h = 0; h < Hkv; ++h) {
        for (int64_t s = 0; s < splits; ++s) {
          const int64_t begin = s * chunks_per_split * kChunkKeys;
          if (begin >= len) break;
          items.push_back({prob, first, nseq, h, begin,
                           std::min(len, begin + chunks_per_split * kChunkKeys), s});
        }
      }
    }
  }
  const int64_t num_items = static_cast<int64_t>(items.size());
  // Level-1 work: (sequence, range of kv heads); a range is all of them unless there are fewer
  // than two sequences a thread.
  const int64_t ranges_wanted = std::min(Hkv, (2 * threads + B - 1) / std::max<int64_t>(B, 1));
  const int64_t heads_per_range = (Hkv + ranges_wanted - 1) / std::max<int64_t>(1, ranges_wanted);
  const int64_t head_ranges = (Hkv + heads_per_range - 1) / heads_per_range;

  // Level-0 partial states per (key range, sequence, query head): max, sum, and the unnormalised
  // accumulator. A range that a row never saw keeps m = -inf and is not read.
  const int64_t rows_total = B * Hq;
  std::vector<float> m0(num_splits * rows_total, kNegInf), l0(num_splits * rows_total, 0.f);
  std::unique_ptr<float[]> acc0(new float[num_splits * rows_total * D]);

#pragma omp parallel
  {
    ChunkBuffers buf(Hkv * D);
    PromptState st(D);
    ChunkPrefetch ahead;
#pragma omp for schedule(dynamic)
    for (int64_t i = 0; i < num_items; ++i) {
      const PromptItem& item = items[i];
      const int64_t rows = item.nseq * G;
      const int64_t padded_rows = round_up_lanes(rows);
      for (int64_t j = 0; j < item.nseq; ++j) {
        const S* q_seq = q + (order[item.first + j] * Hq + item.kv_head * G) * D;
        for (int64_t g = 0; g < G; ++g) {
          for (int64_t d = 0; d < D; ++d)
            st.qt[st.at(j * G + g, d)] = E::load(q_seq[g * D + d]) * p.scale;
        }
      }
      for (int64_t r = rows; r < padded_rows; ++r) {
        for (int64_t d = 0; d < D; ++d) st.qt[st.at(r, d)] = 0.f;
      }
      const int64_t tiled_rows = (padded_rows + kTileRows - 1) / kTileRows * kTileRows;
      std::fill(st.ot.begin(), st.ot.begin() + tiled_rows * D, 0.f);
      std::fill(st.m.begin(), st.m.begin() + padded_rows, kNegInf);
      std::fill(st.l.begin(), st.l.begin() + padded_rows, 0.f);
      const int32_t* table = prompt_tables + item.problem * p.max_prompt_blocks;
      const bool pack = padded_rows > kTileRows;  // gather_rows: worth it from two tiles a chunk
      for (int64_t begin = item.key_begin; begin < item.key_end; begin += kChunkKeys) {
        const int64_t n = std::min(kChunkKeys, item.key_end - begin);
        const int64_t padded = (n + kScoreKeys - 1) / kScoreKeys * kScoreKeys;
        gather_rows<E>(kc, table, BS, token_stride, item.kv_head * D, begin, n, padded, D,
                       buf.kbuf.data(), buf.k.data(), pack);
        gather_rows<E>(vc, table, BS, token_stride, item.kv_head * D, begin, n, n, D,
                       buf.vbuf.data(), buf.v.data(), pack);
        // The next chunk, while this one computes: a step after each register tile.
        const int64_t next = std::max<int64_t>(0, std::min(kChunkKeys, item.key_end - begin - n));
        const int64_t tiles = (padded_rows + kTileRows - 1) / kTileRows;
        ahead.assign(kc, vc, table, BS, token_stride, item.kv_head * D, begin + n, next, D,
                     tiles * ((padded + kScoreKeys - 1) / kScoreKeys + D / kValueDims));
        for (int64_t r0 = 0; r0 < padded_rows; r0 += kTileRows) {
          const float* const* k = buf.k.data();
          const float* const* v = buf.v.data();
          float* s = buf.scores.data();
          switch (std::min<int64_t>(kTileVecs, (padded_rows - r0) / kLanes)) {
            case 1: prompt_tile<1>(st, r0, k, v, n, D, s, ahead); break;
            case 2: prompt_tile<2>(st, r0, k, v, n, D, s, ahead); break;
            case 3: prompt_tile<3>(st, r0, k, v, n, D, s, ahead); break;
            default: prompt_tile<4>(st, r0, k, v, n, D, s, ahead); break;
          }
        }
        ahead.step(true);
      }
      for (int64_t j = 0; j < item.nseq; ++j) {
        const int64_t b = order[item.first + j];
        for (int64_t g = 0; g < G; ++g) {
          const int64_t r = j * G + g;
          const int64_t slot = item.split * rows_total + b * Hq + item.kv_head * G + g;
          m0[slot] = st.m[r];
          l0[slot] = st.l[r];
          for (int64_t d = 0; d < D; ++d) acc0[slot * D + d] = st.ot[st.at(r, d)];
        }
      }
    }

    // Level 1: each (sequence, kv heads) merges its level-0 ranges and continues over its suffix.
    SuffixQueries sq;
    const int64_t padded_heads = round_up_lanes(Hq);
    std::vector<float> m(padded_heads), l(padded_heads), alpha(padded_heads), acc(Hq * D);
    std::vector<float> scores(kChunkKeys * padded_heads);
    const float* next_k[kKeyPrefetchTokens] = {};
#pragma omp for schedule(dynamic)
    for (int64_t item = 0; item < B * head_ranges; ++item) {
      const int64_t b = item / head_ranges, range = item % head_ranges;
      const int64_t h0 = range * heads_per_range;
      const int64_t heads = std::min(heads_per_range, Hkv - h0), R = heads * G;
      sq.assign(R, G, D);
      std::fill(m.begin(), m.end(), kNegInf);  // rows past R: computed, never read
      std::fill(l.begin(), l.end(), 0.f);
      for (int64_t j = 0; j < R; ++j) {
        const int64_t row = b * Hq + h0 * G + j;
        for (int64_t d = 0; d < D; ++d) sq.rows[j * D + d] = E::load(q[row * D + d]) * p.scale;
        float m_all = kNegInf;
        for (int64_t s = 0; s < num_splits; ++s) m_all = std::max(m_all, m0[s * rows_total + row]);
        m[j] = m_all;
        std::fill(&acc[j * D], &acc[j * D] + D, 0.f);
        if (m_all == kNegInf) continue;
        for (int64_t s = 0; s < num_splits; ++s) {
          const int64_t slot = s * rows_total + row;
          if (m0[slot] == kNegInf) continue;
          const float weight = std::exp(m0[slot] - m_all);
          l[j] += weight * l0[slot];
          for (int64_t d = 0; d < D; ++d) acc[j * D + d] += weight * acc0[slot * D + d];
        }
      }
      sq.pack();
      const int32_t* table = suffix_tables + b * p.max_suffix_blocks;
      const int64_t len = suffix_lens[b];
      for (int64_t begin = 0; begin < len; begin += kChunkKeys) {
        const int64_t n = std::min(kChunkKeys, len - begin);
        gather_rows<E>(kc, table, BS, token_stride, h0 * D, begin, n, n, heads * D,
                       buf.kbuf.data(), buf.k.data());
        gather_rows<E>(vc, table, BS, token_stride, h0 * D, begin, n, n, heads * D,
                       buf.vbuf.data(), buf.v.data());
        const int64_t next_n = std::min(kKeyPrefetchTokens, std::max<int64_t>(0, len - begin - n));
        if constexpr (std::is_same_v<S, float>) {
          gather_rows<E>(kc, table, BS, token_stride, h0 * D, begin + n, next_n, next_n,
                         heads * D, nullptr, next_k);
        }
        suffix_chunk(sq, heads, buf.k.data(), buf.v.data(), n, std::is_same_v<S, float>, next_k,
                     next_n, scores.data(), m.data(), l.data(), alpha.data(), acc.data());
      }
      for (int64_t j = 0; j < R; ++j) {
        const int64_t row = b * Hq + h0 * G + j;
        if (l[j] == 0.f) {
          for (int64_t d = 0; d < D; ++d) out[row * D + d] = E::store(0.f);
          lse[row] = kNegInf;
          continue;
        }
        const float inv = 1.f / l[j];
        for (int64_t d = 0; d < D; ++d) out[row * D + d] = E::store(acc[j * D + d] * inv);
        lse[row] = m[j] + std::log(l[j]);
      }
    }
  }
}

}  // namespace

void cascade_decode_attention_cpu(const AttentionParams& p) {
  dispatch_dtype(p.dtype, [&](auto e) { decode_impl<decltype(e)>(p); });
}

}  // namespace ttscale
