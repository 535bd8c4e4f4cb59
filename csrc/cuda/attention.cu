// CUDA kernel of cascade_decode_attention (sm_80 and sm_90).
//
// Work decomposition (fp16/bf16, head dims 64 and 128; everything else takes the scalar
// fallback at the end of this file):
//   1. One launch holds two kinds of CTAs, so that the compute-bound level 0 and the
//      memory-bound level 1 run side by side on the GPU.
//      - Level 0 (the shared prompt): a CTA of 4 warps takes 64 query rows of one problem and
//        one KV head. A row is (sequence of the problem, query head of the KV head's group), so
//        the rows of all of the problem's sequences are the M dimension of a tensor-core matrix
//        product (Hydragen, FlashInfer's cascade) and every K/V tile of the prompt is read once
//        per 64 rows, from L2, and once per problem from DRAM. Each warp multiplies its 16 rows
//        by 64-key tiles with mma.sync m16n8k16 under an online softmax (FlashAttention-2).
//        Long prompts are split into `prompt_splits` key ranges (split-K) for parallelism.
//      - Level 1 (each sequence's own paged suffix): each warp takes one (sequence, KV head,
//        16 of the group's query heads, suffix split) and stages its own 16-key tiles.
//      Each warp writes its rows' partial results (output normalised, log2-sum-exp) to a
//      float32 workspace of `splits = prompt_splits + suffix_splits` slots per row, allocated
//      by the caller (cascade_decode_workspace_floats_cuda gives its size).
//   2. A merge kernel combines each row's slots by their log-sum-exp and writes out and lse
//      (natural log). An empty level gives lse -inf and weight 0; a row with nothing gives 0.
// Grid sizes come from host-known bounds (B, P, Hkv, table widths), never from device memory,
// so the op can be captured in a CUDA graph; CTAs beyond the real work exit at once.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

#include "attention.h"
#include "common.h"

namespace ttscale {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kWarpRows = 16;                      // the M of one mma.m16n8k16
constexpr int kPromptRows = kWarps * kWarpRows;    // query rows sharing each prompt tile
constexpr int kPromptKeys = 64;                    // keys per level-0 tile (whole CTA)
constexpr int kSuffixKeys = 16;                    // keys per level-1 tile (one warp)
constexpr int kPad = 8;  // elements added to each smem row: rows start 16 bytes apart modulo
                         // 128, so the 8 row addresses of an ldmatrix hit distinct banks
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kLog2e = 1.4426950408889634f;

// Shared memory of one CTA, in elements: two pipeline stages of a K and a V tile, either one
// 64-key tile for the CTA (level 0) or one 16-key tile per warp (level 1); both are the same size.
template <int D>
__host__ __device__ constexpr int smem_elems() {
  static_assert(2 * 2 * kPromptKeys == kWarps * 2 * 2 * kSuffixKeys, "level layouts differ");
  return 2 * 2 * kPromptKeys * (D + kPad);
}

// ---------------------------------------------------------------------------------------------
// Elements and PTX wrappers.

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x) {
  if constexpr (std::is_same_v<T, __half>) return __float2half_rn(x);
  else if constexpr (std::is_same_v<T, __nv_bfloat16>) return __float2bfloat16_rn(x);
  else return x;
}

// Two floats as one 32-bit register of a 16-bit A fragment; the lower column in the low half.
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  uint32_t bits;
  if constexpr (std::is_same_v<T, __half>) {
    const __half2 h = __floats2half2_rn(lo, hi);
    memcpy(&bits, &h, 4);
  } else {
    const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    memcpy(&bits, &h, 4);
  }
  return bits;
}

__device__ __forceinline__ uint32_t smem_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared, asynchronously; zero-filled when !valid (src is then not read).
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_address(dst)),
               "l"(src), "r"(valid ? 16 : 0)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Four 8x8 b16 matrices; lanes 8i..8i+7 give the row addresses of matrix i, and register i
