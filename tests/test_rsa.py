"""Recursive self-aggregation on a tiny random policy: a population of n per round, K members
drawn by the seed, contexts exactly what ``aggregate_fn`` returns, their shared prefix prefilled
once (counted against a hand computation and the engine), the pool empty afterwards; then the
toy policy, which learnt to revise, on a few held-out problems."""

from __future__ import annotations

import os

import pytest
from tiny_policy import save_tiny_policy

import ttscale
from ttscale.errors import InvalidArgument
from ttscale.search import rsa as rsa_module
from ttscale.search.prompts import build_prompt
from ttscale.search.revisions import REVISION_SEPARATOR
from ttscale.search.run import SearchRun

SAMPLING = ttscale.SamplingParams(temperature=1.0, max_tokens=20)
PROBLEMS = ["Q: 1+2\n", "Q: (3*4)-5\n", "Q: 7+8\n"]



def pool_is_whole(llm) -> bool:
    """Every KV block is free, or held only by the prefix cache (earlier requests' prompts, given
    back as work needs them): nothing a search took is left behind."""
    pool = llm.engine.pool
    return pool.refresh() + llm.scheduler.cache.evictable() == pool.num_blocks

def last_digit(text: str) -> str | None:
    return next((c for c in reversed(text) if c.isdigit()), None)


COMMON = dict(step_delimiter="\n", extract=last_digit, equal=lambda a, b: a == b, progress=False)


@pytest.fixture(scope="module")
def llm(tmp_path_factory, one_thread):
    directory = save_tiny_policy(tmp_path_factory.mktemp("tiny_policy"))
    return ttscale.LLM(directory, kv_budget_bytes=8 << 20, block_size=8)


def run_rsa(llm, n=4, problems=PROBLEMS, seed=0, sampling=SAMPLING, **options):
    return ttscale.rsa(llm, problems, n, sampling=sampling, seed=seed, **COMMON, **options)


class Recorder:
    """An ``aggregate_fn`` that records its calls and returns ``make(problem, attempts, call)``."""

    def __init__(self, make):
        self.make = make
        self.calls: list[tuple[str, list[str]]] = []
        self.outputs: list = []

    def __call__(self, problem, attempts):
        out = self.make(problem, list(attempts), len(self.calls))
        self.calls.append((problem, list(attempts)))
        self.outputs.append(out)
        return out


@pytest.fixture
def contexts_seen(monkeypatch):
    """The full token context (prompt and appended tokens) of every sequence RSA decodes, per
    ``advance`` call, read from the engine's sequences as decoding starts."""
    seen: list[list[list[int]]] = []
    advance = SearchRun.advance

    def spy(self, lines, *args, **kwargs):
        seen.append([line.seq.prompt.prompt_ids[:-1] + list(line.seq.tokens) for line in lines])
        return advance(self, lines, *args, **kwargs)

    monkeypatch.setattr(SearchRun, "advance", spy)
    return seen


def test_each_round_writes_a_population_of_n_from_k_drawn_members(llm):
    results = run_rsa(llm, n=5, aggregation_size=3, aggregation_rounds=2)
    for r in results:
        assert len(r.candidates) == 5
        assert [c.chain for c in r.candidates] == list(range(5))
        assert {c.position for c in r.candidates} == {2}
        draws = r.extra["draws"]
        assert len(draws) == 2 and all(len(round_) == 5 for round_ in draws)
        for round_ in draws:
            for chosen in round_:
                assert len(chosen) == 3 == len(set(chosen)) and set(chosen) <= set(range(5))
        assert [len(a) for a in r.extra["answers"]] == [5, 5, 5]
        assert sum(r.extra["generated_tokens"]) == r.cost.generated_tokens
        assert r.extra["generated_tokens"][-1] == sum(len(c.token_ids) for c in r.candidates)
        assert r.extra["answers"][-1] == [c.answer for c in r.candidates]
        assert (r.extra["population"], r.extra["aggregation_size"],
                r.extra["aggregation_rounds"]) == (5, 3, 2)


def test_draws_follow_the_seed(llm):
    one = [r.extra["draws"] for r in run_rsa(llm, aggregation_size=2, aggregation_rounds=2)]
    same = [r.extra["draws"] for r in run_rsa(llm, aggregation_size=2, aggregation_rounds=2)]
    other = [r.extra["draws"] for r in run_rsa(llm, seed=1, aggregation_size=2,
                                               aggregation_rounds=2)]
    assert one == same and one != other
    assert one[0] != one[1]  # each problem draws its own (keyed by its id)


