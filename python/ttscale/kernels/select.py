"""Triton kernels of select_and_fork and copy_blocks.

select_and_fork is a fixed sequence of launches, all on the device and free of host reads, so
a CUDA graph can capture it (the order of :mod:`ttscale.reference.block_pool`, done in parallel):

1. ``_rank_kernel``, a program per group: the group's best ``keep`` by a streaming bitonic
   top-k over chunks of the group (any group size; ``max_keep`` up to ``MAX_KEEP``), each
   candidate's fate (released, or the number of its children), and per group the counts that
   lay out the child slots and the fresh blocks; two cumulative sums turn those into offsets.
2. ``_release_kernel``, a program per candidate: the net change of each used block's count
   (a child's new reference minus the table's own) by atomics. The increments and decrements
   commute, and while counts equal the tables holding a block no order reaches zero early, so
   the atomic that returns 1 frees the block; it marks the block and counts it for its chunk.
3. ``_push_kernel``, a program per chunk of the pool: the marked blocks onto the free stack in
   ascending order (a prefix over chunk counts, then a scan inside the chunk), so the result is
   the same block for block as the reference's, whatever order the atomics ran in.
4. ``_fork_kernel``, a program per child slot: its group by binary search over the child
   offsets, its table, and for a child but the first of a parent with a partial last block a
   block popped at a rank fixed by slot order, plus the copy pair. ``_finish_kernel`` then
   moves the stack top and flags a shortage.

No CUDA version: the work is a few small passes of scattered reads and atomics whose cost is
launch latency, which a CUDA kernel shares; Triton already reaches that floor. copy_blocks is a
plain blocked copy, at memory bandwidth in Triton.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ttscale.backends import new_output
from ttscale.errors import InvalidArgument

MAX_KEEP = 4096  # the top-k vector of one program: keys of 8 bytes
NO_KEY = tl.constexpr(-(2**63))  # below every candidate's key


@triton.jit
def _rank_keys(scores_ptr, index, valid):
    """int64 keys in the ranking's order: score descending, NaN below -inf, then lower index."""
    score = tl.load(scores_ptr + index, mask=valid, other=0.0) + 0.0  # -0.0 + 0.0 is +0.0
    bits = score.to(tl.int32, bitcast=True)
    # Flipping the magnitude bits of negative floats makes their bit patterns order like ints.
    ordered = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    ordered = tl.where(score != score, -2147483648, ordered)
    key = (ordered.to(tl.int64) << 32) | (4294967295 - index.to(tl.int64))
    return tl.where(valid, key, NO_KEY)


@triton.jit
def _rank_kernel(scores_ptr, offsets_ptr, keep_ptr, children_ptr, lens_ptr, kept_ptr,
                 num_kept_ptr, fate_ptr, partial_before_ptr, group_slots_ptr, group_needs_ptr,
                 max_keep, max_children, block_size, BLOCK: tl.constexpr):
    g = tl.program_id(0)
    lo = tl.load(offsets_ptr + g)
    hi = tl.load(offsets_ptr + g + 1)
    keep = tl.minimum(tl.minimum(tl.load(keep_ptr + g), hi - lo), max_keep)
    children = tl.minimum(tl.load(children_ptr + g), max_children)
    lane = tl.arange(0, BLOCK)
    # best holds the top BLOCK keys so far, sorted descending. With a chunk sorted ascending,
    # the elementwise maximum holds the top BLOCK of both (the first step of a bitonic merge).
    best = tl.full([BLOCK], NO_KEY, tl.int64)
    for start in range(lo, hi, BLOCK):
        index = start + lane
        chunk = tl.sort(_rank_keys(scores_ptr, index, index < hi), descending=False)
        best = tl.sort(tl.maximum(best, chunk), descending=True)
    won = lane < keep
    kept = tl.where(won, (4294967295 - (best & 4294967295)).to(tl.int32), -1)
    tl.store(kept_ptr + g * max_keep + lane, kept, mask=lane < max_keep)
    tl.store(num_kept_ptr + g, keep)

    # Fate: -1 for a released candidate, else its number of children.
    for start in range(lo, hi, BLOCK):
        index = start + lane
        tl.store(fate_ptr + index, tl.full([BLOCK], -1, tl.int32), mask=index < hi)
    tl.debug_barrier()
    tl.store(fate_ptr + kept, tl.full([BLOCK], 0, tl.int32) + children, mask=won)

    # Children after the first of a parent with a partial last block need a fresh block.
    length = tl.load(lens_ptr + kept, mask=won, other=0)
    partial = (won & (length % block_size != 0)).to(tl.int32)
    tl.store(partial_before_ptr + g * max_keep + lane, tl.cumsum(partial, 0) - partial,
             mask=lane < max_keep)
    tl.store(group_slots_ptr + g, keep * children)
    tl.store(group_needs_ptr + g, tl.sum(partial, 0) * tl.maximum(children - 1, 0))


