"""The ``cpu`` backend of select_and_fork and copy_blocks: C++ kernels in csrc/cpu/select.cpp."""

from __future__ import annotations

import math

import torch

from ttscale.backends import new_output
from ttscale.backends.native import _C, address


def select_and_fork(scores, group_offsets, keep, children, block_tables, lens, ref_counts,
                    free_stack, free_top, status, block_size, max_keep, num_slots, num_copies):
    groups, width = group_offsets.shape[0] - 1, block_tables.shape[1]
    outputs = (
        new_output((groups, max_keep), torch.int32, scores.device),  # kept
        new_output((groups,), torch.int32, scores.device),  # num_kept
        new_output((num_slots,), torch.int32, scores.device),  # parents
        new_output((groups + 1,), torch.int32, scores.device),  # child_offsets
        new_output((num_slots, width), torch.int32, scores.device),  # child tables
        new_output((num_slots,), torch.int32, scores.device),  # child lens
        new_output((num_copies,), torch.int32, scores.device),  # copy_src
        new_output((num_copies,), torch.int32, scores.device),  # copy_dst
    )
    p = _C.SelectParams()
    p.scores, p.group_offsets = address(scores), address(group_offsets)
    p.keep, p.children = address(keep), address(children)
    p.block_tables, p.lens = address(block_tables), address(lens)
    p.ref_counts, p.free_stack = address(ref_counts), address(free_stack)
    p.free_top, p.status = address(free_top), address(status)
    (p.kept, p.num_kept, p.parents, p.child_offsets, p.child_tables, p.child_lens, p.copy_src,
     p.copy_dst) = map(address, outputs)
    p.num_candidates, p.num_groups, p.max_blocks = scores.shape[0], groups, width
    p.block_size, p.num_blocks, p.max_keep = block_size, ref_counts.shape[0], max_keep
    p.num_slots, p.num_copies = num_slots, num_copies
    _C.select_and_fork_cpu(p)
    return outputs


def copy_blocks(k_cache, v_cache, src, dst):
    layers = k_cache if k_cache.dim() == 5 else k_cache.unsqueeze(0)
    p = _C.CopyBlocksParams()
    p.k_cache, p.v_cache = address(k_cache), address(v_cache)
    p.src, p.dst = address(src), address(dst)
    p.num_pairs, p.num_layers, p.num_blocks = src.shape[0], layers.shape[0], layers.shape[1]
    p.block_bytes = math.prod(layers.shape[2:]) * layers.element_size()
    _C.copy_blocks_cpu(p)
