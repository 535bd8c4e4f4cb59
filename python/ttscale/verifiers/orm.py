"""An outcome reward model: one score per solution, read at its final step.

Any PRM checkpoint and format serve as an ORM through the same head reading: the score of the
final step, which sees the whole solution. Steps before the final one are appended to their
path without running the model; the final step runs them all at once, so solutions the
strategy drops before they finish cost the ORM nothing.
"""

from __future__ import annotations

from ttscale.verifiers.prm import PRM


class ORM(PRM):
    """Scores a solution once, at its final step; None for every earlier step.

    Takes the same arguments as :class:`~ttscale.verifiers.prm.PRM`.
    """

    def score(self, paths, steps, final) -> list[float | None]:
        self._append(paths, steps, final)
        finished = self._read([path for path, last in zip(paths, final, strict=True) if last])
        scores = iter(finished)
        return [next(scores) if last else None for last in final]
