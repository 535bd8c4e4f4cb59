"""Budget forcing: chains that think to a token budget, and a vote over all their attempts.

Muennighoff et al. (2025), "s1: Simple test-time scaling": a model's thinking is held to a token
budget by the decoder alone. At the budget the end of thinking is forced (the model answers with
what it has); below a minimum, the model's own end of thinking is suppressed and ``"Wait"`` is
written instead, so it goes on thinking, and often corrects itself.

Here the engine does both inside the decode step (:mod:`ttscale.engine.thinking`, through
``SamplingParams.thinking_token_budget`` and its companions), so ``n`` chains of any budget
decode together like ``n`` samples. A chain's thinking falls into attempts: the text before each
continue text is an attempt the model ended itself; the text after the last one is the final
attempt, finished if the model ended it (or, on a model that answers after its thinking, if the
answer after a forced end was written to its end). Every finished attempt of every chain votes;
an attempt the budget cut has no answer.

On a model whose tokenizer declares no end-of-thinking marker (the toy models), thinking is the
whole solution and ends at end-of-sequence, and the continue text is the revision separator of
:mod:`ttscale.search.revisions` (the toy policy learnt to revise after it), so a chain is a
revision chain whose length the budget sets.
"""

from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass

from ttscale.engine.thinking import CUT, ENDED, Control
from ttscale.errors import InvalidArgument
from ttscale.search.common import Inputs
from ttscale.search.cost import split_tokens
from ttscale.search.registry import Options, option, strategy
from ttscale.search.result import Candidate, SearchResult
from ttscale.search.revisions import REVISION_SEPARATOR
from ttscale.search.run import Line, SearchRun, run_waves
from ttscale.verifiers.base import split_steps


@dataclass(frozen=True)
class BudgetForcingOptions(Options):
    budget: int = option(doc=(
        "Thinking tokens per chain (``thinking_token_budget``): at the budget the end of\n"
        "thinking is forced."), low=0, metavar="T")
    min_thinking_tokens: int | None = option(None, (
        "Below this many thinking tokens the model's end of thinking is suppressed and\n"
        "``continue_text`` written (default: the budget, s1's scaling up: think to the budget)."),
        low=0, metavar="M", label="int, optional")
    max_extensions: int | None = option(None, (
        "Continue texts a chain writes at most (default: as many as the minimum needs)."),
        low=0, metavar="E", label="int, optional")
    continue_text: str | list[int] | None = option(None, (
        "What replaces a suppressed end of thinking: default ``\"Wait\"`` where the tokenizer\n"
        "declares an end-of-thinking marker, else the revision separator."), kind="any",
        label="str or list of int, optional")

    def check(self, n: int) -> None:
        least = self.least
        if least > self.budget:
            raise InvalidArgument(f"min_thinking_tokens: expected at most budget ({self.budget}), "
                                  f"got {least}")
        text = self.continue_text
        if text is not None and not (isinstance(text, str) and text) and not (
                isinstance(text, (list, tuple)) and text and all(
                    isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in text)):
            raise InvalidArgument(f"continue_text: expected a non-empty string or list of token "
                                  f"ids, got {text!r:.60}")
        for name in ("continue_text", "max_extensions"):
            if not least and getattr(self, name) is not None:
                raise InvalidArgument(f"{name}: has no effect with min_thinking_tokens=0")

    @property
    def least(self) -> int:
        return self.budget if self.min_thinking_tokens is None else self.min_thinking_tokens


@strategy(BudgetForcingOptions, budget=(
    "Chains per problem (each one sequence thinking to ``budget`` tokens)."))
