"""Search waves are admitted through the scheduler: searches that together outgrow the KV pool
run side by side, the older one growing into room the newer one gives up (its sequences are
preempted and recomputed), and each gets the results it gets alone."""

from __future__ import annotations

import threading
import time

import pytest

import ttscale
from ttscale.toy import policy_dir, prm_dir, task

PROBLEMS = [f"Q: {p.text}" for p in task.problems("heldout", 6, seed=2)]
BLOCK_BYTES = 64 << 10  # one 16-token block of the toy policy's KV
LONG = ttscale.SamplingParams(temperature=1.0, max_tokens=96, ignore_eos=True)


@pytest.fixture(scope="module")
def prm(one_thread):
    return ttscale.PRM(prm_dir(), format="math-shepherd", device="cpu", kv_budget_bytes=64 << 20)


def policy(blocks: int) -> ttscale.LLM:
    llm = ttscale.LLM(policy_dir(), device="cpu", kv_budget_bytes=blocks * BLOCK_BYTES)
    assert llm.engine.pool.num_blocks == blocks
    return llm


def best_of_8(llm, prm, problems, seed):
    results = ttscale.best_of_n(llm, problems, 8, verifier=prm, seed=seed, sampling=LONG,
                                prompt_fn=lambda p: p + "\n", step_delimiter=task.STEP_DELIMITER,
                                progress=False)
    return [(r.answer, [(c.text, c.step_scores) for c in r.candidates]) for r in results]


def on_threads(*calls, delay=0.05):
    """Run each call on its own thread, started ``delay`` apart; their results (or errors)."""
    out: dict[int, object] = {}

    def run(i, fn):
        try:
            out[i] = fn()
        except BaseException as error:  # noqa: BLE001 - the test reports it
            out[i] = error

    threads = [threading.Thread(target=run, args=(i, fn)) for i, fn in enumerate(calls)]
    for thread in threads:
        thread.start()
        time.sleep(delay)
    for thread in threads:
        thread.join(300)
    assert not any(t.is_alive() for t in threads), "a search hung"
    return [out[i] for i in range(len(calls))]


def start_together(scheduler, parties=2):
    """Hold each thread's first decode until ``parties`` threads have reached theirs, so that
    the searches decode side by side (the engine's lock is not fair: a thread driving steps could
    otherwise run its whole decode before the other thread gets the lock to add its prompts)."""
    barrier = threading.Barrier(parties, timeout=60)
    started: set[int] = set()
    run_decode = scheduler.run_decode

    def first_together(*args, **kwargs):
        if threading.get_ident() not in started:
            started.add(threading.get_ident())
            barrier.wait()
        return run_decode(*args, **kwargs)

    scheduler.run_decode = first_together


def test_searches_that_outgrow_the_pool_together_both_finish_as_alone(prm):
    """Each wave (3 problems x 8 samples x 96 tokens, 198 blocks at its longest) fits a 220-block
    pool alone, not beside the other: the newer search's rows are preempted while the older
    grows, and both give what they give alone (once this raised PoolExhausted)."""
    big = policy(1024)
    alone = [best_of_8(big, prm, PROBLEMS[:3], 1), best_of_8(big, prm, PROBLEMS[3:], 2)]
    llm = policy(220)
    start_together(llm.scheduler)
    together = on_threads(lambda: best_of_8(llm, prm, PROBLEMS[:3], 1),
                          lambda: best_of_8(llm, prm, PROBLEMS[3:], 2))
    assert together == alone
    assert llm.stats().preemptions > 0  # the pool did run short
    assert llm.scheduler.waves == [] and llm.engine.pool.refresh() == 220  # nothing held


