"""Best-of-N: N independent samples per problem, then one answer chosen among them."""

from __future__ import annotations

from ttscale.search.common import Inputs
from ttscale.search.registry import Options, strategy
from ttscale.search.result import SearchResult
from ttscale.search.run import SearchRun, run_waves


@strategy(Options, budget="Samples per problem.", menu=True)
def best_of_n(inputs: Inputs, n: int, options: Options) -> list[SearchResult]:
    """Sample ``n`` solutions per problem and choose an answer among them.

    The prompt is prefilled once per problem and its ``n`` samples share its KV. With a
    verifier, each sample's steps are scored incrementally (one root path per problem, forked
    per sample, one verifier call per step position across all samples), and ``select`` picks:
    ``"best"`` the highest aggregate, ``"weighted"`` the answer whose samples' aggregates sum
    highest, ``"majority"`` the most frequent answer (the default without a verifier).

    Returns:
    Each has ``n`` candidates, in sample order.
    """

    def search(run: SearchRun) -> list[SearchResult]:
        lines = run.start(n)
        run.advance(lines, inputs.sampling, whole=True)
        candidates = {p: [] for p in run.wave}
        for line in lines:
            candidates[line.problem].append(run.candidate(line))
        run.free(lines)
        return [run.result(p, candidates[p]) for p in run.wave]

    return run_waves(inputs, n, search)
