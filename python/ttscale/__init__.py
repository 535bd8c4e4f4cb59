"""ttscale: LLM test-time compute scaling at the hardware's limit.

The prompt is prefilled once and read once per decode step for all samples, a beam fork copies a
block table instead of a cache, and the process reward model scores only new tokens.

    import ttscale
    llm = ttscale.LLM("path/to/policy")
    prm = ttscale.PRM("path/to/prm", format="qwen2.5-math-prm")
    results = ttscale.best_of_n(llm, problems, n=16, verifier=prm,
                                sampling=ttscale.SamplingParams(temperature=0.8, max_tokens=2048))

The public names are imported on first use, so ``import ttscale`` stays cheap.
"""

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("ttscale")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

# public name -> the module that defines it
_EXPORTS = {
    "LLM": "ttscale.llm",
    "SamplingParams": "ttscale.sampling_params",
    "SearchResult": "ttscale.search.result",
    "RuleVerifier": "ttscale.verifiers.rule",
    "ORM": "ttscale.verifiers.orm",
    "PRM": "ttscale.verifiers.prm",
    "best_of_n": "ttscale.search.best_of_n",
    "beam_search": "ttscale.search.beam_search",
    "dvts": "ttscale.search.dvts",
    "lookahead": "ttscale.search.lookahead",
    "rejection_best_of_n": "ttscale.search.rejection",
    "compute_optimal": "ttscale.search.compute_optimal",
    "revisions": "ttscale.search.revisions",
    "AsyncLLM": "ttscale.serve.async_llm",
    "RequestOutput": "ttscale.llm",
    "CompletionOutput": "ttscale.llm",
    "EngineStats": "ttscale.engine.scheduler",
    "TTScaleError": "ttscale.errors",
    "InvalidArgument": "ttscale.errors",
    "UnknownRequest": "ttscale.errors",
    "PoolExhausted": "ttscale.errors",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'ttscale' has no attribute {name!r}")
    value = getattr(import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
