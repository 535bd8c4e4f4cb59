"""What the engine tracks per prompt and per sequence: plain dataclasses of ids and lists.

A prompt is prefilled once into its own blocks (level 0 of attention) — all but its last
token. Every sequence of the prompt starts with that last token pending, so that the
sequence's first forward step yields its own first sample; the prompt's KV is never copied.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ttscale.errors import InvalidArgument

# A draw's RNG offset is seq_id * DRAWS_PER_SEQUENCE + its index in the sequence, so a sequence's
# draws depend neither on its batch nor on other sequences.
DRAWS_PER_SEQUENCE = 1 << 24
# A prompt with a stream key numbers its sequences key * 2**STREAM_BITS + k, k counting that
# key's sequences in the prompt's counters (a search's own): a search's samples of a problem
# then depend on the key, the seed and that problem's own forks only, not on which problems
# share its call or its wave.
STREAM_BITS = 16
MAX_STREAM_KEY = 1 << 18  # keeps seq_id * DRAWS_PER_SEQUENCE below 2**63


@dataclass(eq=False)
class Prompt:
    """A prompt whose KV lives once in the pool, shared by all of its sequences."""

    prompt_id: int
    prompt_ids: list[int]
    row: int | None = None  # its block table: a row of the engine's pool (engine/pool.py)
    kv_len: int = 0  # prompt tokens whose K/V are in the pool: len(prompt_ids) - 1 once prefilled
    num_sequences: int = 0  # live sequences of this prompt
    freed: bool = False
    # Numbers this prompt's sequences from ``stream_key << STREAM_BITS`` on (see Engine.fork),
    # so that their random streams do not depend on other prompts; None: the engine's count.
    stream_key: int | None = None
    # The fork counts by stream key that number this prompt's sequences: one dict per search,
    # so that searches running at once never share numbers; None: the engine's own.
    stream_counters: dict[int, int] | None = None
    live: set = field(default_factory=set)  # its sequences not yet freed (to free all on failure)
    wave: object | None = None  # the search wave that prefilled it (engine.work.Wave), if any


@dataclass(eq=False)
class Sequence:
    """One sample path: its own tokens after its prefilled ``prompt``.

    ``tokens[:kv_len]`` have K/V in the pool (in its table, pool row ``row``); the rest are
    pending and go through the model at the next step. ``tokens[0]`` is the prompt's last token;
    ``generated`` counts sampled tokens, ``logprobs`` holds one value per sampled token, and
    ``sampled_at`` is the index in ``tokens`` of each sampled token (a token a thinking control
    forced in place of a sample counts as one: it took the sample's step and its draw).
    """

    seq_id: int
    prompt: Prompt
    tokens: list[int]
    row: int | None = None  # its block table: a row of the engine's pool (None once freed)
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
        return self.prompt.kv_len + len(self.tokens)

    @property
    def output_ids(self) -> list[int]:
        """Everything after the prompt: sampled tokens and any the caller appended."""
        return self.tokens[1:]


def copy_sequence(parent: Sequence, seq_id: int, row: int) -> Sequence:
    """A fork of ``parent``: its tokens, samples and thinking state, with its own table ``row``
    (holding ``parent``'s blocks) and number ``seq_id``."""
    child = Sequence(seq_id, parent.prompt, list(parent.tokens), row, parent.kv_len,
                     list(parent.logprobs), list(parent.top_logprobs), list(parent.sampled_at),
                     parent.finish_reason)
    child.thinking = parent.thinking and parent.thinking.copy()
    return child


def keyed_seq_id(prompt: Prompt, engine_counters: dict[int, int]) -> int:
    """The next number of a sequence of ``prompt``, which has a stream key: counted in the
    prompt's counters, else the engine's (beyond 2**STREAM_BITS sequences of one key they run
    into the next key's numbers)."""
    key = prompt.stream_key
    if not 0 <= key < MAX_STREAM_KEY:
        raise InvalidArgument(f"prompt: stream key {key} outside [0, {MAX_STREAM_KEY})")
    counters = prompt.stream_counters if prompt.stream_counters is not None else engine_counters
    k = counters.get(key, 0)
    counters[key] = k + 1
    return (key << STREAM_BITS) + k
