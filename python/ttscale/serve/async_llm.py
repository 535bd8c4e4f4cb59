"""``AsyncLLM``: the engine for asyncio programs (the server, or a stack that embeds ttscale).

    engine = ttscale.AsyncLLM("path/to/model")
    async for out in engine.generate("What is 2+2?", ttscale.SamplingParams(n=4)):
        print(out.outputs[0].text)          # cumulative, every step; out.finished at the end
    result = await engine.search("beam_search", "What is 2+2?", n=16, verifier=prm)

One thread off the event loop drives the scheduler's steps while any request is live, so the
event loop stays free and every request, from any task, shares the decode steps. Cancelling the
task that consumes ``generate`` aborts its request and frees its KV blocks at the next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

from ttscale.errors import InvalidArgument, UnknownRequest, invalid
from ttscale.llm import LLM, RequestOutput
from ttscale.sampling_params import SamplingParams


class AsyncLLM:
    """An :class:`~ttscale.LLM` whose requests are awaited from asyncio.

    ``model`` is a local model directory (the other arguments go to :class:`~ttscale.LLM`), or an
    ``LLM`` already built. Thread-safe: several event loops may share one engine.
    """

    def __init__(self, model: str | Path | LLM, **llm_options):
        if isinstance(model, LLM) and llm_options:  # they would be ignored
            name = next(iter(llm_options))
            raise InvalidArgument(f"{name}: an LLM already built takes no LLM options", param=name)
        self.llm = model if isinstance(model, LLM) else LLM(model, **llm_options)
        self.tokenizer = self.llm.tokenizer
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._wake = threading.Condition()  # guards _streams; wakes the step thread
        self._closing = False
        self._thread = threading.Thread(target=self._drive, name="ttscale-steps", daemon=True)
        self._thread.start()
        self.generation_tokens = 0  # counters the server's metrics read
        self.prompt_tokens = 0

    # ------------------------------------------------------------------------------------------

    def generate(self, prompt, params: SamplingParams | None = None,
                 request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Add a request now and return an async iterator over its cumulative outputs, one after
        every step it progressed in, the last with ``finished``. Bad arguments raise here, at
        once (``InvalidArgument`` naming them). Closing or cancelling the iteration aborts it."""
        if self._closing:
            raise RuntimeError("the engine is shutting down")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        rid = request_id if request_id is not None else f"req-{uuid.uuid4().hex}"
        with self._wake:
            if rid in self._streams:
                raise invalid("request_id", f"{rid!r} is already running")
            self._streams[rid] = (loop, queue)  # before the request exists: no output is missed
        try:
            self.llm.add_request(prompt, params, rid)
        except BaseException:
            with self._wake:
                self._streams.pop(rid, None)
            raise
        with self._wake:
            self._wake.notify()
        return self._outputs(rid, queue)

    async def _outputs(self, rid: str, queue: asyncio.Queue) -> AsyncIterator[RequestOutput]:
        finished = False
        try:
            while not finished:
                out = await queue.get()
                if isinstance(out, BaseException):
                    raise out
                finished = out.finished
                yield out
        finally:
            with self._wake:
                self._streams.pop(rid, None)
            if not finished:  # cancelled, or the consumer stopped early: free its blocks
                with contextlib.suppress(UnknownRequest):
                    self.llm.abort(rid)

    def abort(self, request_id: str) -> None:
        """Stop a request; its blocks are free before the next step."""
        with self._wake:
            self._streams.pop(request_id, None)
        self.llm.abort(request_id)

    async def search(self, strategy: str, problem: str, **options):
        """Run a strategy of :mod:`ttscale.search` on one problem, on a worker thread; its
        ``SearchResult``. Its decoding joins the scheduler's steps beside every request and
        every other search."""
        from ttscale.search import registry

        fn = registry.get(strategy).function  # an unknown name: InvalidArgument naming strategy

        def run():
            return fn(self.llm, [problem], progress=False, **options)[0]

        return await asyncio.to_thread(run)

    def stats(self):
        return self.llm.stats()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the step thread (live requests are aborted)."""
        with self._wake:
            self._closing = True
            self._wake.notify()
        self._thread.join(timeout)

    # ------------------------------------------------------------------------------------------

    def _drive(self) -> None:
        """The step loop: one scheduler step at a time while any request is live."""
        while True:
            with self._wake:
                while not self._closing and not (self.llm.has_unfinished_requests()
                                                 or self.llm.scheduler.has_progress()):
                    self._wake.wait(timeout=0.05)
                if self._closing:
                    return
            generated, prefilled = self.llm.engine.generated_tokens, self.llm.engine.prefilled_tokens
            try:
                outs = self.llm.step()
            except Exception as error:  # a failed step fails the requests in it, not the engine
                self._fail_all(error)
                continue
            self.generation_tokens += self.llm.engine.generated_tokens - generated
            self.prompt_tokens += self.llm.engine.prefilled_tokens - prefilled
            with self._wake:
                targets = [(self._streams.get(out.request_id), out) for out in outs]
            for target, out in targets:
                if target is not None:
                    loop, queue = target
                    with contextlib.suppress(RuntimeError):  # a loop that has closed
                        loop.call_soon_threadsafe(queue.put_nowait, out)

    def _fail_all(self, error: Exception) -> None:
        with self._wake:
            streams = list(self._streams.items())
        for rid, (loop, queue) in streams:
            with contextlib.suppress(UnknownRequest):
                self.llm.abort(rid)
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(queue.put_nowait, RuntimeError(f"engine step failed: {error}"))