def test_same_seed_same_result(llm):
    def summary(results):
        return [(r.answer, [(c.text, c.token_ids) for c in r.candidates], r.cost.generated_tokens,
                 r.cost.prefilled_tokens) for r in results]

    assert summary(run_rsa(llm)) == summary(run_rsa(llm))
    assert summary(run_rsa(llm)) != summary(run_rsa(llm, seed=5))


def test_a_problem_searches_the_same_alone_or_in_a_batch(llm):
    together = run_rsa(llm, aggregation_size=2, aggregation_rounds=1)
    alone = run_rsa(llm, problems=PROBLEMS[1:2], problem_ids=[1], aggregation_size=2,
                    aggregation_rounds=1)
    assert [c.text for c in alone[0].candidates] == [c.text for c in together[1].candidates]


@pytest.mark.parametrize("select", ["majority", "best"])
def test_zero_rounds_is_best_of_n(llm, select):
    from test_revisions import StepVerifier

    verifier = StepVerifier("1") if select == "best" else None
    ours = run_rsa(llm, aggregation_rounds=0, select=select, verifier=verifier)
    theirs = ttscale.best_of_n(llm, PROBLEMS, 4, sampling=SAMPLING, seed=0, select=select,
                               verifier=verifier, **COMMON)
    for r, b in zip(ours, theirs, strict=True):
        assert [(c.token_ids, c.step_scores) for c in r.candidates] == [
            (c.token_ids, c.step_scores) for c in b.candidates]
        assert (r.answer, r.chosen) == (b.answer, b.chosen)
        assert r.cost.prefilled_tokens == b.cost.prefilled_tokens
        assert r.extra["aggregation_prefill_tokens"] == 0


def test_the_first_round_aggregates_the_first_populations_members(llm):
    """The attempts aggregate_fn sees are the first population's texts (best-of-N's samples with
    the same seed) at the drawn indices, and its problem is the problem's text."""
    record = Recorder(lambda problem, attempts, call: problem + "".join(attempts))
    results = run_rsa(llm, aggregation_size=2, aggregation_rounds=1, aggregate_fn=record)
    first = ttscale.best_of_n(llm, PROBLEMS, 4, sampling=SAMPLING, seed=0, **COMMON)
    calls = iter(record.calls)
    for r, b in zip(results, first, strict=True):
        for chosen in r.extra["draws"][0]:
            problem, attempts = next(calls)
            assert problem == r.problem
            assert attempts == [b.candidates[j].text for j in chosen]


@pytest.mark.parametrize("form", ["tokens", "text"])
def test_contexts_are_exactly_what_aggregate_fn_returns(llm, contexts_seen, form):
    tokenizer = llm.tokenizer

    def make(problem, attempts, call):
        text = f"{problem}{call % 10}:" + "#".join(attempts)
        return tokenizer.encode(text) if form == "tokens" else text

    record = Recorder(make)
    run_rsa(llm, aggregation_size=2, aggregation_rounds=2, aggregate_fn=record)
    expected = [tokenizer.encode(o) if form == "text" else o for o in record.outputs]
    decoded = [context for call in contexts_seen[1:] for context in call]  # after the first
    assert decoded == expected


