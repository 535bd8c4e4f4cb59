"""REBASE: reward-balanced tree search.

Wu et al. (2024), "Inference Scaling Laws: An Empirical Analysis of Compute-Optimal Inference
for Problem-Solving with Language Models". The tree grows one depth at a time. At each depth the
width still to spend, N minus the solutions already finished, is split among the live nodes in
proportion to the softmax of their scores over ``balance_temperature``: a node with a high
score gets several children, a poor one none. A child is one more sampled step. Finished
solutions leave the tree; the search ends when N have finished, and the answer is a weighted
vote over them.

Here a node's children are forks of its sequence: they share its past in the KV cache and in
the PRM's, and only the new step of each child is decoded and scored.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ttscale.search.common import Inputs
from ttscale.search.fork import by_problem, softmax, weight_score
from ttscale.search.registry import Options, option, strategy
from ttscale.search.result import SearchResult
from ttscale.search.run import Line, SearchRun, run_waves


@dataclass(frozen=True)
class RebaseOptions(Options):
    balance_temperature: float = option(
        0.1, "Temperature of the softmax that splits the width among live nodes: lower gives\n"
        "the best nodes more of it.", kind="float", low=0.0, low_open=True, metavar="T")
    max_iterations: int = option(40, "Depths searched at most (then each live node is decoded\n"
                                 "to its end).", metavar="I")


@strategy(RebaseOptions, needs_verifier=True,
          budget="Solutions finished per problem (the number of candidates returned).")
def rebase(inputs: Inputs, n: int, options: RebaseOptions) -> list[SearchResult]:
    """Grow a tree of steps, splitting the width ``n`` among live nodes by reward, until ``n``
    solutions finish.

    The search of Wu et al. (2024); see :mod:`ttscale.search.rebase`. Depth 1 samples ``n``
    first steps. At each later depth the width left, ``n`` minus the solutions finished so far,
    is split among the live nodes in proportion to ``softmax(score / balance_temperature)``
    (largest remainders, so the children add up to the width exactly), and each child samples
    one more step. After ``max_iterations`` depths the live nodes are decoded to their end.

    Returns:
    Each has exactly ``n`` finished candidates, in the order they finished.
    """
    return run_waves(inputs, n, lambda run: _grow(run, n, options))


def split(width: int, weights: np.ndarray) -> list[int]:
    """``width`` children shared in proportion to ``weights`` (largest remainders)."""
    exact = width * weights
    counts = np.floor(exact).astype(int)
    left = width - int(counts.sum())
    order = sorted(range(len(weights)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[:left]:
        counts[i] += 1
    return counts.tolist()


def _grow(run: SearchRun, n: int, options: RebaseOptions) -> list[SearchResult]:
    sampling = run.inputs.sampling
    lines = run.start(n)
    done: dict[int, list[Line]] = {p: [] for p in run.wave}
    for depth in range(options.max_iterations):
        run.advance(lines, sampling)
        for line in lines:
            if line.finished:
                done[line.problem].append(line)
        run.free([line for line in lines if line.finished])
        lines = [line for line in lines if not line.finished]
        if not lines or depth == options.max_iterations - 1:
            break
        counts: list[int] = []
        for p, group in by_problem(lines):
            scores = [weight_score(line) for line in group]
            counts += split(n - len(done[p]), softmax(scores, options.balance_temperature))
        lines = run.select(lines, [0.0] * len(lines), [1] * len(lines), 1, counts)
    run.advance(lines, sampling, whole=True)  # out of depths: the live nodes to their end
    for line in lines:
        done[line.problem].append(line)
    run.free(lines)
    return [run.result(p, [run.candidate(line) for line in done[p]]) for p in run.wave]