// receives matrix i with lane l holding row l/4, columns 2(l%4), 2(l%4)+1 (.trans: the
// transpose, i.e. rows 2(l%4), 2(l%4)+1 of column l/4). PTX ISA, "ldmatrix".
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_address(p)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_address(p)));
}

// d += a * b, m16n8k16, fp32 accumulators. Fragment layouts (PTX ISA, "Matrix Fragments for
// mma.m16n8k16 with floating point type"), with g = lane / 4 and t = lane % 4:
//   A (16x16, row): a[0] = (row g, cols 2t..2t+1), a[1] = (row g+8, cols 2t..2t+1),
//                   a[2] = (row g, cols 2t+8..2t+9), a[3] = (row g+8, cols 2t+8..2t+9);
//   B (16x8, col):  b0 = (rows 2t..2t+1, col g), b1 = (rows 2t+8..2t+9, col g);
//   C/D (16x8):     d[0], d[1] = (row g, cols 2t, 2t+1), d[2], d[3] = (row g+8, same cols).
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                          uint32_t b1) {
  if constexpr (std::is_same_v<T, __half>) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

template <int THREADS>
__device__ __forceinline__ void group_sync() {
  if constexpr (THREADS == 32) __syncwarp();
  else __syncthreads();
}

// ---------------------------------------------------------------------------------------------
// The tensor-core kernel. Kernels take the AttentionParams filled in Python (addresses, sizes)
// and a Split: the sizes the host derives for one launch.

template <typename T>
__device__ __forceinline__ T* at(uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

struct Split {
  int group, block_shift;           // Hq / Hkv, log2(block_size)
  int prompt_splits, prompt_chunk;  // level 0: key ranges per prompt, keys per range
  int suffix_splits, suffix_chunk;  // level 1: the same per suffix
  int row_chunks;   // ceil(group / 16): level-1 warps per (sequence, KV head, suffix split)
  int level0_ctas;  // CTAs [0, level0_ctas) do level 0, the rest level 1
  float scale_log2;  // softmax scale * log2(e): scores are kept in base 2
  __host__ __device__ int splits() const { return prompt_splits + suffix_splits; }
};

// Workspace: partial outputs [B * Hq, splits, D], then partial log2-sum-exps [B * Hq, splits].
__device__ __forceinline__ float* partial_lse(const AttentionParams& p, const Split& s) {
  return at<float>(p.workspace) + p.num_seqs * p.num_q_heads * s.splits() * p.head_dim;
}

// Where one level's keys live: tokens [begin, end) of a block table, for one KV head.
struct KeyRange {
  const int32_t* table;
  int begin, end, kv_head;
};

// Stage keys [k0, k0 + KEYS) into the K and V tiles ([KEYS][D + kPad]), one 16-byte chunk per
// copy, spread over the THREADS threads of the group; keys at or past the end are zero-filled so
// that their p = 0 never meets a NaN.
template <typename T, int D, int KEYS, int THREADS>
__device__ __forceinline__ void load_tile(const AttentionParams& p, const Split& s,
                                          const KeyRange& keys, int k0, T* k_tile, T* v_tile,
                                          int tid) {
  constexpr int kChunks = D / 8;  // 16-byte chunks per key row
  static_assert(KEYS * kChunks % THREADS == 0, "every thread copies the same number of chunks");
#pragma unroll
  for (int i = 0; i < KEYS * kChunks / THREADS; ++i) {
    const int c = tid + i * THREADS;
    const int key = c / kChunks, part = c % kChunks;
    const int k = k0 + key;
    const bool valid = k < keys.end;
    int64_t offset = 0;
    if (valid) {
      const int64_t slot = int64_t(keys.table[k >> s.block_shift]) * p.block_size +
                           (k & (p.block_size - 1));
      offset = (slot * p.num_kv_heads + keys.kv_head) * D + part * 8;
    }
    cp_async_16(k_tile + key * (D + kPad) + part * 8, at<const T>(p.k_cache) + offset, valid);
    cp_async_16(v_tile + key * (D + kPad) + part * 8, at<const T>(p.v_cache) + offset, valid);
  }
}

// One warp's 16 query rows attend to `keys`, staged in KEYS-key tiles through `smem` (two
// stages) by a group of THREADS threads that share the tiles (the CTA at level 0, the warp at
// level 1; all of them call this with the same keys). rows[h] is the q/out row
// (b * Hq + query head) of this thread's fragment row lane/4 + 8h, or -1 for padding. Writes each
// real row's partial result into workspace slot `slot`.
template <typename T, int D, int KEYS, int THREADS>
__device__ void attend_keys(const AttentionParams& p, const Split& s, const KeyRange& keys,
                            const int64_t (&rows)[2], int slot, T* smem, int tid) {
  constexpr int LD = D + kPad;
  const int lane = threadIdx.x % 32, t = lane % 4;

  // Q as A fragments, one per 16 dims: qa[kk] covers dims 16kk..16kk+15 (layout at mma_16816).
  uint32_t qa[D / 16][4];
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int64_t row = rows[i % 2];  // i = 0, 2: row g; i = 1, 3: row g + 8
      const int col = 16 * kk + 2 * t + 8 * (i / 2);
      qa[kk][i] = row < 0 ? 0u : *at<const uint32_t>(p.q + (row * D + col) * sizeof(T));
    }
  }

  // Online softmax state of rows g and g + 8: running max m (base 2), this thread's part of the
  // running sum l (its columns only; summed over the quad at the end), output accumulators.
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
  float acc[D / 8][4];
#pragma unroll
  for (int nb = 0; nb < D / 8; ++nb) acc[nb][0] = acc[nb][1] = acc[nb][2] = acc[nb][3] = 0.f;

  const int num_tiles = keys.end > keys.begin ? (keys.end - keys.begin + KEYS - 1) / KEYS : 0;
  if (num_tiles > 0)
    load_tile<T, D, KEYS, THREADS>(p, s, keys, keys.begin, smem, smem + KEYS * LD, tid);
  cp_async_commit();
  for (int tile = 0; tile < num_tiles; ++tile) {
    const int k0 = keys.begin + tile * KEYS;
    if (tile + 1 < num_tiles) {
      T* next = smem + ((tile + 1) % 2) * 2 * KEYS * LD;
      load_tile<T, D, KEYS, THREADS>(p, s, keys, k0 + KEYS, next, next + KEYS * LD, tid);
    }
    cp_async_commit();
    cp_async_wait<1>();  // this tile's copies (the older group) have landed
    group_sync<THREADS>();
    const T* k_tile = smem + (tile % 2) * 2 * KEYS * LD;
    const T* v_tile = k_tile + KEYS * LD;

    // S = Q K^T, [16 x KEYS]: sc[nb] is the C fragment of keys 8nb..8nb+7. K rows are B's
    // columns; one ldmatrix_x4 gives b0, b1 of two consecutive 16-dim steps kk, kk + 1.
    float sc[KEYS / 8][4];
#pragma unroll
    for (int nb = 0; nb < KEYS / 8; ++nb) {
      sc[nb][0] = sc[nb][1] = sc[nb][2] = sc[nb][3] = 0.f;
#pragma unroll
      for (int kk = 0; kk < D / 16; kk += 2) {
        uint32_t b[4];
        ldmatrix_x4(b, k_tile + (8 * nb + lane % 8) * LD + 16 * kk + 8 * (lane / 8));
        mma_16816<T>(sc[nb], qa[kk], b[0], b[1]);
        mma_16816<T>(sc[nb], qa[kk + 1], b[2], b[3]);
      }
    }

    // Scale to base 2, mask keys past the end, update the running max of both rows.
    float tile_max[2] = {m[0], m[1]};
#pragma unroll
    for (int nb = 0; nb < KEYS / 8; ++nb) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int key = k0 + 8 * nb + 2 * t + i % 2;
        sc[nb][i] = key < keys.end ? sc[nb][i] * s.scale_log2 : -INFINITY;
        tile_max[i / 2] = fmaxf(tile_max[i / 2], sc[nb][i]);
      }
    }
    float alpha[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {  // the quad (t = 0..3) holds one row's columns
      tile_max[h] = fmaxf(tile_max[h], __shfl_xor_sync(0xffffffffu, tile_max[h], 1));
      tile_max[h] = fmaxf(tile_max[h], __shfl_xor_sync(0xffffffffu, tile_max[h], 2));
      // The tile has a key, so the new max is finite; on the first tile exp2(-inf) = 0.
      alpha[h] = exp2f(m[h] - tile_max[h]);
      m[h] = tile_max[h];
      l[h] *= alpha[h];
    }
#pragma unroll
    for (int nb = 0; nb < KEYS / 8; ++nb) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        sc[nb][i] = exp2f(sc[nb][i] - m[i / 2]);
        l[i / 2] += sc[nb][i];
      }
    }
