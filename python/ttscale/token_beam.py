"""Token-level beam search: ``LLM.beam_search``, the job vLLM's ``LLM.beam_search`` does.

    outs = llm.beam_search(["What is 2+2?"], ttscale.BeamSearchParams(beam_width=4, max_tokens=64))
    best = outs[0].sequences[0]
    best.token_ids, best.text, best.cumulative_logprob

Each step decodes one token of every live beam of every prompt in one decode window, with the
beam's top ``2 × beam_width`` log-probabilities, and each prompt keeps the ``beam_width`` best
(beam, token) continuations by cumulative log-probability. A kept continuation forks its beam:
the child's block table points at the beam's KV blocks (nothing is copied but a partly filled
last block when the child writes into it), and a beam nobody continues is freed. A continuation
that ends in an end-of-sequence token is finished (unless ``ignore_eos``) and competes with the
live beams at the end.

Ranking follows vLLM: score = cumulative_logprob / length ** length_penalty, where length counts
the prompt's tokens and the generated ones, less a final end-of-sequence token. Within a step
every candidate of a prompt has the same length, so a step keeps the best by cumulative
log-probability; ties go to the earlier beam, then to the more likely token.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

from ttscale.errors import InvalidArgument, invalid
from ttscale.ops.sample import MAX_LOGPROBS
from ttscale.sampling_params import SamplingParams

__all__ = ["BeamSearchParams", "BeamSearchOutput", "BeamSequence", "beam_search"]

MAX_BEAM_WIDTH = MAX_LOGPROBS // 2  # a step reads 2 × beam_width log-probabilities per beam


@dataclass(frozen=True)
class BeamSearchParams:
    """vLLM's ``BeamSearchParams``: ``beam_width`` beams per prompt, ``max_tokens`` steps."""

    beam_width: int = 4
    max_tokens: int = 16
    ignore_eos: bool = False
    length_penalty: float = 1.0

    def __post_init__(self):
        for name, low, high in (("beam_width", 1, MAX_BEAM_WIDTH), ("max_tokens", 1, None)):
            value = getattr(self, name)
            if (not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < low
                    or (high is not None and value > high)):
                bound = f"from {low} to {high}" if high is not None else f">= {low}"
                raise invalid(name, f"expected an integer {bound}, got {value!r}")
        if not isinstance(self.ignore_eos, bool):
            raise invalid("ignore_eos", f"expected True or False, got {self.ignore_eos!r}")
        penalty = self.length_penalty
        if (not isinstance(penalty, numbers.Real) or isinstance(penalty, bool)
                or not math.isfinite(penalty)):
            raise invalid("length_penalty", f"expected a finite number, got {penalty!r}")


@dataclass
class BeamSequence:
    """One of a prompt's best beams: its generated tokens, their text, and its score's parts."""

    token_ids: list[int]
    text: str
    cumulative_logprob: float
    finish_reason: str  # "stop" (ended with an end-of-sequence token) or "length"


@dataclass
class BeamSearchOutput:
    """A prompt's ``beam_width`` best sequences, best first."""

    prompt: str | None
    prompt_token_ids: list[int]
    sequences: list[BeamSequence] = field(default_factory=list)


@dataclass
class _Beam:
    tokens: list[int]  # generated so far
    cumulative_logprob: float
    seq: object = None  # the engine's Sequence; None once finished


def beam_score(prompt_len: int, beam: _Beam, eos: frozenset, length_penalty: float) -> float:
    """vLLM's ranking: cumulative log-probability over length ** length_penalty (prompt included,
    a final end-of-sequence token not)."""
    length = prompt_len + len(beam.tokens)
    if beam.tokens and beam.tokens[-1] in eos:
        length -= 1
    return beam.cumulative_logprob / length**length_penalty


def beam_search(llm, prompts: str | Seq[str] | Seq[Seq[int]],
                params: BeamSearchParams | None = None) -> list[BeamSearchOutput]:
    """The ``beam_width`` best continuations of each prompt (text or token ids); see the module."""
    params = BeamSearchParams() if params is None else params
    if not isinstance(params, BeamSearchParams):
        raise invalid("params", f"expected BeamSearchParams, got {type(params).__name__}")
    if isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts
                                    and isinstance(prompts[0], numbers.Integral)):
        prompts = [prompts]
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise invalid("prompts", "expected a prompt or a non-empty list of them, "
                                 f"got {prompts!r:.60}")
    ids = [llm.encode(p, f"prompts[{i}]") for i, p in enumerate(prompts)]
    engine = llm.engine
    for i, prompt in enumerate(ids):
        try:
            engine.check_prompt(f"prompts[{i}]", prompt)
        except InvalidArgument:
            raise
        except ValueError as error:
            raise InvalidArgument(str(error), param="prompts") from None
        positions = llm.model.max_positions
        if len(prompt) + params.max_tokens - 1 > positions:
            raise invalid("max_tokens", f"prompts[{i}] has {len(prompt)} tokens, so at most "
                          f"{positions - len(prompt) + 1} new tokens fit the model's {positions} "
                          f"positions, got {params.max_tokens}")
    scheduler = getattr(llm, "scheduler", None)
    if scheduler is not None and scheduler.cache is not None:
        with engine.lock:  # prompts are allocated directly: give back what only the cache holds
            scheduler.cache.clear()
    beams_by_prompt: list[list[_Beam]] = []
    for wave in _waves(engine, ids, params):
        beams_by_prompt += _search_wave(engine, [ids[i] for i in wave], params)
    tokenizer = llm.tokenizer
    outputs = []
    for prompt, prompt_ids, beams in zip(prompts, ids, beams_by_prompt, strict=True):
        sequences = [
            BeamSequence(b.tokens, tokenizer.decode(b.tokens) if tokenizer is not None else "",
                         b.cumulative_logprob,
                         "stop" if b.tokens and b.tokens[-1] in engine.eos_token_ids
                         and not params.ignore_eos else "length")
            for b in beams
        ]
        outputs.append(BeamSearchOutput(prompt if isinstance(prompt, str) else None, prompt_ids,
                                        sequences))
    return outputs


