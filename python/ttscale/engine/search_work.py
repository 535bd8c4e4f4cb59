"""The scheduler's side of searches and verifiers: decode items, waves, batched prefills and forks.

:class:`SearchWork` holds the :class:`~ttscale.engine.scheduler.Scheduler` methods a strategy
and a PRM call (the scheduler module holds requests, steps, admission and preemption):

    scheduler.decode(seqs, sampling, stop=[...])  # to the next stop, in the shared steps
    wave = scheduler.begin_wave(prompt_blocks, seq_blocks)   # a search's problems, admitted
    added = scheduler.add_prompts(prompts, wave)             # prefilled when they fit
    scheduler.prefill_pending(seqs, wave)                    # more context, when it fits
    scheduler.end_wave(wave)
    item = scheduler.prefill(seqs, hidden_at)     # a PRM's new steps, batched across threads
    kids, parents, offsets = scheduler.select_and_fork(...)  # a search step's selection, batched
"""

from __future__ import annotations

import time
from collections.abc import Callable
from collections.abc import Sequence as Seq
from typing import TypeVar

import torch

from ttscale.engine import forking
from ttscale.engine.confidence import ConfidenceStop
from ttscale.engine.sequence import Prompt, Sequence
from ttscale.engine.settings import check_decode_arguments, decode_limits
from ttscale.engine.work import DecodeItem, ForkItem, PrefillItem, Wave
from ttscale.errors import InvalidArgument, PoolExhausted
from ttscale.sampling_params import SamplingParams

WAIT_SECONDS = 0.002  # how long work that waits for room sleeps before it looks again
T = TypeVar("T")


