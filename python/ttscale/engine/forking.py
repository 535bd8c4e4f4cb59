"""A search step's selection and forks on the device pool, as the engine does it today.

The host ``BlockManager`` is the pool's truth; ``select_and_fork`` uploads its state into a
device ``BlockPool``, runs ``ops.select_and_fork`` (segmented top-k per group, forks of the kept
candidates, frees of the rest, copy-on-write pairs) and reads the new state back, once per
search step. One owner of the pool on the device, with no such round trip, is the open part of
the engine work in docs/DESIGN.md.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq

import torch

from ttscale import ops
from ttscale.block_pool import BlockPool
from ttscale.engine.block_manager import CopyOnWrite
from ttscale.engine.sequence import Sequence
from ttscale.errors import InvalidArgument


def select_and_fork(engine, candidates: Seq[Sequence], scores: Seq[float], group_sizes: Seq[int],
                    keep, children) -> tuple[list[Sequence], list[int], list[int]]:
    """:meth:`Engine.select_and_fork` on ``engine`` (which holds its lock and checked that the
    candidates are live); the same arguments and results."""
    if len(scores) != len(candidates) or sum(group_sizes) != len(candidates):
        raise InvalidArgument(
            f"scores/group_sizes: expected {len(candidates)} scores and group sizes summing to it, "
            f"got {len(scores)} scores and sizes summing to {sum(group_sizes)}", param="scores"
        )
    device = engine.model.device
    int32 = dict(dtype=torch.int32, device=device)
    bm = engine.blocks
    for seq in candidates:
        bm.trim(seq.block_table, seq.kv_len)
    width = max([len(s.block_table) for s in candidates] + [1])
    tables = torch.full((len(candidates), width), -1, dtype=torch.int32)
    for row, seq in enumerate(candidates):
        tables[row, : len(seq.block_table)] = torch.tensor(seq.block_table, dtype=torch.int32)
    free = torch.zeros(bm.num_blocks, dtype=torch.int32)
    free[: bm.num_free] = torch.tensor(bm.free_stack, dtype=torch.int32)
    pool = BlockPool(torch.tensor(bm.ref_counts, **int32), free.to(device),
                     torch.tensor([bm.num_free], **int32), torch.zeros(1, **int32), bm.block_size)
    offsets = [0]
    for size in group_sizes:
        offsets.append(offsets[-1] + size)
    bounds = {}
    if not isinstance(keep, int):
        bounds["max_keep"] = max(list(keep) + [0])
        keep = torch.tensor(list(keep), **int32)
    if not isinstance(children, int):
        bounds["max_children"] = max(list(children) + [0])
        children = torch.tensor(list(children), **int32)
    result = ops.select_and_fork(
        torch.as_tensor(scores, dtype=torch.float32, device=device), torch.tensor(offsets, **int32),
        keep, children, tables.to(device), torch.tensor([s.kv_len for s in candidates], **int32), pool,
        **bounds,
    )
    # The pool's new state becomes the host's (one read-back per search step).
    top = int(pool.free_top)
    bm.ref_counts = pool.ref_counts.tolist()
    bm.free_stack = pool.free_stack[:top].tolist()
    child_offsets = result.child_offsets.tolist()
    num_children = child_offsets[-1]
    parents = result.parents[:num_children].tolist()
    lens = result.lens[:num_children].tolist()
    child_tables = result.block_tables[:num_children].tolist()
    pairs = [CopyOnWrite(src, dst) for src, dst in zip(result.copy_src.tolist(), result.copy_dst.tolist())
             if src >= 0]
    engine.runner.copy_blocks(pairs)
    kids, continuing = [], set()
    for slot, p in enumerate(parents):
        parent = candidates[p]
        kv_len = lens[slot]  # shorter than the parent's only if the pool ran out: re-prefilled
        table = child_tables[slot][: bm.blocks_for(kv_len)]
        if p not in continuing:  # the first child carries on as the candidate itself
            continuing.add(p)
            parent.block_table, parent.kv_len = table, kv_len
            kids.append(parent)
            continue
        kid = Sequence(engine._new_seq_id(parent.problem), parent.problem, list(parent.tokens),
                       table, kv_len, list(parent.logprobs), list(parent.top_logprobs),
                       list(parent.sampled_at), parent.finish_reason)
        kid.thinking = parent.thinking and parent.thinking.copy()
        kid.problem.num_sequences += 1
        kid.problem.live.add(kid)
        kids.append(kid)
    for p, seq in enumerate(candidates):
        if p not in continuing:
            seq.block_table = []
            seq.freed = True
            seq.problem.num_sequences -= 1
            seq.problem.live.discard(seq)
    return kids, parents, child_offsets