def _waves(engine, ids: list[list[int]], params: BeamSearchParams) -> list[list[int]]:
    """Consecutive prompts whose KV fits the free pool at once: the prompt, and every beam at
    ``max_tokens`` plus one block for a fork's copied partial block."""
    blocks = engine.pool
    per_beam = blocks.blocks_for(params.max_tokens + 1) + 1
    with engine.lock:  # the free count now: one read of the pool, once per call
        blocks.refresh()
    waves: list[list[int]] = [[]]
    used = 0
    for i, prompt in enumerate(ids):
        need = blocks.blocks_for(len(prompt)) + params.beam_width * per_beam
        if need > blocks.num_free:
            raise invalid("prompts", f"prompts[{i}] with {params.beam_width} beams of "
                          f"{params.max_tokens} tokens needs {need} KV blocks, {blocks.num_free} "
                          "are free; lower beam_width or max_tokens, or raise kv_budget_bytes")
        if waves[-1] and used + need > blocks.num_free:
            waves.append([])
            used = 0
        waves[-1].append(i)
        used += need
    return waves


def _search_wave(engine, ids: list[list[int]], params: BeamSearchParams) -> list[list[_Beam]]:
    """Each prompt's ``beam_width`` best beams, best first (finished and live together)."""
    width, eos = params.beam_width, engine.eos_token_ids
    # EOS must not end a beam inside the engine: the search decides what a candidate EOS does
    step_params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True, logprobs=2 * width)
    kv_prompts = engine.add_many(ids)  # the engine's prefilled prompts, one per prompt of ids
    try:
        live = [[_Beam([], 0.0, engine.fork(p, 1)[0])] for p in kv_prompts]
        finished: list[list[_Beam]] = [[] for _ in kv_prompts]
        for _ in range(params.max_tokens):
            seqs = [b.seq for group in live for b in group]
            if not seqs:
                break
            engine.decode(seqs, step_params, max_new_tokens=1)
            live = [_step(engine, group, done, width, eos, params.ignore_eos)
                    for group, done in zip(live, finished, strict=True)]
        best = []
        for prompt, group, done in zip(ids, live, finished, strict=True):
            def score(beam, prompt_len=len(prompt)):  # noqa: B008
                return beam_score(prompt_len, beam, eos, params.length_penalty)

            # sorted is stable: among equal scores finished beams come first, as in vLLM
            best.append(sorted(done + group, key=score, reverse=True)[:width])
        return best
    finally:  # done or failed: every block of the wave goes back
        for kv_prompt in kv_prompts:
            engine.free(list(kv_prompt.live))
            engine.free_prompt(kv_prompt)


def _step(engine, group: list[_Beam], finished: list[_Beam], width: int, eos: frozenset,
          ignore_eos: bool) -> list[_Beam]:
    """One prompt's selection after a decode step: the new live beams, best first; candidates
    that end in EOS join ``finished``."""
    candidates = []  # (beam, token, cumulative log-probability), beam by beam, likeliest first
    for beam in group:
        for token, logprob in beam.seq.top_logprobs[-1]:
            candidate = (beam, token, beam.cumulative_logprob + logprob)
            if token in eos and not ignore_eos:
                finished.append(_Beam(beam.tokens + [token], candidate[2]))
            else:
                candidates.append(candidate)
        engine.drop_last_sample(beam.seq)  # the step's own (greedy) draw is not the beam's choice
    kept = sorted(candidates, key=lambda c: c[2], reverse=True)[:width]
    slots_of: dict[int, list[int]] = {}  # a beam's kept continuations, as indices into kept
    for k, (beam, _, _) in enumerate(kept):
        slots_of.setdefault(id(beam), []).append(k)
    new: list[_Beam] = [None] * len(kept)  # type: ignore[list-item]
    for beam in group:
        slots = slots_of.get(id(beam))
        if not slots:
            engine.free([beam.seq])
            continue
        # the beam carries on as its first continuation; the others fork from it first
        seqs = [beam.seq] + engine.fork(beam.seq, len(slots) - 1)
        for seq, k in zip(seqs, slots, strict=True):
            _, token, cumulative = kept[k]
            engine.extend(seq, [token])
            new[k] = _Beam(beam.tokens + [token], cumulative, seq)
    return new
