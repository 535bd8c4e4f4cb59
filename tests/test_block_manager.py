"""KV block bookkeeping: forks, frees, copy-on-write, exhaustion, and its invariants."""

import random

import pytest

from ttscale.engine.block_manager import BlockManager, PoolExhausted


def test_fork_shares_blocks_and_free_returns_them():
    bm = BlockManager(8, 4)
    a = bm.allocate(3)
    b = bm.fork(a)
    assert b == a and all(bm.ref_counts[x] == 2 for x in a)
    bm.free(a)
    assert bm.num_free == 5
    bm.free(b)
    assert bm.num_free == 8
    bm.check([])


def test_write_into_shared_partial_block_copies_it():
    bm = BlockManager(8, 4)
    parent = bm.allocate(2)  # 6 tokens: block 1 is partial
    child = bm.fork(parent)
    copies = bm.reserve(child, 6, 1)
    assert len(copies) == 1 and copies[0].src == parent[1] and child[1] == copies[0].dst
    assert child[0] == parent[0] and bm.ref_counts[parent[0]] == 2 and bm.ref_counts[parent[1]] == 1
    bm.check([parent, child])


def test_full_shared_block_is_not_copied():
    bm = BlockManager(8, 4)
    parent = bm.allocate(2)  # 8 tokens: both full
    child = bm.fork(parent)
    assert bm.reserve(child, 8, 3) == []
    assert child[:2] == parent and len(child) == 3
    bm.check([parent, child])


def test_exhaustion_raises_and_changes_nothing():
    bm = BlockManager(3, 4)
    table = bm.allocate(2)
    before = (list(bm.ref_counts), list(bm.free_stack), list(table))
    with pytest.raises(PoolExhausted, match="need 2 free blocks, 1 of 3 are free"):
        bm.reserve(table, 8, 5)
    assert (bm.ref_counts, bm.free_stack, table) == before


def test_trim_releases_unused_tail():
    bm = BlockManager(8, 4)
    table = bm.allocate(4)
    bm.trim(table, 5)
    assert len(table) == 2 and bm.num_free == 6
    bm.check([table])


def test_bad_sizes_are_named():
    with pytest.raises(ValueError, match="num_blocks"):
        BlockManager(0, 16)
    with pytest.raises(ValueError, match="block_size"):
        BlockManager(4, 0)


def test_invariants_hold_over_ten_thousand_random_operations():
    rng = random.Random(0)
    bm = BlockManager(64, 4)
    tables: list[tuple[list[int], int]] = []  # (table, tokens held)
    for step in range(10_000):
        op = rng.random()
        try:
            if op < 0.25 or not tables:
                n = rng.randint(0, 20)
                table = bm.allocate(bm.blocks_for(n))
                tables.append((table, n))
            elif op < 0.5:
                table, n = rng.choice(tables)
                tables.append((bm.fork(table), n))
            elif op < 0.75:
                i = rng.randrange(len(tables))
                table, n = tables[i]
                grow = rng.randint(1, 9)
                bm.reserve(table, n, grow)
                tables[i] = (table, n + grow)
            elif op < 0.85:
                i = rng.randrange(len(tables))
                table, n = tables[i]
                n = rng.randint(0, n)
                bm.trim(table, n)
                tables[i] = (table, n)
            else:
                table, _ = tables.pop(rng.randrange(len(tables)))
                bm.free(table)
        except PoolExhausted:
            table, _ = tables.pop(rng.randrange(len(tables)))
            bm.free(table)
        for table, n in tables:
            assert len(table) == bm.blocks_for(n)
        if step % 250 == 0:
            bm.check([t for t, _ in tables])
    bm.check([t for t, _ in tables])
    for table, _ in tables:
        bm.free(table)
    assert bm.num_free == bm.num_blocks
    bm.check([])
