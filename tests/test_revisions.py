"""Sequential revisions on a tiny random policy: the chain's context grows in place (only new
tokens prefilled, counted from the engine), the window rebuilds it from the last attempts, each
attempt is scored alone, and ``sequential=1`` is best-of-N."""

from __future__ import annotations

import pytest
import torch
import ttscale
from tiny_policy import save_tiny_policy
from ttscale.search.compute_optimal import ComputeOptimalTable, fit_compute_optimal
from ttscale.search.line import completed_steps
from ttscale.search.prompts import build_prompt
from ttscale.search.result import Candidate
from ttscale.search.revisions import (
    REVISION_SEPARATOR,
    revision_context,
    revision_context_ids,
    separator_ids,
)
from ttscale.search.select import choose
from ttscale.verifiers.base import Verifier

SAMPLING = ttscale.SamplingParams(temperature=1.0, max_tokens=20)
PROBLEMS = ["Q: 1+2\n", "Q: (3*4)-5\n", "Q: 7+8\n"]


def last_digit(text: str) -> str | None:
    return next((c for c in reversed(text) if c.isdigit()), None)


def same(a: str, b: str) -> bool:
    return a == b


class StepVerifier(Verifier):
    """Scores a step 1 when it holds ``char``, else 0; one token per character. Records every
    path's steps, the problems it was started on, and which paths are live."""

    def __init__(self, char: str = "a"):
        self.char = char
        self.scored_tokens = 0
        self.started: list[str] = []
        self.paths: dict[int, list[str]] = {}
        self.live: set[int] = set()

    def _new(self, steps: list[str]) -> int:
        self.paths[len(self.paths)] = steps
        self.live.add(len(self.paths) - 1)
        return len(self.paths) - 1

    def start(self, problems, references=None):
        self.started += problems
        self.scored_tokens += sum(len(p) for p in problems)
        return [self._new([]) for _ in problems]

    def fork(self, paths, parents):
        return [self._new(list(self.paths[paths[i]])) for i in parents]

    def score(self, paths, steps, final):
        for path, step in zip(paths, steps, strict=True):
            assert path in self.live
            self.paths[path].append(step)
            self.scored_tokens += len(step) + 1
        return [1.0 if self.char in step else 0.0 for step in steps]

    def free(self, paths):
        for path in paths:
            self.live.remove(path)


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    torch.set_num_threads(1)
    directory = save_tiny_policy(tmp_path_factory.mktemp("tiny_policy"))
    return ttscale.LLM(directory, kv_budget_bytes=8 << 20, block_size=8)


COMMON = dict(step_delimiter="\n", extract=last_digit, equal=same, progress=False)


def revise(llm, n, sequential, verifier=None, *, problems=PROBLEMS, seed=0, **options):
    return ttscale.revisions(
        llm, problems, n, sequential, verifier, SAMPLING, seed=seed, **COMMON, **options
    )


def summary(results):
    return [
        (r.answer, r.chosen, [(c.text, c.token_ids, c.step_scores, c.answer) for c in r.candidates])
        for r in results
    ]


def attempt_ids(llm, candidate: Candidate) -> list[int]:
    """An attempt's tokens as its chain's context holds them: without end-of-sequence."""
    ids = candidate.token_ids
    return ids[:-1] if ids and ids[-1] == llm.tokenizer.eos_token_id else ids


def is_cut(llm, candidate: Candidate) -> bool:
    """Whether an attempt ran to its budget (no end-of-sequence token)."""
    return candidate.token_ids[-1:] != [llm.tokenizer.eos_token_id]


def chain_attempts(llm, result, chain: int) -> list[list[int]]:
    attempts = [c for c in result.candidates if c.chain == chain]
    assert [c.position for c in attempts] == list(range(len(attempts)))
    return [attempt_ids(llm, c) for c in attempts]


def test_revision_context_is_the_prompt_then_each_attempt_and_its_separator():
    assert revision_context("Q: 1+2\n", []) == "Q: 1+2\n"
    assert revision_context("Q: 1+2\n", ["4\n", "3\n"]) == (
        "Q: 1+2\n4\n" + REVISION_SEPARATOR + "3\n" + REVISION_SEPARATOR
    )


