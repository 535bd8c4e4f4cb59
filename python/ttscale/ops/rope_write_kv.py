"""``rope_write_kv``: rotary embedding of q and k, and the K/V write into the paged pool."""

from __future__ import annotations

import torch
from torch import Tensor

from ttscale import backends
from ttscale._checks import check_tensor
from ttscale.errors import InvalidArgument
from ttscale.ops import dispatch
from ttscale.ops.write_kv import check_write_kv


@torch.library.custom_op("ttscale::rope_write_kv", mutates_args=("k_cache", "v_cache"))
def _rope_write_kv(
    q: Tensor, k: Tensor, v: Tensor, cos_sin: Tensor, k_cache: Tensor, v_cache: Tensor,
    slots: Tensor, backend: str,
) -> Tensor:
    fn = backends.implementation("rope_write_kv", backend)
    return fn(q, k, v, cos_sin, k_cache, v_cache, slots)


@_rope_write_kv.register_fake
def _(q, k, v, cos_sin, k_cache, v_cache, slots, backend):
    return q.new_empty(q.shape)


def _heads_contiguous(t: Tensor) -> Tensor:
    """Token rows may be strided (q, k and v are views of one projection); heads may not."""
    if t.stride(2) == 1 and t.stride(1) == t.shape[2]:
        return t
    return t.contiguous()


def rope_write_kv(
    q: Tensor, k: Tensor, v: Tensor, cos_sin: Tensor, k_cache: Tensor, v_cache: Tensor,
    slots: Tensor, *, backend: str | None = None, validate: bool = True,
) -> Tensor:
    """Rotate q and k by their positions' angles, write the rotated k and v into the pool.

    The rotation pairs dimension ``i`` with ``i + D/2`` and runs in float32:
    ``(x1 cos - x2 sin, x2 cos + x1 sin)``, rounded to the dtype (:func:`ttscale.reference.rotate`).
    The pool is written as :func:`ttscale.ops.write_kv` writes it.

    Parameters
    ----------
    q : Tensor
        ``[T, Hq, D]`` float32, float16 or bfloat16, D even.
    k, v : Tensor
        ``[T, Hkv, D]``, the caches' dtype.
    cos_sin : Tensor
        ``[T, D]`` float32: each token's ``cos`` of its D/2 angles, then ``sin``.
    k_cache, v_cache : Tensor
        ``[num_blocks, block_size, Hkv, D]``, contiguous; written in place.
    slots : Tensor
        ``[T]`` integer flat slots; -1 skips the token's K/V (a padded row).
    validate : bool
        False skips the checks (a model's layers after the first, on the same shapes).

    Returns
    -------
    Tensor
        The rotated q ``[T, Hq, D]``, contiguous.
    """
    if validate:
        check_write_kv(k_cache, v_cache, k, v, slots)
        check_tensor("q", q, ndim=3, dtype=k_cache.dtype, device=k_cache.device,
                     shape=(k.shape[0], None, k_cache.shape[3]))
        head_dim = q.shape[2]
        if head_dim % 2:
            raise InvalidArgument(f"q: expected an even head_dim, got {head_dim}", param="q")
        check_tensor("cos_sin", cos_sin, dtype=torch.float32, device=q.device,
                     shape=(q.shape[0], head_dim))
    chosen = backends.resolve("rope_write_kv", k_cache.device, backend)
    q, k, v = (_heads_contiguous(t) for t in (q, k, v))
    return dispatch.run(_rope_write_kv, "rope_write_kv", q, k, v, cos_sin.contiguous(),
                        k_cache, v_cache, slots.to(torch.int64).contiguous(), chosen)

