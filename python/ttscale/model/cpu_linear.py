"""CPU matrix products through oneDNN, on weights reordered once into its blocked layout.

``F.linear`` on the CPU runs MKL's sgemm on the dense ``[out, in]`` weight. For the few rows of
a decode step that reaches well under half of a core's rate (on the AMD EPYC of bench/RESULTS.md,
80 GFLOP/s at 16 rows where oneDNN on the reordered weight reaches 200; 2.4x at every batch size
from 16 to 2048 rows, one thread). torch exposes oneDNN's path as the two ops TorchInductor's
CPU weight prepacking uses: ``mkldnn._reorder_linear_weight`` (once, at load) and
``mkldnn._linear_pointwise`` (every call). They are private ops, so :func:`pack` returns None
whenever they are missing or fail, and the model keeps ``F.linear``.

The reordered copy is an opaque tensor beside the dense weight, which stays the truth (loading,
``state_dict``, the rows a PRM reads): packing doubles the memory of the matrices it covers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

PACKED_DTYPES = (torch.float32, torch.bfloat16)


def packing_available(dtype: torch.dtype) -> bool:
    """Whether this torch build can run :func:`linear` for weights of ``dtype``."""
    mkldnn = getattr(torch.ops, "mkldnn", None)
    if dtype not in PACKED_DTYPES or not torch.backends.mkldnn.is_available():
        return False
    if not (hasattr(mkldnn, "_reorder_linear_weight") and hasattr(mkldnn, "_linear_pointwise")):
        return False
    return dtype != torch.bfloat16 or bool(mkldnn._is_mkldnn_bf16_supported())


def pack(weight: Tensor) -> Tensor | None:
    """oneDNN's reordered copy of a CPU ``[out, in]`` weight, or None where it cannot be used.

    The copy is checked against ``F.linear`` on a few rows once, so a torch whose private op
    changed meaning falls back instead of computing something else.
    """
    if weight.device.type != "cpu" or weight.dim() != 2 or not packing_available(weight.dtype):
        return None
    try:
        with torch.no_grad():
            packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)
            probe = torch.randn(3, weight.shape[1], generator=torch.Generator().manual_seed(0))
            probe = probe.to(weight.dtype)
            got, expected = linear(probe, packed, None).float(), F.linear(probe, weight).float()
    except RuntimeError:
        return None
    tolerance = 1e-4 if weight.dtype == torch.float32 else 3e-2
    if got.shape != expected.shape:
        return None
    return packed if torch.allclose(got, expected, rtol=tolerance, atol=tolerance) else None


def linear(x: Tensor, packed: Tensor, bias: Tensor | None) -> Tensor:
    """``x W^T (+ bias)`` with ``W`` as :func:`pack` returned it; ``x [..., in]``."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
