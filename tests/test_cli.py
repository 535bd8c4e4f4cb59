"""``ttscale run``: arguments, malformed input, resumable output, the summary, one real run.

Most tests search with a fake strategy and a fake policy (registered in the strategy registry,
``ttscale.search.registry``, and as ``ttscale.llm.LLM``), so they take milliseconds; the last ones run a tiny
random model end to end.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import time

import pytest
from jsonl_files import read_jsonl, rows, write_jsonl

from ttscale import cli
from ttscale.search import registry
from ttscale.search.beam_search import BeamOptions
from ttscale.grading import extract_answer
from ttscale.search.result import Candidate, Cost, SearchResult
from ttscale.toy.tokenizer import build_tokenizer, save_tokenizer
from ttscale.verifiers.base import split_steps

RESULT_KEYS = {"index", "id", "problem_hash", "problem", "reference", "predicted", "correct",
               "level", "num_candidates", "num_correct", "cost", "wall_seconds", "settings"}


class FakeStrategy:
    """Answers "What is K?" with K; can stop the run (as Ctrl-C would) past some problems."""

    def __init__(self, kill_after: int | None = None):
        self.kill_after = kill_after
        self.searched: list[str] = []
        self.calls: list[dict] = []

    def __call__(self, llm, problems, n, verifier=None, sampling=None, *, select=None, agg="last",
                 seed=0, references=None, system_prompt=None, step_delimiter="\n\n",
                 problem_ids=None, progress=True, **options):
        if self.kill_after is not None and len(self.searched) + len(problems) > self.kill_after:
            raise KeyboardInterrupt
        self.searched.extend(problems)
        self.calls.append({"n": n, "verifier": verifier, "sampling": sampling, "seed": seed,
                           "references": references, "system_prompt": system_prompt,
                           "step_delimiter": step_delimiter, "problem_ids": problem_ids,
                           "options": options})
        results = []
        for problem in problems:
            answer = re.search(r"What is (\w+)\?", problem).group(1)
            text = f"It is {answer}."
            candidates = [Candidate(text, [5, 6, 7], [text], answer=answer) for _ in range(n)]
            cost = Cost(generated_tokens=3 * n, prefilled_tokens=4, scored_tokens=0, seconds=0.01)
            results.append(SearchResult(problem, answer, 0, candidates, cost, "fake"))
        return results


class FakeLLM:
    loaded: list[FakeLLM] = []

    def __init__(self, model, device=None, dtype=None, seed=0, *, kv_budget_bytes=None):
        self.tokenizer = object()
        FakeLLM.loaded.append(self)


def use_strategy(monkeypatch, name, function, options=registry.Options):
    """Register ``function`` as strategy ``name`` for one test."""
    registry.strategies()  # the real ones first, so that they do not load later over the fake
    spec = registry.Strategy(name, function, options, needs_verifier=False, budget="n", summary=name)
    monkeypatch.setitem(registry._REGISTRY, name, spec)


@pytest.fixture
def fake(monkeypatch, tmp_path):
    """FakeStrategy() as strategy "fake", FakeLLM as the policy; returns the strategy."""
    strategy = FakeStrategy()
    use_strategy(monkeypatch, "fake", strategy)
    monkeypatch.setattr("ttscale.llm.LLM", FakeLLM)
    FakeLLM.loaded = []
    (tmp_path / "model").mkdir()
    return strategy


def run(tmp_path, capsys, *extra, n="2"):
    """``ttscale run`` of the fake strategy on tmp_path/data.jsonl -> (exit code, out, err)."""
    argv = ["run", "--model", str(tmp_path / "model"), "--strategy", "fake", "--n", n,
            "--data", str(tmp_path / "data.jsonl"), "--out", str(tmp_path / "out.jsonl"),
            "--batch-size", "2", *extra]
    try:
        code = cli.main(argv)
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# Arguments -----------------------------------------------------------------------------------

@pytest.mark.parametrize("extra, named", [
    (["--strategy", "no_such_strategy"], "--strategy"),
    (["--n", "0"], "--n"),
    (["--n", "two"], "--n"),
    (["--prm", "{model}"], "--prm-format"),
    (["--prm", "{tmp}/missing", "--prm-format", "skywork"], "--prm"),
    (["--prm", "{model}", "--prm-format", "no-such-format"], "--prm-format"),
    (["--prm-format", "skywork"], "--prm-format"),
    (["--prm", "{model}", "--prm-format", "skywork", "--oracle"], "--oracle"),
    (["--beam-width", "4"], "--beam-width"),
    (["--select", "best"], "--select"),
    (["--agg", "max"], "--agg"),
    (["--top-p", "0"], "--top-p"),
    (["--temperature", "-1"], "--temperature"),
    (["--limit", "0"], "--limit"),
    (["--device", "gpu"], "--device"),
    (["--kv-budget", "0"], "--kv-budget"),
    (["--step-delimiter", ""], "--step-delimiter"),
    (["--out", "{tmp}/no_dir/out.jsonl"], "--out"),
    (["--out", "{tmp}/data.jsonl"], "--out"),
    (["--data", "{tmp}/missing.jsonl"], "--data"),
    (["--model", "{tmp}/missing"], "--model"),
])
def test_bad_argument_exits_2_naming_it(fake, tmp_path, capsys, extra, named):
    write_jsonl(tmp_path / "data.jsonl", rows(2))
    extra = [e.format(tmp=tmp_path, model=tmp_path / "model") for e in extra]
    code, _, err = run(tmp_path, capsys, *extra)
    assert code == 2 and f"argument {named}" in err and "Traceback" not in err
    assert fake.searched == []


def test_model_that_does_not_load_is_a_usage_error(tmp_path, capsys, monkeypatch):
    use_strategy(monkeypatch, "fake", FakeStrategy())
    (tmp_path / "model").mkdir()  # no config.json
    write_jsonl(tmp_path / "data.jsonl", rows(2))
    code, _, err = run(tmp_path, capsys)
    assert code == 2 and "argument --model" in err and "config.json" in err
    assert "Traceback" not in err


def test_strategy_value_error_on_the_first_batch_is_a_usage_error(fake, monkeypatch, tmp_path,
                                                                   capsys):
    def picky(*args, **kwargs):
        raise ValueError("beam_width: expected a divisor of n, got 3")

    use_strategy(monkeypatch, "fake", picky)
    write_jsonl(tmp_path / "data.jsonl", rows(2))
    code, _, err = run(tmp_path, capsys)
    assert code == 2 and "--strategy fake: beam_width: expected a divisor of n" in err


def test_strategy_receives_the_run_arguments(fake, tmp_path, capsys):
    write_jsonl(tmp_path / "data.jsonl", rows(2))
    code, _, _ = run(tmp_path, capsys, "--oracle", "--seed", "7", "--temperature", "0.5",
                     "--max-tokens", "64", "--step-delimiter", "\\n",
                     "--system-prompt", "Be \\brief")
    assert code == 0
    (call,) = fake.calls
    assert call["references"] == ["0", "1"] and call["seed"] == 7 and call["n"] == 2
    assert type(call["verifier"]).__name__ == "RuleVerifier"
    assert call["sampling"].temperature == 0.5 and call["sampling"].max_tokens == 64
    assert call["step_delimiter"] == "\n" and call["system_prompt"] == "Be \\brief"


def test_strategy_options_reach_the_strategies_that_take_them(fake, monkeypatch, tmp_path, capsys):
    use_strategy(monkeypatch, "fake", fake, BeamOptions)
    write_jsonl(tmp_path / "data.jsonl", rows(2))
    assert run(tmp_path, capsys, "--beam-width", "2")[0] == 0
    assert fake.calls[0]["options"] == {"beam_width": 2}


def test_references_are_withheld_without_oracle(fake, tmp_path, capsys):
    write_jsonl(tmp_path / "data.jsonl", rows(2))
    assert run(tmp_path, capsys)[0] == 0
    assert fake.calls[0]["references"] is None and fake.calls[0]["verifier"] is None


def test_malformed_data_exits_2_naming_the_line(fake, tmp_path, capsys):
    write_jsonl(tmp_path / "data.jsonl", [*rows(2), '{"problem": "What is 2?"'])
    code, _, err = run(tmp_path, capsys)
    assert code == 2 and "line 3: not valid JSON" in err and "Traceback" not in err


# Output and resuming -------------------------------------------------------------------------

def test_result_lines_follow_the_schema(fake, tmp_path, capsys):
    data = [{**row, "id": f"p{i}"} for i, row in enumerate(rows(3, wrong={1}))]
    write_jsonl(tmp_path / "data.jsonl", data)
    assert run(tmp_path, capsys)[0] == 0
    records = read_jsonl(tmp_path / "out.jsonl")
    assert [set(r) for r in records] == [RESULT_KEYS] * 3
    first, second = records[0], records[1]
    assert (first["index"], first["id"], first["problem"]) == (0, "p0", "What is 0?")
    assert (first["predicted"], first["reference"], first["correct"]) == ("0", "0", True)
    assert (second["predicted"], second["reference"], second["correct"]) == ("1", "101", False)
    assert first["level"] == 1 and first["num_candidates"] == 2
    assert first["cost"] == {"generated_tokens": 6, "prefilled_tokens": 4, "scored_tokens": 0,
                             "seconds": 0.01}
    assert first["wall_seconds"] >= 0 and first["settings"]["strategy"] == "fake"
    assert first["settings"]["n"] == 2 and first["settings"]["model"] == "model"


def test_save_candidates_writes_the_whole_search_result(fake, tmp_path, capsys):
    write_jsonl(tmp_path / "data.jsonl", rows(2))
    assert run(tmp_path, capsys, "--save-candidates")[0] == 0
    record = read_jsonl(tmp_path / "out.jsonl")[0]
    assert set(record) == RESULT_KEYS | {"search"}
    assert record["search"]["answer"] == "0" and len(record["search"]["candidates"]) == 2
    assert record["search"]["candidates"][0]["text"] == "It is 0."


def test_limit_searches_only_the_first_problems(fake, tmp_path, capsys):
    write_jsonl(tmp_path / "data.jsonl", rows(5))
    assert run(tmp_path, capsys, "--limit", "3")[0] == 0
    assert [r["index"] for r in read_jsonl(tmp_path / "out.jsonl")] == [0, 1, 2]


def test_killed_run_resumes_and_answers_each_problem_once_in_order(fake, tmp_path, capsys):
    write_jsonl(tmp_path / "data.jsonl", rows(7))
    fake.kill_after = 4  # batches of 2: the third batch (problems 4, 5) is in flight when stopped
    code, _, err = run(tmp_path, capsys)
    assert code == 130 and "rerun the same command" in err
    assert [r["index"] for r in read_jsonl(tmp_path / "out.jsonl")] == [0, 1, 2, 3]
    fake.kill_after = None
    assert run(tmp_path, capsys)[0] == 0
    assert fake.searched == [f"What is {i}?" for i in range(7)]  # 0-3 before, 4-6 after
    assert [r["index"] for r in read_jsonl(tmp_path / "out.jsonl")] == list(range(7))


def test_finished_run_searches_nothing_and_loads_no_model(fake, tmp_path, capsys):
    write_jsonl(tmp_path / "data.jsonl", rows(3))
    assert run(tmp_path, capsys)[0] == 0
    before = (tmp_path / "out.jsonl").read_bytes()
    FakeLLM.loaded, fake.searched = [], []
    code, out, _ = run(tmp_path, capsys)
    assert code == 0 and "3/3" in out
    assert FakeLLM.loaded == [] and fake.searched == []
    assert (tmp_path / "out.jsonl").read_bytes() == before


def test_truncated_last_line_is_redone_with_a_warning(fake, tmp_path, capsys):
    write_jsonl(tmp_path / "data.jsonl", rows(4))
    assert run(tmp_path, capsys)[0] == 0
    out = tmp_path / "out.jsonl"
    text = out.read_text()
    out.write_text(text[: text.rindex("\n", 0, len(text) - 1) + 40])  # line 4 cut short
    fake.searched = []
    code, _, err = run(tmp_path, capsys)
    assert code == 0 and "line 4 is incomplete" in err
    assert fake.searched == ["What is 3?"]  # only the lost problem: results do not depend on batches
    assert [r["index"] for r in read_jsonl(out)] == [0, 1, 2, 3]


def test_resumed_run_answers_as_an_unbroken_one(fake, tmp_path, capsys, monkeypatch):
    """A problem's samples are keyed by its index in the data file (``problem_ids``), so a run
    resumed with another batch size gives the unbroken run's answers."""
    def id_keyed(llm, problems, n, problem_ids=None, **kwargs):
        results = fake(llm, problems, n, **kwargs)
        return [SearchResult(r.problem, f"{r.answer}@{k}", 0, r.candidates, r.cost, "fake")
                for k, r in zip(problem_ids, results, strict=True)]

    use_strategy(monkeypatch, "fake", id_keyed)
    write_jsonl(tmp_path / "data.jsonl", rows(7))
    assert run(tmp_path, capsys, "--batch-size", "3")[0] == 0
    out = tmp_path / "out.jsonl"
    unbroken = [r["predicted"] for r in read_jsonl(out)]
    assert unbroken == [f"{i}@{i}" for i in range(7)]
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:4]) + lines[4][:30])  # the second batch cut after one line
    assert run(tmp_path, capsys, "--batch-size", "2")[0] == 0
    assert [r["predicted"] for r in read_jsonl(out)] == unbroken


