"""A line: one growing solution of a search, its policy sequence with its verifier paths and
the steps scored so far; and the progress a search reports after each step.

Why a line can hold two verifier paths: a step is scored when its delimiter appears, before
anyone knows whether the model will stop right after it. When it does (the next token is
end-of-sequence, with no new text), that step was the solution's last after all, and a verifier
that judges final answers (a rule, an outcome model) must see it as such. So while a line goes
on, it also keeps ``retract``, a fork of its path taken before the last step; if the line ends
without a new step, the last step is scored again on ``retract`` as final. A fork of a PRM path
copies a block table, and the second scoring costs one step's tokens, only when it happens.

A line's aggregate score is not recomputed from its step scores: it is the running aggregate
the verifier folds on its device (:meth:`ttscale.verifiers.base.Verifier.score_aggregate`),
kept as the line's ``state`` row and forked with the line. ``aggregate`` is that row's value as
read to the host with the step's scores, for the host's own uses (weights, reports, results).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from ttscale.engine.sequence import Sequence
from ttscale.verifiers.base import split_steps


@dataclass(eq=False)
class Line:
    """One growing solution of problem ``problem`` (an index into the strategy's problems).

    ``steps``/``scores`` are the steps scored so far; ``node`` the tree node of the last one
    (0, the root, before any); ``group`` the DVTS subtree; ``index`` the sample it began as.
    ``start`` is where the solution begins in its sequence's output: 0, except for a revision
    chain's later attempts, which follow the earlier ones on the same sequence.

    ``state`` is the running aggregate of ``scores`` (a ``[2]`` float32 row: aggregate, step
    count, on the verifier's device; the scores that are None not folded in), ``aggregate`` its
    value on the host (None before any scored step), and ``retract_state``/``retract_aggregate``
    those of ``retract``. Rows are replaced, never written in place, so a parent and its forks
    may share one.
    """

    problem: int
    seq: Sequence
    path: object | None = None
    retract: object | None = None
    steps: list[str] = field(default_factory=list)
    scores: list[float | None] = field(default_factory=list)
    node: int = 0
    group: int = 0
    index: int = 0
    finished: bool = False
    in_tree: bool = True
    start: int = 0
    state: torch.Tensor | None = None
    aggregate: float | None = None
    retract_state: torch.Tensor | None = None
    retract_aggregate: float | None = None

    def child(self, seq: Sequence, path: object, retract: object, **changes) -> Line:
        """A line that continues this one's steps on ``seq``, with its own verifier paths."""
        return dataclasses.replace(
            self,
            seq=seq,
            path=path,
            retract=retract,
            steps=list(self.steps),
            scores=list(self.scores),
            **changes,
        )


@dataclass(frozen=True)
class Progress:
    """A search's state for one problem after one of its steps (``on_progress`` gets these)."""

    problem: int  # the problem's position in the call
    step: int  # the search's steps on it so far (a whole solution counts as one)
    live: int  # sequences it advanced in this step that are still unfinished
    finished: int  # solutions it has finished so far (candidates, or attempts of revisions)
    best_score: float | None  # the best aggregate score among the sequences of this step
    generated_tokens: int  # policy tokens generated for it so far

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def completed_steps(text: str, delimiter: str, finished: bool) -> list[str]:
    """The steps a text has completed: all of them once it is finished, else those that a
    delimiter has closed (the text after the last delimiter is a step still being written)."""
    if finished:
        return split_steps(text, delimiter)
    cut = text.rfind(delimiter)
    return split_steps(text[:cut], delimiter) if cut >= 0 else []
