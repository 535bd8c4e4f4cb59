"""The one interface strategies use to score solutions, step by step.

A verifier scores *paths*: a problem plus the steps written so far. Strategies start one root
path per problem, fork paths when they fork policy sequences, append one step at a time, and
free what they drop. A PRM keeps each path's tokens in its own paged KV cache, so appending a
step costs only that step's tokens; a fork copies a block table.

Scores are probabilities in [0, 1] (higher is better) or None where the verifier says nothing
about a step (an outcome model before the final step). Which aggregation (last / min / prod /
mean) ranks paths is the strategy's choice (:mod:`ttscale.search.select`), but the running
aggregate is kept where the scores are made: :meth:`Verifier.score_aggregate` takes each path's
state row (aggregate, step count; float32, as :func:`ttscale.ops.prm_step_scores` keeps it) and
returns it with the new step folded in. A PRM folds on its device, inside the op that scores the
steps; a verifier whose scores are host numbers folds them with :func:`fold_scores`. A step
scored None leaves its path's state as it was.
"""

from __future__ import annotations

import numbers
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ttscale.errors import InvalidArgument
from ttscale.reference import PRM_EMPTY_AGGREGATE, prm_empty_state, prm_fold


@dataclass
class ScoredSteps:
    """What :meth:`Verifier.score_aggregate` returns for ``P`` paths.

    Attributes
    ----------
    scores : list of float or None
        Each path's new step score, as :meth:`Verifier.score` returns it.
    state : Tensor
        ``[P, 2]`` float32 (aggregate, step count), the paths' states with the new scores folded
        in, on the device where the verifier made them.
    aggregates : list of float or None
        ``state[:, 0]`` read to the host in the same read as the scores, for the paths whose
        step was scored; None where it was not (that path's aggregate did not change).
    """

    scores: list[float | None]
    state: torch.Tensor
    aggregates: list[float | None]


class Verifier(ABC):
    """Scores solution steps for strategies; see the module docstring."""

    #: Tokens the verifier has run through its model (cost accounting).
    scored_tokens: int = 0
    #: Where its paths' aggregate states live (a PRM: its model's device).
    device = torch.device("cpu")

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

    def score_aggregate(self, paths: Sequence[object], steps: Sequence[str], final: Sequence[bool],
                        state: torch.Tensor, agg: str) -> ScoredSteps:
        """:meth:`score`, and the paths' running aggregates ``state`` ``[P, 2]`` (on
        :attr:`device`) with each new score folded in under ``agg``. This default folds the
        scores :meth:`score` returns with :func:`fold_scores`; a verifier that makes its scores
        on a device folds them there."""
        scores = self.score(paths, steps, final)
        state = fold_scores(state, scores, agg)
        rows = state[:, 0].tolist()
        return ScoredSteps(scores, state, [None if score is None else aggregate
                                           for score, aggregate in zip(scores, rows, strict=True)])

    def score_solution(self, problem: str, steps: Sequence[str], reference: str | None = None) -> list[float | None]:
        """Score every step of one whole solution (non-incremental use, and tests)."""
        if not isinstance(problem, str):
            raise InvalidArgument(f"problem: expected a string, got {type(problem).__name__}")
        if isinstance(steps, str):
            raise InvalidArgument("steps: expected a list of strings (the steps), got one string")
        return self.score_solutions([problem], [steps], None if reference is None else [reference])[0]

    def score_solutions(self, problems: Sequence[str], steps: Sequence[Sequence[str]],
                        references: Sequence[str | None] | None = None) -> list[list[float | None]]:
        """Score every step of several whole solutions, the ``k``-th steps of all of them
        together: ``steps[i]`` is the list of solution ``i``'s steps."""
        return self._score_whole(problems, steps, references, None)[0]

    def aggregate_solutions(self, problems: Sequence[str], steps: Sequence[Sequence[str]],
                            references: Sequence[str | None] | None = None, agg: str = "last"
                            ) -> tuple[list[list[float | None]], list[float | None]]:
        """:meth:`score_solutions`, and each solution's aggregate under ``agg`` as the verifier
        folds it (:meth:`score_aggregate`; None for a solution with no scored step), read with
        the last step's scores."""
        if agg not in PRM_EMPTY_AGGREGATE:
            raise InvalidArgument(f"agg: expected one of {', '.join(PRM_EMPTY_AGGREGATE)}, got "
                                  f"{agg!r}")
        return self._score_whole(problems, steps, references, agg)

    def _score_whole(self, problems, steps, references, agg: str | None
                     ) -> tuple[list[list[float | None]], list[float | None]]:
        """Score whole solutions step position by step position; with ``agg``, fold each step
        into its solution's state row as searches do."""
        if isinstance(problems, str) or not isinstance(problems, Sequence):
            raise InvalidArgument(f"problems: expected a list of strings, got {problems!r:.60}")
        if (isinstance(steps, str) or not isinstance(steps, Sequence)
                or len(steps) != len(problems)):
            raise InvalidArgument(f"steps: expected one list of steps per problem "
                                  f"({len(problems)}), got {steps!r:.60}")
        for i, solution in enumerate(steps):
            if isinstance(solution, str) or not isinstance(solution, Sequence) or not all(
                    isinstance(step, str) for step in solution):
                raise InvalidArgument(f"steps[{i}]: expected a list of strings (the steps), got "
                                      f"{solution!r:.60}")
        if references is None:
            references = [None] * len(problems)
        paths = self.start(problems, references)
        scores: list[list[float | None]] = [[] for _ in problems]
        aggregates: list[float | None] = [None] * len(problems)
        if agg is not None:
            state = prm_empty_state(len(problems), agg, self.device)
        try:
            for k in range(max(map(len, steps), default=0)):
                live = [i for i, solution in enumerate(steps) if k < len(solution)]
                args = ([paths[i] for i in live], [steps[i][k] for i in live],
                        [k == len(steps[i]) - 1 for i in live])
                if agg is None:
                    got = self.score(*args)
                else:
                    rows = torch.tensor(live, device=state.device)
                    scored = self.score_aggregate(*args, state[rows], agg)
                    state[rows] = scored.state
                    got = scored.scores
                    for i, score, aggregate in zip(live, got, scored.aggregates, strict=True):
                        if score is not None:
                            aggregates[i] = aggregate
                for i, score in zip(live, got, strict=True):
                    scores[i].append(score)
        finally:
            self.free(paths)
        return scores, aggregates


