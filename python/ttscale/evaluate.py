"""Evaluation runs: benchmark problems in, one graded JSON line per problem out, and a summary.

A run reads a JSONL file of problems (MATH-500's ``problem``/``answer``/``level`` or GSM8K's
``question``/``answer``, whose reference is the text after ``####``), searches them a batch at a
time, and appends each batch's result lines to the output file as soon as the batch finishes
(flushed and fsynced), so a killed run loses at most the batch in flight. Run again on the same
output file, it skips the problems already there. A line names its problem by index and by a
hash of the problem's text and carries the run's settings, so a data file that changed in
between, or a rerun with other settings, is reported instead of silently mixed in.

One result line::

    {"index": 3, "id": null, "problem_hash": "5f0c...", "problem": "...", "reference": "18",
     "predicted": "18", "correct": true, "level": null, "num_candidates": 16, "num_correct": 9,
     "cost": {"generated_tokens": ..., "prefilled_tokens": ..., "scored_tokens": ...,
              "seconds": ...},
     "wall_seconds": 1.9, "settings": {...}, "search": {...}}

``wall_seconds`` is the problem's share of its batch's wall time, so the lines of a file add up
to the time that produced them; ``num_correct`` counts the candidates whose answer is right,
from which the summary reports coverage@k (is any of k candidates right: the oracle ceiling of
every verifier and vote); ``search`` (the whole :class:`SearchResult`) is there only when asked
for.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ttscale._checks import check_flag, check_function, check_int, check_path, check_real
from ttscale.errors import DataError, InvalidArgument  # DataError re-exported here
from ttscale.grading import answers_equal, coverage_at_k
from ttscale.search.result import SearchResult

__all__ = [
    "DataError",
    "Problem",
    "read_problems",
    "read_results",
    "result_record",
    "Summary",
    "summarize",
    "format_summary",
    "run_evaluation",
]

Level = int | str


@dataclass(frozen=True)
class Problem:
    """One benchmark problem: ``index`` is its position among the file's problems (from 0)."""

    index: int
    text: str
    reference: str
    level: Level | None = None
    id: str | int | None = None

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()[:16]


def _jsonl_rows(data: bytes, name: str):
    """(line number, line text) for each non-blank line; undecodable bytes name their line."""
    for lineno, raw in enumerate(data.split(b"\n"), 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise DataError(f"{name}, line {lineno}: not UTF-8 text ({error.reason})") from None
        if line.strip():
            yield lineno, line


def _reference(answer: Any, where: str) -> str:
    if isinstance(answer, bool) or not isinstance(answer, str | int | float):
        raise DataError(f"{where}: field 'answer' must be a string or a number, got {answer!r}")
    reference = str(answer)
    if "####" in reference:  # GSM8K: a worked solution whose last line is "#### <answer>"
        reference = reference.rsplit("####", 1)[1]
        if not reference.strip():
            raise DataError(f"{where}: field 'answer' has nothing after '####'")
    if not reference.strip():
        raise DataError(f"{where}: field 'answer' is empty")
    return reference.strip()


def _problem(row: Any, index: int, where: str) -> Problem:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    name = "problem" if "problem" in row else "question"
    if name not in row:
        raise DataError(f"{where}: missing field 'problem' (or 'question')")
    text = row[name]
    if not isinstance(text, str) or not text.strip():
        raise DataError(f"{where}: field {name!r} must be a non-empty string, got {text!r}")
    if "answer" not in row:
        raise DataError(f"{where}: missing field 'answer'")
    level = row.get("level")
    if level is not None and (isinstance(level, bool) or not isinstance(level, int | str)):
        raise DataError(f"{where}: field 'level' must be an integer or a string, got {level!r}")
    problem_id = row.get("id", row.get("unique_id"))
    if problem_id is not None and (
        isinstance(problem_id, bool) or not isinstance(problem_id, int | str)
    ):
        raise DataError(f"{where}: field 'id' must be an integer or a string, got {problem_id!r}")
    return Problem(index, text, _reference(row["answer"], where), level, problem_id)


def read_problems(path: str | Path) -> list[Problem]:
    """Every problem of a JSONL file, in file order; blank lines are skipped.

    Each line is a JSON object with ``problem`` (or ``question``) and ``answer``, and optionally
    ``level`` and ``id`` (or ``unique_id``). An ``answer`` holding ``####`` (GSM8K) is reduced
    to the text after it.

    Raises
    ------
    DataError
        Naming the file, the line and what is wrong with it, or if the file holds no problem.
    """
    path = _readable_file("path", path)
    problems = []
    for lineno, line in _jsonl_rows(path.read_bytes(), f"data file {path}"):
        where = f"data file {path}, line {lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(
                f"{where}: not valid JSON ({error.msg}, column {error.colno})"
            ) from None
        problems.append(_problem(row, len(problems), where))
    if not problems:
        raise DataError(f"data file {path}: no problems in it")
    return problems


