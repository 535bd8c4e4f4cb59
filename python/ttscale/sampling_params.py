"""``SamplingParams``: how to sample, in vLLM's vocabulary."""

from __future__ import annotations

import math

from dataclasses import dataclass


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

    def __post_init__(self) -> None:
        if not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"n: expected an integer >= 1, got {self.n!r}")
        tiny = 1.1754943508222875e-38  # float32's smallest normal: the sampler divides by it
        if not (self.temperature == 0 or tiny <= self.temperature < math.inf):
            raise ValueError(f"temperature: expected 0 or a finite value >= {tiny:.3g}, "
                             f"got {self.temperature!r}")
        if not isinstance(self.top_k, int) or not 0 <= self.top_k < 2**31:
            raise ValueError(
                f"top_k: expected an integer in [0, 2**31) (0 is off), got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p: expected a value in (0, 1], got {self.top_p!r}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p: expected a value in [0, 1], got {self.min_p!r}")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens: expected an integer >= 1, got {self.max_tokens!r}")
        if not isinstance(self.logprobs, int) or not 0 <= self.logprobs <= 20:
            raise ValueError(f"logprobs: expected an integer in [0, 20], got {self.logprobs!r}")
        if self.seed is not None:
            check_seed(self.seed)
        stops = self.stop_strings
        if any(not isinstance(s, str) or not s for s in stops):
            raise ValueError(f"stop: expected non-empty strings, got {self.stop!r}")

    @property
    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


def check_seed(seed) -> None:
    """A seed the sampler takes: an integer (not a bool) in [0, 2**64); else a ValueError
    naming ``seed``."""
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**64:
        raise ValueError(f"seed: expected an integer in [0, 2**64), got {seed!r}")
