"""Verifiers: process and outcome reward models, and the rule verifier (see :mod:`.base`).

Names load on first use, so the rule verifier does not import the model stack.
"""

from importlib import import_module

_EXPORTS = {
    "Verifier": "ttscale.verifiers.base",
    "split_steps": "ttscale.verifiers.base",
    "FORMATS": "ttscale.verifiers.formats",
    "FormatError": "ttscale.verifiers.formats",
    "PRM": "ttscale.verifiers.prm",
    "PRMPath": "ttscale.verifiers.prm",
    "ORM": "ttscale.verifiers.orm",
    "RuleVerifier": "ttscale.verifiers.rule",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'ttscale.verifiers' has no attribute {name!r}")
    value = getattr(import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted({*globals(), *_EXPORTS})
