"""Best-of-N: N independent samples per problem, then one answer chosen among them."""

from __future__ import annotations

from collections.abc import Sequence

from ttscale.sampling_params import SamplingParams
from ttscale.search.common import check_count, prepare, run_waves, with_common_docs
from ttscale.search.prompts import PromptFn
from ttscale.search.result import SearchResult
from ttscale.search.run import SearchRun
from ttscale.verifiers.base import Verifier


@with_common_docs
def best_of_n(
    llm,
    problems: Sequence[str],
    n: int,
    verifier: Verifier | None = None,
    sampling: SamplingParams | None = None,
    *,
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
    """Sample ``n`` solutions per problem and choose an answer among them.

        The prompt is prefilled once per problem and its ``n`` samples share its KV. With a
        verifier, each sample's steps are scored incrementally (one root path per problem, forked
        per sample, one verifier call per step position across all samples), and ``select`` picks:
        ``"best"`` the highest aggregate, ``"weighted"`` the answer whose samples' aggregates sum
        highest, ``"majority"`` the most frequent answer (the default without a verifier).

        Parameters
        ----------
    {head}
        n : int
            Samples per problem.
    {tail}

        Returns
        -------
    {returns}
            Each has ``n`` candidates, in sample order.
    """
    n = check_count("n", n)  # an int from here on (a numpy integer passes too)
    inputs = prepare(
        "best_of_n",
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
        needs_verifier=False,
    )

    def search(run: SearchRun) -> list[SearchResult]:
        lines = run.start(n)
        run.advance(lines, inputs.sampling, whole=True)
        candidates = {p: [] for p in run.wave}
        for line in lines:
            candidates[line.problem].append(run.candidate(line))
        run.free(lines)
        return [run.result(p, candidates[p]) for p in run.wave]

    return run_waves(inputs, n, search, progress=progress)