@pytest.mark.parametrize("template, named", [
    ("problems[{}]: its prompt is too long", "problem 5 of --data: its prompt is too long"),
    ("n: 4 sequences for problems[{}] need 22 KV blocks", "for problem 5 of --data need 22"),
])
def test_a_problem_refused_in_a_later_batch_is_named_by_its_data_index(fake, tmp_path, capsys,
                                                                        monkeypatch, template,
                                                                        named):
    def refuses_five(llm, problems, n, **kwargs):
        if "What is 5?" in problems:
            raise ValueError(template.format(problems.index("What is 5?")))
        return fake(llm, problems, n, **kwargs)

    use_strategy(monkeypatch, "fake", refuses_five)
    write_jsonl(tmp_path / "data.jsonl", rows(7))
    code, _, err = run(tmp_path, capsys)
    assert code == 2 and "Traceback" not in err
    assert "--strategy fake: " in err and named in err
    assert [r["index"] for r in read_jsonl(tmp_path / "out.jsonl")] == [0, 1, 2, 3]


def test_rerun_with_another_batch_size_goes_on(fake, tmp_path, capsys):
    """The batch size cannot change a result, so it is not a setting: a rerun may change it."""
    write_jsonl(tmp_path / "data.jsonl", rows(4))
    assert run(tmp_path, capsys, "--limit", "2")[0] == 0
    fake.searched = []
    assert run(tmp_path, capsys, "--batch-size", "3")[0] == 0
    assert fake.searched == ["What is 2?", "What is 3?"]
    assert all("batch_size" not in r["settings"] for r in read_jsonl(tmp_path / "out.jsonl"))


