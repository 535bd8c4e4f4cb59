"""``merge_attention_states``: two partial attentions combined by their log-sum-exp."""

from __future__ import annotations

import torch
from torch import Tensor

from ttscale import backends
from ttscale._checks import (
    FLOAT_DTYPES,
    check_tensor,
)
from ttscale.ops import dispatch


@torch.library.custom_op("ttscale::merge_attention_states", mutates_args=())
def _merge_attention_states(
    o_a: Tensor, lse_a: Tensor, o_b: Tensor, lse_b: Tensor, backend: str
) -> tuple[Tensor, Tensor]:
    return backends.implementation("merge_attention_states", backend)(o_a, lse_a, o_b, lse_b)


@_merge_attention_states.register_fake
def _(o_a, lse_a, o_b, lse_b, backend):
    return torch.empty_like(o_a), torch.empty_like(lse_a)


def merge_attention_states(
    o_a: Tensor, lse_a: Tensor, o_b: Tensor, lse_b: Tensor, *, backend: str | None = None
) -> tuple[Tensor, Tensor]:
    """Combine attention over two disjoint key sets from their outputs and log-sum-exps.

    Numerically stable; a side with ``lse = -inf`` (an empty level) yields the other exactly.

    Parameters
    ----------
    o_a, o_b : Tensor
        ``[N, H, D]``, same dtype.
    lse_a, lse_b : Tensor
        ``[N, H]`` float32, natural log.

    Returns
    -------
    out : Tensor
        ``[N, H, D]`` in o_a's dtype.
    lse : Tensor
        ``[N, H]`` float32.
    """
    check_tensor("o_a", o_a, ndim=3, dtype=FLOAT_DTYPES)
    shape = tuple(o_a.shape)
    check_tensor("o_b", o_b, dtype=o_a.dtype, device=o_a.device, shape=shape)
    check_tensor("lse_a", lse_a, dtype=torch.float32, device=o_a.device, shape=shape[:2])
    check_tensor("lse_b", lse_b, dtype=torch.float32, device=o_a.device, shape=shape[:2])
    chosen = backends.resolve("merge_attention_states", o_a.device, backend)
    return dispatch.run(_merge_attention_states, "merge_attention_states",
                *dispatch.contiguous(o_a, lse_a, o_b, lse_b), chosen)
