"""Every search strategy end to end on a tiny random policy: structure, determinism, costs,
answers under a rule verifier, and the beams a verifier prefers."""

from __future__ import annotations

import json

import pytest
import torch
import ttscale
from tiny_policy import save_tiny_policy
from ttscale.search import fork
from ttscale.search.compute_optimal import ComputeOptimalTable, fit_compute_optimal
from ttscale.search.line import completed_steps
from ttscale.search.result import SearchResult
from ttscale.verifiers.base import Verifier

N = 4
SAMPLING = ttscale.SamplingParams(temperature=1.0, max_tokens=20)
PROBLEMS = ["Q: 1+2\n", "Q: (3*4)-5\n", "Q: 7+8\n"]
STRATEGIES = {
    "best_of_n": (ttscale.best_of_n, {}),
    "beam_search": (ttscale.beam_search, dict(beam_width=2, max_iterations=6)),
    "dvts": (ttscale.dvts, dict(beam_width=2, max_iterations=6)),
    "lookahead": (ttscale.lookahead, dict(beam_width=2, max_iterations=6, lookahead=1)),
    "rejection_best_of_n": (ttscale.rejection_best_of_n, dict(check_every=4, reject_fraction=0.5)),
    "particle_filtering": (ttscale.particle_filtering, dict(max_iterations=6)),
    "rebase": (ttscale.rebase, dict(max_iterations=6)),
    "mcts": (ttscale.mcts, dict(branching=4, max_generated_tokens=200)),
}
CANDIDATES_PER_PROBLEM = {"best_of_n": N, "beam_search": N, "dvts": N // 2, "lookahead": N,
                          "particle_filtering": N, "rebase": N}


def last_digit(text: str) -> str | None:
    return next((c for c in reversed(text) if c.isdigit()), None)


def same(a: str, b: str) -> bool:
    return a == b


class RecordingVerifier(Verifier):
    """Scores a step by ``rule(step, final)``, counts a token per character, and tracks live paths
    (so a leak or a double free shows)."""

    def __init__(self, rule):
        self.rule = rule
        self.scored_tokens = 0
        self.live: set[int] = set()
        self.paths: dict[int, list[str]] = {}

    def _new(self, steps: list[str]) -> int:
        path = len(self.paths)
        self.paths[path] = steps
        self.live.add(path)
        return path

    def start(self, problems, references=None):
        self.scored_tokens += sum(len(p) for p in problems)
        return [self._new([]) for _ in problems]

    def fork(self, paths, parents):
        assert all(p in self.live for p in paths)
        return [self._new(list(self.paths[paths[i]])) for i in parents]

    def score(self, paths, steps, final):
        scores = []
        for path, step, last in zip(paths, steps, final, strict=True):
            assert path in self.live and step.strip() == step and step
            self.paths[path].append(step)
            self.scored_tokens += len(step) + 1
            scores.append(self.rule(step, last))
        return scores

    def free(self, paths):
        for path in paths:
            self.live.remove(path)


def prefers(char: str) -> RecordingVerifier:
    return RecordingVerifier(lambda step, final: 1.0 if char in step else 0.0)


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    torch.set_num_threads(1)
    directory = save_tiny_policy(tmp_path_factory.mktemp("tiny_policy"))
    return ttscale.LLM(directory, kv_budget_bytes=8 << 20, block_size=8)


def run(name, llm, verifier, *, problems=PROBLEMS, seed=0, **overrides):
    strategy, options = STRATEGIES[name]
    kwargs = dict(step_delimiter="\n", extract=last_digit, equal=same, progress=False, seed=seed)
    return strategy(llm, problems, N, verifier, SAMPLING, **{**options, **kwargs, **overrides})


def summary(results: list[SearchResult]):
    return [(r.answer, [(c.text, c.step_scores) for c in r.candidates]) for r in results]