def fold_scores(state: torch.Tensor, scores: Sequence[float | None], agg: str) -> torch.Tensor:
    """Fold one step score per row into ``state`` ``[P, 2]`` float32 (aggregate, count), with
    the float32 arithmetic of :func:`ttscale.ops.prm_step_scores`; a None score leaves its row.
    Returns a new state."""
    rows = [i for i, score in enumerate(scores) if score is not None]
    state = state.clone()
    if not rows:
        return state
    index = torch.tensor(rows, device=state.device)
    step = torch.tensor([float(scores[i]) for i in rows], dtype=torch.float32, device=state.device)
    count = state[index, 1]
    before = torch.where(count > 0, state[index, 0],
                         torch.full_like(step, PRM_EMPTY_AGGREGATE[agg]))
    state[index, 0], state[index, 1] = prm_fold(agg, before, step, count), count + 1
    return state


def check_parents(paths: Sequence[object], parents) -> list[int]:
    """:meth:`Verifier.fork`'s ``parents``: indices into ``paths`` (a negative index would
    silently fork from the end)."""
    if isinstance(parents, str) or not isinstance(parents, Sequence):
        raise InvalidArgument(f"parents: expected a list of indices into paths, got {parents!r:.60}")
    for parent in parents:
        if (not isinstance(parent, numbers.Integral) or isinstance(parent, bool)
                or not 0 <= parent < len(paths)):
            raise InvalidArgument(f"parents: expected indices in [0, {len(paths)}), got {parent!r}")
    return [int(parent) for parent in parents]


def check_steps(paths: Sequence[object], steps, final) -> None:
    """:meth:`Verifier.score`'s arguments: one step (a string) and one final flag (a bool) per
    path."""
    for name, values in (("steps", steps), ("final", final)):
        if isinstance(values, str) or not isinstance(values, Sequence):
            raise InvalidArgument(f"{name}: expected one per path, got {values!r:.60}")
    if not len(paths) == len(steps) == len(final):
        raise InvalidArgument(f"steps: expected one step and one final flag per path "
                              f"({len(paths)} paths, {len(steps)} steps, {len(final)} flags)")
    for i, (step, last) in enumerate(zip(steps, final, strict=True)):
        if not isinstance(step, str):
            raise InvalidArgument(f"steps: expected strings, got {type(step).__name__} at {i}")
        if not isinstance(last, bool):
            raise InvalidArgument(f"final: expected True or False, got {last!r} at {i}")


def split_steps(text: str, delimiter: str = "\n\n") -> list[str]:
    """A solution's steps: the text between delimiters, stripped of surrounding whitespace and
    the delimiters themselves; a trailing delimiter (or blank text between two) makes no step."""
    if not delimiter:
        raise InvalidArgument("delimiter: expected a non-empty string")
    return [part.strip() for part in text.split(delimiter) if part.strip()]