def test_revision_context_ids_tokenize_like_the_text_for_the_toy_tokenizer(llm):
    tokenizer = llm.tokenizer
    attempts = ["1+2=4\nanswer: 4\n", "1+2=3\n"]
    ids = revision_context_ids(
        tokenizer.encode("Q: 1+2\n"),
        [tokenizer.encode(a, add_special_tokens=False) for a in attempts],
        separator_ids(tokenizer, None, len(attempts)),
    )
    assert ids == tokenizer.encode(revision_context("Q: 1+2\n", attempts))


@pytest.mark.parametrize("select", ["best", "weighted", "majority"])
def test_sequential_one_is_best_of_n(llm, select):
    verifier = None if select == "majority" else StepVerifier
    args = dict(select=select, seed=5, **COMMON)
    best = ttscale.best_of_n(llm, PROBLEMS, 4, verifier and verifier(), SAMPLING, **args)
    ours = ttscale.revisions(llm, PROBLEMS, 4, 1, verifier and verifier(), SAMPLING, **args)
    assert summary(ours) == summary(best)
    for r, b in zip(ours, best, strict=True):
        assert [c.chain for c in r.candidates] == [0, 1, 2, 3]
        assert {c.position for c in r.candidates} == {0}
        assert (r.cost.generated_tokens, r.cost.prefilled_tokens, r.cost.scored_tokens) == (
            b.cost.generated_tokens,
            b.cost.prefilled_tokens,
            b.cost.scored_tokens,
        )


def test_same_seed_same_result(llm):
    first = revise(llm, 4, 2, StepVerifier(), window=1, seed=3)
    assert summary(revise(llm, 4, 2, StepVerifier(), window=1, seed=3)) == summary(first)
    assert summary(revise(llm, 4, 2, StepVerifier(), window=1, seed=4)) != summary(first)


def test_candidates_are_every_attempt_chain_by_chain(llm):
    for r in revise(llm, 6, 3, StepVerifier()):
        assert [(c.chain, c.position) for c in r.candidates] == [
            (chain, position) for chain in range(2) for position in range(3)
        ]
        assert all(c.finished for c in r.candidates)
        assert r.extra == dict(sequential=3, chains=2, window=3, rebuilt_tokens=0)


def test_prefill_is_the_problem_once_plus_each_revisions_new_tokens(llm):
    """A chain of 4 attempts within the window prefills the prompt once; each revision then
    prefills only its separator (and the last token of an attempt cut by its budget, which the
    attempt never fed itself). A naive run re-prefills the whole context for every attempt."""
    engine, problem, chains, sequential = llm.engine, PROBLEMS[1], 2, 4
    before = engine.prefilled_tokens
    (result,) = revise(llm, chains * sequential, sequential, problems=[problem], window=3)
    ours = engine.prefilled_tokens - before
    assert result.cost.prefilled_tokens == ours and result.extra["rebuilt_tokens"] == 0

    prompt = build_prompt(llm.tokenizer, problem)
    separators = separator_ids(llm.tokenizer, None, sequential - 1)
    naive = rereads = cuts = 0
    for chain in range(chains):
        attempts = chain_attempts(llm, result, chain)
        for k in range(sequential):
            context = revision_context_ids(prompt, attempts[:k], separators[:k])
            start = engine.prefilled_tokens
            engine.free_prompt(engine.add(context))  # the naive rebuild of this context
            naive += engine.prefilled_tokens - start
            # What the chain's KV already holds of this context: the prompt (after the first
            # chain), then everything before the newest separator, bar a budget-cut attempt's
            # last token, which was sampled but never fed.
            if k == 0:
                rereads += len(prompt) - 1 if chain else 0
            else:
                cut = is_cut(llm, result.candidates[chain * sequential + k - 1])
                cuts += cut
                rereads += len(context) - len(separators[k - 1]) - cut
    assert ours == naive - rereads
    expected = (
        len(prompt)
        - 1
        + sum(
            len(separators[c.position]) - 1 + is_cut(llm, c)
            for c in result.candidates
            if c.position < sequential - 1
        )
    )
    assert ours == expected
    assert cuts  # some attempt ran to its budget: its last token went in with the separator


