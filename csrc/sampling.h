// Parameters of the sample op, filled in Python (backends/cpu_sampling.py), and the op's
// counter-based random numbers, which every backend computes bit for bit (python/ttscale/
// reference/sampling.py is the specification).
#pragma once

#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#define TTSCALE_HOST_DEVICE __host__ __device__
#else
#define TTSCALE_HOST_DEVICE
#endif

namespace ttscale {

struct SampleParams {
  // logits [B, V] in dtype; temperature, top_p, min_p float32 [B]; top_k int32 [B]; offsets int64 [B].
  uintptr_t logits = 0, temperature = 0, top_k = 0, top_p = 0, min_p = 0, offsets = 0;
  // tokens int64 [B]; logprobs float32 [B]; top_ids int64 and top_logprobs float32 [B, num_logprobs].
  uintptr_t tokens = 0, logprobs = 0, top_ids = 0, top_logprobs = 0;
  int64_t batch = 0, vocab = 0, num_logprobs = 0;
  uint64_t seed = 0;
  int dtype = 0;
  uintptr_t stream = 0;  // cudaStream_t of the caller (CUDA ops only)
};

// murmur3's 32-bit finaliser.
TTSCALE_HOST_DEVICE inline uint32_t fmix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  h *= 0xC2B2AE35u;
  h ^= h >> 16;
  return h;
}

// One row's stream of uniforms: token i draws fmix32(i * step + key).
struct SampleRng {
  uint32_t key, step;

  TTSCALE_HOST_DEVICE SampleRng(uint64_t seed, int64_t offset) {
    const uint64_t off = static_cast<uint64_t>(offset);
    const uint32_t k = fmix32(fmix32(static_cast<uint32_t>(seed) ^ 0x6A09E667u) ^ static_cast<uint32_t>(seed >> 32));
    key = fmix32(fmix32(static_cast<uint32_t>(off) ^ k) ^ static_cast<uint32_t>(off >> 32));
    step = fmix32(key ^ 0xBB67AE85u) | 1u;
  }

  // (2 * (bits >> 9) + 1) / 2**24: exact in float32, strictly inside (0, 1).
  TTSCALE_HOST_DEVICE float uniform(uint32_t token) const {
    const uint32_t bits = fmix32(token * step + key);
    return static_cast<float>(bits >> 9) * 0x1p-23f + 0x1p-24f;
  }
};

void sample_cpu(const SampleParams& p);

}  // namespace ttscale