@triton.jit
def _release_kernel(fate_ptr, tables_ptr, lens_ptr, ref_counts_ptr, freed_ptr, chunk_freed_ptr,
                    width, block_size, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0)
    fate = tl.load(fate_ptr + i)
    length = tl.load(lens_ptr + i)
    full = length // block_size
    used = (length + block_size - 1) // block_size
    # Each child holds the full blocks; the first child alone holds the partial one.
    full_delta = tl.where(fate >= 0, fate - 1, -1)
    partial_delta = tl.where(fate >= 1, 0, -1)
    row = tables_ptr + i.to(tl.int64) * width
    for start in range(0, used, BLOCK):
        j = start + tl.arange(0, BLOCK)
        delta = tl.where(j < full, full_delta, partial_delta)
        active = (j < used) & (delta != 0)
        block = tl.load(row + j, mask=active, other=0)
        old = tl.atomic_add(ref_counts_ptr + block, delta, mask=active)
        freed = active & (old + delta == 0)
        tl.store(freed_ptr + block, tl.full([BLOCK], 1, tl.int8), mask=freed)
        tl.atomic_add(chunk_freed_ptr + block // CHUNK, tl.full([BLOCK], 1, tl.int32), mask=freed)


@triton.jit
def _push_kernel(freed_ptr, chunk_freed_ptr, free_stack_ptr, free_top_ptr, num_blocks, num_chunks,
                 CHUNK: tl.constexpr, CHUNKS: tl.constexpr):
    c = tl.program_id(0)
    chunk = tl.arange(0, CHUNKS)
    counts = tl.load(chunk_freed_ptr + chunk, mask=chunk < num_chunks, other=0)
    before = tl.sum(tl.where(chunk < c, counts, 0), 0)
    block = c * CHUNK + tl.arange(0, CHUNK)
    flag = tl.load(freed_ptr + block, mask=block < num_blocks, other=0).to(tl.int32)
    position = tl.load(free_top_ptr) + before + tl.cumsum(flag, 0) - flag
    tl.store(free_stack_ptr + position, block, mask=flag > 0)


@triton.jit
def _available(free_top_ptr, chunk_freed_ptr, num_chunks, CHUNKS: tl.constexpr):
    """Free blocks once the push is done (free_top itself moves only in _finish_kernel)."""
    chunk = tl.arange(0, CHUNKS)
    freed = tl.load(chunk_freed_ptr + chunk, mask=chunk < num_chunks, other=0)
    return tl.load(free_top_ptr) + tl.sum(freed, 0)


@triton.jit
def _fork_kernel(kept_ptr, children_ptr, partial_before_ptr, child_offsets_ptr, need_offsets_ptr,
                 chunk_freed_ptr, tables_ptr, lens_ptr, ref_counts_ptr, free_stack_ptr,
                 free_top_ptr, parents_ptr, child_tables_ptr, child_lens_ptr, copy_src_ptr,
                 copy_dst_ptr, num_groups, max_keep, width, block_size, num_copies, num_chunks,
                 CHUNKS: tl.constexpr, SEARCH_STEPS: tl.constexpr, BLOCK: tl.constexpr):
    s = tl.program_id(0)
    available = _available(free_top_ptr, chunk_freed_ptr, num_chunks, CHUNKS)
    popped = tl.minimum(tl.load(need_offsets_ptr + num_groups), available)
    unused_pair = (s < num_copies) & (s >= popped)
    tl.store(copy_src_ptr + s, -1, mask=unused_pair)
    tl.store(copy_dst_ptr + s, -1, mask=unused_pair)

    # The group holding slot s: child_offsets[lo] <= s < child_offsets[hi] narrows to hi = lo + 1.
    valid = s < tl.load(child_offsets_ptr + num_groups)
    lo = num_groups * 0
    hi = num_groups
    for _ in tl.static_range(SEARCH_STEPS):
        mid = (lo + hi) // 2
        right = tl.load(child_offsets_ptr + mid) <= s
        lo = tl.where(right, mid, lo)
        hi = tl.where(right, hi, mid)
    children = tl.maximum(tl.load(children_ptr + lo), 1)
    local = s - tl.load(child_offsets_ptr + lo)
    r = local // children
    c = local % children
    parent = tl.load(kept_ptr + lo * max_keep + r, mask=valid, other=0)
    length = tl.load(lens_ptr + parent, mask=valid, other=0)
    full = length // block_size
    has_partial = valid & (length % block_size != 0)
    row = tables_ptr + parent.to(tl.int64) * width
    partial_block = tl.load(row + full, mask=has_partial, other=-1)

    needs = has_partial & (c > 0)
    before = tl.load(partial_before_ptr + lo * max_keep + r, mask=needs, other=0)
    rank = tl.load(need_offsets_ptr + lo) + before * (children - 1) + c - 1
    served = needs & (rank < available)
    fresh = tl.load(free_stack_ptr + (available - 1 - rank), mask=served, other=-1)
    tl.store(ref_counts_ptr + fresh, 1, mask=served)
    tl.store(copy_src_ptr + rank, partial_block, mask=served)
    tl.store(copy_dst_ptr + rank, fresh, mask=served)

    last = tl.where(c == 0, partial_block, fresh)  # -1 for a child left without a block
    tl.store(parents_ptr + s, tl.where(valid, parent, -1))
    tl.store(child_lens_ptr + s, tl.where(needs & (fresh < 0), full * block_size, length))
    out_row = child_tables_ptr + s.to(tl.int64) * width
    for start in range(0, width, BLOCK):
        j = start + tl.arange(0, BLOCK)
        shared = tl.load(row + j, mask=valid & (j < full), other=-1)
        tl.store(out_row + j, tl.where(has_partial & (j == full), last, shared), mask=j < width)


@triton.jit
def _finish_kernel(need_offsets_ptr, chunk_freed_ptr, free_top_ptr, status_ptr, num_groups,
                   num_chunks, CHUNKS: tl.constexpr):
    available = _available(free_top_ptr, chunk_freed_ptr, num_chunks, CHUNKS)
    needed = tl.load(need_offsets_ptr + num_groups)
    tl.store(free_top_ptr, available - tl.minimum(needed, available))
    tl.store(status_ptr, tl.load(status_ptr) | tl.where(needed > available, 1, 0))  # POOL_EXHAUSTED


def _offsets(counts: torch.Tensor) -> torch.Tensor:
    """``[G]`` -> ``[G + 1]`` exclusive prefix sums, on the device."""
    offsets = torch.zeros(counts.shape[0] + 1, dtype=torch.int32, device=counts.device)
    torch.cumsum(counts, 0, dtype=torch.int32, out=offsets[1:])
    return offsets


def select_and_fork(scores, group_offsets, keep, children, block_tables, lens, ref_counts,
                    free_stack, free_top, status, block_size, max_keep, num_slots, num_copies):
    if max_keep > MAX_KEEP:
        raise InvalidArgument(
            f"max_keep: the Triton kernel keeps at most {MAX_KEEP} per group, got {max_keep}"
        )
    device = scores.device
    num_candidates, width = block_tables.shape
    groups, num_blocks = group_offsets.shape[0] - 1, ref_counts.shape[0]
    # num_slots is (candidates that can be kept) x max_children, as ops.select_and_fork sizes it.
    max_children = num_slots // max(min(num_candidates, groups * max_keep), 1)
    kept = new_output((groups, max_keep), torch.int32, device)
    num_kept = new_output((groups,), torch.int32, device)
    parents = new_output((num_slots,), torch.int32, device)
    child_tables = new_output((num_slots, width), torch.int32, device)
    child_lens = new_output((num_slots,), torch.int32, device)
    copy_src = new_output((num_copies,), torch.int32, device)
    copy_dst = new_output((num_copies,), torch.int32, device)
    fate = torch.empty(num_candidates, dtype=torch.int32, device=device)
    partial_before = torch.empty((groups, max_keep), dtype=torch.int32, device=device)
    group_slots = torch.empty(groups, dtype=torch.int32, device=device)
    group_needs = torch.empty(groups, dtype=torch.int32, device=device)
    # Freed blocks are marked per block and counted per chunk of the pool (at most 1024 chunks).
    chunk = max(1024, triton.next_power_of_2(triton.cdiv(num_blocks, 1024)))
    num_chunks = triton.cdiv(num_blocks, chunk)
    chunks = triton.next_power_of_2(max(num_chunks, 1))
    freed = torch.zeros(num_blocks, dtype=torch.int8, device=device)
    chunk_freed = torch.zeros(max(num_chunks, 1), dtype=torch.int32, device=device)

    if groups:
        mean_group = triton.cdiv(num_candidates, groups)
        mean_block = min(triton.next_power_of_2(mean_group), 1024)
        block = max(triton.next_power_of_2(max_keep), mean_block, 16)
        _rank_kernel[(groups,)](scores, group_offsets, keep, children, lens, kept, num_kept, fate,
                                partial_before, group_slots, group_needs, max_keep, max_children,
                                block_size, BLOCK=block)
    child_offsets, need_offsets = _offsets(group_slots), _offsets(group_needs)
    if num_candidates:
        _release_kernel[(num_candidates,)](fate, block_tables, lens, ref_counts, freed, chunk_freed,
                                           width, block_size, CHUNK=chunk, BLOCK=64)
    if num_chunks:
        _push_kernel[(num_chunks,)](freed, chunk_freed, free_stack, free_top, num_blocks,
                                    num_chunks, CHUNK=chunk, CHUNKS=chunks)
    if num_slots:
        steps = max(1, math.ceil(math.log2(max(groups, 1)))) + 1
        _fork_kernel[(num_slots,)](kept, children, partial_before, child_offsets, need_offsets,
                                   chunk_freed, block_tables, lens, ref_counts, free_stack,
                                   free_top, parents, child_tables, child_lens, copy_src,
                                   copy_dst, groups, max_keep, width, block_size, num_copies,
                                   num_chunks, CHUNKS=chunks, SEARCH_STEPS=steps, BLOCK=64)
    _finish_kernel[(1,)](need_offsets, chunk_freed, free_top, status, groups, num_chunks,
                         CHUNKS=chunks)
    return kept, num_kept, parents, child_offsets, child_tables, child_lens, copy_src, copy_dst


@triton.jit
def _copy_blocks_kernel(k_ptr, v_ptr, src_ptr, dst_ptr, num_blocks, block_elems,
                        BLOCK: tl.constexpr):
    pair, layer, part = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    src = tl.load(src_ptr + pair)
    dst = tl.load(dst_ptr + pair)
    offs = part * BLOCK + tl.arange(0, BLOCK)
    active = (offs < block_elems) & (src >= 0) & (dst >= 0)
    layer_start = layer.to(tl.int64) * num_blocks
    source = (layer_start + src) * block_elems + offs
    target = (layer_start + dst) * block_elems + offs
    tl.store(k_ptr + target, tl.load(k_ptr + source, mask=active), mask=active)
    tl.store(v_ptr + target, tl.load(v_ptr + source, mask=active), mask=active)


def copy_blocks(k_cache, v_cache, src, dst):
    layers = k_cache if k_cache.dim() == 5 else k_cache.unsqueeze(0)
    num_layers, num_blocks = layers.shape[:2]
    block_elems = math.prod(layers.shape[2:])
    if src.shape[0] == 0 or num_layers == 0 or block_elems == 0:
        return
    block = min(4096, triton.next_power_of_2(block_elems))
    grid = (src.shape[0], num_layers, triton.cdiv(block_elems, block))
    _copy_blocks_kernel[grid](k_cache, v_cache, src, dst, num_blocks, block_elems, BLOCK=block)
