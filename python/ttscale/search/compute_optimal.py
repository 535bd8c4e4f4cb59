"""Compute-optimal scaling: each problem's strategy and budget chosen by its estimated difficulty.

Following Snell et al. (2024): on a calibration set with known answers, measure the accuracy of
each (strategy, N) with N up to the budget, per bin of difficulty, and keep the best of each
bin. The options are the search strategies and, along the sequential axis, revisions at each
sequential/parallel ratio asked for (``"revisions-4"``: chains of 4 attempts, N // 4 chains).
Difficulty is the verifier's own estimate, so that it is available for new problems: the mean
aggregate score of a small pilot of best-of-N samples (a low score means a hard problem).
A new problem gets its pilot, falls into a bin, and is searched with that bin's choice.

This module fits the table and searches by it; the options, running one, and the table itself
are :mod:`ttscale.search.compute_optimal_menu`'s.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from ttscale._checks import check_int
from ttscale.errors import InvalidArgument
from ttscale.sampling_params import SamplingParams
from ttscale.search.best_of_n import best_of_n
from ttscale.search.common import check_count, check_problem_ids, check_problems
from ttscale.search.compute_optimal_menu import (
    REVISIONS_PREFIX,
    ComputeOptimalTable,
    fits,
    menu,
    pilot_score,
    run_option,
)
from ttscale.search.result import SearchResult
from ttscale.search.select import check_select, choose
from ttscale.verifiers.base import Verifier

__all__ = ["ComputeOptimalTable", "compute_optimal", "fit_compute_optimal", "menu"]


def check_common(common: dict[str, Any]) -> None:
    """``**common`` holds only common strategy arguments that compute_optimal passes on (not
    those it takes itself), named as the caller wrote them."""
    from ttscale.search.common import COMMON

    own = ("select", "agg", "seed", "references", "problem_ids")
    passed_on = [f.name for f in dataclasses.fields(COMMON) if f.name not in own]
    for name in common:
        if name not in passed_on:
            raise InvalidArgument(f"{name}: not an argument of compute_optimal (its **common "
                                  f"takes {', '.join(passed_on)})", param=name)


def check_budget(llm, budget) -> int:
    """The largest N: a count, at most the policy's ``max_n``."""
    budget = check_count("budget", budget)
    max_n = getattr(llm, "max_n", None)
    if max_n is not None and budget > max_n:
        raise InvalidArgument(f"budget: at most {max_n} (the LLM's max_n), got {budget}")
    return budget


def check_revision_ratios(ratios: Sequence[int], sizes: Sequence[int]) -> list[int]:
    """Revision ratios are attempts per chain, each dividing some N measured."""
    ratios = list(ratios)
    for ratio in ratios:
        check_count("revision_ratios", ratio)
        if all(n % ratio for n in sizes):
            raise InvalidArgument(
                f"revision_ratios: {ratio} divides no N measured ({', '.join(map(str, sizes))})"
            )
    return ratios


