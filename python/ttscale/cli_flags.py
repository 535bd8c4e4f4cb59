"""The flag types and checks every ``ttscale`` subcommand shares: each turns a flag's text into
its value or raises argparse's error, so that a bad flag is one line naming it (exit 2)."""

from __future__ import annotations

import argparse
import importlib
import os
import re
import tempfile
from pathlib import Path
from typing import Any

PRM_FORMATS = ("math-shepherd", "rlhflow", "qwen2.5-math-prm", "skywork")
DTYPES = ("float32", "bfloat16", "float16")


class Parser(argparse.ArgumentParser):
    """argparse, whose errors are one line on stderr (exit 2), without the usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def resolve(target: Any) -> Any:
    """The object a ``"module:name"`` string names; anything else is returned as it is."""
    if not isinstance(target, str):
        return target
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def seed_value(text: str) -> int:
    """A seed: an integer in [0, 2**64), as every ttscale seed."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer seed, got {text!r}") from None
    if not 0 <= value < 2**64:
        raise argparse.ArgumentTypeError(f"expected a seed in [0, 2**64), got {value}")
    return value


def nonempty_text(text: str) -> str:
    """A non-empty string (an empty one would silently mean 'none')."""
    if not text:
        raise argparse.ArgumentTypeError("expected a non-empty string")
    return text


def float_in(low: float, high: float, low_open: bool, high_open: bool):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        above = value > low if low_open else value >= low
        below = value < high if high_open else value <= high
        if not (above and below):
            interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
            raise argparse.ArgumentTypeError(f"expected a value in {interval}, got {text}")
        return value

    return parse


def escaped(text: str) -> str:
    """Backslash escapes decoded (``'\\n\\n'`` typed in a shell is two newlines)."""
    try:
        value = text.encode("latin-1", "backslashreplace").decode("unicode_escape")
    except UnicodeDecodeError as error:
        raise argparse.ArgumentTypeError(f"bad escape in {text!r} ({error.reason})") from None
    if not value:
        raise argparse.ArgumentTypeError("expected a non-empty string")
    return value


def device_name(text: str) -> str:
    if not re.fullmatch(r"cpu|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")
    return text


def writable(path: Path) -> bool:
    """Whether ``path`` (a file, existing or not) can be written: tried, not guessed from modes."""
    if path.exists():
        return os.access(path, os.W_OK) and path.is_file()
    try:
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".ttscale-check-"):
            return True
    except OSError:
        return False


def check_device_available(device: str | None, parser: argparse.ArgumentParser) -> None:
    if device is not None and device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            parser.error(f"argument --device: {device} is not available on this machine")


def budgets(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port in [0, 65535], got {port}")
    return port


def names(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())
