"""A process reward model scoring steps incrementally on its own paged, prefix-shared KV cache.

    prm = PRM("path/to/Qwen2.5-Math-PRM-7B", format="qwen2.5-math-prm", kv_budget_bytes=8 << 30)
    roots = prm.start(problems)                    # each problem's prefix prefilled once
    paths = prm.fork(roots, [0] * 4)               # 4 paths of problem 0: block tables, no copies
    scores = prm.score(paths, steps, final)        # runs only the new steps' tokens

A path is an engine sequence of the PRM's own :class:`~ttscale.engine.engine.Engine`. Scoring a
step appends the step's segment (:mod:`ttscale.verifiers.formats`) to its path, runs only those
tokens through the model, and reads the head at the step's tag through the fused
:func:`ttscale.ops.prm_step_scores`.
"""

from __future__ import annotations

import threading

from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ttscale import ops
from ttscale._checks import check_text
from ttscale.engine.engine import Engine, check_engine_arguments
from ttscale.engine.scheduler import Scheduler
from ttscale.engine.sequence import Prompt, Sequence
from ttscale.errors import InvalidArgument, ModelLoadError, TokenizerError
from ttscale.model import load_model, load_tokenizer, read_config
from ttscale.model.loader import check_load_arguments
from ttscale.verifiers.base import (
    ScoredSteps,
    Verifier,
    check_parents,
    check_steps,
    split_steps,
)
from ttscale.verifiers.formats import (
    FORMATS,
    PRMFormat,
    Segment,
    check_format_options,
    make_format,
)

# The model head each format's checkpoints carry (ttscale.model.config's head kinds).
HEAD_OF_KIND = {"two_token": "lm", "two_class": "two_class", "value": "value"}
# The format a reward-head checkpoint implies; causal-LM PRMs must say theirs.
FORMAT_OF_HEAD = {"two_class": "qwen2.5-math-prm", "value": "skywork"}


@dataclass(eq=False)
class PRMPath:
    """One candidate solution's state in the PRM: its engine sequence and its last segment.

    ``tag_positions`` are the positions, in :attr:`token_ids`, of the tokens each step's score
    was read at.
    """

    seq: Sequence
    last: Segment  # the segment the next step's segment continues
    num_steps: int = 0
    tag_positions: list[int] = field(default_factory=list)

    @property
    def prompt(self) -> Prompt:
        """The engine's prefilled prompt its sequence forks from: the problem's prefix."""
        return self.seq.prompt

    @property
    def token_ids(self) -> list[int]:
        """The whole sequence so far: the problem's prefix, then every step's segment."""
        return self.prompt.prompt_ids + self.seq.tokens[1:]

    @property
    def freed(self) -> bool:
        return self.seq.freed


