"""``add_rms_norm``: the residual add and the RMSNorm after it, in one pass."""

from __future__ import annotations

import torch
from torch import Tensor

from ttscale import backends
from ttscale._checks import FLOAT_DTYPES, check_tensor
from ttscale.errors import InvalidArgument
from ttscale.ops import dispatch


@torch.library.custom_op("ttscale::add_rms_norm", mutates_args=())
def _add_rms_norm(
    x: Tensor, residual: Tensor, weight: Tensor, eps: float, backend: str
) -> tuple[Tensor, Tensor]:
    return backends.implementation("add_rms_norm", backend)(x, residual, weight, eps)


@_add_rms_norm.register_fake
def _(x, residual, weight, eps, backend):
    return x.new_empty(x.shape), x.new_empty(x.shape)


def add_rms_norm(
    x: Tensor, residual: Tensor, weight: Tensor, eps: float, *, backend: str | None = None,
    validate: bool = True,
) -> tuple[Tensor, Tensor]:
    """RMSNorm of ``residual + x``, and that sum (the residual stream's next value).

    ``summed = residual + x`` in their dtype; then ``weight * normalised`` where
    ``normalised = summed * rsqrt(mean(summed ** 2) + eps)`` in float32, cast back to the dtype
    before the weight multiplies (the order the Llama-family norms use).

    Parameters
    ----------
    x, residual : Tensor
        ``[T, H]`` float32, float16 or bfloat16, one dtype; each row contiguous.
    weight : Tensor
        ``[H]``, the same dtype.
    eps : float
        Positive, added to the mean square.
    validate : bool
        False skips the checks (a model's layers after the first, on the same shapes).

    Returns
    -------
    normed, summed : Tensor
        ``[T, H]`` each, contiguous, x's dtype.
    """
    if validate:
        check_tensor("x", x, ndim=2, dtype=FLOAT_DTYPES)
        check_tensor("residual", residual, dtype=x.dtype, device=x.device, shape=tuple(x.shape))
        check_tensor("weight", weight, dtype=x.dtype, device=x.device, shape=(x.shape[1],))
        if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps > 0:
            raise InvalidArgument(f"eps: expected a positive number, got {eps!r}", param="eps")
    chosen = backends.resolve("add_rms_norm", x.device, backend)
    x, residual = (t if t.stride(-1) == 1 else t.contiguous() for t in (x, residual))
    return dispatch.run(_add_rms_norm, "add_rms_norm", x, residual, weight.contiguous(),
                        float(eps), chosen)