#pragma unroll
    for (int nb = 0; nb < D / 8; ++nb) {
      acc[nb][0] *= alpha[0], acc[nb][1] *= alpha[0];
      acc[nb][2] *= alpha[1], acc[nb][3] *= alpha[1];
    }

    // O += P V. The C fragments of key blocks 2c, 2c+1 are exactly the A fragment of the
    // 16-key step c; V rows (keys) are B's rows, loaded transposed: one ldmatrix_x4_trans gives
    // b0, b1 of the output dim blocks nb and nb + 1.
#pragma unroll
    for (int c = 0; c < KEYS / 16; ++c) {
      const uint32_t pa[4] = {
          pack2<T>(sc[2 * c][0], sc[2 * c][1]), pack2<T>(sc[2 * c][2], sc[2 * c][3]),
          pack2<T>(sc[2 * c + 1][0], sc[2 * c + 1][1]), pack2<T>(sc[2 * c + 1][2], sc[2 * c + 1][3])};
#pragma unroll
      for (int nb = 0; nb < D / 8; nb += 2) {
        uint32_t b[4];
        const int key = 16 * c + lane % 8 + 8 * (lane / 8 % 2), dim = 8 * nb + 8 * (lane / 16);
        ldmatrix_x4_trans(b, v_tile + key * LD + dim);
        mma_16816<T>(acc[nb], pa, b[0], b[1]);
        mma_16816<T>(acc[nb + 1], pa, b[2], b[3]);
      }
    }
    group_sync<THREADS>();  // everyone is done with this stage before it is refilled
  }

  // Partial result of each real row: out = acc / l and log2-sum-exp m + log2(l); a row that saw
  // nothing gives 0 and -inf.
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    l[h] += __shfl_xor_sync(0xffffffffu, l[h], 1);
    l[h] += __shfl_xor_sync(0xffffffffu, l[h], 2);
  }
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    if (rows[h] < 0) continue;
    const int64_t entry = rows[h] * s.splits() + slot;
    const float inv = l[h] > 0.f ? 1.f / l[h] : 0.f;
    float* o = at<float>(p.workspace) + entry * D + 2 * t;
