// kLanes floats as one value, and the few operations on it that the CPU attention kernels share.
//
// Lanes is a GCC/Clang vector extension type: the compiler maps it onto the target's widest
// registers (one zmm with AVX-512, two ymm with AVX2, four xmm with SSE), so the kernels stay
// portable C++ and -march=native picks the width. Only sum_lanes16 and exp_nonpositive have
// AVX-512 versions in intrinsics (behind __AVX512F__), beside plain fallbacks that any target
// compiles.
#pragma once

#include <cstdint>
#include <cstring>

#include "common.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace ttscale {

constexpr int64_t kLanes = 16;
typedef float Lanes __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t IntLanes __attribute__((vector_size(kLanes * sizeof(int32_t))));

inline Lanes load_lanes(const float* p) {
  Lanes v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void store_lanes(float* p, Lanes v) { std::memcpy(p, &v, sizeof(v)); }

inline Lanes splat(float x) { return Lanes{} + x; }

inline Lanes max_lanes(Lanes a, Lanes b) { return a > b ? a : b; }

inline int64_t round_up_lanes(int64_t n) { return (n + kLanes - 1) / kLanes * kLanes; }

// exp_nonpositive (common.h) on every lane: the same range reduction and polynomial. With
// AVX-512, k is one round instruction and 2^k is applied by vscalefps, 5 instructions where the
// portable version's floor by truncation and exponent arithmetic take 10 (the level-0 softmax
// runs one of these per 16 scores). -inf gives 0 on both paths.
inline Lanes exp_nonpositive(Lanes x) {
  const Lanes lowest = splat(-87.3f);
  const Lanes y = x < lowest ? lowest : x;
#if defined(__AVX512F__)
  const __m512 k = _mm512_roundscale_ps((__m512)(y * 1.44269504088896341f),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const Lanes p = exp_reduced(y, (Lanes)k);
  const __mmask16 normal = _mm512_cmp_ps_mask((__m512)x, (__m512)lowest, _CMP_GE_OQ);
  return (Lanes)_mm512_maskz_scalef_ps(normal, (__m512)p, k);
#else
  const Lanes z = y * 1.44269504088896341f + 0.5f;
  Lanes k = __builtin_convertvector(__builtin_convertvector(z, IntLanes), Lanes);
  k = k > z ? k - 1.f : k;  // truncation rounds up below zero
  const Lanes p = exp_reduced(y, k);
  const IntLanes bits = (__builtin_convertvector(k, IntLanes) + 127) << 23;
  Lanes scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x < lowest ? Lanes{} : p * scale;
#endif
}

// Lane i of the result is the sum of the lanes of v[i]: sixteen dot products finished at once.
// With AVX-512 a transpose-and-add tree does it in 30 shuffles and 15 adds, where summing each
// vector on its own takes 64 shuffles, each waiting for the one before.
inline Lanes sum_lanes16(const Lanes* v) {
#if defined(__AVX512F__)
  // The tree leaves the sum of input 4c + j in lane 4j + c, so the inputs go in transposed.
  __m512 x[8], y[4], z[2];
  for (int i = 0; i < 8; ++i) {
    const int a = 2 * i, b = 2 * i + 1;
    const __m512 va = (__m512)v[((a & 3) << 2) | (a >> 2)];
    const __m512 vb = (__m512)v[((b & 3) << 2) | (b >> 2)];
    // 128-bit quarters [a0 + a2, a1 + a3, b0 + b2, b1 + b3].
    x[i] = _mm512_add_ps(_mm512_shuffle_f32x4(va, vb, 0x44), _mm512_shuffle_f32x4(va, vb, 0xEE));
  }
  for (int i = 0; i < 4; ++i) {
    // Quarter q holds four partial sums of input 4i + q.
    y[i] = _mm512_add_ps(_mm512_shuffle_f32x4(x[2 * i], x[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(x[2 * i], x[2 * i + 1], 0xDD));
  }
  for (int i = 0; i < 2; ++i) {
    z[i] = _mm512_add_ps(_mm512_shuffle_ps(y[2 * i], y[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(y[2 * i], y[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  }
  const __m512 sums = _mm512_add_ps(_mm512_shuffle_ps(z[0], z[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                    _mm512_shuffle_ps(z[0], z[1], _MM_SHUFFLE(3, 1, 3, 1)));
  return (Lanes)sums;
#else
  Lanes out;
  for (int64_t i = 0; i < kLanes; ++i) {
    float sum = 0.f;
    for (int64_t j = 0; j < kLanes; ++j) sum += v[i][j];
    out[i] = sum;
  }
  return out;
#endif
}

}  // namespace ttscale
