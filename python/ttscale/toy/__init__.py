"""The embedded default: a synthetic arithmetic task, its tiny policy and PRM, and their training.

The two models ship inside the package as Hugging Face ``LlamaForCausalLM`` directories (fp32,
a character-level ``tokenizer.json``), so they load through :func:`ttscale.model.load_model` and
:class:`ttscale.llm.LLM` like any local model. ``python -m ttscale.toy.train`` reproduces them.
"""

from __future__ import annotations

from pathlib import Path

_HERE = Path(__file__).parent


def policy_dir() -> Path:
    """The shipped policy: writes solutions to :mod:`ttscale.toy.task` problems."""
    return _HERE / "policy"


def prm_dir() -> Path:
    """The shipped Math-Shepherd PRM: P(+) at each ``ки`` tag of a solution's steps."""
    return _HERE / "prm"


__all__ = ["policy_dir", "prm_dir"]
