"""``ttscale.demo_runs``: the demo's runs as jobs of a few problems on threads, their results put
back in problem order, never more sequences at once than the budget, and a job's error raised."""

import threading
import time

import pytest

from ttscale import demo_runs
from ttscale.demo_runs import Run, groups, run_all


@pytest.mark.parametrize("count, lines", [(200, 1), (200, 16), (200, 64), (7, 300), (1, 1)])
def test_groups_cover_every_problem_once_in_bounded_jobs(count, lines):
    jobs = groups(count, lines)
    assert [p for job in jobs for p in job] == list(range(count))
    for job in jobs:
        assert 1 <= len(job) <= demo_runs.MAX_GROUP
        assert len(job) == 1 or len(job) * lines <= demo_runs.JOB_LINES


def test_results_come_back_in_problem_order_per_run():
    runs = [Run(("square",), lambda group: [p * p for p in group], 64),
            Run(("negate",), lambda group: [-p for p in group], 1)]
    done = run_all(runs, 103)
    assert done[("square",)][0] == [p * p for p in range(103)]
    assert done[("negate",)][0] == [-p for p in range(103)]
    for _, (begun, ended) in done.values():
        assert begun <= ended


def test_running_jobs_never_hold_more_than_the_budget(monkeypatch):
    """Jobs start while their sequences fit the budget; a job larger than it runs alone."""
    monkeypatch.setattr(demo_runs, "LINE_BUDGET", 100)
    lock, held, jobs, most, over = threading.Lock(), [0], [0], [0], []

    def search(lines):
        def job(group):
            with lock:
                held[0] += len(group) * lines
                jobs[0] += 1
                most[0] = max(most[0], jobs[0])
                if held[0] > 100 and jobs[0] > 1:
                    over.append(held[0])
            time.sleep(0.01)
            with lock:
                held[0] -= len(group) * lines
                jobs[0] -= 1
            return list(group)
        return job

    runs = [Run((lines,), search(lines), lines) for lines in (64, 16, 4, 1)]
    done = run_all(runs, 60)
    assert all(done[(lines,)][0] == list(range(60)) for lines in (1, 4, 16, 64))
    assert not over  # never two jobs together beyond the budget
    assert most[0] > 1  # and several at once where they fit


def test_a_job_that_raises_stops_the_rest_and_is_raised():
    started = []

    def search(group):
        started.append(group[0])
        if group[0] == 0:
            raise RuntimeError("verifier failed")
        time.sleep(0.01)
        return group

    with pytest.raises(RuntimeError, match="verifier failed"):
        run_all([Run(("a",), search, demo_runs.JOB_LINES)], 50)
    assert len(started) < 50  # one problem per job: the jobs after the error never started
