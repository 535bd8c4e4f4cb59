"""Sequential revisions: chains of attempts, each written with the chain's earlier ones in view.

Test-time compute has two axes (Snell et al., 2024, "Scaling LLM Test-Time Compute Optimally"):
parallel, N independent answers searched or voted on, and sequential, a model revising its own
attempts. ``revisions`` spends ``n`` attempts per problem as ``n // sequential`` parallel chains
of ``sequential`` attempts each, so ``sequential=1`` is best-of-N and ``sequential=n`` one chain.

The revision format, in one place (a model trained to revise is trained on exactly this)::

    <prompt><attempt 1><separator 1><attempt 2><separator 2>...<attempt k><separator k>

then the new attempt, where each attempt is its text as the policy wrote it without its
end-of-sequence token, at most ``window`` earlier attempts are shown (the chain's latest), and
every separator is :data:`REVISION_SEPARATOR`, ``"\\n# another try:\\n"``: it closes an attempt
and introduces the next. :func:`revision_context` builds the text; the strategy works on tokens
(each attempt's own sampled tokens, each separator tokenized alone, :func:`revision_context_ids`),
which is the same thing for a character tokenizer such as the toy model's. A chain's first
attempt sees the bare prompt, as a best-of-N sample does.

Why revisions are cheap here: a chain's context grows in place. An attempt ends on its chain's
sequence, whose KV holds the prompt (shared by the problem's chains) and the chain so far; the
separator is appended (:meth:`Engine.extend`) and the next attempt decodes on the same sequence,
so only the separator is prefilled and nothing is ever recomputed. Once the chain is longer than
``window``, dropping its oldest attempt shifts every position after it: the context is rebuilt
on a fresh fork of the prompt from the last ``window`` attempts' tokens, and that prefill is
counted (``extra["rebuilt_tokens"]``).

Each attempt is scored alone: the verifier sees the problem and that attempt only, on a fresh
path forked from the problem's root and scored step by step like any other solution.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ttscale.errors import InvalidArgument
from ttscale.search.common import Inputs
from ttscale.search.prompts import token_id_list
from ttscale.search.registry import Options, option, strategy
from ttscale.search.result import Candidate, SearchResult
from ttscale.search.run import Line, SearchRun, run_waves
from ttscale.search.select import REVISION_SELECTIONS

#: What follows each earlier attempt in a revision context: it closes that attempt and
#: introduces the next. Written in the toy tokenizer's alphabet, so the toy policy can learn it.
REVISION_SEPARATOR = "\n# another try:\n"

RevisionFn = Callable[[int], "str | list[int]"]


def revision_context(prompt: str, attempts: Sequence[str]) -> str:
    """The text a revision is written after: the prompt, then each earlier attempt (oldest
    first, without end-of-sequence tokens) followed by :data:`REVISION_SEPARATOR`.

    With no attempts it is the prompt itself: a chain's first attempt is a plain sample.
    """
    return prompt + "".join(attempt + REVISION_SEPARATOR for attempt in attempts)


def revision_context_ids(
    prompt_ids: Sequence[int],
    attempts_ids: Sequence[Sequence[int]],
    separators_ids: Sequence[Sequence[int]],
) -> list[int]:
    """:func:`revision_context` in tokens: the prompt, then each attempt's tokens followed by its
    separator's (``separators_ids[i]`` follows ``attempts_ids[i]``)."""
    ids = list(prompt_ids)
    for attempt, separator in zip(attempts_ids, separators_ids, strict=True):
        ids += list(attempt) + list(separator)
    return ids


def separator_ids(tokenizer, revision_fn: RevisionFn | None, count: int) -> list[list[int]]:
    """The tokens that follow a chain's attempts at positions ``0 .. count - 1``: the default
    separator, or what ``revision_fn(position)`` returns (a string is tokenized alone, without
    special tokens); each must be at least one token."""
    separators = []
    for position in range(count):
        text = REVISION_SEPARATOR if revision_fn is None else revision_fn(position)
        if isinstance(text, str):
            ids = tokenizer.encode(text, add_special_tokens=False)
        elif (ids := token_id_list(text)) is None:
            raise InvalidArgument(f"revision_fn: expected a string or a list of token ids, got "
                                  f"{text!r:.40} at position {position}")
        if not ids:
            raise InvalidArgument(
                f"revision_fn: gave no tokens after the attempt at position {position}"
            )
        separators.append(ids)
    return separators


@dataclass(frozen=True)
class RevisionOptions(Options):
    sequential: int = option(
        doc="Attempts per chain; divides ``n`` (``n // sequential`` parallel chains).", metavar="S")
    window: int = option(3, "Earlier attempts a revision sees at most (the chain's latest).",
                         metavar="W")
    revision_fn: RevisionFn | None = option(None, (
        "``position -> str or token ids``: what follows the chain's attempt at ``position``\n"
        "(0-based) and introduces the next, instead of :data:`REVISION_SEPARATOR`."),
        kind="function")

    def check(self, n: int) -> None:
        if n % self.sequential:
            raise InvalidArgument(f"sequential: expected a divisor of n={n}, got {self.sequential}")


