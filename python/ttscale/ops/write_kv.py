"""``write_kv``: new K/V rows scattered into the paged pool."""

from __future__ import annotations

import torch
from torch import Tensor

from ttscale import backends
from ttscale._checks import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_range,
    check_tensor,
    check_values,
)
from ttscale.errors import InvalidArgument
from ttscale.ops import dispatch


@torch.library.custom_op("ttscale::write_kv", mutates_args=("k_cache", "v_cache"))
def _write_kv(k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor, slots: Tensor, backend: str) -> None:
    backends.implementation("write_kv", backend)(k_cache, v_cache, k, v, slots)


@_write_kv.register_fake
def _(k_cache, v_cache, k, v, slots, backend):
    return None


def write_kv(
    k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor, slots: Tensor, *,
    backend: str | None = None, validate: bool = True,
) -> None:
    """Scatter new K/V rows into the pool, in place.

    Parameters
    ----------
    k_cache, v_cache : Tensor
        ``[num_blocks, block_size, Hkv, D]``, contiguous.
    k, v : Tensor
        ``[N, Hkv, D]``, the caches' dtype.
    slots : Tensor
        ``[N]`` integer, the flat slot ``block * block_size + offset`` of each row; -1 skips the
        row (the padded rows of a CUDA graph).
    validate : bool
        False skips the argument checks, for a caller that has just checked the same slots
        against a cache of the same shape (a model's layers after the first).
    """
    if validate:
        check_write_kv(k_cache, v_cache, k, v, slots)
    chosen = backends.resolve("write_kv", k_cache.device, backend)
    k, v = dispatch.contiguous(k, v)
    dispatch.run(_write_kv, "write_kv", k_cache, v_cache, k, v, slots.to(torch.int64).contiguous(), chosen)


def check_write_kv(k_cache, v_cache, k, v, slots) -> None:
    check_tensor("k_cache", k_cache, ndim=4, dtype=FLOAT_DTYPES)
    check_tensor("v_cache", v_cache, dtype=k_cache.dtype, device=k_cache.device, shape=tuple(k_cache.shape))
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise InvalidArgument("k_cache/v_cache: the pool must be contiguous", param="k_cache")
    num_blocks, block_size, kv_heads, head_dim = k_cache.shape
    check_tensor("k", k, ndim=3, dtype=k_cache.dtype, device=k_cache.device, shape=(None, kv_heads, head_dim))
    check_tensor("v", v, dtype=k_cache.dtype, device=k_cache.device, shape=tuple(k.shape))
    check_tensor("slots", slots, dtype=INDEX_DTYPES, device=k_cache.device, shape=(k.shape[0],))
    if check_values(slots):
        check_range("slots", slots, -1, num_blocks * block_size)
