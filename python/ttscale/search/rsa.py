"""Recursive Self-Aggregation (RSA): a population of solutions, rewritten from its own members.

Venkatraman et al. (2025), "Recursive Self-Aggregation Unlocks Deep Thinking in Large Language
Models". A population of N solutions is sampled from the problem's prompt. Each of T rounds then
builds a new population of N: every new member is written after an aggregation context that
shows K members of the current population, drawn at random without replacement, and asks for one
solution that keeps what they got right. The answer is a vote over the last population. No
verifier is needed; one passed in weights the final vote.

An aggregation context comes from ``aggregate_fn(problem, attempts) -> str | list[int]``: the
problem's text and the K members' texts (end-of-sequence tokens removed). A string is tokenized
like a ``prompt_fn``'s (with the tokenizer's usual special tokens), a list of ints is taken as the
context's token ids. Two defaults:

- :func:`instruction_aggregate`, for instruction-following models: one request,
  :func:`aggregation_request` (the problem, :data:`AGGREGATION_INSTRUCTION`, then each candidate
  under a numbered heading), made into a prompt the way the problems' prompts are (the chat
  template with the system prompt, or the caller's ``prompt_fn``).
- :func:`revision_aggregate`, the revision format of :mod:`ttscale.search.revisions`: the
  problem's prompt, then each of the K attempts followed by the revision separator. A policy
  trained to revise (the toy policy) reads the K members as its own earlier attempts.

The default is the instruction request when the tokenizer can spell it, else the revision format:
the toy tokenizer's 45 characters cannot write the request, and the toy policy learnt revisions.

Why it is cheap here: a round's N contexts of one problem begin alike (at least the problem's
prompt, with the revision format; the chat template's head, the problem and the instruction with
the request). That common token prefix is prefilled once per round and the N sequences fork from
it, sharing its KV blocks; each prefills only the rest of its own context. When the contexts
begin with the problem's prompt, the prompt prefilled for the first population is reused and only
the shared tokens after it are prefilled, once, on a sequence the N fork from. The tokens the
contexts cost are reported (``extra["aggregation_prefill_tokens"]``, also part of
``cost.prefilled_tokens``); RSA's token cost is its generated tokens plus those.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

from ttscale.errors import InvalidArgument
from ttscale.search.common import Inputs
from ttscale.search.prompts import PromptFn, build_prompt, token_id_list
from ttscale.search.registry import Options, option, strategy
from ttscale.search.result import Candidate, SearchResult
from ttscale.search.revisions import REVISION_SEPARATOR
from ttscale.search.run import Line, SearchRun, run_waves

AggregateFn = Callable[[str, list[str]], "str | list[int]"]

AGGREGATION_INSTRUCTION = (
    "Below are candidate solutions to this problem. Some of them may be wrong. Check each one "
    "step by step, keep what is right, correct what is wrong, and write one complete solution "
    "of your own that ends with the final answer."
)

# Tokens per member a context spends beyond the member itself (its heading or separator), for
# planning how many problems fit the KV pool at once; a longer context still runs.
FRAMING_TOKENS = 32


def aggregation_request(problem: str, attempts: Sequence[str]) -> str:
    """The default request to aggregate ``attempts``: the problem, the instruction, then each
    attempt under ``Candidate solution i:`` (the shared part comes first, so that the contexts of
    one round share the longest prefix)."""
    parts = [problem.rstrip(), AGGREGATION_INSTRUCTION]
    parts += [f"Candidate solution {i}:\n{attempt.strip()}"
              for i, attempt in enumerate(attempts, 1)]
    return "\n\n".join(parts)


def instruction_aggregate(tokenizer, system_prompt: str | None = None,
                          prompt_fn: PromptFn | None = None) -> AggregateFn:
    """``aggregate_fn`` for instruction-following models: :func:`aggregation_request` made into a
    prompt as the problems' prompts are (:func:`ttscale.search.prompts.build_prompt`)."""

    def aggregate(problem: str, attempts: list[str]) -> list[int]:
        return build_prompt(tokenizer, aggregation_request(problem, attempts), system_prompt,
                            prompt_fn)

    return aggregate


def revision_aggregate(tokenizer, system_prompt: str | None = None,
                       prompt_fn: PromptFn | None = None) -> AggregateFn:
    """``aggregate_fn`` in the revision format: the problem's prompt, then each attempt followed
    by :data:`~ttscale.search.revisions.REVISION_SEPARATOR` (see
    :func:`~ttscale.search.revisions.revision_context_ids`)."""
    separator = tokenizer.encode(REVISION_SEPARATOR, add_special_tokens=False)

    def aggregate(problem: str, attempts: list[str]) -> list[int]:
        ids = build_prompt(tokenizer, problem, system_prompt, prompt_fn)
        for attempt in attempts:
            ids += tokenizer.encode(attempt, add_special_tokens=False) + separator
        return ids

    return aggregate


