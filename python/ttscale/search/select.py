"""Final selection, one vocabulary for every strategy: ``select`` and ``agg``.

- ``agg`` reduces a candidate's step scores to one number: ``"last"``, ``"min"``, ``"prod"``,
  ``"mean"``.
- ``select`` chooses the answer: ``"best"`` (the candidate of highest aggregate),
  ``"weighted"`` (the answer whose equivalent candidates' aggregates sum highest) or
  ``"majority"`` (the answer most candidates give; needs no verifier). Revisions also take
  ``"hierarchical"``: the best attempt of each chain, then a weighted vote across chains.

Equivalent answers are grouped with :func:`ttscale.grading.answers_equal` (math-verify).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

from ttscale.errors import InvalidArgument
from ttscale.reference import PRM_AGGS, PRM_EMPTY_AGGREGATE, prm_fold
from ttscale.search.result import Candidate

AGGREGATIONS = PRM_AGGS  # "last", "min", "prod", "mean": the running aggregates the PRM keeps
SELECTIONS = ("best", "weighted", "majority")
REVISION_SELECTIONS = (*SELECTIONS, "hierarchical")


def check_select(select: str | None, agg: str, has_verifier: bool, allowed=SELECTIONS) -> str:
    """Validate ``select``/``agg`` and resolve ``select=None`` (majority without a verifier)."""
    if agg not in AGGREGATIONS:
        raise InvalidArgument(f"agg: expected one of {', '.join(AGGREGATIONS)}, got {agg!r}")
    if select is None:
        return "weighted" if has_verifier else "majority"
    if select not in allowed:
        raise InvalidArgument(f"select: expected one of {', '.join(allowed)}, got {select!r}")
    if select != "majority" and not has_verifier:
        raise InvalidArgument(f"select: {select!r} needs a verifier (without one use 'majority')")
    return select


def aggregate(step_scores: Sequence[float], agg: str) -> float | None:
    """One number from a candidate's step scores; None when it has none.

    Folds them one at a time with :func:`ttscale.reference.prm_fold`, the float32 rule that
    :func:`ttscale.ops.prm_step_scores` keeps as its running aggregate (what searches rank by):
    ``prod`` and ``mean`` round after every step, so this is that number bit for bit, not a
    float64 product or mean.
    """
    if not step_scores:
        return None
    if agg not in AGGREGATIONS:
        raise InvalidArgument(f"agg: expected one of {', '.join(AGGREGATIONS)}, got {agg!r}")
    steps = torch.from_numpy(np.array(step_scores, dtype=np.float32))  # each rounded to float32
    counts = torch.arange(len(steps), dtype=torch.float32)
    value = torch.tensor(PRM_EMPTY_AGGREGATE[agg], dtype=torch.float32)
    for step, count in zip(steps.unbind(), counts.unbind(), strict=True):
        value = prm_fold(agg, value, step, count)
    return float(value)


def group_answers(answers: Sequence[str | None], equal: Callable[[str, str], bool]) -> list[int | None]:
    """A group id per answer: equivalent answers share one; None answers get None.

    Identical strings are grouped without calling ``equal``; distinct strings are compared with
    one representative per existing group.
    """
    groups: list[int | None] = []
    representatives: list[str] = []
    by_text: dict[str, int] = {}
    for answer in answers:
        if answer is None:
            groups.append(None)
            continue
        key = answer.strip()
        if key not in by_text:
            match = next((g for g, rep in enumerate(representatives) if equal(answer, rep)), None)
            if match is None:
                match = len(representatives)
                representatives.append(answer)
            by_text[key] = match
        groups.append(by_text[key])
    return groups


def choose(
    candidates: Sequence[Candidate], select: str, equal: Callable[[str, str], bool] | None = None
) -> int | None:
    """Index of the chosen candidate under ``select``; None when no candidate has an answer.

    Ties go to the earlier candidate (for votes: the group whose first member comes first), so
    the choice is deterministic. A candidate without a score counts 0 in weighted votes and
    ranks below every scored one for ``"best"``.
    """
    if equal is None:
        from ttscale.grading import answers_equal as equal
    answered = [i for i, c in enumerate(candidates) if c.answer is not None]
    if not answered:
        return None
    if select == "hierarchical":
        return _choose_hierarchical(candidates, equal)
    if select == "best":
        score = lambda i: candidates[i].score if candidates[i].score is not None else -math.inf
        return max(answered, key=lambda i: (_finite(score(i)), -i))
    groups = group_answers([candidates[i].answer for i in answered], equal)
    totals: dict[int, float] = {}
    first: dict[int, int] = {}
    for i, g in zip(answered, groups):
        weight = 1.0 if select == "majority" else _finite(candidates[i].score or 0.0)
        totals[g] = totals.get(g, 0.0) + weight
        first.setdefault(g, i)
    winner = max(totals, key=lambda g: (totals[g], -first[g]))
    members = [i for i, g in zip(answered, groups) if g == winner]
    best_member = lambda i: (_finite(candidates[i].score if candidates[i].score is not None else -math.inf), -i)
    return max(members, key=best_member)


def _choose_hierarchical(
    candidates: Sequence[Candidate], equal: Callable[[str, str], bool]
) -> int | None:
    """The best attempt of each revision chain (``Candidate.chain``), then a weighted vote
    among those winners."""
    chains: dict[int, list[int]] = {}
    for i, c in enumerate(candidates):
        chains.setdefault(c.chain, []).append(i)
    winners = []
    for members in chains.values():
        best = choose([candidates[i] for i in members], "best", equal)
        if best is not None:
            winners.append(members[best])
    chosen = choose([candidates[i] for i in winners], "weighted", equal)
    return None if chosen is None else winners[chosen]


def _finite(x: float) -> float:
    """NaN scores never win: they rank below everything."""
    return -math.inf if x != x else x
