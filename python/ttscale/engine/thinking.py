"""Thinking held to a token budget, inside the decode step (vLLM's ``thinking_token_budget``, and
s1's budget forcing: Muennighoff et al. 2025, "s1: Simple test-time scaling").

The fields are :class:`~ttscale.sampling_params.SamplingParams`'s: ``thinking_token_budget``,
``thinking_end``, ``min_thinking_tokens``, ``continue_text`` and ``max_extensions``.

**Where thinking starts.** Where the tokenizer declares a think-start token (``<think>``, as
Qwen3, QwQ and the DeepSeek-R1 distillations do), thinking starts after its last occurrence in
the prompt (a chat template that opens the thought, unless the prompt also closes it: then
thinking is over before the first token), or after the model writes it. Where the tokenizer
declares none (the toy models, or a model that does not think apart from its answer), thinking is
everything after the prompt. Thinking tokens are the sequence's own tokens after that point,
sampled or forced; the markers themselves are not counted.

**What ends it.** ``thinking_end`` (text or token ids), by default ``</think>`` where the
tokenizer declares it, else the end-of-sequence token (so on the toy, a budget cuts the solution
and nothing follows). The model ends its thinking when it samples the end text's first token (or,
for the default end of sequence, any end-of-sequence token); the engine then writes the rest of
the end text itself. That is s1's rule (its thinking stops at the delimiter's first token,
``<|im_start|>``, and ``answer`` follows), exact for the one-token markers reasoning models use;
an end text should start with a token the model writes only to end its thinking.

**What the engine does, each step, for each row with a budget or a minimum.** At
``thinking_token_budget`` thinking tokens the end text is forced, whatever was being forced
before. Below ``min_thinking_tokens``, a sampled end of thinking is replaced by
``continue_text`` (default ``"Wait"``), at most ``max_extensions`` times. A forced token replaces
the sampled one: it is a real token of the sequence (in its KV cache, counted as generated, with
the model's log-probability of it), so the budget holds to the token and the end appears exactly
at the budget. All of it runs on the device (:class:`Window`: the rows' state in tensors,
updated with tensor ops each step, any mix of rows with and without controls in one step); the
host reads the state after each step with the window's tokens, and keeps the state of each
sequence's last accepted token (:class:`Trace`) for its next window.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from ttscale.errors import invalid

THINK_START = "<think>"
THINK_END = "</think>"
DEFAULT_CONTINUE = "Wait"  # s1's

# phases of a row
WAITING, THINKING, ENDED, CUT = 0, 1, 2, 3  # CUT: ended by the budget
# what a row's queue of forced tokens holds
NOTHING, END, CONTINUE = 0, 1, 2
NO_LIMIT = 1 << 62


class State(NamedTuple):
    """A row's thinking after a token: its phase, thinking tokens so far, extensions written,
    and its queue of forced tokens (which text, and the position of the next token in it)."""

    phase: int
    thought: int
    extensions: int
    forcing: int = NOTHING
    position: int = 0


@dataclass(frozen=True)
class Control:
    """One request's thinking settings as token ids."""

    budget: int | None
    least: int
    max_extensions: int | None
    start: int | None  # the think-start token; None: thinking starts after the prompt
    end: tuple[int, ...]
    triggers: tuple[int, ...]  # sampled while thinking, each ends it
    continuation: tuple[int, ...]


@dataclass
class Trace:
    """A sequence's thinking, on the host: its state after its last accepted token, where each
    ``continue_text`` and the end text begin (indices into ``Sequence.tokens``)."""

    state: State
    continued_at: list[int] = field(default_factory=list)
    ended_at: int | None = None
    before_last: State | None = None  # the state before the last accepted token
    window: list[list[int]] | None = None  # the last window's state after each step, till accepted

    def copy(self) -> Trace:
        return Trace(self.state, list(self.continued_at), self.ended_at, self.before_last)


