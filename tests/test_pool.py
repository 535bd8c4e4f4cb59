"""The KV pool's one owner (engine/pool.py): forks, frees, copy-on-write, the host's lower bound
of the free blocks, the counted host read, and the invariants over random use."""

import random

import pytest
import torch

from ttscale.engine.pool import Pool, PoolExhausted


def test_fork_shares_blocks_and_release_returns_them():
    pool = Pool(8, 4)
    a, other = pool.new_rows(2)
    pool.reserve(a, 0, 12)
    (b,) = pool.fork(a, 1)
    assert pool.read_table(b) == pool.read_table(a) == [0, 1, 2]
    assert pool.state.ref_counts[:3].tolist() == [2, 2, 2]
    pool.release([a])
    assert pool.refresh() == 5
    pool.release([b])
    assert pool.num_free == 5  # that b held them alone once a went, the host learns at a read
    assert pool.host_reads == 3 and pool.refresh() == 8
    pool.release(pool.fork(other, 1))
    pool.reserve(other, 0, 5)
    pool.release([other])
    assert pool.num_free == 8 and pool.host_reads == 4  # no row is live: all are free, unread
    pool.check([])


def test_write_into_shared_partial_block_copies_it():
    copies = []
    pool = Pool(8, 4, copy_blocks=lambda src, dst: copies.append((src.tolist(), dst.tolist())))
    (parent,) = pool.new_rows(1)
    pool.reserve(parent, 0, 6)  # 6 tokens: block 1 is partial
    (child,) = pool.fork(parent, 1)
    pool.reserve(child, 6, 1)
    pool.flush()
    before, after = pool.read_table(parent), pool.read_table(child)
    assert copies == [([before[1]], [after[1]])] and after[0] == before[0] and after[1] != before[1]
    assert pool.state.ref_counts[before].tolist() == [2, 1]
    pool.check([parent, child])


def test_siblings_that_all_write_leave_the_last_one_the_original():
    """Three forks write into a partial block nobody else holds: two copy it, the third keeps it."""
    pool = Pool(8, 4, copy_blocks=lambda src, dst: None)
    (parent,) = pool.new_rows(1)
    pool.reserve(parent, 0, 6)
    kids = pool.fork(parent, 3)
    pool.release([parent])
    for kid in kids:
        pool.reserve(kid, 6, 1)
    pool.flush()
    tables = [pool.read_table(k) for k in kids]
    assert len({t[1] for t in tables}) == 3 and len({t[0] for t in tables}) == 1
    assert pool.refresh() == 8 - 4
    pool.check(kids)


def test_full_shared_block_is_not_copied():
    pool = Pool(8, 4, copy_blocks=lambda src, dst: pytest.fail("nothing to copy"))
    (parent,) = pool.new_rows(1)
    pool.reserve(parent, 0, 8)
    (child,) = pool.fork(parent, 1)
    assert pool.blocks_needed(child, 8, 3) == 1
    pool.reserve(child, 8, 3)
    assert pool.read_table(child)[:2] == pool.read_table(parent)
    pool.check([parent, child])


def test_exhaustion_raises_and_changes_nothing():
    pool = Pool(3, 4)
    (row,) = pool.new_rows(1)
    pool.reserve(row, 0, 8)
    with pytest.raises(PoolExhausted, match="need 2 free blocks, 1 of 3 are free"):
        pool.reserve(row, 8, 5)
    assert pool.used[row] == 2 and pool.refresh() == 1
    pool.check([row])


def test_trim_releases_unused_tail():
    pool = Pool(8, 4)
    (row,) = pool.new_rows(1)
    pool.reserve(row, 0, 16)
    pool.trim(row, 5)
    assert pool.used[row] == 2 and pool.num_free == 6 and pool.refresh() == 6
    pool.check([row])


def test_every_read_is_one_counted_transfer():
    pool = Pool(8, 4)
    tokens = torch.tensor([[3, 4]], dtype=torch.int64)
    flags = torch.tensor([[True, False]])
    scores = torch.tensor([0.5, -1.25], dtype=torch.float32)
    got = pool.read_host([tokens, flags, scores])
    assert pool.host_reads == 1
    assert [t.tolist() for t in got] == [[[3, 4]], [[True, False]], [0.5, -1.25]]


