"""The scheduler: requests and searches join the running batch at any step.

    scheduler.add(request)        # queued; its prompt is prefilled when it is admitted
    progressed = scheduler.step() # one decode window for every sequence that fits
    scheduler.abort(request_id)   # its blocks return to the pool at once
    scheduler.decode(seqs, ...)   # a search's sequences, to their next stop, in the same steps

(:mod:`ttscale.engine.search_work` holds the methods for searches' waves and decode work and
for a verifier's batched prefills.)

One step admits work in arrival order (requests, then each request's samples by index; a
search's decode work by its wave's arrival). Admission is optimistic, as in vLLM: a sequence runs
when its next window fits the pool, not its whole ``max_tokens``, so a request with more samples
than the pool can hold at once runs them piecewise. When growth runs the pool short, the newest
work is preempted: a sequence's own blocks are freed and its tokens recomputed when it resumes;
if that is not enough, the newest request's prompt goes too, and then newer searches' sequences
(those in a decode step, and those the search holds between steps). Nothing of this changes a
result: each sample's random stream is keyed by its request (seed and stream) and its index, or
by its search's seed and the sequence's number, never by the batch it runs in.

Searches enter in waves (:mod:`ttscale.engine.work`), admitted at once while the oldest wave
could still grow to its longest beside every wave's prompts, in the order they asked: searches
started apart share steps, and the oldest always finishes. Work that finds the room held by
another search waits for it.

Prompts share their full blocks across requests (:mod:`ttscale.engine.prefix_cache`): a request
whose prompt starts like an earlier one's prefills only the rest.

The pool's bookkeeping lives on the device (:mod:`ttscale.engine.pool`); admission trusts the
host's lower bound of its free blocks, which each step's one read makes exact again.
"""

from __future__ import annotations

import threading
import time

from ttscale.engine.engine import Engine
from ttscale.engine.prefix_cache import PrefixCache
from ttscale.engine.search_work import WAIT_SECONDS, SearchWork
from ttscale.engine.sequence import DRAWS_PER_SEQUENCE, Sequence
from ttscale.engine.work import (
    DecodeItem,
    EngineStats,
    ForkItem,
    PrefillItem,
    Request,
    Wave,
    sample_stream,
)
from ttscale.errors import PoolExhausted, UnknownRequest, invalid


