"""The paged KV pool of one model: ``[num_blocks, block_size, Hkv, D]`` keys and values per layer.

Which blocks belong to whom is the engine's business (block tables, reference counts); this
file only sizes and allocates the memory. All layers share one allocation, so a block id means
the same rows in every layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ttscale.errors import InvalidArgument
from ttscale.model.config import ModelConfig


@dataclass
class KVCache:
    """Per-layer caches ``k[l]``, ``v[l]``: ``[num_blocks, block_size, Hkv, D]``, contiguous."""

    k: list[Tensor]
    v: list[Tensor]
    # ``[L, num_blocks, block_size, Hkv, D]`` each, whose layers ``k``/``v`` are, when the pool
    # was allocated here: ``ops.copy_blocks`` copies every layer in one call through them
    k_layers: Tensor | None = None
    v_layers: Tensor | None = None

    @property
    def num_blocks(self) -> int:
        return self.k[0].shape[0]

    @property
    def block_size(self) -> int:
        return self.k[0].shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.k[0].dtype

    @property
    def device(self) -> torch.device:
        return self.k[0].device

    @classmethod
    def allocate(
        cls,
        config: ModelConfig,
        num_blocks: int,
        *,
        block_size: int = 16,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> KVCache:
        """``num_blocks`` blocks for every layer, zeroed, in one allocation."""
        if num_blocks <= 0:
            raise InvalidArgument(f"num_blocks: expected a positive count, got {num_blocks}")
        if block_size < 8 or block_size > 128 or block_size & (block_size - 1):
            raise InvalidArgument(f"block_size: expected a power of two from 8 to 128, got {block_size}")
        pool = torch.zeros(
            2,
            config.num_layers,
            num_blocks,
            block_size,
            config.num_kv_heads,
            config.head_dim,
            dtype=dtype,
            device=device,
        )
        return cls(k=list(pool[0].unbind(0)), v=list(pool[1].unbind(0)),
                   k_layers=pool[0], v_layers=pool[1])

    @classmethod
    def from_budget(
        cls,
        config: ModelConfig,
        budget_bytes: int,
        *,
        block_size: int = 16,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> KVCache:
        """As many blocks as fit in ``budget_bytes``; an error if not even one does."""
        per_block = block_bytes(config, block_size, dtype)
        num_blocks = int(budget_bytes) // per_block
        if num_blocks < 1:
            raise InvalidArgument(
                f"budget_bytes: {int(budget_bytes)} bytes hold no KV block "
                f"(one block of {block_size} tokens over {config.num_layers} layers takes "
                f"{per_block} bytes)"
            )
        return cls.allocate(config, num_blocks, block_size=block_size, dtype=dtype, device=device)


def block_bytes(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    """Bytes one block takes over all layers, keys and values."""
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * config.num_layers * block_size * config.num_kv_heads * config.head_dim * element