@strategy(RevisionOptions, positional=("sequential",), selections=REVISION_SELECTIONS,
          budget="Attempts per problem, all chains together.")
def revisions(inputs: Inputs, n: int, options: RevisionOptions) -> list[SearchResult]:
    """Spend ``n`` attempts per problem as ``n // sequential`` chains of ``sequential``
    revisions, each attempt written after the chain's earlier ones, then choose an answer.

    The format of a revision's context, and why it costs only its new tokens, are in the
    module docstring (:mod:`ttscale.search.revisions`). Every attempt is a candidate, scored
    alone by the verifier; ``select`` chooses among all of them as in best-of-N, or with
    ``"hierarchical"`` takes each chain's best attempt, then a weighted vote across chains.
    ``sequential=1`` gives exactly :func:`ttscale.best_of_n` with the same seed.

    ``select`` also takes ``"hierarchical"``. ``sampling.max_tokens`` bounds each attempt,
    capped so that a chain's context (the prompt, ``window`` attempts with their separators
    and the new attempt) fits the model's context.

    Returns:
    Each has ``n`` candidates, chain by chain, each chain's attempts in order, with their
    ``chain`` and ``position``. ``extra`` holds ``sequential``, ``chains``, ``window`` and
    ``rebuilt_tokens``, the tokens prefilled again to drop attempts out of the window
    (included in ``cost.prefilled_tokens``).
    """
    llm, sequential, window = inputs.llm, options.sequential, options.window
    chains = n // sequential
    separators = separator_ids(llm.tokenizer, options.revision_fn, sequential - 1)
    vocab = llm.engine.model.config.vocab_size
    bad = next((t for separator in separators for t in separator if not 0 <= t < vocab), None)
    if bad is not None:
        raise InvalidArgument(f"revision_fn: token id {bad} outside the vocabulary [0, {vocab})")
    # A chain's own tokens at most: `held` earlier attempts with their separators, then one more.
    held = min(window, sequential - 1)
    longest_separator = max(map(len, separators), default=0)
    room = llm.engine.model.max_positions - max(map(len, inputs.prompts))
    attempt_tokens = min(
        inputs.sampling.max_tokens, (room - held * longest_separator) // (held + 1)
    )
    if attempt_tokens < 1:
        raise InvalidArgument(
            f"window: {held} earlier attempts with their separators leave no room for a new one "
            f"in the model's context of {llm.engine.model.max_positions}; lower window"
        )
    # The engine bounds what a sequence samples in its life; a chain's sequence hosts several
    # attempts, so it gets the chain's bound and each attempt its own through advance's budget.
    # Waves are planned for a whole chain's context.
    chain_tokens = held * (attempt_tokens + longest_separator) + attempt_tokens
    chain_sampling = dataclasses.replace(inputs.sampling, max_tokens=chain_tokens)

    def search(run: SearchRun) -> list[SearchResult]:
        lines = run.start(chains, keep_roots=True)
        attempts: dict[Line, list[list[int]]] = {line: [] for line in lines}
        candidates: dict[int, list[Candidate]] = {p: [] for p in run.wave}
        rebuilt = {p: 0 for p in run.wave}
        for position in range(sequential):
            if position:
                for line in lines:
                    rebuilt[line.problem] += _next_context(
                        run, line, attempts[line], separators, window
                    )
                run.restart(lines)
            run.advance(lines, chain_sampling, whole=True, budget=attempt_tokens)
            for line in lines:
                candidate = run.candidate(line)
                candidate.chain, candidate.position = line.index, position
                candidates[line.problem].append(candidate)
                eos = line.seq.finish_reason == "eos"
                attempts[line].append(candidate.token_ids[:-1] if eos else candidate.token_ids)
        run.free(lines)
        extra = dict(sequential=sequential, chains=chains, window=window)
        return [
            run.result(
                p,
                sorted(candidates[p], key=lambda c: (c.chain, c.position)),
                {**extra, "rebuilt_tokens": rebuilt[p]},
            )
            for p in run.wave
        ]

    return run_waves(
        dataclasses.replace(inputs, sampling=chain_sampling), chains, search
    )


def _next_context(
    run: SearchRun,
    line: Line,
    attempts: list[list[int]],
    separators: list[list[int]],
    window: int,
) -> int:
    """Put the context of the chain's next revision on ``line.seq``; return the tokens rebuilt.

    While the chain holds at most ``window`` attempts, the latest one's separator is appended in
    place (its end-of-sequence token, still pending, is dropped first). After that, the context
    is rebuilt on a fresh fork of the prompt from the last ``window`` attempts.
    """
    engine = run.engine
    done = len(attempts)
    if done <= window:
        if line.seq.finish_reason == "eos":
            engine.drop_last_sample(line.seq)
        engine.extend(line.seq, separators[done - 1])
        return 0
    shown = range(done - window, done)
    context = revision_context_ids([], [attempts[i] for i in shown], [separators[i] for i in shown])
    prompt = line.seq.prompt
    engine.free([line.seq])
    line.seq = engine.fork(prompt, 1)[0]
    engine.extend(line.seq, context)
    return len(context)
