"""Argument checks at the public boundary: every failure is a ValueError naming the argument."""

from __future__ import annotations

import math
import numbers
import os

import torch

from ttscale.errors import InvalidArgument

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)

# Value checks read device memory. On CUDA tensors that synchronises with the host and breaks
# CUDA-graph capture, so there they run only when asked for (read once, at import).
DEBUG = os.environ.get("TTSCALE_DEBUG", "0") not in ("", "0")


def check_values(*tensors: torch.Tensor) -> bool:
    """Whether value checks (which read tensor contents) should run for these tensors."""
    return DEBUG or all(t.device.type == "cpu" for t in tensors)


def check_tensor(
    name: str,
    t: object,
    *,
    ndim: int | None = None,
    dtype: torch.dtype | tuple[torch.dtype, ...] | None = None,
    device: torch.device | None = None,
    shape: tuple[int | None, ...] | None = None,
) -> torch.Tensor:
    """Check one tensor argument; ``None`` in ``shape`` means any size for that dimension."""
    if not isinstance(t, torch.Tensor):
        raise InvalidArgument(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise InvalidArgument(f"{name}: expected {ndim} dimensions, got shape {tuple(t.shape)}")
    if dtype is not None:
        allowed = dtype if isinstance(dtype, tuple) else (dtype,)
        if t.dtype not in allowed:
            names = " or ".join(str(d).removeprefix("torch.") for d in allowed)
            raise InvalidArgument(f"{name}: expected dtype {names}, got {str(t.dtype).removeprefix('torch.')}")
    if device is not None and t.device != device:
        raise InvalidArgument(f"{name}: expected device {device}, got {t.device}")
    if shape is not None:
        if t.dim() != len(shape) or any(s is not None and s != n for s, n in zip(shape, t.shape)):
            want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
            raise InvalidArgument(f"{name}: expected shape {want}, got {list(t.shape)}")
    return t


def check_range(name: str, t: torch.Tensor, low: int, high: int) -> None:
    """Every element of ``t`` in ``[low, high)``."""
    if t.numel() == 0:
        return
    lo, hi = int(t.min()), int(t.max())
    if lo < low or hi >= high:
        bad = lo if lo < low else hi
        raise InvalidArgument(f"{name}: value {bad} outside [{low}, {high})")


def check_block_table(
    name: str, block_table: torch.Tensor, lens: torch.Tensor, block_size: int, num_blocks: int
) -> None:
    """The entries a table uses for its lengths exist in the pool, and lengths fit the table."""
    capacity = block_table.shape[1] * block_size
    if lens.numel() and int(lens.max()) > capacity:
        row = int(lens.argmax())
        raise InvalidArgument(
            f"{name}: row {row} needs {int(lens[row])} tokens but the table holds "
            f"{block_table.shape[1]} blocks of {block_size} ({capacity} tokens)"
        )
    used_blocks = (lens.long() + block_size - 1) // block_size
    used = torch.arange(block_table.shape[1], device=lens.device)[None, :] < used_blocks[:, None]
    check_range(name, block_table[used], 0, num_blocks)


# Scalar arguments of the public API. Types are checked, not coerced: a count is any integer
# (numpy's included) but not a bool, a number any real but not a bool or NaN, a flag only a
# bool, a text only a string. What passes is returned as the plain Python value.


def check_int(name: str, value, *, low: int | None = None, high: int | None = None,
              note: str = "") -> int:
    """``value`` as an int: a ``numbers.Integral`` but not a bool, in ``[low, high]``."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise InvalidArgument(f"{name}: expected an integer{note}, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"<= {high}" if low is None else f"in [{low}, {high}]"
        raise InvalidArgument(f"{name}: expected an integer {bounds}{note}, got {value!r}")
    return int(value)


def check_real(name: str, value, *, low: float | None = None, high: float | None = None,
               low_open: bool = False, high_open: bool = False) -> float:
    """``value`` as a float: a ``numbers.Real`` but not a bool or NaN, within the bounds given."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or math.isnan(value):
        raise InvalidArgument(f"{name}: expected a number, got {value!r}")
    above = low is None or (value > low if low_open else value >= low)
    below = high is None or (value < high if high_open else value <= high)
    if not (above and below):
        interval = (f"{'(' if low_open else '['}{'-inf' if low is None else low}, "
                    f"{'inf' if high is None else high}{')' if high_open else ']'}")
        raise InvalidArgument(f"{name}: expected a number in {interval}, got {value!r}")
    return float(value)


def check_flag(name: str, value) -> bool:
    """A bool; not a string (``"no"`` is truthy), not a number."""
    if not isinstance(value, bool):
        raise InvalidArgument(f"{name}: expected True or False, got {value!r}")
    return value


def check_text(name: str, value, *, empty: bool = False) -> str:
    """A string, non-empty unless ``empty``."""
    if not isinstance(value, str):
        raise InvalidArgument(f"{name}: expected a string, got {type(value).__name__}")
    if not value and not empty:
        raise InvalidArgument(f"{name}: expected a non-empty string")
    return value


def check_function(name: str, value) -> None:
    """A callable, or None."""
    if value is not None and not callable(value):
        raise InvalidArgument(f"{name}: expected a function, got {type(value).__name__}")


def check_path(name: str, value) -> str | os.PathLike:
    """A file-system path: a non-empty string or an ``os.PathLike``."""
    if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
        raise InvalidArgument(f"{name}: expected a path, got {value!r}")
    return value
