"""The parts under the strategies: host select-and-fork, step completion, cost splits, prompts,
waves, argument checks, and the lazy top-level API."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from tiny_policy import save_tiny_policy

import ttscale
from ttscale.model import load_tokenizer
from ttscale.search.cost import split_seconds, split_tokens
from ttscale.search.fork import consecutive_groups, select_and_fork
from ttscale.search.line import completed_steps
from ttscale.search.prompts import build_prompt
from ttscale.search.run import plan_waves

GREEDY = ttscale.SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
    return save_tiny_policy(tmp_path_factory.mktemp("tiny_policy"))


@pytest.fixture
def llm(policy_dir):
    torch.set_num_threads(1)
    return ttscale.LLM(policy_dir, kv_budget_bytes=4 << 20, block_size=8)


# ----------------------------------------------------------------------------------------------
# select_and_fork on the host pool


def started(engine, count: int):
    seqs = engine.fork(engine.add([1, 20, 21, 22, 23, 24]), count)
    engine.decode(seqs, GREEDY, max_new_tokens=5)
    return seqs


def test_select_and_fork_keeps_the_best_of_each_group_best_first(llm):
    seqs = started(llm.engine, 6)
    scores = [0.1, 0.9, 0.5, None, 0.2, float("nan")]
    forked = select_and_fork(llm.engine, seqs, scores, [3, 3], keep=[2, 2], children=[2, 1])
    assert forked.parents == [1, 1, 2, 2, 4, 3]  # numbers before None and NaN
    assert forked.group_sizes == [4, 2]
    assert forked.children[0] is seqs[1] and forked.children[2] is seqs[2]  # first child continues
    assert [c.output_ids for c in forked.children] == [seqs[p].output_ids for p in forked.parents]
    assert [s.freed for s in seqs] == [True, False, False, False, False, True]


def test_select_and_fork_ties_go_to_the_lower_index(llm):
    forked = select_and_fork(llm.engine, started(llm.engine, 4), [0.5] * 4, [4], keep=2, children=1)
    assert forked.parents == [0, 1]


def test_select_and_fork_with_no_children_frees_every_candidate(llm):
    engine = llm.engine
    seqs = started(engine, 4)
    forked = select_and_fork(engine, seqs, [1.0, 2.0, 3.0, 4.0], [2, 2], keep=[1, 5], children=0)
    assert forked.children == [] and forked.group_sizes == [0, 0]
    engine.free_prompt(seqs[0].prompt)
    assert engine.pool.refresh() == engine.pool.num_blocks


def test_forked_children_decode_on_and_free_cleanly(llm):
    engine = llm.engine
    seqs = started(engine, 3)
    forked = select_and_fork(engine, seqs, [0.3, 0.1, 0.2], [3], keep=2, children=3)
    engine.decode(forked.children, GREEDY, max_new_tokens=3)
    assert forked.children[0].output_ids == forked.children[1].output_ids  # greedy, same past
    engine.free(forked.children)
    engine.free_prompt(seqs[0].prompt)
    assert engine.pool.refresh() == engine.pool.num_blocks


def test_select_and_fork_rejects_group_sizes_that_miss_candidates(llm):
    with pytest.raises(ValueError, match="group_sizes"):
        select_and_fork(llm.engine, started(llm.engine, 3), [0.0] * 3, [2], keep=1, children=1)


def test_consecutive_groups_are_runs_of_equal_keys():
    assert consecutive_groups([0, 0, 2, 2, 2, 5]) == ([0, 2, 5], [2, 3, 1])
    assert consecutive_groups([]) == ([], [])


# ----------------------------------------------------------------------------------------------
# Steps and costs


def test_completed_steps_wait_for_the_delimiter_until_the_text_is_finished():
    assert completed_steps("a=1\nb=2\nc", "\n", False) == ["a=1", "b=2"]
    assert completed_steps("a=1\nb=2\nc", "\n", True) == ["a=1", "b=2", "c"]
    assert completed_steps("a=1\n\n \nb", "\n", False) == ["a=1"]
    assert completed_steps("no delimiter yet", "\n", False) == []


def test_completed_steps_only_grow_as_text_is_appended():
    text = "12+3=15\n15*2=30\n\nanswer: 30\n"
    steps = [completed_steps(text[:k], "\n", False) for k in range(len(text) + 1)]
    assert all(b[: len(a)] == a for a, b in zip(steps[:-1], steps[1:], strict=True))


@pytest.mark.parametrize(
    "total,weights", [(10, [1, 1, 1]), (7, [5, 0, 2]), (0, [1, 2]), (5, [0, 0])]
)
def test_token_shares_are_whole_and_add_up(total, weights):
    shares = split_tokens(total, weights)
    assert sum(shares) == total and all(isinstance(s, int) and s >= 0 for s in shares)
    if sum(weights):
        assert all(
            abs(s - total * w / sum(weights)) < 1 for s, w in zip(shares, weights, strict=True)
        )


def test_seconds_split_in_proportion_and_evenly_without_work():
    assert split_seconds(3.0, [1, 2]) == pytest.approx([1.0, 2.0])
    assert split_seconds(3.0, [0, 0, 0]) == pytest.approx([1.0, 1.0, 1.0])


# ----------------------------------------------------------------------------------------------
# Prompts and waves


def test_prompt_without_chat_template_is_the_system_prompt_and_problem_text(policy_dir, tmp_path):
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / f).write_bytes((policy_dir / f).read_bytes())
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)  # the toy tokenizer has one
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = load_tokenizer(tmp_path)
    assert tok.chat_template is None
    assert build_prompt(tok, "Q: 1+2\n") == tok.encode("Q: 1+2\n")
    assert build_prompt(tok, "Q: 1+2\n", "A:") == tok.encode("A:\n\nQ: 1+2\n")


def test_prompt_uses_the_chat_template_when_there_is_one(policy_dir, tmp_path):
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / f).write_bytes((policy_dir / f).read_bytes())
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["chat_template"] = (
        "{% for m in messages %}<s>{{ m['role'][0] }}:{{ m['content'] }}\n{% endfor %}"
    )
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = load_tokenizer(tmp_path)
    expected = tok.encode("<s>s:hi\n<s>u:1+2\n", add_special_tokens=False)
    assert build_prompt(tok, "1+2", "hi") == expected
    assert expected.count(tok.token_to_id("<s>")) == 2  # the template's, none added


def test_prompt_fn_gives_text_or_token_ids(policy_dir):
    tok = load_tokenizer(policy_dir)
    assert build_prompt(tok, "1+2", prompt_fn=lambda p: f"Q: {p}\n") == tok.encode("Q: 1+2\n")
    assert build_prompt(tok, "1+2", prompt_fn=lambda p: [1, 5, 6]) == [1, 5, 6]


def test_waves_split_problems_that_do_not_fit_the_pool_together(llm):
    engine = llm.engine
    per_problem = 1 + 4 * (engine.pool.blocks_for(41) + 1)  # prompt block + 4 sequences
    fits = engine.pool.refresh() // per_problem
    waves = plan_waves(engine, [[1, 2, 3]] * (2 * fits + 1), 4, 40)
    assert [len(w) for w in waves] == [fits, fits, 1]
    assert sum(waves, []) == list(range(2 * fits + 1))


def test_waves_name_n_when_one_problem_cannot_fit(llm):
    with pytest.raises(ValueError, match="^n: .*kv_budget_bytes"):
        plan_waves(llm.engine, [[1, 2, 3]], 10_000, 40)


# ----------------------------------------------------------------------------------------------
# Arguments and the top-level API


def strategy_call(llm, name, **overrides):
    args = dict(
        problems=["Q: 1+2\n"],
        n=4,
        verifier=ttscale.RuleVerifier(),
        references=["3"],
        progress=False,
    )
    args.update(overrides)
    return getattr(ttscale, name)(llm, **args)


@pytest.mark.parametrize(
    "name,overrides,argument",
    [
        ("best_of_n", dict(n=0), "n"),
        ("best_of_n", dict(problems=[]), "problems"),
        ("best_of_n", dict(problems="Q: 1+2"), "problems"),
        ("best_of_n", dict(problems=[3]), r"problems\[0\]"),
        ("best_of_n", dict(problems=["Q: 1+2\n"] * ((1 << 18) + 1)), "problems"),
        ("best_of_n", dict(references=["3", "4"]), "references"),
        ("best_of_n", dict(select="vote"), "select"),
        ("best_of_n", dict(agg="max"), "agg"),
        ("best_of_n", dict(verifier=None, select="best"), "select"),
        ("best_of_n", dict(verifier="prm"), "verifier"),
        ("best_of_n", dict(step_delimiter=""), "step_delimiter"),
        ("best_of_n", dict(sampling=ttscale.SamplingParams(stop="\n")), "sampling"),
        ("best_of_n", dict(seed=1.5), "seed"),
        ("best_of_n", dict(seed=-1), "seed"),
        ("best_of_n", dict(references=[3]), r"references\[0\]"),
        ("best_of_n", dict(extract=5), "extract"),
        ("best_of_n", dict(equal="same"), "equal"),
        ("best_of_n", dict(prompt_fn="Q: {}"), "prompt_fn"),
        ("best_of_n", dict(prompt_fn=lambda problem: None), "prompt_fn"),
        ("best_of_n", dict(prompt_fn=lambda problem: [1, "2"]), "prompt_fn"),
        ("beam_search", dict(verifier=None), "verifier"),
        ("beam_search", dict(beam_width=3), "beam_width"),
        ("beam_search", dict(max_iterations=0), "max_iterations"),
        ("dvts", dict(beam_width=0), "beam_width"),
        ("lookahead", dict(lookahead=-1), "lookahead"),
        ("rejection_best_of_n", dict(check_every=0), "check_every"),
        ("rejection_best_of_n", dict(reject_fraction=1.0), "reject_fraction"),
    ],
)
def test_bad_arguments_are_value_errors_naming_them(llm, name, overrides, argument):
    with pytest.raises(ValueError, match=f"^{argument}:"):
        strategy_call(llm, name, **overrides)


@pytest.mark.parametrize(
    "overrides,argument",
    [
        (dict(calibration_references=["3"]), "calibration_references"),
        (dict(budget=0), "budget"),
        (dict(pilot_n=5), "pilot_n"),
        (dict(num_bins=0), "num_bins"),
        (dict(strategies=["revisions"]), "strategies"),
    (dict(strategies=["beam_search"], beam_width=3), "budget"),
        (dict(verifier=None), "verifier"),
    ],
)
def test_compute_optimal_checks_its_arguments(llm, overrides, argument):
    args = dict(
        calibration_problems=["Q: 1+2\n", "Q: 2+2\n"],
        calibration_references=["3", "4"],
        problems=["Q: 1+3\n"],
        budget=4,
        verifier=ttscale.RuleVerifier(),
        progress=False,
    )
    with pytest.raises(ValueError, match=f"^{argument}:"):
        ttscale.compute_optimal(llm, **{**args, **overrides})


def test_import_ttscale_loads_no_torch():
    code = "import sys, ttscale; print('torch' in sys.modules)"
    assert (
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        ).stdout.strip()
        == "False"
    )


def test_public_names_resolve_and_are_documented():
    for name in ttscale.__all__[1:]:
        if name == "PRM":
            continue  # arrives with the PRM verifiers
        value = getattr(ttscale, name)
        assert value.__doc__ and "{head}" not in value.__doc__, name
    with pytest.raises(AttributeError, match="nothing"):
        ttscale.nothing  # noqa: B018


@pytest.mark.parametrize("name, options", [
    ("best_of_n", {}), ("beam_search", dict(beam_width=2)), ("dvts", dict(beam_width=2)),
    ("lookahead", dict(beam_width=2, lookahead=1)), ("rejection_best_of_n", dict(check_every=8)),
    ("revisions", dict(sequential=4, window=1)),  # a window of 1 rebuilds chains on new forks
])
def test_a_problems_samples_do_not_depend_on_its_wave(name, options, monkeypatch):
    """The same call split into one wave or one wave per problem (as a smaller KV pool would
    split it) gives every problem the same candidates: a problem's random streams are its own.
    On the embedded policy and PRM, whose steps end at newlines, so trees grow for several
    iterations and forks of different problems interleave."""
    from ttscale.search import run as waves
    from ttscale.toy import policy_dir, prm_dir, task

    llm = ttscale.LLM(policy_dir(), device="cpu", kv_budget_bytes=16 << 20)
    prm = ttscale.PRM(prm_dir(), format="math-shepherd", device="cpu", kv_budget_bytes=16 << 20)
    problems = [f"Q: {p.text}" for p in task.problems("heldout", 3, seed=1)]

    def texts():
        results = getattr(ttscale, name)(
            llm, problems, 4, verifier=prm, step_delimiter="\n", seed=5, progress=False,
            sampling=ttscale.SamplingParams(temperature=1.0, max_tokens=96),
            prompt_fn=lambda problem: problem + "\n", **options)
        return [sorted(c.text for c in r.candidates) for r in results]

    together = texts()
    monkeypatch.setattr(waves, "MAX_WAVE_SEQUENCES", 4)  # one problem per wave
    assert waves.plan_waves(llm.engine, [[1, 2]] * 3, 4, 96) == [[0], [1], [2]]
    assert texts() == together
    assert len({t for r in together for t in r}) >= 3  # real samples, one per problem at least