def test_changed_data_is_reported_not_mixed(fake, tmp_path, capsys):
    data = rows(4)
    write_jsonl(tmp_path / "data.jsonl", data)
    assert run(tmp_path, capsys, "--limit", "3")[0] == 0
    data[1]["problem"] = "What is 11?"
    write_jsonl(tmp_path / "data.jsonl", data)
    before = (tmp_path / "out.jsonl").read_bytes()
    code, _, err = run(tmp_path, capsys)
    assert code == 2 and "line 2: problem 1 is not the data file's problem 1" in err
    assert "data file changed" in err
    assert (tmp_path / "out.jsonl").read_bytes() == before


def test_rerun_with_other_settings_is_reported(fake, tmp_path, capsys):
    write_jsonl(tmp_path / "data.jsonl", rows(4))
    assert run(tmp_path, capsys, "--limit", "2")[0] == 0
    code, _, err = run(tmp_path, capsys, n="4")
    assert code == 2 and "other settings" in err and "n: 2 written, 4 now" in err


def test_damaged_output_line_is_named(fake, tmp_path, capsys):
    write_jsonl(tmp_path / "data.jsonl", rows(2))
    write_jsonl(tmp_path / "out.jsonl", ["not json", "{}"])
    code, _, err = run(tmp_path, capsys)
    assert code == 2 and "line 1: not valid JSON" in err


