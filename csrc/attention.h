// Parameters of the paged two-level attention ops, filled in Python (backends/native.py).
// Pointers are addresses of contiguous tensors on one device; index tensors are int32.
#pragma once

#include <cstdint>

namespace ttscale {

struct AttentionParams {
  // q [total_q, Hq, D]; out like q; lse [total_q, Hq] float32.
  uintptr_t q = 0, out = 0, lse = 0;
  // Pool: [num_blocks, block_size, Hkv, D] for K and for V.
  uintptr_t k_cache = 0, v_cache = 0;
  // Level 0: per problem. prompt_block_tables [P, max_prompt_blocks], prompt_lens [P].
  uintptr_t prompt_block_tables = 0, prompt_lens = 0;
  // Level 1: per sequence. problem_ids [B], suffix_block_tables [B, max_suffix_blocks], suffix_lens [B].
  uintptr_t problem_ids = 0, suffix_block_tables = 0, suffix_lens = 0;
  // Prefill only: q_starts [B + 1], the packed query rows of sequence b are q_starts[b]..q_starts[b+1].
  uintptr_t q_starts = 0;
  // Decode plan (optional, 0 when absent): seq_order [B] sorts sequences by problem,
  // problem_starts [P + 1] delimits each problem's run in seq_order.
  uintptr_t seq_order = 0, problem_starts = 0;

  int64_t num_seqs = 0, num_problems = 0, total_q = 0;
  int64_t num_q_heads = 0, num_kv_heads = 0, head_dim = 0;
  int64_t num_blocks = 0, block_size = 0, max_prompt_blocks = 0, max_suffix_blocks = 0;
  float scale = 1.0f;
  int dtype = 0;
  uintptr_t stream = 0;  // cudaStream_t of the caller (CUDA ops only)
  // CUDA decode only: the device of the tensors, and a float32 workspace for split-K partial
  // results of workspace_floats elements (cascade_decode_workspace_floats_cuda says how many).
  int device = 0;
  uintptr_t workspace = 0;
  int64_t workspace_floats = 0;
};

// o [rows, H, D] in dtype, lse [rows, H] float32.
struct MergeParams {
  uintptr_t o_a = 0, lse_a = 0, o_b = 0, lse_b = 0, out = 0, lse = 0;
  int64_t rows = 0, heads = 0, head_dim = 0;
  int dtype = 0;
  uintptr_t stream = 0;
};

// k, v [n, Hkv, D]; slots [n] int64 (-1 skipped).
struct WriteKVParams {
  uintptr_t k_cache = 0, v_cache = 0, k = 0, v = 0, slots = 0;
  int64_t num_rows = 0, num_kv_heads = 0, head_dim = 0, num_slots = 0;
  int dtype = 0;
  uintptr_t stream = 0;
};

void cascade_decode_attention_cpu(const AttentionParams& p);
void paged_prefill_attention_cpu(const AttentionParams& p);
void merge_attention_states_cpu(const MergeParams& p);
void write_kv_cpu(const WriteKVParams& p);

#ifdef TTSCALE_WITH_CUDA
void cascade_decode_attention_cuda(const AttentionParams& p);
int64_t cascade_decode_workspace_floats_cuda(const AttentionParams& p);
#endif

}  // namespace ttscale