def result_record(
    problem: Problem,
    result: SearchResult,
    wall_seconds: float,
    settings: dict[str, Any],
    save_candidates: bool = False,
) -> dict[str, Any]:
    """The JSON-ready result line of one searched problem, its answer graded (module docstring)."""
    if not isinstance(problem, Problem):
        raise InvalidArgument(f"problem: expected a Problem, got {type(problem).__name__}")
    if not isinstance(result, SearchResult):
        raise InvalidArgument(f"result: expected a SearchResult, got {type(result).__name__}")
    wall_seconds = check_real("wall_seconds", wall_seconds, low=0)
    settings = _settings(settings)
    check_flag("save_candidates", save_candidates)
    record = {
        "index": problem.index,
        "id": problem.id,
        "problem_hash": problem.digest,
        "problem": problem.text,
        "reference": problem.reference,
        "predicted": result.answer,
        "correct": answers_equal(result.answer, problem.reference),
        "level": problem.level,
        "num_candidates": len(result.candidates),
        "num_correct": _num_correct(result, problem.reference),
        "cost": asdict(result.cost),
        "wall_seconds": wall_seconds,
        "settings": settings,
    }
    if save_candidates:
        record["search"] = result.to_dict()
    return record


def _num_correct(result: SearchResult, reference: str) -> int:
    """How many of the candidates are right (each distinct answer graded once)."""
    answers = [c.answer for c in result.candidates]
    right = {a: answers_equal(a, reference) for a in set(answers) if a is not None}
    return sum(right.get(a, False) for a in answers)


def _settings_changes(written: Any, now: dict[str, Any]) -> str:
    if not isinstance(written, dict):
        return f"settings: {written!r} written, {now!r} now"
    keys = sorted(set(written) | set(now))
    return "; ".join(
        f"{k}: {written.get(k)!r} written, {now.get(k)!r} now"
        for k in keys
        if written.get(k) != now.get(k)
    )


def read_results(
    path: str | Path, problems: Sequence[Problem], settings: dict[str, Any]
) -> tuple[list[dict[str, Any]], int]:
    """The result lines a previous run left in ``path``, checked against this run.

    A last line without its newline (a run killed while writing it) is dropped with a warning so
    that its problem is searched again.

    Parameters
    ----------
    problems : every problem of the data file (not only those this run searches).
    settings : this run's settings; every line must carry the same.

    Returns
    -------
    records : the complete lines, in file order.
    keep_bytes : the length of the file without the dropped line; the caller truncates to it.

    Raises
    ------
    DataError
        A line that is not a result line, a problem answered twice, a line whose problem is not
        the data file's problem of that index (the data changed), or other settings.
    """
    check_path("path", path)
    path = Path(path)
    _problem_list("problems", problems)
    settings = _settings(settings)
    if not path.exists():
        return [], 0
    path = _readable_file("path", path)
    data = path.read_bytes()
    keep_bytes = data.rfind(b"\n") + 1
    if data[keep_bytes:].strip():
        lineno = data.count(b"\n") + 1
        print(
            f"warning: output file {path}, line {lineno} is incomplete (a run stopped while "
            "writing it); its problem will be searched again",
            file=sys.stderr,
        )
    records, seen = [], {}
    for lineno, line in _jsonl_rows(data[:keep_bytes], f"output file {path}"):
        where = f"output file {path}, line {lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(
                f"{where}: not valid JSON ({error.msg}); not a ttscale result file, or damaged"
            ) from None
        index = record.get("index") if isinstance(record, dict) else None
        if not isinstance(index, int) or not isinstance(record.get("problem_hash"), str):
            raise DataError(f"{where}: not a result line (needs 'index' and 'problem_hash')")
        if index >= len(problems) or problems[index].digest != record["problem_hash"]:
            raise DataError(
                f"{where}: problem {index} is not the data file's problem {index}; the "
                "data file changed since this output was written; use a new output file"
            )
        if index in seen:
            raise DataError(f"{where}: problem {index} was already answered on line {seen[index]}")
        if record.get("settings") != settings:
            raise DataError(
                f"{where}: written with other settings "
                f"({_settings_changes(record.get('settings'), settings)}); rerun with "
                "those settings or use a new output file"
            )
        seen[index] = lineno
        records.append(record)
    return records, keep_bytes


