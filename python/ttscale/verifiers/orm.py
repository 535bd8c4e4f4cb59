"""An outcome reward model: one score per solution, read at its final step.

Any PRM checkpoint and format serve as an ORM through the same head reading: the score of the
final step, which sees the whole solution. Steps before the final one are appended to their
path without running the model; the final step runs them all at once, so solutions the
strategy drops before they finish cost the ORM nothing.
"""

from __future__ import annotations

from ttscale import ops
from ttscale.verifiers.base import ScoredSteps
from ttscale.verifiers.prm import PRM


class ORM(PRM):
    """Scores a solution once, at its final step; None for every earlier step.

    Takes the same arguments as :class:`~ttscale.verifiers.prm.PRM`.
    """

    def score(self, paths, steps, final) -> list[float | None]:
        return self._score_final(paths, steps, final, None, "last").scores

    def score_aggregate(self, paths, steps, final, state, agg) -> ScoredSteps:
        return self._score_final(paths, steps, final, state, agg)

    def _score_final(self, paths, steps, final, state, agg) -> ScoredSteps:
        """Run and score the final steps only; the other paths' rows of ``state`` (None: empty
        rows) stay as they were."""
        self._append(paths, steps, final)
        if state is None:
            state = ops.prm_empty_state(len(paths), agg, self.device)
        rows = [i for i, last in enumerate(final) if last]
        got = self._read([paths[i] for i in rows], rows, state, agg)
        scores: list[float | None] = [None] * len(paths)
        aggregates: list[float | None] = [None] * len(paths)
        for i, score, aggregate in zip(rows, got.scores, got.aggregates, strict=True):
            scores[i], aggregates[i] = score, aggregate
        return ScoredSteps(scores, got.state, aggregates)
