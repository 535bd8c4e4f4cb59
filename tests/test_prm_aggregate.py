"""Searches rank lines by the running aggregate that the PRM folds on its device
(``ops.prm_step_scores``' state), forked with the lines, never by re-aggregating step score
lists on the host: the state equals the reference aggregation of every line's step scores, for
every ``agg``, through forks and retractions; poisoning the host lists changes no selection."""

from __future__ import annotations

import math
import random

import pytest
import torch
import ttscale
from paged import backend_params
from ttscale import ops, reference
from ttscale.search import select as select_module
from ttscale.search.run import SearchRun
from ttscale.search.select import AGGREGATIONS, aggregate
from ttscale.toy import policy_dir, prm_dir, task
from ttscale.verifiers.base import Verifier, fold_scores

SAMPLING = ttscale.SamplingParams(temperature=1.0, max_tokens=64)
COMMON = dict(step_delimiter="\n", prompt_fn=lambda p: p + "\n", progress=False, seed=3)
BEAMS = {
    "beam_search": (ttscale.beam_search, dict(beam_width=2, max_iterations=5)),
    "dvts": (ttscale.dvts, dict(beam_width=2, max_iterations=5)),
    "lookahead": (ttscale.lookahead, dict(beam_width=2, max_iterations=4, lookahead=1)),
    "rejection_best_of_n": (ttscale.rejection_best_of_n, dict(check_every=8, reject_fraction=0.5)),
}


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def models():
    llm = ttscale.LLM(policy_dir(), device="cpu", kv_budget_bytes=64 << 20)
    prm = ttscale.PRM(prm_dir(), format="math-shepherd", device="cpu", kv_budget_bytes=64 << 20)
    return llm, prm


def problems(count: int = 3) -> list[str]:
    return [f"Q: {p.text}" for p in task.problems("heldout", count, seed=1)]


def reference_scores(step_scores, agg) -> float:
    """What a line ranks by: the reference aggregate of its scored steps, NaN with none."""
    value = aggregate([s for s in step_scores if s is not None], agg)
    return math.nan if value is None else value


