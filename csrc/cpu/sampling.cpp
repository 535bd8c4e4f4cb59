// C++ CPU kernel of the sample op: one row per OpenMP iteration.
//
// Every filter keeps the tokens whose scaled logit x reaches a threshold, so a row finds the
// thresholds first, exactly and without sorting the vocabulary, then takes the Gumbel-max over
// the kept tokens with the random numbers of sampling.h. To find a threshold, the pass that
// computes the probabilities also buckets the tokens by x (bins of 1/16 below the max, with
// their counts and masses); the bins locate the one bucket the threshold falls in, and only
// that bucket's tokens go through a selection (nth_element for top-k, a quickselect on mass
// for top-p).
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
constexpr int kBins = 1024;            // the last bin holds everything 64 or more below the max
constexpr float kBinsPerUnit = 16.0f;  // of x

struct Token {
  float x, e;  // scaled logit and unnormalised probability exp(x - max)
};

// Per-thread buffers, reused across rows.
struct RowScratch {
  std::vector<float> x, e, values;
  std::vector<uint16_t> bin;
  std::vector<int64_t> bin_count, order;
  std::vector<double> bin_mass;
  std::vector<Token> tokens;
};

// Bins are monotone in x: a larger x never lands in a later bin, equal x in the same one.
inline int bin_of(float x, float max) {
  const float d = (max - x) * kBinsPerUnit;
  return d < static_cast<float>(kBins - 1) ? static_cast<int>(d) : kBins - 1;
}

void bucket(RowScratch& s, int64_t V, float max) {
  std::fill(s.bin_count.begin(), s.bin_count.end(), 0);
  std::fill(s.bin_mass.begin(), s.bin_mass.end(), 0.0);
  for (int64_t i = 0; i < V; ++i) {
    const int bin = bin_of(s.x[i], max);
    s.bin[i] = static_cast<uint16_t>(bin);
    s.bin_count[bin] += 1;
    s.bin_mass[bin] += s.e[i];
  }
}

// The smallest value v among `tokens` for which the tokens with a larger value, plus `above`,
// hold less than `target` mass (kInf when none). That condition holds for every value above
// the answer, so a quickselect can test it at a pivot and keep one side: expected O(n).
float top_p_threshold(std::vector<Token>& tokens, double above, double target) {
  auto lo = tokens.begin(), hi = tokens.end();  // undecided: every value above them is counted
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

// The tokens of one bin with x >= floor.
void bin_tokens(RowScratch& s, int64_t V, int bin, float floor) {
  s.tokens.clear();
  for (int64_t i = 0; i < V; ++i)
    if (s.bin[i] == bin && s.x[i] >= floor) s.tokens.push_back({s.x[i], s.e[i]});
}

// The least x a token may have to survive top-k and top-p (min-p is applied on e directly).
float kept_threshold(RowScratch& s, int64_t V, int32_t top_k, float top_p) {
  float threshold = kNegInf;
  int k_bin = kBins;  // the bins after it hold no token of the top-k set
  double k_bin_mass = 0.0;
  double kept_mass = 0.0;
  for (int b = 0; b < kBins; ++b) kept_mass += s.bin_mass[b];
  if (top_k > 0 && top_k < V) {
    int64_t before = 0;
    k_bin = 0;
    while (before + s.bin_count[k_bin] < top_k) before += s.bin_count[k_bin++];
    s.values.clear();
    for (int64_t i = 0; i < V; ++i)
      if (s.bin[i] == k_bin) s.values.push_back(s.x[i]);
    auto kth = s.values.begin() + (top_k - before - 1);
    std::nth_element(s.values.begin(), kth, s.values.end(), std::greater<float>());
    threshold = *kth;  // the k-th largest: fewer than k tokens lie strictly above it
    kept_mass = 0.0;
    for (int b = 0; b < k_bin; ++b) kept_mass += s.bin_mass[b];
    for (int64_t i = 0; i < V; ++i)
      if (s.bin[i] == k_bin && s.x[i] >= threshold) k_bin_mass += s.e[i];
    kept_mass += k_bin_mass;
  }
  if (top_p < 1.f) {
    const double target = static_cast<double>(top_p) * kept_mass;
    double above = 0.0;
    for (int b = 0; b < kBins && b <= k_bin; ++b) {
      const double mass = b == k_bin ? k_bin_mass : s.bin_mass[b];
      if (above + mass < target) {  // the whole bin is kept
        above += mass;
        continue;
      }
      bin_tokens(s, V, b, threshold);
      threshold = std::max(threshold, top_p_threshold(s.tokens, above, target));
      break;
    }
  }
  return threshold;
}

float gumbel(const SampleRng& rng, uint32_t token) { return -std::log(-std::log(rng.uniform(token))); }

// Gumbel-max over the kept tokens, keys (x - max) + g; equal keys go to the lower index. The
// most likely token is always kept and starts as the best. Most tokens cannot win: since
// -log(u) >= 1 - u, a token's key is at most (x - max) - log(1 - u), so when
// 1 - u > exp(x - max - best + margin) it is skipped without its two logarithms. The margin
// covers the float32 rounding of the keys.
int64_t gumbel_max(const RowScratch& s, int64_t V, const SampleRng& rng, int64_t argmax, float m,
                   float threshold, float min_p) {
  int64_t best = argmax;
  float best_key = gumbel(rng, static_cast<uint32_t>(argmax));
  auto skip_scale = [&] { return std::exp(-best_key + 1e-4f + std::fabs(best_key) * 0x1p-20f); };
  float scale = skip_scale();  // exp(x - max - best + margin) = e * scale
  for (int64_t i = 0; i < V; ++i) {
    if (s.x[i] < threshold || s.e[i] < min_p || i == argmax) continue;
    const float u = rng.uniform(static_cast<uint32_t>(i));
    if (1.f - u > s.e[i] * scale) continue;
    const float key = (s.x[i] - m) - std::log(-std::log(u));
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
    const int32_t top_k = as_ptr<const int32_t>(p.top_k)[b];
    const float top_p = as_ptr<const float>(p.top_p)[b];
    float threshold = kNegInf;
    if ((top_k > 0 && top_k < V) || top_p < 1.f) {
      bucket(s, V, m);
      threshold = kept_threshold(s, V, top_k, top_p);
    }
    const SampleRng rng(p.seed, as_ptr<const int64_t>(p.offsets)[b]);
    token = gumbel_max(s, V, rng, argmax, m, threshold, as_ptr<const float>(p.min_p)[b]);
  }
  as_ptr<int64_t>(p.tokens)[b] = token;
  as_ptr<float>(p.logprobs)[b] = (s.x[token] - m) - log_total;

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
    s.bin.resize(p.vocab);
    s.bin_count.resize(kBins);
    s.bin_mass.resize(kBins);
#pragma omp for schedule(dynamic)
    for (int64_t b = 0; b < p.batch; ++b) sample_row<E>(p, b, s);
  }
}

}  // namespace

void sample_cpu(const SampleParams& p) {
  dispatch_dtype(p.dtype, [&](auto e) { sample_impl<decltype(e)>(p); });
}

}  // namespace ttscale
