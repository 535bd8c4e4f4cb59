"""ttscale: LLM test-time compute scaling at the hardware's limit.

The prompt is prefilled once and read once per decode step for all samples, a beam fork copies a
block table instead of a cache, and the process reward model scores only new tokens.
"""

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("ttscale")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

# Public names, imported on first use: `import ttscale` stays quick (no torch) until one is used.
_EXPORTS = {
    "LLM": "ttscale.llm",
    "SamplingParams": "ttscale.sampling_params",
    "PRM": "ttscale.verifiers.prm",
    "ORM": "ttscale.verifiers.orm",
    "RuleVerifier": "ttscale.verifiers.rule",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'ttscale' has no attribute {name!r}")
    value = getattr(import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted({*globals(), *_EXPORTS})