def budget_forcing(inputs: Inputs, n: int, options: BudgetForcingOptions) -> list[SearchResult]:
    """Run ``n`` chains per problem that think to a token budget (s1's budget forcing), then
    vote over every finished attempt of every chain.

    Muennighoff et al. (2025), "s1: Simple test-time scaling"; see
    :mod:`ttscale.search.budget_forcing`. Each chain is one sequence whose thinking the engine
    holds to ``budget`` tokens, suppressing its end below ``min_thinking_tokens`` (writing
    ``continue_text`` instead, at most ``max_extensions`` times). No verifier is needed: without
    one the answer is the majority of the finished attempts; with one each finished attempt is
    scored alone and ``select`` weighs them. ``sampling.max_tokens`` bounds the answer written
    after a forced end of thinking (where the model has an end-of-thinking marker); the
    sampling's own thinking fields are replaced, except ``thinking_end``.

    Returns:
    Each has one candidate per attempt, chain by chain (``chain``, and ``position`` within it);
    an attempt the budget cut is unfinished and has no answer. ``extra`` holds ``budget``,
    ``min_thinking_tokens``, ``attempts`` (finished ones) and ``extensions`` (continue texts
    written, all chains together).
    """
    llm = inputs.llm
    rules = llm.engine.thinking
    least = options.least
    continue_text = options.continue_text
    if continue_text is None and least:
        continue_text = "Wait" if rules.end is not None else REVISION_SEPARATOR
    if isinstance(continue_text, list):
        continue_text = tuple(continue_text)
    sampling = inputs.sampling
    thinking = dict(thinking_token_budget=options.budget, min_thinking_tokens=least,
                    continue_text=continue_text if least else None,
                    max_extensions=options.max_extensions if least else None)
    try:
        params = dataclasses.replace(sampling, **thinking)
        control = rules.control(params)
    except InvalidArgument as error:  # named as the option it came from
        raise InvalidArgument(str(error), param=error.param) from None
    # What a chain writes at most: its thinking, the end text, and an answer after it unless
    # the end is the end of sequence (then nothing follows).
    answers = control.end[0] not in rules.eos
    chain_tokens = options.budget + len(control.end) + (sampling.max_tokens if answers else 0)
    room = llm.engine.model.max_positions - max(map(len, inputs.prompts))
    params = dataclasses.replace(params, max_tokens=max(1, min(chain_tokens, room)))
    verifier = inputs.verifier

    def search(run: SearchRun) -> list[SearchResult]:
        lines = run.start(n)
        run.advance(lines, params, whole=True)
        candidates: dict[int, list[Candidate]] = {p: [] for p in run.wave}
        extensions = {p: 0 for p in run.wave}
        for line in lines:
            candidates[line.problem] += _attempts(run, line, control, answers)
            if line.seq.thinking is not None:
                extensions[line.problem] += line.seq.thinking.state.extensions
        run.free(lines)
        if verifier is not None:
            _score(run, verifier, candidates)
        return [run.result(p, candidates[p], {
            "budget": options.budget, "min_thinking_tokens": least,
            "attempts": sum(c.finished for c in candidates[p]),
            "extensions": extensions[p]}) for p in run.wave]

    # the chains decode without the verifier: it scores each finished attempt alone, after
    return run_waves(dataclasses.replace(inputs, sampling=params, verifier=None), n, search)


def _attempts(run: SearchRun, line: Line, control: Control, answers: bool) -> list[Candidate]:
    """A chain's attempts: the text before each continue text, then the rest (see the module
    docstring for which are finished)."""
    seq = line.seq
    out = seq.output_ids  # out[i] is seq.tokens[i + 1]
    trace = seq.thinking
    starts = [0] + [c - 1 + len(control.continuation) for c in trace.continued_at]
    stops = [c - 1 for c in trace.continued_at] + [len(out)]
    phase = trace.state.phase
    ended = trace.ended_at - 1 if trace.ended_at is not None else len(out)
    if phase == ENDED:
        last_finished = seq.finish_reason in ("eos", "stop")
    elif phase == CUT:  # the budget ended it: finished only if an answer followed to its end
        last_finished = answers and seq.finish_reason in ("eos", "stop") and (
            len(out) > ended + len(control.end))
    else:  # still thinking at max_tokens
        last_finished = False
    candidates = []
    for k, (start, stop) in enumerate(zip(starts, stops, strict=True)):
        last = k == len(starts) - 1
        if last and min(stop, ended) <= start:
            continue  # the budget cut a continue text: no attempt after it
        finished = last_finished if last else True
        ids = out[start:stop]
        text = run.engine.tokenizer.decode(ids)
        candidates.append(Candidate(
            text=text, token_ids=ids, steps=split_steps(text, run.delimiter),
            answer=run.inputs.extract(text) if finished else None, finished=finished,
            chain=line.index, position=k))
    return candidates


def _score(run: SearchRun, verifier, candidates: dict[int, list[Candidate]]) -> None:
    """Score each finished attempt alone (its steps after the problem), charging each problem
    its share of the tokens scored, by the length of its attempts' text."""
    todo = [(p, c) for p, group in candidates.items() for c in group if c.finished and c.steps]
    if not todo:
        return
    scored = getattr(verifier, "scored_in_thread", lambda: verifier.scored_tokens)
    before = scored()
    problems = [run.inputs.problems[p] for p, _ in todo]
    references = None if run.inputs.references is None else [
        run.inputs.references[p] for p, _ in todo]
    scores, aggregates = verifier.aggregate_solutions(problems, [c.steps for _, c in todo],
                                                      references, run.agg)
    for (_, candidate), steps, score in zip(todo, scores, aggregates, strict=True):
        candidate.step_scores, candidate.score = steps, score
    weights = [len(c.text) + 1 for _, c in todo]
    for (p, _), share in zip(todo, split_tokens(scored() - before, weights), strict=True):
        run.costs[p].scored_tokens += share
