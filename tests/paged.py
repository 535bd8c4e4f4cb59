"""Random paged two-level KV layouts for the attention tests, and the backends to test."""

from __future__ import annotations

import importlib.util
import re

import pytest
import torch

from ttscale import backends
from ttscale.backends import native
from ttscale.testing import PagedCase, make_case  # noqa: F401  (re-exported for the tests)

# Every backend but the reference itself, with the device it runs on in this process.
KERNEL_BACKENDS = [("cpu", "cpu"), ("triton", "cuda" if torch.cuda.is_available() else "cpu"), ("cuda", "cuda")]


def missing_feature(backend: str, device: str) -> str | None:
    """Why ``backend`` cannot run on ``device`` here, naming what is missing; None when it can.

    Only a missing optional part is a reason: where the part is there, the kernel module must
    import and run, so a broken kernel fails its tests instead of reading as a skip."""
    if device == "cuda" and not torch.cuda.is_available():
        return "needs a CUDA device"
    if backend == "triton" and importlib.util.find_spec("triton") is None:
        return "needs the triton module (not installed)"
    if backend in ("cpu", "cuda") and not native.built():
        error = native.IMPORT_ERROR
        if not (isinstance(error, ModuleNotFoundError) and error.name == "ttscale._C"):
            raise AssertionError(f"ttscale._C is there but does not import: {error!r}")
        return "needs the ttscale._C module (not built)"
    if backend == "cuda" and not native.built_with_cuda():
        return "needs ttscale._C built with CUDA (TTSCALE_CUDA=ON)"
    return None


def backend_params(op: str):
    """pytest params (backend, device) for ``op``: one per kernel that some build has (no case for
    a kernel that exists nowhere); GPU cases carry the ``gpu`` mark; a case whose optional part is
    missing here is skipped saying which."""
    params = []
    for backend, device in KERNEL_BACKENDS:
        if backend not in backends.MODULES[op]:
            continue
        marks = [pytest.mark.op(op)] + ([pytest.mark.gpu] if device == "cuda" else [])
        why = missing_feature(backend, device)
        if why is not None:
            marks.append(pytest.mark.skip(reason=why))
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


# What a Triton without the ahead-of-time compile API says; any other error of a compile test fails.
TRITON_AOT_MISSING = re.compile(
    r"No module named '(triton\.compiler|triton\.backends\.compiler)'"
    r"|cannot import name '(GPUTarget|ASTSource)' from 'triton[\w.]*'")


def triton_aot_missing(stderr: str) -> str | None:
    """The line saying Triton has no ahead-of-time compile API, if ``stderr`` says so."""
    found = TRITON_AOT_MISSING.search(stderr)
    return None if found is None else found.group(0)


def compile_in_child(argv: list[str]) -> str:
    """Run ``argv`` (a Python script compiling Triton kernels ahead of time) in a child process
    out of interpreter mode; skip where this Triton cannot compile ahead of time, fail on any
    other error; the child's stdout."""
    import os
    import subprocess

    import pytest

    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    if (missing := triton_aot_missing(done.stderr)) is not None:
        pytest.skip(f"this Triton has no ahead-of-time compile API: {missing}")
    if done.returncode and "ptxas" in done.stderr and "not found" in done.stderr:
        pytest.skip("this Triton build has no ptxas")
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout
