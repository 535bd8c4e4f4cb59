"""Particle filtering: N partial solutions advanced a step at a time and resampled by reward.

Puri et al. (2025), "A Probabilistic Inference Approach to Inference-Time Scaling of LLMs using
Particle-Based Monte Carlo Methods": a solution is a path through a state-space model whose
emissions the PRM scores, and the particles are a sample of its posterior. Each iteration every
unfinished particle writes one step; the PRM scores it; the particles' weights are the softmax
of their aggregate scores over ``resample_temperature``; and N particles are drawn again, with
replacement, from those weights. Finished particles stay in the population, with their final
scores, and are drawn like the others.

Here a draw is a fork: a particle drawn k times continues as its own sequence and k - 1 forks
that share its whole past in the KV cache (and its PRM path), one drawn zero times is freed.
Nothing is copied or prefilled again.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ttscale.search.common import Inputs
from ttscale.search.fork import by_problem, softmax, weight_score
from ttscale.search.registry import Options, option, strategy
from ttscale.search.result import SearchResult
from ttscale.search.run import SearchRun, run_waves


@dataclass(frozen=True)
class ParticleOptions(Options):
    resample_temperature: float = option(
        1.0, "Temperature of the softmax that turns the particles' scores into resampling\n"
        "weights: lower follows the PRM more greedily.", kind="float", low=0.0, low_open=True,
        metavar="T")
    max_iterations: int = option(40, "Steps searched at most (then every unfinished particle is\n"
                                 "decoded to its end).", metavar="I")


@strategy(ParticleOptions, needs_verifier=True,
          budget="Particles per problem (the number of candidates returned).")
def particle_filtering(inputs: Inputs, n: int, options: ParticleOptions) -> list[SearchResult]:
    """Sample ``n`` particles per problem and resample them by PRM score after every step.

    The search of Puri et al. (2025); see :mod:`ttscale.search.particle_filtering`. Resampling
    is multinomial, seeded by (seed, the problem's id, the iteration), so a problem's result
    does not depend on the problems searched with it. A problem stops when all its particles
    have finished; after ``max_iterations`` its unfinished ones are decoded to their end.
    The answer is chosen among the final population as ``select`` says (by default a vote
    weighted by the particles' scores; a particle drawn twice votes twice, as a sample of the
    posterior should).

    Returns:
    Each has ``n`` candidates, the final particles in problem order (duplicates included);
    ``extra["resamples"]`` counts the resampling rounds of the problem.
    """
    return run_waves(inputs, n, lambda run: _filter(run, n, options))


def _filter(run: SearchRun, n: int, options: ParticleOptions) -> list[SearchResult]:
    sampling, seed, ids = run.inputs.sampling, run.inputs.sampling.seed, run.inputs.problem_ids
    lines = run.start(n)
    resamples = {p: 0 for p in run.wave}
    for iteration in range(options.max_iterations):
        run.advance([line for line in lines if not line.finished], sampling)
        if all(line.finished for line in lines) or iteration == options.max_iterations - 1:
            break
        counts: list[int] = []
        for p, group in by_problem(lines):
            if all(line.finished for line in group):
                counts += [1] * len(group)  # this problem is done: its particles stay as they are
                continue
            weights = softmax([weight_score(line) for line in group],
                              options.resample_temperature)
            rng = np.random.default_rng([seed, ids[p], iteration])
            counts += rng.multinomial(len(group), weights).tolist()
            resamples[p] += 1
        # each particle its own group: kept, and forked into as many as it was drawn (0 frees it)
        lines = run.select(lines, [0.0] * len(lines), [1] * len(lines), 1, counts)
    going = [line for line in lines if not line.finished]
    run.advance(going, sampling, whole=True)
    results = []
    for p in run.wave:
        mine = [line for line in lines if line.problem == p]
        results.append(run.result(p, [run.candidate(line) for line in mine],
                                  {"resamples": resamples[p]}))
    run.free(lines)
    return results
