"""JSONL files for the evaluation tests: toy problems "What is i?", writing and reading lines."""

from __future__ import annotations

import json
from pathlib import Path


def rows(count: int, wrong=(), levels: bool = True) -> list[dict]:
    """Problems "What is i?" whose reference is i (i + 100 for the indices in ``wrong``), at
    levels 1, 2, 3, 1, 2, 3, ..."""
    return [
        {"problem": f"What is {i}?", "answer": str(i + 100 if i in wrong else i),
         **({"level": 1 + i % 3} if levels else {})}
        for i in range(count)
    ]


def write_jsonl(path: Path, lines: list) -> Path:
    """One line per item: strings as they are (malformed lines), anything else as JSON."""
    text = "".join((item if isinstance(item, str) else json.dumps(item)) + "\n" for item in lines)
    path.write_text(text)
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]
