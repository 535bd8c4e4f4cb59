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

import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ttscale._checks import check_flag, check_function, check_int, check_path, check_real
from ttscale.datasets import Problem, jsonl_rows, read_problems, readable_file
from ttscale.errors import DataError, InvalidArgument  # DataError re-exported here
from ttscale.grading import answers_equal
from ttscale.search.result import SearchResult
from ttscale.summary import Summary, format_summary, summarize

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
    path = readable_file("path", path)
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
    for lineno, line in jsonl_rows(data[:keep_bytes], f"output file {path}"):
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
