"""DeepConf: votes over traces filtered and weighted by the model's own confidence, no PRM.

Fu et al. (2025), "Deep Think with Confidence". A token's confidence is the negated mean of its
top-k log-probabilities; a group's, the mean over a sliding window of tokens; a trace's, its
lowest group (or the mean of its bottom 10% of groups, its tail, its mean token confidence):
:mod:`ttscale.engine.confidence` holds the definitions.

Offline: sample all N traces, keep the top ``keep_fraction`` of them by confidence, and vote,
each kept trace weighing its confidence. Online: sample ``n_init`` warm-up traces; the
``(1 - keep_fraction)`` percentile of their lowest-group confidences is the problem's threshold;
every later trace stops, on the device, at the first token where its window's mean confidence
falls below it; the later traces run in waves of ``n_init``, and a problem stops sampling once
the weighted vote's consensus (the winning answer's share of the vote) reaches ``consensus``,
or when its N traces are spent. The online vote is over the warm-up traces and the later
traces that were not stopped (the threshold is the filter), each weighing its confidence.

Here a trace is a fork of the problem's prefilled prompt; the stop is a control the decode
windows carry (:class:`~ttscale.engine.confidence.ConfidenceStop`), so a stopped trace costs no
token past the one where its confidence fell.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from ttscale.engine.confidence import ConfidenceStop, token_confidence, trace_scores
from ttscale.errors import InvalidArgument
from ttscale.search.common import Inputs
from ttscale.search.registry import Options, option, strategy
from ttscale.search.result import Candidate, SearchResult
from ttscale.search.run import Line, SearchRun, run_waves
from ttscale.search.select import group_answers

SCORES = ("lowest", "bottom10", "tail", "mean")
TOY_WINDOW = 16  # the toy task's solutions are about 45 tokens: the paper's 2048 would be one group
TOY_KEEP = 0.9


@dataclass(frozen=True)
class DeepConfOptions(Options):
    confidence_window: int = option(2048, "Tokens per group: the sliding window of the group\n"
                                    "confidence and of the online stop.", metavar="W")
    confidence_top_k: int = option(20, "Top log-probabilities averaged into a token's confidence.",
                                   high=20, metavar="K")
    confidence_score: str = option("lowest", "A trace's confidence: its lowest group, the mean of\n"
                                   "its bottom 10% of groups, its tail, or its mean token\n"
                                   "confidence.", kind="choice", choices=SCORES,
                                   metavar="{" + ",".join(SCORES) + "}")
    confidence_tail: int = option(2048, "Last tokens the tail confidence averages.", metavar="T")
    keep_fraction: float = option(0.1, "Share of the traces kept for the vote, the most confident\n"
                                  "(offline; online it sets the threshold's percentile).",
                                  kind="float", low=0.0, low_open=True, high=1.0, metavar="ETA")
    n_init: int | None = option(None, "Warm-up traces of the online mode (default: offline, all\n"
                                "n traces sampled in full).", metavar="N0")
    consensus: float = option(0.95, "Online: a problem stops sampling once its winning answer\n"
                              "holds this share of the weighted vote.", kind="float", low=0.0,
                              low_open=True, high=1.0, metavar="TAU")

    def check(self, n: int) -> None:
        if self.n_init is not None and self.n_init > n:
            raise InvalidArgument(f"n_init: at most n ({n}) warm-up traces, got {self.n_init}",
                                  param="n_init")

    @classmethod
    def for_budget(cls, n: int) -> dict:
        # the paper's DeepConf-high (keep 90%): at N=16, its DeepConf-low (10%) keeps two traces
        return {"confidence_window": TOY_WINDOW, "confidence_tail": TOY_WINDOW,
                "keep_fraction": TOY_KEEP}

    @classmethod
    def variants(cls, n: int) -> dict:
        online = max(1, n // 4)  # a warm-up of a quarter of the budget, then waves of as many
        return {"-offline": cls.for_budget(n), "-online": {**cls.for_budget(n), "n_init": online}}


@strategy(DeepConfOptions, budget="Traces per problem at most (offline: exactly).")
def deepconf(inputs: Inputs, n: int, options: DeepConfOptions) -> list[SearchResult]:
    """Sample traces and vote among the most confident, weighted by confidence (DeepConf).

    The method of Fu et al. (2025), "Deep Think with Confidence"; see
    :mod:`ttscale.search.deepconf`. Needs no verifier. Offline (``n_init`` unset) it samples
    ``n`` traces and votes among the top ``keep_fraction`` by ``confidence_score``; online it
    samples ``n_init`` warm-up traces, sets each problem's threshold from them, and stops later
    traces on the device where their group confidence falls below it, sampling in waves of
    ``n_init`` until the vote's consensus reaches ``consensus`` or ``n`` traces are spent; the
    warm-up traces and the later ones not stopped vote.
    ``sampling.logprobs`` is raised to ``confidence_top_k`` (capped at the vocabulary).

    The vote: without a verifier, answers weigh the summed confidence of their kept traces
    (``select`` must be ``"majority"``, its default, and means this vote). With a verifier its
    steps are scored too, and ``select="weighted"`` (the default) weighs each kept trace by
    confidence times its aggregate score, ``"best"`` takes the kept trace of best aggregate
    score, ``"majority"`` ignores the scores.

    Returns:
    Each has one candidate per trace sampled, warm-up first (stopped ones unfinished); without a
    verifier a candidate's ``score`` is its confidence. ``extra``: ``confidence`` (per
    candidate), ``kept`` (the voting candidates' indices), ``stopped`` (traces stopped on the
    device), ``threshold`` (online, else None) and ``consensus`` (the winner's share).
    """
    return run_waves(inputs, n, lambda run: _search(run, n, options))


def _search(run: SearchRun, n: int, options: DeepConfOptions) -> list[SearchResult]:
    inputs = run.inputs
    k = min(options.confidence_top_k, inputs.llm.engine.model.config.vocab_size)
    sampling = inputs.sampling
    if sampling.logprobs < k:
        sampling = dataclasses.replace(sampling, logprobs=k)
    lines = run.start(n)
    per_problem = {p: [line for line in lines if line.problem == p] for p in run.wave}
    first = options.n_init if options.n_init is not None else n
    traces = {p: group[:first] for p, group in per_problem.items()}
    run.advance([line for p in run.wave for line in traces[p]], sampling, whole=True)
    scores = {line: _scores(line, k, options) for p in run.wave for line in traces[p]}
    kept = {p: _most_confident(traces[p], scores, options) for p in run.wave}
    threshold: dict[int, float | None] = dict.fromkeys(run.wave)
    if options.n_init is not None:
        # online, the threshold is the filter: every warm-up trace votes, and later ones that
        # it did not stop
        kept = {p: list(traces[p]) for p in run.wave}
        for p in run.wave:
            lowest = [scores[line]["lowest"] for line in traces[p]]
            threshold[p] = float(np.percentile(lowest, 100 * (1 - options.keep_fraction)))
        live = [p for p in run.wave if len(traces[p]) < n
                and _vote(run, kept[p], scores, options)[1] < options.consensus]
        while live:
            control = ConfidenceStop(options.confidence_window, k)
            wave = []
            for p in live:
                batch = per_problem[p][len(traces[p]) : len(traces[p]) + first]
                control.watch([line.seq for line in batch], threshold[p])
                traces[p] += batch
                wave += batch
            run.advance(wave, sampling, whole=True, confidence_stop=control)
            for line in wave:
                scores[line] = _scores(line, k, options)
                if line.seq.finish_reason != "confidence":
                    kept[line.problem].append(line)
            live = [p for p in live if len(traces[p]) < n
                    and _vote(run, kept[p], scores, options)[1] < options.consensus]
    results = []
    for p in run.wave:
        mine = traces[p]
        winner, share = _vote(run, kept[p], scores, options)
        confidence = [scores[line][options.confidence_score] for line in mine]
        candidates: list[Candidate] = []
        for line, c in zip(mine, confidence, strict=True):
            candidate = run.candidate(line)
            if run.verifier is None:
                candidate.score = c
            candidates.append(candidate)
        result = run.result(p, candidates, {
            "confidence": confidence, "kept": [mine.index(line) for line in kept[p]],
            "stopped": sum(line.seq.finish_reason == "confidence" for line in mine),
            "threshold": threshold[p], "consensus": share})
        result.chosen = None if winner is None else mine.index(winner)
        result.answer = None if winner is None else candidates[result.chosen].answer
        results.append(result)
    run.free(lines)
    return results


def _scores(line: Line, k: int, options: DeepConfOptions) -> dict[str, float]:
    """The trace's confidence scores from the top log-probabilities of its sampled tokens."""
    values = [token_confidence([v for _, v in top], k) for top in line.seq.top_logprobs]
    return trace_scores(values, options.confidence_window, options.confidence_tail)


def _most_confident(lines: list[Line], scores: dict, options: DeepConfOptions) -> list[Line]:
    """The top ``keep_fraction`` of ``lines`` (at least one) by confidence, in sample order."""
    count = max(1, math.ceil(options.keep_fraction * len(lines)))
    confidence = [scores[line][options.confidence_score] for line in lines]
    order = sorted(range(len(lines)), key=lambda i: (-confidence[i], i))
    return [lines[i] for i in sorted(order[:count])]


def _vote(run: SearchRun, kept: list[Line], scores: dict,
          options: DeepConfOptions) -> tuple[Line | None, float]:
    """The chosen trace among ``kept`` and its answer's share of the weighted vote."""
    answered = [line for line in kept if run.inputs.extract(run.text(line)) is not None]
    if not answered:
        return None, 0.0
    answers = [run.inputs.extract(run.text(line)) for line in answered]
    groups = group_answers(answers, run.inputs.equal)
    select = run.inputs.select
    confidence = [max(scores[line][options.confidence_score], 0.0) for line in answered]
    prm = [line.aggregate for line in answered]
    if select == "best" and run.verifier is not None:
        best = max(range(len(answered)), key=lambda i: (_finite(prm[i]), confidence[i], -i))
        total = sum(confidence) or 1.0
        same = sum(c for c, g in zip(confidence, groups, strict=True) if g == groups[best])
        return answered[best], same / total
    weights = confidence
    if select == "weighted" and run.verifier is not None:
        weights = [c * max(_finite(s if s is not None else 0.0), 0.0)
                   for c, s in zip(confidence, prm, strict=True)]
    totals: dict[int, float] = {}
    for g, w in zip(groups, weights, strict=True):
        totals[g] = totals.get(g, 0.0) + w
    first = {g: groups.index(g) for g in totals}
    winner = max(totals, key=lambda g: (totals[g], -first[g]))
    members = [i for i, g in enumerate(groups) if g == winner]
    chosen = max(members, key=lambda i: (weights[i], -i))
    total = sum(totals.values())
    return answered[chosen], (totals[winner] / total) if total > 0 else 1.0 / len(totals)


def _finite(x: float | None) -> float:
    return -math.inf if x is None or x != x else x
