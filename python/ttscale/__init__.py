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
from importlib.util import find_spec

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
    "compute_optimal": "ttscale.search.compute_optimal",
    "AsyncLLM": "ttscale.serve.async_llm",
    "RequestOutput": "ttscale.llm",
    "CompletionOutput": "ttscale.llm",
    "BeamSearchParams": "ttscale.token_beam",
    "BeamSearchOutput": "ttscale.token_beam",
    "EngineStats": "ttscale.engine.work",
    "TTScaleError": "ttscale.errors",
    "InvalidArgument": "ttscale.errors",
    "UnknownRequest": "ttscale.errors",
    "PoolExhausted": "ttscale.errors",
}

# ... and every search strategy by its name (``ttscale.best_of_n``, ``ttscale.beam_search``, ...),
# as ttscale.search.registry declares them.


def _strategies() -> dict:
    return import_module("ttscale.search.registry").strategies()


def _is_strategy(name: str) -> bool:
    # a submodule's name is left to the import system (``from ttscale import ops``)
    return (not name.startswith("_") and find_spec(f"{__name__}.{name}") is None
            and name in _strategies())


def __getattr__(name: str):
    if name == "__all__":  # ``from ttscale import *``
        return ["__version__", *_EXPORTS, *_strategies()]
    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name]), name)
    elif _is_strategy(name):
        value = _strategies()[name].function
    else:
        raise AttributeError(f"module 'ttscale' has no attribute {name!r}")
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(["__version__", *_EXPORTS, *_strategies()])
