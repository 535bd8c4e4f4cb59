"""Prefix caching across requests: full prompt blocks that identical prefixes share.

Block ``i`` of a prompt is indexed by (the cached block before it, its ``block_size`` tokens), so
a hit means the same tokens at the same positions after the same prefix: the same K and V. The
cache holds one reference to every block it indexes, so an indexed block is never handed out
again while indexed; a block only the cache holds counts as free for admission
(:meth:`evictable`) and is given back, least recently used leaf first, when the pool runs short.
Only the prefilled part of a prompt (all but its last token) is shared; the partial last block
stays the request's own.

The index is the host's (keys to entries); the block ids live on the device, in
:attr:`PrefixCache.blocks` (one per entry), and move between it and the pool's tables by tensor
ops. Only prompt rows hold indexed blocks besides the cache (a sequence's table holds its own
tokens), and which prompt rows took which entries the host decided itself (:meth:`match`,
:meth:`insert`, :meth:`forget_row`), so it knows without reading the device which entries
only the cache holds.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ttscale.engine.pool import Pool

ROOT = -1  # the "entry before" the first block of every prompt


class PrefixCache:
    def __init__(self, pool: Pool):
        self.pool = pool
        self.index: dict[tuple[int, tuple[int, ...]], int] = {}  # key -> entry
        self.key_of: dict[int, tuple[int, tuple[int, ...]]] = {}  # entry -> key
        self.children: dict[int, int] = {}  # entry -> indexed entries that follow it
        self.last_used: dict[int, int] = {}
        self.blocks = torch.full((16,), -1, dtype=torch.int32, device=pool.device)  # entry -> block
        self._free_entries = list(range(15, -1, -1))
        self.holders: dict[int, int] = {}  # entry -> prompt rows holding its block (or matched it)
        self.sole: set[int] = set()  # entries no prompt row holds: free for the taking
        self.row_entries: dict[int, list[int]] = {}  # prompt row -> the entries it holds
        self.clock = 0
        self.hit_tokens = 0

    def _keys(self, prompt_ids: Sequence[int]):
        size = self.pool.block_size
        for i in range((len(prompt_ids) - 1) // size):
            yield tuple(prompt_ids[i * size:(i + 1) * size])

    def match(self, prompt_ids: Sequence[int]) -> list[int]:
        """The entries of the prompt's longest cached prefix, each block with a reference taken
        for the caller's table (:meth:`hit_blocks` gives their ids on the device)."""
        found, parent = [], ROOT
        self.clock += 1
        for tokens in self._keys(prompt_ids):
            entry = self.index.get((parent, tokens))
            if entry is None:
                break
            found.append(entry)
            self.last_used[entry] = self.clock
            parent = entry
        if found:
            self.pool.state.ref_counts.index_add_(0, self.hit_blocks(found).long(),
                                                  self._ones(len(found)))
            self._hold(found, 1)
        self.hit_tokens += len(found) * self.pool.block_size
        return found

    def unmatch(self, entries: list[int], release: bool = True) -> None:
        """Give back the references a :meth:`match` took (its prompt was not admitted; with
        ``release=False`` the prompt's failed prefill already gave them back)."""
        if entries and release:
            self.pool.state.release_blocks(self.hit_blocks(entries))
        self._hold(entries, -1)
        self.hit_tokens -= len(entries) * self.pool.block_size

    def forget_row(self, row: int) -> None:
        """The prompt row is about to be freed: its entries lose a holder."""
        self._hold(self.row_entries.pop(row, []), -1)

    def _hold(self, entries: list[int], change: int) -> None:
        for entry in entries:
            self.holders[entry] += change
            if self.holders[entry]:
                self.sole.discard(entry)
            else:
                self.sole.add(entry)

    def hit_blocks(self, entries: list[int]) -> torch.Tensor:
        return self.blocks[torch.tensor(entries, dtype=torch.long, device=self.pool.device)]

    def insert(self, prompt_ids: Sequence[int], row: int, hit: list[int]) -> None:
        """Index the full blocks of a prompt just prefilled into pool row ``row``, whose first
        blocks are the entries ``hit`` (from :meth:`match`)."""
        parent, new, columns = ROOT, [], []
        self.row_entries[row] = list(hit)
        for i, tokens in enumerate(self._keys(prompt_ids)):
            if i >= self.pool.used[row]:
                break
            key = (parent, tokens)
            entry = self.index.get(key)
            if entry is None:
                entry = self._new_entry()
                self.index[key] = entry
                self.key_of[entry] = key
                self.children[entry] = 0
                self.holders[entry] = 1
                if parent != ROOT:
                    self.children[parent] += 1
                new.append(entry)
                columns.append(i)
            elif i >= len(hit):
                break  # the same prefix prefilled twice: the chain goes on through the other copy
            self.last_used[entry] = self.clock
            parent = entry
        if new:
            device = self.pool.device
            self.pool.flush()
            cols = torch.tensor(columns, dtype=torch.long, device=device)
            blocks = self.pool.tables[row, cols]
            self.blocks[torch.tensor(new, dtype=torch.long, device=device)] = blocks
            self.pool.state.ref_counts.index_add_(0, blocks.long(), self._ones(len(new)))
            self.pool.share(row, columns[-1] + 1)
            self.pool.held_outside += len(new)
            self.row_entries[row] += new

    def evictable(self) -> int:
        """Indexed blocks that only the cache holds: free for a new request's taking."""
        return len(self.sole)

    def evict(self, need: int) -> None:
        """Give back blocks only the cache holds, least recently used leaves first, until
        ``need`` blocks are free (by the pool's lower bound) or none is left to give."""
        dropped = []
        while self.pool.num_free < need:
            leaves = sorted((e for e in self.sole if self.children[e] == 0),
                            key=self.last_used.__getitem__)
            if not leaves:
                break
            for entry in leaves[: need - self.pool.num_free]:
                self._drop(entry)
                dropped.append(entry)
        if dropped:
            self.pool.held_outside -= len(dropped)
            entries = torch.tensor(dropped, dtype=torch.long, device=self.pool.device)
            self.pool.state.release_blocks(self.blocks[entries])
            self.blocks[entries] = -1
            self._free_entries.extend(dropped)

    def clear(self) -> None:
        """Drop every block only the cache holds (others stay indexed while in use)."""
        self.evict(self.pool.num_blocks + 1)

    def _drop(self, entry: int) -> None:
        parent, _ = key = self.key_of.pop(entry)
        del self.index[key], self.children[entry], self.last_used[entry], self.holders[entry]
        self.sole.discard(entry)
        if parent != ROOT:
            self.children[parent] -= 1
        self.pool.num_free += 1  # only the cache held it

    def _new_entry(self) -> int:
        if not self._free_entries:
            have = self.blocks.shape[0]
            self.blocks = torch.cat([self.blocks, torch.full_like(self.blocks, -1)])
            self._free_entries = list(range(2 * have - 1, have - 1, -1))
        return self._free_entries.pop()

    def _ones(self, n: int) -> torch.Tensor:
        return torch.ones(n, dtype=torch.int32, device=self.pool.device)