@pytest.mark.parametrize("name", sorted(CANDIDATES_PER_PROBLEM))
def test_candidates_are_finished_and_counted_per_strategy(llm, name):
    results = run(name, llm, prefers("a"))
    assert [r.problem for r in results] == PROBLEMS
    for r in results:
        assert len(r.candidates) == CANDIDATES_PER_PROBLEM[name]
        assert all(c.finished for c in r.candidates)
        for c in r.candidates:
            assert c.steps == completed_steps(c.text, "\n", True)
            assert len(c.step_scores) == len(c.steps)


def test_rejection_returns_the_finished_survivors_and_counts_the_dropped(llm):
    for r in run("rejection_best_of_n", llm, prefers("a")):
        assert all(c.finished for c in r.candidates)
        assert len(r.candidates) + r.extra["dropped"] == N
    assert any(r.extra["dropped"] for r in run("rejection_best_of_n", llm, prefers("a")))


def test_rejection_without_dropping_is_best_of_n(llm):
    rejection = run("rejection_best_of_n", llm, prefers("a"), reject_fraction=0.0)
    assert summary(rejection) == summary(run("best_of_n", llm, prefers("a")))


@pytest.mark.parametrize("max_iterations", [1, 2, 30])
def test_beam_search_returns_exactly_n_finished_beams(llm, max_iterations):
    for r in run("beam_search", llm, prefers("a"), max_iterations=max_iterations):
        assert len(r.candidates) == N and all(c.finished for c in r.candidates)


def test_lookahead_zero_is_beam_search(llm):
    plain = run("beam_search", llm, prefers("a"))
    assert summary(run("lookahead", llm, prefers("a"), lookahead=0)) == summary(plain)


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_same_seed_same_result(llm, name):
    first = run(name, llm, prefers("a"), seed=3)
    assert summary(run(name, llm, prefers("a"), seed=3)) == summary(first)
    assert summary(run(name, llm, prefers("a"), seed=4)) != summary(first)


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_costs_add_up_to_the_engine_and_verifier_counters(llm, name):
    engine, verifier = llm.engine, prefers("a")
    generated, prefilled = engine.generated_tokens, engine.prefilled_tokens
    results = run(name, llm, verifier)
    assert sum(r.cost.generated_tokens for r in results) == engine.generated_tokens - generated
    assert sum(r.cost.prefilled_tokens for r in results) == engine.prefilled_tokens - prefilled
    assert sum(r.cost.scored_tokens for r in results) == verifier.scored_tokens
    assert all(r.cost.generated_tokens > 0 and r.cost.seconds > 0 for r in results)


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_search_frees_every_block_and_verifier_path(llm, name):
    verifier = prefers("a")
    run(name, llm, verifier)
    assert engine_is_empty(llm.engine)
    assert not verifier.live


def engine_is_empty(engine) -> bool:
    return engine.pool.refresh() == engine.pool.num_blocks


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_rule_verifier_answer_is_right_when_a_candidate_is(llm, name):
    problems = PROBLEMS * 3
    references = list("123456789")
    verifier = ttscale.RuleVerifier(extract=last_digit, equal=same)
    results = run(name, llm, verifier, problems=problems, references=references)
    hits = 0
    for r, ref in zip(results, references, strict=True):
        if any(c.answer == ref for c in r.candidates):
            hits += 1
            assert r.answer == ref
    assert hits  # the rule was put to the test


def test_last_step_is_scored_as_final_when_eos_follows_its_delimiter(llm):
    """A step is scored when its delimiter ends it; if end-of-sequence comes next, the step turns
    out to be the last and is scored again as final. (This policy often ends right after ")".)"""
    verifier = RecordingVerifier(lambda step, final: 1.0 if final else 0.5)
    results = run("beam_search", llm, verifier, problems=PROBLEMS * 3, step_delimiter=")")
    candidates = [c for r in results for c in r.candidates if c.steps]
    assert all(c.step_scores == [0.5] * (len(c.steps) - 1) + [1.0] for c in candidates)
    eos = llm.tokenizer.eos_token_id
    assert any(c.text.endswith(")") and c.token_ids[-1] == eos for c in candidates)