@dataclass
class Summary:
    """Accuracy and cost over a set of result lines."""

    problems: int = 0
    correct: int = 0
    by_level: dict[Level, list[int]] = field(default_factory=dict)  # level -> [correct, problems]
    generated_tokens: int = 0
    prefilled_tokens: int = 0
    scored_tokens: int = 0
    wall_seconds: float = 0.0
    # (candidates, right ones) per problem, for coverage@k; None once a line lacks them (a line
    # written before num_correct was recorded)
    pools: list[tuple[int, int]] | None = field(default_factory=list)

    COST_KEYS = ("generated_tokens", "prefilled_tokens", "scored_tokens")

    @property
    def accuracy(self) -> float:
        return self.correct / self.problems if self.problems else 0.0

    @property
    def tokens_per_second(self) -> float:
        """Policy tokens generated per second of wall time."""
        return self.generated_tokens / self.wall_seconds if self.wall_seconds > 0 else 0.0

    def add(self, record: dict[str, Any]) -> None:
        self.problems += 1
        self.correct += bool(record["correct"])
        if record.get("level") is not None:
            counts = self.by_level.setdefault(record["level"], [0, 0])
            counts[0] += bool(record["correct"])
            counts[1] += 1
        cost = record["cost"]
        self.generated_tokens += cost["generated_tokens"]
        self.prefilled_tokens += cost["prefilled_tokens"]
        self.scored_tokens += cost["scored_tokens"]
        self.wall_seconds += record["wall_seconds"]
        if self.pools is not None and isinstance(record.get("num_correct"), int):
            self.pools.append((record["num_candidates"], record["num_correct"]))
        else:
            self.pools = None

    def coverage(self) -> dict[int, float]:
        """coverage@k (any of k candidates right, the unbiased estimator) for k = 1, 2, 4, ...
        up to the fewest candidates a problem has, and that number; empty without pools."""
        if not self.pools or min(n for n, _ in self.pools) < 1:
            return {}
        most = min(n for n, _ in self.pools)
        ks = sorted({1 << i for i in range(most.bit_length()) if 1 << i <= most} | {most})
        return {k: sum(coverage_at_k(n, c, k) for n, c in self.pools) / len(self.pools)
                for k in ks}

    def to_dict(self) -> dict[str, Any]:
        return {
            **{k: v for k, v in asdict(self).items() if k != "pools"},
            "accuracy": self.accuracy,
            "tokens_per_second": self.tokens_per_second,
            "coverage": {str(k): v for k, v in self.coverage().items()},
        }


