"""Helpers of the select_and_fork and block pool tests: runs against the reference, invariants."""

from __future__ import annotations

import dataclasses

import torch
from ttscale import ops
from ttscale.block_pool import BlockPool

FIELDS = [f.name for f in dataclasses.fields(ops.ForkResult)]


def fork_both(case, backend, keep, children, **kw):
    """Run ``backend`` and the reference on two copies of ``case.pool``.

    Returns (result, pool after) for the backend, then for the reference.
    """
    # The reference runs on a CPU copy, and that copy is what it changed: on a GPU, _on_cpu's
    # tensors are new ones (returning the device clone compared against the pool as it was).
    pool, ref_pool = case.pool.clone(), _on_cpu(case.pool.clone())
    args = (case.scores, case.group_offsets, keep, children, case.block_tables, case.lens)
    got = ops.select_and_fork(*args, pool, backend=backend, **kw)
    expected = ops.select_and_fork(*(a.cpu() if isinstance(a, torch.Tensor) else a for a in args),
                                   ref_pool, backend="torch", **kw)
    return got, pool, expected, ref_pool


def _on_cpu(pool: BlockPool) -> BlockPool:
    return BlockPool(*(t.cpu() for t in pool.tensors()), block_size=pool.block_size)


def assert_same_pool(pool: BlockPool, expected: BlockPool):
    top = int(expected.free_top[0])
    assert int(pool.free_top[0]) == top, f"free_top {int(pool.free_top[0])} != {top}"
    assert torch.equal(pool.ref_counts.cpu(), expected.ref_counts), "ref_counts differ"
    assert torch.equal(pool.free_stack[:top].cpu(), expected.free_stack[:top]), "free stacks differ"
    assert torch.equal(pool.status.cpu(), expected.status), "status differs"


def assert_same_fork(got, pool, expected, ref_pool):
    for name in FIELDS:
        a, e = getattr(got, name).cpu(), getattr(expected, name)
        assert a.shape == e.shape, f"{name}: shape {tuple(a.shape)} != {tuple(e.shape)}"
        assert torch.equal(a, e), f"{name}:\n{a}\n!=\n{e}"
    assert_same_pool(pool, ref_pool)


def used_blocks(block_tables: torch.Tensor, lens: torch.Tensor, block_size: int) -> list[list[int]]:
    rows = zip(block_tables.tolist(), lens.tolist(), strict=True)
    return [row[: -(-n // block_size)] for row, n in rows]


def assert_pool_invariants(
    pool: BlockPool, tables: list[list[int]], block_size: int, lens: list[int],
    private_partials: bool = True,
):
    """Counts equal the tables holding each block, free + used = pool, partial blocks unshared."""
    counts = pool.ref_counts.tolist()
    holders = [0] * pool.num_blocks
    for table in tables:
        for block in table:
            holders[block] += 1
    assert counts == holders, "a reference count differs from the tables holding the block"
    top = int(pool.free_top[0])
    free = pool.free_stack[:top].tolist()
    assert len(set(free)) == top, "a block is on the free stack twice"
    unheld = {b for b in range(pool.num_blocks) if holders[b] == 0}
    assert set(free) == unheld, "free + used != pool"
    for table, n in zip(tables, lens, strict=True):
        if private_partials and n % block_size:
            assert holders[table[-1]] == 1, f"partial block {table[-1]} is shared"
