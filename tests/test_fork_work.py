"""A search step's selection goes through the scheduler: selections that several searches make
at the same time run as one ``select_and_fork`` (one device op, one host read), and each gets
the children it gets alone."""

from __future__ import annotations

import threading
import time

import pytest

import ttscale
from ttscale.engine import forking
from ttscale.search.fork import select_and_fork
from ttscale.toy import policy_dir

PROMPTS = [[1, 5, 9, 14, 3], [1, 7, 3, 22]]
SAMPLING = ttscale.SamplingParams(temperature=1.0, max_tokens=40, ignore_eos=True)


def candidates(llm, k):
    """Problem ``k``'s candidates: 6 sequences in two groups of 3, each 20 tokens in."""
    (problem,) = llm.engine.add_many([PROMPTS[k]])
    problem.stream_key = k  # its samples follow from k, as a search's problems' do
    seqs = llm.engine.fork(problem, 6)
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


def test_a_selection_of_freed_sequences_fails_alone(policy):
    llm = policy()
    good, bad = candidates(llm, 0), candidates(llm, 1)
    llm.engine.free(bad[:1])
    items = [ttscale.engine.work.ForkItem(bad, [0.0] * 6, [3, 3], [1, 1], [1, 1]),
             ttscale.engine.work.ForkItem(good, [0.0] * 6, [3, 3], [1, 1], [2, 2])]
    with llm.engine.lock:
        llm.scheduler._run_forks(items)
    assert isinstance(items[0].error, ttscale.errors.InvalidArgument)
    children, parents, offsets = items[1].result
    assert items[1].error is None and parents == [0, 0, 3, 3] and offsets == [0, 2, 4]
    assert all(not s.freed for s in children)