def test_run_prints_the_summary_of_every_answered_problem(fake, tmp_path, capsys):
    write_jsonl(tmp_path / "data.jsonl", rows(6, wrong={0, 4}))  # levels 1, 2, 3, 1, 2, 3
    fake.kill_after = 2
    assert run(tmp_path, capsys)[0] == 130
    fake.kill_after = None
    code, out, _ = run(tmp_path, capsys)
    assert code == 0
    assert re.search(r"accuracy\s+66\.7%\s+4/6", out)
    assert re.search(r"level 1\s+50\.0%\s+1/2", out) and re.search(r"level 2\s+50\.0%\s+1/2", out)
    assert re.search(r"level 3\s+100\.0%\s+2/2", out)
    assert re.search(r"tokens generated\s+36\n", out)  # 6 problems x n=2 x 3 tokens


# End to end on a tiny random model -----------------------------------------------------------

def tiny_best_of_n(llm, problems, n, verifier=None, sampling=None, *, select=None, agg="last",
                   seed=0, references=None, system_prompt=None, step_delimiter="\n\n",
                   progress=True, **options):
    """Best-of-N at its plainest: sample n, score whole solutions, keep the best (first of ties)."""
    start = time.perf_counter()
    outputs = llm.generate(problems, dataclasses.replace(sampling, n=n, seed=seed), use_tqdm=False)
    results = []
    for i, (problem, output) in enumerate(zip(problems, outputs, strict=True)):
        candidates = []
        for completion in output.outputs:
            steps = split_steps(completion.text, step_delimiter)
            reference = references[i] if references else None
            scores = verifier.score_solution(problem, steps, reference) if steps else []
            candidates.append(Candidate(completion.text, completion.token_ids, steps, scores,
                                        scores[-1] if scores else None,
                                        extract_answer(completion.text)))
        chosen = max(range(n), key=lambda k: candidates[k].score or 0.0)
        cost = Cost(generated_tokens=sum(len(c.token_ids) for c in candidates),
                    prefilled_tokens=len(output.prompt_token_ids),
                    seconds=(time.perf_counter() - start) / len(problems))
        answer = candidates[chosen].answer
        results.append(SearchResult(problem, answer, chosen, candidates, cost, "tiny"))
    return results


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    import torch
    import transformers

    tokenizer = build_tokenizer()
    directory = tmp_path_factory.mktemp("tiny_llama")
    config = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=tokenizer.get_vocab_size(), max_position_embeddings=256,
        eos_token_id=tokenizer.token_to_id("</s>"), bos_token_id=tokenizer.token_to_id("<s>"),
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(directory)
    save_tokenizer(directory)
    return directory