def default_aggregate(tokenizer, system_prompt: str | None = None,
                      prompt_fn: PromptFn | None = None) -> AggregateFn:
    """The instruction request when ``tokenizer`` can spell it, else the revision format."""
    ids = tokenizer.encode(AGGREGATION_INSTRUCTION, add_special_tokens=False)
    spells = tokenizer.decode(ids) == AGGREGATION_INSTRUCTION
    make = instruction_aggregate if spells else revision_aggregate
    return make(tokenizer, system_prompt, prompt_fn)


@dataclasses.dataclass(frozen=True)
class RSAOptions(Options):
    aggregation_size: int = option(
        3, "K: members of the population each aggregation context shows (drawn without\n"
        "replacement); at most ``n``.", metavar="K")
    aggregation_rounds: int = option(
        2, "T: rounds of aggregation after the first population (0: a vote over ``n``\n"
        "samples, as best-of-N).", low=0, metavar="T")
    aggregate_fn: AggregateFn | None = option(None, (
        "``(problem, attempts) -> str or token ids``: the aggregation context shown the K\n"
        "drawn members' texts; default :func:`ttscale.search.rsa.default_aggregate`."),
        kind="function")

    def check(self, n: int) -> None:
        if self.aggregation_size > n:
            raise InvalidArgument(f"aggregation_size: expected at most the population n={n}, got "
                                  f"{self.aggregation_size}")

    @classmethod
    def for_budget(cls, n: int) -> dict:
        return {"aggregation_size": min(3, n)}


@strategy(RSAOptions, budget="Population size N: solutions per round (the search writes "
          "``n * (1 + aggregation_rounds)``).")
def rsa(inputs: Inputs, n: int, options: RSAOptions) -> list[SearchResult]:
    """Evolve a population of ``n`` solutions by recursive self-aggregation, then vote.

    The method of Venkatraman et al. (2025), "Recursive Self-Aggregation Unlocks Deep Thinking in
    Large Language Models"; the contexts' format and why a round's shared prefix is prefilled
    once are in :mod:`ttscale.search.rsa`. ``n`` samples from the prompt make the first
    population; each of ``aggregation_rounds`` rounds writes ``n`` new members, each after an
    aggregation context showing ``aggregation_size`` members of the last population drawn from
    the seed (by problem id and round), and replaces the population. The answer is ``select``'s
    choice over the last population: a majority vote without a verifier, a weighted vote with
    one (only the last population is scored). With ``aggregation_rounds=0`` it is best-of-N with
    the same seed.

    ``sampling.max_tokens`` bounds each solution, capped so that its aggregation context and it
    fit the model's context. RSA is not in compute-optimal's menu: at budget ``n`` it writes
    ``n * (1 + aggregation_rounds)`` solutions and prefills their contexts, so it does not cost
    what the menu's strategies cost at the same ``n``.

    Returns:
    Each has the last population's ``n`` candidates (``chain`` its place in the population,
    ``position`` the round). ``extra`` holds ``population``, ``aggregation_size``,
    ``aggregation_rounds``, ``draws`` (per round, per new member, the indices of the members its
    context showed), ``answers`` (per population, first to last, each member's answer),
    ``generated_tokens`` (per population, the tokens its members took), ``shared_prefix_tokens``
    (per round, the tokens its contexts share, prefilled once) and
    ``aggregation_prefill_tokens`` (the tokens the aggregation contexts cost to prefill; with the
    prompt's, ``cost.prefilled_tokens``). RSA's token cost is ``cost.generated_tokens`` plus
    ``aggregation_prefill_tokens``.
    """
    llm, sampling = inputs.llm, inputs.sampling
    aggregate = options.aggregate_fn or default_aggregate(
        llm.tokenizer, inputs.system_prompt, inputs.prompt_fn)
    members, rounds = options.aggregation_size, options.aggregation_rounds
    if not rounds:
        return run_waves(inputs, n, lambda run: _evolve(run, n, options, aggregate, sampling))
    # Waves are planned for a round's sequences (and the one their shared prefix is prefilled
    # on), each holding a context of K members and its own solution.
    room = llm.engine.model.max_positions - max(map(len, inputs.prompts))
    context = (members + 1) * (sampling.max_tokens + FRAMING_TOKENS)
    planned = dataclasses.replace(sampling, max_tokens=max(1, min(room, context)))
    return run_waves(dataclasses.replace(inputs, sampling=planned), n + 1,
                     lambda run: _evolve(run, n, options, aggregate, sampling))


