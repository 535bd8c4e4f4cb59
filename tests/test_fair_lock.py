"""The engine's lock: re-entrant, and taken by waiting threads in the order they asked, so a
thread that takes it again and again (one driving decode steps) cannot starve another."""

from __future__ import annotations

import threading
import time

import pytest

from ttscale.engine.fair_lock import FairLock


def wait_until(condition, seconds=10.0):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.0005)


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
    with pytest.raises(RuntimeError, match="does not hold"):
        lock.release()


def test_a_waiter_that_times_out_leaves_the_line():
    lock = FairLock()
    lock.acquire()
    got = []
    other = threading.Thread(target=lambda: got.append(lock.acquire(timeout=0.05)))
    other.start()
    other.join(10)
    assert got == [False] and not lock._queue
    lock.release()
    assert lock.acquire(blocking=False)
    lock.release()


def test_waiting_threads_take_it_in_the_order_they_asked():
    lock = FairLock()
    order = []

    def take(name):
        with lock:
            order.append(name)

    lock.acquire()
    threads = []
    for k in range(5):
        thread = threading.Thread(target=take, args=(k,))
        thread.start()
        threads.append(thread)
        wait_until(lambda k=k: len(lock._queue) == k + 1)  # in line before the next asks
    lock.release()
    for thread in threads:
        thread.join(10)
    assert order == [0, 1, 2, 3, 4]


def test_a_thread_that_takes_it_again_at_once_cannot_starve_a_waiter():
    """The pattern of a thread driving steps: release, take again at once. A waiter gets the
    lock at the next release (threading.RLock let the releasing thread win it back)."""
    lock = FairLock()
    turns = [0]
    stop = threading.Event()

    def drive():
        while not stop.is_set():
            with lock:
                turns[0] += 1
                time.sleep(0.0002)  # a step's work, holding the lock

    driver = threading.Thread(target=drive)
    driver.start()
    try:
        wait_until(lambda: turns[0] > 10)
        got_at = []
        waiter = threading.Thread(target=lambda: (lock.acquire(), got_at.append(turns[0]),
                                                  lock.release()))
        waiter.start()
        wait_until(lambda: len(lock._queue) == 1 or got_at)
        asked_at = turns[0]
        waiter.join(10)
        assert got_at and got_at[0] <= asked_at + 1
    finally:
        stop.set()
        driver.join(10)
