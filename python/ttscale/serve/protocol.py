"""OpenAI request bodies to ttscale's arguments, and ttscale's results to OpenAI response bodies.

Every check here raises :class:`~ttscale.errors.InvalidArgument` with ``param`` set to the
body's field name, which the server answers with an OpenAI-shaped 400. Types are checked, not
coerced (a string is not a number, a bool is not a count), before anything reaches the engine.
"""

from __future__ import annotations

import numbers
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from ttscale.errors import InvalidArgument, invalid
from ttscale.sampling_params import SamplingParams


@dataclass
class ParsedRequest:
    """A completions or chat request, checked."""

    prompts: list  # str or list[int], one per prompt
    params: SamplingParams
    stream: bool = False
    include_usage: bool = False
    echo: bool = False
    model: str | None = None
    search: dict[str, Any] | None = None  # the "ttscale" extra field
    best_of: int | None = None
    text: str | None = None  # a chat request's rendered prompt (what a search starts from)
    created: int = field(default_factory=lambda: int(time.time()))


def _number(body: dict, name: str, default, *, low=None, high=None, integer=False):
    value = body.get(name, default)
    if value is None:
        return default
    kind = numbers.Integral if integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kind):
        raise invalid(name, f"expected {'an integer' if integer else 'a number'}, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise invalid(name, f"expected a value in [{low}, {high}], got {value!r}")
    return value


def _stop(body: dict) -> list[str] | None:
    stop = body.get("stop")
    if stop is None:
        return None
    if isinstance(stop, str):
        return [stop] if stop else None
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= 16:
        return [s for s in stop if s] or None
    raise invalid("stop", f"expected a string or a list of at most 16 strings, got {stop!r}")


def _token_ids(value) -> bool:
    return isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)


def sampling_params(body: dict, *, max_n: int, default_max_tokens: int, logprobs: int) -> SamplingParams:
    """The body's sampling fields as SamplingParams (OpenAI's names and defaults)."""
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    max_tokens = _number({name: max_tokens}, name, default_max_tokens, low=1, integer=True)
    n = _number(body, "n", 1, low=1, integer=True)
    if n > max_n:
        raise invalid("n", f"at most {max_n} samples a request (the server's --max-n), got {n}")
    seed = _number(body, "seed", None, low=0, high=2**63 - 1, integer=True)
    try:
        return SamplingParams(
            n=n,
            temperature=float(_number(body, "temperature", 1.0, low=0.0, high=100.0)),
            top_p=float(_number(body, "top_p", 1.0, low=0.0, high=1.0)),
            top_k=max(int(_number(body, "top_k", 0, low=-1, integer=True)), 0),  # vLLM's -1: off
            min_p=float(_number(body, "min_p", 0.0, low=0.0, high=1.0)),
            max_tokens=int(max_tokens),
            stop=_stop(body),
            seed=None if seed is None else int(seed),
            ignore_eos=_flag(body, "ignore_eos"),
            logprobs=logprobs,
            **_thinking(body),
        )
    except InvalidArgument:
        raise
    except ValueError as error:  # SamplingParams names the argument first: "top_p: ..."
        param = str(error).split(":", 1)[0].strip()
        raise InvalidArgument(str(error), param=param if param.isidentifier() else None) from None


def _thinking(body: dict) -> dict[str, Any]:
    """The thinking fields (vLLM's extra sampling parameters, top-level in the body); texts are
    checked by SamplingParams (a string or a list of token ids)."""
    fields = {name: _number(body, name, None, low=0, high=2**31 - 1, integer=True)
              for name in ("thinking_token_budget", "max_extensions")}
    fields["min_thinking_tokens"] = _number(body, "min_thinking_tokens", 0, low=0, high=2**31 - 1,
                                            integer=True)
    fields.update((name, body.get(name)) for name in ("thinking_end", "continue_text"))
    return fields