def test_window_rebuilds_the_context_from_the_last_attempts(llm, monkeypatch):
    """With window 1, each revision after the second sees only the attempt before it: the
    context is rebuilt on a fresh sequence, and the rebuild's prefill is counted."""
    engine, problem, chains, sequential, window = llm.engine, PROBLEMS[0], 2, 4, 1
    contexts: list[list[list[int]]] = []
    decode = llm.scheduler.decode  # what a search's decode goes through

    def spy(seqs, sampling, **kwargs):
        contexts.append([s.prompt.prompt_ids[:-1] + s.tokens for s in seqs])
        return decode(seqs, sampling, **kwargs)

    monkeypatch.setattr(llm.scheduler, "decode", spy)
    before = engine.prefilled_tokens
    (result,) = revise(llm, chains * sequential, sequential, problems=[problem], window=window)
    prefilled = engine.prefilled_tokens - before

    prompt = build_prompt(llm.tokenizer, problem)
    separators = separator_ids(llm.tokenizer, None, sequential - 1)
    assert len(contexts) == sequential  # one decode per attempt, every chain together
    expected, rebuilt = len(prompt) - 1, 0
    for chain in range(chains):
        attempts = chain_attempts(llm, result, chain)
        for k in range(sequential):
            shown = range(max(0, k - window), k)
            want = revision_context_ids(
                prompt, [attempts[i] for i in shown], [separators[i] for i in shown]
            )
            assert contexts[k][chain] == want
            if k > window:
                rebuilt += len(want) - len(prompt)
            elif k:
                cut = is_cut(llm, result.candidates[chain * sequential + k - 1])
                expected += len(separators[k - 1]) - 1 + cut
    assert rebuilt and result.extra["rebuilt_tokens"] == rebuilt
    assert prefilled == result.cost.prefilled_tokens == expected + rebuilt


def test_each_attempt_is_scored_alone(llm):
    verifier = StepVerifier()
    results = revise(llm, 6, 3, verifier, window=2)
    assert verifier.started == PROBLEMS  # one root per problem, forked for every attempt
    scored = sorted(steps for steps in verifier.paths.values() if steps)
    attempts = sorted(c.steps for r in results for c in r.candidates if c.steps)
    assert scored == attempts
    for r in results:
        for c in r.candidates:
            assert c.steps == completed_steps(c.text, "\n", True)
            assert c.step_scores == [1.0 if "a" in step else 0.0 for step in c.steps]
            assert REVISION_SEPARATOR not in c.text


def test_costs_add_up_and_everything_is_freed(llm):
    engine, verifier = llm.engine, StepVerifier()
    generated, prefilled = engine.generated_tokens, engine.prefilled_tokens
    results = revise(llm, 8, 4, verifier, window=2)
    assert sum(r.cost.generated_tokens for r in results) == engine.generated_tokens - generated
    assert sum(r.cost.prefilled_tokens for r in results) == engine.prefilled_tokens - prefilled
    assert sum(r.cost.scored_tokens for r in results) == verifier.scored_tokens
    assert engine.pool.refresh() == engine.pool.num_blocks
    assert not verifier.live


def test_best_picks_the_right_answer_whenever_an_attempt_has_it(llm):
    problems, references = PROBLEMS * 3, list("123456789")
    verifier = ttscale.RuleVerifier(extract=last_digit, equal=same)
    results = revise(
        llm, 6, 3, verifier, problems=problems, references=references, select="best", window=1
    )
    hits = 0
    for r, ref in zip(results, references, strict=True):
        if any(c.answer == ref for c in r.candidates):
            hits += 1
            assert r.answer == ref
    assert hits  # the rule was put to the test


def test_hierarchical_takes_each_chains_best_then_votes_across_chains():
    def attempt(chain, answer, score):
        return Candidate("", [], [], [score], score, answer, chain=chain)

    # Chain 0's many low-scored "2"s outvote its best "1" in a flat weighted vote only.
    candidates = [attempt(0, "1", 0.9)] + [attempt(0, "2", 0.4)] * 3 + [attempt(1, "2", 0.5)]
    assert candidates[choose(candidates, "weighted", same)].answer == "2"
    assert choose(candidates, "hierarchical", same) == 0
    assert choose([attempt(0, None, 0.9)], "hierarchical", same) is None