def summarize(records: Sequence[dict[str, Any]]) -> Summary:
    """Accuracy overall and by level, tokens and wall time, over result lines."""
    if isinstance(records, str | dict) or not isinstance(records, Sequence):
        raise InvalidArgument(f"records: expected a list of result lines, got {records!r:.60}")
    summary = Summary()
    for i, record in enumerate(records):
        cost = record.get("cost") if isinstance(record, dict) else None
        if (not isinstance(cost, dict) or "correct" not in record or "wall_seconds" not in record
                or not all(key in cost for key in Summary.COST_KEYS)):
            raise InvalidArgument(f"records[{i}]: not a result line (needs 'correct', "
                                  f"'wall_seconds' and 'cost'), got {record!r:.60}")
        summary.add(record)
    return summary


def _level_order(level: Level) -> tuple:
    return (0, level, "") if isinstance(level, int) else (1, 0, level)


def format_summary(summary: Summary) -> str:
    """A table a person can read: accuracy overall and per level, then tokens and time."""
    if not isinstance(summary, Summary):
        raise InvalidArgument(f"summary: expected a Summary, got {type(summary).__name__}")
    rows = [("accuracy", f"{summary.accuracy:7.1%}", f"{summary.correct}/{summary.problems}")]
    for level in sorted(summary.by_level, key=_level_order):
        correct, total = summary.by_level[level]
        rows.append((f"  level {level}", f"{correct / total:7.1%}", f"{correct}/{total}"))
    for k, value in summary.coverage().items():
        rows.append((f"coverage@{k}", f"{value:7.1%}", "any of k candidates right (oracle)"))
    rows += [
        ("tokens generated", f"{summary.generated_tokens:,}", ""),
        ("tokens prefilled", f"{summary.prefilled_tokens:,}", ""),
        ("tokens scored", f"{summary.scored_tokens:,}", ""),
        ("wall time", f"{summary.wall_seconds:.1f} s", ""),
        ("tokens/s", f"{summary.tokens_per_second:,.1f}", "generated"),
    ]
    name_width = max(len(name) for name, _, _ in rows)
    value_width = max(len(value) for _, value, _ in rows)
    return "\n".join(
        f"{name:<{name_width}}  {value:>{value_width}}  {note}".rstrip()
        for name, value, note in rows
    )


def _readable_file(name: str, path) -> Path:
    """``path`` as a Path to an existing file; an error naming the argument otherwise."""
    path = Path(check_path(name, path))
    if not path.exists() or path.is_dir():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise InvalidArgument(f"{name}: {path} {what}; expected a JSONL file", param=name)
    if not os.access(path, os.R_OK):
        raise InvalidArgument(f"{name}: {path} cannot be read", param=name)
    return path


def _writable_file(name: str, path) -> Path:
    """``path`` as a Path to a file that can be appended to (it may not exist yet), checked
    before any search starts."""
    path = Path(check_path(name, path))
    if path.is_dir() or not path.parent.is_dir():
        raise InvalidArgument(f"{name}: {path} is not a file in an existing directory", param=name)
    if path.exists() and not os.access(path, os.W_OK):
        raise InvalidArgument(f"{name}: {path} cannot be written", param=name)
    if not path.exists() and not os.access(path.parent, os.W_OK | os.X_OK):
        raise InvalidArgument(f"{name}: cannot create files in {path.parent}", param=name)
    return path


def _problem_list(name: str, problems) -> list[Problem]:
    if isinstance(problems, str) or not isinstance(problems, Sequence):
        raise InvalidArgument(f"{name}: expected a list of Problems (read_problems), got "
                              f"{problems!r:.60}")
    bad = next((i for i, p in enumerate(problems) if not isinstance(p, Problem)), None)
    if bad is not None:
        raise InvalidArgument(f"{name}[{bad}]: expected a Problem, got {type(problems[bad]).__name__}")
    return list(problems)


def _settings(settings) -> dict[str, Any]:
    """A run's settings in the form they have once written and read back (JSON values)."""
    if not isinstance(settings, dict):
        raise InvalidArgument(f"settings: expected a dict, got {type(settings).__name__}")
    try:
        return json.loads(json.dumps(settings))
    except (TypeError, ValueError) as error:
        raise InvalidArgument(f"settings: expected JSON values ({error})") from None


def _in_turn(search):
    def execute(batches):
        for batch in batches:
            start = time.perf_counter()
            results = search(batch)
            yield batch, results, time.perf_counter() - start

    return execute