def run_tiny(tiny_model, tmp_path, strategy: str, out: str) -> int:
    """``ttscale run --oracle`` on three toy problems, n=3, keeping every candidate."""
    data = write_jsonl(tmp_path / "toy.jsonl", [
        {"problem": "Q: 3+4\n", "answer": "7", "level": 1},
        {"problem": "Q: (2*3)-1\n", "answer": "5", "level": 2},
        {"problem": "Q: 9-2\n", "answer": "7", "level": 1},
    ])
    return cli.main([
        "run", "--model", str(tiny_model), "--oracle", "--strategy", strategy, "--n", "3",
        "--data", str(data), "--out", str(tmp_path / out), "--batch-size", "2",
        "--max-tokens", "12", "--step-delimiter", "\\n", "--device", "cpu", "--kv-budget", "0.01",
        "--save-candidates",
    ])


def test_end_to_end_on_a_tiny_model_with_the_oracle(tiny_model, monkeypatch, tmp_path, capsys):
    use_strategy(monkeypatch, "tiny", tiny_best_of_n)
    assert run_tiny(tiny_model, tmp_path, "tiny", "a.jsonl") == 0
    out = capsys.readouterr().out
    assert re.search(r"accuracy\s+\S+%\s+\d/3", out) and "level 2" in out
    assert re.search(r"coverage@1\s+\S+%", out) and re.search(r"coverage@3\s+\S+%", out)
    records = read_jsonl(tmp_path / "a.jsonl")
    assert [r["index"] for r in records] == [0, 1, 2]
    for record in records:
        assert record["num_candidates"] == 3 and len(record["search"]["candidates"]) == 3
        assert 3 <= record["cost"]["generated_tokens"] <= 3 * 12
        assert record["cost"]["prefilled_tokens"] == len(record["problem"]) + 1  # chars and <s>
        assert record["correct"] == (record["predicted"] == record["reference"])
    assert run_tiny(tiny_model, tmp_path, "tiny", "b.jsonl") == 0  # same seed, same search
    again = [r["search"]["candidates"] for r in read_jsonl(tmp_path / "b.jsonl")]
    assert again == [r["search"]["candidates"] for r in records]


