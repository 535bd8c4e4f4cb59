"""Answer extraction and equivalence checking for math benchmarks.

Extraction is a small set of regular expressions over model output; deciding
whether two answers are mathematically equal is delegated entirely to the
``math-verify`` package, so there is no hand-written LaTeX canonicaliser here.
This module deliberately imports nothing else from ``ttscale``.
"""

from __future__ import annotations

import functools
import re
import threading

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

from ttscale.errors import InvalidArgument

__all__ = ["extract_answer", "answers_equal", "coverage_at_k"]

# The letter look-ahead keeps ``\boxedfoo``-style macros from matching.
_BOXED = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
# ``\boxed 5``: TeX takes a single token as the argument; we take the run of
# characters up to whitespace or a math delimiter, which covers numbers.
_BOXED_BARE = re.compile(r"\s*([^\s${}]+)")
_ANSWER_IS = re.compile(
    r"\banswer(?:\*\*)?\s*(?:is\b\s*:?|:)(?:\*\*)?[ \t]*([^\n]*)", re.IGNORECASE
)
_HASHES = re.compile(r"####[ \t]*([^\n]*)")
# A sentence-ending period: followed by whitespace or the end, so the decimal
# point in ``2.5`` does not cut the answer short.
_SENTENCE_END = re.compile(r"\.(?=\s|$)")
_MATH_OPENERS = (("$$", "$$"), ("\\[", "\\]"), ("\\(", "\\)"), ("$", "$"))
# Only a plain number may lose its commas: ``(1,2)`` or ``1,2`` are tuples.
_THOUSANDS = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_UNESCAPED_DOLLAR = re.compile(r"(?<!\\)\$")
_TIMEOUT_S = 5


def _braced_argument(text: str, start: int) -> str | None:
    """Return the contents of the balanced ``{...}`` group opening at ``start``."""
    depth = 0
    i = start
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            # ``\{`` and ``\}`` are literal braces and do not open or close groups.
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1 : i]
        i += 1
    return None


def _last_boxed(text: str) -> str | None:
    for match in reversed(list(_BOXED.finditer(text))):
        rest = match.end()
        while rest < len(text) and text[rest].isspace():
            rest += 1
        if rest < len(text) and text[rest] == "{":
            content = _braced_argument(text, rest)
        else:
            bare = _BOXED_BARE.match(text, match.end())
            content = bare.group(1) if bare else None
        # An unbalanced or empty box (e.g. truncated output) is skipped so an
        # earlier, complete one can still be used.
        content = _clean(content) if content is not None else ""
        if content:
            return content
    return None


def _first_sentence(tail: str) -> str:
    """Cut the text after "answer is" down to the answer itself."""
    tail = tail.strip()
    for opener, closer in _MATH_OPENERS:
        if tail.startswith(opener):
            end = tail.find(closer, len(opener))
            if end != -1:
                return tail[len(opener) : end]
    end = _SENTENCE_END.search(tail)
    return tail[: end.start()] if end else tail


def _clean(answer: str) -> str:
    answer = _UNESCAPED_DOLLAR.sub("", answer).strip().rstrip(".").strip()
    # markdown bold around the answer ("The answer is: **42**.")
    answer = answer.removeprefix("**").removesuffix("**")
    return answer.strip().rstrip(".").strip()


def _last_clean(pattern: re.Pattern[str], text: str, cut_sentence: bool) -> str | None:
    for match in reversed(list(pattern.finditer(text))):
        tail = match.group(1)
        content = _clean(_first_sentence(tail) if cut_sentence else tail)
        if content:
            return content
    return None


