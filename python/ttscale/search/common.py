"""What every strategy does around its search: the common arguments, checked, and the prompts
(:func:`prepare`). Running the search, wave by wave, is :mod:`ttscale.search.run`'s."""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ttscale._checks import check_flag, check_function, check_int, check_text
from ttscale.engine.engine import MAX_STREAM_KEY
from ttscale.errors import InvalidArgument
from ttscale.sampling_params import SamplingParams, check_seed
from ttscale.search.prompts import PromptFn, build_prompts
from ttscale.search.registry import option
from ttscale.search.select import SELECTIONS, check_select
from ttscale.verifiers.base import Verifier

DEFAULT_SAMPLING = SamplingParams(temperature=0.8, max_tokens=2048)

COMMON_HEAD = """\
llm : LLM
    The policy (:class:`ttscale.LLM`); its engine and tokenizer are used.
problems : list of str
    The problems' texts."""

COMMON_VERIFIER_SAMPLING = """\
verifier : Verifier, optional
    Scores steps (a PRM, ``ttscale.RuleVerifier``, ...).
sampling : SamplingParams, optional
    How the policy samples; default ``SamplingParams(temperature=0.8, max_tokens=2048)``.
    ``max_tokens`` bounds each solution (capped so no sequence outgrows the model's
    context); ``n`` is ignored (the strategy's budget decides) and ``stop`` must be unset
    (steps end at ``step_delimiter``, solutions at end-of-sequence or ``max_tokens``)."""

COMMON_RETURNS = """\
list of SearchResult
    One per problem, in order; its ``cost`` is split as :mod:`ttscale.search.cost` says."""


@dataclass(frozen=True)
class Common:
    """The keyword arguments every strategy takes (after ``llm, problems, n, verifier,
    sampling``), documented once; :func:`prepare` checks them."""

    select: str | None = option(None, (
        "Final choice of the answer (:mod:`ttscale.search.select`); default ``\"weighted\"`` with\n"
        "a verifier, ``\"majority\"`` without."), kind="any",
        label='{"best", "weighted", "majority"}, optional')
    agg: str = option("last", "How a candidate's step scores become its score, for ranking and for "
                      "weighted votes.", kind="any", label='{"last", "min", "prod", "mean"}')
    seed: int | None = option(None, "Sampling seed (default ``sampling.seed``, else 0); the same "
                              "seed gives the same result.", kind="any", label="int, optional")
    references: Sequence[str | None] | None = option(None, (
        "Known answers, one per problem (None entries allowed): a rule verifier's ground truth."),
        kind="any", label="list of str, optional")
    system_prompt: str | None = option(None, "The system message of the chat template (or a "
                                       "preamble without one).", kind="any", label="str, optional")
    prompt_fn: PromptFn | None = option(None, (
        "``problem -> str or token ids``, replacing the default prompt\n"
        "(:mod:`ttscale.search.prompts`)."), kind="function")
    step_delimiter: str = option("\n\n", "The text between steps (default a blank line).",
                                 kind="any", label="str")
    extract: Callable[[str], str | None] | None = option(None, (
        "``text -> answer or None``; default :func:`ttscale.grading.extract_answer`."),
        kind="function")
    equal: Callable[[str, str], bool] | None = option(None, (
        "``(a, b) -> bool``; default :func:`ttscale.grading.answers_equal`."), kind="function")
    problem_ids: Sequence[int] | None = option(None, (
        "Each problem's key to its random streams, e.g. its index in its data file (default its\n"
        "position in ``problems``): a problem's result depends on (seed, its id, the settings)\n"
        "only, not on which problems are searched with it."), kind="any",
        label="list of int, optional")
    progress: bool = option(True, "Show a progress bar over problems.", kind="any", label="bool")
    on_progress: Callable[[Any], None] | None = option(None, (
        "Called after each step of the search with a :class:`ttscale.search.line.Progress`\n"
        "(problem, step, live, finished, best_score, generated_tokens), on the thread that runs\n"
        "the search; the server streams these."), kind="function")