@pytest.mark.skipif(importlib.util.find_spec("ttscale.search.best_of_n") is None,
                    reason="ttscale.search.best_of_n is not written yet")
def test_end_to_end_with_the_library_best_of_n(tiny_model, tmp_path, capsys):
    assert run_tiny(tiny_model, tmp_path, "best_of_n", "a.jsonl") == 0
    records = read_jsonl(tmp_path / "a.jsonl")
    assert [r["index"] for r in records] == [0, 1, 2]
    assert all(r["num_candidates"] == 3 and r["cost"]["generated_tokens"] > 0 for r in records)


def test_revisions_needs_sequential(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"problem": "1+1", "answer": "2"}\n')
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["run", "--model", str(tmp_path), "--strategy", "revisions", "--n", "4",
                  "--data", str(data), "--out", str(tmp_path / "o.jsonl")])
    assert exit_info.value.code == 2


def test_sequential_is_only_for_revisions(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text('{"problem": "1+1", "answer": "2"}\n')
    with pytest.raises(SystemExit):
        cli.main(["run", "--model", str(tmp_path), "--strategy", "best_of_n", "--n", "4", "--sequential", "2",
                  "--data", str(data), "--out", str(tmp_path / "o.jsonl")])
    assert "--sequential: not an option of best_of_n" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["demo", "--help"], ["run", "--help"]])
def test_python_dash_m_ttscale_is_the_ttscale_command(argv):
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    script = shutil.which("ttscale", path=str(Path(sys.executable).parent))
    assert script is not None, "the ttscale script is not installed beside this Python"
    module = subprocess.run([sys.executable, "-m", "ttscale", *argv], capture_output=True, text=True,
                            timeout=120)
    command = subprocess.run([script, *argv], capture_output=True, text=True, timeout=120)
    assert module.returncode == command.returncode == 0, module.stderr + command.stderr
    assert module.stdout == command.stdout and module.stdout


