"""A search step's selection goes through the scheduler: selections that several searches make
at the same time run as one ``select_and_fork`` (one device op, one host read), and each gets
the children it gets alone."""

from __future__ import annotations

import threading
import time

import pytest

import ttscale
from ttscale.engine import forking
from ttscale.engine.work import ForkItem
from ttscale.search.fork import select_and_fork
from ttscale.toy import policy_dir

PROMPTS = [[1, 5, 9, 14, 3], [1, 7, 3, 22]]
SAMPLING = ttscale.SamplingParams(temperature=1.0, max_tokens=40, ignore_eos=True)


def candidates(llm, k):
    """Problem ``k``'s candidates: 6 sequences in two groups of 3, each 20 tokens in."""
    (prompt,) = llm.engine.add_many([PROMPTS[k]])
    prompt.stream_key = k  # its samples follow from k, as a search's problems' do
    seqs = llm.engine.fork(prompt, 6)
    llm.scheduler.decode(seqs, SAMPLING, max_new_tokens=20)
    return seqs


def select(llm, seqs, k):
    """Keep 2 of each group of 3 (and 1 of the last), 3 children each, by fixed scores."""
    scores = [0.3, 0.9, 0.1, float(k), 0.5, 0.7]
    return select_and_fork(llm.engine, seqs, scores, [3, 3], [2, 1], 3)


def outcome(llm, forked):
    """Each child's parent, the group sizes, and what each child writes next (its KV right)."""
    llm.scheduler.decode(forked.children, SAMPLING)
    return forked.parents, forked.group_sizes, [s.tokens for s in forked.children]


@pytest.fixture
def policy(one_thread):
    return lambda: ttscale.LLM(policy_dir(), device="cpu", seed=3, kv_budget_bytes=8 << 20)


def test_selections_queued_together_run_as_one_op(policy, monkeypatch):
    alone = []
    for k in range(2):
        llm = policy()
        alone.append(outcome(llm, select(llm, candidates(llm, k), k)))
    llm = policy()
    seqs = [candidates(llm, k) for k in range(2)]
    calls = []
    original = forking.select_and_fork
    monkeypatch.setattr(forking, "select_and_fork", lambda engine, cands, *a: (
        calls.append(len(cands)) or original(engine, cands, *a)))
    forked = {}

    def run(k):
        forked[k] = select(llm, seqs[k], k)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(2)]
    reads = llm.engine.pool.host_reads
    with llm.engine.lock:  # both selections queue while the engine is busy
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 10
        while len(llm.scheduler._incoming_forks) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
    for thread in threads:
        thread.join(30)
    assert calls == [12]  # one op over both searches' candidates
    assert llm.engine.pool.host_reads - reads == 1  # and one host read
    for k in range(2):
        assert outcome(llm, forked[k]) == alone[k]


def item(llm, seqs, keep, children):
    """A queued selection of ``seqs`` (two groups of 3, equal scores), checked as the scheduler
    checks it."""
    return ForkItem(list(seqs), *forking.check_selection(seqs, [0.0] * 6, [3, 3], keep, children))


def test_a_selection_freed_after_it_was_queued_fails_alone(policy):
    llm = policy()
    good, bad = candidates(llm, 0), candidates(llm, 1)
    items = [item(llm, bad, 1, 1), item(llm, good, 1, 2)]
    llm.engine.free(bad[:1])
    with llm.engine.lock:
        llm.scheduler._run_forks(items)
    assert isinstance(items[0].error, ttscale.errors.InvalidArgument)
    children, parents, offsets = items[1].result
    assert items[1].error is None and parents == [0, 0, 3, 3] and offsets == [0, 2, 4]
    assert all(not s.freed for s in children)


@pytest.mark.parametrize("keep, children, scores, name", [
    ([1, 1, 1], 1, None, "keep"), (-1, 1, None, "keep"), (1, [2], None, "children"),
    (1, 1, [0.0, None, 0.0, 0.0, 0.0, 0.0], "scores"), (1, 1, [[0.0]] * 6, "scores")])
def test_a_bad_selection_is_refused_at_the_call(policy, keep, children, scores, name):
    """Checked on the caller's thread, before it is queued: it never joins another's op."""
    llm = policy()
    seqs = candidates(llm, 0)
    scores = [0.0] * 6 if scores is None else scores
    with pytest.raises(ttscale.errors.InvalidArgument, match=name) as error:
        llm.scheduler.select_and_fork(seqs, scores, [3, 3], keep, children)
    assert error.value.param == name and llm.scheduler._incoming_forks == []


def test_an_error_in_the_op_reaches_every_caller(policy, monkeypatch):
    """Whatever the joint op raises, each queued item is done with it (no caller waits for
    ever), and an interrupt goes on up."""
    llm = policy()
    items = [item(llm, candidates(llm, k), 1, 1) for k in range(2)]

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(forking, "select_and_fork", interrupted)
    with pytest.raises(KeyboardInterrupt), llm.engine.lock:
        llm.scheduler._run_forks(items)
    assert all(i.done and isinstance(i.error, KeyboardInterrupt) for i in items)


def test_an_interrupted_caller_takes_its_selection_back(policy, monkeypatch):
    """A caller interrupted while its selection waits in the queue: it is not run later (its
    candidates stay as they were)."""
    llm = policy()
    seqs = candidates(llm, 0)
    scheduler = llm.scheduler

    class Lock:  # the engine's lock, raising the interrupt where the caller would wait for it
        def __enter__(self):
            raise KeyboardInterrupt

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(scheduler, "lock", Lock())
    with pytest.raises(KeyboardInterrupt):
        scheduler.select_and_fork(seqs, [0.0] * 6, [3, 3], 1, 1)
    assert scheduler._incoming_forks == [] and not any(s.freed for s in seqs)
