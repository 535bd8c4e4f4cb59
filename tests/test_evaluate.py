"""ttscale.evaluate: reading problem files (MATH-500, GSM8K, malformed lines) and the summary."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from jsonl_files import rows, write_jsonl

from ttscale.evaluate import DataError, format_summary, read_problems, summarize

DATA_DIR = Path("/work/shared/data")


@pytest.mark.parametrize("line, message", [
    ('{"problem": "What is 1?", "answer": ', "line 3: not valid JSON"),
    ('["What is 1?", "1"]', "line 3: expected a JSON object, got list"),
    ('{"answer": "1"}', "line 3: missing field 'problem' (or 'question')"),
    ('{"problem": "What is 1?"}', "line 3: missing field 'answer'"),
    ('{"problem": "", "answer": "1"}', "line 3: field 'problem' must be a non-empty string"),
    ('{"question": "Sum?", "answer": "so ####"}', "line 3: field 'answer' has nothing after"),
    ('{"problem": "What is 1?", "answer": null}', "line 3: field 'answer' must be a string or"),
    ('{"problem": "What is 1?", "answer": "1", "level": [1]}', "line 3: field 'level'"),
])
def test_malformed_line_is_named_by_file_and_line(tmp_path, line, message):
    path = write_jsonl(tmp_path / "data.jsonl", [rows(1)[0], "", line])
    with pytest.raises(DataError) as error:
        read_problems(path)
    assert str(path) in str(error.value) and message in str(error.value)


def test_line_that_is_not_utf8_is_named(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b'{"problem": "What is 1?", "answer": "1"}\n{"problem": "\xff"}\n')
    with pytest.raises(DataError, match="line 2: not UTF-8"):
        read_problems(path)


def test_blank_lines_are_skipped_and_indices_count_problems(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", ["", rows(2)[0], "  ", rows(2)[1]])
    problems = read_problems(path)
    assert [(p.index, p.text) for p in problems] == [(0, "What is 0?"), (1, "What is 1?")]


def test_empty_data_file_is_an_error(tmp_path):
    with pytest.raises(DataError, match="no problems"):
        read_problems(write_jsonl(tmp_path / "data.jsonl", [""]))


def test_numeric_answers_and_ids_are_kept(tmp_path):
    (problem,) = read_problems(write_jsonl(tmp_path / "data.jsonl", [
        {"problem": "What is 2?", "answer": 2, "id": 17, "level": "Level 3"}]))
    assert (problem.reference, problem.id, problem.level) == ("2", 17, "Level 3")


def test_gsm8k_reference_is_the_text_after_hashes(tmp_path):
    row = {"question": "Janet has 3 ducks and buys 1,000 more. How many?",
           "answer": "She has 3 + 1000 = <<3+1000=1003>>1003.\n#### 1,003"}
    (problem,) = read_problems(write_jsonl(tmp_path / "data.jsonl", [row]))
    assert (problem.text, problem.reference, problem.level) == (row["question"], "1,003", None)


def test_every_gsm8k_row_reads_with_a_bare_reference():
    problems = read_problems(DATA_DIR / "gsm8k_test.jsonl")
    assert len(problems) == 1319 and problems[0].reference == "18"
    assert all("####" not in p.reference and "\n" not in p.reference for p in problems)


def test_every_math500_row_reads_with_its_level():
    problems = read_problems(DATA_DIR / "math500.jsonl")
    assert len(problems) == 500 and {p.level for p in problems} == {1, 2, 3, 4, 5}
    assert problems[0].reference == r"\left( 3, \frac{\pi}{2} \right)"


def record(correct: bool, level, generated: int, wall_seconds: float) -> dict:
    cost = {"generated_tokens": generated, "prefilled_tokens": 5, "scored_tokens": 2,
            "seconds": 1.0}
    return {"correct": correct, "level": level, "cost": cost, "wall_seconds": wall_seconds}


def test_summary_counts_accuracy_by_level_and_cost():
    summary = summarize([record(True, 1, 10, 1.0), record(False, 1, 20, 2.0),
                         record(True, 3, 30, 3.0)])
    assert (summary.correct, summary.problems) == (2, 3)
    assert summary.by_level == {1: [1, 2], 3: [1, 1]}
    tokens = (summary.generated_tokens, summary.prefilled_tokens, summary.scored_tokens)
    assert tokens == (60, 15, 6)
    assert summary.wall_seconds == 6.0 and summary.tokens_per_second == 10.0


def test_summary_table_shows_accuracy_per_level_and_tokens_per_second():
    table = format_summary(summarize([record(True, 1, 10, 1.0), record(False, 1, 20, 2.0),
                                      record(True, 3, 30, 3.0)]))
    assert re.search(r"accuracy\s+66\.7%\s+2/3", table)
    assert re.search(r"level 1\s+50\.0%\s+1/2", table)
    assert re.search(r"level 3\s+100\.0%\s+1/1", table)
    assert re.search(r"tokens generated\s+60\n", table) and re.search(r"tokens/s\s+10\.0", table)


def test_levels_sort_numbers_first_then_names():
    table = format_summary(summarize([record(True, lv, 1, 1.0) for lv in ("b", 10, 2, "a")]))
    assert re.findall(r"level (\S+)", table) == ["2", "10", "a", "b"]


def test_summary_without_levels_has_no_level_rows():
    assert "level" not in format_summary(summarize([record(True, None, 1, 0.0)]))


def test_summary_reports_coverage_from_each_problems_right_candidates():
    from ttscale.grading import coverage_at_k

    lines = [dict(record(True, 1, 10, 1.0), num_candidates=4, num_correct=c) for c in (0, 1, 4)]
    summary = summarize(lines)
    coverage = summary.coverage()
    assert list(coverage) == [1, 2, 4]
    assert coverage[4] == pytest.approx(2 / 3)  # any of all 4 right: two problems of three
    assert coverage[2] == pytest.approx((coverage_at_k(4, 1, 2) + 1.0) / 3)
    assert coverage[1] == pytest.approx((0.25 + 1.0) / 3)  # coverage@1 is the mean right share
    table = format_summary(summary)
    assert re.search(r"coverage@4\s+66\.7%", table) and summary.to_dict()["coverage"]["1"] > 0
    # lines written before num_correct existed: no coverage rather than a wrong one
    assert summarize(lines + [record(True, 1, 10, 1.0)]).coverage() == {}