class SearchWork:
    """The scheduler's methods for searches and verifiers (mixed into ``Scheduler``, whose
    lock, inbox, steps and preemption they use)."""

    def decode(self, seqs: Seq[Sequence], sampling: SamplingParams, *,
               stop: Seq[str] | None = None, max_new_tokens: int | Seq[int] | None = None,
               confidence_stop: ConfidenceStop | None = None) -> None:
        """Sample each sequence until it stops (``seq.finish_reason`` says why), as rows of the
        shared steps: any thread's step advances them, and this call drives steps until they
        stop. :meth:`Engine.decode` documents the arguments."""
        engine = self.engine
        most = check_decode_arguments(seqs, sampling, max_new_tokens, confidence_stop)
        stops = tuple(stop) if stop is not None else sampling.stop_strings
        engine.thinking.control(sampling)  # its texts in this model's tokens, or an error
        if stops and engine.stops.texts is None:
            raise InvalidArgument("stop: stop strings need a tokenizer")
        engine._check_live(seqs)
        limits = decode_limits(seqs, sampling, most)
        active = [s for s in seqs if s.finish_reason is None]
        if active:
            seed = sampling.seed if sampling.seed is not None else engine.seed
            self.run_decode(active, sampling, stops, limits, seed, confidence_stop)

    def run_decode(self, active: list[Sequence], sampling: SamplingParams, stops: tuple[str, ...],
                   limits: dict[Sequence, int], seed: int,
                   confidence_stop: ConfidenceStop | None = None) -> None:
        """Decode a search's sequences until each stops, as rows of the shared steps: queue the
        work, then drive steps (any thread's step advances it) until it is done. The work of a
        wave's sequences ranks by the wave's arrival."""
        wave = active[0].prompt.wave
        item = DecodeItem(list(active), sampling, tuple(stops), limits, seed,
                          confidence_stop=confidence_stop, wave=wave)
        with self._inbox_lock:
            item.arrival = self._arrivals if wave is None else wave.arrival
            self._arrivals += wave is None
            self._incoming_items.append(item)
        try:
            while not item.done:
                self.step()
        except BaseException:
            with self.lock:
                if item in self.items:
                    self.items.remove(item)
                with self._inbox_lock:
                    if item in self._incoming_items:
                        self._incoming_items.remove(item)
            raise

    def prefill(self, seqs: Seq[Sequence], hidden_at: dict | None = None) -> PrefillItem:
        """Run sequences' pending tokens into the KV cache (a verifier's new steps), with the
        final hidden states at ``hidden_at`` (:meth:`Engine.run_pending`). Work other threads
        queue meanwhile runs in the same forward: whichever thread takes the engine first runs
        every queued item. Returns the item: its ``hidden`` states and its ``tokens``."""
        item = PrefillItem(list(seqs), dict(hidden_at or {}))
        self._run_queued(item, "_incoming_prefills", self._run_prefills)
        return item

    def _run_queued(self, item, queue: str, run: Callable[[list], None]) -> None:
        """Queue ``item`` on the inbox list named ``queue`` and wait until it is done: whichever
        thread takes the engine first runs every item queued there (``run``). A caller
        interrupted while it waits takes its item back; an item that failed raises its error."""
        with self._inbox_lock:
            getattr(self, queue).append(item)
        try:
            while not item.done:
                with self.lock:
                    with self._inbox_lock:
                        items = getattr(self, queue)
                        setattr(self, queue, [])
                    if items:
                        run(items)
        except BaseException:
            with self._inbox_lock:
                if item in getattr(self, queue):
                    getattr(self, queue).remove(item)
            raise
        if item.error is not None:
            raise item.error

    def _run_prefills(self, items: list[PrefillItem]) -> None:
        """One forward for every item; if it fails, each item alone, so that only the item
        that cannot run (a pool too small for it) fails."""
        groups = [items] if len(items) > 1 else []
        groups += [[item] for item in items]
        for group in groups:
            if all(item.done for item in group):
                continue
            seqs = [s for item in group for s in item.seqs]
            tokens = [sum(s.pending for s in item.seqs) for item in group]
            hidden_at = {s: at for item in group for s, at in item.hidden_at.items()}
            try:
                hidden = self.engine.run_pending(seqs, hidden_at=hidden_at)
            except Exception as error:  # noqa: BLE001 - the item's caller gets it
                if len(group) == 1:
                    group[0].error, group[0].done = error, True
                continue
            except BaseException as error:  # an interrupt: every queued item's caller gets it
                for item in items:
                    if not item.done:
                        item.error, item.done = error, True
                raise
            for item, n in zip(group, tokens, strict=True):
                item.hidden = {s: hidden[s] for s in item.hidden_at if s in hidden}
                item.tokens, item.done = n, True

    def select_and_fork(self, candidates: Seq[Sequence], scores, group_sizes: Seq[int],
                        keep: int | Seq[int], children: int | Seq[int]
                        ) -> tuple[list[Sequence], list[int], list[int]]:
        """A search step's selection and forks (:meth:`Engine.select_and_fork`: the same
        arguments and results). Selections other threads queue meanwhile run in the same
        ``ops.select_and_fork`` and host read: whichever thread takes the engine first runs
        every queued one. The arguments are checked here, on the caller's thread, so a bad
        selection fails alone."""
        engine = self.engine
        engine._check_live(candidates)
        item = ForkItem(list(candidates), *forking.check_selection(
            candidates, scores, group_sizes, keep, children, engine.pool.device))
        self._run_queued(item, "_incoming_forks", self._run_forks)
        return item.result

    def _run_forks(self, items: list[ForkItem]) -> None:
        """One ``select_and_fork`` over every item's groups (their arguments checked when they
        were queued); its children, parents and offsets split back per item. If anything
        raises, every item not yet done gets the error, so no caller waits for ever."""
        try:
            ready = []
            for item in items:
                try:
                    self.engine._check_live(item.candidates)  # freed since it was queued?
                    ready.append(item)
                except InvalidArgument as error:
                    item.error, item.done = error, True
            if not ready:
                return
            kids, parents, offsets = forking.select_and_fork(
                self.engine, [s for item in ready for s in item.candidates],
                torch.cat([item.scores for item in ready]),
                [n for item in ready for n in item.group_sizes],
                [k for item in ready for k in item.keep],
                [c for item in ready for c in item.children])
            group = candidate = 0
            for item in ready:
                first, last = offsets[group], offsets[group + len(item.group_sizes)]
                ends = offsets[group:group + len(item.group_sizes) + 1]
                item.result = (kids[first:last], [p - candidate for p in parents[first:last]],
                               [o - first for o in ends])
                item.done = True
                group += len(item.group_sizes)
                candidate += len(item.candidates)
        except BaseException as error:  # every caller still waiting gets it
            for item in items:
                if not item.done:
                    item.error, item.done = error, True
            if not isinstance(error, Exception):
                raise

    # ------------------------------------------------------------------------------------------
    # Search waves

    def begin_wave(self, prompt_blocks: int, seq_blocks: int) -> Wave:
        """Admit a search's wave, whose prompts take ``prompt_blocks`` and whose sequences at
        their longest ``seq_blocks``: at once when the oldest wave could still grow to its
        longest beside every wave's prompts (and so could this one, once it is the oldest);
        else once waves before it end, driving their steps meanwhile. Waves are admitted in the
        order they asked: a small wave does not pass a large one that waits."""
        total = self.engine.pool.num_blocks
        if prompt_blocks + seq_blocks > total:
            raise PoolExhausted(f"a wave needs {prompt_blocks + seq_blocks} KV blocks at its "
                                f"longest, the pool has {total}")
        ticket = object()
        with self.lock:
            self._wave_line.append(ticket)
        try:
            while True:
                with self.lock:
                    self._take_inbox()
                    longest = max([seq_blocks] + [w.seq_blocks for w in self.waves])
                    prompts = prompt_blocks + sum(self._prompt_blocks(w) for w in self.waves)
                    if self._wave_line[0] is ticket and longest + prompts <= total:
                        with self._inbox_lock:
                            wave = Wave(self._arrivals, prompt_blocks, seq_blocks)
                            self._arrivals += 1
                        self.waves.append(wave)
                        return wave
                self._wait()
        finally:
            with self.lock:
                self._wave_line.remove(ticket)

    def end_wave(self, wave: Wave) -> None:
        """The wave's search is over (its blocks are freed): later waves may enter."""
        with self.lock:
            if wave in self.waves:
                self.waves.remove(wave)

    def add_prompts(self, prompts: Seq[Seq[int]], wave: Wave | None = None) -> list[Prompt]:
        """Prefill a wave's prompts (:meth:`Engine.add_many`) when they fit: newer work gives
        way; while older work holds the room, this waits for it, driving steps."""
        need = sum(self.engine.pool.blocks_for(len(p) - 1) for p in prompts)

        def add() -> list[Prompt]:
            added = self.engine.add_many(prompts)  # a pool too small raises
            for prompt in added:
                prompt.wave = wave
            if wave is not None:
                wave.prompts += added
            return added

        return self._when_room(lambda: need, wave, add)

    def prefill_pending(self, seqs: Seq[Sequence], wave: Wave | None = None) -> None:
        """Run a wave's sequences' pending tokens but the last into the KV cache
        (:meth:`Engine.run_pending`; RSA's shared context after a prompt) when they fit, as
        :meth:`add_prompts` does."""
        pool = self.engine.pool
        # worked out afresh each time it looks (a preempted sequence needs its blocks again)
        need = lambda: sum(pool.blocks_needed(s.row, s.kv_len, s.pending - 1) for s in seqs)
        self._when_room(need, wave, lambda: self.engine.run_pending(seqs, keep_last=True))

    def _when_room(self, need: Callable[[], int], wave: Wave | None, run: Callable[[], T]) -> T:
        """``run()`` under the lock once ``need()`` blocks are free: newer work is preempted to
        make room; while older work holds it, this waits, driving steps. When nobody else holds
        blocks it may free, ``run`` goes ahead (and raises if the pool is too small)."""
        pool = self.engine.pool
        arrival = self._arrivals if wave is None else wave.arrival
        try:
            while True:
                with self.lock:
                    self._take_inbox()
                    blocks = need()
                    if (blocks <= pool.num_free or blocks <= pool.refresh()
                            or self._make_room(blocks, (arrival, None))
                            or not self._others_hold(wave)):
                        return run()
                    if wave is not None:  # it frees nothing while it waits (see _held_elsewhere)
                        wave.waiting = True
                self._wait()
        finally:
            if wave is not None:
                wave.waiting = False

    def _prompt_blocks(self, wave: Wave) -> int:
        """The blocks a wave's prompts take: as it declared, or more where it added more (RSA's
        aggregation contexts)."""
        pool = self.engine.pool
        held = sum(pool.blocks_for(len(p.prompt_ids) - 1) for p in wave.prompts if not p.freed)
        return max(wave.prompt_blocks, held)

    def _others_hold(self, wave: Wave | None) -> bool:
        """Whether work other than ``wave`` holds blocks it may free (so waiting can end): a
        wave that itself waits for room frees nothing."""
        return bool(self.requests or self.items
                    or any(w is not wave and not w.waiting for w in self.waves))

    def _wait(self) -> None:
        """Let the work that holds the room move: run a step if there is any, else sleep a
        moment (the holders are searches scoring between their steps, on other threads)."""
        with self._inbox_lock:
            pending = bool(self._incoming or self._incoming_items)
        if pending or self.requests or self.items:
            steps = self.steps
            self._step()
            if self.steps != steps:
                return
        time.sleep(WAIT_SECONDS)  # once, whether or not a step was tried

    def _held_elsewhere(self) -> bool:
        """Whether searches with no decode work in this step hold blocks: their threads are
        scoring or selecting, and will free them or bring them to a step. A wave whose thread
        waits for room itself (in :meth:`add_prompts`) frees nothing: if only such waves hold
        the room, nothing fits and nobody can make it fit, which is an error, not a wait."""
        decoding = {id(item.wave) for item in self.items}
        return any(id(wave) not in decoding and not wave.waiting for wave in self.waves)
