"""How a search scores its lines' steps and keeps their verifier paths.

:class:`StepScoring` holds the :class:`~ttscale.search.run.SearchRun` methods between a decode
and the next selection: split the text a line decoded into completed steps, score them on the
line's verifier path (one verifier call per step position across the lines), fold each score
into the line's aggregate state on the verifier's device, keep a retract path where a step may
turn out to be the last, and charge every verifier call's tokens to the problems that caused it.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence as Seq

import torch

from ttscale import ops
from ttscale.search.cost import split_tokens
from ttscale.search.line import Line, completed_steps
from ttscale.search.result import TreeNode


class StepScoring:
    """Step scoring and verifier paths for ``SearchRun`` (mixed in; it uses the run's
    verifier, costs, tree and texts)."""

    def _score_steps(self, lines: Seq[Line]) -> None:
        """Score the steps each line's text completed since its last scoring, one verifier call
        per step position across the lines, and record them."""
        new = [completed_steps(self.text(line), self.delimiter, line.finished) for line in lines]
        new = [steps[len(line.steps) :] for line, steps in zip(lines, new, strict=True)]
        for r in range(max(map(len, new), default=0)):
            batch = [
                (line, steps[r], r == len(steps) - 1)
                for line, steps in zip(lines, new, strict=True)
                if len(steps) > r
            ]
            if self.verifier is None:
                for line, step, _ in batch:
                    self._record(line, step, None)
            else:
                self._score_batch(batch)
        ended = [
            line
            for line, steps in zip(lines, new, strict=True)
            if line.finished and not steps and line.retract is not None
        ]
        if ended:
            self._rescore_as_final(ended)

    def _score_batch(self, batch: list[tuple[Line, str, bool]]) -> None:
        """Append one step to each line's path: (line, step, whether it is the line's last
        completed step). A line that goes on keeps a retract path from before its last step."""
        held = [line for line, _, last in batch if last and not line.finished]
        retracts = self._fork_paths([line.path for line in held], [line.problem for line in held])
        stale = [line for line, _, _ in batch if line.retract is not None]
        self._free_paths([line.retract for line in stale], [line.problem for line in stale])
        for line in stale:
            line.retract = line.retract_state = line.retract_aggregate = None
        lines = [line for line, _, _ in batch]
        before = {id(line): (line.state, line.aggregate) for line in held}
        scored = self._score_aggregate(
            lines,
            [line.path for line in lines],
            [step for _, step, _ in batch],
            [last and line.finished for line, _, last in batch],
        )
        for line, retract in zip(held, retracts, strict=True):
            # the retract path's aggregate is the line's before this step
            line.retract = retract
            line.retract_state, line.retract_aggregate = before[id(line)]
        for (line, step, _), score in zip(batch, scored.scores, strict=True):
            self._record(line, step, score)

    def _rescore_as_final(self, lines: list[Line]) -> None:
        """Lines that ended right after a step scored as not final: score it again, as final, on
        the retract path; the tree gets a sibling node for the final score."""
        for line in lines:  # the aggregate goes back to the retract path's, before the step
            line.state, line.aggregate = line.retract_state, line.retract_aggregate
        scored = self._score_aggregate(
            lines,
            [line.retract for line in lines],
            [line.steps[-1] for line in lines],
            [True] * len(lines),
        )
        self._free_paths([line.path for line in lines], [line.problem for line in lines])
        for line, score in zip(lines, scored.scores, strict=True):
            line.path, line.retract = line.retract, None
            line.retract_state = line.retract_aggregate = None
            line.scores[-1] = score
            if self.trees is not None and line.in_tree:
                tree = self.trees[line.problem]
                parent = tree[line.node].parent
                line.node = self._node(tree, parent, line.steps[-1], score, len(line.steps))

    def _score_aggregate(self, lines: list[Line], paths: list, steps: list[str],
                         final: list[bool]):
        """Score one step per line on ``paths`` and fold each score into its line's aggregate
        state, on the verifier's side (:meth:`Verifier.score_aggregate`); the lines get their
        new state rows and their aggregates as read with the scores."""
        state = torch.stack([line.state for line in lines])  # [P, 2]
        scored = self._verify(
            [line.problem for line in lines],
            [len(step) + 1 for step in steps],
            self.verifier.score_aggregate,
            paths, steps, final, state, self.agg,
        )
        rows = scored.state.unbind(0)
        for line, row, score, aggregate in zip(lines, rows, scored.scores, scored.aggregates,
                                               strict=True):
            if score is not None:
                line.state, line.aggregate = row, aggregate
        return scored

    def _empty_states(self, lines: Seq[Line]) -> None:
        """Give lines that begin a solution the state of no steps."""
        rows = ops.prm_empty_state(len(lines), self.agg, self.state_device).unbind(0)
        for line, row in zip(lines, rows, strict=True):
            line.state, line.aggregate = row, None
            line.retract_state = line.retract_aggregate = None

    def _record(self, line: Line, step: str, score: float | None) -> None:
        line.steps.append(step)
        line.scores.append(score)
        if self.trees is not None and line.in_tree:
            line.node = self._node(
                self.trees[line.problem], line.node, step, score, len(line.steps)
            )

    @staticmethod
    def _node(
        tree: list[TreeNode], parent: int | None, step: str, score: float | None, depth: int
    ) -> int:
        tree.append(TreeNode(len(tree), parent, step, score, depth))
        return len(tree) - 1

    def _verify(self, owners: Seq[int], weights: Seq[int], call: Callable, *args):
        """Run a verifier call and charge the tokens it scored to ``owners`` by ``weights``."""
        scored = getattr(self.verifier, "scored_in_thread", lambda: self.verifier.scored_tokens)
        before = scored()
        out = call(*args)
        for p, share in zip(owners, split_tokens(scored() - before, weights), strict=True):
            self.costs[p].scored_tokens += share
        return out

    def _fork_paths(self, paths: Seq[object], owners: Seq[int]) -> list[object]:
        if self.verifier is None or not paths:
            return [None] * len(paths)
        return self._verify(
            owners, [1] * len(paths), self.verifier.fork, list(paths), list(range(len(paths)))
        )

    def _fork_verifier(self, lines: Seq[Line]) -> list[tuple[object, object]]:
        """A fork of each line's verifier path, and of its retract path where it has one."""
        owners = [line.problem for line in lines]
        paths = self._fork_paths([line.path for line in lines], owners)
        back = [line for line in lines if line.retract is not None]
        forked = iter(
            self._fork_paths([line.retract for line in back], [line.problem for line in back])
        )
        retracts = [None if line.retract is None else next(forked) for line in lines]
        return list(zip(paths, retracts, strict=True))

    def _free_verifier(self, lines: Seq[Line]) -> None:
        """Free lines' verifier paths (and retract paths)."""
        self._free_paths(
            [line.path for line in lines] + [line.retract for line in lines],
            [line.problem for line in lines] * 2,
        )
        for line in lines:
            line.path = line.retract = None

    def _free_paths(self, paths: Seq[object | None], owners: Seq[int]) -> None:
        live = [(path, p) for path, p in zip(paths, owners, strict=True) if path is not None]
        if self.verifier is not None and live:
            self._verify(
                [p for _, p in live],
                [1] * len(live),
                self.verifier.free,
                [path for path, _ in live],
            )
