"""Monte Carlo tree search over solution steps, with the PRM as the value and the policy as the
prior, the tree kept in the KV cache.

Step-level MCTS in the AlphaZero form (PUCT; Silver et al. 2017), as the LLM-reasoning work
that followed uses it (e.g. Zhang et al. 2024, "ReST-MCTS*"; Wan et al. 2024, "AlphaZero-like
tree-search can guide large language model decoding and training"). A node is a partial
solution ending at a step delimiter. Each simulation walks from the root to a leaf, at each node
taking the child that maximises ``Q + exploration * P * sqrt(N_parent) / (1 + N_child)``; the
leaf is expanded by sampling ``branching`` next steps; each new child is valued by the PRM (the
aggregate of its step scores) and that value is backed up along the path. ``P`` is the softmax,
over siblings, of the policy's log-probability of each child's step. A child that ends its
solution is a candidate and is never expanded. Siblings that sampled the same step are one
child (their priors summed), so a confident policy's tree does not fill with copies.

Here a node's children are forks of its sequence (the first child continues it): the tree's
shared past is one set of KV blocks, and an expansion decodes and scores only the new steps.
Simulations of all problems of a wave are expanded in one batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ttscale.search.common import Inputs, run_waves
from ttscale.search.particle_filtering import _score, softmax
from ttscale.search.registry import Options, option, strategy
from ttscale.search.result import Candidate, SearchResult
from ttscale.search.run import Line, SearchRun


@dataclass(frozen=True)
class MCTSOptions(Options):
    branching: int = option(4, "Steps sampled when a node is expanded (its children).",
                            metavar="K")
    exploration: float = option(1.0, "The PUCT constant: higher explores less-visited steps "
                                "more.", kind="float", low=0.0, metavar="C")
    max_generated_tokens: int | None = option(
        None, "The policy tokens a problem may generate (default ``n`` times the mean length of\n"
        "its finished solutions so far: ``n`` samples' worth, as best-of-N would spend).",
        metavar="T")

    def check(self, n: int) -> None:
        if self.branching < 2:
            from ttscale.errors import InvalidArgument

            raise InvalidArgument(f"branching: expected at least 2 children an expansion (a "
                                  f"tree needs a choice), got {self.branching}")


@dataclass(eq=False)
class Node:
    """A partial solution in the tree; ``line`` is live while the node is an unexpanded leaf."""

    line: Line | None
    parent: Node | None
    prior: float = 1.0
    visits: int = 0
    value_sum: float = 0.0
    children: list[Node] = field(default_factory=list)
    closed: bool = False  # finished, or every child closed: nothing left to expand below it
    tree_id: int | None = 0  # its node in the result's tree

    @property
    def value(self) -> float:
        return self.value_sum / self.visits if self.visits else 0.0


@strategy(MCTSOptions, needs_verifier=True,
          budget="Samples' worth of generated tokens per problem (see ``max_generated_tokens``).")
def mcts(inputs: Inputs, n: int, options: MCTSOptions) -> list[SearchResult]:
    """Grow a tree of steps by Monte Carlo tree search, valued by the verifier, until ``n``
    samples' worth of tokens is spent.

    See :mod:`ttscale.search.mcts`. A problem stops when its tokens reach
    ``max_generated_tokens`` (default ``n`` times the mean length of the solutions it has
    finished, so that it spends what best-of-``n`` would), when its tree holds nothing left to
    expand, or at ``8 * n`` expansions. If no solution has finished by then, the best leaf (by
    value) is decoded to its end. The answer is chosen among the finished solutions as ``select``
    says (by default a vote weighted by their aggregate scores).

    Returns:
    Candidates are the finished solutions in the order they finished; ``tree`` holds every
    node with its ``visits``, mean ``value`` and ``prior``; ``extra`` holds ``expansions``.
    """
    # the frontier: at most branching * n live leaves per problem
    return run_waves(inputs, options.branching * n, lambda run: _search(run, n, options),
                     tree=True)


def _search(run: SearchRun, n: int, options: MCTSOptions) -> list[SearchResult]:
    sampling, k = run.inputs.sampling, options.branching
    roots = {line.problem: Node(line, None) for line in run.start(1)}
    candidates: dict[int, list[Candidate]] = {p: [] for p in run.wave}
    lengths: dict[int, list[int]] = {p: [] for p in run.wave}
    expansions = {p: 0 for p in run.wave}
    live_leaves = {p: 1 for p in run.wave}

    def spent(p: int) -> bool:
        tokens = run.costs[p].generated_tokens
        if options.max_generated_tokens is not None:
            budget = options.max_generated_tokens
        else:
            budget = n * sum(lengths[p]) / len(lengths[p]) if lengths[p] else math.inf
        return (tokens >= budget or roots[p].closed or expansions[p] >= 8 * n
                or live_leaves[p] + k - 1 > k * n)

    while True:
        leaves = [_select(roots[p], options.exploration) for p in run.wave if not spent(p)]
        if not leaves:
            break
        for leaf in leaves:
            expansions[leaf.line.problem] += 1
            live_leaves[leaf.line.problem] += k - 1
        lines = run.select([leaf.line for leaf in leaves], [0.0] * len(leaves),
                           [1] * len(leaves), 1, k)
        starts = [line.seq.generated for line in lines]
        run.advance(lines, sampling)
        for i, leaf in enumerate(leaves):
            leaf.line = None  # its sequence lives on in its first child
            group = lines[i * k : (i + 1) * k]
            logprobs = [sum(line.seq.logprobs[start:])
                        for line, start in zip(group, starts[i * k : (i + 1) * k], strict=True)]
            priors = softmax(logprobs, 1.0)
            # siblings that wrote the same step are one child, with their priors summed
            distinct: dict[tuple, tuple[Line, float]] = {}
            for line, prior in zip(group, priors, strict=True):
                key = (tuple(line.seq.output_ids), line.finished)
                kept, mass = distinct.get(key, (line, 0.0))
                distinct[key] = (kept, mass + float(prior))
                if kept is not line:
                    run.free([line])
                    live_leaves[line.problem] -= 1
            for line, prior in distinct.values():
                # (a child that wrote no step, an immediate end, has no tree node of its own)
                child = Node(line, leaf, prior,
                             tree_id=line.node if line.node != leaf.tree_id else None)
                leaf.children.append(child)
                _backup(child, _score(line, run.agg))
                if line.finished:
                    p = line.problem
                    candidates[p].append(run.candidate(line))
                    lengths[p].append(len(line.seq.output_ids))
                    live_leaves[p] -= 1
                    child.line, child.closed = None, True
                    run.free([line])
            _close(leaf)
    for p in run.wave:  # nothing finished: the best leaf, to its end
        if not candidates[p]:
            best = max(_leaves(roots[p]), key=lambda node: node.value, default=None)
            if best is not None:
                run.advance([best.line], sampling, whole=True)
                candidates[p].append(run.candidate(best.line))
    run.free([node.line for p in run.wave for node in _leaves(roots[p])])
    results = []
    for p in run.wave:
        _record(run.trees[p], roots[p])
        results.append(run.result(p, candidates[p], {"expansions": expansions[p]}))
    return results


def _select(root: Node, exploration: float) -> Node:
    """The leaf a simulation reaches: PUCT at each node, skipping closed children."""
    node = root
    while node.children:
        open_children = [c for c in node.children if not c.closed]
        scale = exploration * math.sqrt(node.visits)
        node = max(open_children, key=lambda c: c.value + scale * c.prior / (1 + c.visits))
    return node


def _backup(node: Node | None, value: float) -> None:
    while node is not None:
        node.visits += 1
        node.value_sum += value
        node = node.parent


def _close(node: Node | None) -> None:
    """Mark nodes whose children are all closed, upwards."""
    while node is not None and node.children and all(c.closed for c in node.children):
        node.closed = True
        node = node.parent


def _leaves(root: Node) -> list[Node]:
    """The open leaves under ``root`` that hold a live sequence."""
    out, stack = [], [root]
    while stack:
        node = stack.pop()
        if node.line is not None:
            out.append(node)
        stack.extend(node.children)
    return out


def _record(tree, root: Node) -> None:
    """Copy visits, values and priors onto the result's tree nodes."""
    stack = [root]
    while stack:
        node = stack.pop()
        if node.tree_id is not None:
            entry = tree[node.tree_id]
            entry.visits, entry.value = node.visits, node.value
            entry.prior = None if node.parent is None else node.prior
        stack.extend(node.children)

