"""On-device bookkeeping of a paged KV pool: reference counts and a free stack.

A block table names blocks of the pool; a table of length ``len`` uses its first
``ceil(len / block_size)`` entries, the last of them partial when ``len`` is not a multiple of
``block_size``. A block's reference count is the number of tables that hold it; a block with
none is on the free stack. Every operation here and in :func:`ttscale.ops.select_and_fork`
keeps that true, and the tables they make hold their partial last block alone, so the next
token can be written into it.

Everything runs on the pool's device in a fixed number of launches, with no host
synchronisation and no shape that depends on data, so it can be captured in a CUDA graph.
Running out of blocks never raises: the request gets -1 where a block is missing and sets
:data:`POOL_EXHAUSTED` in :attr:`BlockPool.status`, which the engine reads whenever it
synchronises anyway. The plain-Python model of the same operations is in
:mod:`ttscale.reference.block_pool` (``pool_allocate``, ``pool_release``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ttscale._checks import check_range, check_tensor, check_values
from ttscale.errors import InvalidArgument
from ttscale.reference import POOL_EXHAUSTED

__all__ = ["BlockPool", "POOL_EXHAUSTED"]


@dataclass
class BlockPool:
    """The device state of a pool of ``num_blocks`` blocks of ``block_size`` tokens.

    Attributes
    ----------
    ref_counts : Tensor
        ``[num_blocks]`` int32, how many block tables hold each block.
    free_stack : Tensor
        ``[num_blocks]`` int32; entries ``[0, free_top)`` are the free blocks, and the next pop
        takes ``free_stack[free_top - 1]``. Blocks freed together are pushed in ascending order.
    free_top : Tensor
        ``[1]`` int32, the number of free blocks (on the device: nothing reads it on the host).
    status : Tensor
        ``[1]`` int32, sticky flags: :data:`POOL_EXHAUSTED` once a request found the stack empty.
    block_size : int
        Tokens per block.
    """

    ref_counts: Tensor
    free_stack: Tensor
    free_top: Tensor
    status: Tensor
    block_size: int

    def __post_init__(self) -> None:
        counts = check_tensor("ref_counts", self.ref_counts, ndim=1, dtype=torch.int32)
        device, shape = counts.device, tuple(counts.shape)
        check_tensor("free_stack", self.free_stack, dtype=torch.int32, device=device, shape=shape)
        check_tensor("free_top", self.free_top, dtype=torch.int32, device=device, shape=(1,))
        check_tensor("status", self.status, dtype=torch.int32, device=device, shape=(1,))
        if not isinstance(self.block_size, int) or self.block_size < 1:
            raise InvalidArgument(f"block_size: expected a positive int, got {self.block_size!r}")
        if check_values(self.free_top):
            check_range("free_top", self.free_top, 0, shape[0] + 1)

    @classmethod
    def create(
        cls, num_blocks: int, block_size: int, device: torch.device | str = "cpu"
    ) -> BlockPool:
        """An empty pool: every block free, handed out as 0, 1, 2, ... by the first pops."""
        if not isinstance(num_blocks, int) or num_blocks < 0:
            raise InvalidArgument(f"num_blocks: expected an int >= 0, got {num_blocks!r}")
        int32 = dict(dtype=torch.int32, device=device)
        return cls(
            ref_counts=torch.zeros(num_blocks, **int32),
            free_stack=torch.arange(num_blocks - 1, -1, -1, **int32),
            free_top=torch.full((1,), num_blocks, **int32),
            status=torch.zeros(1, **int32),
            block_size=block_size,
        )

    @property
    def num_blocks(self) -> int:
        return self.ref_counts.shape[0]

    @property
    def device(self) -> torch.device:
        return self.ref_counts.device

    def tensors(self) -> list[Tensor]:
        """The four state tensors, in the order the ops' kernels take them."""
        return [self.ref_counts, self.free_stack, self.free_top, self.status]

    def clone(self) -> BlockPool:
        return BlockPool(*(t.clone() for t in self.tensors()), block_size=self.block_size)

    def allocate(self, wanted: Tensor | int) -> Tensor:
        """Pop blocks, each with reference count 1.

        Parameters
        ----------
        wanted : Tensor or int
            ``[B]`` bool, one block for each True row; or an int ``n``, one block for each of
            ``n`` rows.

        Returns
        -------
        blocks : Tensor
            ``[B]`` int32. Rows are served in order while blocks last; a row not wanted or not
            served gets -1, and a wanted row not served sets :data:`POOL_EXHAUSTED`.
        """
        if isinstance(wanted, int):
            if wanted < 0:
                raise InvalidArgument(f"wanted: expected an int >= 0, got {wanted}")
            wanted = torch.ones(wanted, dtype=torch.bool, device=self.device)
        check_tensor("wanted", wanted, ndim=1, dtype=torch.bool, device=self.device)
        if self.num_blocks == 0:
            self._flag_exhausted(wanted.any())
            return torch.full(wanted.shape, -1, dtype=torch.int32, device=self.device)
        want = wanted.to(torch.int32)
        before = torch.cumsum(want, 0, dtype=torch.int32) - want  # blocks popped by earlier rows
        served = wanted & (before < self.free_top)
        position = (self.free_top - 1 - before).clamp(min=0).long()
        blocks = torch.where(served, self.free_stack[position], -1)
        # A popped block had count 0; rows not served add 0 to block 0.
        self.ref_counts.index_add_(0, blocks.clamp(min=0).long(), served.to(torch.int32))
        self.free_top.sub_(served.sum(dtype=torch.int32))
        self._flag_exhausted((wanted & ~served).any())
        return blocks

    def release(self, block_tables: Tensor, lens: Tensor) -> None:
        """Each row gives up its reference to each block it uses.

        A row uses its first ``ceil(len / block_size)`` entries.

        Parameters
        ----------
        block_tables : Tensor
            ``[B, max_blocks]`` int32.
        lens : Tensor
            ``[B]`` int32, tokens per row.
        """
        check_tensor("block_tables", block_tables, ndim=2, dtype=torch.int32, device=self.device)
        rows = block_tables.shape[0]
        check_tensor("lens", lens, dtype=torch.int32, device=self.device, shape=(rows,))
        used = -(-lens.long() // self.block_size)
        column = torch.arange(block_tables.shape[1], device=self.device)
        self.release_blocks(torch.where(column[None, :] < used[:, None], block_tables, -1))

    def release_blocks(self, blocks: Tensor) -> None:
        """Each entry of ``blocks`` (int32, any shape; -1 skipped) gives up one reference.

        Blocks left with no reference are pushed onto the free stack in ascending order.
        """
        check_tensor("blocks", blocks, dtype=torch.int32, device=self.device)
        if check_values(blocks):
            check_range("blocks", blocks, -1, self.num_blocks)
        if self.num_blocks == 0:
            return
        flat = blocks.reshape(-1)
        drops = torch.zeros_like(self.ref_counts)
        drops.index_add_(0, flat.clamp(min=0).long(), (flat >= 0).to(torch.int32))
        self.ref_counts.sub_(drops)
        self._push((drops > 0) & (self.ref_counts == 0))

    def _push(self, freed: Tensor) -> None:
        """Push the blocks marked in ``freed`` ``[num_blocks]`` bool, in ascending order."""
        n = self.num_blocks
        flags = freed.to(torch.int32)
        rank = torch.cumsum(flags, 0, dtype=torch.int32) - flags
        # Compact the freed blocks to the front of a scratch row; the others land on slot n.
        compact = torch.empty(n + 1, dtype=torch.int32, device=self.device)
        ids = torch.arange(n, dtype=torch.int32, device=self.device)
        compact.scatter_(0, torch.where(freed, rank, n).long(), ids)
        count = flags.sum(dtype=torch.int32)
        above_top = ids - self.free_top
        lands = (above_top >= 0) & (above_top < count)
        arriving = compact[above_top.clamp(0, n).long()]
        self.free_stack.copy_(torch.where(lands, arriving, self.free_stack))
        self.free_top.add_(count)

    def _flag_exhausted(self, short: Tensor) -> None:
        self.status.bitwise_or_(short.to(torch.int32) * POOL_EXHAUSTED)
