"""``SamplingParams``: how to sample, in vLLM's vocabulary."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

from ttscale._checks import check_int, check_real
from ttscale.errors import InvalidArgument


@dataclass(frozen=True)
class SamplingParams:
    """How each completion is sampled.

    Parameters
    ----------
    n : int
        Completions per prompt; they share the prompt's prefilled KV.
    temperature : float
        0 is greedy (argmax).
    top_k : int
        Keep the k most likely tokens; 0 keeps all.
    top_p : float
        Keep the smallest most-likely set whose probability reaches top_p (after top-k).
    min_p : float
        Drop tokens less likely than ``min_p`` times the most likely one (after top-p).
    max_tokens : int
        New tokens per completion at most.
    stop : str | list[str] | None
        Stop when a generated token's text contains one of these strings; the completion's text
        is cut before it.
    seed : int | None
        Seed of the sampler; None takes the engine's seed.
    ignore_eos : bool
        Keep going past the end-of-sequence token (for throughput measurements).
    logprobs : int
        Top log-probabilities to return per generated token (0 to 20).
    thinking_token_budget : int | None
        The most tokens between the think-start and think-end markers (vLLM's name); at the
        budget the engine inserts ``thinking_end`` and the answer follows. None: no budget.
        Where thinking starts, and which text ends it, is :mod:`ttscale.engine.thinking`'s rule.
    thinking_end : str | list[int] | None
        The text (or token ids) that ends thinking; default the tokenizer's ``</think>`` where
        it declares one, else the end-of-sequence token.
    min_thinking_tokens : int
        Budget forcing (Muennighoff et al. 2025, "s1: Simple test-time scaling"): while fewer
        tokens than this were thought, the model's end of thinking is suppressed and
        ``continue_text`` is written instead. 0 is off.
    continue_text : str | list[int] | None
        What replaces a suppressed end of thinking (default ``"Wait"``).
    max_extensions : int | None
        The most times ``continue_text`` is written; None: as often as the minimum needs.
    """

    n: int = 1
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    max_tokens: int = 256
    stop: str | list[str] | None = None
    seed: int | None = None
    ignore_eos: bool = False
    logprobs: int = 0
    thinking_token_budget: int | None = None
    thinking_end: str | list[int] | None = None
    min_thinking_tokens: int = 0
    continue_text: str | list[int] | None = None
    max_extensions: int | None = None

    def __post_init__(self) -> None:
        # Types are checked, not coerced: a bool is not a count, a string is not a number. Numpy
        # scalars pass and are stored as the Python int or float they equal.
        set_field = lambda name, value: object.__setattr__(self, name, value)  # frozen
        set_field("n", check_int("n", self.n, low=1))
        set_field("temperature", check_real("temperature", self.temperature))
        tiny = 1.1754943508222875e-38  # float32's smallest normal: the sampler divides by it
        if not (self.temperature == 0 or tiny <= self.temperature < math.inf):
            raise InvalidArgument(f"temperature: expected 0 or a finite value >= {tiny:.3g}, "
                                  f"got {self.temperature!r}")
        set_field("top_k", check_int("top_k", self.top_k, low=0, high=2**31 - 1, note=" (0 is off)"))
        set_field("top_p", check_real("top_p", self.top_p))
        if not 0 < self.top_p <= 1:
            raise InvalidArgument(f"top_p: expected a value in (0, 1], got {self.top_p!r}")
        set_field("min_p", check_real("min_p", self.min_p))
        if not 0 <= self.min_p <= 1:
            raise InvalidArgument(f"min_p: expected a value in [0, 1], got {self.min_p!r}")
        set_field("max_tokens", check_int("max_tokens", self.max_tokens, low=1))
        set_field("logprobs", check_int("logprobs", self.logprobs, low=0, high=20))
        if self.seed is not None:
            set_field("seed", check_seed(self.seed))
        if not isinstance(self.ignore_eos, bool):
            raise InvalidArgument(f"ignore_eos: expected True or False, got {self.ignore_eos!r}")
        stop = self.stop
        if stop is not None and not isinstance(stop, str) and not (
                isinstance(stop, (list, tuple)) and all(isinstance(x, str) for x in stop)):
            raise InvalidArgument(f"stop: expected a string or a list of strings, got {stop!r}")
        if any(not s for s in self.stop_strings):
            raise InvalidArgument(f"stop: expected non-empty strings, got {self.stop!r}")
        self._check_thinking(set_field)

    def _check_thinking(self, set_field) -> None:
        """The thinking fields: counts in range, texts non-empty (token ids kept as a tuple), and
        no field set that the others leave without effect."""
        if self.thinking_token_budget is not None:
            set_field("thinking_token_budget",
                      check_int("thinking_token_budget", self.thinking_token_budget, low=0))
        set_field("min_thinking_tokens",
                  check_int("min_thinking_tokens", self.min_thinking_tokens, low=0))
        budget, least = self.thinking_token_budget, self.min_thinking_tokens
        if budget is not None and least > budget:
            raise InvalidArgument(f"min_thinking_tokens: expected at most thinking_token_budget "
                                  f"({budget}), got {least}")
        if self.max_extensions is not None:
            set_field("max_extensions", check_int("max_extensions", self.max_extensions, low=0))
        for name in ("thinking_end", "continue_text"):
            value = getattr(self, name)
            if value is not None:
                set_field(name, _text_or_ids(name, value))
        if not least:
            for name in ("continue_text", "max_extensions"):
                if getattr(self, name) is not None:
                    raise InvalidArgument(f"{name}: has no effect without min_thinking_tokens")
        if self.thinking_end is not None and not self.thinks:
            raise InvalidArgument("thinking_end: has no effect without thinking_token_budget or "
                                  "min_thinking_tokens")

    @property
    def thinks(self) -> bool:
        """Whether the engine controls this request's thinking (a budget or a minimum)."""
        return self.thinking_token_budget is not None or self.min_thinking_tokens > 0

    @property
    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


def _text_or_ids(name: str, value) -> str | tuple[int, ...]:
    """A non-empty text, or a non-empty list of token ids (stored as a tuple of ints)."""
    if isinstance(value, str):
        if not value:
            raise InvalidArgument(f"{name}: expected a non-empty string, got ''")
        return value
    if isinstance(value, (list, tuple)) and value and all(
            isinstance(t, numbers.Integral) and not isinstance(t, bool) and t >= 0 for t in value):
        return tuple(int(t) for t in value)
    raise InvalidArgument(f"{name}: expected a non-empty string or a non-empty list of token ids, "
                          f"got {value!r:.60}")


def check_seed(seed) -> int:
    """A seed the sampler takes: an integer (numpy's too, not a bool) in [0, 2**64), returned as
    an int; else an ``InvalidArgument`` naming ``seed``."""
    if not isinstance(seed, numbers.Integral) or isinstance(seed, bool) or not 0 <= seed < 2**64:
        raise InvalidArgument(f"seed: expected an integer in [0, 2**64), got {seed!r}")
    return int(seed)
