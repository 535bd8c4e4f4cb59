"""The block pool's device bookkeeping against its plain-Python model, over random sequences.

Every step runs the pool under test (BlockPool's methods, select_and_fork on one backend) and
the model (ttscale.reference's pool functions, the torch backend) side by side, compares them
exactly, and checks the invariants: each block's count is the number of tables holding it, the
free stack holds exactly the blocks nobody holds, partial last blocks are unshared, and once
every table is released the whole pool is free again.
"""

from __future__ import annotations

import pytest
import torch
from forks import assert_pool_invariants, assert_same_fork, assert_same_pool, used_blocks
from hypothesis import given, settings
from hypothesis import strategies as st
from paged import backend_params
from ttscale import ops, reference
from ttscale.block_pool import POOL_EXHAUSTED, BlockPool

WIDTH = 6  # table columns
MAX_ROWS = 12
SCORES = [float("nan"), float("-inf"), -1.0, 0.0, -0.0, 0.5, 0.5, 2.0]
EXAMPLES = {"cpu": 100, "triton": 15}


def model_allocate(model: BlockPool, wanted: torch.Tensor) -> torch.Tensor:
    return reference.pool_allocate(*model.tensors(), wanted.cpu())


def model_release(model: BlockPool, blocks: torch.Tensor) -> None:
    reference.pool_release(*model.tensors(), blocks.cpu())


def test_create_hands_out_blocks_in_order():
    pool = BlockPool.create(5, 16)
    assert pool.allocate(3).tolist() == [0, 1, 2]
    assert pool.ref_counts.tolist() == [1, 1, 1, 0, 0] and int(pool.free_top[0]) == 2


def test_allocate_matches_model_and_reports_shortage():
    pool = BlockPool.create(4, 8)
    model = pool.clone()
    for wanted in ([True, False, True], [False, True, True, True]):
        mask = torch.tensor(wanted)
        assert torch.equal(pool.allocate(mask), model_allocate(model, mask))
        assert_same_pool(pool, model)
    assert int(pool.status[0]) == POOL_EXHAUSTED
    assert pool.allocate(0).tolist() == []


def test_release_pushes_freed_blocks_in_ascending_order():
    pool = BlockPool.create(6, 4)
    pool.allocate(5)  # blocks 0 to 4; block 5 stays free
    tables = torch.tensor([[4, 1, 2], [4, 3, 0]], dtype=torch.int32)
    pool.ref_counts[4] = 2  # held by both rows
    pool.release(tables, torch.tensor([0, 12], dtype=torch.int32))  # row 0 uses no block
    assert pool.free_stack[: int(pool.free_top[0])].tolist() == [5, 0, 3]
    pool.release(tables, torch.tensor([9, 0], dtype=torch.int32))
    assert pool.free_stack[: int(pool.free_top[0])].tolist() == [5, 0, 3, 1, 2, 4]
    assert not pool.ref_counts.any()


def test_release_blocks_skips_minus_one():
    pool = BlockPool.create(3, 4)
    blocks = pool.allocate(2)
    pool.release_blocks(torch.tensor([[-1, int(blocks[1])], [-1, -1]], dtype=torch.int32))
    assert pool.ref_counts.tolist() == [1, 0, 0] and int(pool.free_top[0]) == 2


def test_empty_pool_allocates_nothing():
    pool = BlockPool.create(0, 4)
    assert pool.allocate(2).tolist() == [-1, -1] and int(pool.status[0]) == POOL_EXHAUSTED


class Rows:
    """The live tables of the sequence under test; the model holds an identical copy."""

    def __init__(self, block_size: int, device):
        self.block_size, self.device = block_size, device
        self.tables = torch.empty((0, WIDTH), dtype=torch.int32, device=device)
        self.lens = torch.empty(0, dtype=torch.int32, device=device)

    def used(self) -> list[list[int]]:
        return used_blocks(self.tables.cpu(), self.lens.cpu(), self.block_size)

    def keep(self, rows: torch.Tensor, tables: torch.Tensor, lens: torch.Tensor) -> None:
        self.tables, self.lens = tables[rows], lens[rows]