COMMON = Common


@dataclass
class Inputs:
    """A strategy's checked arguments, as :class:`~ttscale.search.run.SearchRun` uses them."""

    strategy: str
    llm: Any
    problems: list[str]
    references: list[str | None] | None
    prompts: list[list[int]]
    sampling: SamplingParams
    verifier: Verifier | None
    select: str
    agg: str
    delimiter: str
    extract: Callable[[str], str | None]
    equal: Callable[[str, str], bool] | None
    problem_ids: list[int]  # each problem's key to its random streams (default: its position)
    progress: bool = True  # a progress bar over problems
    on_progress: Callable[[Any], None] | None = None  # told of each step (search.line.Progress)
    # how the prompts were built, for strategies that build more prompts the same way (RSA)
    system_prompt: str | None = None
    prompt_fn: PromptFn | None = None


def prepare(
    strategy: str,
    llm,
    problems: Sequence[str],
    n: int,
    verifier: Verifier | None,
    sampling: SamplingParams | None,
    *,
    select: str | None,
    agg: str,
    seed: int | None,
    references: Sequence[str | None] | None,
    system_prompt: str | None,
    prompt_fn: PromptFn | None,
    step_delimiter: str,
    extract,
    equal,
    needs_verifier: bool,
    selections: Sequence[str] = SELECTIONS,
    problem_ids: Sequence[int] | None = None,
    progress: bool = True,
    on_progress: Callable[[Any], None] | None = None,
) -> Inputs:
    """Check a strategy's common arguments (ValueErrors name them) and build its prompts;
    ``selections`` are the ``select`` values the strategy knows."""
    if isinstance(llm, Verifier):
        raise InvalidArgument(f"llm: got a {type(llm).__name__}, a verifier; the policy (a "
                              "ttscale.LLM) goes here, the verifier in verifier=")
    if getattr(llm, "engine", None) is None:
        raise InvalidArgument(f"llm: expected a ttscale.LLM, got {type(llm).__name__}")
    if llm.tokenizer is None:
        raise InvalidArgument("llm: the model directory has no tokenizer.json; strategies work on text")
    problems = check_problems("problems", problems)
    n = check_count("n", n)
    max_n = getattr(llm, "max_n", None)
    if max_n is not None and n > max_n:
        raise InvalidArgument(f"n: at most {max_n} a problem (the LLM's max_n), got {n}")
    problem_ids = check_problem_ids(problem_ids, len(problems))
    references = check_references(references, len(problems))
    if system_prompt is not None:
        check_text("system_prompt", system_prompt, empty=True)
    for name, fn in (("prompt_fn", prompt_fn), ("extract", extract), ("equal", equal),
                     ("on_progress", on_progress)):
        check_function(name, fn)
    check_flag("progress", progress)
    if verifier is not None and not isinstance(verifier, Verifier):
        raise InvalidArgument(f"verifier: expected a ttscale Verifier, got {type(verifier).__name__}")
    if needs_verifier and verifier is None:
        raise InvalidArgument(f"verifier: {strategy} needs a verifier to score steps")
    select = check_select(select, agg, verifier is not None, selections)
    if not isinstance(step_delimiter, str) or not step_delimiter:
        raise InvalidArgument(f"step_delimiter: expected a non-empty string, got {step_delimiter!r}")
    sampling = DEFAULT_SAMPLING if sampling is None else sampling
    if not isinstance(sampling, SamplingParams):
        raise InvalidArgument(f"sampling: expected SamplingParams, got {type(sampling).__name__}")
    if sampling.stop_strings:
        raise InvalidArgument(
            f"sampling: stop strings are not supported in search (got {sampling.stop!r}); "
            "steps end at step_delimiter, solutions at end-of-sequence or max_tokens"
        )
    if seed is not None:
        seed = check_seed(seed)
    seed = seed if seed is not None else (sampling.seed if sampling.seed is not None else 0)
    prompts = build_prompts(llm.tokenizer, problems, system_prompt, prompt_fn)
    if prompt_fn is not None:  # its token ids, in the policy's vocabulary
        for prompt in prompts:
            llm.engine.check_prompt("prompt_fn", prompt)
    room = llm.engine.model.max_positions - max(map(len, prompts))
    if room < 1:
        longest = max(range(len(prompts)), key=lambda i: len(prompts[i]))
        raise InvalidArgument(
            f"problems[{longest}]: its prompt of {len(prompts[longest])} tokens fills "
            f"the model's context of {llm.engine.model.max_positions}"
        )
    sampling = dataclasses.replace(sampling, seed=seed, max_tokens=min(sampling.max_tokens, room))
    if extract is None or equal is None:
        from ttscale import grading

        extract = extract or grading.extract_answer
        equal = equal or grading.answers_equal
    return Inputs(
        strategy,
        llm,
        list(problems),
        None if references is None else list(references),
        prompts,
        sampling,
        verifier,
        select,
        agg,
        step_delimiter,
        extract,
        equal,
        problem_ids,
        progress,
        on_progress,
        system_prompt,
        prompt_fn,
    )