def same_float(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


# ------------------------------------------------------------------------------------------------
# The fold itself


@pytest.mark.parametrize("agg", AGGREGATIONS)
def test_host_aggregate_is_the_ops_state_bit_for_bit(agg):
    """select.aggregate (the reference) equals the op's running state, including prod and mean,
    which a float64 product or mean would miss in the last bit."""
    gen = torch.Generator().manual_seed(AGGREGATIONS.index(agg))
    hidden = torch.randn(60, 16, generator=gen)
    seq_ids = torch.randint(0, 6, (60,), generator=gen)
    weight = torch.randn(1, 16, generator=gen)
    scores, state = ops.prm_step_scores(hidden, seq_ids, weight, kind="value", agg=agg, num_seqs=6)
    ref_scores, ref_state = reference.prm_step_scores(hidden, seq_ids, weight, kind="value",
                                                      agg=agg)
    for s in range(6):  # the op's and the plain-torch reference's, each from its own scores
        for got, folded in ((scores, state), (ref_scores, ref_state)):
            steps = got[seq_ids == s].tolist()
            assert folded[s, 1].item() == len(steps)
            assert aggregate(steps, agg) == folded[s, 0].item()


@pytest.mark.parametrize("backend,device", backend_params("prm_step_scores"))
@pytest.mark.parametrize("agg", AGGREGATIONS)
def test_every_backend_folds_the_state_bit_for_bit(backend, device, agg):
    """Several steps of a sequence in one call, then one step a call as a search scores: every
    kernel's state is the float32 step-by-step fold (no tree reduction's rounding)."""
    gen = torch.Generator().manual_seed(10 + AGGREGATIONS.index(agg))
    weight = torch.randn(1, 16, generator=gen).to(device)
    hidden = torch.randn(40, 16, generator=gen).to(device)
    seq_ids = torch.randint(0, 4, (40,), generator=gen).to(device)
    scores, state = ops.prm_step_scores(hidden, seq_ids, weight, kind="value", agg=agg,
                                        num_seqs=4, backend=backend)
    steps = [scores[seq_ids == s].tolist() for s in range(4)]
    for _ in range(5):
        hidden = torch.randn(4, 16, generator=gen).to(device)
        more, state = ops.prm_step_scores(hidden, torch.arange(4, device=device), weight,
                                          kind="value", agg=agg, state=state, backend=backend)
        for s, score in enumerate(more.tolist()):
            steps[s].append(score)
    assert state[:, 0].tolist() == [aggregate(row, agg) for row in steps]
    assert state[:, 1].tolist() == [float(len(row)) for row in steps]


def test_float64_prod_and_mean_differ_from_the_float32_fold_somewhere():
    """Why the spec names float32 step-by-step: a float64 product or mean, rounded once, is a
    different number for some score lists (so the reference above could fail)."""
    rng = random.Random(0)
    lists = [[rng.random() for _ in range(rng.randint(2, 9))] for _ in range(300)]
    lists = [[float(torch.tensor(x, dtype=torch.float32)) for x in steps] for steps in lists]
    for agg, float64 in (("prod", math.prod), ("mean", lambda v: sum(v) / len(v))):
        assert any(aggregate(steps, agg) != float(torch.tensor(float64(steps), dtype=torch.float32))
                   for steps in lists), agg


@pytest.mark.parametrize("agg", AGGREGATIONS)
def test_fold_scores_steps_like_the_op_and_skips_none(agg):
    rng = random.Random(AGGREGATIONS.index(agg))
    rows = [[rng.choice([None, rng.random()]) for _ in range(7)] for _ in range(5)]
    state = ops.prm_empty_state(5, agg)
    for k in range(7):
        state = fold_scores(state, [row[k] for row in rows], agg)
    for row, (value, count) in zip(rows, state.tolist(), strict=True):
        scored = [s for s in row if s is not None]
        assert count == len(scored)
        if scored:
            assert value == aggregate(scored, agg)


@pytest.mark.parametrize("agg", AGGREGATIONS)
def test_aggregate_and_fold_scores_agree_on_any_scores(agg):
    """The two host entry points to the fold, a candidate's list (select.aggregate) and a step
    a row (fold_scores), give the same float32 number on random lists with NaN, infinities,
    zeros, ones and float64 values that round, and lists with no scored step (None, and an
    empty row); both are reference.prm_fold stepped the same way."""
    rng = random.Random(20 + AGGREGATIONS.index(agg))
    odd = [math.nan, math.inf, -math.inf, 0.0, -0.0, 1.0]
    rows = [[rng.choice(odd) if rng.random() < 0.3 else rng.random()
             for _ in range(rng.randint(0, 8))] for _ in range(200)]
    rows[:3] = [[], [math.nan], [math.nan, 0.5]]  # no step; a NaN first step; then a number
    width = max(len(row) for row in rows)
    state = ops.prm_empty_state(len(rows), agg)
    for k in range(width):  # a row's steps one call each, None once it has no more
        state = fold_scores(state, [row[k] if k < len(row) else None for row in rows], agg)
    for row, (value, count) in zip(rows, state.tolist(), strict=True):
        assert count == len(row)
        if row:
            got = aggregate(row, agg)
            assert same_float(got, value), row
            assert value != 0 or math.copysign(1, got) == math.copysign(1, value), row
        else:
            assert aggregate(row, agg) is None
            assert value == reference.PRM_EMPTY_AGGREGATE[agg]


def test_prm_folds_in_the_scoring_op_with_no_extra_read(models, monkeypatch):
    """PRM.score_aggregate returns score() 's scores and the folded state, reading the host no
    more often than score() alone."""
    _, prm = models
    reads = []
    tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: reads.append(1) or tolist(t))
    roots = prm.start(problems(2))
    try:
        plain = prm.fork(roots, [0, 1])
        folded = prm.fork(roots, [0, 1])
        steps, final = ["1+2=3", "4*5=20"], [False, True]
        before = len(reads)
        scores = prm.score(plain, steps, final)
        plain_reads = len(reads) - before
        state = torch.tensor([[0.5, 2.0], [0.0, 0.0]])
        before = len(reads)
        got = prm.score_aggregate(folded, steps, final, state, "prod")
        assert len(reads) - before == plain_reads
        assert got.scores == scores
        assert got.state.tolist() == [[aggregate([0.5, scores[0]], "prod"), 3.0],
                                      [aggregate([scores[1]], "prod"), 1.0]]
        assert got.aggregates == [row[0] for row in got.state.tolist()]
        assert state.tolist() == [[0.5, 2.0], [0.0, 0.0]], "the input state is not written"
    finally:
        prm.free(roots + plain + folded)