class Controls:
    """An engine's thinking rules: each request's settings resolved to token ids (once per
    setting), and the windows that enforce them."""

    def __init__(self, tokenizer, eos_token_ids, vocab_size: int, device):
        self.tokenizer = tokenizer
        self.device = device
        self.eos = tuple(eos_token_ids)
        self.vocab_size = vocab_size
        declared = (lambda token: tokenizer.token_to_id(token)) if tokenizer is not None else (
            lambda token: None)
        self.start = declared(THINK_START)
        self.end = declared(THINK_END)
        self._resolved: dict[tuple, Control] = {}

    def control(self, params) -> Control | None:
        """``params``' control, None without a budget or a minimum; an ``InvalidArgument``
        naming the field whose text this model cannot write."""
        if not params.thinks:
            return None
        key = (params.thinking_token_budget, params.thinking_end, params.min_thinking_tokens,
               params.continue_text, params.max_extensions)
        if key not in self._resolved:
            self._resolved[key] = self._resolve(params)
        return self._resolved[key]

    def _resolve(self, params) -> Control:
        if params.thinking_end is not None:
            end = self._ids("thinking_end", params.thinking_end)
            triggers = end[:1]
        elif self.end is not None:
            end = triggers = (self.end,)
        elif self.eos:
            end, triggers = self.eos[:1], self.eos
        else:
            raise invalid("thinking_end", "the model declares no end-of-sequence token and its "
                                          f"tokenizer no {THINK_END}; give one")
        continuation = ()
        if params.min_thinking_tokens:
            text = params.continue_text
            continuation = self._ids("continue_text", DEFAULT_CONTINUE if text is None else text,
                                     default=text is None)
        return Control(params.thinking_token_budget, params.min_thinking_tokens,
                       params.max_extensions, self.start, end, triggers, continuation)

    def _ids(self, name: str, value, default: bool = False) -> tuple[int, ...]:
        if isinstance(value, tuple):
            bad = next((t for t in value if not 0 <= t < self.vocab_size), None)
            if bad is not None:
                raise invalid(name, f"token id {bad} outside the vocabulary [0, {self.vocab_size})")
            return value
        if self.tokenizer is None:
            raise invalid(name, "a text needs the model's tokenizer; give token ids")
        ids = self.tokenizer.encode(value, add_special_tokens=False)
        if not ids or self.tokenizer.decode(ids, skip_special_tokens=False) != value:
            hint = f" (the default); give {name}" if default else ""
            raise invalid(name, f"the tokenizer cannot spell {value!r}{hint}")
        return tuple(ids)

    def window(self, seqs, rows) -> Window | None:
        """The device state of a decode window over ``seqs`` (sampled with ``rows``, one
        SamplingParams each); None when no row has a control."""
        controls = [self.control(params) for params in rows]
        if all(c is None for c in controls):
            return None
        for seq, control in zip(seqs, controls, strict=True):
            if control is not None and seq.thinking is None:
                seq.thinking = Trace(initial_state(seq, control))
        states = [s.thinking.state if c is not None else None
                  for s, c in zip(seqs, controls, strict=True)]
        return Window(controls, states, rows, self.device)


def initial_state(seq, control: Control) -> State:
    """A sequence's state before its first controlled token, from its prompt and own tokens
    (see the module docstring for where thinking starts)."""
    own = seq.tokens[1:]
    if control.start is None:
        after = own
    else:
        context = seq.prompt.prompt_ids + own
        if control.start not in context:
            return State(WAITING, 0, 0)
        last = len(context) - 1 - context[::-1].index(control.start)
        after = own[max(0, last + 1 - len(seq.prompt.prompt_ids)):]
        if any(t in control.triggers for t in context[last + 1:len(seq.prompt.prompt_ids)]):
            return State(ENDED, 0, 0)
    if any(t in control.triggers for t in after):
        return State(ENDED, len(after), 0)
    return State(THINKING, len(after), 0)


