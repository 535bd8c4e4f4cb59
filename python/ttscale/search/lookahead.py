"""Lookahead search: beam search whose beams are ranked by where greedy decoding takes them."""

from __future__ import annotations

from dataclasses import dataclass

from ttscale.search.beam_search import BeamOptions, search_beams
from ttscale.search.common import Inputs
from ttscale.search.registry import option, strategy
from ttscale.search.result import SearchResult
from ttscale.search.run import run_waves


@dataclass(frozen=True)
class LookaheadOptions(BeamOptions):
    lookahead: int = option(1, "Greedy steps scored ahead of each beam.", low=0, metavar="K")


@strategy(LookaheadOptions, needs_verifier=True, menu=True,
          budget="Beams per problem (the number of candidates returned).")
def lookahead(inputs: Inputs, n: int, options: LookaheadOptions) -> list[SearchResult]:
    """Beam search (:func:`ttscale.beam_search`) whose beams are ranked after ``lookahead``
    greedy steps ahead.

    After each iteration's sampled step, every unfinished beam is forked (its KV shared) and
    the fork decodes ``lookahead`` more steps at temperature 0, each scored by the verifier.
    The beam's rank is the aggregate of its steps and the fork's: with ``agg="last"``, the score
    of the last lookahead step (Snell et al., 2024). The fork is then freed, its text
    discarded; the kept beam continues from where it was before the lookahead, and its own
    steps and scores (and the tree) hold no lookahead step. Rollout tokens count in the cost.
    ``lookahead=0`` is beam search.

    Returns:
    ``tree`` holds the search tree, as for beam search.
    """
    # Each beam's probe holds its own sequence while it looks ahead: twice the sequences.
    return run_waves(
        inputs,
        2 * n,
        lambda run: search_beams(run, n, options.beam_width, options.max_iterations,
                                 options.lookahead),
        tree=True,
    )
