"""Best-of-N with early rejection: partial samples judged as they grow, the worst dropped."""

from __future__ import annotations

import math
from collections.abc import Sequence

from ttscale._checks import check_real
from ttscale.sampling_params import SamplingParams
from ttscale.search.common import check_count, prepare, run_waves, with_common_docs
from ttscale.search.fork import consecutive_groups
from ttscale.search.prompts import PromptFn
from ttscale.search.result import SearchResult
from ttscale.search.run import Line, SearchRun
from ttscale.verifiers.base import Verifier


@with_common_docs
def rejection_best_of_n(
    llm,
    problems: Sequence[str],
    n: int,
    verifier: Verifier | None = None,
    sampling: SamplingParams | None = None,
    *,
    check_every: int = 64,
    reject_fraction: float = 0.5,
    select: str | None = None,
    agg: str = "last",
    seed: int | None = None,
    references: Sequence[str | None] | None = None,
    system_prompt: str | None = None,
    prompt_fn: PromptFn | None = None,
    step_delimiter: str = "\n\n",
    extract=None,
    equal=None,
    problem_ids: Sequence[int] | None = None,
    progress: bool = True,
) -> list[SearchResult]:
    """Best-of-N whose partial samples are scored every ``check_every`` tokens, the lowest
        ``reject_fraction`` of them dropped and their KV freed at once.

        At each checkpoint a sample's score is the aggregate of the steps it has completed so far
        (text closed by ``step_delimiter``; the step being written is not judged until it ends).
        Of each problem's unfinished samples that have a score, the ``floor(reject_fraction * k)``
        lowest (``k`` of them) are dropped; a sample with no completed step yet is kept, having
        nothing to be judged by (so an outcome verifier, silent before the last step, drops
        nothing). Survivors continue exactly as they would have: with ``reject_fraction=0`` the
        result is that of :func:`ttscale.best_of_n` with the same seed.

        Parameters
        ----------
    {head}
        n : int
            Samples per problem at the start.
    {tail}
        check_every : int
            Tokens decoded between checkpoints.
        reject_fraction : float
            Fraction of the judged unfinished samples dropped at each checkpoint, in [0, 1).

        Returns
        -------
    {returns}
            Candidates are the samples that finished, in sample order; ``extra["dropped"]`` counts
            the others.
    """
    n = check_count("n", n)  # an int from here on (a numpy integer passes too)
    inputs = prepare(
        "rejection_best_of_n",
        llm,
        problems,
        n,
        verifier,
        sampling,
        select=select,
        agg=agg,
        seed=seed,
        references=references,
        system_prompt=system_prompt,
        prompt_fn=prompt_fn,
        step_delimiter=step_delimiter,
        extract=extract,
        equal=equal,
        problem_ids=problem_ids,
        needs_verifier=True,
    )
    check_every = check_count("check_every", check_every)
    reject_fraction = check_real("reject_fraction", reject_fraction, low=0, high=1, high_open=True)

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
            scores = [line.score(run.agg) for line in lines]
            _, sizes = consecutive_groups([line.problem for line in lines])
            keep, start = [], 0
            for size in sizes:
                judged = sum(s is not None for s in scores[start : start + size])
                keep.append(size - math.floor(reject_fraction * judged))
                start += size
            ranked = [math.inf if s is None else s for s in scores]  # unjudged samples stay
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

    return run_waves(inputs, n, search, progress=progress)