#pragma unroll
    for (int nb = 0; nb < D / 8; ++nb)
      *reinterpret_cast<float2*>(o + 8 * nb) =
          make_float2(acc[nb][2 * h] * inv, acc[nb][2 * h + 1] * inv);
    if (t == 0) partial_lse(p, s)[entry] = l[h] > 0.f ? m[h] + log2f(l[h]) : -INFINITY;
  }
}

// The first level-0 tile of problem i. Problem i has ceil(n_i G / 64) tiles, and
// first_tile(i + 1) - first_tile(i) = 1 + floor(starts[i+1] G / 64) - floor(starts[i] G / 64)
// >= ceil(n_i G / 64), so tiles [first_tile(i), first_tile(i) + ceil(n_i G / 64)) are disjoint
// and all lie below first_tile(P) = P + floor(B G / 64), a bound the host knows.
__device__ __forceinline__ int64_t first_tile(const AttentionParams& p, const Split& s, int i) {
  return i + int64_t(at<const int32_t>(p.problem_starts)[i]) * s.group / kPromptRows;
}

// The problem owning level-0 tile `tile`: the last i with first_tile(i) <= tile, found by a
// warp-wide 32-ary search (two rounds for a thousand problems). Every lane gets the answer.
__device__ int find_problem(const AttentionParams& p, const Split& s, int64_t tile) {
  const int lane = threadIdx.x % 32;
  int lo = 0, hi = p.num_problems;  // first_tile(lo) <= tile, and the answer is in [lo, hi)
  while (hi - lo > 1) {
    const int step = (hi - lo + 31) / 32;
    const int i = lo + lane * step;
    const unsigned yes = __ballot_sync(0xffffffffu, i < hi && first_tile(p, s, i) <= tile);
    lo += (31 - __clz(yes)) * step;  // lane 0 (i = lo) always votes yes
    hi = min(hi, lo + step);
  }
  return lo;
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads)
    cascade_decode_kernel(const AttentionParams p, const Split s) {
  extern __shared__ __align__(16) unsigned char smem_bytes[];
  T* smem = reinterpret_cast<T*>(smem_bytes);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, G = s.group;
  const int kv_heads = p.num_kv_heads;
  int64_t rows[2];

  if (static_cast<int>(blockIdx.x) < s.level0_ctas) {
    // Level 0: CTA index = (tile * prompt_splits + split) * Hkv + kv_head.
    const int kv_head = blockIdx.x % kv_heads;
    const int split = blockIdx.x / kv_heads % s.prompt_splits;
    const int64_t tile = blockIdx.x / kv_heads / s.prompt_splits;
    const int i = find_problem(p, s, tile);
    const int32_t* starts = at<const int32_t>(p.problem_starts);
    const int64_t problem_rows = int64_t(starts[i + 1] - starts[i]) * G;
    const int64_t row0 = (tile - first_tile(p, s, i)) * kPromptRows;
    if (row0 >= problem_rows) return;  // a spare tile: the whole CTA leaves together
    for (int h = 0; h < 2; ++h) {
      // Problem row r is query head g = r % G of the problem's (r / G)-th sequence.
      const int64_t r = row0 + warp * kWarpRows + lane / 4 + 8 * h;
      const int64_t b = r < problem_rows ? at<const int32_t>(p.seq_order)[starts[i] + r / G] : -1;
      rows[h] = b < 0 ? -1 : b * p.num_q_heads + kv_head * G + r % G;
    }
    const int begin = split * s.prompt_chunk;
    const int end = min(at<const int32_t>(p.prompt_lens)[i], begin + s.prompt_chunk);
    const KeyRange keys{at<const int32_t>(p.prompt_block_tables) + i * p.max_prompt_blocks,
                        begin, end, kv_head};
    attend_keys<T, D, kPromptKeys, kThreads>(p, s, keys, rows, split, smem, threadIdx.x);
  } else {
    // Level 1: warp item = ((b * suffix_splits + split) * row_chunks + chunk) * Hkv + kv_head.
    const int64_t item = (int64_t(blockIdx.x) - s.level0_ctas) * kWarps + warp;
    const int kv_head = item % kv_heads;
    const int chunk = item / kv_heads % s.row_chunks;
    const int split = item / kv_heads / s.row_chunks % s.suffix_splits;
    const int64_t b = item / kv_heads / s.row_chunks / s.suffix_splits;
    if (b >= p.num_seqs) return;  // only this warp: level 1 never syncs the CTA
    for (int h = 0; h < 2; ++h) {
      const int g = chunk * kWarpRows + lane / 4 + 8 * h;
      rows[h] = g < G ? b * p.num_q_heads + kv_head * G + g : -1;
    }
    const int begin = split * s.suffix_chunk;
    const int end = min(at<const int32_t>(p.suffix_lens)[b], begin + s.suffix_chunk);
    const KeyRange keys{at<const int32_t>(p.suffix_block_tables) + b * p.max_suffix_blocks,
                        begin, end, kv_head};
    T* warp_smem = smem + warp * (smem_elems<D>() / kWarps);
    attend_keys<T, D, kSuffixKeys, 32>(p, s, keys, rows, s.prompt_splits + split, warp_smem, lane);
  }
}

