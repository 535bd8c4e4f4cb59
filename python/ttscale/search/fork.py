"""Selection between search steps: keep the best candidates of each group, fork them, free the rest.

Every strategy that prunes (beam search, DVTS, lookahead, early rejection) goes through
:func:`select_and_fork`, which runs the device op :func:`ttscale.ops.select_and_fork` through
:meth:`Engine.select_and_fork`: ranking, forking and freeing happen in one op call, and the
candidates' sequences are consumed.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence as Seq
from dataclasses import dataclass

import numpy as np
import torch

from ttscale.engine.forking import per_group
from ttscale.engine.sequence import Sequence
from ttscale.errors import InvalidArgument


@dataclass
class Forked:
    """What :func:`select_and_fork` returns.

    Attributes
    ----------
    children : list[Sequence]
        Group by group; within a group, kept candidate by kept candidate (best first), each
        kept candidate's children together.
    parents : list[int]
        For each child, the index of the candidate it continues.
    group_sizes : list[int]
        Children per group: the ``group_sizes`` of the next step.
    """

    children: list[Sequence]
    parents: list[int]
    group_sizes: list[int]


def rank_key(scores: Seq[float | None], i: int) -> tuple[bool, float, int]:
    """Sort key, best first: numbers before missing or NaN scores, higher first, lower index
    first on ties."""
    score = scores[i]
    missing = score is None or math.isnan(score)
    return (missing, 0.0 if missing else -score, i)


def best_per_group(
    scores: Seq[float | None], group_sizes: Seq[int], keep: Seq[int]
) -> list[list[int]]:
    """Each group's ``min(keep[g], size)`` best candidates (indices into ``scores``), best first."""
    best, start = [], 0
    for size, k in zip(group_sizes, keep, strict=True):
        members = sorted(range(start, start + size), key=lambda i: rank_key(scores, i))
        best.append(members[:k])
        start += size
    if start != len(scores):
        raise InvalidArgument(
            f"group_sizes: expected them to sum to {len(scores)} candidates, got {start}"
        )
    return best


def select_and_fork(
    engine,
    seqs: Seq[Sequence],
    scores: Seq[float | None],
    group_sizes: Seq[int],
    keep: int | Seq[int],
    children: int | Seq[int],
) -> Forked:
    """Keep the best ``keep[g]`` candidates of each group and fork each into ``children[g]``.

    Group ``g`` is the next ``group_sizes[g]`` candidates (a problem, or a DVTS subtree). Ranking
    as the device op's: higher score first, ties to the lower index, a missing (None) or NaN
    score below every number. The candidates are consumed: a kept candidate's first child *is*
    its sequence (its blocks pass on, as the op's first child inherits its parent's table), its
    other children are forks sharing its blocks, and every other candidate is freed at once.

    Parameters
    ----------
    engine : Engine
        The engine that owns ``seqs``.
    seqs : sequence of Sequence
        ``C`` live candidates, grouped consecutively.
    scores : Tensor or sequence of float or None
        ``C`` scores, higher is better: a float32 tensor (the lines' aggregate states, see
        :meth:`ttscale.search.run.SearchRun.aggregate_scores`; NaN for a missing score) goes to
        the device op as it is, without a read to the host.
    group_sizes : sequence of int
        ``G`` group sizes summing to ``C``.
    keep, children : int or sequence of int
        Per group (one int for all): candidates kept, and children per kept candidate (0 frees
        the kept candidate too, after the selection has counted it).

    Returns
    -------
    Forked
    """
    # the counts of scores and groups are checked where the selection runs (forking.check_counts)
    keep = per_group("keep", keep, len(group_sizes))
    children = per_group("children", children, len(group_sizes))
    # The op ranks NaN below every number, as a missing score should be.
    if isinstance(scores, torch.Tensor):
        numbers = scores
    else:
        numbers = [math.nan if score is None else float(score) for score in scores]
    # through the scheduler where there is one: selections of searches on other threads run in
    # the same op
    out, parents, offsets = (engine.scheduler or engine).select_and_fork(
        list(seqs), numbers, list(group_sizes), keep, children)
    sizes = [offsets[g + 1] - offsets[g] for g in range(len(group_sizes))]
    return Forked(out, parents, sizes)


def consecutive_groups(keys: Seq[object]) -> tuple[list[object], list[int]]:
    """The runs of equal consecutive keys: each run's key and its length."""
    names: list[object] = []
    sizes: list[int] = []
    for key in keys:
        if names and names[-1] == key:
            sizes[-1] += 1
        else:
            names.append(key)
            sizes.append(1)
    return names, sizes


def softmax(scores: list[float], temperature: float) -> np.ndarray:
    """Weights from scores: ``exp(score / temperature)``, normalised (particle filtering's
    resampling, REBASE's width split, MCTS's priors)."""
    logits = np.asarray(scores, dtype=np.float64) / temperature
    weights = np.exp(logits - logits.max())
    return weights / weights.sum()


def by_problem(lines: list) -> list[tuple[int, list]]:
    """A wave's lines (``search.line.Line``) as (problem, its consecutive lines), in order."""
    problems, sizes = consecutive_groups([line.problem for line in lines])
    ends = list(itertools.accumulate(sizes))
    return [(p, lines[end - size : end])
            for p, size, end in zip(problems, sizes, ends, strict=True)]


def weight_score(line) -> float:
    """A line's aggregate score (as read with its last step's score) for a weight: a line with
    no scored step yet counts as 0."""
    score = line.aggregate
    return 0.0 if score is None or math.isnan(score) else score
