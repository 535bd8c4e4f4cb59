"""How each PRM format lays out a problem and its steps (the text its model was trained on)."""

from __future__ import annotations

from collections.abc import Sequence

MATH_SHEPHERD_TAG = "ки"


def math_shepherd_text(question: str, steps: Sequence[str]) -> str:
    """Math-Shepherd: ``question`` then each step followed by `` ки`` and a newline; the PRM reads
    the ``+``/``-`` logits at each tag."""
    return f"{question} " + "".join(f"{step} {MATH_SHEPHERD_TAG}\n" for step in steps)
