// C++ CPU kernels of select_and_fork and copy_blocks: the block pool's bookkeeping, in the
// order python/ttscale/reference/block_pool.py states it (the CPU engine's path, so plain and
// sequential: the work is a few passes over the candidates' tables).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <vector>

#include "common.h"
#include "select.h"

namespace ttscale {

void select_and_fork_cpu(const SelectParams& p) {
  const float* scores = as_ptr<const float>(p.scores);
  const int32_t* offsets = as_ptr<const int32_t>(p.group_offsets);
  const int32_t* keep = as_ptr<const int32_t>(p.keep);
  const int32_t* children = as_ptr<const int32_t>(p.children);
  const int32_t* tables = as_ptr<const int32_t>(p.block_tables);
  const int32_t* lens = as_ptr<const int32_t>(p.lens);
  int32_t* counts = as_ptr<int32_t>(p.ref_counts);
  int32_t* stack = as_ptr<int32_t>(p.free_stack);
  int32_t* kept = as_ptr<int32_t>(p.kept);
  int32_t* child_offsets = as_ptr<int32_t>(p.child_offsets);
  int32_t* parents_out = as_ptr<int32_t>(p.parents);
  int32_t* child_tables = as_ptr<int32_t>(p.child_tables);
  int32_t* child_lens = as_ptr<int32_t>(p.child_lens);
  int32_t* copy_src = as_ptr<int32_t>(p.copy_src);
  int32_t* copy_dst = as_ptr<int32_t>(p.copy_dst);
  int32_t top = *as_ptr<int32_t>(p.free_top);
  int32_t status = *as_ptr<int32_t>(p.status);
  const int64_t W = p.max_blocks, BS = p.block_size, K = p.max_keep;
  auto used = [&](int64_t i) { return (lens[i] + BS - 1) / BS; };

  // Best first: numbers before NaN, higher scores first (-0.0 equals 0.0), then lower index.
  auto better = [&](int32_t a, int32_t b) {
    const bool nan_a = std::isnan(scores[a]), nan_b = std::isnan(scores[b]);
    if (nan_a != nan_b) return nan_b;
    if (!nan_a && scores[a] != scores[b]) return scores[a] > scores[b];
    return a < b;
  };

  // 1. Rank each group and lay out its children: kept candidate r's come together, in rank order.
  std::vector<int32_t> parents, numbers, members;
  parents.reserve(p.num_slots);
  numbers.reserve(p.num_slots);
  child_offsets[0] = 0;
  for (int64_t g = 0; g < p.num_groups; ++g) {
    members.resize(offsets[g + 1] - offsets[g]);
    std::iota(members.begin(), members.end(), offsets[g]);
    const int64_t k = std::min<int64_t>(keep[g], members.size());
    std::partial_sort(members.begin(), members.begin() + k, members.end(), better);
    for (int64_t r = 0; r < K; ++r) kept[g * K + r] = r < k ? members[r] : -1;
    as_ptr<int32_t>(p.num_kept)[g] = static_cast<int32_t>(k);
    for (int64_t r = 0; r < k; ++r) {
      for (int32_t c = 0; c < children[g]; ++c) {
        parents.push_back(members[r]);
        numbers.push_back(c);
      }
    }
    child_offsets[g + 1] = static_cast<int32_t>(parents.size());
  }

  // 2. Children take their references, then every candidate's table gives its own up, so a
  // block survives exactly when a child holds it. The first child inherits the partial block.
  const int64_t total = static_cast<int64_t>(parents.size());
  for (int64_t s = 0; s < total; ++s) {
    const int64_t parent = parents[s];
    const int64_t shared = numbers[s] == 0 ? used(parent) : lens[parent] / BS;
    for (int64_t j = 0; j < shared; ++j) ++counts[tables[parent * W + j]];
  }
  std::vector<int32_t> freed;
  for (int64_t i = 0; i < p.num_candidates; ++i) {
    for (int64_t j = 0; j < used(i); ++j) {
      const int32_t block = tables[i * W + j];
      if (--counts[block] == 0) freed.push_back(block);
    }
  }
  // Pushed in ascending order: sorted when few, else by one pass over the pool.
  if (freed.size() * 32 < static_cast<size_t>(p.num_blocks)) {
    std::sort(freed.begin(), freed.end());
    for (int32_t block : freed) stack[top++] = block;
  } else {
    std::vector<uint8_t> is_freed(p.num_blocks, 0);
    for (int32_t block : freed) is_freed[block] = 1;
    for (int64_t block = 0; block < p.num_blocks; ++block) {
      if (is_freed[block]) stack[top++] = static_cast<int32_t>(block);
    }
  }

  // 3. The children's tables; each child but the first gets a fresh block for the partial last
  // block, popped in slot order, and a copy pair. Without one it keeps its full blocks only.
  int64_t copies = 0;
  for (int64_t s = 0; s < p.num_slots; ++s) {
    int32_t* row = child_tables + s * W;
    std::fill(row, row + W, -1);
    if (s >= total) {
      parents_out[s] = -1;
      child_lens[s] = 0;
      continue;
    }
    const int64_t parent = parents[s];
    int32_t len = lens[parent];
    const int64_t full = len / BS;
    std::copy(tables + parent * W, tables + parent * W + full, row);
    if (len % BS != 0) {
      const int32_t partial = tables[parent * W + full];
      if (numbers[s] == 0) {
        row[full] = partial;
      } else if (top > 0) {
        const int32_t fresh = stack[--top];
        counts[fresh] = 1;
        row[full] = fresh;
        copy_src[copies] = partial;
        copy_dst[copies++] = fresh;
      } else {
        status |= kPoolExhausted;
        len = static_cast<int32_t>(full * BS);
      }
    }
    parents_out[s] = static_cast<int32_t>(parent);
    child_lens[s] = len;
  }
  for (; copies < p.num_copies; ++copies) copy_src[copies] = copy_dst[copies] = -1;
  *as_ptr<int32_t>(p.free_top) = top;
  *as_ptr<int32_t>(p.status) = status;
}

void copy_blocks_cpu(const CopyBlocksParams& p) {
  const int32_t* src = as_ptr<const int32_t>(p.src);
  const int32_t* dst = as_ptr<const int32_t>(p.dst);
  char* caches[2] = {as_ptr<char>(p.k_cache), as_ptr<char>(p.v_cache)};
#ifdef TTSCALE_WITH_OPENMP
#pragma omp parallel for schedule(static)
#endif
  for (int64_t i = 0; i < p.num_pairs; ++i) {
    if (src[i] < 0 || dst[i] < 0) continue;
    for (char* cache : caches) {
      for (int64_t layer = 0; layer < p.num_layers; ++layer) {
        char* base = cache + layer * p.num_blocks * p.block_bytes;
        std::memcpy(base + dst[i] * p.block_bytes, base + src[i] * p.block_bytes, p.block_bytes);
      }
    }
  }
}

}  // namespace ttscale
