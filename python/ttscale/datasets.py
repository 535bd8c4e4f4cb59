"""Benchmark problems from JSONL files: MATH-500's ``problem``/``answer``/``level`` or GSM8K's
``question``/``answer`` (whose reference is the text after ``####``), read into
:class:`Problem` records that an evaluation run (:mod:`ttscale.evaluate`) searches and grades."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ttscale._checks import check_path
from ttscale.errors import DataError, InvalidArgument

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


def jsonl_rows(data: bytes, name: str):
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
    path = readable_file("path", path)
    problems = []
    for lineno, line in jsonl_rows(path.read_bytes(), f"data file {path}"):
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


def readable_file(name: str, path) -> Path:
    """``path`` as a Path to an existing file; an error naming the argument otherwise."""
    path = Path(check_path(name, path))
    if not path.exists() or path.is_dir():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise InvalidArgument(f"{name}: {path} {what}; expected a JSONL file", param=name)
    if not os.access(path, os.R_OK):
        raise InvalidArgument(f"{name}: {path} cannot be read", param=name)
    return path