@pytest.mark.parametrize("strategy", ["best_of_n", "beam_search"])
def test_result_lines_do_not_depend_on_the_batch_size(tiny_model, tmp_path, strategy):
    """The same problems searched in batches of 1, 7 and 16 give the same lines (up to timing)."""
    data = write_jsonl(tmp_path / "toy.jsonl", [
        {"problem": f"Q: {a}+{b}\n", "answer": str(a + b), "level": 1}
        for a, b in [(3, 4), (2, 9), (5, 5), (8, 1), (7, 7), (1, 6), (4, 4), (9, 3), (6, 2)]])
    lines = {}
    for batch in (1, 7, 16):
        out = tmp_path / f"{strategy}-{batch}.jsonl"
        assert cli.main([
            "run", "--model", str(tiny_model), "--oracle", "--strategy", strategy, "--n", "4",
            "--data", str(data), "--out", str(out), "--batch-size", str(batch),
            "--max-tokens", "12", "--step-delimiter", "\\n", "--device", "cpu",
            "--kv-budget", "0.01", "--save-candidates", "--temperature", "1.0",
            *(["--beam-width", "2"] if strategy == "beam_search" else []),
        ]) == 0
        lines[batch] = [_untimed(r) for r in read_jsonl(out)]
    assert len(lines[1]) == 9
    assert lines[1] == lines[7] == lines[16]


def _untimed(record: dict) -> dict:
    record = dict(record)
    record.pop("wall_seconds", None)
    record["cost"] = {k: v for k, v in record["cost"].items() if k != "seconds"}
    if "search" in record:
        record["search"] = {k: v for k, v in record["search"].items() if k not in ("cost", "seconds")}
    return record


# A user's mistake is one line naming the flag; a failure one line; --debug the traceback -------


@pytest.mark.parametrize("argv, flag", [
    (["demo", "--n", "6", "--strategies", "beam_search"], "--n"),
    (["demo", "--strategies", "nope"], "--strategies"),
    (["selfcheck", "--device", "tpu"], "--device"),
], ids=["demo-n", "demo-strategies", "selfcheck-device"])
def test_usage_errors_are_one_line_naming_the_flag(argv, flag, capsys):
    with pytest.raises(SystemExit) as caught:
        cli.main(argv)
    err = capsys.readouterr().err
    assert caught.value.code == 2 and f"argument {flag}" in err and "Traceback" not in err


def test_demo_out_that_is_a_file_is_refused_before_any_work(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit) as caught:
        cli.main(["demo", "--out", str(tmp_path / "file")])
    assert caught.value.code == 2 and "argument --out" in capsys.readouterr().err


def test_run_out_that_cannot_be_written_is_refused_before_models_load(fake, tmp_path, capsys):
    write_jsonl(tmp_path / "data.jsonl", rows(2))
    argv = ["run", "--model", str(tmp_path / "model"), "--strategy", "fake", "--n", "2",
            "--data", str(tmp_path / "data.jsonl"), "--out", "/proc/ttscale-out.jsonl"]
    with pytest.raises(SystemExit) as caught:
        cli.main(argv)
    assert caught.value.code == 2 and "argument --out: cannot write" in capsys.readouterr().err
    assert FakeLLM.loaded == []


def test_a_failing_run_is_one_line_and_debug_shows_the_traceback(fake, tmp_path, capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("the device fell over")

    use_strategy(monkeypatch, "fake", broken)
    write_jsonl(tmp_path / "data.jsonl", rows(2))
    code, _, err = run(tmp_path, capsys)
    assert code == 1 and "RuntimeError: the device fell over" in err and "Traceback" not in err
    assert "--debug" in err
    with pytest.raises(RuntimeError, match="fell over"):
        run(tmp_path, capsys, "--debug")


@pytest.mark.parametrize("argv", [["demo", "--n", "6", "--strategies", "beam_search"],
                                  ["selfcheck", "--device", "cuda:0"] if not __import__("torch").cuda.is_available()
                                  else ["selfcheck", "--device", "tpu"]])
def test_usage_errors_in_a_real_process_print_no_traceback(argv):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "ttscale", *argv], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("ttscale ")
