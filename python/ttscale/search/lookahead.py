"""Lookahead search: beam search whose beams are ranked by where greedy decoding takes them."""

from __future__ import annotations

from collections.abc import Sequence

from ttscale.sampling_params import SamplingParams
from ttscale.search.beam_search import search_beams
from ttscale.search.common import check_beams, check_count, prepare, run_waves, with_common_docs
from ttscale.search.prompts import PromptFn
from ttscale.search.result import SearchResult
from ttscale.verifiers.base import Verifier


@with_common_docs
def lookahead(
    llm,
    problems: Sequence[str],
    n: int,
    verifier: Verifier | None = None,
    sampling: SamplingParams | None = None,
    *,
    lookahead: int = 1,
    beam_width: int = 4,
    max_iterations: int = 40,
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
    """Beam search (:func:`ttscale.beam_search`) whose beams are ranked after ``lookahead``
        greedy steps ahead.

        After each iteration's sampled step, every unfinished beam is forked (its KV shared) and
        the fork decodes ``lookahead`` more steps at temperature 0, each scored by the verifier.
        The beam's rank is the aggregate of its steps and the fork's: with ``agg="last"``, the score
        of the last lookahead step (Snell et al., 2024). The fork is then freed, its text
        discarded; the kept beam continues from where it was before the lookahead, and its own
        steps and scores (and the tree) hold no lookahead step. Rollout tokens count in the cost.
        ``lookahead=0`` is beam search.

        Parameters
        ----------
    {head}
        n : int
            Beams per problem (the number of candidates returned).
    {tail}
        lookahead : int
            Greedy steps scored ahead of each beam.
        beam_width : int
            Children per kept beam; divides ``n``.
        max_iterations : int
            Steps searched at most.

        Returns
        -------
    {returns}
            ``tree`` holds the search tree, as for beam search.
    """
    n = check_count("n", n)  # an int from here on (a numpy integer passes too)
    inputs = prepare(
        "lookahead",
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
    beam_width, max_iterations = check_beams(n, beam_width, max_iterations)
    lookahead = check_count("lookahead", lookahead, minimum=0)
    # Each beam's probe holds its own sequence while it looks ahead: twice the sequences.
    return run_waves(
        inputs,
        2 * n,
        lambda run: search_beams(run, n, beam_width, max_iterations, lookahead),
        tree=True,
        progress=progress,
    )