def test_hierarchical_selection_through_the_strategy(llm):
    for r in revise(llm, 6, 3, StepVerifier(), select="hierarchical"):
        winners = []
        for chain in range(2):
            members = [i for i, c in enumerate(r.candidates) if c.chain == chain]
            best = choose([r.candidates[i] for i in members], "best", same)
            winners += [] if best is None else [members[best]]
        vote = choose([r.candidates[i] for i in winners], "weighted", same)
        assert r.chosen == (None if vote is None else winners[vote])


@pytest.mark.parametrize(
    "n,sequential,options,name",
    [
        (6, 4, {}, "sequential"),
        (4, 0, {}, "sequential"),
        (4, 2, dict(window=0), "window"),
        (4, 2, dict(select="vote"), "select"),
        (4, 2, dict(select="hierarchical", verifier=None), "select"),
        (4, 2, dict(revision_fn=lambda position: ""), "revision_fn"),
        (4, 2, dict(revision_fn=lambda position: "1" * 600), "window"),
    ],
)
def test_bad_arguments_are_named(llm, n, sequential, options, name):
    verifier = options.pop("verifier", StepVerifier())
    with pytest.raises(ValueError, match=f"^{name}:"):
        revise(llm, n, sequential, verifier, **options)


def test_compute_optimal_chooses_from_a_table_with_revision_ratios(llm):
    verifier = ttscale.RuleVerifier(extract=last_digit, equal=same)
    table = fit_compute_optimal(
        llm,
        PROBLEMS,
        ["3", "7", "5"],
        4,
        verifier,
        SAMPLING,
        strategies=("best_of_n",),
        revision_ratios=(2, 4),
        window=1,
        num_bins=2,
        pilot_n=2,
        **COMMON,
    )
    options = {"best_of_n:1", "best_of_n:2", "best_of_n:4", "revisions-2:2", "revisions-2:4"}
    assert set(table.accuracy) == options | {"revisions-4:4"}
    assert all(f"{name}:{n}" in table.accuracy for name, n in table.choices)
    report = table.render()
    assert all(option in report for option in table.accuracy) and "*" in report
    assert table.window == 1


def test_compute_optimal_runs_a_bins_revisions_choice(llm):
    table = ComputeOptimalTable(
        edges=[], choices=[("revisions-2", 4)], counts=[3], pilot_n=1, budget=4, window=1
    )
    verifier = ttscale.RuleVerifier(extract=last_digit, equal=same)
    args = (llm, [], [], PROBLEMS[:2], 4, verifier, SAMPLING)
    results = ttscale.compute_optimal(*args, table=table, references=["3", "7"], **COMMON)
    alone = revise(llm, 4, 2, verifier, problems=PROBLEMS[:2], references=["3", "7"], window=1)
    for r, direct in zip(results, alone, strict=True):
        assert r.extra["compute_optimal"]["strategy"] == "revisions-2"
        assert [(c.chain, c.position) for c in r.candidates] == [(0, 0), (0, 1), (1, 0), (1, 1)]
        assert [c.text for c in r.candidates] == [c.text for c in direct.candidates]


def test_compute_optimal_names_a_bad_revision_ratio(llm):
    verifier = ttscale.RuleVerifier(extract=last_digit, equal=same)
    with pytest.raises(ValueError, match="^revision_ratios:"):
        fit_compute_optimal(
            llm, PROBLEMS, ["3", "7", "5"], 4, verifier, SAMPLING, revision_ratios=(3,), **COMMON
        )


def test_drop_last_sample_takes_back_a_pending_sample(llm):
    engine = llm.engine
    prompt = engine.add(llm.tokenizer.encode("Q: 1+2\n"))
    (seq,) = engine.fork(prompt, 1)
    engine.decode([seq], ttscale.SamplingParams(temperature=1.0, max_tokens=5, ignore_eos=True))
    tokens, generated = list(seq.tokens), seq.generated
    engine.drop_last_sample(seq)
    assert seq.tokens == tokens[:-1] and seq.generated == generated - 1 == len(seq.logprobs)
    assert seq.pending == 0
    with pytest.raises(ValueError, match="^seq:"):  # its last token is in the KV cache
        engine.drop_last_sample(seq)
    engine.free([seq])
    engine.free_prompt(prompt)