def test_beam_search_keeps_the_beams_the_verifier_prefers(llm, monkeypatch):
    """Every selection keeps, in each problem, beams whose last step has the preferred character
    before any whose last step lacks it."""
    calls = []
    original = fork.select_and_fork

    def spy(engine, seqs, scores, group_sizes, keep, children):
        steps = [completed_steps(engine.text(s), "\n", False) for s in seqs]
        preferred = [bool(s) and "a" in s[-1] for s in steps]
        forked = original(engine, seqs, scores, group_sizes, keep, children)
        calls.append((preferred, list(group_sizes), set(forked.parents)))
        return forked

    monkeypatch.setattr(fork, "select_and_fork", spy)
    run("beam_search", llm, prefers("a"), problems=PROBLEMS * 2, max_iterations=8)
    contested = 0
    for preferred, sizes, kept in calls:
        start = 0
        for size in sizes:
            group = range(start, start + size)
            kept_flags = [preferred[i] for i in group if i in kept]
            dropped_flags = [preferred[i] for i in group if i not in kept]
            if kept_flags and dropped_flags:
                assert min(kept_flags) >= max(dropped_flags)
                contested += len(set(kept_flags + dropped_flags)) == 2
            start += size
    assert contested  # some selection had preferred and other beams to choose between


@pytest.mark.parametrize("name", ["beam_search", "dvts", "lookahead"])
def test_tree_holds_each_candidates_steps_along_its_path(llm, name):
    for r in run(name, llm, prefers("a")):
        for c in r.candidates:
            path, node = [], c.node
            while r.tree[node].parent is not None:
                path.append(r.tree[node])
                node = r.tree[node].parent
            assert [n.step for n in reversed(path)] == c.steps
            assert [n.score for n in reversed(path)] == c.step_scores
            assert [n.depth for n in reversed(path)] == list(range(1, len(c.steps) + 1))


@pytest.mark.parametrize("name", ["beam_search", "dvts"])
def test_result_with_tree_round_trips_through_json(llm, name):
    for r in run(name, llm, prefers("a")):
        assert SearchResult.from_dict(json.loads(json.dumps(r.to_dict()))) == r


def test_compute_optimal_runs_each_problem_with_its_bins_choice(llm):
    common = dict(step_delimiter="\n", extract=last_digit, equal=same, progress=False)
    verifier = ttscale.RuleVerifier(extract=last_digit, equal=same)
    results = ttscale.compute_optimal(
        llm,
        PROBLEMS,
        ["3", "7", "5"],
        PROBLEMS[:2],
        4,
        verifier,
        SAMPLING,
        num_bins=2,
        pilot_n=2,
        beam_width=2,
        max_iterations=4,
        references=["3", "7"],
        **common,
    )
    pilot = ttscale.best_of_n(
        llm, PROBLEMS[:2], 2, verifier, SAMPLING, references=["3", "7"], **common
    )
    assert len(results) == 2
    for r, alone in zip(results, pilot, strict=True):
        info = r.extra["compute_optimal"]
        table = info["table"]
        assert (info["strategy"], info["n"]) == tuple(table["choices"][info["bin"]])
        assert len(table["choices"]) == 2 and sum(table["counts"]) == 3
        assert set(table["accuracy"]) == {
            "best_of_n:1",
            "best_of_n:2",
            "best_of_n:4",
            "beam_search:2",
            "beam_search:4",
        }
        assert len(r.candidates) == info["n"] and r.strategy == "compute_optimal"
        assert r.cost.generated_tokens > alone.cost.generated_tokens  # the pilot's and the search's


