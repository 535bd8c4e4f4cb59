"""Diverse verifier tree search: independent greedy subtrees, one candidate from each."""

from __future__ import annotations

from ttscale.search.beam_search import BeamOptions
from ttscale.search.common import Inputs
from ttscale.search.fork import best_per_group, consecutive_groups
from ttscale.search.registry import strategy
from ttscale.search.result import Candidate, SearchResult
from ttscale.search.run import SearchRun, run_waves


@strategy(BeamOptions, needs_verifier=True, menu=True,
          budget="Beams per problem; ``n / beam_width`` candidates are returned.")
def dvts(inputs: Inputs, n: int, options: BeamOptions) -> list[SearchResult]:
    """Split ``n`` beams into ``n / beam_width`` independent subtrees and grow each greedily.

    Iteration 0 samples ``n`` first steps per problem, ``beam_width`` per subtree. Every
    iteration, each subtree's ``beam_width`` beams are extended by one step and scored, and its
    best by aggregate score is kept: if that beam has finished (end-of-sequence or
    ``max_tokens``) it is the subtree's candidate and the subtree stops; otherwise it is forked
    ``beam_width`` times and the others are freed. A subtree still going after
    ``max_iterations`` decodes its kept beam to the end. Subtrees never compete with one
    another, which keeps their candidates diverse (Beeching et al., 2024).

    Returns:
    Each has one finished candidate per subtree, in subtree order; ``tree`` holds every
    subtree under the problem's root.
    """
    beam_width, max_iterations = options.beam_width, options.max_iterations

    def search(run: SearchRun) -> list[SearchResult]:
        sampling = run.inputs.sampling
        lines = run.start(n)
        for line in lines:
            line.group = line.index // beam_width
        chosen: dict[tuple[int, int], Candidate] = {}
        for iteration in range(max_iterations):
            run.advance(lines, sampling)
            # the subtrees' winners on the host, from the aggregates read with the step scores;
            # the device op ranks the same values (the states) and agrees
            aggregates = [line.aggregate for line in lines]
            subtrees, sizes = consecutive_groups([(line.problem, line.group) for line in lines])
            children = []
            for subtree, (best,) in zip(
                subtrees, best_per_group(aggregates, sizes, [1] * len(sizes)), strict=True
            ):
                if lines[best].finished:
                    chosen[subtree] = run.candidate(lines[best])
                    children.append(0)
                else:
                    children.append(1 if iteration == max_iterations - 1 else beam_width)
            lines = run.select(lines, run.aggregate_scores(lines), sizes, 1, children)
            if not lines:
                break
        run.advance(lines, sampling, whole=True)
        for line in lines:
            chosen[(line.problem, line.group)] = run.candidate(line)
        run.free(lines)
        return [run.result(p, [chosen[(p, g)] for g in range(n // beam_width)]) for p in run.wave]

    return run_waves(inputs, n, search, tree=True)
