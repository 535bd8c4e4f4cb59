"""Block bookkeeping of one paged KV pool: reference counts, a free stack, tables, forks.

A table is a list of block ids, the blocks holding one token run (a problem's prompt, or a
sequence's own suffix) in order. A fork copies a table and bumps the counts of its blocks; the
first write into a shared partial block copies it (copy-on-write), so no token's KV is ever
copied before it must be.

Invariants (property-tested): every block is either free or referenced; a block's count
equals the number of tables that hold it; after any sequence of operations nothing leaks.
"""

from __future__ import annotations

from dataclasses import dataclass

from ttscale.errors import (
    InvalidArgument,
    PoolExhausted,  # re-exported here
)


@dataclass
class CopyOnWrite:
    """A shared block that must be copied before a table writes into it."""

    src: int
    dst: int


class BlockManager:
    """Reference-counted blocks of ``block_size`` token slots.

    Parameters
    ----------
    num_blocks : int
        Blocks in the pool.
    block_size : int
        Token slots per block.
    """

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1:
            raise InvalidArgument(f"num_blocks: expected >= 1, got {num_blocks}")
        if block_size < 1:
            raise InvalidArgument(f"block_size: expected >= 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.ref_counts = [0] * num_blocks
        # Popped from the end: low block ids are handed out first, which keeps tests readable.
        self.free_stack = list(range(num_blocks - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self.free_stack)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def allocate(self, n: int) -> list[int]:
        """Pop ``n`` free blocks, each with count 1."""
        if n > len(self.free_stack):
            raise PoolExhausted(f"need {n} free blocks, {len(self.free_stack)} of {self.num_blocks} are free")
        blocks = [self.free_stack.pop() for _ in range(n)]
        for b in blocks:
            self.ref_counts[b] = 1
        return blocks

    def fork(self, table: list[int]) -> list[int]:
        """A new table sharing every block of ``table``."""
        for b in table:
            self.ref_counts[b] += 1
        return list(table)

    def free(self, table: list[int]) -> None:
        """Drop one reference to each block of ``table``; blocks reaching 0 return to the pool."""
        for b in reversed(table):
            self.ref_counts[b] -= 1
            if self.ref_counts[b] == 0:
                self.free_stack.append(b)
            elif self.ref_counts[b] < 0:
                raise AssertionError(f"block {b} freed more often than referenced")
        table.clear()

    def blocks_needed(self, table: list[int], num_tokens: int, new_tokens: int) -> int:
        """Free blocks that ``reserve`` would take to grow a table from ``num_tokens`` by ``new_tokens``."""
        have = len(table)
        need = self.blocks_for(num_tokens + new_tokens) - have
        partial_shared = num_tokens % self.block_size and have and self.ref_counts[table[-1]] > 1
        return max(need, 0) + (1 if partial_shared and new_tokens > 0 else 0)

    def reserve(self, table: list[int], num_tokens: int, new_tokens: int) -> list[CopyOnWrite]:
        """Make room in ``table`` (holding ``num_tokens``) for ``new_tokens`` more, in place.

        A shared partial last block is replaced by a private copy; the returned copies must be
        performed (``ops.copy_blocks`` or equivalent) before the new tokens are written.
        Raises :class:`PoolExhausted` and changes nothing when the pool is short.
        """
        if new_tokens <= 0:
            return []
        need = self.blocks_needed(table, num_tokens, new_tokens)
        if need > len(self.free_stack):
            raise PoolExhausted(f"need {need} free blocks, {len(self.free_stack)} of {self.num_blocks} are free")
        copies = []
        if num_tokens % self.block_size and self.ref_counts[table[-1]] > 1:
            (fresh,) = self.allocate(1)
            self.ref_counts[table[-1]] -= 1
            copies.append(CopyOnWrite(src=table[-1], dst=fresh))
            table[-1] = fresh
        grow = self.blocks_for(num_tokens + new_tokens) - len(table)
        if grow > 0:
            table.extend(self.allocate(grow))
        return copies

    def trim(self, table: list[int], num_tokens: int) -> None:
        """Release the blocks of ``table`` beyond those that hold ``num_tokens`` tokens."""
        keep = self.blocks_for(num_tokens)
        if len(table) > keep:
            extra = table[keep:]
            del table[keep:]
            self.free(extra)

    def check(self, tables: list[list[int]]) -> None:
        """Assert the invariants against every live table (tests and debugging)."""
        counts = [0] * self.num_blocks
        for table in tables:
            for b in table:
                counts[b] += 1
        free = set(self.free_stack)
        assert len(free) == len(self.free_stack), "a block is on the free stack twice"
        for b in range(self.num_blocks):
            assert counts[b] == self.ref_counts[b], f"block {b}: count {self.ref_counts[b]}, held by {counts[b]} tables"
            assert (b in free) == (counts[b] == 0), f"block {b}: free={b in free} but held by {counts[b]} tables"
