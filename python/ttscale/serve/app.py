"""The OpenAI-compatible HTTP server: FastAPI routes over one :class:`AsyncLLM`.

Routes: ``GET /health``, ``GET /v1/models``, ``POST /v1/completions``,
``POST /v1/chat/completions``, ``GET /metrics`` (Prometheus). Every request joins the one
scheduler, so concurrent requests share decode steps. Errors are OpenAI-shaped
(``{"error": {"message", "type", "param", "code"}}``) and never carry a traceback; a failure
inside one request fails that request only.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from sse_starlette.sse import EventSourceResponse

from ttscale.errors import InvalidArgument, TTScaleError, UnknownRequest
from ttscale.serve import protocol
from ttscale.serve.async_llm import AsyncLLM
from ttscale.serve.protocol import HTTPError
from ttscale.serve.search import Searches

log = logging.getLogger("ttscale.serve")


@dataclass
class ServerConfig:
    model_name: str
    api_key: str | None = None
    max_queue: int = 1024
    max_n: int = 1024
    max_body_bytes: int = 16 << 20
    default_max_tokens: int = 256
    step_delimiter: str = "\n\n"
    prm: object | None = None  # a verifier for searches


def _error(status: int, message: str, kind: str, param: str | None = None, headers=None) -> JSONResponse:
    return JSONResponse(protocol.error_body(message, kind, param, status), status_code=status,
                        headers=headers)


class Metrics:
    def __init__(self, engine: AsyncLLM):
        self.registry = CollectorRegistry()
        r = self.registry
        self.running = Gauge("ttscale_requests_running", "Requests with a prefilled prompt", registry=r)
        self.waiting = Gauge("ttscale_requests_waiting", "Requests not yet admitted", registry=r)
        self.blocks_used = Gauge("ttscale_kv_blocks_used", "KV blocks in use", registry=r)
        self.blocks_total = Gauge("ttscale_kv_blocks_total", "KV blocks in the pool", registry=r)
        self.generation = Counter("ttscale_generation_tokens", "Tokens generated", registry=r)
        self.prompt = Counter("ttscale_prompt_tokens", "Prompt tokens prefilled", registry=r)
        self.preemptions = Counter("ttscale_preemptions", "Sequences or prompts preempted", registry=r)
        self.steps = Counter("ttscale_steps", "Scheduler steps (decode windows) run", registry=r)
        self.prefix_hits = Counter("ttscale_prefix_cache_hit_tokens",
                                   "Prompt tokens served from the prefix cache", registry=r)
        self.latency = Histogram("ttscale_request_latency_seconds", "Request latency, end to end",
                                 registry=r, buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
        self.ttft = Histogram("ttscale_time_to_first_token_seconds", "Time to the first token",
                              registry=r, buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        self.engine = engine
        self._seen = {"generation": 0, "prompt": 0, "preemptions": 0, "prefix": 0, "steps": 0}

    def render(self) -> bytes:
        stats = self.engine.stats()
        self.running.set(stats.running)
        self.waiting.set(stats.waiting)
        self.blocks_total.set(stats.total_blocks)
        self.blocks_used.set(stats.total_blocks - stats.free_blocks)
        for name, counter, value in (
            ("generation", self.generation, self.engine.generation_tokens),
            ("prompt", self.prompt, self.engine.prompt_tokens),
            ("preemptions", self.preemptions, stats.preemptions),
            ("prefix", self.prefix_hits, stats.prefix_hit_tokens),
            ("steps", self.steps, stats.steps),
        ):
            counter.inc(max(value - self._seen[name], 0))
            self._seen[name] = value
        return generate_latest(self.registry)


def build_app(engine: AsyncLLM, config: ServerConfig) -> FastAPI:
    app = FastAPI(title="ttscale", docs_url=None, redoc_url=None, openapi_url=None)
    metrics = Metrics(engine)
    searches = Searches(engine, config, metrics)
    state = {"draining": False, "in_flight": 0}
    app.state.ttscale = state

    @app.middleware("http")
    async def guard(request: Request, call_next):
        path = request.url.path
        if path != "/health":
            if state["draining"]:
                return _error(503, "the server is shutting down", "service_unavailable")
            if config.api_key is not None:
                if request.headers.get("authorization", "") != f"Bearer {config.api_key}":
                    return _error(401, "missing or wrong API key (Authorization: Bearer KEY)",
                                  "authentication_error")
            length = request.headers.get("content-length")
            if length is not None and length.isdigit() and int(length) > config.max_body_bytes:
                return _error(413, f"request body over {config.max_body_bytes} bytes", "invalid_request_error")
        try:
            return await call_next(request)
        except Exception:  # a bug in one request fails that request, without a traceback
            log.exception("request to %s failed", path)
            return _error(500, "internal error while serving this request", "internal_error")

    @app.exception_handler(HTTPError)
    async def http_error(request: Request, error: HTTPError):
        return _error(error.status, error.message, error.kind, error.param, error.headers)

    @app.exception_handler(404)
    async def not_found(request: Request, error):
        return _error(404, f"no route {request.method} {request.url.path}", "not_found_error")

    @app.exception_handler(405)
    async def not_allowed(request: Request, error):
        return _error(405, f"{request.method} is not allowed on {request.url.path}", "invalid_request_error")

    @app.get("/health")
    async def health():
        return PlainTextResponse("ok")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [
            {"id": config.model_name, "object": "model", "created": 0, "owned_by": "ttscale"}]}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    async def body_of(request: Request) -> dict:
        raw = await request.body()
        if len(raw) > config.max_body_bytes:
            raise HTTPError(413, f"request body over {config.max_body_bytes} bytes", "invalid_request_error")
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise HTTPError(400, f"malformed JSON: {error}", "invalid_request_error") from None
        if not isinstance(body, dict):
            raise HTTPError(400, "the body must be a JSON object", "invalid_request_error")
        model = body.get("model")
        if model is not None and model != config.model_name:
            raise HTTPError(404, f"model {model!r} does not exist; this server serves "
                                 f"{config.model_name!r}", "not_found_error", "model")
        return body

    def admit():
        waiting = engine.stats().waiting
        if waiting >= config.max_queue:
            raise HTTPError(429, f"{waiting} requests are waiting (--max-queue {config.max_queue}); "
                                 "retry later", "rate_limit_error", headers={"Retry-After": "1"})

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await body_of(request)
        parsed = _parse(lambda: protocol.parse_completion(
            body, max_n=config.max_n, default_max_tokens=config.default_max_tokens))
        return await serve(request, parsed, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await body_of(request)
        parsed = _parse(lambda: protocol.parse_chat(
            body, engine.tokenizer, max_n=config.max_n, default_max_tokens=config.default_max_tokens))
        return await serve(request, parsed, chat=True)

    async def serve(request: Request, parsed: protocol.ParsedRequest, chat: bool):
        admit()
        if parsed.search is not None:
            plan = searches.plan(parsed, chat)  # a bad option is a 400 before any stream starts
            if not parsed.stream:
                return await searches.run(parsed, chat, plan)
            return EventSourceResponse(searches.events(parsed, chat, plan), ping=15)
        kind = "chat.completion" if chat else "text_completion"
        rid = protocol.new_id("chatcmpl" if chat else "cmpl")
        params = parsed.params
        if parsed.best_of is not None and parsed.best_of > params.n:
            params = _replace(params, n=parsed.best_of)
        streams = []
        try:
            for i, prompt in enumerate(parsed.prompts):
                streams.append(engine.generate(prompt, params, f"{rid}-{i}"))
        except InvalidArgument as error:
            for i in range(len(streams)):  # the prompts before the bad one stop at once
                with contextlib.suppress(UnknownRequest):
                    engine.abort(f"{rid}-{i}")
            param = error.param if len(parsed.prompts) == 1 or error.param != "prompt" else "prompt"
            raise HTTPError(400, str(error), "invalid_request_error", param) from None
        if parsed.stream:
            return EventSourceResponse(stream(rid, kind, parsed, streams, chat), ping=15)
        started = time.perf_counter()
        try:
            finals = await asyncio.gather(*[_last(s, metrics, started) for s in streams])
        except InvalidArgument as error:
            raise HTTPError(400, str(error), "invalid_request_error", error.param) from None
        if parsed.best_of is not None:  # ranked off the event loop (the PRM computes)
            ranked = await asyncio.gather(*[asyncio.to_thread(_best_of, out, parsed.params.n)
                                            for out in finals])
        else:
            ranked = [out.outputs for out in finals]
        metrics.latency.observe(time.perf_counter() - started)
        return _response(rid, kind, parsed, finals, ranked, chat)

    async def stream(rid, kind, parsed, streams, chat):
        """Server-sent events: each step's new text per choice, then usage, then [DONE]."""
        started = time.perf_counter()
        sent: dict[int, int] = {}
        prompt_tokens = completion_tokens = 0
        first = True
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i, generator):
            try:
                async for out in generator:
                    await queue.put((i, out))
            except Exception as error:  # noqa: BLE001  (reported to the client as an error event)
                await queue.put((i, error))
            finally:
                await queue.put((i, None))

        tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(streams)]
        open_streams = len(tasks)
        n = parsed.params.n
        try:
            while open_streams:
                i, out = await queue.get()
                if out is None:
                    open_streams -= 1
                    continue
                if isinstance(out, Exception):
                    yield json.dumps(protocol.error_body(str(out), "internal_error"))
                    continue
                if first:
                    metrics.ttft.observe(time.perf_counter() - started)
                    first = False
                for c in out.outputs[:n]:
                    index = i * n + c.index
                    new = c.text[sent.get(index, 0):]
                    sent[index] = len(c.text)
                    done = out.finished
                    if not new and not done:
                        continue
                    choice = ({"index": index, "delta": {"content": new}, "finish_reason": None}
                              if chat else {"index": index, "text": new, "logprobs": None,
                                            "finish_reason": None})
                    if done:
                        choice["finish_reason"] = _finish(c.finish_reason)
                    yield json.dumps({"id": rid, "object": f"{kind}.chunk", "created": parsed.created,
                                      "model": config.model_name, "choices": [choice]})
                if out.finished:
                    prompt_tokens += len(out.prompt_token_ids)
                    completion_tokens += sum(len(c.token_ids) for c in out.outputs)
            if parsed.include_usage:
                yield json.dumps({"id": rid, "object": f"{kind}.chunk", "created": parsed.created,
                                  "model": config.model_name, "choices": [],
                                  "usage": protocol.usage(prompt_tokens, completion_tokens)})
            yield "[DONE]"
            metrics.latency.observe(time.perf_counter() - started)
        finally:  # the client went away (or we are done): stop every choice's request
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)  # each aborts its request
            for generator in streams:
                await generator.aclose()

    def _response(rid, kind, parsed, finals, ranked_outputs, chat):
        choices, prompt_tokens, completion_tokens = [], 0, 0
        n = parsed.params.n
        for i, (out, ranked) in enumerate(zip(finals, ranked_outputs, strict=True)):
            prompt_tokens += len(out.prompt_token_ids)
            completion_tokens += sum(len(c.token_ids) for c in out.outputs)
            for k, c in enumerate(ranked):
                if chat:
                    choices.append({"index": i * n + k, "finish_reason": _finish(c.finish_reason),
                                    "message": {"role": "assistant", "content": c.text},
                                    "logprobs": protocol.chat_logprobs(engine.tokenizer, c)})
                else:
                    text = (out.prompt or "") + c.text if parsed.echo else c.text
                    choices.append({"index": i * n + k, "text": text,
                                    "finish_reason": _finish(c.finish_reason),
                                    "logprobs": protocol.completion_logprobs(engine.tokenizer, c)})
        return {"id": rid, "object": kind, "created": parsed.created, "model": config.model_name,
                "choices": choices, "usage": protocol.usage(prompt_tokens, completion_tokens)}

    def _best_of(out, n: int):
        """The ``n`` best of a best_of request's samples: by PRM score (the last step's), or by
        cumulative log-probability without a PRM."""
        if config.prm is None or not isinstance(out.prompt, str) or not out.prompt.strip():
            return sorted(out.outputs, key=lambda c: -c.cumulative_logprob)[:n]
        from ttscale.search.select import aggregate
        from ttscale.verifiers.base import split_steps

        scores = []  # the PRM's engine takes its own lock per call: searches may run beside
        for c in out.outputs:
            step_scores = config.prm.score_solution(out.prompt, split_steps(c.text, config.step_delimiter))
            scores.append(aggregate([x for x in step_scores if x is not None], "last") or 0.0)
        order = sorted(range(len(out.outputs)), key=lambda k: -scores[k])[:n]
        return [out.outputs[k] for k in order]

    return app


def _parse(parse):
    try:
        return parse()
    except InvalidArgument as error:
        raise HTTPError(400, str(error), "invalid_request_error", error.param) from None
    except TTScaleError as error:
        raise HTTPError(400, str(error), "invalid_request_error") from None


async def _last(generator, metrics: Metrics, started: float):
    last, first = None, True
    async for out in generator:
        if first:
            metrics.ttft.observe(time.perf_counter() - started)
            first = False
        last = out
    return last


def _finish(reason: str | None) -> str | None:
    return {"eos": "stop", "stop": "stop", "length": "length"}.get(reason, reason)


def _replace(params, **changes):
    import dataclasses

    return dataclasses.replace(params, **changes)