class Scheduler(SearchWork):
    """Admission, the decode batch, preemption and the pool budget for requests on one engine.

    Thread-safe: requests added (or aborted) from any thread join (or leave) at the next step;
    adding and aborting never wait for a running step.
    """

    def __init__(self, engine: Engine, prefix_caching: bool = True, attach: bool = True):
        self.engine = engine
        if attach:  # the engine's decode calls become this scheduler's work
            engine.scheduler = self
        self.cache = PrefixCache(engine.pool) if prefix_caching else None
        self.requests: dict[str, Request] = {}  # live, in arrival order
        self.items: list[DecodeItem] = []  # searches' decode work, in arrival order
        self.waves: list[Wave] = []  # searches' admitted waves, in arrival order
        self._wave_line: list[object] = []  # waves asking to be admitted, first come first
        self.lock = engine.lock  # held through a step: the engine's state
        # Arrivals and aborts wait here for the next step, behind a lock that is never held
        # through a step, so that adding or aborting from an event loop never waits for one.
        self._inbox_lock = threading.Lock()
        self._incoming: dict[str, Request] = {}
        self._incoming_items: list[DecodeItem] = []
        self._incoming_prefills: list[PrefillItem] = []
        self._incoming_forks: list[ForkItem] = []
        self._aborting: set[str] = set()
        # requests of the step API that progressed in any thread's step, not yet reported
        self._progressed: dict[str, Request] = {}
        self.steps = 0
        self.preemptions = 0  # sequences or prompts evicted to make room, since the start
        self._arrivals = 0
        self._last_stats = self._stats()

    # ------------------------------------------------------------------------------------------

    def add(self, request: Request) -> None:
        """Queue a request for the next step (never waits for a running step)."""
        with self._inbox_lock:
            rid = request.request_id
            if (rid in self.requests and rid not in self._aborting) or rid in self._incoming:
                raise invalid("request_id", f"{rid!r} is already running")
            request.arrival = self._arrivals
            self._arrivals += 1
            self._incoming[rid] = request

    def abort(self, request_id: str) -> None:
        """Stop a request; its blocks return to the pool before the next step runs (at once when
        no step is running). Unknown id: :class:`UnknownRequest`."""
        with self._inbox_lock:
            self._progressed.pop(request_id, None)
            if self._incoming.pop(request_id, None) is not None:
                return
            if request_id not in self.requests or request_id in self._aborting:
                raise UnknownRequest(request_id)
            self._aborting.add(request_id)
        if self.lock.acquire(blocking=False):
            try:
                self._take_inbox()
            finally:
                self.lock.release()

    def has_unfinished(self) -> bool:
        """Requests to run, or aborts still to apply (the next step applies them)."""
        with self._inbox_lock:
            return bool(self._incoming or self._aborting or self.requests)

    def take_progressed(self) -> list[Request]:
        """The step API's requests that progressed since the last call, whichever thread's step
        advanced them (a search's, a generate call's, or the caller's own)."""
        with self._inbox_lock:
            progressed, self._progressed = list(self._progressed.values()), {}
        return progressed

    def has_progress(self) -> bool:
        with self._inbox_lock:
            return bool(self._progressed)

    def _take_inbox(self) -> None:
        """Apply the arrivals and aborts queued since the last step (the lock is held)."""
        with self._inbox_lock:
            incoming, self._incoming = self._incoming, {}
            items, self._incoming_items = self._incoming_items, []
            aborting, self._aborting = self._aborting, set()
        self.items += items
        for rid in aborting:
            request = self.requests.pop(rid, None)
            if request is not None:
                self._release(request)
                request.aborted = request.finished = True
        self.requests.update(incoming)

    def stats(self) -> EngineStats:
        """The figures now, or as of the last step's end while a step runs (never waits for one)."""
        if not self.lock.acquire(blocking=False):
            return self._last_stats
        try:
            self._take_inbox()
            self._last_stats = self._stats()
            return self._last_stats
        finally:
            self.lock.release()

    def _stats(self) -> EngineStats:
        with self._inbox_lock:
            waiting_new = len(self._incoming)
        live = list(self.requests.values())
        return EngineStats(
            running=sum(r.kv_prompt is not None for r in live),
            waiting=waiting_new + sum(r.kv_prompt is None and not r.preempted for r in live),
            preempted=sum(r.preempted for r in live),
            free_blocks=self.engine.pool.num_free + (self.cache.evictable() if self.cache else 0),
            total_blocks=self.engine.pool.num_blocks,
            prefix_hit_tokens=self.cache.hit_tokens if self.cache else 0,
            steps=self.steps,
            host_reads=self.engine.pool.host_reads,
            preemptions=self.preemptions,
        )

    # ------------------------------------------------------------------------------------------

    def step(self) -> list[Request]:
        """One decode window for every sequence that fits; the requests that progressed.

        When nothing fits because searches on other threads hold the room (between their
        steps), the step sleeps a moment and returns nothing; when nothing fits and nobody else
        could free a block, :class:`PoolExhausted`."""
        progressed = self._step()
        if progressed is None:
            time.sleep(WAIT_SECONDS)  # outside the lock: the holders' threads free or decode
            return []
        return progressed

    def _step(self) -> list[Request] | None:
        """:meth:`step` without its wait: None when nothing fits."""
        with self.lock:
            self._take_inbox()
            if not self.requests and not self.items:
                return []
            admitted = self._schedule()
            if not admitted:  # the pool's lower bound may lag frees: read the count, try again
                self.engine.pool.refresh()
                admitted = self._schedule()
            if not admitted and not self._held_elsewhere():
                raise PoolExhausted(
                    f"no sequence fits: {self.engine.pool.num_free} of "
                    f"{self.engine.pool.num_blocks} KV blocks are free, and the next sequence "
                    "needs more free KV blocks; free finished work or give the engine a larger "
                    "kv_budget_bytes")
            if admitted:
                return self._run(admitted)
        return None

    def _run(self, admitted: list[tuple[Sequence, Request | DecodeItem]]) -> list[Request]:
        """Decode the admitted rows one window; retire what finished (the lock is held)."""
        self.steps += 1
        self.engine.run_pending([s for s, _ in admitted], keep_last=True)
        decode_rows(self.engine, admitted)
        for item in dict.fromkeys(o for _, o in admitted if isinstance(o, DecodeItem)):
            item.active = [s for s in item.active if s.finish_reason is None]
            if not item.active:
                item.done = True
                self.items.remove(item)
        progressed = list(dict.fromkeys(r for _, r in admitted if isinstance(r, Request)))
        with self._inbox_lock:
            self._progressed.update((r.request_id, r) for r in progressed if r.public)
        for request in progressed:  # the finished samples' blocks, in one batched free
            self.engine.free([s for s in request.seqs if s.finish_reason is not None])
            if not request.unfinished:
                self._finish(request)
        self._last_stats = self._stats()
        return progressed

    def _schedule(self):
        """The sequences of this step, in arrival order, with room reserved for their window."""
        engine, pool = self.engine, self.engine.pool
        limit = engine.max_decode_seqs or float("inf")
        admitted: list[tuple[Sequence, Request | DecodeItem]] = []
        work = sorted([*self.requests.values(), *self.items], key=lambda w: w.arrival)
        for owner in work:
            if isinstance(owner, DecodeItem):
                rows = [(seq, owner.limits[seq]) for seq in owner.active]
            else:
                if owner.kv_prompt is None and not self._admit_prompt(owner):
                    break  # first come, first served: later work waits too
                rows = [(seq, owner.params.max_tokens) for seq in owner.unfinished]
            for seq, most in rows:
                if len(admitted) >= limit:
                    return admitted
                new = seq.pending - 1 + min(engine.window, most - seq.generated)
                need = pool.blocks_needed(seq.row, seq.kv_len, new)
                if need > pool.num_free and not self._make_room(need, (owner.arrival, seq)):
                    return admitted
                if need:  # the device's part runs batched, later
                    pool.reserve(seq.row, seq.kv_len, new)
                admitted.append((seq, owner))
            if isinstance(owner, Request):
                owner.preempted = False
        return admitted

    def _admit_prompt(self, request: Request) -> bool:
        """Prefill the prompt of a request that starts (or resumes) when it fits with one window;
        full blocks another request already prefilled are shared, not prefilled again."""
        engine = self.engine
        pool = engine.pool
        hit = self.cache.match(request.prompt_ids) if self.cache else []
        need = (pool.blocks_for(len(request.prompt_ids) - 1) - len(hit)
                + pool.blocks_for(engine.window + 1))
        if need > pool.num_free and not self._make_room(need, (request.arrival, None)):
            if self.cache:
                self.cache.unmatch(hit)
            return False
        cached = self.cache.hit_blocks(hit) if hit else None
        try:
            (prompt,) = engine.add_many([request.prompt_ids], cached=[cached])
        except BaseException:
            if self.cache:
                self.cache.unmatch(hit, release=False)  # the failed prefill gave them back
            raise
        if self.cache:
            self.cache.insert(request.prompt_ids, prompt.row, hit)
        request.kv_prompt = prompt
        if not request.seqs:
            request.seqs = engine.fork(prompt, request.params.n)
            request.stream_offsets = {seq: sample_stream(request.seed, request.stream, k)
                                      for k, seq in enumerate(request.seqs)}
        else:  # resuming after its prompt was preempted: its samples keep their tokens
            for seq in request.unfinished:
                seq.prompt, seq.freed, seq.kv_len = prompt, False, 0
                (seq.row,) = pool.new_rows(1)
                prompt.num_sequences += 1
                prompt.live.add(seq)
        return True

    def _make_room(self, need: int, before: tuple[int, Sequence | None]) -> bool:
        """Preempt work newer than ``before`` (arrival, sequence) until ``need`` blocks are free:
        first the newest sequences' own blocks, then the newest requests' prompts."""
        pool = self.engine.pool
        arrival, mine = before
        if self.cache:  # first what only the prefix cache holds
            self.cache.evict(need)
        for request in reversed(list(self.requests.values())):
            if request.arrival < arrival:
                break
            for seq in reversed(request.unfinished):
                if seq is mine:
                    break
                if pool.num_free >= need:
                    return True
                if seq.row is not None and pool.used[seq.row]:  # recomputed when it runs again
                    pool.release([seq.row], keep_rows=True)
                    seq.kv_len = 0
                    request.preempted = True
                    self.preemptions += 1
            if request.arrival == arrival:
                break
            if pool.num_free >= need:
                return True
            if (request.kv_prompt is not None
                    and all(not pool.used[s.row] for s in request.unfinished)):
                self._release(request)
                request.preempted = True
                self.preemptions += 1
        # Last, the rows of newer searches' decode work: their blocks are freed and their tokens
        # recomputed when they run again (searches that together outgrow the pool take turns).
        for item in sorted(self.items, key=lambda i: i.arrival, reverse=True):
            if item.arrival < arrival or pool.num_free >= need:
                break
            for seq in reversed(item.active):
                if seq is mine or pool.num_free >= need:
                    break
                if pool.used[seq.row]:
                    pool.release([seq.row], keep_rows=True)
                    seq.kv_len = 0
                    self.preemptions += 1
        # Then the sequences newer searches hold between their steps (recomputed when they
        # decode next): what lets the oldest search grow to its longest beside them.
        for wave in reversed(self.waves):
            if wave.arrival <= arrival or pool.num_free >= need:
                break
            for prompt in reversed(wave.prompts):
                for seq in sorted(prompt.live, key=lambda s: s.seq_id, reverse=True):
                    if pool.num_free >= need:
                        return True
                    if seq.row is not None and pool.used[seq.row]:
                        pool.release([seq.row], keep_rows=True)
                        seq.kv_len = 0
                        self.preemptions += 1
        return pool.num_free >= need

    def _release(self, request: Request) -> None:
        """Free every block the request holds (its samples' tokens stay readable)."""
        live = [s for s in request.seqs if not s.freed]
        self.engine.free(live)
        if request.kv_prompt is not None:
            if self.cache:
                self.cache.forget_row(request.kv_prompt.row)
            self.engine.free_prompt(request.kv_prompt)
            request.kv_prompt = None

    def _finish(self, request: Request) -> None:
        self._release(request)
        request.finished = True
        self.requests.pop(request.request_id, None)


