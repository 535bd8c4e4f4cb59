// Parameters of select_and_fork and copy_blocks, filled in Python (backends/cpu_select.py).
// Pointers are addresses of contiguous tensors on one device; index tensors are int32.
#pragma once

#include <cstdint>

namespace ttscale {

struct SelectParams {
  // Inputs: scores [C] float32, group_offsets [G + 1], keep [G], children [G],
  // block_tables [C, max_blocks], lens [C].
  uintptr_t scores = 0, group_offsets = 0, keep = 0, children = 0, block_tables = 0, lens = 0;
  // Pool state, updated in place: ref_counts [num_blocks], free_stack [num_blocks],
  // free_top [1], status [1].
  uintptr_t ref_counts = 0, free_stack = 0, free_top = 0, status = 0;
  // Outputs: kept [G, max_keep], num_kept [G], parents [num_slots], child_offsets [G + 1],
  // child_tables [num_slots, max_blocks], child_lens [num_slots], copy_src/copy_dst [num_copies].
  uintptr_t kept = 0, num_kept = 0, parents = 0, child_offsets = 0, child_tables = 0,
            child_lens = 0, copy_src = 0, copy_dst = 0;

  int64_t num_candidates = 0, num_groups = 0, max_blocks = 0, block_size = 0, num_blocks = 0;
  int64_t max_keep = 0, num_slots = 0, num_copies = 0;
  uintptr_t stream = 0;
};

// Caches [num_layers, num_blocks, block_bytes]; src, dst [num_pairs] int32 (-1 skipped).
struct CopyBlocksParams {
  uintptr_t k_cache = 0, v_cache = 0, src = 0, dst = 0;
  int64_t num_pairs = 0, num_layers = 0, num_blocks = 0, block_bytes = 0;
  uintptr_t stream = 0;
};

// Status flag set when the free stack ran out
// (python/ttscale/reference/block_pool.py: POOL_EXHAUSTED).
constexpr int32_t kPoolExhausted = 1;

void select_and_fork_cpu(const SelectParams& p);
void copy_blocks_cpu(const CopyBlocksParams& p);

}  // namespace ttscale
