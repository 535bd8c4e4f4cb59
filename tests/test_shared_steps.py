"""Search work joins the scheduler's steps: searches on several threads, and requests beside
them, share decode steps, and each gets the results it gets alone."""

from __future__ import annotations

import threading
import time

import pytest

import ttscale
from ttscale.toy import policy_dir, prm_dir, task

PROBLEMS = [f"Q: {p.text}" for p in task.problems("heldout", 6, seed=2)]


@pytest.fixture(scope="module")
def models(one_thread):
    llm = ttscale.LLM(policy_dir(), device="cpu", kv_budget_bytes=64 << 20)
    prm = ttscale.PRM(prm_dir(), format="math-shepherd", device="cpu", kv_budget_bytes=64 << 20)
    return llm, prm


def beam(llm, prm, problems, seed):
    return ttscale.beam_search(llm, problems, 8, verifier=prm, beam_width=2, seed=seed,
                               prompt_fn=lambda p: p + "\n", step_delimiter=task.STEP_DELIMITER,
                               sampling=ttscale.SamplingParams(temperature=1.0, max_tokens=96),
                               progress=False)


def summary(results):
    """Answers, candidates and token costs (each search charged its own work only)."""
    return [(r.answer, [(c.text, c.step_scores) for c in r.candidates],
             (r.cost.generated_tokens, r.cost.prefilled_tokens, r.cost.scored_tokens))
            for r in results]


def test_two_beam_searches_started_apart_share_steps(models):
    llm, prm = models
    stats = llm.stats
    before = stats().steps
    alone_a = summary(beam(llm, prm, PROBLEMS[:3], seed=1))
    steps_a = stats().steps - before
    before = stats().steps
    alone_b = summary(beam(llm, prm, PROBLEMS[3:], seed=2))
    steps_b = stats().steps - before

    results = {}

    def run(name, problems, seed, delay):
        time.sleep(delay)
        results[name] = summary(beam(llm, prm, problems, seed))

    before = stats().steps
    threads = [threading.Thread(target=run, args=("a", PROBLEMS[:3], 1, 0.0)),
               threading.Thread(target=run, args=("b", PROBLEMS[3:], 2, 0.05))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    together = stats().steps - before
    assert results["a"] == alone_a and results["b"] == alone_b  # same seeds, same results
    assert together < steps_a + steps_b, (together, steps_a, steps_b)  # they shared steps


def test_requests_and_a_search_share_steps(models):
    llm, prm = models
    alone = summary(beam(llm, prm, PROBLEMS[:2], seed=4))
    params = ttscale.SamplingParams(n=4, temperature=1.0, max_tokens=60, seed=9)
    (expected,) = llm.generate(PROBLEMS[2] + "\n", params, use_tqdm=False)
    out = {}

    def search():
        out["search"] = summary(beam(llm, prm, PROBLEMS[:2], seed=4))

    thread = threading.Thread(target=search)
    thread.start()
    (during,) = llm.generate(PROBLEMS[2] + "\n", params, use_tqdm=False)
    thread.join(300)
    assert out["search"] == alone
    assert [c.token_ids for c in during.outputs] == [c.token_ids for c in expected.outputs]

