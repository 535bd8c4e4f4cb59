"""The one interface strategies use to score solutions, step by step.

A verifier scores *paths*: a problem plus the steps written so far. Strategies start one root
path per problem, fork paths when they fork policy sequences, append one step at a time, and
free what they drop. A PRM keeps each path's tokens in its own paged KV cache, so appending a
step costs only that step's tokens; a fork copies a block table.

Scores are probabilities in [0, 1] (higher is better) or None where the verifier says nothing
about a step (an outcome model before the final step). Aggregating a path's step scores
(last / min / prod / mean) is the strategy's business (:mod:`ttscale.search.select`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

from ttscale.errors import InvalidArgument


class Verifier(ABC):
    """Scores solution steps for strategies; see the module docstring."""

    #: Tokens the verifier has run through its model (cost accounting).
    scored_tokens: int = 0

    @abstractmethod
    def start(self, problems: Sequence[str], references: Sequence[str | None] | None = None) -> list[object]:
        """One root path (no steps yet) per problem. ``references`` are known answers, if any."""

    @abstractmethod
    def fork(self, paths: Sequence[object], parents: Sequence[int]) -> list[object]:
        """New paths; child ``i`` continues ``paths[parents[i]]`` (which stay valid)."""

    @abstractmethod
    def score(self, paths: Sequence[object], steps: Sequence[str], final: Sequence[bool]) -> list[float | None]:
        """Append ``steps[i]`` to ``paths[i]`` and return its score; ``final[i]`` marks a path's last step."""

    @abstractmethod
    def free(self, paths: Sequence[object]) -> None:
        """Release paths the strategy dropped."""

    def score_solution(self, problem: str, steps: Sequence[str], reference: str | None = None) -> list[float | None]:
        """Score every step of one whole solution (non-incremental use, and tests)."""
        (path,) = self.start([problem], [reference])
        scores = [self.score([path], [step], [i == len(steps) - 1])[0] for i, step in enumerate(steps)]
        self.free([path])
        return scores


def split_steps(text: str, delimiter: str = "\n\n") -> list[str]:
    """A solution's steps: the text between delimiters, stripped of surrounding whitespace and
    the delimiters themselves; a trailing delimiter (or blank text between two) makes no step."""
    if not delimiter:
        raise InvalidArgument("delimiter: expected a non-empty string")
    return [part.strip() for part in text.split(delimiter) if part.strip()]