// One warp per (sequence, query head) row: combine its partial results by their log2-sum-exps
// into out (T) and lse (natural log).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    merge_partials_kernel(const AttentionParams p, const Split s) {
  const int64_t row = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32, D = p.head_dim, splits = s.splits();
  if (row >= p.num_seqs * p.num_q_heads) return;
  const float* row_o = at<const float>(p.workspace) + row * splits * D;
  const float* row_lse = partial_lse(p, s) + row * splits;
  float max_lse = -INFINITY;
  for (int i = 0; i < splits; ++i) max_lse = fmaxf(max_lse, row_lse[i]);
  T* out = at<T>(p.out) + row * D;
  float* lse = at<float>(p.lse) + row;
  if (max_lse == -INFINITY) {
    for (int d = lane; d < D; d += 32) out[d] = from_float<T>(0.f);
    if (lane == 0) *lse = -INFINITY;
    return;
  }
  float total = 0.f;
  for (int i = 0; i < splits; ++i) total += exp2f(row_lse[i] - max_lse);
  for (int d = lane; d < D; d += 32) {
    float sum = 0.f;
    for (int i = 0; i < splits; ++i) sum += exp2f(row_lse[i] - max_lse) * row_o[i * D + d];
    out[d] = from_float<T>(sum / total);
  }
  if (lane == 0) *lse = (max_lse + log2f(total)) * kLn2;
}

