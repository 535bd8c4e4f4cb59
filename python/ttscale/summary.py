"""Accuracy, coverage and cost over an evaluation's result lines, and the table that prints them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from ttscale.datasets import Level
from ttscale.errors import InvalidArgument
from ttscale.grading import coverage_at_k


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
