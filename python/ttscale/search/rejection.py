"""Best-of-N with early rejection: partial samples judged as they grow, the worst dropped."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ttscale.search.common import Inputs
from ttscale.search.fork import consecutive_groups
from ttscale.search.registry import Options, option, strategy
from ttscale.search.result import SearchResult
from ttscale.search.run import Line, SearchRun, run_waves


@dataclass(frozen=True)
class RejectionOptions(Options):
    check_every: int = option(64, "Tokens decoded between checkpoints.", metavar="R")
    reject_fraction: float = option(
        0.5, "Fraction of the judged unfinished samples dropped at each checkpoint, in [0, 1).",
        kind="float", low=0.0, high=1.0, high_open=True, metavar="A")


@strategy(RejectionOptions, needs_verifier=True, budget="Samples per problem at the start.")
def rejection_best_of_n(inputs: Inputs, n: int, options: RejectionOptions) -> list[SearchResult]:
    """Best-of-N whose partial samples are scored every ``check_every`` tokens, the lowest
    ``reject_fraction`` of them dropped and their KV freed at once.

    At each checkpoint a sample's score is the aggregate of the steps it has completed so far
    (text closed by ``step_delimiter``; the step being written is not judged until it ends).
    Of each problem's unfinished samples that have a score, the ``floor(reject_fraction * k)``
    lowest (``k`` of them) are dropped; a sample with no completed step yet is kept, having
    nothing to be judged by (so an outcome verifier, silent before the last step, drops
    nothing). Survivors continue exactly as they would have: with ``reject_fraction=0`` the
    result is that of :func:`ttscale.best_of_n` with the same seed.

    Returns:
    Candidates are the samples that finished, in sample order; ``extra["dropped"]`` counts
    the others.
    """
    check_every, reject_fraction = options.check_every, options.reject_fraction

    def search(run: SearchRun) -> list[SearchResult]:
        lines = run.start(n)
        done: dict[int, list[Line]] = {p: [] for p in run.wave}
        while lines:
            run.advance(lines, run.inputs.sampling, whole=True, max_new_tokens=check_every)
            finished = [line for line in lines if line.finished]
            for line in finished:
                done[line.problem].append(line)
            run.free(finished)
            lines = [line for line in lines if not line.finished]
            if not lines:
                break
            _, sizes = consecutive_groups([line.problem for line in lines])
            keep, start = [], 0
            for size in sizes:
                judged = sum(line.aggregate is not None for line in lines[start : start + size])
                keep.append(size - math.floor(reject_fraction * judged))
                start += size
            ranked = run.aggregate_scores(lines, missing=math.inf)  # unjudged samples stay
            lines = run.select(lines, ranked, sizes, keep, 1)
        results = []
        for p in run.wave:
            survivors = sorted(done[p], key=lambda line: line.index)
            results.append(
                run.result(
                    p, [run.candidate(line) for line in survivors], {"dropped": n - len(survivors)}
                )
            )
        return results

    return run_waves(inputs, n, search)