def run_evaluation(
    search: Callable[[list[Problem]], list[SearchResult]],
    problems: Sequence[Problem],
    out: str | Path,
    *,
    all_problems: Sequence[Problem] | None = None,
    batch_size: int = 16,
    settings: dict[str, Any] | None = None,
    save_candidates: bool = False,
    progress: bool = True,
    setup: Callable[[], None] | None = None,
    execute: Callable[[list[list[Problem]]], Any] | None = None,
) -> Summary:
    """Search ``problems`` a batch at a time, appending graded result lines to ``out``.

    Problems already answered in ``out`` are skipped (see :func:`read_results`); the rest are
    searched ``batch_size`` at a time. ``search`` must give a problem the result it would give
    it in any batch (the strategies do, with ``problem_ids`` set to the problems' indices), so
    a resumed run, a run with another batch size or a longer ``--limit`` gives the answers an
    unbroken one gives.

    Parameters
    ----------
    search : problems -> one SearchResult each, in order.
    problems : the problems to answer (e.g. the first ``--limit`` of ``all_problems``).
    all_problems : every problem of the data file, to check ``out``'s lines against; default
        ``problems``.
    settings : what the result lines record of this run (strategy, n, seed, ...); JSON values.
    setup : called once before the first search, outside the timed part (loading the models);
        not at all when every problem is answered already.
    execute : ``batches -> iterator of (batch, results, seconds)``, for searches that run
        elsewhere (:mod:`ttscale.distributed`); default: ``search`` on each batch in turn. It
        may yield batches in any order; lines are written as batches come back.

    Returns
    -------
    Summary
        Over every problem of ``problems``, those answered by earlier runs included.
    """
    if not callable(search):
        raise InvalidArgument(f"search: expected a function, got {type(search).__name__}")
    problems = _problem_list("problems", problems)
    all_problems = problems if all_problems is None else _problem_list("all_problems", all_problems)
    known = set(all_problems)
    missing = next((p for p in problems if p not in known), None)
    if missing is not None:
        raise InvalidArgument(f"all_problems: lacks problem {missing.index} of problems")
    out = _writable_file("out", out)
    batch_size = check_int("batch_size", batch_size, low=1)
    settings = _settings({} if settings is None else settings)
    check_flag("save_candidates", save_candidates)
    check_flag("progress", progress)
    check_function("setup", setup)
    check_function("execute", execute)
    records, keep_bytes = read_results(out, all_problems, settings)
    if out.exists() and out.stat().st_size != keep_bytes:
        os.truncate(out, keep_bytes)
    wanted = {p.index for p in problems}
    done = {r["index"]: r for r in records if r["index"] in wanted}
    summary = summarize(list(done.values()))
    if setup is not None and len(done) < len(problems):
        setup()
    bar = tqdm(total=len(problems), initial=len(done), unit="problem", disable=not progress)
    start, generated = time.perf_counter(), 0
    try:
        with out.open("a", encoding="utf-8") as file:
            todo = [p for p in problems if p.index not in done]
            batches = [todo[first : first + batch_size] for first in range(0, len(todo), batch_size)]
            for batch, results, seconds in (execute or _in_turn(search))(batches):
                if len(results) != len(batch):
                    raise RuntimeError(
                        f"search returned {len(results)} results for {len(batch)} problems"
                    )
                share = seconds / len(batch)
                lines = []
                left = list(zip(batch, results, strict=True))
                for problem, result in left:
                    record = result_record(problem, result, share, settings, save_candidates)
                    summary.add(record)
                    generated += record["cost"]["generated_tokens"]
                    lines.append(json.dumps(record, ensure_ascii=False) + "\n")
                file.write("".join(lines))
                file.flush()
                os.fsync(file.fileno())
                bar.update(len(left))
                elapsed = time.perf_counter() - start
                bar.set_postfix(acc=f"{summary.accuracy:.1%}", tok_s=f"{generated / elapsed:,.0f}")
    finally:
        bar.close()
    return summary
