"""Prefix caching across requests: full prompt blocks that identical prefixes share.

Block ``i`` of a prompt is indexed by (the cached block before it, its ``block_size`` tokens), so
a hit means the same tokens at the same positions after the same prefix: the same K and V. The
cache holds one reference to every block it indexes, so an indexed block is never handed out
again while indexed; a block only the cache holds counts as free for admission
(:meth:`evictable`) and is given back, least recently used leaf first, when the pool runs short.
Only the prefilled part of a prompt (all but its last token) is shared; the partial last block
stays the request's own.
"""

from __future__ import annotations

from collections.abc import Sequence

from ttscale.engine.block_manager import BlockManager

ROOT = -1  # the "block before" the first block of every prompt


class PrefixCache:
    def __init__(self, blocks: BlockManager):
        self.blocks = blocks
        self.index: dict[tuple[int, tuple[int, ...]], int] = {}
        self.key_of: dict[int, tuple[int, tuple[int, ...]]] = {}
        self.children: dict[int, int] = {}  # indexed block -> indexed blocks that follow it
        self.last_used: dict[int, int] = {}
        self.clock = 0
        self.hit_tokens = 0

    def _keys(self, prompt_ids: Sequence[int]):
        size = self.blocks.block_size
        for i in range((len(prompt_ids) - 1) // size):
            yield tuple(prompt_ids[i * size:(i + 1) * size])

    def match(self, prompt_ids: Sequence[int]) -> list[int]:
        """The indexed blocks of the prompt's longest cached prefix, each with a reference taken
        for the caller's table."""
        found, parent = [], ROOT
        self.clock += 1
        for tokens in self._keys(prompt_ids):
            block = self.index.get((parent, tokens))
            if block is None:
                break
            found.append(block)
            self.last_used[block] = self.clock
            parent = block
        self.blocks.fork(found)
        self.hit_tokens += len(found) * self.blocks.block_size
        return found

    def insert(self, prompt_ids: Sequence[int], table: Sequence[int]) -> None:
        """Index the full blocks of a prompt just prefilled into ``table``."""
        parent = ROOT
        for tokens, block in zip(self._keys(prompt_ids), table, strict=False):
            key = (parent, tokens)
            held = self.index.get(key)
            if held is not None and held != block:
                return  # the same prefix prefilled twice: the chain goes on through the other copy
            if held is None:
                if block in self.key_of:
                    return
                self.index[key] = block
                self.key_of[block] = key
                self.children[block] = 0
                if parent != ROOT:
                    self.children[parent] += 1
                self.blocks.fork([block])
            self.last_used[block] = self.clock
            parent = block

    def evictable(self) -> int:
        """Indexed blocks that only the cache holds: free for a new request's taking."""
        return sum(self.blocks.ref_counts[b] == 1 for b in self.key_of)

    def evict(self, need: int) -> None:
        """Give back blocks only the cache holds, least recently used leaves first, until ``need``
        blocks are free or none is left to give."""
        while self.blocks.num_free < need:
            leaves = [b for b in self.key_of if self.children[b] == 0 and self.blocks.ref_counts[b] == 1]
            if not leaves:
                return
            for block in sorted(leaves, key=self.last_used.__getitem__):
                if self.blocks.num_free >= need:
                    return
                self._drop(block)

    def clear(self) -> None:
        """Drop every block only the cache holds (others stay indexed while in use)."""
        self.evict(self.blocks.num_blocks + 1)

    def _drop(self, block: int) -> None:
        parent, _ = key = self.key_of.pop(block)
        del self.index[key], self.children[block], self.last_used[block]
        if parent != ROOT:
            self.children[parent] -= 1
        self.blocks.free([block])
