"""``silu_mul``: SwiGLU's ``silu(gate) * up`` from the fused gate-up projection, in one pass."""

from __future__ import annotations

import torch
from torch import Tensor

from ttscale import backends
from ttscale._checks import FLOAT_DTYPES, check_tensor
from ttscale.errors import InvalidArgument
from ttscale.ops import dispatch


@torch.library.custom_op("ttscale::silu_mul", mutates_args=())
def _silu_mul(gate_up: Tensor, backend: str) -> Tensor:
    return backends.implementation("silu_mul", backend)(gate_up)


@_silu_mul.register_fake
def _(gate_up, backend):
    return gate_up.new_empty((gate_up.shape[0], gate_up.shape[1] // 2))


def silu_mul(gate_up: Tensor, *, backend: str | None = None) -> Tensor:
    """``silu(gate) * up`` where ``gate_up = [gate | up]``, in float32, rounded once.

    Parameters
    ----------
    gate_up : Tensor
        ``[T, 2I]`` float32, float16 or bfloat16 (the gate-up projection's output); each row
        contiguous.

    Returns
    -------
    Tensor
        ``[T, I]``, contiguous, gate_up's dtype.
    """
    check_tensor("gate_up", gate_up, ndim=2, dtype=FLOAT_DTYPES)
    if gate_up.shape[1] % 2:
        raise InvalidArgument(
            f"gate_up: expected an even width [gate | up], got {gate_up.shape[1]}", param="gate_up")
    chosen = backends.resolve("silu_mul", gate_up.device, backend)
    if gate_up.stride(-1) != 1:
        gate_up = gate_up.contiguous()
    return dispatch.run(_silu_mul, "silu_mul", gate_up, chosen)