def _flag(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise invalid(name, f"expected true or false, got {value!r}")
    return value


def _stream_options(body: dict) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not isinstance(options, dict):
        raise invalid("stream_options", f"expected an object, got {options!r}")
    return _flag(options, "include_usage")


def _search(body: dict, max_n: int) -> dict[str, Any] | None:
    extra = body.get("ttscale")
    if extra is None:
        return None
    if not isinstance(extra, dict) or not isinstance(extra.get("strategy"), str):
        raise invalid("ttscale.strategy", f"expected an object with a strategy name, got {extra!r}")
    n = extra.get("n", 4)
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= max_n:
        raise invalid("ttscale.n", f"expected an integer in [1, {max_n}], got {n!r}")
    return dict(extra)


def parse_completion(body: dict, *, max_n: int, default_max_tokens: int) -> ParsedRequest:
    if not isinstance(body, dict):
        raise invalid("body", "expected a JSON object")
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        prompts = [prompt]
    elif _token_ids(prompt) and prompt:
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = list(prompt)
    elif isinstance(prompt, list) and prompt and all(_token_ids(p) for p in prompt):
        prompts = list(prompt)
    else:
        raise invalid("prompt", "expected a string, a list of strings, a list of token ids or a "
                                f"list of token-id lists, got {_short(prompt)}")
    if any(p == "" or p == [] for p in prompts):
        raise invalid("prompt", "empty prompt")
    logprobs = _number(body, "logprobs", 0, low=0, high=20, integer=True)
    best_of = _number(body, "best_of", None, low=1, high=max_n, integer=True)
    params = sampling_params(body, max_n=max_n, default_max_tokens=default_max_tokens, logprobs=int(logprobs))
    if best_of is not None and best_of < params.n:
        raise invalid("best_of", f"expected at least n ({params.n}), got {best_of}")
    return ParsedRequest(prompts, params, stream=_flag(body, "stream"),
                         include_usage=_stream_options(body), echo=_flag(body, "echo"),
                         model=body.get("model"), search=_search(body, max_n), best_of=best_of)


def parse_chat(body: dict, tokenizer, *, max_n: int, default_max_tokens: int) -> ParsedRequest:
    if not isinstance(body, dict):
        raise invalid("body", "expected a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid("messages", f"expected a non-empty list of messages, got {_short(messages)}")
    for i, message in enumerate(messages):
        if (not isinstance(message, dict) or not isinstance(message.get("role"), str)
                or not isinstance(message.get("content"), str)):
            raise invalid("messages", f"message {i}: expected {{'role': str, 'content': str}}, "
                                      f"got {_short(message)}")
    if tokenizer is None or tokenizer.chat_template is None:
        raise invalid("messages", "this model has no chat template; use /v1/completions")
    text = tokenizer.apply_chat_template(
        [{"role": m["role"], "content": m["content"]} for m in messages], add_generation_prompt=True)
    # the template writes the special tokens it wants (BOS among them): add none
    ids = tokenizer.encode(text, add_special_tokens=False)
    logprobs = 0
    if _flag(body, "logprobs"):
        logprobs = int(_number(body, "top_logprobs", 1, low=0, high=20, integer=True)) or 1
    params = sampling_params(body, max_n=max_n, default_max_tokens=default_max_tokens, logprobs=logprobs)
    return ParsedRequest([ids], params, stream=_flag(body, "stream"),
                         include_usage=_stream_options(body), model=body.get("model"),
                         search=_search(body, max_n), text=text)


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def error_body(message: str, kind: str, param: str | None = None, code: str | int | None = None) -> dict:
    """OpenAI's error shape."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_logprobs(tokenizer, completion) -> dict | None:
    """OpenAI's completions ``logprobs`` object for one completion."""
    if completion.logprobs is None:
        return None
    decode = (lambda i: tokenizer.decode([i], skip_special_tokens=False)) if tokenizer else str
    top = [{decode(t): lp for t, lp in step} for step in completion.logprobs]
    chosen = [decode(t) for t in completion.token_ids]
    token_lp = [step.get(tok, max(step.values(), default=0.0)) for tok, step in zip(chosen, top, strict=False)]
    return {"tokens": chosen, "token_logprobs": token_lp, "top_logprobs": top, "text_offset": []}


def chat_logprobs(tokenizer, completion) -> dict | None:
    if completion.logprobs is None:
        return None
    decode = (lambda i: tokenizer.decode([i], skip_special_tokens=False)) if tokenizer else str
    content = []
    for token, step in zip(completion.token_ids, completion.logprobs, strict=False):
        alternatives = [{"token": decode(t), "logprob": lp, "bytes": None} for t, lp in step]
        mine = next((a["logprob"] for t, a in zip(step, alternatives, strict=False) if t[0] == token),
                    alternatives[0]["logprob"] if alternatives else 0.0)
        content.append({"token": decode(token), "logprob": mine, "bytes": None,
                        "top_logprobs": alternatives})
    return {"content": content}


class HTTPError(Exception):
    """An answer with an error status: an OpenAI-shaped body (:func:`error_body`) is sent."""

    def __init__(self, status: int, message: str, kind: str, param: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.headers = status, message, kind, param, headers