def check_problem_ids(problem_ids, count: int) -> list[int]:
    """The problems' stream keys: distinct integers in [0, MAX_STREAM_KEY), one per problem
    (default: their positions in the call)."""
    if problem_ids is None:
        return list(range(count))
    if hasattr(problem_ids, "tolist") and getattr(problem_ids, "ndim", None) == 1:
        problem_ids = problem_ids.tolist()  # an array or a tensor of ids (floats still fail below)
    if isinstance(problem_ids, str) or not isinstance(problem_ids, Sequence):
        raise InvalidArgument(f"problem_ids: expected one integer per problem, got {problem_ids!r:.60}")
    ids = list(problem_ids)
    if len(ids) != count:
        raise InvalidArgument(f"problem_ids: expected one per problem ({count}), got {len(ids)}")
    bad = next((i for i in ids if not isinstance(i, numbers.Integral) or isinstance(i, bool)
                or not 0 <= i < MAX_STREAM_KEY), None)
    if bad is not None:
        raise InvalidArgument(f"problem_ids: expected integers in [0, {MAX_STREAM_KEY}), got {bad!r}")
    if len(set(ids)) != len(ids):
        raise InvalidArgument("problem_ids: expected distinct ids (each keys its problem's random streams)")
    return [int(i) for i in ids]


def check_count(name: str, value, minimum: int = 1) -> int:
    """A count argument as an int: an integer (numpy's too, not a bool) >= ``minimum``."""
    return check_int(name, value, low=minimum)


def check_problems(name: str, problems) -> list[str]:
    """A non-empty list (or other sequence) of problem texts, none of them blank."""
    if isinstance(problems, str) or not isinstance(problems, Sequence) or not problems:
        raise InvalidArgument(f"{name}: expected a non-empty list of strings, got {problems!r:.60}")
    if len(problems) > MAX_STREAM_KEY:
        raise InvalidArgument(f"{name}: at most {MAX_STREAM_KEY} in one call (each numbers its "
                              f"own random streams), got {len(problems)}; search them in batches")
    for i, problem in enumerate(problems):
        if not isinstance(problem, str):
            raise InvalidArgument(f"{name}[{i}]: expected a string, got {type(problem).__name__}")
        if not problem.strip():
            raise InvalidArgument(f"{name}[{i}]: the problem's text is blank")
    return list(problems)


def check_references(references, count: int) -> list[str | None] | None:
    """Known answers: None, or one string (or None) per problem."""
    if references is None:
        return None
    if isinstance(references, str) or not isinstance(references, Sequence):
        raise InvalidArgument(f"references: expected one answer (a string or None) per problem, "
                              f"got {references!r:.60}")
    if len(references) != count:
        raise InvalidArgument(f"references: expected one per problem ({count}), got {len(references)}")
    for i, reference in enumerate(references):
        if not isinstance(reference, str | None):
            raise InvalidArgument(f"references[{i}]: expected a string or None, got "
                                  f"{type(reference).__name__}")
    return list(references)
