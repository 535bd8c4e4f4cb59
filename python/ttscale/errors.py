"""The errors ttscale raises, under one base, so a caller can catch "the input was bad" in one place.

    TTScaleError
    ├── InvalidArgument (also ValueError)   a bad argument; ``param`` names it as the caller wrote it
    │   ├── UnknownRequest (also KeyError)  a request id the engine does not hold
    │   ├── ModelLoadError                  a model directory that cannot be loaded
    │   │   └── ConfigError                 its config.json
    │   ├── TokenizerError                  its tokenizer files
    │   ├── FormatError                     a PRM format that does not fit the model
    │   └── DataError                       a benchmark file
    ├── PoolExhausted (also RuntimeError)   the KV pool cannot hold the work
    └── UsageError                          the command line (exit code 2)

A server maps ``InvalidArgument`` to an HTTP 400 whose ``param`` is the argument's name.
"""

from __future__ import annotations

import re


class TTScaleError(Exception):
    """The base of every error ttscale raises on purpose."""


class InvalidArgument(TTScaleError, ValueError):
    """A bad argument. ``param`` is its name as the caller wrote it (a keyword, ``prompts[3]``,
    or a command-line flag); the message names it too. Subclasses set a default ``param``."""

    param: str | None = None

    def __init__(self, message: str, *, param: str | None = None):
        super().__init__(message)
        if param is None and type(self).param is None:
            param = _leading_name(message)
        if param is not None:
            self.param = re.sub(r"(\[[^\]]*\])+$", "", param)  # prompts[3] -> prompts


def _leading_name(message: str) -> str | None:
    """The argument a message starts by naming (``"top_p: expected ..."`` -> ``"top_p"``;
    ``"prompts[3]: ..."`` -> ``"prompts"``), or None."""
    match = re.match(r"([A-Za-z_][\w.-]*)(\[[^\]]*\])*: ", message)
    return match.group(1) if match else None


class UnknownRequest(InvalidArgument, KeyError):
    """A request id the engine does not hold (never added, finished, or aborted)."""

    param = "request_id"

    def __init__(self, request_id: str):
        super().__init__(f"request_id: no request {request_id!r} in the engine")
        self.request_id = request_id

    def __str__(self) -> str:  # KeyError would print the message's repr
        return str(self.args[0])


class ModelLoadError(InvalidArgument):
    """A model directory is missing something, or holds something ttscale cannot use."""

    param = "model"


class ConfigError(ModelLoadError):
    """config.json is missing, malformed, or describes a model this transformer cannot run."""


class TokenizerError(InvalidArgument):
    """A tokenizer file is missing or malformed."""

    param = "model"


class FormatError(InvalidArgument):
    """A PRM format that does not fit the model or its tokenizer."""

    param = "format"


class DataError(InvalidArgument):
    """A benchmark file that cannot be read as problems."""

    param = "data"


class PoolExhausted(TTScaleError, RuntimeError):
    """Not enough free KV blocks for the work asked."""


class UsageError(TTScaleError):
    """A bad command-line argument found after parsing: exit code 2."""


def invalid(param: str, message: str) -> InvalidArgument:
    """``InvalidArgument`` whose message starts with the argument's name: ``param: message``."""
    return InvalidArgument(f"{param}: {message}", param=param)
