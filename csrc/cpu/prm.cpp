// C++ CPU kernel of the fused PRM step-scoring op.
//
// Two passes. The head: each step row takes one or two dot products with the head's rows (never
// the full vocabulary) and the head's normalisation; rows are independent, so they are split
// across threads. The aggregation: one sequential scan over the steps in order, folding each
// score into its sequence's row of the state, so several steps of one sequence in one call
// fold in the order they arrive, exactly as they would over several calls.
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "common.h"
#include "prm.h"

namespace ttscale {
namespace {

// Below this many hidden elements the head pass runs on one thread: waking a thread pool costs
// more than the work (and much more on a loaded machine).
constexpr int64_t kParallelElements = int64_t{1} << 20;

// The build targets baseline x86-64 (SSE2); the dot products, the whole cost of this op, also
// get an AVX2+FMA version chosen at load time where the CPU has it.
#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#define TTSCALE_SIMD_CLONES __attribute__((target_clones("avx2,fma", "default")))
#else
#define TTSCALE_SIMD_CLONES
#endif

// Eight floats (one AVX2 register, or two SSE ones in the baseline build).
typedef float Vec8 __attribute__((vector_size(32)));
constexpr int64_t kUnroll = 4;  // independent accumulators per head row, to hide FMA latency

// z[0] += x . w0 and z[1] += x . w1 over n floats. Written with explicit vectors because the
// compiler may not reassociate a float sum by itself, and its own attempt (vectorising across
// lane arrays) shuffles more than it multiplies.
TTSCALE_SIMD_CLONES
void dot2(const float* x, const float* w0, const float* w1, int64_t n, float* z) {
  Vec8 acc0[kUnroll] = {}, acc1[kUnroll] = {};
  int64_t d = 0;
  for (; d + 8 * kUnroll <= n; d += 8 * kUnroll) {
    for (int64_t u = 0; u < kUnroll; ++u) {
      Vec8 xv, wv0, wv1;
      std::memcpy(&xv, x + d + 8 * u, sizeof xv);  // unaligned loads
      std::memcpy(&wv0, w0 + d + 8 * u, sizeof wv0);
      std::memcpy(&wv1, w1 + d + 8 * u, sizeof wv1);
      acc0[u] += xv * wv0;
      acc1[u] += xv * wv1;
    }
  }
  float z0 = 0.f, z1 = 0.f;
  for (; d < n; ++d) {
    z0 += x[d] * w0[d];
    z1 += x[d] * w1[d];
  }
  for (int64_t u = 0; u < kUnroll; ++u) {
    for (int l = 0; l < 8; ++l) {
      z0 += acc0[u][l];
      z1 += acc1[u][l];
    }
  }
  z[0] += z0;
  z[1] += z1;
}

inline float sigmoid(float x) {
  if (x >= 0.f) return 1.f / (1.f + std::exp(-x));
  const float e = std::exp(x);
  return e / (1.f + e);
}

template <typename E>
void head_scores(const PRMParams& p) {
  using S = typename E::storage;
  constexpr bool kFloat32 = std::is_same_v<E, Float32>;
  const int64_t T = p.num_steps, H = p.hidden_size;
  const auto kind = static_cast<PRMKind>(p.kind);
  const int64_t rows = kind == PRMKind::kValue ? 1 : 2;
  // The head's rows in float once; every step row reuses them. A value head's second row is
  // zero: the second dot product is wasted but harmless.
  std::vector<float> w(2 * H, 0.f);
  const S* weight = as_ptr<const S>(p.weight);
  for (int64_t i = 0; i < rows * H; ++i) w[i] = E::load(weight[i]);
  float bias[2] = {0.f, 0.f};
  if (p.bias != 0) {
    const S* b = as_ptr<const S>(p.bias);
    for (int64_t r = 0; r < rows; ++r) bias[r] = E::load(b[r]);
  }
  const S* hidden = as_ptr<const S>(p.hidden);
  float* scores = as_ptr<float>(p.scores);

#pragma omp parallel if (T * H >= kParallelElements)
  {
    std::vector<float> row(kFloat32 ? 0 : H);  // a 16-bit row widened to float
#pragma omp for schedule(static)
    for (int64_t t = 0; t < T; ++t) {
      const float* x;
      if constexpr (kFloat32) {
        x = hidden + t * H;
      } else {
        for (int64_t d = 0; d < H; ++d) row[d] = E::load(hidden[t * H + d]);
        x = row.data();
      }
      float z[2] = {bias[0], bias[1]};
      dot2(x, w.data(), w.data() + H, H, z);
      // softmax over two logits, P(first) = sigmoid(first - second).
      switch (kind) {
        case PRMKind::kTwoToken: scores[t] = sigmoid(z[0] - z[1]); break;
        case PRMKind::kTwoClass: scores[t] = sigmoid(z[1] - z[0]); break;
        case PRMKind::kValue: scores[t] = sigmoid(z[0]); break;
      }
    }
  }
}

float empty_aggregate(PRMAgg agg) {
  switch (agg) {
    case PRMAgg::kMin: return std::numeric_limits<float>::infinity();
    case PRMAgg::kProd: return 1.f;
    default: return 0.f;
  }
}

void aggregate(const PRMParams& p) {
  const auto agg = static_cast<PRMAgg>(p.agg);
  const float empty = empty_aggregate(agg);
  float* state = as_ptr<float>(p.state_out);
  std::memcpy(state, as_ptr<const float>(p.state_in), sizeof(float) * 2 * p.num_seqs);
  const int64_t* seq_ids = as_ptr<const int64_t>(p.seq_ids);
  const float* scores = as_ptr<const float>(p.scores);
  for (int64_t t = 0; t < p.num_steps; ++t) {
    float* row = state + 2 * seq_ids[t];
    const float count = row[1];
    const float before = count > 0.f ? row[0] : empty;  // a count of 0 is empty, whatever row[0]
    const float step = scores[t];
    float after = step;
    switch (agg) {
      case PRMAgg::kLast: break;
      case PRMAgg::kMin: after = std::fmin(before, step); break;
      case PRMAgg::kProd: after = before * step; break;
      case PRMAgg::kMean: after = before + (step - before) / (count + 1.f); break;
    }
    row[0] = after;
    row[1] = count + 1.f;
  }
}

}  // namespace

void prm_step_scores_cpu(const PRMParams& p) {
  TTSCALE_CHECK(p.kind >= 0 && p.kind <= 2, "prm_step_scores: unknown kind code");
  TTSCALE_CHECK(p.agg >= 0 && p.agg <= 3, "prm_step_scores: unknown agg code");
  dispatch_dtype(p.dtype, [&](auto elem) { head_scores<decltype(elem)>(p); });
  aggregate(p);
}

}  // namespace ttscale
