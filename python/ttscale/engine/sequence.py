"""What the engine tracks per problem and per sequence: plain dataclasses of ids and lists.

A problem's prompt is prefilled once into its own blocks (level 0 of attention) — all but its
last token. Every sequence of the problem starts with that last token pending, so that the
sequence's first forward step yields its own first sample; the prompt's KV is never copied.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(eq=False)
class Problem:
    """A prompt whose KV lives once in the pool, shared by all of its sequences."""

    problem_id: int
    prompt_ids: list[int]
    block_table: list[int] = field(default_factory=list)
    kv_len: int = 0  # prompt tokens whose K/V are in the pool: len(prompt_ids) - 1 once prefilled
    num_sequences: int = 0  # live sequences of this problem
    freed: bool = False
    # Numbers this problem's sequences from ``stream_key << STREAM_BITS`` on (see Engine.fork),
    # so that their random streams do not depend on other problems; None: the engine's count.
    stream_key: int | None = None
    # The fork counts by stream key that number this problem's sequences: one dict per search,
    # so that searches running at once never share numbers; None: the engine's own.
    stream_counters: dict[int, int] | None = None
    live: set = field(default_factory=set)  # its sequences not yet freed (to free all on failure)


@dataclass(eq=False)
class Sequence:
    """One sample path: its own tokens after the problem's prefilled prompt.

    ``tokens[:kv_len]`` have K/V in the pool (in ``block_table``); the rest are pending and go
    through the model at the next step. ``tokens[0]`` is the prompt's last token; ``generated``
    counts sampled tokens, ``logprobs`` holds one value per sampled token, and ``sampled_at`` is
    the index in ``tokens`` of each sampled token (a token a thinking control forced in place
    of a sample counts as one: it took the sample's step and its draw).
    """

    seq_id: int
    problem: Problem
    tokens: list[int]
    block_table: list[int] = field(default_factory=list)
    kv_len: int = 0
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    sampled_at: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop", "eos", "length" or "confidence" after a decode call
    freed: bool = False
    prefilled: int = 0  # tokens of its own put into the KV cache without sampling (cost accounting)
    thinking: object | None = None  # its thinking.Trace, once a thinking control decoded it

    @property
    def generated(self) -> int:
        return len(self.sampled_at)

    @property
    def pending(self) -> int:
        return len(self.tokens) - self.kv_len

    @property
    def context_len(self) -> int:
        """Prompt + own tokens, pending ones included."""
        return self.problem.kv_len + len(self.tokens)

    @property
    def output_ids(self) -> list[int]:
        """Everything after the prompt: sampled tokens and any the caller appended."""
        return self.tokens[1:]
