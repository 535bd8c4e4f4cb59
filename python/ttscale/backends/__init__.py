"""Which kernel runs an op: the backend registry.

Every op has the same internal signature in each backend module (arguments already validated
by :mod:`ttscale.ops`). A backend is available for an op when its module imports, defines the
op, and can run on the tensors' device:

- ``torch``: the plain-torch reference (:mod:`ttscale.reference`), any device;
- ``cpu``: the C++ kernels of ``ttscale._C``, CPU tensors;
- ``triton``: the Triton kernels of :mod:`ttscale.kernels`, CUDA tensors, or CPU tensors under
  ``TRITON_INTERPRET=1`` (how the tests run them without a GPU);
- ``cuda``: the CUDA kernels of ``ttscale._C``, CUDA tensors.

``TTSCALE_BACKEND`` (read once, at import) forces one backend for every op.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable

import torch

from ttscale.errors import InvalidArgument

BACKENDS = ("torch", "cpu", "triton", "cuda")

# op -> backend -> module defining a function named after the op.
MODULES: dict[str, dict[str, str]] = {
    "cascade_decode_attention": {
        "torch": "ttscale.backends.torch_ref",
        "cpu": "ttscale.backends.cpu_attention",
        "triton": "ttscale.kernels.attention",
        "cuda": "ttscale.backends.cuda_attention",
    },
    "paged_prefill_attention": {
        "torch": "ttscale.backends.torch_ref",
        "cpu": "ttscale.backends.cpu_attention",
        "triton": "ttscale.kernels.attention",
    },
    "merge_attention_states": {
        "torch": "ttscale.backends.torch_ref",
        "cpu": "ttscale.backends.cpu_attention",
        "triton": "ttscale.kernels.attention",
    },
    "write_kv": {
        "torch": "ttscale.backends.torch_ref",
        "cpu": "ttscale.backends.cpu_attention",
        "triton": "ttscale.kernels.attention",
    },
    # No CUDA kernels for these two: see ttscale/kernels/select.py for why Triton serves the GPU.
    "select_and_fork": {
        "torch": "ttscale.backends.torch_ref",
        "cpu": "ttscale.backends.cpu_select",
        "triton": "ttscale.kernels.select",
    },
    "copy_blocks": {
        "torch": "ttscale.backends.torch_ref",
        "cpu": "ttscale.backends.cpu_select",
        "triton": "ttscale.kernels.select",
    },
}

MODULES["prm_step_scores"] = {
    "torch": "ttscale.backends.torch_ref",
    "cpu": "ttscale.backends.cpu_prm",
    "triton": "ttscale.kernels.prm",
}

MODULES["sample"] = {
    "torch": "ttscale.backends.torch_ref",
    "cpu": "ttscale.backends.cpu_sampling",
    "triton": "ttscale.kernels.sampling",
}

# The decode step's elementwise work, fused: Triton serves the GPU; on the CPU the model keeps
# its unfused torch code, whose results the torch backend (the reference) reproduces.
FUSED_ELEMENTWISE = {"torch": "ttscale.backends.torch_ref", "triton": "ttscale.kernels.elementwise"}
MODULES["add_rms_norm"] = FUSED_ELEMENTWISE
MODULES["rope_write_kv"] = FUSED_ELEMENTWISE
MODULES["silu_mul"] = FUSED_ELEMENTWISE

# Automatic choice by device, best first.
PREFERENCE = {"cpu": ("cpu", "torch"), "cuda": ("cuda", "triton", "torch")}

FORCED = os.environ.get("TTSCALE_BACKEND") or None
if FORCED is not None and FORCED not in BACKENDS:
    raise InvalidArgument(f"TTSCALE_BACKEND: expected one of {', '.join(BACKENDS)}, got {FORCED!r}")


def _triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _runs_on(backend: str, device: torch.device) -> bool:
    from ttscale.backends import native

    if backend == "torch":
        return True
    if backend == "cpu":
        return device.type == "cpu" and native.built()
    if backend == "cuda":
        return device.type == "cuda" and native.built_with_cuda()
    if backend == "triton":
        return device.type == "cuda" or (device.type == "cpu" and _triton_interpreted())
    return False


def _load(op: str, backend: str) -> Callable | None:
    name = MODULES.get(op, {}).get(backend)
    if name is None:
        return None
    try:
        module = importlib.import_module(name)
    except ImportError:
        return None
    return getattr(module, op, None)


def available(op: str, device: torch.device | str) -> list[str]:
    """The backends that can run ``op`` on ``device``, in the automatic order."""
    device = torch.device(device)
    order = PREFERENCE.get(device.type, ("torch",))
    order = order + tuple(b for b in BACKENDS if b not in order)
    return [b for b in order if _runs_on(b, device) and _load(op, b) is not None]


def resolve(op: str, device: torch.device, requested: str | None = None) -> str:
    """The backend to run ``op`` with: ``requested``, else ``TTSCALE_BACKEND``, else the best available."""
    want = requested or FORCED
    if want is not None:
        if want not in BACKENDS:
            raise InvalidArgument(f"backend: expected one of {', '.join(BACKENDS)}, got {want!r}")
        if not _runs_on(want, device):
            raise InvalidArgument(f"backend: {want!r} cannot run on {device.type} tensors in this build")
        if _load(op, want) is None:
            raise InvalidArgument(f"backend: {want!r} has no kernel for {op}")
        return want
    choices = available(op, device)
    if not choices:
        raise ValueError(f"no backend can run {op} on {device}")
    return choices[0]


def implementation(op: str, backend: str) -> Callable:
    fn = _load(op, backend)
    if fn is None:
        raise InvalidArgument(f"backend: {backend!r} has no kernel for {op}")
    return fn


# Tests set TTSCALE_POISON=1 so that every output a kernel allocates starts as NaN (or the most
# negative integer): an element the kernel forgets to write then fails the comparison.
POISON = os.environ.get("TTSCALE_POISON", "0") not in ("", "0")


def new_output(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Allocate a kernel output (uninitialised, or poisoned under ``TTSCALE_POISON=1``)."""
    if not POISON:
        return torch.empty(shape, dtype=dtype, device=device)
    if dtype.is_floating_point:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.full(shape, torch.iinfo(dtype).min, dtype=dtype, device=device)
