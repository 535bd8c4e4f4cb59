"""The paged KV pool's one owner: reference counts, free stack and block tables on the device.

A block table is a row of :attr:`Pool.tables` (``int32 [rows, width]``, -1 past its used
entries); a prompt or sequence holds its row's index. The reference counts and the free stack
are a :class:`~ttscale.block_pool.BlockPool`. Every change (allocate, fork, free, copy-on-write,
a search step's select-and-fork) is a batched tensor op on the pool's device; the host never
holds a copy of a count or of a table's block ids.

What the host keeps is what it decided itself: per row, how many entries are in use
(:attr:`Pool.used`, from the token counts it asked for) and from which entry on the row's blocks
are its alone (:attr:`Pool.private_from`: blocks it allocated for the row and did not fork
since). From those it keeps :attr:`Pool.num_free`, a lower bound of the free blocks: the last
read's figure, less every block asked for since (a possible copy-on-write counted as one), plus
the private blocks of rows freed since. Blocks that other frees release become visible at the
next read, or as soon as no row is live: then every block is free but those held outside rows
(:attr:`Pool.held_outside`, the prefix cache's). Admission that trusts the bound never finds the
stack empty; should it, the status flag comes back with the next read and raises.

Every device-to-host read of the engine goes through :meth:`Pool.read_host`, which packs the
caller's tensors with the pool's figures (the free count and the status) into one transfer and
counts it (``stats().host_reads``).

Invariants (property-tested over random add/fork/abort/preempt sequences): every block is free
or referenced; a block's count equals the number of tables (and cache entries) holding it;
nothing leaks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ttscale.block_pool import POOL_EXHAUSTED, BlockPool
from ttscale.errors import InvalidArgument, PoolExhausted

__all__ = ["Pool", "PoolExhausted"]

_INT32 = torch.int32


class Pool:
    """Reference-counted blocks of ``block_size`` token slots and the tables that hold them.

    Parameters
    ----------
    num_blocks : int
        Blocks in the pool.
    block_size : int
        Token slots per block.
    device : torch.device or str
        Where the state lives (the model's device).
    copy_blocks : callable, optional
        ``copy_blocks(src, dst)``, int32 ``[P]`` device tensors (-1 pairs skipped): copies
        whole blocks in every layer (the engine passes ``ops.copy_blocks`` over its KV cache).
    """

    def __init__(self, num_blocks: int, block_size: int, device: torch.device | str = "cpu",
                 copy_blocks: Callable[[Tensor, Tensor], None] | None = None):
        if not isinstance(num_blocks, int) or num_blocks < 1:
            raise InvalidArgument(f"num_blocks: expected an int >= 1, got {num_blocks!r}")
        if not isinstance(block_size, int) or block_size < 1:
            raise InvalidArgument(f"block_size: expected an int >= 1, got {block_size!r}")
        self.device = torch.device(device)
        self.state = BlockPool.create(num_blocks, block_size, self.device)
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.copy_blocks = copy_blocks
        self.tables = torch.full((16, 4), -1, dtype=_INT32, device=self.device)  # [rows, width]
        self.used = [0] * 16  # per row: table entries in use
        self.private_from = [0] * 16  # per row: entries from here on are held by the row alone
        self._free_rows = list(range(15, -1, -1))
        self.num_free = num_blocks  # a lower bound of the free blocks (see the module's text)
        self.live_rows = 0
        self.held_outside = 0  # blocks referenced by holders other than rows (the prefix cache)
        self.host_reads = 0
        # growth asked for since the last flush: (row, column of a possible copy-on-write or -1,
        # first new column, new columns)
        self._pending: list[tuple[int, int, int, int]] = []

    # ------------------------------------------------------------------------------------------
    # Reading

    def read_host(self, tensors: Sequence[Tensor] = (), allow_exhausted: bool = False,
                  ) -> list[Tensor]:
        """The engine's one device-to-host read: ``tensors`` (on the pool's device) and the
        pool's own figures in one packed transfer, counted in :attr:`host_reads`. Returns the
        tensors' host copies; :attr:`num_free` becomes exact again. A request that found the
        free stack empty since the last read raises, unless ``allow_exhausted`` (a search
        step's forks, whose children then keep only their full blocks)."""
        self.flush()
        parts = [*tensors, self.state.free_top, self.state.status]
        self.host_reads += 1
        if self.device.type == "cpu":  # already in host memory: packing would only copy
            out = [t.detach() for t in parts]
        else:
            out = _packed_read(parts)
        free_top, status = out[len(tensors)], out[len(tensors) + 1]
        self.num_free = int(free_top[0])
        if int(status[0]) & POOL_EXHAUSTED:
            self.state.status.zero_()
        if int(status[0]) & POOL_EXHAUSTED and not allow_exhausted:
            raise AssertionError("KV pool: a block was asked for while none was free; the host's "
                                 "lower bound of the free blocks was wrong")
        return out[:len(tensors)]

    def refresh(self) -> int:
        """Read the free count now (one counted read); :attr:`num_free` is then exact."""
        self.read_host()
        return self.num_free

    def ensure(self, need: int) -> bool:
        """Whether ``need`` blocks are free, reading the count when the lower bound says no."""
        return need <= self.num_free or need <= self.refresh()

    def read_table(self, row: int) -> list[int]:
        """A row's block ids (tests and debugging: one counted read)."""
        (table,) = self.read_host([self.tables[row, : self.used[row]]])
        return table.tolist()

    def check(self, rows: Sequence[int], extra: Tensor | None = None) -> None:
        """Assert the invariants against every live row and ``extra`` (other holders' block
        ids, -1 skipped, e.g. the prefix cache's): tests and debugging, one counted read."""
        self.flush()
        rows_t = torch.tensor(list(rows), dtype=torch.long, device=self.device)
        held = self.tables[rows_t].reshape(-1)
        if extra is not None:
            held = torch.cat([held, extra.reshape(-1).to(_INT32)])
        counts, stack, top, tables, held = (t.tolist() for t in self.read_host(
            [self.state.ref_counts, self.state.free_stack, self.state.free_top, self.tables[rows_t],
             held]))
        want = [0] * self.num_blocks
        for b in held:
            if b >= 0:
                want[b] += 1
        free = stack[: top[0]]
        assert len(set(free)) == len(free), "a block is on the free stack twice"
        for b in range(self.num_blocks):
            assert counts[b] == want[b], f"block {b}: count {counts[b]}, held {want[b]} times"
            assert (b in free) == (want[b] == 0), \
                f"block {b}: free={b in free}, held {want[b]} times"
        for row, table in zip(rows, tables, strict=True):
            n = self.used[row]
            assert all(b >= 0 for b in table[:n]) and all(b == -1 for b in table[n:]), \
                f"row {row}: {n} entries in use, table {table}"

    # ------------------------------------------------------------------------------------------
    # Rows

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def new_rows(self, k: int) -> list[int]:
        """``k`` empty rows (tables holding nothing)."""
        while len(self._free_rows) < k:
            self._grow_rows()
        self.live_rows += k
        return [self._free_rows.pop() for _ in range(k)]

    def set_prefix(self, row: int, blocks: Tensor) -> None:
        """Start an empty row with ``blocks`` (device int32, already referenced for it: a prefix
        cache's hit)."""
        n = blocks.numel()
        if n:
            self._widen(n)
            self.tables[row, :n] = blocks
        self.used[row] = self.private_from[row] = n

    def share(self, row: int, entries: int) -> None:
        """Note that the row's first ``entries`` blocks gained another holder (the prefix cache)."""
        self.private_from[row] = max(self.private_from[row], min(entries, self.used[row]))

    def fork(self, row: int, k: int) -> list[int]:
        """``k`` new rows sharing every block of ``row``."""
        self.flush()
        n = self.used[row]
        kids = self.new_rows(k)
        if k and n:
            kids_t = torch.tensor(kids, dtype=torch.long, device=self.device)
            self.tables[kids_t] = self.tables[row].clone()
            self.state.ref_counts.index_add_(0, self.tables[row, :n].long(),
                                             torch.full((n,), k, dtype=_INT32, device=self.device))
        for kid in kids:
            self.used[kid] = self.private_from[kid] = n
        self.private_from[row] = n
        return kids

    def release(self, rows: Sequence[int], keep_rows: bool = False) -> None:
        """Drop every block of ``rows`` (one reference each); the rows go back for reuse unless
        ``keep_rows`` (a preempted sequence keeps its row, empty)."""
        rows = [r for r in rows if self.used[r]] if keep_rows else list(rows)
        if not rows:
            return
        self.flush()
        rows_t = torch.tensor(rows, dtype=torch.long, device=self.device)
        if any(self.used[r] for r in rows):
            self.state.release_blocks(self.tables[rows_t])
            self.tables[rows_t] = -1
        for r in rows:
            self.num_free += self.used[r] - self.private_from[r]
            self.used[r] = self.private_from[r] = 0
        if not keep_rows:
            self._return_rows(rows)

    def forget(self, rows: Sequence[int]) -> None:
        """Return rows whose references an op already dropped (select-and-fork's losers)."""
        if not rows:
            return
        self.tables[torch.tensor(list(rows), dtype=torch.long, device=self.device)] = -1
        for r in rows:
            self.used[r] = self.private_from[r] = 0
        self._return_rows(rows)

    def _return_rows(self, rows: Sequence[int]) -> None:
        self._free_rows.extend(rows)
        self.live_rows -= len(rows)
        if not self.live_rows:  # no table holds a block: all are free but those held outside
            self.num_free = self.num_blocks - self.held_outside

    def set_rows(self, rows: Sequence[int], tables: Tensor, used: Sequence[int],
                 private_from: Sequence[int]) -> None:
        """Write ``tables`` (``[len(rows), w]`` int32, -1 past each used entry) into ``rows``,
        whose references it already holds."""
        if not rows:
            return
        width = tables.shape[1]
        self._widen(width)
        rows_t = torch.tensor(list(rows), dtype=torch.long, device=self.device)
        self.tables[rows_t] = -1
        self.tables[rows_t, :width] = tables
        for r, n, p in zip(rows, used, private_from, strict=True):
            self.used[r], self.private_from[r] = n, p

    def trim(self, row: int, num_tokens: int) -> None:
        """Release the row's blocks beyond those that hold ``num_tokens`` tokens."""
        keep, n = self.blocks_for(num_tokens), self.used[row]
        if n <= keep:
            return
        self.flush()
        self.state.release_blocks(self.tables[row, keep:n])
        self.tables[row, keep:n] = -1
        self.num_free += n - max(keep, self.private_from[row])
        self.used[row] = keep
        self.private_from[row] = min(self.private_from[row], keep)

    # ------------------------------------------------------------------------------------------
    # Growth

    def blocks_needed(self, row: int, num_tokens: int, new_tokens: int) -> int:
        """Free blocks that :meth:`reserve` counts for growing ``row`` (holding ``num_tokens``)
        by ``new_tokens``: new blocks, and one for a partial last block that may be shared."""
        if new_tokens <= 0:
            return 0
        n = self.used[row]
        grow = max(self.blocks_for(num_tokens + new_tokens) - n, 0)
        return grow + self._may_copy(row, num_tokens)

    def _may_copy(self, row: int, num_tokens: int) -> int:
        n = self.used[row]
        return int(bool(num_tokens % self.block_size) and n > 0 and self.private_from[row] >= n)

    def reserve(self, row: int, num_tokens: int, new_tokens: int) -> None:
        """Make room in ``row`` (holding ``num_tokens``) for ``new_tokens`` more. A shared
        partial last block is replaced by a private copy. The host's part happens now, the
        device's at the next :meth:`flush` (batched over every row reserved since).
        Raises :class:`PoolExhausted` and changes nothing when the lower bound is short."""
        need = self.blocks_needed(row, num_tokens, new_tokens)
        if not need:
            return
        if need > self.num_free:
            raise PoolExhausted(f"need {need} free blocks, {self.num_free} of {self.num_blocks} "
                                "are free")
        n = self.used[row]
        copy_at = n - 1 if self._may_copy(row, num_tokens) else -1
        grow = need - (copy_at >= 0)
        self._pending.append((row, copy_at, n, grow))
        self.num_free -= need
        self.used[row] = n + grow
        if copy_at >= 0:
            self.private_from[row] = copy_at
        self._widen(n + grow)

    def reserve_rows(self, rows: Sequence[int], num_tokens: Sequence[int],
                     new_tokens: Sequence[int]) -> int:
        """:meth:`reserve` for each row in order while the free blocks last (reading the count
        once when the lower bound is short of the first row's need); returns how many rows got
        room."""
        done = 0
        for row, n, new in zip(rows, num_tokens, new_tokens, strict=True):
            need = self.blocks_needed(row, n, new)
            if need > self.num_free and (done or not self.ensure(need)):
                break
            self.reserve(row, n, new)
            done += 1
        return done

    def reserve_all(self, rows: Sequence[int], num_tokens: Sequence[int],
                    new_tokens: Sequence[int]) -> None:
        """:meth:`reserve` for every row, reading the free count once if the lower bound is
        short of their total; raises :class:`PoolExhausted` and reserves nothing if it is."""
        need = sum(self.blocks_needed(r, n, new) for r, n, new in zip(rows, num_tokens, new_tokens))
        if not self.ensure(need):
            raise PoolExhausted(f"need {need} free blocks, {self.num_free} of {self.num_blocks} "
                                "are free")
        for row, n, new in zip(rows, num_tokens, new_tokens, strict=True):
            self.reserve(row, n, new)

    def flush(self) -> None:
        """Run the reserved growth on the device: one batched copy-on-write, one allocate."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        device, state = self.device, self.state
        copies = [(row, col) for row, col, _, _ in pending if col >= 0]
        if copies:
            rows_t = torch.tensor([r for r, _ in copies], dtype=torch.long, device=device)
            cols_t = torch.tensor([c for _, c in copies], dtype=torch.long, device=device)
            last = self.tables[rows_t, cols_t]
            # rows that share one block copy it in order while someone else still holds it: the
            # k-th of them sees the count less the k copies before it
            same = (last[:, None] == last[None, :]).tril(-1).sum(1, dtype=_INT32)
            shared = state.ref_counts[last.long()] - same > 1
            fresh = state.allocate(shared)
            state.ref_counts.index_add_(0, last.long(), -shared.to(_INT32))
            self.tables[rows_t, cols_t] = torch.where(shared, fresh, last)
            if self.copy_blocks is not None:
                self.copy_blocks(torch.where(shared, last, -1), fresh)
        rows, cols = [], []
        for row, _, first, grow in pending:
            rows += [row] * grow
            cols += range(first, first + grow)
        if rows:
            blocks = state.allocate(len(rows))
            self.tables[torch.tensor(rows, dtype=torch.long, device=device),
                        torch.tensor(cols, dtype=torch.long, device=device)] = blocks

    # ------------------------------------------------------------------------------------------

    def gather(self, rows: Sequence[int], pad: int = 0) -> Tensor:
        """``int32 [len(rows), w]`` the rows' tables (w: the widest in use, at least 1), padded
        with ``pad``: block 0 for attention (never read past a length), or -1."""
        self.flush()
        width = max([self.used[r] for r in rows] + [1])
        rows_t = torch.tensor(list(rows), dtype=torch.long, device=self.device)
        tables = self.tables[rows_t, :width]
        return tables.clamp(min=0) if pad == 0 else tables

    def slots(self, rows: Tensor, positions: Tensor) -> Tensor:
        """The KV cache slot of each token: ``rows`` and ``positions`` (in the row's table) are
        int64 device tensors of one shape."""
        self.flush()
        size = self.block_size
        return self.tables[rows, positions // size].long() * size + positions % size

    def _widen(self, width: int) -> None:
        have = self.tables.shape[1]
        if width > have:
            wider = torch.full((self.tables.shape[0], max(width, 2 * have)), -1, dtype=_INT32,
                               device=self.device)
            wider[:, :have] = self.tables
            self.tables = wider

    def _grow_rows(self) -> None:
        have = self.tables.shape[0]
        more = torch.full((have, self.tables.shape[1]), -1, dtype=_INT32, device=self.device)
        self.tables = torch.cat([self.tables, more])
        self.used += [0] * have
        self.private_from += [0] * have
        self._free_rows = list(range(2 * have - 1, have - 1, -1)) + self._free_rows


def _packed_read(parts: list[Tensor]) -> list[Tensor]:
    """``parts`` (device tensors) copied to the host in one transfer: their bytes concatenated,
    each padded to 8 so that every part views back at an aligned offset."""
    flat = []
    for t in parts:
        raw = t.detach().contiguous().reshape(-1).view(torch.uint8)
        pad = -raw.numel() % 8
        flat.append(raw if not pad else torch.cat([raw, raw.new_zeros(pad)]))
    host = torch.cat(flat).cpu()
    out, at = [], 0
    for t in parts:
        n = t.numel() * t.element_size()
        out.append(host[at:at + n].view(t.dtype).reshape(t.shape))
        at += n + (-n % 8)
    return out