def extract_answer(text: str) -> str | None:
    """Extract the final answer from a worked solution or model output.

    Parameters
    ----------
    text : str
        Free-form solution text, e.g. a MATH solution, a GSM8K ``answer``
        field, or a model completion.

    Returns
    -------
    str or None
        The bare answer (no ``$`` delimiters, no trailing period), taken from,
        in order of precedence: the last balanced ``\\boxed{...}`` /
        ``\\fbox{...}`` (or ``\\boxed 5``); the last "answer is X" or
        "answer: X"; the last ``#### X`` line. ``None`` if none is present.

    Raises
    ------
    TypeError
        If ``text`` is not a ``str``.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be str, got {type(text).__name__}")
    return (
        _last_boxed(text)
        or _last_clean(_ANSWER_IS, text, cut_sentence=True)
        or _last_clean(_HASHES, text, cut_sentence=False)
    )


def _normalise(answer: str) -> str:
    answer = " ".join(_clean(answer).split())
    if _THOUSANDS.fullmatch(answer):
        answer = answer.replace(",", "")
    return answer


def _timeout() -> int | None:
    # math-verify enforces timeouts with SIGALRM, which Python only allows in
    # the main thread; elsewhere the timeout has to be switched off or
    # parse/verify raise ValueError.
    return _TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


@functools.lru_cache(maxsize=4096)
def _parse(answer: str, timeout: int | None) -> tuple:
    # math-verify mis-reads many bare answers (e.g. ``\frac{1}{2}``) unless they
    # sit inside a math environment, so every answer is wrapped in ``$...$``.
    return tuple(
        parse(
            f"${answer}$",
            extraction_config=(LatexExtractionConfig(), ExprExtractionConfig()),
            parsing_timeout=timeout,
        )
    )


def answers_equal(predicted: str | None, reference: str) -> bool:
    """Decide whether a predicted answer is mathematically equal to the reference.

    Parameters
    ----------
    predicted : str or None
        A bare answer such as ``\\frac{1}{2}``, ``(1, 2)`` or ``1,000``,
        typically the output of :func:`extract_answer`. ``None`` (nothing
        extracted) is always wrong.
    reference : str
        The bare gold answer; for GSM8K, the text after ``####``.

    Returns
    -------
    bool
        ``True`` if the answers are identical up to whitespace, ``$``
        delimiters and thousands separators, or if ``math-verify`` judges
        them equivalent.

    Raises
    ------
    TypeError
        If ``reference`` is not a ``str``, or ``predicted`` is neither a
        ``str`` nor ``None``.

    Notes
    -----
    Safe to call from any thread: off the main thread math-verify's
    signal-based timeouts are disabled rather than allowed to raise.
    """
    if not isinstance(reference, str):
        raise TypeError(f"reference must be str, got {type(reference).__name__}")
    if predicted is None:
        return False
    if not isinstance(predicted, str):
        raise TypeError(f"predicted must be str or None, got {type(predicted).__name__}")
    gold, pred = _normalise(reference), _normalise(predicted)
    if gold == pred:
        return bool(gold)
    if not gold or not pred:
        return False
    timeout = _timeout()
    gold_parsed, pred_parsed = _parse(gold, timeout), _parse(pred, timeout)
    if not gold_parsed or not pred_parsed:
        return False
    # verify is asymmetric: gold must come first.
    return verify(list(gold_parsed), list(pred_parsed), timeout_seconds=timeout)


def coverage_at_k(samples: int, correct: int, k: int) -> float:
    """The chance that at least one of ``k`` samples, drawn without replacement from
    ``samples`` of which ``correct`` are right, is right: ``1 - C(samples - correct, k) /
    C(samples, k)``, the unbiased estimator of pass@k (Chen et al. 2021, "Evaluating Large
    Language Models Trained on Code"). Coverage against the number of samples is the ceiling
    every verifier and vote is measured against (Brown et al. 2024, "Large Language Monkeys")."""
    for name, value in (("samples", samples), ("correct", correct), ("k", k)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise InvalidArgument(f"{name}: expected an integer >= 0, got {value!r}")
    if correct > samples or not 1 <= k <= samples:
        raise InvalidArgument(f"k: expected 1 <= k <= samples={samples} and correct <= samples, "
                              f"got k={k}, correct={correct}")
    if samples - correct < k:
        return 1.0
    # C(s - c, k) / C(s, k) as a product, without the huge binomials
    miss = 1.0
    for i in range(samples - correct + 1, samples + 1):
        miss *= 1.0 - k / i
    return 1.0 - miss
