// Parameters of the fused PRM step-scoring op, filled in Python (backends/cpu_prm.py).
// Pointers are addresses of contiguous tensors on one device.
#pragma once

#include <cstdint>

namespace ttscale {

// Head kinds and aggregations, mirrored in python/ttscale/backends/cpu_prm.py.
enum class PRMKind : int { kTwoToken = 0, kTwoClass = 1, kValue = 2 };
enum class PRMAgg : int { kLast = 0, kMin = 1, kProd = 2, kMean = 3 };

struct PRMParams {
  // hidden [T, H] in dtype; weight [rows, H] in dtype (rows 2, or 1 for kValue); bias [rows] in
  // dtype or 0 when absent; seq_ids [T] int64 in [0, S).
  uintptr_t hidden = 0, weight = 0, bias = 0, seq_ids = 0;
  // state_in, state_out [S, 2] float32 (aggregate, step count); scores [T] float32.
  uintptr_t state_in = 0, state_out = 0, scores = 0;
  int64_t num_steps = 0, hidden_size = 0, num_seqs = 0;
  int kind = 0, agg = 0, dtype = 0;
};

void prm_step_scores_cpu(const PRMParams& p);

}  // namespace ttscale