def test_orm_leaves_the_state_of_steps_it_does_not_score():
    orm = ttscale.ORM(prm_dir(), format="math-shepherd", device="cpu", kv_budget_bytes=16 << 20)
    roots = orm.start(problems(1))
    paths = orm.fork(roots, [0, 0, 0])
    state = torch.tensor([[0.25, 1.0], [0.75, 2.0], [0.0, 0.0]])
    got = orm.score_aggregate(paths, ["1+2=3", "1+2=3", "answer: 3"], [True, False, True],
                              state, "min")
    assert got.scores[1] is None and got.aggregates[1] is None
    assert got.state[1].tolist() == [0.75, 2.0]
    assert got.state[0].tolist() == [min(0.25, got.scores[0]), 2.0]
    assert got.state[2].tolist() == [got.scores[2], 1.0]
    assert got.aggregates[0] == got.state[0, 0].item()


@pytest.mark.parametrize("agg", AGGREGATIONS)
def test_aggregate_solutions_folds_whole_solutions_as_searches_do(models, agg):
    _, prm = models
    solutions = [["1+2=3", "3*4=12", "answer: 12"], ["5+5=10"], ["2*3=6", "answer: 7"]]
    texts = problems(3)
    scores, aggregates = prm.aggregate_solutions(texts, solutions, agg=agg)
    assert scores == prm.score_solutions(texts, solutions)
    assert aggregates == [aggregate(row, agg) for row in scores]


def test_aggregate_solutions_names_a_bad_agg(models):
    with pytest.raises(ValueError, match="agg"):
        models[1].aggregate_solutions(problems(1), [["1+2=3"]], agg="max")


# ------------------------------------------------------------------------------------------------
# Searches


def spy_selections(monkeypatch) -> list[tuple[list, object, list]]:
    """Record every SearchRun.select: the lines' step score lists and states as they came, the
    scores passed, and the children's states as they left."""
    calls = []
    original = SearchRun.select

    def select(self, lines, scores, *args):
        seen = [(list(line.scores), line.state.clone()) for line in lines]
        children = original(self, lines, scores, *args)
        calls.append((seen, scores, [child.state.clone() for child in children]))
        return children

    monkeypatch.setattr(SearchRun, "select", select)
    return calls


@pytest.mark.parametrize("agg", AGGREGATIONS)
@pytest.mark.parametrize("name", BEAMS)
def test_selection_reads_the_device_state_which_is_the_reference_aggregate(models, monkeypatch,
                                                                         name, agg):
    llm, prm = models
    calls = spy_selections(monkeypatch)
    function, options = BEAMS[name]
    results = function(llm, problems(), 4, prm, SAMPLING, agg=agg, **options, **COMMON)
    assert calls
    forked = 0
    for seen, scores, children in calls:
        assert isinstance(scores, torch.Tensor) and scores.dtype == torch.float32
        for i, (step_scores, state) in enumerate(seen):
            want = reference_scores(step_scores, agg)
            if name == "rejection_best_of_n" and math.isnan(want):
                want = math.inf  # rejection keeps samples it has not judged yet
            if name != "lookahead":  # lookahead ranks by its probes' states
                assert same_float(scores[i].item(), want), (i, step_scores)
            assert state[1].item() == sum(s is not None for s in step_scores)
            if step_scores:
                assert same_float(state[0].item(), reference_scores(step_scores, agg))
        # each child starts from its parent's state, row for row (state[parents])
        rows = {tuple(state.tolist()) for _, state in seen}
        for child in children:
            assert tuple(child.tolist()) in rows
            forked += 1
    assert forked
    for r in results:
        for c in r.candidates:
            assert same_float(math.nan if c.score is None else c.score,
                              reference_scores(c.step_scores, agg))