def test_compute_optimal_reuses_a_fitted_table(llm):
    common = dict(step_delimiter="\n", extract=last_digit, equal=same, progress=False)
    verifier = ttscale.RuleVerifier(extract=last_digit, equal=same)
    table = fit_compute_optimal(
        llm,
        PROBLEMS,
        ["3", "7", "5"],
        2,
        verifier,
        SAMPLING,
        num_bins=2,
        pilot_n=1,
        beam_width=2,
        **common,
    )
    assert ComputeOptimalTable.from_dict(json.loads(json.dumps(table.to_dict()))) == table
    args = (llm, [], [], PROBLEMS[:1], 2, verifier, SAMPLING)
    first = ttscale.compute_optimal(*args, table=table, references=["3"], **common)
    again = ttscale.compute_optimal(*args, table=table, references=["3"], **common)
    assert summary(first) == summary(again)
    assert first[0].extra["compute_optimal"]["table"] == table.to_dict()


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_on_progress_reports_every_step_of_every_problem(llm, name):
    events = []
    results = run(name, llm, prefers("a"), on_progress=events.append)
    for p, result in enumerate(results):
        mine = [e for e in events if e.problem == p]
        assert [e.step for e in mine] == list(range(1, len(mine) + 1))
        tokens = [e.generated_tokens for e in mine]
        assert tokens == sorted(tokens) and 0 < tokens[-1] <= result.cost.generated_tokens
        if name != "lookahead":  # (its probes' tokens, after its last step, count in its cost)
            assert tokens[-1] == result.cost.generated_tokens
        assert mine[-1].finished >= len(result.candidates)
        assert all(0 <= e.live <= N and (e.best_score is None or 0.0 <= e.best_score <= 1.0)
                   for e in mine)
    if name in ("beam_search", "dvts", "lookahead"):
        assert max(e.step for e in events) > 1  # a step-by-step search reports each step


class Stop(Exception):
    pass


@pytest.mark.parametrize("name", ["beam_search", "rejection_best_of_n"])
def test_on_progress_can_stop_a_search_and_every_block_comes_back(llm, name):
    def stop_at_second_step(progress):
        if progress.step == 2:
            raise Stop

    with pytest.raises(Stop):
        run(name, llm, prefers("a"), on_progress=stop_at_second_step)
    assert engine_is_empty(llm.engine)  # (a PRM's own engine is emptied the same way)
    assert run(name, llm, prefers("a"))  # and the engine searches on


def test_on_progress_that_is_not_a_function_is_refused(llm):
    with pytest.raises(ttscale.InvalidArgument) as caught:
        run("best_of_n", llm, prefers("a"), on_progress="print")
    assert caught.value.param == "on_progress"


@pytest.mark.parametrize("name", ["particle_filtering", "rebase"])
def test_resampling_forks_and_never_prefills_again(llm, name, monkeypatch):
    """Every particle drawn (every child of a node) is a fork: the only prefill is each prompt."""
    from ttscale.search.run import SearchRun

    children = []
    select = SearchRun.select

    def spy(self, lines, scores, group_sizes, keep, counts):
        children.append(list(counts))
        return select(self, lines, scores, group_sizes, keep, counts)

    monkeypatch.setattr(SearchRun, "select", spy)
    results = run(name, llm, prefers("a"))
    prompts = [r.cost.prefilled_tokens for r in run("best_of_n", llm, prefers("a"))]
    assert [r.cost.prefilled_tokens for r in results] == prompts
    assert any(max(counts) > 1 for counts in children)  # some particle (node) was drawn twice
    assert engine_is_empty(llm.engine)


def test_a_cold_resampling_keeps_the_particles_the_verifier_prefers(llm):
    """At a low temperature every particle is drawn from the best ones: the final population
    holds the preferred character in (nearly) every candidate's steps."""
    warm = run("particle_filtering", llm, prefers("a"), resample_temperature=100.0)
    cold = run("particle_filtering", llm, prefers("a"), resample_temperature=0.01)
    share = lambda results: sum(any("a" in s for s in c.steps)  # noqa: E731
                                for r in results for c in r.candidates) / (len(results) * N)
    assert share(cold) > share(warm)


def test_rebase_splits_the_width_by_largest_remainder():
    import numpy as np

    from ttscale.search.fork import softmax
    from ttscale.search.rebase import split

    assert split(8, np.array([0.5, 0.25, 0.25])) == [4, 2, 2]
    assert split(5, np.array([0.45, 0.45, 0.1])) == [2, 2, 1]
    weights = softmax([0.9, 0.1, 0.5, 0.5], 0.1)
    for width in range(1, 20):
        counts = split(width, weights)
        assert sum(counts) == width and counts[0] >= max(counts[1:])
    assert np.allclose(softmax([1.0, 1.0], 0.5), [0.5, 0.5])