@pytest.mark.parametrize("kind", ["after the prompt", "a prefix of its own"])
def test_a_member_is_what_the_model_writes_after_its_context(llm, kind):
    """Greedy decoding: each last member equals ``generate`` on its context as a plain prompt, so
    the shared prefix's KV (the prompt, a trunk forked N ways, or a prefix of its own) is right."""
    tokenizer = llm.tokenizer

    def make(problem, attempts, call):
        own = tokenizer.encode(f"{call % 7}:" + "#".join(attempts), add_special_tokens=False)
        head = (build_prompt(tokenizer, problem) + tokenizer.encode("check these\n",
                add_special_tokens=False)) if kind == "after the prompt" else tokenizer.encode(
                "A: check " + problem)
        return head + own

    record = Recorder(make)
    greedy = ttscale.SamplingParams(temperature=0.0, max_tokens=20)
    results = run_rsa(llm, sampling=greedy, aggregation_size=2, aggregation_rounds=2,
                      aggregate_fn=record)
    last = record.outputs[len(record.outputs) // 2:]  # the second round's contexts
    reference = llm.generate(last, greedy, use_tqdm=False)
    ours = [c.token_ids for r in results for c in r.candidates]
    assert ours == [out.outputs[0].token_ids for out in reference]


def hand_prefill(prompt: list[int], rounds: list[list[list[int]]]) -> tuple[int, list[int]]:
    """The tokens prefilled for one problem if every round's common prefix is prefilled once:
    the prompt all but its last token; per round, when its contexts begin with the prompt, the
    shared tokens after it and each context's own rest; otherwise the shared prefix all but its
    last token and each context's own rest; with nothing shared, each context all but its last
    token (a sequence feeds its last pending token itself)."""
    total, shared = len(prompt) - 1, []
    for contexts in rounds:
        common = len(os.path.commonprefix(contexts))
        shared.append(common)
        own = sum(len(c) - common for c in contexts)
        if contexts[0][: len(prompt)] == prompt and common >= len(prompt):
            total += common - len(prompt) + own
        elif common:
            total += common - 1 + own
        else:  # each context is a prompt of its own
            total += own - len(contexts)
    return total, shared


@pytest.mark.parametrize("kind", ["after the prompt", "a prefix of its own", "nothing shared",
                                  "revision format"])
def test_the_shared_prefix_is_prefilled_once(llm, kind, monkeypatch):
    tokenizer = llm.tokenizer
    engine = llm.engine
    trunks = []  # the shared tokens after a prompt go through the scheduler (room made for them)
    original = llm.scheduler.prefill_pending
    monkeypatch.setattr(llm.scheduler, "prefill_pending",
                        lambda seqs, wave=None: (trunks.append(wave), original(seqs, wave))[1])
    prompts = {p: build_prompt(tokenizer, p) for p in PROBLEMS}
    makers = {
        # the prompt, a shared instruction, then each call's own digits and attempts
        "after the prompt": lambda p, a, call: prompts[p] + tokenizer.encode(
            "check these:\n", add_special_tokens=False) + tokenizer.encode(
            f"{call % 7}" + "#".join(a), add_special_tokens=False),
        "a prefix of its own": lambda p, a, call: tokenizer.encode(
            "A: check " + p + f"{call % 7}" + "#".join(a)),
        "nothing shared": lambda p, a, call: tokenizer.encode(
            f"{call % 10}{p}" + "#".join(a), add_special_tokens=False),
        "revision format": None,
    }
    record = None if makers[kind] is None else Recorder(makers[kind])
    before = engine.prefilled_tokens
    if record is None:
        results = run_rsa(llm, aggregation_size=3, aggregation_rounds=2)
    else:
        results = run_rsa(llm, aggregation_size=3, aggregation_rounds=2, aggregate_fn=record)
    assert sum(r.cost.prefilled_tokens for r in results) == engine.prefilled_tokens - before
    for i, r in enumerate(results):
        prompt = prompts[r.problem]
        if record is None:  # the revision format, rebuilt from the drawn attempts' texts
            rounds = [[prompt + tokenizer.encode(
                "".join(t + REVISION_SEPARATOR for t in attempts), add_special_tokens=False)
                for attempts in texts] for texts in _drawn_texts(llm, r)]
        else:  # calls go round by round, problem by problem, four contexts each
            rounds = [record.outputs[(t * 3 + i) * 4:(t * 3 + i + 1) * 4] for t in range(2)]
        total, shared = hand_prefill(prompt, rounds)
        assert r.cost.prefilled_tokens == total
        assert r.extra["shared_prefix_tokens"] == shared
        assert r.extra["aggregation_prefill_tokens"] == total - (len(prompt) - 1)
        if kind == "after the prompt":
            assert shared[0] > len(prompt) + 10  # the instruction is shared, and prefilled once
    if kind == "after the prompt":
        assert len(trunks) == 2 * len(results) and None not in trunks  # two rounds, in the wave
    assert pool_is_whole(llm)


def _drawn_texts(llm, result):
    """Per round, per new member, the texts of the members its context showed (rerunning the
    search's populations: the first is best-of-N with the same seed; later ones are read back
    through a recorder on a second, identical run)."""
    record = Recorder(lambda problem, attempts, call: rsa_module.revision_aggregate(
        llm.tokenizer)(problem, attempts))
    again = run_rsa(llm, problems=[result.problem], problem_ids=[PROBLEMS.index(result.problem)],
                    aggregation_size=3, aggregation_rounds=2, aggregate_fn=record)
    assert [c.text for c in again[0].candidates] == [c.text for c in result.candidates]
    attempts = [a for _, a in record.calls]
    return [attempts[:4], attempts[4:]]


def test_the_default_is_the_revision_format_for_the_toy_tokenizer(llm, contexts_seen):
    record = Recorder(lambda problem, attempts, call: rsa_module.revision_aggregate(
        llm.tokenizer)(problem, attempts))
    by_default = run_rsa(llm, aggregation_size=2, aggregation_rounds=1)
    decoded = [context for call in contexts_seen[1:] for context in call]
    contexts_seen.clear()
    recorded = run_rsa(llm, aggregation_size=2, aggregation_rounds=1, aggregate_fn=record)
    assert [[c.text for c in r.candidates] for r in by_default] == [
        [c.text for c in r.candidates] for r in recorded]
    assert decoded == record.outputs
    for (problem, attempts), context in zip(record.calls, record.outputs, strict=True):
        assert llm.tokenizer.decode(context) == problem + "".join(
            a + REVISION_SEPARATOR for a in attempts)


class SpellingTokenizer:
    """A tokenizer that spells any text (one id per character) and has no chat template."""

    chat_template = None

    def encode(self, text, add_special_tokens=True):
        return [ord(c) for c in text]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(map(chr, ids))


def test_the_default_is_the_instruction_request_where_the_tokenizer_spells_it(llm):
    attempts = ["1+2=3\nanswer: 3", "answer: 4"]
    chosen = rsa_module.default_aggregate(SpellingTokenizer())("What is 1+2?", attempts)
    request = rsa_module.aggregation_request("What is 1+2?", attempts)
    assert SpellingTokenizer().decode(chosen) == request
    assert request.startswith("What is 1+2?\n\n" + rsa_module.AGGREGATION_INSTRUCTION)
    assert request.endswith("Candidate solution 1:\n1+2=3\nanswer: 3\n\n"
                            "Candidate solution 2:\nanswer: 4")
    toy = rsa_module.default_aggregate(llm.tokenizer)("Q: 1+2\n", ["3"])
    assert llm.tokenizer.decode(toy) == "Q: 1+2\n3" + REVISION_SEPARATOR


def test_a_verifier_scores_only_the_last_population_and_weights_the_vote(llm):
    from test_revisions import StepVerifier

    verifier = StepVerifier("1")
    results = run_rsa(llm, aggregation_size=2, aggregation_rounds=2, verifier=verifier)
    scored = [steps for steps in verifier.paths.values() if steps]
    assert len(scored) <= 4 * len(PROBLEMS)  # one path per member of the last population
    for r in results:
        assert all(c.step_scores == [1.0 if "1" in s else 0.0 for s in c.steps]
                   for c in r.candidates)
    assert not verifier.live


def test_costs_add_up_and_everything_is_freed(llm):
    engine = llm.engine
    generated, prefilled = engine.generated_tokens, engine.prefilled_tokens
    results = run_rsa(llm, n=3, aggregation_size=2, aggregation_rounds=2)
    assert sum(r.cost.generated_tokens for r in results) == engine.generated_tokens - generated
    assert sum(r.cost.prefilled_tokens for r in results) == engine.prefilled_tokens - prefilled
    for r in results:  # three populations of three, every member at least one token
        assert 9 <= r.cost.generated_tokens <= 9 * SAMPLING.max_tokens
        assert r.extra["aggregation_prefill_tokens"] > 0
    assert pool_is_whole(llm)


def raises(message):
    def aggregate(problem, attempts):
        raise AssertionError(message)

    return aggregate


@pytest.mark.parametrize("options, name", [
    (dict(aggregation_size=5), "aggregation_size"),  # above n=4
    (dict(aggregation_size=0), "aggregation_size"),
    (dict(aggregation_size=True), "aggregation_size"),
    (dict(aggregation_rounds=-1), "aggregation_rounds"),
    (dict(aggregation_rounds=1.0), "aggregation_rounds"),
    (dict(aggregate_fn=3), "aggregate_fn"),
    (dict(aggregate_fn=lambda p, a: 3.5), "aggregate_fn"),
    (dict(aggregate_fn=lambda p, a: ""), "aggregate_fn"),
    (dict(aggregate_fn=lambda p, a: []), "aggregate_fn"),
    (dict(aggregate_fn=lambda p, a: [1, True]), "aggregate_fn"),
    (dict(aggregate_fn=lambda p, a: [1, 10_000]), "aggregate_fn"),  # outside the vocabulary
    (dict(aggregate_fn=lambda p, a: [1] * 512), "aggregate_fn"),  # fills the model's context
])
def test_bad_options_are_named_and_leave_the_pool_empty(llm, options, name):
    with pytest.raises(InvalidArgument) as error:
        run_rsa(llm, aggregation_rounds=options.pop("aggregation_rounds", 1), **options)
    assert error.value.param == name and str(error.value).startswith(name)
    assert pool_is_whole(llm)


def test_the_registry_declares_it():
    from ttscale.search import registry

    spec = registry.get("rsa")
    assert spec.function is ttscale.rsa and not spec.needs_verifier and not spec.menu
    assert [f.name for f in spec.flag_fields()] == ["aggregation_size", "aggregation_rounds"]
    assert "Venkatraman" in ttscale.rsa.__doc__ and "aggregate_fn :" in ttscale.rsa.__doc__
    assert spec.options.for_budget(2) == {"aggregation_size": 2}


def test_ttscale_run_takes_its_flags(tmp_path, capsys):
    import json

    from ttscale import cli
    from ttscale.toy import policy_dir

    data = tmp_path / "toy.jsonl"
    data.write_text("".join(json.dumps({"problem": p, "answer": a}) + "\n"
                            for p, a in [("Q: 3+4\n", "7"), ("Q: 9-2\n", "7")]))
    code = cli.main(["run", "--model", str(policy_dir()), "--oracle", "--strategy", "rsa",
                     "--n", "3", "--aggregation-size", "2", "--aggregation-rounds", "1",
                     "--data", str(data), "--out", str(tmp_path / "out.jsonl"),
                     "--max-tokens", "60", "--step-delimiter", "\\n", "--device", "cpu",
                     "--kv-budget", "0.02"])
    assert code == 0
    records = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(r["cost"]["generated_tokens"] > 0 for r in records)


# The toy policy learnt to revise; aggregating three of its solutions in the revision format
# should not make it worse than voting over its samples. Loose bounds on few problems.


@pytest.fixture(scope="module")
def toy(one_thread):
    from ttscale.toy import policy_dir

    return ttscale.LLM(policy_dir(), device="cpu", kv_budget_bytes=64 << 20)


def test_the_toy_policy_aggregates_into_right_answers(toy):
    from ttscale.toy import task

    problems = task.problems("heldout", 40, seed=0)
    texts = [f"Q: {p.text}" for p in problems]
    references = [str(p.answer) for p in problems]
    common = dict(step_delimiter="\n", prompt_fn=lambda problem: problem + "\n", progress=False,
                  seed=0, sampling=ttscale.SamplingParams(temperature=1.0, max_tokens=96))
    results = ttscale.rsa(toy, texts, 8, aggregation_size=3, aggregation_rounds=1, **common)

    def right(answer, reference):
        return answer is not None and answer.strip() == reference

    def members_right(population):
        return sum(right(a, ref) for r, ref in zip(results, references)
                   for a in r.extra["answers"][population])

    # the aggregated population holds more right members than the sampled one
    assert members_right(1) > members_right(0)
    accuracy = sum(right(r.answer, ref) for r, ref in zip(results, references)) / len(results)
    assert accuracy >= 0.3
    # a population that agrees shows the same members everywhere: contexts that share more
    assert all(r.extra["aggregation_prefill_tokens"] > 0 for r in results)
    assert max(r.extra["shared_prefix_tokens"][0] - len(r.problem) for r in results) > 20


def test_the_demo_sets_rsa_against_a_majority_vote_at_its_tokens(tmp_path, capsys):
    from ttscale import demo

    rows = demo.run_demo(ns=(2,), strategies=("rsa",), num_problems=2, device="cpu",
                         out=tmp_path, progress=False)
    assert [r.strategy for r in rows] == ["rsa", demo.EQUAL_TOKENS_ROW]
    rsa_row, vote = rows
    # three populations of two, and their contexts: more than six samples' worth
    assert rsa_row.n == 2 and vote.n > 6
    assert 0.5 < vote.tokens / rsa_row.tokens < 2
    assert demo.EQUAL_TOKENS_ROW in capsys.readouterr().out