def _add(data, pool, model, rows: Rows):
    lens = data.draw(st.lists(st.integers(0, WIDTH * rows.block_size), min_size=1, max_size=4))
    need = [-(-n // rows.block_size) for n in lens]
    got = pool.allocate(sum(need))
    assert torch.equal(got.cpu(), model_allocate(model, torch.ones(sum(need), dtype=torch.bool)))
    if bool((got < 0).any()):  # not enough: give back what came
        pool.release_blocks(got)
        model_release(model, got)
        return
    new = torch.full((len(lens), WIDTH), -1, dtype=torch.int32)
    for row, blocks in enumerate(got.cpu().split(need)):
        new[row, : len(blocks)] = blocks
    rows.tables = torch.cat([rows.tables, new.to(rows.device)])
    rows.lens = torch.cat([rows.lens, torch.tensor(lens, dtype=torch.int32, device=rows.device)])


def _grow(data, pool, model, rows: Rows):
    """Each row gains tokens; a row that crosses into a new block gets one popped for it."""
    bs = rows.block_size
    grow = torch.tensor(data.draw(st.lists(st.integers(1, bs), min_size=len(rows.lens),
                                           max_size=len(rows.lens))), dtype=torch.int32)
    lens = rows.lens.cpu()
    fits = lens + grow <= WIDTH * bs
    crosses = fits & (-(-(lens + grow) // bs) > -(-lens // bs))
    got = pool.allocate(crosses.to(rows.device))
    assert torch.equal(got.cpu(), model_allocate(model, crosses))
    got = got.cpu()
    served = fits & (~crosses | (got >= 0))
    tables = rows.tables.cpu()
    column = (-(-lens // bs)).clamp(max=WIDTH - 1).long()
    row = torch.arange(len(lens))
    tables[row, column] = torch.where(crosses & served, got, tables[row, column])
    rows.tables = tables.to(rows.device)
    rows.lens = torch.where(served, lens + grow, lens).to(torch.int32).to(rows.device)


def _select(data, pool, model, rows: Rows, backend):
    count = len(rows.lens)
    sizes, left = [], count
    while left:
        sizes.append(data.draw(st.integers(1, left)))
        left -= sizes[-1]
    for _ in range(data.draw(st.integers(0, 2))):  # empty groups anywhere
        sizes.insert(data.draw(st.integers(0, len(sizes))), 0)
    offsets = torch.tensor([0] + sizes, dtype=torch.int32).cumsum(0).to(torch.int32)
    scores = data.draw(st.lists(st.sampled_from(SCORES), min_size=count, max_size=count))
    scores = torch.tensor(scores)
    keep, children = data.draw(st.integers(0, 3)), data.draw(st.integers(0, 3))
    args = (scores, offsets, keep, children, rows.tables.cpu(), rows.lens.cpu())
    on_device = (a.to(rows.device) if isinstance(a, torch.Tensor) else a for a in args)
    got = ops.select_and_fork(*on_device, pool, backend=backend)
    expected = ops.select_and_fork(*args, model, backend="torch")
    assert_same_fork(got, pool, expected, model)
    total = int(expected.child_offsets[-1])
    rows.keep(torch.arange(total, device=rows.device), got.block_tables, got.lens)
    if total > MAX_ROWS:  # keep the sequence small: release the rest
        _release(pool, model, rows, torch.arange(total) >= MAX_ROWS)


def _release(pool, model, rows: Rows, chosen: torch.Tensor):
    chosen = chosen.to(rows.device)
    pool.release(rows.tables[chosen], rows.lens[chosen])
    used = used_blocks(rows.tables[chosen].cpu(), rows.lens[chosen].cpu(), rows.block_size)
    model_release(model, torch.tensor([b for table in used for b in table], dtype=torch.int32))
    rows.keep(~chosen, rows.tables, rows.lens)


def _check(pool, model, rows: Rows):
    assert_same_pool(pool, model)
    lens = rows.lens.tolist()
    assert_pool_invariants(model, rows.used(), rows.block_size, lens)


@pytest.mark.parametrize("backend,device", backend_params("select_and_fork"))
def test_random_operation_sequences_keep_the_pool_consistent(backend, device):
    @settings(max_examples=EXAMPLES.get(backend, 10), deadline=None)
    @given(data=st.data())
    def run(data):
        block_size = data.draw(st.sampled_from([1, 2, 4]))
        pool = BlockPool.create(data.draw(st.integers(0, 60)), block_size, device)
        model = BlockPool.create(pool.num_blocks, block_size, "cpu")
        rows = Rows(block_size, device)
        _add(data, pool, model, rows)
        for _ in range(data.draw(st.integers(1, 12))):
            step = data.draw(st.sampled_from(["add", "add", "grow", "select", "select", "release"]))
            if step == "add":
                _add(data, pool, model, rows)
            elif step == "grow" and len(rows.lens):
                _grow(data, pool, model, rows)
            elif step == "select":
                _select(data, pool, model, rows, backend)
            elif step == "release" and len(rows.lens):
                count = len(rows.lens)
                chosen = data.draw(st.lists(st.booleans(), min_size=count, max_size=count))
                _release(pool, model, rows, torch.tensor(chosen))
            _check(pool, model, rows)
        _release(pool, model, rows, torch.ones(len(rows.lens), dtype=torch.bool))
        _check(pool, model, rows)
        assert int(pool.free_top[0]) == pool.num_blocks, "blocks leaked"
        assert not pool.ref_counts.any(), "references leaked"

    run()