def fit_compute_optimal(
    llm,
    calibration_problems: Sequence[str],
    calibration_references: Sequence[str],
    budget: int,
    verifier: Verifier | None,
    sampling: SamplingParams | None = None,
    *,
    strategies: Sequence[str] = ("best_of_n", "beam_search"),
    revision_ratios: Sequence[int] = (),
    window: int = 3,
    num_bins: int = 4,
    pilot_n: int = 4,
    beam_width: int = 4,
    max_iterations: int = 40,
    select: str | None = None,
    agg: str = "last",
    seed: int | None = None,
    **common,
) -> ComputeOptimalTable:
    """Measure every (strategy, N) on the calibration set and choose the best per difficulty bin.

    N runs over the powers of two up to ``budget``, and ``budget`` itself (for beam search,
    DVTS and lookahead, the multiples of ``beam_width`` among them; for each revision ratio, the
    multiples of it). Best-of-N is run once with ``budget`` samples and scored for each N on its
    first N samples, whose first ``pilot_n`` also give each calibration problem its pilot score;
    bins are its quantiles. A bin's choice is its most accurate option, ties going to the
    smaller N, then to the earlier option (``strategies`` in order, then ``revision_ratios``);
    an empty bin takes the choice that is best over the whole set.

    Parameters are those of :func:`compute_optimal`; ``common`` takes the rest of the common
    strategy arguments (``system_prompt``, ``prompt_fn``, ``step_delimiter``, ``extract``,
    ``equal``, ``progress``).
    """
    calibration_problems = check_problems("calibration_problems", calibration_problems)
    if (isinstance(calibration_references, str) or not isinstance(calibration_references, Sequence)
            or len(calibration_references) != len(calibration_problems)
            or not all(isinstance(r, str) for r in calibration_references)):
        raise InvalidArgument(
            f"calibration_references: expected one answer (a string) per calibration problem "
            f"({len(calibration_problems)}), got {calibration_references!r:.60}"
        )
    budget = check_budget(llm, budget)
    check_count("num_bins", num_bins)
    pilot_n = check_int("pilot_n", pilot_n, low=1, high=budget, note=" (at most budget)")
    check_common(common)
    if isinstance(strategies, str) or not isinstance(strategies, Sequence):
        raise InvalidArgument(f"strategies: expected a list of names, got {strategies!r:.60}")
    unknown = [s for s in strategies if s not in menu()]
    if unknown or not strategies:
        raise InvalidArgument(
            f"strategies: expected names among {', '.join(menu())}, got {list(strategies)}"
        )
    beam_width = check_count("beam_width", beam_width)
    check_count("max_iterations", max_iterations)
    sizes = sorted({1 << k for k in range(budget.bit_length()) if 1 << k <= budget} | {budget})
    ratios = check_revision_ratios(revision_ratios, sizes)
    check_count("window", window)
    knobs = dict(beam_width=beam_width, max_iterations=max_iterations)
    if not ratios and not any(fits(name, n, **knobs) for name in strategies for n in sizes):
        raise InvalidArgument(
            f"budget: no N up to {budget} is a multiple of beam_width={beam_width}"
        )
    if verifier is None:
        raise InvalidArgument("verifier: compute_optimal needs a verifier to estimate difficulty")
    chosen_rule = check_select(select, agg, True)
    equal = common.get("equal")
    if equal is None:
        from ttscale.grading import answers_equal as equal
    shared = dict(
        select=select, agg=agg, seed=seed, references=list(calibration_references), **common
    )
    right = lambda answer, ref: answer is not None and equal(answer, ref)

    # Best-of-N at the full budget serves every smaller N too; otherwise only the pilot is needed.
    samples = budget if "best_of_n" in strategies else pilot_n
    bon = best_of_n(llm, calibration_problems, samples, verifier, sampling, **shared)
    scores = [pilot_score(r.candidates[:pilot_n]) for r in bon]
    correct: dict[tuple[str, int], list[bool]] = {}
    options = [*strategies, *(f"{REVISIONS_PREFIX}{ratio}" for ratio in ratios)]
    for name in options:
        for n in sizes:
            if name == "best_of_n":
                picks = [choose(r.candidates[:n], chosen_rule, equal) for r in bon]
                answers = [
                    None if i is None else r.candidates[i].answer
                    for r, i in zip(bon, picks, strict=True)
                ]
            elif fits(name, n, **knobs):
                runs = run_option(
                    name,
                    llm,
                    calibration_problems,
                    n,
                    verifier,
                    sampling,
                    beam_width=beam_width,
                    max_iterations=max_iterations,
                    window=window,
                    **shared,
                )
                answers = [r.answer for r in runs]
            else:
                continue
            correct[(name, n)] = [
                right(a, ref) for a, ref in zip(answers, calibration_references, strict=True)
            ]

    ordered = sorted(scores)
    edges = [ordered[len(ordered) * b // num_bins] for b in range(1, num_bins)]
    table = ComputeOptimalTable(edges, [], pilot_n=pilot_n, budget=budget, window=window)
    members = [[i for i, s in enumerate(scores) if table.bin_of(s) == b] for b in range(num_bins)]
    table.counts = [len(m) for m in members]
    rank = list(correct)  # measurement order: options as given, N ascending

    def best(indices: list[int]) -> tuple[str, int]:
        accuracy = {o: sum(correct[o][i] for i in indices) for o in rank}
        return max(rank, key=lambda o: (accuracy[o], -o[1], -rank.index(o)))

    overall = best(list(range(len(scores))))
    table.choices = [best(m) if m else overall for m in members]
    table.accuracy = {
        f"{name}:{n}": [
            sum(correct[(name, n)][i] for i in m) / len(m) if m else None for m in members
        ]
        for name, n in rank
    }
    return table


def compute_optimal(
    llm,
    calibration_problems: Sequence[str],
    calibration_references: Sequence[str],
    problems: Sequence[str],
    budget: int,
    verifier: Verifier | None,
    sampling: SamplingParams | None = None,
    *,
    table: ComputeOptimalTable | None = None,
    strategies: Sequence[str] = ("best_of_n", "beam_search"),
    revision_ratios: Sequence[int] = (),
    window: int = 3,
    num_bins: int = 4,
    pilot_n: int = 4,
    beam_width: int = 4,
    max_iterations: int = 40,
    select: str | None = None,
    agg: str = "last",
    seed: int | None = None,
    references: Sequence[str | None] | None = None,
    **common,
) -> list[SearchResult]:
    """Search each problem with the (strategy, N) fitted for its estimated difficulty.

    Fits a :class:`ComputeOptimalTable` on the calibration set (:func:`fit_compute_optimal`;
    pass ``table`` to reuse one, and the calibration arguments are then ignored), runs a pilot
    of ``table.pilot_n`` best-of-N samples on each problem, bins its pilot score, and searches
    the problems of each bin together with the bin's choice.

    Parameters
    ----------
    llm : LLM
        The policy.
    calibration_problems, calibration_references : list of str
        Problems with known answers to fit on.
    problems : list of str
        The problems to solve.
    budget : int
        The largest N: samples for best-of-N, beams for beam search, DVTS and lookahead.
    verifier : Verifier
        Scores steps, estimates difficulty and guides the searches.
    sampling : SamplingParams, optional
        As for every strategy.
    table : ComputeOptimalTable, optional
        A fitted table to use instead of fitting one.
    strategies : list of str
        Options among the strategies of :func:`menu` (``"best_of_n"``, ``"beam_search"``,
        ``"dvts"``, ``"lookahead"``).
    revision_ratios : list of int
        Attempts per chain of the :func:`ttscale.revisions` options (``"revisions-<r>"``, with
        N // r chains), e.g. ``(2, 4, 8)``; none by default.
    window : int
        The revisions' window (a given ``table``'s own window is used with it).
    num_bins : int
        Difficulty bins (quantiles of the calibration pilot scores).
    pilot_n : int
        Pilot samples per problem, at most ``budget``.
    beam_width, max_iterations : int
        For the tree searches.
    select, agg, seed, references
        As for every strategy (``references`` belong to ``problems``).
    **common
        ``system_prompt``, ``prompt_fn``, ``step_delimiter``, ``extract``, ``equal``,
        ``problem_ids`` (of ``problems``), ``progress``, as for every strategy.

    Returns
    -------
    list of SearchResult
        One per problem, in order, from its chosen strategy; ``cost`` includes the pilot's, and
        ``extra["compute_optimal"]`` holds the ``pilot_score``, the ``bin``, the chosen
        ``strategy`` and ``n``, and the ``table`` (as a dict).
    """
    problems = check_problems("problems", problems)
    # the problems' stream keys (the calibration set keys its own by position)
    ids = check_problem_ids(common.pop("problem_ids", None), len(problems))
    check_common(common)
    if table is not None and not isinstance(table, ComputeOptimalTable):
        raise InvalidArgument(f"table: expected a ComputeOptimalTable (from fit_compute_optimal), "
                              f"got {type(table).__name__}")
    if table is not None:
        check_budget(llm, table.budget)
    if table is None:
        table = fit_compute_optimal(
            llm,
            calibration_problems,
            calibration_references,
            budget,
            verifier,
            sampling,
            strategies=strategies,
            revision_ratios=revision_ratios,
            window=window,
            num_bins=num_bins,
            pilot_n=pilot_n,
            beam_width=beam_width,
            max_iterations=max_iterations,
            select=select,
            agg=agg,
            seed=seed,
            **common,
        )
    shared = dict(select=select, agg=agg, seed=seed, **common)
    refs = None if references is None else list(references)
    pilot = best_of_n(llm, problems, table.pilot_n, verifier, sampling, references=refs,
                      problem_ids=ids, **shared)
    scores = [pilot_score(r.candidates) for r in pilot]
    bins = [table.bin_of(s) for s in scores]
    results: list[SearchResult | None] = [None] * len(problems)
    for strategy, n in dict.fromkeys(table.choices[b] for b in bins):
        chosen = [i for i, b in enumerate(bins) if table.choices[b] == (strategy, n)]
        runs = run_option(
            strategy,
            llm,
            [problems[i] for i in chosen],
            n,
            verifier,
            sampling,
            beam_width=beam_width,
            max_iterations=max_iterations,
            window=table.window,
            references=None if refs is None else [refs[i] for i in chosen],
            problem_ids=[ids[i] for i in chosen],
            **shared,
        )
        for i, result in zip(chosen, runs, strict=True):
            result.cost.add(pilot[i].cost)
            result.extra["compute_optimal"] = {
                "pilot_score": scores[i],
                "bin": bins[i],
                "strategy": strategy,
                "n": n,
                "table": table.to_dict(),
            }
            result.strategy = "compute_optimal"
            results[i] = result
    return results