// ---------------------------------------------------------------------------------------------
// Scalar fallback (float32, head dims other than 64 and 128, unaligned pointers): one warp per
// (sequence, query head) walks its prompt, then its suffix, 32 keys at a time, a lane per key.

template <typename T>
__device__ void fallback_level(const AttentionParams& p, const Split& s, const int32_t* table,
                               int len, int kv_head, const float* q, float* acc, float& m,
                               float& l) {
  const int lane = threadIdx.x % 32, D = p.head_dim;
  for (int k0 = 0; k0 < len; k0 += 32) {
    const int k = k0 + lane;
    int64_t row = 0;  // element offset of key k's row for this KV head
    float score = -INFINITY;
    if (k < len) {
      const int64_t slot =
          int64_t(table[k >> s.block_shift]) * p.block_size + (k & (p.block_size - 1));
      row = (slot * p.num_kv_heads + kv_head) * D;
      score = 0.f;
      for (int d = 0; d < D; ++d) score += q[d] * to_float(at<const T>(p.k_cache)[row + d]);
    }
    float tile_max = score;
    for (int off = 16; off > 0; off /= 2)
      tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, off));
    const float m_new = fmaxf(m, tile_max);  // finite: the tile has a key
    const float alpha = exp2f(m - m_new);
    const float weight = exp2f(score - m_new);
    float weight_sum = weight;
    for (int off = 16; off > 0; off /= 2)
      weight_sum += __shfl_xor_sync(0xffffffffu, weight_sum, off);
    l = l * alpha + weight_sum;
    m = m_new;
    for (int d = lane; d < D; d += 32) acc[d] *= alpha;
    for (int j = 0; j < min(32, len - k0); ++j) {
      const float w = __shfl_sync(0xffffffffu, weight, j);
      const int64_t row_j = __shfl_sync(0xffffffffu, row, j);
      for (int d = lane; d < D; d += 32) acc[d] += w * to_float(at<const T>(p.v_cache)[row_j + d]);
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    decode_fallback_kernel(const AttentionParams p, const Split s) {
  extern __shared__ float fallback_smem[];  // per warp: q [D] (scaled), acc [D]
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, D = p.head_dim;
  const int64_t row = int64_t(blockIdx.x) * kWarps + warp;  // b * Hq + query head
  if (row >= p.num_seqs * p.num_q_heads) return;
  const int64_t b = row / p.num_q_heads;
  const int kv_head = row % p.num_q_heads / s.group;
  const int i = at<const int32_t>(p.problem_ids)[b];
  float* q = fallback_smem + warp * 2 * D;
  float* acc = q + D;
  for (int d = lane; d < D; d += 32) {
    q[d] = to_float(at<const T>(p.q)[row * D + d]) * s.scale_log2;
    acc[d] = 0.f;
  }
  __syncwarp();
  float m = -INFINITY, l = 0.f;
  fallback_level<T>(p, s, at<const int32_t>(p.prompt_block_tables) + i * p.max_prompt_blocks,
                    at<const int32_t>(p.prompt_lens)[i], kv_head, q, acc, m, l);
  fallback_level<T>(p, s, at<const int32_t>(p.suffix_block_tables) + b * p.max_suffix_blocks,
                    at<const int32_t>(p.suffix_lens)[b], kv_head, q, acc, m, l);
  T* out = at<T>(p.out) + row * D;
  for (int d = lane; d < D; d += 32) out[d] = from_float<T>(l > 0.f ? acc[d] / l : 0.f);
  if (lane == 0) at<float>(p.lse)[row] = l > 0.f ? (m + log2f(l)) * kLn2 : -INFINITY;
}

// ---------------------------------------------------------------------------------------------
// Host side.

void cuda_check(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("ttscale: ") + what + ": " + cudaGetErrorString(err));
}