def test_forked_line_state_is_its_parents_plus_its_new_step(models, monkeypatch):
    """Across two selections: a child's state at the next selection is the parent's state at
    this one folded with the child's new steps."""
    llm, prm = models
    calls = spy_selections(monkeypatch)
    ttscale.beam_search(llm, problems(2), 4, prm, SAMPLING, agg="mean", beam_width=2,
                        max_iterations=4, **COMMON)
    checked = 0
    for (seen, _, children), (later, _, _) in zip(calls, calls[1:]):
        parents = {tuple(child.tolist()) for child in children}
        for step_scores, state in later:
            parent_steps = step_scores[:-1]
            if not parent_steps:
                continue
            _, before = next(((s, st) for s, st in seen if s == parent_steps), (None, None))
            if before is None:
                continue
            value, count = before.tolist()
            new = step_scores[-1]
            folded = fold_scores(before[None], [new], "mean")[0]
            assert folded.tolist() == state.tolist()
            assert tuple(before.tolist()) in parents
            assert count + 1 == state[1].item()
            checked += 1
    assert checked


def test_ranking_scores_are_gathered_without_a_host_read(models, monkeypatch):
    """aggregate_scores stacks the lines' rows on the device: reading one to the host inside it
    fails the search."""
    llm, prm = models
    original = SearchRun.aggregate_scores
    gathered = []

    def no_reads(self, lines, *args, **kwargs):
        with monkeypatch.context() as m:
            for name in ("tolist", "item", "__float__", "__bool__", "numpy"):
                m.setattr(torch.Tensor, name, lambda *a, _n=name: pytest.fail(f"read: {_n}"))
            scores = original(self, lines, *args, **kwargs)
        gathered.append(len(lines))
        return scores

    monkeypatch.setattr(SearchRun, "aggregate_scores", no_reads)
    ttscale.beam_search(llm, problems(2), 4, prm, SAMPLING, agg="prod", beam_width=2,
                        max_iterations=3, **COMMON)
    assert sum(gathered) > 0


@pytest.mark.parametrize("name", ["beam_search", "dvts"])
def test_poisoned_host_score_lists_change_no_selection(models, monkeypatch, name):
    """After every scoring, a line's host step-score list holds 1 - score: a search that
    re-aggregated those lists would rank the beams the other way round."""
    llm, prm = models
    function, options = BEAMS[name]
    run = lambda: function(llm, problems(), 4, prm, SAMPLING, agg="mean", **options, **COMMON)
    clean = run()

    original = SearchRun._record

    def poisoned(self, line, step, score):
        original(self, line, step, None if score is None else 1.0 - score)

    monkeypatch.setattr(SearchRun, "_record", poisoned)
    monkeypatch.setattr(select_module, "aggregate",
                        lambda *a: pytest.fail("selection re-aggregated step scores on the host"))
    dirty = run()
    assert [r.answer for r in dirty] == [r.answer for r in clean]
    assert [r.chosen for r in dirty] == [r.chosen for r in clean]
    for a, b in zip(dirty, clean, strict=True):
        assert [c.text for c in a.candidates] == [c.text for c in b.candidates]
        assert [c.score for c in a.candidates] == [c.score for c in b.candidates]
        # the poison reached the lists the results report (all but a step rescored as final)
        assert sum(x == pytest.approx(1.0 - y) for c, d in zip(a.candidates, b.candidates)
                   for x, y in zip(c.step_scores, d.step_scores)) >= len(a.candidates)
    assert any(c.score != pytest.approx(aggregate([1.0 - s for s in c.step_scores], "mean"))
               for r in dirty for c in r.candidates if c.step_scores)


class FinalBonusVerifier(Verifier):
    """A host verifier whose score of a step depends on whether it is final: a line that ends
    right after a step gets that step rescored, and its aggregate must follow."""

    def start(self, problems, references=None):
        return [object() for _ in problems]

    def fork(self, paths, parents):
        return [object() for _ in parents]

    def score(self, paths, steps, final):
        return [(0.9 if last else 0.3) + len(step) / 1000 for step, last in zip(steps, final)]

    def free(self, paths):
        pass


@pytest.mark.parametrize("agg", AGGREGATIONS)
def test_a_retracted_step_folds_its_final_score_into_the_pre_step_state(models, agg):
    llm, _ = models
    results = ttscale.beam_search(llm, problems(2), 4, FinalBonusVerifier(), SAMPLING, agg=agg,
                                  beam_width=2, max_iterations=8, **COMMON)
    finals = 0
    for r in results:
        for c in r.candidates:
            assert c.score == aggregate(c.step_scores, agg)
            finals += c.finished and c.step_scores[-1] >= 0.9
    assert finals, "no solution ended right after a step: the retract path went untested"
