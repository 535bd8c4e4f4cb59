// Shared vocabulary of the native kernels: dtypes, element conversion, checks.
// Kernels assume validated input: Python checks shapes, dtypes and values at the op boundary.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

namespace ttscale {

// Element type codes, mirrored in python/ttscale/backends/native.py.
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

#define TTSCALE_CHECK(cond, msg)                                                   \
  do {                                                                             \
    if (!(cond)) throw std::invalid_argument(std::string("ttscale: ") + (msg));    \
  } while (0)

template <typename T>
inline T* as_ptr(uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

// Host-side 16-bit float conversions (the CUDA side uses cuda_fp16.h / cuda_bf16.h).
inline float bf16_to_float(uint16_t h) {
  uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline uint16_t float_to_bf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40);  // NaN
  bits += 0x7fffu + ((bits >> 16) & 1u);  // round to nearest even
  return static_cast<uint16_t>(bits >> 16);
}

inline float fp16_to_float(uint16_t h) {
  uint32_t sign = (h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal: renormalise
      exp = 127 - 15 + 1;
      while ((mant & 0x400u) == 0) {
        mant <<= 1;
        --exp;
      }
      bits = sign | (exp << 23) | ((mant & 0x3ffu) << 13);
    }
  } else if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline uint16_t float_to_fp16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  uint32_t sign = (bits >> 16) & 0x8000u;
  uint32_t abs = bits & 0x7fffffffu;
  if (abs > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u);  // NaN
  if (abs >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // overflow -> inf
  if (abs < 0x38800000u) {  // subnormal or zero in fp16
    if (abs < 0x33000000u) return static_cast<uint16_t>(sign);
    uint32_t exp = abs >> 23;
    uint32_t mant = (abs & 0x7fffffu) | 0x800000u;
    uint32_t shift = 126 - exp;  // 14 - (exp - 112)
    uint32_t half_mant = mant >> shift;
    uint32_t rem = mant & ((1u << shift) - 1);
    uint32_t halfway = 1u << (shift - 1);
    if (rem > halfway || (rem == halfway && (half_mant & 1u))) ++half_mant;
    return static_cast<uint16_t>(sign | half_mant);
  }
  uint32_t rounded = abs + 0xfffu + ((abs >> 13) & 1u);  // round to nearest even
  return static_cast<uint16_t>(sign | ((rounded - 0x38000000u) >> 13));
}

// Load and store one element of the given dtype as float.
struct Float32 {
  using storage = float;
  static float load(storage x) { return x; }
  static storage store(float x) { return x; }
};
struct Float16 {
  using storage = uint16_t;
  static float load(storage x) { return fp16_to_float(x); }
  static storage store(float x) { return float_to_fp16(x); }
};
struct BFloat16 {
  using storage = uint16_t;
  static float load(storage x) { return bf16_to_float(x); }
  static storage store(float x) { return float_to_bf16(x); }
};

// Calls fn.template operator()<Elem>() for the element type of `dtype`.
template <typename Fn>
inline void dispatch_dtype(int dtype, Fn&& fn) {
  switch (static_cast<DType>(dtype)) {
    case DType::kFloat32: fn(Float32{}); break;
    case DType::kFloat16: fn(Float16{}); break;
    case DType::kBFloat16: fn(BFloat16{}); break;
    default: throw std::invalid_argument("ttscale: unknown dtype code " + std::to_string(dtype));
  }
}

// exp(x) for x <= 0 (a value minus the maximum it was taken over), in plain float arithmetic
// that the compiler vectorises, where std::exp is a scalar call: exp(x) = 2^k exp(r) with
// r = x - k ln 2 in [-ln 2 / 2, ln 2 / 2] and Cephes' degree-6 polynomial for exp(r), within
// 2 ulp of std::exp. Below -87.3 (exp under float's smallest normal, and -inf) it returns 0.
// exp(y - k ln 2) for |y - k ln 2| <= ln 2 / 2: ln 2 in two parts (exact product with k, then
// the correction) and the polynomial; on a float or on every lane of a vector of floats.
template <class F>
inline F exp_reduced(F y, F k) {
  const F r = y - k * 0.693359375f + k * 2.12194440e-4f;
  F p = r * 1.9875691500e-4f + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  return p * r * r + r + 1.f;
}

inline float exp_nonpositive(float x) {
  const float y = x < -87.3f ? -87.3f : x;
  const float k = std::floor(y * 1.44269504088896341f + 0.5f);
  const float p = exp_reduced(y, k);
  const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x < -87.3f ? 0.f : p * scale;
}

}  // namespace ttscale
