"""``copy_blocks``: the copies copy-on-write asks for, every layer in one call."""

from __future__ import annotations

import torch
from torch import Tensor

from ttscale import backends
from ttscale._checks import (
    INDEX_DTYPES,
    check_range,
    check_tensor,
    check_values,
)
from ttscale.errors import InvalidArgument
from ttscale.ops import dispatch


@torch.library.custom_op("ttscale::copy_blocks", mutates_args=("k_cache", "v_cache"))
def _copy_blocks(k_cache: Tensor, v_cache: Tensor, src: Tensor, dst: Tensor, backend: str) -> None:
    backends.implementation("copy_blocks", backend)(k_cache, v_cache, src, dst)


@_copy_blocks.register_fake
def _(k_cache, v_cache, src, dst, backend):
    return None


def copy_blocks(
    k_cache: Tensor, v_cache: Tensor, src: Tensor, dst: Tensor, *, backend: str | None = None
) -> None:
    """Copy whole blocks ``src[i] -> dst[i]`` of the K and V caches, in place: copy-on-write.

    One call copies every layer when the caches carry a leading layer dimension (a pool kept
    as one tensor for K and one for V); a pool with a tensor per layer calls once per layer.
    Pairs with a -1 on either side are skipped, so a fixed-size buffer (such as
    :class:`ForkResult`'s ``copy_src``/``copy_dst``) works inside a CUDA graph.

    Parameters
    ----------
    k_cache, v_cache : Tensor
        ``[num_blocks, block_size, Hkv, D]`` or ``[L, num_blocks, block_size, Hkv, D]``,
        contiguous, same shape and dtype.
    src, dst : Tensor
        ``[P]`` integer block ids, or -1. The destinations must be distinct and none of them a
        source (the copies run in parallel).
    """
    check_tensor("k_cache", k_cache)
    if k_cache.dim() not in (4, 5):
        raise InvalidArgument(
            "k_cache: expected 4 dimensions (one layer) or 5 (layers first), "
            f"got shape {tuple(k_cache.shape)}"
        )
    shape = tuple(k_cache.shape)
    check_tensor("v_cache", v_cache, dtype=k_cache.dtype, device=k_cache.device, shape=shape)
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise InvalidArgument("k_cache/v_cache: the pool must be contiguous", param="k_cache")
    num_blocks = k_cache.shape[k_cache.dim() - 4]
    check_tensor("src", src, ndim=1, dtype=INDEX_DTYPES, device=k_cache.device)
    check_tensor("dst", dst, dtype=INDEX_DTYPES, device=k_cache.device, shape=tuple(src.shape))
    if check_values(src, dst):
        check_range("src", src, -1, num_blocks)
        check_range("dst", dst, -1, num_blocks)
        active = (src >= 0) & (dst >= 0)
        targets = dst[active]
        if targets.unique().numel() != targets.numel():
            raise InvalidArgument("dst: a block is the destination of two copies")
        if bool(torch.isin(targets, src[active]).any()):
            raise InvalidArgument("dst: a destination block is also the source of a copy")
    chosen = backends.resolve("copy_blocks", k_cache.device, backend)
    src, dst = src.to(torch.int32).contiguous(), dst.to(torch.int32).contiguous()
    dispatch.run(_copy_blocks, "copy_blocks", k_cache, v_cache, src, dst, chosen)