def decode_rows(engine, admitted: list[tuple[Sequence, Request | DecodeItem]]) -> None:
    """One window for every admitted row, each with its own settings: rows of one step may
    belong to requests and to searches, each with its sampling settings, stop strings, limit and
    random stream. A request's rows draw from its own streams (seed, stream, sample index); a
    search's from its seed and each sequence's number. The runner's window runs once for all of
    them, and each row's tokens go back to the engine."""
    rows, seeds, offsets, stops, limits, controls = [], [], [], [], [], []
    for seq, owner in admitted:
        if isinstance(owner, DecodeItem):
            rows.append(owner.sampling)
            seeds.append(owner.seed)
            offsets.append(seq.seq_id * DRAWS_PER_SEQUENCE + seq.generated)
            stops.append(owner.stops)
            limits.append(owner.limits[seq])
            controls.append(owner.confidence_stop)
        else:
            rows.append(owner.params)
            seeds.append(0)
            offsets.append(owner.stream_offsets[seq] + seq.generated)
            stops.append(owner.params.stop_strings)
            limits.append(owner.params.max_tokens)
            controls.append(None)
    window = min([engine.window] + [most - s.generated for (s, _), most in zip(admitted, limits)])
    seqs = [s for s, _ in admitted]
    groups = [engine.stops.group(stop) for stop in stops]
    tokens, logprobs, top, stopped = engine.runner.decode_window(
        seqs, window, rows, seeds, offsets, engine.stops.group_table(), groups, controls)
    for i, seq in enumerate(seqs):
        asked = rows[i].logprobs
        row_top = None if top is None or not asked else [t[:asked] for t in top[i]]
        engine._accept(seq, tokens[i], logprobs[i], row_top, stopped[i], stops[i], limits[i])
    engine.peak_sequences = max(engine.peak_sequences, len(admitted))
