"""ttscale: LLM test-time compute scaling at the hardware's limit.

The prompt is prefilled once and read once per decode step for all samples, a beam fork copies a
block table instead of a cache, and the process reward model scores only new tokens.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("ttscale")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