int64_t ceil_div(int64_t x, int64_t y) { return (x + y - 1) / y; }

bool uses_tensor_cores(const AttentionParams& p) {
  const auto dtype = static_cast<DType>(p.dtype);
  const bool aligned = p.k_cache % 16 == 0 && p.v_cache % 16 == 0 && p.q % 4 == 0;
  return (dtype == DType::kFloat16 || dtype == DType::kBFloat16) &&
         (p.head_dim == 64 || p.head_dim == 128) && aligned;
}

int num_sms(int device) {
  int n = 0;
  cuda_check(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device),
             "cudaDeviceGetAttribute");
  return n;
}

// `count` ranges of whole `unit`s covering [0, max_len): at most `want` ranges of at least
// `min_len` keys. Returns {count, keys per range}.
std::pair<int, int> split_keys(int64_t max_len, int64_t want, int64_t min_len, int unit) {
  const int64_t count = std::clamp<int64_t>(want, 1, std::max<int64_t>(1, ceil_div(max_len, min_len)));
  const int64_t len = ceil_div(std::max<int64_t>(1, ceil_div(max_len, count)), unit) * unit;
  return {int(std::max<int64_t>(1, ceil_div(max_len, len))), int(len)};
}

// How a launch divides the work: a function of host-known sizes only (CUDA-graph capture).
Split choose_split(const AttentionParams& p) {
  Split s{};
  s.group = p.num_q_heads / p.num_kv_heads;
  while ((int64_t(1) << s.block_shift) < p.block_size) ++s.block_shift;
  s.scale_log2 = p.scale * kLog2e;
  if (!uses_tensor_cores(p)) return s;
  const int sms = num_sms(p.device);
  const int64_t level0_tiles = p.num_problems + p.num_seqs * s.group / kPromptRows;  // see first_tile()
  s.row_chunks = ceil_div(s.group, kWarpRows);
  // Level 0 is compute-bound: split the prompts until there are about two CTAs per SM, keeping
  // at least 256 keys per split.
  std::tie(s.prompt_splits, s.prompt_chunk) =
      split_keys(p.max_prompt_blocks * p.block_size,
                 ceil_div(2 * sms, level0_tiles * p.num_kv_heads), 256, kPromptKeys);
  // Level 1 is memory-bound: split long suffixes until about 16 warps per SM have work,
  // keeping at least 128 keys per split.
  std::tie(s.suffix_splits, s.suffix_chunk) =
      split_keys(p.max_suffix_blocks * p.block_size,
                 ceil_div(16 * sms, p.num_seqs * p.num_kv_heads * s.row_chunks), 128, kSuffixKeys);
  const int64_t level0_ctas = level0_tiles * s.prompt_splits * p.num_kv_heads;
  TTSCALE_CHECK(level0_ctas <= INT_MAX / 2, "batch too large for one launch");
  s.level0_ctas = level0_ctas;
  return s;
}

