"""The engine's lock: an RLock whose blocking takes go in the order threads asked, so a thread
that takes it again and again (one driving decode steps) cannot starve another, and which an
interrupt (Ctrl-C) never leaves held."""

from __future__ import annotations

import os
import random
import signal
import threading
import time

import pytest

from ttscale.engine.fair_lock import STALL, FairLock, engine_lock

pytestmark = pytest.mark.skipif(not isinstance(engine_lock(), FairLock),
                                reason="this Python's RLock cannot count re-entries")


def wait_until(condition, seconds=10.0):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.0005)


def tickets_drawn(lock) -> int:
    return int(repr(lock._tickets)[len("count("):-1])


def test_re_entrant_and_released_only_by_its_holder():
    lock = FairLock()
    with lock, lock:
        got = []
        other = threading.Thread(target=lambda: got.append(lock.acquire(blocking=False)))
        other.start()
        other.join()
        assert got == [False]
    assert lock.acquire(blocking=False)
    lock.release()
    with pytest.raises(RuntimeError):
        lock.release()


def test_a_take_that_times_out_does_not_hold_up_the_next():
    lock = FairLock()
    lock.acquire()
    got = []
    first = threading.Thread(target=lambda: got.append(lock.acquire(timeout=0.05)))
    first.start()
    first.join(10)
    assert got == [False]
    lock.release()
    start = time.monotonic()
    with lock:
        pass
    assert time.monotonic() - start < 5  # past the timed-out ticket


@pytest.mark.parametrize("held, rounds", [(0.0, 1), (2 * STALL, 8)])
def test_waiting_threads_take_it_in_the_order_they_asked(held, rounds):
    """Also when the lock is held longer than STALL: a long hold is no abandoned turn, and the
    waiters behind the next in line do not jump it when it is let go."""
    for _ in range(rounds):
        lock = FairLock()
        order = []

        def take(name, lock=lock, order=order):
            with lock:
                order.append(name)

        lock.acquire()
        threads = []
        for k in range(4):
            thread = threading.Thread(target=take, args=(k,))
            thread.start()
            threads.append(thread)
            wait_until(lambda k=k, lock=lock: tickets_drawn(lock) == k + 2)  # in line first
        time.sleep(held)
        lock.release()
        for thread in threads:
            thread.join(10)
        assert order == [0, 1, 2, 3]


def test_a_thread_that_takes_it_again_at_once_cannot_starve_a_waiter():
    """The pattern of a thread driving steps: release, take again at once. A waiter gets the
    lock at the next release (threading.RLock lets the releasing thread win it back)."""
    lock = FairLock()
    turns = [0]
    stop = threading.Event()

    def drive():
        while not stop.is_set():
            with lock:
                turns[0] += 1
                time.sleep(0.002)  # a step's work, holding the lock

    driver = threading.Thread(target=drive)
    driver.start()
    try:
        wait_until(lambda: turns[0] > 3)
        got_at = []
        asked_at = turns[0]
        waiter = threading.Thread(target=lambda: (lock.acquire(), got_at.append(turns[0]),
                                                  lock.release()))
        waiter.start()
        waiter.join(10)
        assert got_at and got_at[0] <= asked_at + 2
    finally:
        stop.set()
        driver.join(10)


def interrupted(seed: int) -> FairLock:
    """A lock the main thread took and let go in a loop, beside a rival thread, until a Ctrl-C
    landed at a moment drawn from ``seed``."""
    lock = FairLock()
    stop = threading.Event()

    def rival():
        while not stop.is_set():
            if lock.acquire(timeout=0.5):
                lock.release()

    thread = threading.Thread(target=rival, daemon=True)
    thread.start()
    timer = threading.Timer(random.Random(seed).uniform(0.001, 0.02), os.kill,
                            (os.getpid(), signal.SIGINT))
    interrupted = False
    deadline = time.monotonic() + 10
    try:
        timer.start()
        while time.monotonic() < deadline:
            with lock:
                pass
    except KeyboardInterrupt:
        interrupted = True
    finally:
        timer.cancel()
        stop.set()
        thread.join(5)
    assert interrupted, "no interrupt arrived"
    return lock


def test_an_interrupt_never_leaves_it_held():
    """Ctrl-C lands at a random moment while the main thread takes and lets go the lock beside
    a thread that wants it too (as a step driver's does); afterwards another thread takes it."""
    # Python's own handler, whatever the test run inherited (a background job ignores SIGINT)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        for trial in range(20):
            check_interrupted(trial)
    finally:
        signal.signal(signal.SIGINT, previous)


def check_interrupted(trial: int) -> None:
    lock = interrupted(trial)
    assert lock._recursion_count() == 0, f"trial {trial}: the main thread still holds it"
    got: list[bool] = []
    taker = threading.Thread(target=lambda: got.append(lock.acquire(timeout=2)), daemon=True)
    taker.start()
    taker.join(5)
    assert got == [True], f"trial {trial}: the lock is held by nobody's code"