class Window:
    """The thinking state of one decode window's rows on the device, and the step that enforces
    the controls (rows without one pass through unchanged)."""

    def __init__(self, controls: list[Control | None], states: list[State | None], rows, device):
        self.controls = controls
        # The settings once per distinct control (a search's rows share one), gathered per row.
        inert = Control(None, 0, None, None, (0,), (), ())  # rows without one: past thinking
        distinct = list(dict.fromkeys(c for c in controls if c is not None)) + [inert]
        which = {c: k for k, c in enumerate(distinct)}
        index = torch.tensor([which[c if c is not None else inert] for c in controls]).to(device)
        pad = lambda values, width, fill: list(values) + [fill] * (width - len(values))
        end_width = max(len(c.end) for c in distinct)
        continue_width = max(max(len(c.continuation) for c in distinct), 1)
        trigger_width = max(max(len(c.triggers) for c in distinct), 1)
        table = lambda rows: torch.tensor(rows, dtype=torch.int64).to(device)[index]
        self.end_ids = table([pad(c.end, end_width, 0) for c in distinct])  # [B, Le]
        self.continue_ids = table([pad(c.continuation or (0,), continue_width, 0)
                                   for c in distinct])  # [B, Lc]
        self.triggers = table([pad(c.triggers, trigger_width, -1) for c in distinct])  # [B, K]
        (self.budget, self.least, self.max_extensions, self.start, self.end_len,
         self.continue_len) = table([[
             NO_LIMIT if c.budget is None else c.budget, c.least,
             NO_LIMIT if c.max_extensions is None else c.max_extensions,
             -1 if c.start is None else c.start, len(c.end), max(len(c.continuation), 1)]
             for c in distinct]).unbind(1)
        inert_state = State(ENDED, 0, 0)
        state = torch.tensor([s if s is not None else inert_state for s in states],
                             dtype=torch.int64).to(device)  # [B, 5]
        self.phase, self.thought, self.extensions, self.forcing, self.position = state.unbind(1)
        temperature = torch.tensor([p.temperature for p in rows], dtype=torch.float32).to(device)
        self.inv_t = torch.where(temperature == 0, 1.0, 1.0 / temperature.clamp_min(1e-30))
        self.history: list[torch.Tensor] = []  # [B, 5] after each step

    def step(self, tokens: torch.Tensor, logprobs: torch.Tensor, logits: torch.Tensor):
        """The tokens the rows emit this step (``tokens`` as sampled, forced where the controls
        say) and their log-probabilities; advances the state. Tensor ops only: no host read."""
        phase, thought, extensions = self.phase, self.thought, self.extensions
        thinking = phase == THINKING
        # at the budget the end is due, whatever was being forced
        due = thinking & (thought >= self.budget)
        forcing = torch.where(due, END, self.forcing)
        position = torch.where(due, 0, self.position)
        forced = forcing != NOTHING
        at = position[:, None]
        end = self.end_ids.gather(1, at.clamp(max=self.end_ids.shape[1] - 1))[:, 0]
        more = self.continue_ids.gather(1, at.clamp(max=self.continue_ids.shape[1] - 1))[:, 0]
        queued = torch.where(forcing == END, end, more)
        out = torch.where(forced, queued, tokens)
        # the model ends its thinking: below the minimum, continue_text replaces the end
        natural = thinking & ~forced & (tokens[:, None] == self.triggers).any(1)
        suppress = natural & (thought < self.least) & (extensions < self.max_extensions)
        ends = natural & ~suppress
        out = torch.where(suppress, self.continue_ids[:, 0], out)
        # the state after this token
        new_phase = torch.where(due, CUT, torch.where(ends, ENDED, phase))
        self.phase = torch.where((phase == WAITING) & (tokens == self.start), THINKING, new_phase)
        self.thought = thought + (thinking & ~due & ~ends).long()
        self.extensions = extensions + suppress.long()
        position = torch.where(suppress | ends, 1, torch.where(forced, position + 1, position))
        forcing = torch.where(suppress, CONTINUE, torch.where(ends, END, forcing))
        length = torch.where(forcing == END, self.end_len, self.continue_len)
        self.forcing = torch.where(position >= length, NOTHING, forcing)
        self.position = torch.where(position >= length, 0, position)
        self.history.append(torch.stack(
            [self.phase, self.thought, self.extensions, self.forcing, self.position], 1))
        # a forced token's log-probability is the model's, in the distribution sampled from
        replaced = out != tokens
        scaled = torch.log_softmax(logits.float() * self.inv_t[:, None], dim=-1)
        logprobs = torch.where(replaced, scaled.gather(1, out[:, None])[:, 0], logprobs)
        return out, logprobs

    def history_tensor(self) -> torch.Tensor:
        """``int64 [B, window, 5]`` the rows' states after each step, for the window's read;
        the runner puts the host copy, as lists, back in :attr:`history`."""
        return torch.stack(self.history, 1)

    def read_back(self, seqs) -> None:
        """Hand each controlled sequence its state after every step of the window (read with
        the window's tokens); :func:`accept` keeps the one of its last accepted token."""
        steps = self.history  # [B, window, 5], lists (from the window's read)
        for seq, control, row in zip(seqs, self.controls, steps, strict=True):
            if control is not None:
                seq.thinking.window = row  # lists; accept() keeps one as a State


def accept(seq, fed: int) -> None:
    """Keep the state after the ``fed`` tokens the sequence took of its last window (the engine
    drops those past a stop), and note where a continue text or the end text began."""
    trace = seq.thinking
    if trace is None or trace.window is None:
        return
    steps, trace.window = trace.window[:fed], None
    if not steps:
        return
    previous = trace.state
    last = State(*steps[-1])
    if last.extensions != previous.extensions or last.phase != previous.phase:
        first = len(seq.tokens) - fed  # the index in seq.tokens of the window's first token
        for j, state in enumerate(map(State._make, steps)):
            if state.extensions > previous.extensions:
                trace.continued_at.append(first + j)
            if state.phase in (ENDED, CUT) and previous.phase == THINKING:
                trace.ended_at = first + j
            previous = state
    trace.before_last = State(*steps[-2]) if fed >= 2 else trace.state
    trace.state = last


def drop_last(seq) -> None:
    """The sequence's last token was taken back (``Engine.drop_last_sample``): so is its state."""
    trace = seq.thinking
    if trace is None or trace.before_last is None:
        return
    index = len(seq.tokens)  # where the dropped token was
    trace.state, trace.before_last = trace.before_last, None
    if trace.continued_at and trace.continued_at[-1] == index:
        trace.continued_at.pop()
    if trace.ended_at == index:
        trace.ended_at = None