def test_an_older_wave_grows_into_the_blocks_a_newer_wave_holds_between_its_steps():
    """A newer wave's sequences held between decode steps (a search scoring them) give way to
    an older wave's growth, and when decoded again are recomputed to the same tokens."""

    def scenario(llm):
        scheduler = llm.scheduler
        old = scheduler.begin_wave(1, 28)  # its prompt's block and 4 x 7 blocks at 96 tokens
        new = scheduler.begin_wave(1, 12)
        (held_prompt,) = scheduler.add_prompts([[1, 5, 9, 14]], new)
        held = llm.engine.fork(held_prompt, 4)
        scheduler.decode(held, LONG, max_new_tokens=40)  # 4 x 3 blocks, then held
        (prompt,) = scheduler.add_prompts([[1, 7, 3]], old)
        growing = llm.engine.fork(prompt, 4)
        before = llm.stats().preemptions
        scheduler.decode(growing, LONG)  # 4 x 7 blocks: needs the held ones' room
        preempted = [s.kv_len for s in held]
        llm.engine.free(growing)  # the older search is done with them
        scheduler.decode(held, LONG)  # recomputed, then on to 96 tokens
        for wave in (old, new):
            scheduler.end_wave(wave)
        return ([s.tokens for s in growing + held], llm.stats().preemptions - before, preempted)

    tokens, preemptions, preempted = scenario(policy(30))  # room for the older wave only
    expected, none, _ = scenario(policy(1024))
    assert none == 0 and preemptions > 0
    assert 0 in preempted  # held sequences gave their blocks back (as many as it took)
    assert tokens == expected


def test_an_older_waves_context_prefill_takes_the_room_a_newer_wave_holds():
    """RSA's shared context after a prompt is prefilled through the scheduler
    (``prefill_pending``): the blocks it needs come from a newer wave's held sequences, which
    are recomputed to the same tokens when they decode again."""

    def scenario(llm):
        scheduler, engine = llm.scheduler, llm.engine
        old = scheduler.begin_wave(1, 12)
        new = scheduler.begin_wave(1, 12)
        (held_prompt,) = scheduler.add_prompts([[1, 5, 9, 14]], new)
        held = engine.fork(held_prompt, 4)
        scheduler.decode(held, LONG, max_new_tokens=40)  # 4 x 3 blocks, then held
        (prompt,) = scheduler.add_prompts([[1, 7, 3]], old)
        (trunk,) = engine.fork(prompt, 1)
        engine.extend(trunk, [2 + i % 30 for i in range(120)])  # 8 blocks of context
        before = llm.stats().preemptions
        scheduler.prefill_pending([trunk], old)
        assert trunk.kv_len == len(trunk.tokens) - 1
        preempted = [s.kv_len for s in held]
        scheduler.decode([trunk], LONG, max_new_tokens=8)
        engine.free([trunk])
        scheduler.decode(held, LONG, max_new_tokens=2)  # recomputed, then two more tokens
        for wave in (old, new):
            scheduler.end_wave(wave)
        return [s.tokens for s in [trunk, *held]], llm.stats().preemptions - before, preempted

    tokens, preemptions, preempted = scenario(policy(16))  # 2 prompts + 12 held: 2 free
    expected, none, _ = scenario(policy(1024))
    assert none == 0 and preemptions > 0 and 0 in preempted
    assert tokens == expected


def test_a_wave_that_cannot_run_beside_the_others_waits_for_them():
    llm = policy(40)
    scheduler = llm.scheduler
    first = scheduler.begin_wave(2, 37)
    admitted = threading.Event()

    def second():
        wave = scheduler.begin_wave(2, 37)  # alone 39 blocks at its longest; beside the first, 41
        admitted.set()
        scheduler.end_wave(wave)

    thread = threading.Thread(target=second)
    thread.start()
    time.sleep(0.3)
    assert not admitted.is_set()  # the first could not grow to its longest beside it
    scheduler.end_wave(first)
    thread.join(10)
    assert admitted.is_set() and scheduler.waves == []


