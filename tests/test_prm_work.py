"""A PRM's scoring runs through its own scheduler: scoring calls that several searches make at
the same time share one forward, and each gets what it gets alone."""

from __future__ import annotations

import threading
import time

import pytest
import torch

import ttscale
from ttscale.toy import prm_dir

PROBLEMS = ["Q: (12+5)*3", "Q: 40-(7+8)"]
STEPS = [["12+5=17", "17*3=51"], ["7+8=15", "40-15=25"]]


@pytest.fixture
def prm(one_thread):
    return ttscale.PRM(prm_dir(), format="math-shepherd", device="cpu", kv_budget_bytes=8 << 20)


def pending_paths(prm, k):
    """Problem ``k``'s path with its first step appended, not yet run."""
    (root,) = prm.start([PROBLEMS[k]])
    (path,) = prm.fork([root], [0])
    prm.free([root])
    prm.engine.extend(path.seq, prm.format.step(STEPS[k][0], 0, path.last).ids)
    return path


def test_prefills_queued_together_run_in_one_forward(prm, monkeypatch):
    engine, scheduler = prm.engine, prm.scheduler
    alone = {}
    for k in range(2):
        path = pending_paths(prm, k)
        at = {path.seq: [len(path.seq.tokens) - 1]}
        alone[k] = scheduler.prefill([path.seq], at).hidden[path.seq]
    calls = []
    run_pending = engine.run_pending
    monkeypatch.setattr(engine, "run_pending",
                        lambda seqs, **kw: calls.append(len(seqs)) or run_pending(seqs, **kw))
    paths = [pending_paths(prm, k) for k in range(2)]
    pending = [path.seq.pending for path in paths]
    out = {}

    def score(k):
        seq = paths[k].seq
        out[k] = scheduler.prefill([seq], {seq: [len(seq.tokens) - 1]})

    threads = [threading.Thread(target=score, args=(k,)) for k in range(2)]
    with engine.lock:  # both calls queue their work while the engine is busy
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 10
        while len(scheduler._incoming_prefills) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
    for thread in threads:
        thread.join(30)
    assert calls == [2]  # one forward for both
    for k in range(2):
        torch.testing.assert_close(out[k].hidden[paths[k].seq], alone[k], rtol=1e-5, atol=1e-5)
        assert out[k].tokens == pending[k] > 0  # what each caller is charged


def test_a_prefill_that_cannot_fit_fails_alone(one_thread):
    prm = ttscale.PRM(prm_dir(), format="math-shepherd", device="cpu", kv_budget_bytes=6 << 16)
    scheduler = prm.scheduler
    small = pending_paths(prm, 0)
    (root,) = prm.start([PROBLEMS[1]])
    (big,) = prm.fork([root], [0])
    prm.engine.extend(big.seq, prm.tokenizer.encode(" 1+1=2" * 40))  # more than the pool holds
    items = []
    scheduler._incoming_prefills += [
        ttscale.engine.work.PrefillItem([small.seq], {small.seq: [len(small.seq.tokens) - 1]}),
        ttscale.engine.work.PrefillItem([big.seq], {big.seq: [len(big.seq.tokens) - 1]})]
    with prm.engine.lock:
        items, scheduler._incoming_prefills = scheduler._incoming_prefills, []
        scheduler._run_prefills(items)
    assert items[0].done and items[0].error is None and small.seq.pending == 0
    assert isinstance(items[1].error, ttscale.PoolExhausted)


def test_two_threads_scoring_get_the_scores_they_get_alone(prm):
    def score(k):
        (root,) = prm.start([PROBLEMS[k]])
        (path,) = prm.fork([root], [0])
        prm.free([root])
        scores = [prm.score([path], [step], [i == len(STEPS[k]) - 1])[0]
                  for i, step in enumerate(STEPS[k])]
        prm.free([path])
        return scores

    alone = [score(0), score(1)]
    out = {}
    threads = [threading.Thread(target=lambda k=k: out.__setitem__(k, score(k))) for k in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert [out[0], out[1]] == alone
    assert all(s is not None for s in alone[0] + alone[1])
