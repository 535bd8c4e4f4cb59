"""The demo's runs on threads, so that their sequences share the engine's decode steps.

A run (a strategy at one N) searches every held-out problem. Alone, its steps end on barriers:
a beam search's iteration waits for the last beam to reach its step delimiter, a chain of
revisions for the longest attempt of the position, and meanwhile the batch holds a few rows.
So each run is split into jobs of a few problems (their results do not depend on the split:
each problem keeps its id, which keys its random streams), and jobs run on threads whose decode
work the scheduler batches into one forward per step: one job's tail fills with another's work.

Jobs start in the order given (the longest runs first), as many at once as their sequences fit
in :data:`LINE_BUDGET`, so that the policy's and the PRM's KV pools (each planned per search,
as if alone) hold them all.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

JOB_LINES = 256  # sequences one job holds at most (fewer problems per job for a larger N)
MAX_GROUP = 25  # problems per job at most: a smaller group's barriers end sooner
LINE_BUDGET = 1024  # sequences of all running jobs together (one job at least)


@dataclass
class Run:
    """One row's search: ``search(problems)`` returns the results of those problems (indices
    into the demo's problems) in order; ``lines`` sequences per problem at once."""

    key: Hashable
    search: Callable[[list[int]], list]
    lines: int


def groups(count: int, lines: int) -> list[list[int]]:
    """Problems ``0 .. count - 1`` in consecutive jobs of at most :data:`MAX_GROUP`, and at most
    :data:`JOB_LINES` sequences where a problem holds ``lines``."""
    size = max(1, min(MAX_GROUP, JOB_LINES // max(lines, 1)))
    return [list(range(start, min(start + size, count))) for start in range(0, count, size)]


def run_all(runs: Sequence[Run], count: int,
            on_done: Callable[[Run], None] | None = None,
            ) -> dict[Hashable, tuple[list, tuple[float, float]]]:
    """Run every run's jobs on threads (see the module docstring); per run key, its results
    (all ``count`` problems, in order) and its span: its first job's start and its last job's
    end (``time.perf_counter``).
    ``on_done(run)`` is called as each run completes. A job that raises stops new jobs from
    starting; the first error is raised once the running ones end."""
    jobs = [(run, group) for run in runs for group in groups(count, run.lines)]
    left = {run.key: len(groups(count, run.lines)) for run in runs}
    parts: dict[Hashable, dict[int, list]] = {run.key: {} for run in runs}
    spans: dict[Hashable, list[float]] = {}
    errors: list[BaseException] = []
    cond = threading.Condition()
    running = 0

    def work(run: Run, group: list[int], lines: int) -> None:
        nonlocal running
        try:
            results = run.search(group)
        except BaseException as error:  # noqa: BLE001 - raised again by the caller's thread
            with cond:
                errors.append(error)
        else:
            with cond:
                parts[run.key][group[0]] = results
                spans[run.key][1] = time.perf_counter()
                left[run.key] -= 1
                if not left[run.key] and on_done is not None:
                    on_done(run)
        finally:
            with cond:
                running -= lines
                cond.notify_all()

    threads = []
    for run, group in jobs:
        lines = len(group) * run.lines
        with cond:
            cond.wait_for(lambda: errors or not running or running + lines <= LINE_BUDGET)
            if errors:
                break
            running += lines
            spans.setdefault(run.key, [time.perf_counter(), 0.0])
        thread = threading.Thread(target=work, args=(run, group, lines), daemon=True)
        thread.start()
        threads.append(thread)
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return {key: ([r for start in sorted(part) for r in part[start]], tuple(spans[key]))
            for key, part in parts.items()}
