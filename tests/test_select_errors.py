"""Bad input to select_and_fork, copy_blocks and BlockPool raises ValueError naming the argument."""

from __future__ import annotations

import pytest
import torch
from ttscale import ops
from ttscale.block_pool import BlockPool
from ttscale.testing import make_fork_case


@pytest.fixture
def case():
    return make_fork_case([3, 2], block_size=4, seed=5)


def fork(case, **changes):
    args = dict(scores=case.scores, group_offsets=case.group_offsets, keep=2, children=2,
                block_tables=case.block_tables, lens=case.lens, pool=case.pool)
    args.update(changes)
    return ops.select_and_fork(**args)


def test_scores_integer_dtype(case):
    with pytest.raises(ValueError, match="scores: expected dtype"):
        fork(case, scores=case.scores.to(torch.int32))


def test_group_offsets_wrong_dtype(case):
    with pytest.raises(ValueError, match="group_offsets: expected dtype int32"):
        fork(case, group_offsets=case.group_offsets.long())


def test_group_offsets_empty(case):
    with pytest.raises(ValueError, match=r"group_offsets: expected at least one entry"):
        fork(case, group_offsets=case.group_offsets[:0])


def test_group_offsets_not_covering_candidates(case):
    with pytest.raises(ValueError, match="group_offsets: expected to run from 0 to 5"):
        fork(case, group_offsets=torch.tensor([0, 3, 4], dtype=torch.int32))


def test_group_offsets_decreasing(case):
    with pytest.raises(ValueError, match="group_offsets: expected non-decreasing"):
        fork(case, group_offsets=torch.tensor([0, 4, 3, 5], dtype=torch.int32))


def test_keep_negative(case):
    with pytest.raises(ValueError, match="keep: expected >= 0, got -1"):
        fork(case, keep=-1)


def test_keep_not_an_int(case):
    with pytest.raises(ValueError, match="keep: expected an int or an int32 tensor, got float"):
        fork(case, keep=2.0)


def test_keep_tensor_needs_max_keep(case):
    with pytest.raises(ValueError, match="max_keep: required when keep is a tensor"):
        fork(case, keep=torch.tensor([1, 1], dtype=torch.int32))


def test_keep_tensor_above_max_keep(case):
    with pytest.raises(ValueError, match=r"keep: value 3 outside \[0, 3\)"):
        fork(case, keep=torch.tensor([3, 1], dtype=torch.int32), max_keep=2)


def test_keep_tensor_wrong_length(case):
    with pytest.raises(ValueError, match=r"keep: expected shape \[2\]"):
        fork(case, keep=torch.tensor([1], dtype=torch.int32), max_keep=2)


def test_children_int_above_max_children(case):
    with pytest.raises(ValueError, match=r"children: 3 exceeds max_children \(2\)"):
        fork(case, children=3, max_children=2)


def test_children_tensor_needs_max_children(case):
    with pytest.raises(ValueError, match="max_children: required when children is a tensor"):
        fork(case, children=torch.tensor([1, 1], dtype=torch.int32))


def test_block_tables_row_count(case):
    with pytest.raises(ValueError, match=r"block_tables: expected 5 rows \(one per score\), got 4"):
        fork(case, block_tables=case.block_tables[:4])


def test_block_tables_wrong_dtype(case):
    with pytest.raises(ValueError, match="block_tables: expected dtype int32"):
        fork(case, block_tables=case.block_tables.long())


def test_lens_wrong_shape(case):
    with pytest.raises(ValueError, match=r"lens: expected shape \[5\]"):
        fork(case, lens=case.lens[:3])


def test_lens_exceed_table(case):
    lens = case.lens.clone()
    lens[1] = case.block_tables.shape[1] * 4 + 1
    with pytest.raises(ValueError, match="block_tables: row 1 needs"):
        fork(case, lens=lens)


def test_block_outside_pool(case):
    tables = case.block_tables.clone()
    tables[0, 0] = case.pool.num_blocks
    lens = case.lens.clone()
    lens[0] = max(int(lens[0]), 1)
    with pytest.raises(ValueError, match="block_tables: value"):
        fork(case, block_tables=tables, lens=lens)


def test_table_holds_a_free_block(case):
    tables, lens = case.block_tables.clone(), case.lens.clone()
    tables[0, 0] = int(case.pool.free_stack[0])
    lens[0] = max(int(lens[0]), 1)
    with pytest.raises(ValueError, match="block_tables: a table holds a block whose reference"):
        fork(case, block_tables=tables, lens=lens)


def test_pool_not_a_block_pool(case):
    with pytest.raises(ValueError, match="pool: expected a BlockPool, got tuple"):
        fork(case, pool=tuple(case.pool.tensors()))


def test_unknown_backend(case):
    with pytest.raises(ValueError, match="backend: 'cuda' cannot run on cpu tensors"):
        ops.select_and_fork(case.scores, case.group_offsets, 1, 1, case.block_tables, case.lens,
                            case.pool, backend="cuda")


def test_pool_state_shapes():
    with pytest.raises(ValueError, match=r"free_stack: expected shape \[4\]"):
        BlockPool(*(torch.zeros(n, dtype=torch.int32) for n in (4, 3, 1, 1)), block_size=4)
    with pytest.raises(ValueError, match="block_size: expected a positive int"):
        BlockPool.create(4, 0)
    with pytest.raises(ValueError, match="num_blocks: expected an int >= 0"):
        BlockPool.create(-1, 4)


def test_allocate_negative_count():
    with pytest.raises(ValueError, match="wanted: expected an int >= 0, got -2"):
        BlockPool.create(4, 4).allocate(-2)


def test_release_blocks_outside_pool():
    with pytest.raises(ValueError, match=r"blocks: value 9 outside \[-1, 4\)"):
        BlockPool.create(4, 4).release_blocks(torch.tensor([9], dtype=torch.int32))


@pytest.fixture
def caches():
    return torch.zeros(6, 4, 2, 8), torch.zeros(6, 4, 2, 8)


def test_copy_blocks_cache_rank(caches):
    with pytest.raises(ValueError, match="k_cache: expected 4 dimensions .* or 5"):
        ops.copy_blocks(caches[0][0], caches[1][0], torch.tensor([0]), torch.tensor([1]))


def test_copy_blocks_v_cache_mismatch(caches):
    with pytest.raises(ValueError, match="v_cache: expected shape"):
        ops.copy_blocks(caches[0], caches[1][:5], torch.tensor([0]), torch.tensor([1]))


def test_copy_blocks_dst_length(caches):
    with pytest.raises(ValueError, match=r"dst: expected shape \[2\]"):
        ops.copy_blocks(*caches, torch.tensor([0, 1]), torch.tensor([2]))


def test_copy_blocks_src_out_of_range(caches):
    with pytest.raises(ValueError, match=r"src: value 6 outside \[-1, 6\)"):
        ops.copy_blocks(*caches, torch.tensor([6]), torch.tensor([1]))


def test_copy_blocks_duplicate_destination(caches):
    with pytest.raises(ValueError, match="dst: a block is the destination of two copies"):
        ops.copy_blocks(*caches, torch.tensor([0, 1]), torch.tensor([2, 2]))


def test_copy_blocks_destination_is_a_source(caches):
    with pytest.raises(ValueError, match="dst: a destination block is also the source"):
        ops.copy_blocks(*caches, torch.tensor([0, 1]), torch.tensor([1, 2]))
