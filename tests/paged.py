"""Random paged two-level KV layouts for the attention tests, and the backends to test."""

from __future__ import annotations

import pytest
import torch

from ttscale import backends
from ttscale.testing import PagedCase, make_case  # noqa: F401  (re-exported for the tests)

# Every backend but the reference itself, with the device it runs on in this process.
KERNEL_BACKENDS = [("cpu", "cpu"), ("triton", "cuda" if torch.cuda.is_available() else "cpu"), ("cuda", "cuda")]


def backend_params(op: str):
    """pytest params (backend, device) for ``op``; unavailable ones are skipped with the reason."""
    params = []
    for backend, device in KERNEL_BACKENDS:
        marks = [pytest.mark.gpu] if device == "cuda" else []
        ok = (device != "cuda" or torch.cuda.is_available()) and backend in backends.available(op, device)
        if not ok:
            marks.append(pytest.mark.skip(reason=f"{backend} has no {op} kernel on {device} in this build"))
        params.append(pytest.param(backend, device, marks=marks, id=backend))
    return params


TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str):
    """Relative tolerance by dtype, scaled to the magnitude of the expected values."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert not torch.isnan(actual).any(), f"{what}: NaN in the output (an element left unwritten?)"
    tol = TOLERANCE[dtype]
    a, e = actual.float().cpu(), expected.float().cpu()
    same_inf = torch.isinf(e) & (a == e)
    diff = torch.where(same_inf, 0.0, (a - e).abs())
    bound = tol * (1 + e.abs().where(~torch.isinf(e), 0.0))
    worst = (diff - bound).max() if diff.numel() else torch.tensor(-1.0)
    assert worst <= 0, f"{what}: max error {diff.max():.3g} over tolerance {tol} (dtype {dtype})"