def _evolve(run: SearchRun, n: int, options: RSAOptions, aggregate: AggregateFn,
            sampling) -> list[SearchResult]:
    inputs, engine = run.inputs, run.engine
    rounds, members = options.aggregation_rounds, options.aggregation_size
    lines = run.start(n, keep_roots=True)
    prompts = {line.problem: line.seq.prompt for line in lines}  # each problem's engine prompt
    run.advance(lines, sampling, whole=True, score=rounds == 0)
    generated = {p: [run.costs[p].generated_tokens] for p in run.wave}  # per population
    draws: dict[int, list[list[list[int]]]] = {p: [] for p in run.wave}
    answers: dict[int, list[list[str | None]]] = {p: [] for p in run.wave}
    shared: dict[int, list[int]] = {p: [] for p in run.wave}
    for round_ in range(1, rounds + 1):
        texts: dict[int, list[str]] = {p: [] for p in run.wave}
        for line in lines:
            texts[line.problem].append(run.text(line))
        for p in run.wave:
            answers[p].append([inputs.extract(text) for text in texts[p]])
        run.free(lines)
        lines, added = [], []
        for p in run.wave:
            rng = np.random.default_rng([inputs.sampling.seed, inputs.problem_ids[p], round_])
            drawn = [rng.choice(n, size=members, replace=False).tolist() for _ in range(n)]
            contexts = [
                context_ids(engine, aggregate(inputs.problems[p], [texts[p][j] for j in chosen]))
                for chosen in drawn
            ]
            seqs, common, bases = _place(run, p, prompts[p], contexts)
            lines += [Line(p, seq, index=i) for i, seq in enumerate(seqs)]
            draws[p].append(drawn)
            shared[p].append(common)
            added += bases
        if round_ == rounds:
            run.restart(lines)  # a verifier path from the problem's root for each last member
        else:
            for line in lines:
                line.start = len(line.seq.output_ids)
        room = engine.model.max_positions
        limits = [min(sampling.max_tokens, room - line.seq.context_len) for line in lines]
        run.advance(lines, sampling, whole=True, max_new_tokens=limits, score=round_ == rounds)
        for p in run.wave:
            generated[p].append(run.costs[p].generated_tokens - sum(generated[p]))
        for base in added:  # the round's shared prefixes, once their sequences are done
            if not base.num_sequences:
                engine.free_prompt(base)
    candidates: dict[int, list[Candidate]] = {p: [] for p in run.wave}
    for line in lines:
        candidate = run.candidate(line)
        candidate.chain, candidate.position = line.index, rounds
        candidates[line.problem].append(candidate)
    run.free(lines)
    results = []
    for p in run.wave:
        answers[p].append([c.answer for c in candidates[p]])
        prompt_kv = len(inputs.prompts[p]) - 1
        extra = dict(population=n, aggregation_size=members, aggregation_rounds=rounds,
                     draws=draws[p], answers=answers[p], generated_tokens=generated[p],
                     shared_prefix_tokens=shared[p],
                     aggregation_prefill_tokens=run.costs[p].prefilled_tokens - prompt_kv)
        results.append(run.result(p, candidates[p], extra))
    return results


def context_ids(engine, context) -> list[int]:
    """An ``aggregate_fn``'s output as token ids: a string tokenized as a ``prompt_fn``'s is, a
    list of ints as it is; in the vocabulary, and leaving the model room for one token."""
    if isinstance(context, str):
        if not context:
            raise InvalidArgument("aggregate_fn: returned an empty context")
        ids = engine.tokenizer.encode(context)
    elif (ids := token_id_list(context)) is None:
        raise InvalidArgument(f"aggregate_fn: expected a string or a list of token ids, got "
                              f"{context!r:.40}")
    ids = engine.check_prompt("aggregate_fn", ids)
    if len(ids) >= engine.model.max_positions:
        raise InvalidArgument(
            f"aggregate_fn: a context of {len(ids)} tokens leaves no room for a solution in the "
            f"model's context of {engine.model.max_positions}; lower aggregation_size or "
            "sampling.max_tokens")
    return ids


def common_prefix(contexts: Sequence[Sequence[int]]) -> int:
    """The length of the longest token prefix every context starts with."""
    first = contexts[0]
    length = min(map(len, contexts))
    for i in range(length):
        if any(context[i] != first[i] for context in contexts):
            return i
    return length


def _place(run: SearchRun, p: int, prompt, contexts: list[list[int]]):
    """One sequence per context, each with its context in place (pending, to be prefilled when
    it decodes), their common prefix prefilled once and shared.

    Returns the sequences, the shared prefix's length, and the engine prompts added for it
    (to free after the round)."""
    engine = run.engine
    shared = common_prefix(contexts)
    prompt_ids = prompt.prompt_ids
    if shared >= len(prompt_ids) and contexts[0][: len(prompt_ids)] == prompt_ids:
        base, based, added = prompt, len(prompt_ids), []  # the first population's prompt
    elif shared:
        added = run.add_prompts([p], [contexts[0][:shared]])
        base, based = added[0], shared
    else:  # nothing in common: each context is a prompt of its own
        added = run.add_prompts([p] * len(contexts), contexts)
        return [engine.fork(base, 1)[0] for base in added], 0, added
    if shared > based:
        # the shared tokens after the prompt, prefilled once on a sequence the rest fork from
        trunk = engine.fork(base, 1)[0]
        engine.extend(trunk, contexts[0][based:shared])
        run.prefill([trunk])
        run.costs[p].prefilled_tokens += trunk.prefilled
        seqs = engine.fork(trunk, len(contexts))
        engine.free([trunk])
    else:
        seqs = engine.fork(base, len(contexts))
    for seq, context in zip(seqs, contexts, strict=True):
        if len(context) > shared:
            engine.extend(seq, context[shared:])
    return seqs, shared, added