def test_mcts_tree_holds_its_statistics_and_its_budget(llm):
    results = run("mcts", llm, prefers("a"), max_generated_tokens=60)
    for r in results:
        # an expansion decodes at most branching steps of max_tokens; the budget is checked
        # before each one
        assert r.cost.generated_tokens <= 60 + 2 * SAMPLING.max_tokens
        assert r.candidates and all(c.finished for c in r.candidates) or len(r.candidates) == 1
        nodes = {node.id: node for node in r.tree}
        root = nodes[0]
        assert root.visits >= 1 and root.prior is None
        counted = [node for node in r.tree if node.visits is not None]
        for node in counted:
            children = [c for c in counted if c.parent == node.id]
            if children:  # a node's visits: its own valuation and every one below it (a child
                # that wrote no step, an immediate end, is counted but has no node to show)
                assert node.visits >= sum(c.visits for c in children) + (node.id != 0)
                assert sum(c.prior for c in children) <= 1.0 + 1e-9
                assert 0.0 <= node.value <= 1.0
        assert r.extra["expansions"] >= 1
    assert engine_is_empty(llm.engine)


def test_mcts_refuses_a_tree_without_choices(llm):
    with pytest.raises(ttscale.InvalidArgument) as caught:
        run("mcts", llm, prefers("a"), branching=1)
    assert caught.value.param == "branching"


def test_mcts_closes_a_node_whose_every_sample_repeats_a_finished_child(llm):
    """Greedy sampling writes one path: each node is expanded once, then, once the child below
    has closed, once more (every sample a copy), which closes it; the search stops with the
    root closed, long before the expansion cap (it used to re-expand the last node until then)."""
    greedy = ttscale.SamplingParams(temperature=0.0, max_tokens=20)
    kwargs = dict(step_delimiter="\n", extract=last_digit, equal=same, progress=False, seed=0)
    results = ttscale.mcts(llm, PROBLEMS, N, prefers("a"), greedy, branching=4, rollouts=0,
                           widening=0.0, max_generated_tokens=10**6, **kwargs)
    for r in results:
        path = [node for node in r.tree if node.visits is not None and node.id != 0]
        assert [node.depth for node in path] == list(range(1, len(path) + 1))  # one path
        assert r.extra["expansions"] == 2 * len(path) < 8 * N
        assert len(r.candidates) == 1 and r.candidates[0].finished
        # every sample of every expansion is a backup through the root
        assert r.tree[0].visits == 4 * r.extra["expansions"]
    assert engine_is_empty(llm.engine)


def test_mcts_rollouts_finish_a_solution_per_expansion_and_back_up_its_value(llm):
    results = run("mcts", llm, prefers("a"), rollouts=1)
    plain = run("mcts", llm, prefers("a"), rollouts=0)
    # (an expansion whose new children all finished has nothing to roll out)
    assert sum(r.extra["rollouts"] for r in results) > 0
    for r, p in zip(results, plain, strict=True):
        rolled = r.extra["rollouts"]
        assert rolled <= r.extra["expansions"] and p.extra["rollouts"] == 0
        # the root sees every sampled step's value and every rollout's outcome
        assert r.tree[0].visits == 4 * r.extra["expansions"] + rolled
        assert p.tree[0].visits == 4 * p.extra["expansions"]
        assert len(r.candidates) >= rolled and all(c.finished for c in r.candidates)
    assert engine_is_empty(llm.engine)


def test_mcts_widening_expands_a_node_again_before_its_children_finish(llm):
    # a widening this large re-expands the root at every simulation: the tree stays one level
    # deep; without widening the search goes below the root's children
    wide = run("mcts", llm, prefers("a"), widening=100.0, rollouts=0)
    narrow = run("mcts", llm, prefers("a"), widening=0.0, rollouts=0)
    for r in wide:
        assert {node.depth for node in r.tree if node.visits is not None} == {0, 1}
    assert any(node.depth > 1 and node.visits is not None for r in narrow for node in r.tree)
    assert engine_is_empty(llm.engine)
