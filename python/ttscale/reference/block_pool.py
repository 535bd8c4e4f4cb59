"""The KV block pool, in plain Python: the model the pool's kernels are tested against.

State: ref_counts [num_blocks] (how many block tables hold each block), free_stack
[num_blocks] whose first free_top entries are the free blocks (a pop takes
free_stack[free_top - 1]), and status, whose bit POOL_EXHAUSTED records that a request found
the stack empty. A table's used blocks are its first ceil(len / block_size) entries; the last
is partial when len is not a multiple of block_size. Each function reads the tensors into
lists, acts on the lists and writes them back.
"""

from __future__ import annotations

import torch

POOL_EXHAUSTED = 1


def _read_pool(ref_counts, free_stack, free_top, status):
    return ref_counts.tolist(), free_stack.tolist(), int(free_top[0]), int(status[0])


def _write_pool(ref_counts, free_stack, free_top, status, counts, stack, top, flags):
    ref_counts.copy_(torch.tensor(counts, dtype=torch.int32))
    free_stack.copy_(torch.tensor(stack, dtype=torch.int32))
    free_top.fill_(top)
    status.fill_(flags)


def _release(counts: list[int], stack: list[int], top: int, blocks: list[int]) -> int:
    """Drop one reference per entry; blocks left with none are pushed in ascending order."""
    freed = set()
    for block in blocks:
        counts[block] -= 1
        if counts[block] == 0:
            freed.add(block)
    for block in sorted(freed):
        stack[top] = block
        top += 1
    return top


def pool_allocate(ref_counts, free_stack, free_top, status, wanted):
    """Pop one block for each True in ``wanted`` ``[B]``, in row order, with reference count 1.

    Returns ``[B]`` int32 blocks, -1 where not wanted or where the stack had run out (which sets
    ``POOL_EXHAUSTED`` in status).
    """
    counts, stack, top, flags = _read_pool(ref_counts, free_stack, free_top, status)
    blocks = []
    for want in wanted.tolist():
        if want and top > 0:
            top -= 1
            blocks.append(stack[top])
            counts[stack[top]] = 1
        else:
            flags |= POOL_EXHAUSTED if want else 0
            blocks.append(-1)
    _write_pool(ref_counts, free_stack, free_top, status, counts, stack, top, flags)
    return torch.tensor(blocks, dtype=torch.int32, device=wanted.device)


def pool_release(ref_counts, free_stack, free_top, status, blocks):
    """Each entry of ``blocks`` (any shape, -1 skipped) gives up one reference."""
    counts, stack, top, flags = _read_pool(ref_counts, free_stack, free_top, status)
    top = _release(counts, stack, top, [b for b in blocks.reshape(-1).tolist() if b >= 0])
    _write_pool(ref_counts, free_stack, free_top, status, counts, stack, top, flags)


def select_and_fork(
    scores, group_offsets, keep, children, block_tables, lens, ref_counts, free_stack, free_top,
    status, block_size, max_keep, num_slots, num_copies,
):
    """Keep the best candidates of each group, fork each kept one into children, free the rest.

    See :func:`ttscale.ops.select_and_fork` for the arguments and results.
    """
    score, nan, offsets = scores.tolist(), torch.isnan(scores).tolist(), group_offsets.tolist()
    keep, children = keep.tolist(), children.tolist()
    tables, lens = block_tables.tolist(), lens.tolist()
    counts, stack, top, flags = _read_pool(ref_counts, free_stack, free_top, status)

    def rank(i):  # sorts best first: numbers before NaN, higher scores first, then lower index
        return (nan[i], 0.0 if nan[i] else -score[i], i)

    def used(i):
        return tables[i][: -(-lens[i] // block_size)]

    kept, num_kept = [], []
    parents, child_numbers, child_offsets = [], [], [0]
    for g in range(len(offsets) - 1):
        best = sorted(range(offsets[g], offsets[g + 1]), key=rank)[: keep[g]]
        kept.append(best + [-1] * (max_keep - len(best)))
        num_kept.append(len(best))
        for parent in best:
            parents += [parent] * children[g]
            child_numbers += list(range(children[g]))
        child_offsets.append(len(parents))

    # Children take their references first, then every candidate's table gives its own up, so
    # a block survives exactly when some child holds it. The first child inherits its parent's
    # partial last block; the others get a copy below.
    child_tables = []
    for parent, number in zip(parents, child_numbers, strict=True):
        table = used(parent) if number == 0 else tables[parent][: lens[parent] // block_size]
        for block in table:
            counts[block] += 1
        child_tables.append(table)
    top = _release(counts, stack, top, [b for i in range(len(tables)) for b in used(i)])

    child_lens, copies = [], []
    for table, parent, number in zip(child_tables, parents, child_numbers, strict=True):
        length = lens[parent]
        if number > 0 and length % block_size:
            if top == 0:  # no block for the copy: the child keeps its shared full blocks only
                flags |= POOL_EXHAUSTED
                length -= length % block_size
            else:
                top -= 1
                counts[stack[top]] = 1
                copies.append((tables[parent][length // block_size], stack[top]))
                table.append(stack[top])
        child_lens.append(length)
    _write_pool(ref_counts, free_stack, free_top, status, counts, stack, top, flags)

    width = block_tables.shape[1]
    slots = len(parents)
    int32 = dict(dtype=torch.int32, device=scores.device)
    copies += [(-1, -1)] * (num_copies - len(copies))
    return (
        torch.tensor(kept, **int32).reshape(len(kept), max_keep),
        torch.tensor(num_kept, **int32),
        torch.tensor(parents + [-1] * (num_slots - slots), **int32),
        torch.tensor(child_offsets, **int32),
        torch.tensor([t + [-1] * (width - len(t)) for t in child_tables]
                     + [[-1] * width] * (num_slots - slots), **int32).reshape(num_slots, width),
        torch.tensor(child_lens + [0] * (num_slots - slots), **int32),
        torch.tensor([src for src, _ in copies], **int32),
        torch.tensor([dst for _, dst in copies], **int32),
    )
