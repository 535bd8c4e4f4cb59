"""Monte Carlo tree search over solution steps, with the PRM as the value and the policy as the
prior, the tree kept in the KV cache.

Step-level MCTS in the AlphaZero form (PUCT; Silver et al. 2017), as the LLM-reasoning work
that followed uses it (e.g. Zhang et al. 2024, "ReST-MCTS*"; Wan et al. 2024, "AlphaZero-like
tree-search can guide large language model decoding and training"). A node is a partial
solution ending at a step delimiter. Each simulation walks from the root to the node it expands,
at each node taking the unfinished child that maximises ``Q + exploration * P * sqrt(N_parent)
/ (1 + N_child)``; it stops at a node with no unfinished child (a leaf, or a node all of whose
children have finished, which is expanded again: the policy samples, so it may find another
way), or at a node that progressive widening lets grow (its expansions fewer than ``widening *
sqrt(N)``: more of its steps are sampled before its first ones are searched out). That node is
expanded by sampling ``branching`` next steps; each new child is valued by the PRM (the
aggregate of its step scores) and that value is backed up along the path. ``P`` is the softmax,
over siblings, of the policy's log-probability of each child's step. A child that ends its
solution is a candidate and is never expanded. A sampled step that a sibling already wrote is
not a new child but one more visit of that sibling, so a confident policy's tree does not fill
with copies; an expansion whose every sample repeats a finished child closes its node (the
policy has no other way on from there), and a node whose children are all closed is closed in
turn, so the search never spends its tokens re-sampling one finished path.

The simulation's outcome: after each expansion the best new unfinished child (by value; the
``rollouts`` best) is completed to its end by the policy on a fork outside the tree, as classic
MCTS plays a simulation out. The finished rollout is a candidate, and its aggregate score, the
value of a whole solution, is backed up through the child as one more visit. Without rollouts
a search of ``n`` samples' tokens finishes only the few paths its tree reaches the end of (about
three a problem on the toy task at ``n = 16``), and its final vote has little to choose among.

Here every unfinished node keeps its sequence and its children are forks of it: the tree's
shared past is one set of KV blocks, and an expansion decodes and scores only the new steps
(a rollout's fork shares the child's blocks and is freed when it has been scored). Simulations
of all problems of a wave are expanded in one batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ttscale.search.common import Inputs
from ttscale.search.fork import softmax, weight_score
from ttscale.search.registry import Options, option, strategy
from ttscale.search.result import Candidate, SearchResult
from ttscale.search.run import Line, SearchRun, run_waves


@dataclass(frozen=True)
class MCTSOptions(Options):
    branching: int = option(4, "Steps sampled when a node is expanded (its children).",
                            metavar="K")
    exploration: float = option(1.0, "The PUCT constant: higher explores less-visited steps "
                                "more.", kind="float", low=0.0, metavar="C")
    widening: float = option(0.5, "Progressive widening: a node with unfinished children is "
                             "expanded again (``branching`` more samples)\nwhile its expansions "
                             "are fewer than ``widening * sqrt(visits)`` (0: only once all its\n"
                             "children finished).", kind="float", low=0.0, metavar="W")
    rollouts: int = option(1, "Each expansion completes its ``rollouts`` best new unfinished "
                           "children (by value) to their end\nwith the policy, on forks outside "
                           "the tree: each finished rollout is a candidate and its\nvalue is "
                           "backed up through the child.", low=0, metavar="R")
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
    """A partial solution in the tree; ``line`` holds its sequence (forked at each expansion)
    until it finishes."""

    line: Line | None
    parent: Node | None
    logprob: float = 0.0  # of its step, under the policy
    prior: float = 1.0
    key: tuple = ()  # its tokens and whether it finished: siblings with the same are one
    visits: int = 0
    expansions: int = 0
    value_sum: float = 0.0
    children: list[Node] = field(default_factory=list)
    closed: bool = False  # nothing left to search below: finished, or exhausted
    tree_id: int | None = 0  # its node in the result's tree

    @property
    def value(self) -> float:
        return self.value_sum / self.visits if self.visits else 0.0


@strategy(MCTSOptions, needs_verifier=True,
          budget="Samples' worth of generated tokens per problem (see ``max_generated_tokens``).")
def mcts(inputs: Inputs, n: int, options: MCTSOptions) -> list[SearchResult]:
    """Grow a tree of steps by Monte Carlo tree search, valued by the verifier, until ``n``
    samples' worth of tokens is spent.

    See :mod:`ttscale.search.mcts`. A problem stops when one more expansion, at its mean cost
    so far, would take its tokens past ``max_generated_tokens`` (default ``n`` times the mean
    length of the solutions it has finished, so that it spends what best-of-``n`` would), at
    ``8 * n`` expansions, when its root is closed (every path searched out), or when its tree's
    live sequences and rollouts would pass ``branching * n`` (the KV the search plans for). If
    no solution has finished by then, the best open node (by value) is decoded to its end. The
    answer is chosen among the finished solutions (the tree's and the rollouts') as ``select``
    says (by default a vote weighted by their aggregate scores).

    Returns:
    Candidates are the finished solutions in the order they finished (a rollout's ``node`` is
    the tree node it started from); ``tree`` holds every node with its ``visits``, mean
    ``value`` and ``prior``; ``extra`` holds ``expansions`` and ``rollouts``.
    """
    # the tree: at most branching * n live sequences per problem
    return run_waves(inputs, options.branching * n, lambda run: _search(run, n, options),
                     tree=True)


def _search(run: SearchRun, n: int, options: MCTSOptions) -> list[SearchResult]:
    sampling, k = run.inputs.sampling, options.branching
    roots = {line.problem: Node(line, None) for line in run.start(1)}
    candidates: dict[int, list[Candidate]] = {p: [] for p in run.wave}
    lengths: dict[int, list[int]] = {p: [] for p in run.wave}
    expansions = {p: 0 for p in run.wave}
    rollouts = {p: 0 for p in run.wave}
    live = {p: 1 for p in run.wave}  # sequences the problem's tree holds

    def spent(p: int) -> bool:
        tokens = run.costs[p].generated_tokens
        if options.max_generated_tokens is not None:
            budget = options.max_generated_tokens
        else:
            budget = n * sum(lengths[p]) / len(lengths[p]) if lengths[p] else math.inf
        # stop where one more expansion (at this problem's mean cost so far) would pass it
        step = tokens / expansions[p] if expansions[p] else 0.0
        return (tokens + step > budget or expansions[p] >= 8 * n
                or live[p] + k + options.rollouts > k * n)

    while True:
        nodes = [_select(roots[p], options.exploration, options.widening) for p in run.wave
                 if not spent(p) and not roots[p].closed]
        if not nodes:
            break
        for node in nodes:
            node.expansions += 1
            expansions[node.line.problem] += 1
            live[node.line.problem] += k
        # each node's sequence, kept (to be expanded again later), and k forks of it
        lines = run.select([node.line for node in nodes], [0.0] * len(nodes),
                           [1] * len(nodes), 1, k + 1)
        groups = [lines[i * (k + 1) : (i + 1) * (k + 1)] for i in range(len(nodes))]
        new = [line for group in groups for line in group[1:]]
        starts = [line.seq.generated for line in new]
        run.advance(new, sampling)
        steps = iter(zip(new, starts, strict=True))
        before_children = [len(node.children) for node in nodes]
        for node, group, before in zip(nodes, groups, before_children, strict=True):
            node.line = group[0]
            for _ in range(k):
                line, start = next(steps)
                _add_child(run, node, line, sum(line.seq.logprobs[start:]), candidates, lengths,
                           live)
            _set_priors(node)
            if len(node.children) == before and all(c.closed for c in node.children):
                # exhausted: every sample repeated a finished child, so the policy has no other
                # way on from here; the node is closed and its sequence freed
                run.free([node.line])
                live[node.line.problem] -= 1
                node.line, node.closed = None, True
        if options.rollouts:
            _rollout(run, nodes, before_children, options.rollouts, candidates, lengths,
                     rollouts)
    for p in run.wave:  # nothing finished: the best open node, to its end
        if not candidates[p]:
            best = max(_open(roots[p]), key=lambda node: node.value, default=None)
            if best is not None:
                run.advance([best.line], sampling, whole=True)
                candidates[p].append(run.candidate(best.line))
    run.free([node.line for p in run.wave for node in _open(roots[p])])
    results = []
    for p in run.wave:
        _record(run.trees[p], roots[p])
        results.append(run.result(p, candidates[p], {"expansions": expansions[p],
                                                     "rollouts": rollouts[p]}))
    return results


def _add_child(run: SearchRun, node: Node, line: Line, logprob: float, candidates, lengths,
               live) -> None:
    """A sampled step below ``node``: a new child valued by the verifier, or, when a sibling
    already wrote the same tokens, one more visit of that sibling (the copy is freed)."""
    p, key = line.problem, (tuple(line.seq.output_ids), line.finished)
    value = weight_score(line)
    same = next((c for c in node.children if c.key == key), None)
    if same is not None:
        run.free([line])
        live[p] -= 1
        _backup(same, value)
        return
    # (a child that wrote no step, an immediate end, has no tree node of its own)
    child = Node(line, node, logprob=logprob, key=key,
                 tree_id=line.node if line.node != node.tree_id else None)
    node.children.append(child)
    _backup(child, value)
    if line.finished:
        candidates[p].append(run.candidate(line))
        lengths[p].append(len(line.seq.output_ids))
        run.free([line])
        live[p] -= 1
        child.line, child.closed = None, True


def _rollout(run: SearchRun, nodes: list[Node], before: list[int], r: int, candidates,
             lengths, counts) -> None:
    """Complete each expanded node's ``r`` best new unfinished children (by value) to their
    end on forks outside the tree; each finished completion is a candidate, and its aggregate is
    backed up through its child (one more visit: a simulation's outcome)."""
    chosen = []
    for node, start in zip(nodes, before, strict=True):
        fresh = [c for c in node.children[start:] if not c.closed]
        chosen += sorted(fresh, key=lambda c: -c.value)[:r]
    if not chosen:
        return
    lines = run.copy([c.line for c in chosen])
    run.advance(lines, run.inputs.sampling, whole=True)
    for child, line in zip(chosen, lines, strict=True):
        counts[line.problem] += 1
        if line.finished:
            candidates[line.problem].append(run.candidate(line))
            lengths[line.problem].append(len(line.seq.output_ids))
        _backup(child, weight_score(line))
    run.free(lines)


def _set_priors(node: Node) -> None:
    """Each child's prior: the softmax of its step's log-probability over its siblings."""
    priors = softmax([c.logprob for c in node.children], 1.0)
    for child, prior in zip(node.children, priors, strict=True):
        child.prior = float(prior)


def _select(root: Node, exploration: float, widening: float = 0.0) -> Node:
    """The node a simulation expands: PUCT at each node over its unfinished children, down to
    a node with none (a leaf, or a node whose children all finished: it is expanded again)."""
    node = root
    while True:
        open_children = [c for c in node.children if not c.closed]
        if not open_children or node.expansions < widening * math.sqrt(node.visits):
            return node
        scale = exploration * math.sqrt(node.visits)
        node = max(open_children, key=lambda c: c.value + scale * c.prior / (1 + c.visits))


def _backup(node: Node | None, value: float) -> None:
    while node is not None:
        node.visits += 1
        node.value_sum += value
        node = node.parent


def _open(root: Node) -> list[Node]:
    """The nodes under ``root`` that hold a live sequence (every unfinished one)."""
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

