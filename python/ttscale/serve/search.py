"""Search as a request parameter: ``{"ttscale": {"strategy": ...}}`` in a completion's body.

A search request is checked against the strategy registry before anything runs (a bad option is
an HTTP 400 naming ``ttscale.<key>``), then runs on a worker thread beside every other request's
decode steps; streamed, it sends one chunk per search step and then the chosen answer.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
import time

from ttscale.errors import InvalidArgument
from ttscale.search import registry
from ttscale.serve import protocol
from ttscale.serve.protocol import HTTPError

SEARCH_KEYS = ("select", "agg", "seed")  # common strategy arguments a request may set


class SearchCancelled(Exception):
    """Raised into a streamed search whose client went away: the search frees its blocks."""


def _cost(cost) -> dict:
    from dataclasses import asdict, is_dataclass

    return asdict(cost) if is_dataclass(cost) else dict(vars(cost))


class Searches:
    """The server's searches over one engine, with its PRM and metrics."""

    def __init__(self, engine, config, metrics):
        self.engine, self.config, self.metrics = engine, config, metrics

    async def events(self, parsed: protocol.ParsedRequest, chat: bool, plan: dict):
        """A search as a stream: one chunk per step of the search (``choices`` empty,
        ``ttscale.event`` "progress" with live sequences and the best score so far), then the
        chosen text with the whole ``ttscale`` result, usage, and [DONE]. A client that goes
        away stops the search at its next step, its blocks freed."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        gone = threading.Event()

        def on_progress(progress):  # on the search's thread
            if gone.is_set():
                raise SearchCancelled("the client went away")
            loop.call_soon_threadsafe(events.put_nowait, progress)

        task = asyncio.create_task(self.run(parsed, chat, plan, on_progress))
        task.add_done_callback(lambda _: events.put_nowait(None))
        head = {"id": plan["id"], "object": f"{'chat.completion' if chat else 'text_completion'}.chunk",
                "created": parsed.created, "model": self.config.model_name}
        try:
            while (progress := await events.get()) is not None:
                yield json.dumps({**head, "choices": [],
                                  "ttscale": {"event": "progress", **progress.to_dict()}})
            try:
                body = task.result()
            except HTTPError as error:  # the search refused an option only it could check
                yield json.dumps(protocol.error_body(error.message, error.kind, error.param, error.status))
                yield "[DONE]"
                return
            choice = body["choices"][0]
            text = choice["message"]["content"] if chat else choice["text"]
            delta = ({"index": 0, "delta": {"role": "assistant", "content": text}, "finish_reason": "stop"}
                     if chat else {"index": 0, "text": text, "logprobs": None, "finish_reason": "stop"})
            yield json.dumps({**head, "choices": [delta], "ttscale": {"event": "result", **body["ttscale"]}})
            if parsed.include_usage:
                yield json.dumps({**head, "choices": [], "usage": body["usage"]})
            yield "[DONE]"
        finally:
            gone.set()  # a disconnected client: the search stops at its next step

    def plan(self, parsed: protocol.ParsedRequest, chat: bool) -> dict:
        """Check a search request (HTTPError 400 naming ``ttscale.<key>``); what to run."""
        options = dict(parsed.search)
        strategy = options.pop("strategy")
        known = registry.strategies()
        if strategy not in known:
            raise HTTPError(400, f"ttscale.strategy: unknown {strategy!r}; choose from "
                                 f"{', '.join(known)}", "invalid_request_error", "ttscale.strategy")
        spec = known[strategy]
        if self.config.prm is None and spec.needs_verifier:
            raise HTTPError(400, f"ttscale.strategy: {strategy} needs a PRM; start the server with --prm",
                            "invalid_request_error", "ttscale.strategy")
        # the body may set the strategy's own options and these; the server sets the rest
        allowed = {"n", *SEARCH_KEYS, *(field.name for field in spec.flag_fields())}
        unknown = next((key for key in options if key not in allowed), None)
        if unknown is not None:
            raise HTTPError(400, f"ttscale.{unknown}: not an option of {strategy}; it takes "
                                 f"{', '.join(sorted(allowed))}", "invalid_request_error",
                            f"ttscale.{unknown}")
        n = options.pop("n", 4)
        missing = next((name for name in spec.required() if name not in options), None)
        try:
            if missing is not None:
                raise InvalidArgument(f"{missing}: required by {strategy}", param=missing)
            spec.options(**{k: v for k, v in options.items() if k in spec.option_names}).check(n)
        except InvalidArgument as error:
            raise HTTPError(400, f"ttscale.{error}", "invalid_request_error",
                            f"ttscale.{error.param}") from None
        prompt = parsed.text if chat else parsed.prompts[0]
        if len(parsed.prompts) != 1 or not isinstance(prompt, str):
            raise HTTPError(400, "prompt: a search takes one text prompt", "invalid_request_error", "prompt")
        return {"id": protocol.new_id("search"), "strategy": strategy, "prompt": prompt, "n": n,
                "options": options}

    async def run(self, parsed: protocol.ParsedRequest, chat: bool, plan: dict, on_progress=None):
        strategy, prompt, n, options = plan["strategy"], plan["prompt"], plan["n"], plan["options"]
        sampling = dataclasses.replace(parsed.params, n=1)
        # the prompt as given (completions) or as the chat template rendered it (chat)
        as_given = (lambda p: self.engine.tokenizer.encode(p, add_special_tokens=False)) if chat else (lambda p: p)
        started = time.perf_counter()
        try:
            result = await self.engine.search(strategy, prompt, n=n, verifier=self.config.prm,
                                         sampling=sampling, step_delimiter=self.config.step_delimiter,
                                         prompt_fn=as_given, on_progress=on_progress, **options)
        except TypeError as error:
            raise HTTPError(400, f"ttscale: {error}", "invalid_request_error", "ttscale") from None
        except (InvalidArgument, ValueError) as error:
            param = getattr(error, "param", None) or str(error).split(":", 1)[0]
            raise HTTPError(400, f"ttscale.{error}", "invalid_request_error", f"ttscale.{param}") from None
        self.metrics.latency.observe(time.perf_counter() - started)
        # the chosen candidate: one with the chosen answer, the best scored among them
        best = max(result.candidates, default=None,
                   key=lambda c: (c.answer == result.answer, c.score is not None, c.score or 0.0))
        text = best.text if best is not None else ""
        kind = "chat.completion" if chat else "text_completion"
        choice = ({"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}
                  if chat else {"index": 0, "text": text, "finish_reason": "stop", "logprobs": None})
        cost = result.cost
        return {"id": plan["id"], "object": kind, "created": parsed.created,
                "model": self.config.model_name, "choices": [choice],
                "usage": protocol.usage(0, cost.generated_tokens),
                "ttscale": {"strategy": strategy, "answer": result.answer,
                            "candidates": [{"text": c.text, "steps": c.steps, "step_scores": c.step_scores,
                                            "score": c.score, "answer": c.answer}
                                           for c in result.candidates],
                            "cost": _cost(cost)}}