def test_waves_are_admitted_in_the_order_they_asked():
    """A small wave that would fit beside the running one does not pass a large one that asked
    before it and waits: it is admitted after it (first come, first served)."""
    llm = policy(40)
    scheduler = llm.scheduler
    first = scheduler.begin_wave(2, 30)
    admitted: dict[str, object] = {}

    def ask(name, seq_blocks):
        admitted[name] = scheduler.begin_wave(2, seq_blocks)

    large = threading.Thread(target=ask, args=("large", 37))  # 37 + 2 + 2 > 40 beside the first
    large.start()
    time.sleep(0.2)
    small = threading.Thread(target=ask, args=("small", 4))  # 30 + 2 + 2 would fit beside it
    small.start()
    time.sleep(0.3)
    assert admitted == {}  # the small one waits behind the large one
    scheduler.end_wave(first)
    large.join(10)
    assert list(admitted) == ["large"]  # and the small one (37 + 4 > 40) waits for it to end
    scheduler.end_wave(admitted["large"])
    small.join(10)
    assert list(admitted) == ["large", "small"]
    scheduler.end_wave(admitted["small"])
    assert scheduler.waves == [] and scheduler._wave_line == []


def test_a_wave_larger_than_the_pool_is_refused_at_once():
    llm = policy(40)
    with pytest.raises(ttscale.PoolExhausted, match="40"):
        llm.scheduler.begin_wave(2, 39)


def test_a_failing_search_ends_its_wave_and_gives_its_blocks_back(prm):
    llm = policy(220)

    class Boom(Exception):
        pass

    def fail(_):
        raise Boom

    with pytest.raises(Boom):
        ttscale.best_of_n(llm, PROBLEMS[:3], 8, verifier=prm, seed=1, sampling=LONG,
                          prompt_fn=lambda p: p + "\n", step_delimiter=task.STEP_DELIMITER,
                          progress=False, on_progress=fail)
    assert llm.scheduler.waves == [] and llm.engine.pool.refresh() == 220
    assert best_of_8(llm, prm, PROBLEMS[:1], 1)  # and the next search runs


def test_a_search_that_fails_beside_another_fails_alone(prm):
    """A verifier callback that raises in one search ends that search only: the one beside it
    finishes with the results it gets alone, and the pool is whole again."""
    llm = policy(220)
    alone = best_of_8(policy(1024), prm, PROBLEMS[3:], 2)

    def fail(_):
        raise RuntimeError("a callback of the first search")

    def failing():
        return ttscale.best_of_n(llm, PROBLEMS[:3], 8, verifier=prm, seed=1, sampling=LONG,
                                 prompt_fn=lambda p: p + "\n", progress=False,
                                 step_delimiter=task.STEP_DELIMITER, on_progress=fail)

    error, other = on_threads(failing, lambda: best_of_8(llm, prm, PROBLEMS[3:], 2))
    assert isinstance(error, RuntimeError) and other == alone
    assert llm.scheduler.waves == [] and llm.engine.pool.refresh() == 220


def test_prompts_beyond_a_waves_budget_fail_that_wave_instead_of_hanging_both():
    """A newer wave adds prompts past what it declared (as RSA's contexts can) while an older
    wave grows: when neither can go on, the newer one gets PoolExhausted (never a hang on both
    sides), and once it has given its blocks back, as a failing search does, the older
    finishes."""
    llm = policy(8)
    scheduler, engine = llm.scheduler, llm.engine
    older, newer = scheduler.begin_wave(1, 6), scheduler.begin_wave(1, 1)
    out = {}

    def grow():
        (prompt,) = scheduler.add_prompts([[1, 7, 3]], older)
        (seq,) = engine.fork(prompt, 1)
        scheduler.decode([seq], ttscale.SamplingParams(temperature=1.0, max_tokens=90,
                                                       ignore_eos=True))
        out["older"] = seq.generated

    def add_contexts():
        try:
            for _ in range(2):
                scheduler.add_prompts([[1 + i % 40 for i in range(60)]], newer)
                time.sleep(0.3)  # scoring
        except ttscale.PoolExhausted as error:
            out["newer"] = error
            for prompt in newer.prompts:  # what SearchRun.abandon and run_waves do
                engine.free_prompt(prompt)
            scheduler.end_wave(newer)

    returned = on_threads(add_contexts, grow, delay=0.1)
    assert returned == [None, None], returned
    assert isinstance(out["newer"], ttscale.PoolExhausted) and out["older"] == 90