int64_t workspace_floats(const AttentionParams& p, const Split& s) {
  return p.num_seqs * p.num_q_heads * s.splits() * (p.head_dim + 1);
}

template <typename T, int D>
void launch_tensor_cores(const AttentionParams& p, const Split& s, cudaStream_t stream) {
  TTSCALE_CHECK(p.seq_order != 0 && p.problem_starts != 0, "the CUDA decode kernel needs a plan");
  TTSCALE_CHECK(p.num_problems > 0, "problem_ids name problems, but prompt_lens is empty");
  TTSCALE_CHECK(p.workspace_floats >= workspace_floats(p, s),
                "workspace smaller than cascade_decode_workspace_floats_cuda asks for");
  const int64_t level1_ctas =
      ceil_div(p.num_seqs * p.num_kv_heads * s.row_chunks * s.suffix_splits, kWarps);
  TTSCALE_CHECK(level1_ctas <= INT_MAX / 2, "batch too large for one launch");
  const int smem = smem_elems<D>() * sizeof(T);
  cuda_check(cudaFuncSetAttribute(cascade_decode_kernel<T, D>,
                                  cudaFuncAttributeMaxDynamicSharedMemorySize, smem),
             "cudaFuncSetAttribute");
  cascade_decode_kernel<T, D><<<unsigned(s.level0_ctas + level1_ctas), kThreads, smem, stream>>>(p, s);
  cuda_check(cudaGetLastError(), "cascade_decode_kernel launch");
  const int64_t merge_ctas = ceil_div(p.num_seqs * p.num_q_heads, kWarps);
  merge_partials_kernel<T><<<unsigned(merge_ctas), kThreads, 0, stream>>>(p, s);
  cuda_check(cudaGetLastError(), "merge_partials_kernel launch");
}

template <typename T>
void launch(const AttentionParams& p) {
  const Split s = choose_split(p);
  const auto stream = reinterpret_cast<cudaStream_t>(p.stream);
  if constexpr (!std::is_same_v<T, float>) {
    if (uses_tensor_cores(p)) {
      if (p.head_dim == 64) return launch_tensor_cores<T, 64>(p, s, stream);
      return launch_tensor_cores<T, 128>(p, s, stream);
    }
  }
  const int64_t smem = int64_t(kWarps) * 2 * p.head_dim * sizeof(float);
  TTSCALE_CHECK(smem <= 48 * 1024, "head_dim too large for the CUDA fallback kernel");
  const int64_t ctas = ceil_div(p.num_seqs * p.num_q_heads, kWarps);
  decode_fallback_kernel<T><<<unsigned(ctas), kThreads, smem, stream>>>(p, s);
  cuda_check(cudaGetLastError(), "decode_fallback_kernel launch");
}

}  // namespace

int64_t cascade_decode_workspace_floats_cuda(const AttentionParams& p) {
  if (p.num_seqs == 0 || p.num_q_heads == 0 || !uses_tensor_cores(p)) return 0;
  return workspace_floats(p, choose_split(p));
}

void cascade_decode_attention_cuda(const AttentionParams& p) {
  if (p.num_seqs == 0 || p.num_q_heads == 0) return;
  // The module links its own (static) CUDA runtime, whose current device is not torch's.
  cuda_check(cudaSetDevice(p.device), "cudaSetDevice");
  switch (static_cast<DType>(p.dtype)) {
    case DType::kFloat32: return launch<float>(p);
    case DType::kFloat16: return launch<__half>(p);
    case DType::kBFloat16: return launch<__nv_bfloat16>(p);
  }
  throw std::invalid_argument("ttscale: unknown dtype code " + std::to_string(p.dtype));
}

}  // namespace ttscale
