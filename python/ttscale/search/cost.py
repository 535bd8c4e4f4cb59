"""How a batch's cost is split among the problems searched together.

Strategies search many problems in one batch, so some of the work is not one problem's alone.
Each problem's :class:`~ttscale.search.result.Cost` is charged as follows:

- ``prefilled_tokens``: its own prompt (stored once, whatever N is) and any tokens its
  sequences prefill; exact.
- ``generated_tokens``: the tokens its own sequences sampled, lookahead rollouts included;
  exact. Over a run, the problems' counts add up to the engine's ``generated_tokens``.
- ``scored_tokens``: a verifier reports only a total, so each batched verifier call's tokens
  are split among the paths in it in proportion to the length of the text each path added (the
  problem's text for :meth:`~ttscale.verifiers.base.Verifier.start`, the step for
  :meth:`~ttscale.verifiers.base.Verifier.score`; equally for forks and frees), rounded to
  whole tokens so that the shares add up to the total.
- ``seconds``: the wall time of the batch, split in proportion to each problem's generated plus
  scored tokens (equally when there are none). The shares add up to the batch's wall time.
"""

from __future__ import annotations

from collections.abc import Sequence


def split_tokens(total: int, weights: Sequence[float]) -> list[int]:
    """``total`` as whole shares in proportion to ``weights`` (largest remainders get the rest,
    earlier entries first on ties); the shares sum to ``total``."""
    if not weights:
        return []
    weights = [max(float(w), 0.0) for w in weights]
    whole = sum(weights)
    if whole == 0:
        weights, whole = [1.0] * len(weights), float(len(weights))
    exact = [total * w / whole for w in weights]
    shares = [int(x) for x in exact]
    order = sorted(range(len(exact)), key=lambda i: (-(exact[i] - shares[i]), i))
    for i in order[: total - sum(shares)]:
        shares[i] += 1
    return shares


def split_seconds(seconds: float, weights: Sequence[float]) -> list[float]:
    """``seconds`` in proportion to ``weights`` (equally when they are all zero)."""
    whole = float(sum(weights))
    if whole <= 0:
        return [seconds / len(weights)] * len(weights) if weights else []
    return [seconds * w / whole for w in weights]
