// C++ CPU kernel of the sample op: one row per OpenMP iteration.
//
// Every filter keeps the tokens whose scaled logit x reaches a threshold, so a row finds the
// thresholds first, exactly and without sorting the vocabulary (nth_element for top-k, a
// quickselect on mass for top-p), then takes the Gumbel-max over the kept tokens with the
// random numbers of sampling.h.
#include "sampling.h"

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <numeric>
#include <vector>

#include "common.h"

namespace ttscale {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kInf = std::numeric_limits<float>::infinity();

struct Token {
  float x, e;  // scaled logit and unnormalised probability exp(x - max)
};

// Per-thread buffers, reused across rows.
struct RowScratch {
  std::vector<float> x, e, values;
  std::vector<Token> tokens;
  std::vector<int64_t> order;
};

// The smallest value v among `tokens` for which the tokens with a larger value hold less than
// `target` mass. That condition holds for every value above the answer, so a quickselect can
// test it at a pivot and keep one side: expected O(n), no sort.
float top_p_threshold(std::vector<Token>& tokens, double target) {
  auto lo = tokens.begin(), hi = tokens.end();  // undecided tokens
  double above = 0.0;                           // mass of the tokens larger than every undecided one
  float answer = kInf;
  while (lo < hi) {
    const float pivot = lo[(hi - lo) / 2].x;
    auto equal = std::partition(lo, hi, [&](const Token& t) { return t.x > pivot; });
    auto less = std::partition(equal, hi, [&](const Token& t) { return t.x == pivot; });
    double greater_mass = 0.0, equal_mass = 0.0;
    for (auto it = lo; it < equal; ++it) greater_mass += it->e;
    for (auto it = equal; it < less; ++it) equal_mass += it->e;
    if (above + greater_mass < target) {  // the pivot is kept: the answer is it or smaller
      answer = pivot;
      above += greater_mass + equal_mass;
      lo = less;
    } else {
      hi = equal;
    }
  }
  return answer;
}

// x >= threshold and e >= min_p: the kept set after top-k, top-p and min-p.
float kept_threshold(RowScratch& s, int64_t V, int32_t top_k, float top_p, double total) {
  float threshold = kNegInf;
  double kept_mass = total;
  if (top_k > 0 && top_k < V) {
    s.values.assign(s.x.begin(), s.x.begin() + V);
    std::nth_element(s.values.begin(), s.values.begin() + (top_k - 1), s.values.end(), std::greater<float>());
    threshold = s.values[top_k - 1];  // the k-th largest: fewer than k tokens lie strictly above it
    kept_mass = 0.0;
    for (int64_t i = 0; i < V; ++i) kept_mass += s.x[i] >= threshold ? s.e[i] : 0.f;
  }
  if (top_p < 1.f) {
    s.tokens.clear();
    for (int64_t i = 0; i < V; ++i)
      if (s.x[i] >= threshold) s.tokens.push_back({s.x[i], s.e[i]});
    threshold = std::max(threshold, top_p_threshold(s.tokens, static_cast<double>(top_p) * kept_mass));
  }
  return threshold;
}

float gumbel(const SampleRng& rng, uint32_t token) { return -std::log(-std::log(rng.uniform(token))); }

// Gumbel-max over the kept tokens; equal keys go to the lower index. The most likely token is
// always kept and starts as the best. Most tokens cannot win, and since -log(u) >= 1 - u a
// token's key is at most x - log(1 - u): when 1 - u > exp(x - best + margin) it is skipped
// without its two logarithms. The margin covers the float32 rounding of the keys.
int64_t gumbel_max(const RowScratch& s, int64_t V, const SampleRng& rng, int64_t argmax, float m,
                   float threshold, float min_p) {
  int64_t best = argmax;
  float best_key = m + gumbel(rng, static_cast<uint32_t>(argmax));
  auto skip_scale = [&] { return std::exp(m - best_key + 1e-4f + std::fabs(best_key) * 0x1p-20f); };
  float scale = skip_scale();  // exp(x - best + margin) = e * scale
  for (int64_t i = 0; i < V; ++i) {
    if (s.x[i] < threshold || s.e[i] < min_p || i == argmax) continue;
    const float u = rng.uniform(static_cast<uint32_t>(i));
    if (1.f - u > s.e[i] * scale) continue;
    const float key = s.x[i] - std::log(-std::log(u));
    if (key > best_key || (key == best_key && i < best)) {
      best = i;
      best_key = key;
      scale = skip_scale();
    }
  }
  return best;
}

template <typename E>
void sample_row(const SampleParams& p, int64_t b, RowScratch& s) {
  using S = typename E::storage;
  const int64_t V = p.vocab;
  const S* logits = as_ptr<const S>(p.logits) + b * V;
  const float temperature = as_ptr<const float>(p.temperature)[b];
  const bool greedy = temperature == 0.f;
  const float inv_t = greedy ? 1.f : 1.f / temperature;

  // Branch-free passes the compiler vectorises: the maximum, then its first index.
  float m = kNegInf;
  for (int64_t i = 0; i < V; ++i) {
    s.x[i] = E::load(logits[i]) * inv_t;
    m = s.x[i] > m ? s.x[i] : m;
  }
  const int64_t argmax = std::find(s.x.begin(), s.x.begin() + V, m) - s.x.begin();
  double total = 0.0;
  for (int64_t i = 0; i < V; ++i) {
    s.e[i] = exp_nonpositive(s.x[i] - m);
    total += s.e[i];
  }
  const float log_total = static_cast<float>(std::log(total));

  int64_t token = argmax;
  if (!greedy) {
    const float min_p = as_ptr<const float>(p.min_p)[b];
    const float threshold =
        kept_threshold(s, V, as_ptr<const int32_t>(p.top_k)[b], as_ptr<const float>(p.top_p)[b], total);
    const SampleRng rng(p.seed, as_ptr<const int64_t>(p.offsets)[b]);
    token = gumbel_max(s, V, rng, argmax, m, threshold, min_p);
  }
  as_ptr<int64_t>(p.tokens)[b] = token;
  as_ptr<float>(p.logprobs)[b] = (s.x[token] - m) - log_total;  // as torch's log_softmax rounds

  const int64_t n = p.num_logprobs;
  if (n > 0) {
    s.order.resize(V);
    std::iota(s.order.begin(), s.order.end(), int64_t{0});
    std::partial_sort(s.order.begin(), s.order.begin() + n, s.order.end(), [&](int64_t i, int64_t j) {
      return s.x[i] > s.x[j] || (s.x[i] == s.x[j] && i < j);
    });
    for (int64_t j = 0; j < n; ++j) {
      as_ptr<int64_t>(p.top_ids)[b * n + j] = s.order[j];
      as_ptr<float>(p.top_logprobs)[b * n + j] = (s.x[s.order[j]] - m) - log_total;
    }
  }
}

template <typename E>
void sample_impl(const SampleParams& p) {
#pragma omp parallel
  {
    RowScratch s;
    s.x.resize(p.vocab);
    s.e.resize(p.vocab);
#pragma omp for schedule(dynamic)
    for (int64_t b = 0; b < p.batch; ++b) sample_row<E>(p, b, s);
  }
}

}  // namespace

void sample_cpu(const SampleParams& p) {
  dispatch_dtype(p.dtype, [&](auto e) { sample_impl<decltype(e)>(p); });
}

}  // namespace ttscale
