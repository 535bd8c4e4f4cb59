"""Beam search over solution steps, guided by a verifier (lookahead search shares it)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ttscale.errors import InvalidArgument
from ttscale.search.common import Inputs
from ttscale.search.fork import best_per_group, consecutive_groups
from ttscale.search.registry import Options, option, strategy
from ttscale.search.result import SearchResult
from ttscale.search.run import Line, SearchRun, run_waves


@dataclass(frozen=True)
class BeamOptions(Options):
    """Beam search's, DVTS's and lookahead's knobs."""

    beam_width: int = option(4, "Children per kept beam (DVTS: beams per subtree); divides ``n``.",
                             metavar="M")
    max_iterations: int = option(40, "Steps searched at most.", metavar="I")

    def check(self, n: int) -> None:
        if n % self.beam_width:
            raise InvalidArgument(f"beam_width: expected a divisor of n={n}, got {self.beam_width}")

    @classmethod
    def for_budget(cls, n: int) -> dict[str, int]:
        return {"beam_width": min(cls.beam_width, n)}


@strategy(BeamOptions, needs_verifier=True, menu=True,
          budget="Beams per problem (the number of candidates returned).")
def beam_search(inputs: Inputs, n: int, options: BeamOptions) -> list[SearchResult]:
    """Search step by step with ``n`` beams, keeping the ``n / beam_width`` best and expanding
    each ``beam_width`` times.

    Iteration 0 samples ``n`` first steps per problem. Every iteration extends each active beam
    by one step (decoding to ``step_delimiter``), scores the new step, and sets finished beams
    (end-of-sequence or ``max_tokens``) aside; of the unfinished beams of each problem the
    ``n / beam_width`` with the highest aggregate score are kept and forked ``beam_width`` times
    (their KV shared, not copied), the others freed. All problems search together in one batch.

    A problem stops once ``n`` beams have finished. When ``max_iterations`` run out first, its
    best unfinished beams, as many as it lacks, are decoded to their end (without further
    selection). Either way it returns exactly ``n`` finished candidates: the ``n`` best by
    aggregate if more finished in the last iteration, in the order they finished.

    Returns:
    ``tree`` holds the search tree: every scored step of every beam, with its parent.
    """
    return run_waves(
        inputs,
        n,
        lambda run: search_beams(run, n, options.beam_width, options.max_iterations),
        tree=True,
    )


def search_beams(
    run: SearchRun, n: int, beam_width: int, max_iterations: int, lookahead: int = 0
) -> list[SearchResult]:
    """Beam search over one wave (see :func:`beam_search`); with ``lookahead`` > 0, beams are
    ranked by :func:`lookahead_scores`."""
    sampling = run.inputs.sampling
    lines = run.start(n)
    done: dict[int, list[Line]] = {p: [] for p in run.wave}
    scores = run.aggregate_scores([])
    for iteration in range(max_iterations):
        run.advance(lines, sampling)
        if lookahead:
            scores = lookahead_scores(run, lines, lookahead)
        else:
            scores = run.aggregate_scores(lines)
        finished = [line for line in lines if line.finished]
        for line in finished:
            done[line.problem].append(line)
        run.free(finished)
        going = [i for i, line in enumerate(lines) if not line.finished]
        lines, scores = [lines[i] for i in going], scores[going]
        if not lines or iteration == max_iterations - 1:
            break
        problems, sizes = consecutive_groups([line.problem for line in lines])
        keep = [n // beam_width if len(done[p]) < n else 0 for p in problems]
        lines = run.select(lines, scores, sizes, keep, beam_width)
    if lines:  # out of iterations: finish the best beams each problem still lacks
        problems, sizes = consecutive_groups([line.problem for line in lines])
        lines = run.select(lines, scores, sizes, [max(n - len(done[p]), 0) for p in problems], 1)
        run.advance(lines, sampling, whole=True)
        for line in lines:
            done[line.problem].append(line)
        run.free(lines)
    results = []
    for p in run.wave:
        best = best_per_group([line.aggregate for line in done[p]], [len(done[p])], [n])[0]
        results.append(run.result(p, [run.candidate(done[p][i]) for i in sorted(best)]))
    return results


def lookahead_scores(run: SearchRun, lines: list[Line], steps: int) -> torch.Tensor:
    """Each unfinished line's aggregate score after ``steps`` more greedy steps, scored on a
    fork that is then freed (the line itself stays where it was); finished lines keep theirs.
    The aggregates stay on the device (:meth:`SearchRun.aggregate_scores`)."""
    greedy = dataclasses.replace(run.inputs.sampling, temperature=0.0)
    scores = run.aggregate_scores(lines)
    going = [i for i, line in enumerate(lines) if not line.finished]
    probes = run.copy([lines[i] for i in going])
    for _ in range(steps):
        run.advance([probe for probe in probes if not probe.finished], greedy, report=False)
    if going:
        scores[going] = run.aggregate_scores(probes)
    run.free(probes)
    return scores
