"""How many CPU threads the engine's steps run on, chosen by measuring them.

torch and the C++ kernels share one OpenMP pool whose threads wait for each other at the end of
every parallel region, spinning first. On cores another job keeps busy, the operating system
deschedules one of them and the others wait a time slice at every barrier: a decode step runs
several hundred parallel regions, and on a 2-core machine with other work running the same
search took 198 s on 2 threads and 18.5 s on 1 (bench/RESULTS.md, "Shared cores"). An
environment variable (``OMP_WAIT_POLICY=passive``) only helps when it is set before the OpenMP
runtime loads, which an application that imported torch first has already done.

So the engine measures. :class:`ThreadGovernor` runs each step on its current choice of thread
count and, now and then, probes the others: a few consecutive steps alternate between the
candidates (all threads, half, ..., one), each timed per unit of work (decode rows times steps,
or prefill tokens; neighbouring steps do nearly the same work), and the fastest becomes the
choice. A probe that confirms the choice doubles the time to the next one (up to
``MAX_INTERVAL``); one that changes it starts again from ``MIN_INTERVAL``, and a step that takes
three times longer per unit of work than the probe measured starts a probe at once, so a
neighbour that starts or stops is noticed within a second or so. Each step sets its count with
``torch.set_num_threads`` and puts the caller's back afterwards, so an application's own torch
work keeps its setting.
"""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable

import torch

MIN_INTERVAL = 0.5  # seconds between probes after a change
MAX_INTERVAL = 8.0  # ... and at most, after probes that confirmed the choice
PROBE_ROUNDS = 2  # steps per candidate in one probe
SLOWDOWN = 3.0  # a step this many times slower per unit of work than measured: probe now


def candidates(most: int) -> list[int]:
    """All threads, half of them, ..., one."""
    counts = []
    while most >= 1:
        counts.append(most)
        most //= 2
    return counts


class _Kind:
    """The measurements of one kind of step (decode windows, prefills)."""

    def __init__(self, choice: int, now: float):
        self.choice = choice
        self.queue: list[int] = []  # the rest of a probe in progress
        self.samples: dict[int, list[float]] = {}
        self.measured: float | None = None  # the choice's time per unit at the last probe
        self.interval = MIN_INTERVAL
        self.next_probe = now + MIN_INTERVAL


class ThreadGovernor:
    """Chooses the thread count of each step (see the module docstring).

    ``most``: the most threads a step may use (default: torch's count when the governor is
    made). ``fixed``: always this count, no probing.
    """

    def __init__(self, most: int | None = None, fixed: int | None = None,
                 clock: Callable[[], float] = time.perf_counter):
        self.most = int(fixed or most or torch.get_num_threads())
        self.fixed = fixed
        self.clock = clock
        self.counts = candidates(self.most)
        self.kinds: dict[str, _Kind] = {}
        self.probes = 0  # probes run, for tests and benchmarks

    def choice(self, kind: str) -> int:
        state = self.kinds.get(kind)
        return self.most if state is None else state.choice

    def _next(self, state: _Kind) -> int:
        if state.queue:
            return state.queue[0]
        if len(self.counts) > 1 and self.clock() >= state.next_probe:
            state.queue = [c for _ in range(PROBE_ROUNDS) for c in self.counts]
            state.samples = {}
            self.probes += 1
            return state.queue[0]
        return state.choice

    def _record(self, state: _Kind, count: int, per_unit: float) -> None:
        if not state.queue:
            if state.measured is not None and per_unit > SLOWDOWN * state.measured:
                state.next_probe = self.clock()  # the machine changed under us: probe now
            return
        state.queue.pop(0)
        state.samples.setdefault(count, []).append(per_unit)
        if state.queue:
            return
        medians = {c: statistics.median(v) for c, v in state.samples.items()}
        best = min(medians, key=lambda c: (medians[c], -c))
        state.interval = (min(2 * state.interval, MAX_INTERVAL) if best == state.choice
                          else MIN_INTERVAL)
        state.choice, state.measured = best, medians[best]
        state.next_probe = self.clock() + state.interval

    def run(self, kind: str, work: int, fn: Callable, *args, **kwargs):
        """``fn(*args, **kwargs)`` on the thread count chosen for ``kind``, timed per ``work``."""
        if self.fixed is None:
            state = self.kinds.get(kind)
            if state is None:
                state = self.kinds[kind] = _Kind(self.most, self.clock())
            count = self._next(state)
        else:
            state, count = None, self.fixed
        before = torch.get_num_threads()
        if count != before:
            torch.set_num_threads(count)
        start = self.clock()
        try:
            return fn(*args, **kwargs)
        finally:
            elapsed = self.clock() - start
            if count != before:
                torch.set_num_threads(before)
            if state is not None and work > 0:
                self._record(state, count, elapsed / work)


def governed(kind: str, work: Callable[..., int]):
    """Run a ``ModelRunner`` method through its governor (when it has one), timed per ``work(
    *args)``: the method's own arguments, after ``self``."""

    def wrap(method):
        @functools.wraps(method)
        def wrapper(self, *args, **kwargs):
            governor = self.threads
            if governor is None:
                return method(self, *args, **kwargs)
            return governor.run(kind, work(*args, **kwargs), method, self, *args, **kwargs)

        return wrapper

    return wrap
