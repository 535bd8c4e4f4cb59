"""The engine's lock: an RLock whose blocking takes go in the order threads asked.

Every thread that drives decode steps takes the engine's lock once per step and asks for it
again at once. A plain RLock lets the thread that just let it go win it back before a waiting
thread wakes, so a search that asks to prefill its prompts, or to fork its beams, can wait out
another search's whole decode item (on a 2-core machine two searches started 50 ms apart once
ran one after the other).

:class:`FairLock` is ``threading.RLock`` itself (a subclass of its C type), so its release and
its ``__exit__`` are C code that an interrupt cannot cut in half; only the take is Python. A
blocking take draws a ticket and waits for its turn before it takes the RLock, and the owner
passes the turn on when it has taken it. A take that an interrupt cuts short gives back what it
took; a ticket it leaves behind holds the line until the next in line has found the lock free
at two looks ``STALL`` seconds apart without a turn passing (so neither a lock held longer than
that nor one let go an instant before a look is mistaken for an abandoned turn). Non-blocking takes (``stats()``, ``abort()``
peeking) and takes with a timeout do not queue.

Where the RLock's C type lacks what this needs (``_recursion_count``, Python 3.10),
:func:`engine_lock` gives a plain RLock.
"""

from __future__ import annotations

import _thread
import itertools
import threading
import time

STALL = 0.05  # a turn that has not passed for this long, the lock free: its taker is gone
FIRST_NAP, LONGEST_NAP = 20e-6, 5e-4  # a waiter's sleeps while its turn has not come

_RLock = _thread.RLock


class FairLock(_RLock):
    """``threading.RLock``, with blocking takes first come, first served."""

    def __init__(self):
        self._tickets = itertools.count()  # next() on it is atomic
        self._serving = 0  # the ticket whose turn it is; only the owner moves it

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        held = self._recursion_count()
        try:
            if held or not blocking or timeout != -1:
                return _RLock.acquire(self, blocking, timeout)
            return self._take_in_turn()
        except BaseException:
            if self._recursion_count() > held:  # taken just before an interrupt: give it back
                _RLock.release(self)
            raise

    def __enter__(self) -> bool:
        return self.acquire()

    def _take_in_turn(self) -> bool:
        ticket = next(self._tickets)
        seen, since, nap = self._serving, time.monotonic(), FIRST_NAP
        free_before = False  # found free at the last STALL's end, no turn passed since
        while self._serving < ticket:
            now = time.monotonic()
            if self._serving != seen:
                seen, since, free_before = self._serving, now, False
            elif now - since > STALL:
                # Free at two looks a STALL apart with no turn passed: the turn's taker is gone.
                # One look is not enough: it may fall just after a long hold was let go, before
                # the next in line has woken to take its turn.
                if _RLock.acquire(self, False):
                    if free_before:
                        break
                    _RLock.release(self)
                    free_before = True
                else:
                    free_before = False  # held (by the turn's taker or its owner)
                since = now
            time.sleep(nap)
            # further back in the line, look less often
            nap = min(2 * nap, LONGEST_NAP * min(ticket - self._serving, 10))
        else:
            _RLock.acquire(self)
        self._serving = max(self._serving, ticket + 1)
        return True


def engine_lock() -> threading.RLock:
    """A :class:`FairLock`, or a plain RLock where this Python's RLock cannot count."""
    return FairLock() if hasattr(_RLock, "_recursion_count") else threading.RLock()
