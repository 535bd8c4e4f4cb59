"""Running a search: its waves of problems, and one search over a wave (growing solutions, or
"lines", their scoring, forks, costs).

:func:`run_waves` splits a strategy's problems into waves that fit the KV pool together and runs
the strategy's body on each, as a :class:`SearchRun`, admitted through the scheduler.

A :class:`Line` pairs a policy sequence with its verifier path and the steps scored so far.
Strategies move lines with :meth:`SearchRun.advance` (decode to the next step delimiter, or to
the end, then score every step the text completed), prune and branch them with
:meth:`SearchRun.select`, and turn them into candidates and results at the end.

A line can hold two verifier paths (:mod:`ttscale.search.line` says why), and carries its
running aggregate score as a device row (``Line.state``) that the verifier folds each new step
into; :meth:`SearchRun.aggregate_scores` gathers those rows for selection, which reads them on
the device, and :meth:`SearchRun.select` forks them with the lines (``state[parents]``).

Costs are charged to problems exactly where the work is per problem (prompt prefill, each
sequence's sampled tokens) and shared where a batched call is not: see :mod:`ttscale.search.cost`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from collections.abc import Sequence as Seq
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from ttscale.engine.sequence import Sequence
from ttscale.errors import InvalidArgument
from ttscale.sampling_params import SamplingParams
from ttscale.search import fork as forking
from ttscale.search.cost import split_seconds
from ttscale.search.line import Line, Progress
from ttscale.search.result import Candidate, Cost, SearchResult, TreeNode
from ttscale.search.scoring import StepScoring
from ttscale.search.select import choose

if TYPE_CHECKING:
    from ttscale.search.common import Inputs

# Sequences decoded together at most: a step's logits are [sequences, vocabulary] floats, which
# for a 150k-token vocabulary is 600 KB per sequence.
MAX_WAVE_SEQUENCES = 1024


class SearchRun(StepScoring):
    """The state of one strategy over one wave of problems (see the module docstring).

    Parameters
    ----------
    inputs : Inputs
        The validated arguments of the strategy (:func:`ttscale.search.common.prepare`).
    wave : list of int
        The problems (indices into ``inputs.problems``) searched together.
    tree : bool
        Record each problem's search tree.
    stream_counters : dict, optional
        The search's fork counters (one per call, shared by its waves).
    admitted : Wave, optional
        The scheduler's record of this wave (:meth:`Scheduler.begin_wave`): its prompts are
        prefilled and its sequences decoded as the scheduler's work, ranked by its arrival.
    """

    def __init__(self, inputs, wave: list[int], *, tree: bool = False,
                 stream_counters: dict[int, int] | None = None, admitted=None):
        self.inputs = inputs
        self.engine = inputs.llm.engine
        # decode and prefill through the scheduler, beside every other request and search
        self.scheduler = self.engine.scheduler
        self.admitted = admitted
        self.verifier = inputs.verifier
        self.delimiter = inputs.delimiter
        self.agg = inputs.agg
        # where the lines' aggregate states live: where the verifier makes its scores
        self.state_device = torch.device("cpu") if self.verifier is None else self.verifier.device
        self.wave = wave
        self.costs = {p: Cost() for p in wave}
        self.trees = {p: [TreeNode(0, None, "", None, 0)] for p in wave} if tree else None
        self._prompts = []  # the engine's prompts this run prefilled (see add_prompts)
        self._verifier_prompts = []  # the verifier engine's prompts this run started
        self.stream_counters = {} if stream_counters is None else stream_counters
        self._roots: dict[int, object] = {}  # kept verifier roots, by problem (see start)
        self._started = time.perf_counter()
        self._steps = {p: 0 for p in wave}
        self._finished = {p: 0 for p in wave}

    # ------------------------------------------------------------------------------------------
    # Lines

    def start(self, n: int, *, keep_roots: bool = False) -> list[Line]:
        """``n`` lines per problem of the wave, sharing its prefilled prompt and verifier root.

        ``keep_roots`` keeps each problem's root path (the problem, no steps) until the run
        closes, for :meth:`restart`."""
        prompts = self.add_prompts(self.wave, [self.inputs.prompts[p] for p in self.wave])
        roots = [None] * len(self.wave)
        if self.verifier is not None:
            texts = [self.inputs.problems[p] for p in self.wave]
            refs = (
                None
                if self.inputs.references is None
                else [self.inputs.references[p] for p in self.wave]
            )
            roots = self._verify(
                self.wave, [len(t) + 1 for t in texts], self.verifier.start, texts, refs
            )
            self._verifier_prompts += [root.seq.prompt for root in roots
                                       if getattr(root, "seq", None) is not None]
        lines = []
        for p, prompt, root in zip(self.wave, prompts, roots, strict=True):
            seqs = self.engine.fork(prompt, n)
            paths = self._fork_paths([root] * n, [p] * n) if root is not None else [None] * n
            lines += [
                Line(p, seq, path, index=i)
                for i, (seq, path) in enumerate(zip(seqs, paths, strict=True))
            ]
        self._empty_states(lines)
        if keep_roots:
            self._roots.update(zip(self.wave, roots, strict=True))
        else:
            self._free_paths(roots, self.wave)
        return lines

    def add_prompts(self, owners: Seq[int], prompts: Seq[Seq[int]]) -> list:
        """Prefill ``prompts`` (each once, charged to its owner, a problem of the wave) as the
        engine's prompts to fork sequences from; they are freed when the run closes.
        :meth:`start` adds the problems' own prompts; a strategy may add more (the shared
        prefix of RSA's aggregation contexts)."""
        if self.scheduler is not None:
            added = self.scheduler.add_prompts(list(prompts), self.admitted)
        else:
            added = self.engine.add_many(list(prompts))
        self._prompts += added
        for p, prompt in zip(owners, added, strict=True):
            # its samples follow from its id (default: its place in the call), not from its wave
            # or the problems searched with it
            prompt.stream_key = self.inputs.problem_ids[p]
            prompt.stream_counters = self.stream_counters
            self.costs[p].prefilled_tokens += prompt.kv_len
        return added

    def prefill(self, seqs: Seq[Sequence]) -> None:
        """Run sequences' pending tokens but the last into the KV cache, through the scheduler
        (room is made or waited for, as for :meth:`add_prompts`)."""
        if self.scheduler is not None:
            self.scheduler.prefill_pending(seqs, self.admitted)
        else:
            self.engine.run_pending(seqs, keep_last=True)

    def advance(
        self,
        lines: Seq[Line],
        sampling: SamplingParams,
        *,
        whole: bool = False,
        max_new_tokens: int | None = None,
        budget: int | None = None,
        report: bool = True,
        confidence_stop=None,
        score: bool = True,
    ) -> None:
        """Decode each line to its next step delimiter (``whole``: to its end), or for at most
        ``max_new_tokens`` tokens, then score the steps its text completed, and tell the caller's
        ``on_progress`` (unless ``report`` is false: a lookahead probe is not a step). With
        ``score`` false the text is not split into steps or scored (RSA's intermediate
        populations, which no vote sees).

        ``budget`` (with ``whole``, instead of ``max_new_tokens``) ends each solution after that
        many new tokens: a revision's attempt, whose sequence has sampled earlier attempts too,
        so that ``sampling.max_tokens`` bounds the whole chain and ``budget`` the attempt.
        ``confidence_stop`` is passed to ``Scheduler.decode`` (DeepConf's online stop; a line it
        stops is not finished)."""
        if not lines:
            return
        before = [line.seq.generated for line in lines]
        # Text a strategy appended (a revision's context) is prefilled inside decode, all of a
        # line's pending tokens but the one it feeds itself: counted per sequence, so that other
        # work sharing the engine's steps is not charged here.
        prefilled = [line.seq.prefilled for line in lines]
        (self.scheduler or self.engine).decode(
            [line.seq for line in lines],
            sampling,
            stop=[] if whole else [self.delimiter],
            max_new_tokens=max_new_tokens if budget is None else budget,
            confidence_stop=confidence_stop,
        )
        shares = [line.seq.prefilled - p for line, p in zip(lines, prefilled, strict=True)]
        for line, generated, share in zip(lines, before, shares, strict=True):
            self.costs[line.problem].generated_tokens += line.seq.generated - generated
            self.costs[line.problem].prefilled_tokens += share
            line.finished = (
                line.seq.finish_reason == "eos"
                or line.seq.generated >= sampling.max_tokens
                or (budget is not None and line.seq.generated - generated >= budget)
            )
            self._finished[line.problem] += line.finished and report
        if score:
            self._score_steps(lines)
        if report and self.inputs.on_progress is not None:
            self._report(lines)

    def _report(self, lines: Seq[Line]) -> None:
        """One :class:`Progress` per problem among ``lines`` to the caller's ``on_progress``."""
        by_problem: dict[int, list[Line]] = {}
        for line in lines:
            by_problem.setdefault(line.problem, []).append(line)
        for p, group in by_problem.items():
            self._steps[p] += 1
            scores = [line.aggregate for line in group if line.aggregate is not None]
            self.inputs.on_progress(Progress(
                problem=p, step=self._steps[p], live=sum(not line.finished for line in group),
                finished=self._finished[p], best_score=max(scores, default=None),
                generated_tokens=self.costs[p].generated_tokens))

    def restart(self, lines: Seq[Line]) -> None:
        """Begin a new solution on each line after the text its sequence holds now (a
        revision's next attempt, after the chain's context): no steps yet, and a fresh verifier
        path from the problem's root, so the new solution is scored alone. Needs
        ``start(..., keep_roots=True)``."""
        self._free_verifier(lines)
        owners = [line.problem for line in lines]
        paths = self._fork_paths([self._roots[p] for p in owners], owners)
        for line, path in zip(lines, paths, strict=True):
            line.path, line.steps, line.scores = path, [], []
            line.node, line.finished = 0, False
            line.start = len(line.seq.output_ids)
        self._empty_states(lines)

    def aggregate_scores(self, lines: Seq[Line], missing: float = math.nan) -> torch.Tensor:
        """The lines' running aggregates ``[C]`` float32, on the verifier's device, as
        selection ranks them: ``missing`` (NaN: below every score) for a line with no scored
        step. Nothing is read to the host."""
        if not lines:
            return torch.zeros(0, dtype=torch.float32, device=self.state_device)
        state = torch.stack([line.state for line in lines])  # [C, 2]
        return torch.where(state[:, 1] > 0, state[:, 0], missing)

    def select(
        self,
        lines: Seq[Line],
        scores: torch.Tensor | Seq[float | None],
        group_sizes: Seq[int],
        keep: int | Seq[int],
        children: int | Seq[int],
    ) -> list[Line]:
        """:func:`ttscale.search.fork.select_and_fork` over lines: the kept ones' children, the
        rest freed. ``lines`` are consumed; children carry their parent's steps, paths and
        aggregate states (``state[parents]``, gathered on the device). ``scores``: what to rank
        by, usually :meth:`aggregate_scores` (a tensor, passed to the device op as it is)."""
        forked = forking.select_and_fork(
            self.engine, [line.seq for line in lines], scores, group_sizes, keep, children
        )
        states = []
        if forked.parents:
            parents = torch.tensor(forked.parents, device=self.state_device)
            states = torch.stack([line.state for line in lines])[parents].unbind(0)
        # A parent's first child continues its verifier paths, as it continues its sequence.
        first: dict[int, int] = {}
        for slot, parent in enumerate(forked.parents):
            first.setdefault(parent, slot)
        forks = [slot for slot, parent in enumerate(forked.parents) if first[parent] != slot]
        paths = self._fork_verifier([lines[forked.parents[slot]] for slot in forks])
        new_paths = dict(zip(forks, paths, strict=True))
        self._free_verifier([line for i, line in enumerate(lines) if i not in first])
        children_lines = []
        for slot, (seq, parent) in enumerate(zip(forked.children, forked.parents, strict=True)):
            line = lines[parent]
            child = line.child(seq, *new_paths.get(slot, (line.path, line.retract)))
            child.state = states[slot]
            children_lines.append(child)
        return children_lines

    def copy(self, lines: Seq[Line]) -> list[Line]:
        """A fork of each line, outside the tree (for lookahead probes); the lines stay live."""
        seqs = [self.engine.fork(line.seq, 1)[0] for line in lines]
        paths = self._fork_verifier(lines)
        return [
            line.child(seq, path, retract, in_tree=False)
            for line, seq, (path, retract) in zip(lines, seqs, paths, strict=True)
        ]

    def free(self, lines: Seq[Line]) -> None:
        """Release lines' KV blocks and verifier paths (their text stays readable)."""
        self.engine.free([line.seq for line in lines])
        self._free_verifier(lines)

    # ------------------------------------------------------------------------------------------
    # Results

    def text(self, line: Line) -> str:
        """The line's solution: its sequence's output from ``line.start``."""
        return self.engine.tokenizer.decode(line.seq.output_ids[line.start :])

    def candidate(self, line: Line) -> Candidate:
        """The line as a finished (or budget-cut) candidate."""
        text = self.text(line)
        return Candidate(
            text=text,
            token_ids=line.seq.output_ids[line.start :],
            steps=list(line.steps),
            step_scores=list(line.scores),
            score=line.aggregate,
            answer=self.inputs.extract(text),
            finished=line.finished,
            node=line.node if self.trees is not None else None,
        )

    def result(
        self, p: int, candidates: list[Candidate], extra: dict | None = None
    ) -> SearchResult:
        """Problem ``p``'s result: the answer chosen among ``candidates`` by the strategy's rule."""
        chosen = choose(candidates, self.inputs.select, self.inputs.equal)
        return SearchResult(
            problem=self.inputs.problems[p],
            answer=None if chosen is None else candidates[chosen].answer,
            chosen=chosen,
            candidates=candidates,
            cost=self.costs[p],
            strategy=self.inputs.strategy,
            tree=None if self.trees is None else self.trees[p],
            extra=dict(extra or {}),
        )

    def abandon(self) -> None:
        """After a failure: free every sequence and prompt this run holds, on the policy's
        engine and on the verifier's, whatever state the lines were left in."""
        verifier_engine = getattr(self.verifier, "engine", None)
        for engine, prompts in ((self.engine, self._prompts),
                                (verifier_engine, self._verifier_prompts)):
            for prompt in prompts:
                engine.free(list(prompt.live))
                if not prompt.freed:
                    engine.free_prompt(prompt)
        self._prompts, self._verifier_prompts, self._roots = [], [], {}

    def close(self) -> None:
        """Free the wave's prompts and kept verifier roots (every line must be freed by now) and
        charge the wall time."""
        self._free_paths(list(self._roots.values()), list(self._roots))
        self._roots = {}
        for prompt in self._prompts:
            self.engine.free_prompt(prompt)
        seconds = time.perf_counter() - self._started
        work = [self.costs[p].generated_tokens + self.costs[p].scored_tokens for p in self.wave]
        for p, share in zip(self.wave, split_seconds(seconds, work), strict=True):
            self.costs[p].seconds += share