class PRM(Verifier):
    """A process reward model from a local Hugging Face directory, scoring every step.

    Parameters
    ----------
    model_dir : str or Path
        config.json, safetensors and tokenizer.json (plus tokenizer_config.json with a chat
        template for the chat formats).
    format : str, optional
        ``"math-shepherd"``, ``"rlhflow"``, ``"qwen2.5-math-prm"`` or ``"skywork"`` (see
        :mod:`ttscale.verifiers.formats`). Default: implied by a reward-head checkpoint
        (``Qwen2ForProcessRewardModel`` -> qwen2.5-math-prm, ``Qwen2ForPrmModel`` -> skywork);
        causal-LM PRMs must name theirs.
    device, dtype : optional
        As :func:`ttscale.model.load_model`.
    kv_budget_bytes : int, optional
        Bytes for this PRM's KV pool. Default: on a GPU what other engines left of the device's
        KV budget (:mod:`ttscale.engine.memory`), 2 GiB on the CPU.
    memory_share : float, optional
        The share of the device's KV budget to lease instead: beside a policy on one GPU give
        the policy ``memory_share=POLICY_SHARE`` (0.6) and the PRM ``PRM_SHARE`` (0.4); a
        policy left at its default leases the whole budget and leaves the PRM none.
    step_delimiter : str
        What separates steps in a solution's text (:meth:`score_text`).
    system_prompt, step_tag, good_token, bad_token : str, optional
        Format options (qwen2.5-math-prm's system prompt; math-shepherd's tag; the ``+``/``-``
        tokens of the two-token formats); None keeps the format's default.
    block_size, max_batch_tokens, backend
        Passed to the PRM's :class:`~ttscale.engine.engine.Engine`.
    """

    def __init__(self, model_dir: str | Path, format: str | None = None, *, device=None, dtype=None,
                 kv_budget_bytes: int | None = None, memory_share: float | None = None,
                 step_delimiter: str = "\n\n",
                 system_prompt: str | None = None, step_tag: str | None = None,
                 good_token: str | None = None, bad_token: str | None = None,
                 block_size: int = 16, max_batch_tokens: int = 4096, backend: str | None = None):
        # Every argument first, before anything is read from model_dir.
        check_load_arguments("model_dir", model_dir, device, dtype)
        if format is not None and (not isinstance(format, str) or format not in FORMATS):
            raise InvalidArgument(f"format: expected one of {', '.join(FORMATS)}, got {format!r}")
        self.step_delimiter = check_text("step_delimiter", step_delimiter)
        check_format_options(format, system_prompt=system_prompt, step_tag=step_tag,
                             good_token=good_token, bad_token=bad_token)
        check_engine_arguments(kv_budget_bytes=kv_budget_bytes, memory_share=memory_share,
                               block_size=block_size, max_batch_tokens=max_batch_tokens,
                               backend=backend)
        model_dir = Path(model_dir)
        try:
            config = read_config(model_dir)
        except ModelLoadError as error:  # named as this caller wrote it: model_dir, not model
            raise ModelLoadError(f"model_dir: {error}", param="model_dir") from None
        if format is None:
            if config.head not in FORMAT_OF_HEAD:
                raise InvalidArgument(f"format: a {config.architecture} PRM reads token logits; name "
                                 "its format ('math-shepherd' or 'rlhflow')")
            format = FORMAT_OF_HEAD[config.head]
        if format not in FORMATS:
            raise InvalidArgument(f"format: expected one of {', '.join(FORMATS)}, got {format!r}")
        kind = FORMATS[format].kind
        if config.head != HEAD_OF_KIND[kind]:
            raise InvalidArgument(f"format: {format!r} reads a {HEAD_OF_KIND[kind]!r} head, but "
                             f"{model_dir} holds a {config.architecture} ({config.head!r} head)")
        if kind == "two_class" and config.num_labels != 2:
            raise InvalidArgument(f"format: {format!r} reads two classes, {model_dir} has "
                             f"{config.num_labels}")
        try:
            self.tokenizer = load_tokenizer(model_dir)
        except TokenizerError as error:
            raise TokenizerError(f"model_dir: {error}", param="model_dir") from None
        self.format: PRMFormat = make_format(format, self.tokenizer, system_prompt=system_prompt,
                                             step_tag=step_tag, good_token=good_token,
                                             bad_token=bad_token)
        try:
            self.model = load_model(model_dir, device=device, dtype=dtype)
        except ModelLoadError as error:
            if error.param != "model":
                raise
            raise ModelLoadError(f"model_dir: {error}", param="model_dir") from None
        self.engine = Engine(self.model, self.tokenizer, kv_budget_bytes=kv_budget_bytes,
                             memory_share=memory_share, block_size=block_size,
                             max_batch_tokens=max_batch_tokens,
                             # it only prefills: no decode step, so no graphs and no activations
                             # of one to keep out of its pool
                             backend=backend, cuda_graphs=False, max_decode_seqs=1)
        self.backend = backend
        # its own scheduler, the policy's design: scoring calls from several searches at once
        # are work items that share a forward
        self.scheduler = Scheduler(self.engine, prefix_caching=False)
        self._weight, self._bias = self._head()
        self.scored_tokens = 0  # every token scored since the start
        self._thread = threading.local()  # and those scored by each thread (a search's own)

    def _head(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The rows :func:`ops.prm_step_scores` reads: ``+``/``-`` LM-head rows, ``score.2``, or
        the value head."""
        model = self.model
        if self.format.kind == "two_token":
            vocab, names = model.config.vocab_size, ("good_token", "bad_token")
            for name, token in zip(names, self.format.head_tokens, strict=True):
                if token >= vocab:
                    raise InvalidArgument(f"{name}: token id {token} is outside the model's "
                                     f"vocabulary of {vocab}")
            return model.lm_head[list(self.format.head_tokens)].contiguous(), None
        return model.score_out.weight, model.score_out.bias

    # ------------------------------------------------------------------------------------------
    # The Verifier interface

    def start(self, problems, references=None) -> list[PRMPath]:
        """Prefill each problem's prefix once; one root path (no steps) per problem."""
        if isinstance(problems, str) or not isinstance(problems, Seq):
            raise InvalidArgument(f"problems: expected a sequence of strings, got {problems!r:.60}")
        for i, problem in enumerate(problems):
            if not isinstance(problem, str) or not problem.strip():
                raise InvalidArgument(f"problems[{i}]: expected a non-blank string, got "
                                      f"{problem!r:.60}")
        prefixes = [self.format.prefix(problem) for problem in problems]
        with self.engine.lock:  # the count is this call's, whatever other threads score
            before = self.engine.prefilled_tokens
            prompts = self.engine.add_many([p.ids for p in prefixes])
            self._count(self.engine.prefilled_tokens - before)
        return [PRMPath(self.engine.fork(prompt, 1)[0], prefix)
                for prompt, prefix in zip(prompts, prefixes, strict=True)]

    def fork(self, paths, parents) -> list[PRMPath]:
        """Children sharing their parents' KV blocks (a block table copy each)."""
        children = []
        for parent_index in check_parents(self._checked_paths(paths), parents):
            parent = paths[parent_index]
            if parent.freed:
                raise InvalidArgument(f"parents: path {parent_index} was freed")
            (seq,) = self.engine.fork(parent.seq, 1)
            children.append(PRMPath(seq, parent.last, parent.num_steps, list(parent.tag_positions)))
        return children

    def score(self, paths, steps, final) -> list[float | None]:
        """Append each step to its path, run only the new tokens, return each step's score."""
        self._append(paths, steps, final)
        return self._read(list(paths)).scores

    def score_aggregate(self, paths, steps, final, state, agg) -> ScoredSteps:
        """:meth:`score`, with each path's running aggregate folded on the device by the same
        :func:`ops.prm_step_scores` call that reads the scores (one read to the host for both)."""
        self._append(paths, steps, final)
        return self._read(list(paths), list(range(len(paths))), state, agg)

    @property
    def device(self) -> torch.device:
        return self.model.device

    def free(self, paths) -> None:
        """Release paths; a problem's prefix is released with its last path."""
        for path in self._checked_paths(paths):
            if path.freed:
                continue
            self.engine.free([path.seq])
            if path.prompt.num_sequences == 0:
                self.engine.free_prompt(path.prompt)

    # ------------------------------------------------------------------------------------------

    def score_text(self, problem: str | Seq[str], solution: str | Seq[str]
                   ) -> list[float | None] | list[list[float | None]]:
        """Score every step of a solution's text, split on ``step_delimiter``. Given a list of
        problems and a list of solutions, one each, score them together and return a list of
        score lists."""
        if isinstance(problem, str):
            if not isinstance(solution, str):
                raise InvalidArgument(f"solution: expected a string (one solution of the one "
                                      f"problem), got {type(solution).__name__}")
            if not problem.strip():
                raise InvalidArgument("problem: the problem's text is blank")
            return self.score_solution(problem, split_steps(solution, self.step_delimiter))
        if not isinstance(problem, (list, tuple)):
            raise InvalidArgument(f"problem: expected a string or a list of strings, got "
                                  f"{type(problem).__name__}")
        if not isinstance(solution, (list, tuple)) or len(solution) != len(problem):
            raise InvalidArgument(f"solution: expected a list of one solution per problem "
                                  f"({len(problem)}), got {solution!r:.60}")
        for name, texts in (("problem", problem), ("solution", solution)):
            bad = next((i for i, text in enumerate(texts) if not isinstance(text, str)), None)
            if bad is not None:
                raise InvalidArgument(f"{name}[{bad}]: expected a string, got "
                                      f"{type(texts[bad]).__name__}")
        blank = next((i for i, text in enumerate(problem) if not text.strip()), None)
        if blank is not None:
            raise InvalidArgument(f"problem[{blank}]: the problem's text is blank")
        steps = [split_steps(text, self.step_delimiter) for text in solution]
        return self.score_solutions(problem, steps)

    def _append(self, paths: Seq[PRMPath], steps: Seq[str], final: Seq[bool]) -> None:
        """Extend each path by its step's segment (pending: not yet run through the model)."""
        check_steps(self._checked_paths(paths), steps, final)
        if len({id(p) for p in paths}) != len(paths):
            raise InvalidArgument("paths: a path appears twice; fork it to extend it two ways")
        limit = self.model.max_positions
        segments = []
        for i, (path, step) in enumerate(zip(paths, steps, strict=True)):
            if path.freed:
                raise InvalidArgument(f"paths: path {i} was freed")
            segment = self.format.step(step, path.num_steps, path.last)
            if path.seq.context_len + len(segment.ids) > limit:
                raise InvalidArgument(f"steps: path {i} would reach "
                                 f"{path.seq.context_len + len(segment.ids)} tokens, the PRM "
                                 f"serves {limit}")
            segments.append(segment)
        for path, segment in zip(paths, segments, strict=True):
            self.engine.extend(path.seq, segment.ids)
            path.last = segment
            path.num_steps += 1
            # The segment's last token, in token_ids (the prefix, then seq.tokens after its first).
            path.tag_positions.append(len(path.prompt.prompt_ids) + len(path.seq.tokens) - 2)

    @staticmethod
    def _checked_paths(paths) -> Seq[PRMPath]:
        """``paths`` as this PRM's start and fork make them (not text, not another verifier's)."""
        if isinstance(paths, str) or not isinstance(paths, Seq):
            raise InvalidArgument(f"paths: expected a list of PRM paths, got {paths!r:.60}")
        bad = next((p for p in paths if not isinstance(p, PRMPath)), None)
        if bad is not None:
            raise InvalidArgument(f"paths: expected PRM paths (from start or fork), got "
                                  f"{type(bad).__name__}")
        return paths

    def _count(self, tokens: int) -> None:
        self.scored_tokens += tokens
        self._thread.scored = getattr(self._thread, "scored", 0) + tokens

    def scored_in_thread(self) -> int:
        """Tokens scored by the calling thread: what a search charges itself, while other
        searches may score on this PRM at the same time."""
        return getattr(self._thread, "scored", 0)

    def _read(self, paths: list[PRMPath], rows: list[int] | None = None,
              state: torch.Tensor | None = None, agg: str = "last") -> ScoredSteps:
        """Run the paths' pending tokens and score each one's latest step, folding path ``i``'s
        score into row ``rows[i]`` of ``state`` (``[S, 2]``; None: one empty row per path).
        Scores and their rows' aggregates come to the host in one read."""
        if state is None:
            state = ops.prm_empty_state(len(paths), agg, self.device)
        if not paths:
            return ScoredSteps([], state, [])
        seqs = [p.seq for p in paths]
        hidden_at = {p.seq: [len(p.seq.tokens) - 1] for p in paths}
        # through the scheduler: searches scoring on other threads at the same time share the
        # forward
        item = self.scheduler.prefill(seqs, hidden_at)
        self._count(item.tokens)
        hidden = item.hidden
        hidden_rows = torch.cat([hidden[s] for s in seqs])  # [P, H]
        if self.format.kind == "two_class":
            hidden_rows = F.relu(self.model.score_hidden(hidden_rows))
        index = torch.arange(len(paths)) if rows is None else torch.tensor(rows)
        index = index.to(hidden_rows.device)
        scores, state = ops.prm_step_scores(
            hidden_rows, index, self._weight, self._bias, kind=self.format.kind, agg=agg,
            state=state.to(hidden_rows.device), backend=self.backend,
        )
        # [2P]: scores, then aggregates, in the engine's one counted read (which flushes the
        # pool's queued work, so it holds the engine like every other change to the pool)
        with self.engine.lock:
            (packed,) = self.engine.pool.read_host([torch.cat([scores, state[index, 0]])])
        packed = packed.tolist()
        return ScoredSteps(packed[: len(paths)], state, packed[len(paths) :])
