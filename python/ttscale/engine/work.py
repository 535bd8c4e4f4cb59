"""The work one scheduler step batches, and what it reports.

- :class:`Request`: a prompt and its ``n`` samples (the step API, ``LLM.generate``). The
  scheduler owns its sequences: it prefills the prompt, forks the samples, frees them, and may
  preempt them (recompute later) to make room for older work.
- :class:`DecodeItem`: a search's "decode these sequences to their next stop". The search owns
  the sequences; the scheduler decodes them beside every other row and may preempt their blocks.
- :class:`Wave`: a search's problems, from their prefill to the search's end. Its arrival orders
  all its decode items (older waves first), and the sequences it holds between decode items are
  preemptible by older work, so that searches started at different times share the pool and the
  steps instead of waiting for each other.
- :class:`EngineStats`: ``LLM.stats()``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch

from ttscale.engine.confidence import ConfidenceStop
from ttscale.engine.sequence import DRAWS_PER_SEQUENCE, Prompt, Sequence
from ttscale.sampling_params import SamplingParams

STREAM_BITS = 39  # a sample's stream number; times DRAWS_PER_SEQUENCE (2**24) stays below 2**63


def sample_stream(seed: int, stream: int, index: int) -> int:
    """The first random offset of sample ``index`` of a request keyed by (``seed``, ``stream``):
    a hash, so that requests never share a stream whatever runs beside them."""
    digest = hashlib.blake2b(f"{seed}:{stream}:{index}".encode(), digest_size=8).digest()
    return (int.from_bytes(digest, "little") >> (64 - STREAM_BITS)) * DRAWS_PER_SEQUENCE


@dataclass(eq=False)
class Request:
    """One prompt and its ``params.n`` samples, as the scheduler tracks them."""

    request_id: str
    prompt: str | None
    prompt_ids: list[int]
    params: SamplingParams
    seed: int
    stream: int
    arrival: int = 0
    kv_prompt: Prompt | None = None  # the prefilled prompt, while admitted
    seqs: list[Sequence] = field(default_factory=list)  # one per sample, from the first admission
    stream_offsets: dict[Sequence, int] = field(default_factory=dict)  # each sample's first offset
    finished: bool = False
    aborted: bool = False
    preempted: bool = False  # work of this request was evicted and waits to be recomputed
    public: bool = True  # added through the step API (its progress is reported by step())

    @property
    def unfinished(self) -> list[Sequence]:
        return [s for s in self.seqs if s.finish_reason is None] if self.seqs else []


@dataclass(eq=False)
class DecodeItem:
    """A search's piece of work: decode these sequences until each stops (a step delimiter, EOS,
    its limit). Its rows join the same steps as requests and other searches' rows; the search
    owns the sequences (the scheduler never frees or preempts them)."""

    active: list[Sequence]
    sampling: SamplingParams
    stops: tuple[str, ...]
    limits: dict[Sequence, int]
    seed: int
    arrival: int = 0
    done: bool = False
    confidence_stop: ConfidenceStop | None = None  # DeepConf's online stop for its rows
    wave: Wave | None = None  # the search wave whose sequences these are, if any


@dataclass(eq=False)
class PrefillItem:
    """A verifier's piece of work: run these sequences' pending tokens (new steps) and return
    the final hidden states at ``hidden_at``. Items queued by several threads at once run in one
    forward."""

    seqs: list[Sequence]
    hidden_at: dict
    hidden: dict | None = None  # sequence -> [k, H], once done
    tokens: int = 0  # the tokens it put into the KV cache (what its caller is charged)
    done: bool = False
    error: BaseException | None = None


@dataclass(eq=False)
class ForkItem:
    """A search step's selection: keep the best candidates of each group and fork them
    (:meth:`Engine.select_and_fork`). Items queued by several threads at once run as one
    ``ops.select_and_fork`` over all their groups, with one host read."""

    candidates: list[Sequence]
    scores: torch.Tensor  # float32 on the pool's device, one per candidate
    group_sizes: list[int]
    keep: list[int]  # per group
    children: list[int]  # per group
    result: tuple | None = None  # (children, parents, group offsets), once done
    done: bool = False
    error: BaseException | None = None


@dataclass(eq=False)
class Wave:
    """One search's wave of problems, as the scheduler admits it (:meth:`Scheduler.begin_wave`).

    ``prompt_blocks``: its prompts' blocks; ``seq_blocks``: its sequences' blocks at their
    longest. The scheduler admits a wave only while the oldest wave could still grow to its
    longest beside every wave's prompts (the one part of a wave it never preempts), so the oldest
    always finishes and the rest follow."""

    arrival: int
    prompt_blocks: int
    seq_blocks: int
    prompts: list[Prompt] = field(default_factory=list)  # the engine's prompts it prefilled
    waiting: bool = False  # its thread waits for room to prefill (it frees nothing meanwhile)


@dataclass
class EngineStats:
    """What the scheduler holds, as of the last step (reading it touches no device)."""

    running: int  # requests with a prefilled prompt and samples still to finish
    waiting: int  # requests not yet admitted
    preempted: int  # requests with work evicted, waiting to be recomputed
    free_blocks: int  # KV blocks a new request could take now
    total_blocks: int
    prefix_hit_tokens: int  # prompt tokens served from other requests' blocks
    steps: int
    host_reads: int  # device-to-host reads (Pool.read_host) since the engine started
    preemptions: int = 0  # sequences or prompts evicted to make room, since the start