def plan_waves(
    engine, prompts: Seq[Seq[int]], seqs_per_problem: int, max_tokens: int
) -> list[list[int]]:
    """Consecutive groups of problems whose prompts and sequences fit the KV pool together,
    counting each sequence at ``max_tokens`` and one more block for a fork's partial block.
    Each wave is admitted through the scheduler (:meth:`Scheduler.begin_wave`), which runs it
    beside other work and makes room for it as it grows."""
    pool = engine.pool
    total = pool.num_blocks
    waves: list[list[int]] = [[]]
    used = 0
    for p, prompt in enumerate(prompts):
        need = sum(wave_blocks(pool, [prompt], seqs_per_problem, max_tokens))
        if need > total:
            raise InvalidArgument(
                f"n: {seqs_per_problem} sequences of up to {max_tokens} tokens for problems[{p}] "
                f"need {need} KV blocks, the pool holds {total}; lower n or sampling.max_tokens, "
                "or give the LLM a larger kv_budget_bytes"
            )
        full = (len(waves[-1]) + 1) * seqs_per_problem > MAX_WAVE_SEQUENCES
        if waves[-1] and (used + need > total or full):
            waves.append([])
            used = 0
        waves[-1].append(p)
        used += need
    return waves


def wave_blocks(pool, prompts: Seq[Seq[int]], seqs_per_problem: int,
                max_tokens: int) -> tuple[int, int]:
    """The blocks of a wave's prompts, and of its sequences at their longest."""
    per_sequence = pool.blocks_for(max_tokens + 1) + 1
    return (sum(pool.blocks_for(len(p)) for p in prompts),
            len(prompts) * seqs_per_problem * per_sequence)