def test_a_packed_read_gives_back_every_part_bit_for_bit():
    """The one transfer a device read makes: parts of every dtype and odd byte sizes,
    concatenated and viewed back (run here on CPU tensors)."""
    from ttscale.engine.pool import _packed_read

    parts = [torch.tensor([[3, 4, 5]], dtype=torch.int64), torch.tensor([True, False, True]),
             torch.tensor([0.5, -1.25, float("nan")], dtype=torch.float32),
             torch.tensor([7], dtype=torch.int8), torch.arange(5, dtype=torch.int32).reshape(5, 1),
             torch.empty(0, 3, dtype=torch.float64)]
    got = _packed_read(parts)
    assert all(g.dtype == p.dtype and g.shape == p.shape for g, p in zip(got, parts, strict=True))
    assert all(torch.equal(g.view(torch.uint8), p.view(torch.uint8))
               for g, p in zip(got, parts, strict=True))


def test_bad_sizes_are_named():
    with pytest.raises(ValueError, match="num_blocks"):
        Pool(0, 16)
    with pytest.raises(ValueError, match="block_size"):
        Pool(4, 0)


class FakeCache:
    """Each block's token slots on the host: what write_kv and copy_blocks would leave."""

    def __init__(self, num_blocks: int, block_size: int):
        self.slots = [[None] * block_size for _ in range(num_blocks)]

    def copy(self, src, dst):
        for s, d in zip(src.tolist(), dst.tolist(), strict=True):
            if s >= 0 and d >= 0:
                self.slots[d] = list(self.slots[s])

    def write(self, table, start, values, size):
        for i, value in enumerate(values, start):
            self.slots[table[i // size]][i % size] = value

    def read(self, table, n, size):
        return [self.slots[table[i // size]][i % size] for i in range(n)]


def test_invariants_hold_over_ten_thousand_random_operations():
    """Random add (a prompt's blocks), fork, grow (copy-on-write included), abort (free a row),
    preempt (free its blocks, keep the row) and trim: every block free or referenced, each
    count the number of tables holding it, no leak, the host's figure a lower bound, and every
    row reading back the tokens written into it (a missed copy would let a sibling overwrite)."""
    rng = random.Random(0)
    size = 4
    cache = FakeCache(64, size)
    pool = Pool(64, size, copy_blocks=cache.copy)
    rows: dict[int, list[int]] = {}  # row -> the tokens it holds
    counter = iter(range(10**9))

    def grow(row, n):
        held = rows[row]
        pool.reserve(row, len(held), n)
        new = [next(counter) for _ in range(n)]
        pool.flush()
        cache.write(pool.read_table(row), len(held), new, size)
        held += new

    for step in range(10_000):
        op = rng.random()
        try:
            if op < 0.2 or not rows:  # add
                (row,) = pool.new_rows(1)
                rows[row] = []
                grow(row, rng.randint(0, 20))
            elif op < 0.4:  # fork
                parent = rng.choice(list(rows))
                for kid in pool.fork(parent, rng.randint(1, 3)):
                    rows[kid] = list(rows[parent])
            elif op < 0.65:  # grow
                grow(rng.choice(list(rows)), rng.randint(1, 9))
            elif op < 0.75:  # trim
                row = rng.choice(list(rows))
                keep = rng.randint(0, len(rows[row]))
                pool.trim(row, keep)
                del rows[row][keep:]
            elif op < 0.85:  # preempt: its blocks go, the row stays, its tokens recomputed later
                row = rng.choice(list(rows))
                pool.release([row], keep_rows=True)
                rows[row] = []
            else:  # abort
                pool.release([_pop(rng, rows)])
        except PoolExhausted:
            pool.release([_pop(rng, rows)])
        if step % 7 == 0:
            bound = pool.num_free
            assert pool.refresh() >= bound
        row = rng.choice(list(rows)) if rows else None
        if row is not None:
            assert cache.read(pool.read_table(row), len(rows[row]), size) == rows[row]
        if step % 250 == 0:
            pool.check(list(rows))
    for row, held in rows.items():
        assert pool.used[row] == pool.blocks_for(len(held))
        assert cache.read(pool.read_table(row), len(held), size) == held
    pool.check(list(rows))
    pool.release(list(rows))
    assert pool.refresh() == pool.num_blocks
    pool.check([])


def _pop(rng, rows):
    row = rng.choice(list(rows))
    del rows[row]
    return row
