"""The one dispatch point of every op (eager calls run the backend's kernel directly)."""

from __future__ import annotations

import torch
from torch import Tensor

from ttscale import backends


def contiguous(*tensors: Tensor) -> tuple[Tensor, ...]:
    return tuple(t.contiguous() for t in tensors)


def run(op, name: str, *args):
    """Call the custom op ``op`` (``name``; its last argument is the backend). Under
    ``torch.compile`` the op itself, which traces; in eager mode the backend's kernel directly,
    on the same arguments: the custom op's dispatch costs 30 to 60 us a call on a CPU (a small
    ``write_kv`` kernel: 4 us), several calls per layer of a decode step. Eager calls get none
    of the custom op's own checks (output aliasing, autograd), which no caller needs: the
    model runs them under ``torch.no_grad``."""
    if torch.compiler.is_compiling():
        return op(*args)
    return backends.implementation(name, args[-1])(*args[:-1])