def run_waves(
    inputs: Inputs,
    seqs_per_problem: int,
    body: Callable[[SearchRun], list[SearchResult]],
    *,
    tree: bool = False,
    progress: bool | None = None,
) -> list[SearchResult]:
    """Run ``body`` (one search over a wave, returning its problems' results in order) on each
    wave, each admitted through the policy's scheduler (so searches started apart share the
    pool and the steps); sequence numbering restarts once per call, so a seed replays the same
    samples."""
    engine = inputs.llm.engine
    scheduler = engine.scheduler
    # This call's own fork counters: its sequences' numbers (and so their random streams) depend
    # on its problems' ids and forks only, even while other searches run on the engine.
    counters: dict[int, int] = {}
    results: list[SearchResult] = []
    max_tokens = inputs.sampling.max_tokens
    waves = plan_waves(engine, inputs.prompts, seqs_per_problem, max_tokens)
    progress = inputs.progress if progress is None else progress
    with tqdm(
        total=len(inputs.problems), desc=inputs.strategy, unit="problem", disable=not progress
    ) as bar:
        for wave in waves:
            needs = wave_blocks(engine.pool, [inputs.prompts[p] for p in wave], seqs_per_problem,
                                max_tokens)
            admitted = scheduler.begin_wave(*needs) if scheduler is not None else None
            try:
                run = SearchRun(inputs, wave, tree=tree, stream_counters=counters,
                                admitted=admitted)
                try:
                    results += body(run)
                except BaseException:
                    # a verifier that raises, an interrupt: every block this wave took goes
                    # back, and the engines serve on
                    run.abandon()
                    raise
                run.close()
            finally:
                if admitted is not None:
                    scheduler.end_wave(admitted)
            bar.update(len(wave))
    return results
