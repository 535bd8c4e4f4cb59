"""Training examples for the toy models: token ids, which positions carry a loss, and batching.

Policy example: ``<s>`` + prompt + solution + ``</s>``; the loss is on the solution and the
``</s>`` (the model learns to write solutions, not problems).

PRM example: the Math-Shepherd text of a (possibly wrong) solution,
``math_shepherd_text("Q: <problem>", lines)``; the loss is at each step tag ``ки``, on the
``+`` (step right) or ``-`` (step wrong) token, as the Math-Shepherd PRM is trained. The PRM
also keeps language-modelling reference solutions in the same layout (:func:`prm_lm_example`).
For training only, a PRM example can carry result flags: at each digit of each step's result,
whether the result so far agrees with the true result of that step's own operands (the
intermediate judgement a step's tag label rests on).

Revision example: the layout :func:`ttscale.search.revisions.revision_context` builds, the prompt
then one to three earlier attempts, each followed by the separator ``"\n# another try:\n"``,
then the reference solution (or, for worked revisions, the solution with every product worked in
parts, :meth:`task.Problem.worked_solution`) and ``</s>``; the loss is on that last attempt only
(the earlier ones are what a chain holds: the policy's own samples, wrong ones in training, or
worked revisions; at test time they are whatever the chain wrote, right or wrong).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import Tensor

from ttscale.search.revisions import REVISION_SEPARATOR, revision_context
from ttscale.toy import task
from ttscale.toy.tokenizer import EOS, PAD, STEP_TAG, build_tokenizer
from ttscale.verifiers.formats import math_shepherd_text

GOOD, BAD = "+", "-"
_RESULT = re.compile(r"(?<![\d-])(\d+)([+\-*])(\d+)=(\d+)")  # a negative number is no result
# a product worked in parts (task.worked_step): its result is after the last "="
_WORKED = re.compile(r"(?<![\d-])(\d+)(\*)(\d+)"  # the product,
                     r"=\d+\*\d+(?:\+\d+\*\d+)+"  # its parts,
                     r"(?:=\d+(?:\+\d+)+)+=(\d+)(?!\d)")  # their sums, then its result


@dataclass(frozen=True)
class Vocab:
    pad: int
    eos: int
    step_tag: int
    good: int
    bad: int

    @classmethod
    def load(cls) -> Vocab:
        tok = build_tokenizer()
        return cls(*(tok.token_to_id(t) for t in (PAD, EOS, STEP_TAG, GOOD, BAD)))


@dataclass
class Example:
    """``ids [T]`` and, per position, the target token predicted there (-100: no loss); and
    optionally result flags per position: 0 a result digit that agrees so far, 1 one that does
    not, -100 anything else."""

    ids: list[int]
    targets: list[int]
    flags: list[int] | None = None


def policy_examples(problems: list[task.Problem]) -> list[Example]:
    tok, vocab = build_tokenizer(), Vocab.load()
    prompts = tok.encode_batch([p.prompt for p in problems])
    fulls = tok.encode_batch([p.prompt + p.solution() for p in problems])
    examples = []
    for prompt, full in zip(prompts, fulls, strict=True):
        ids = full.ids + [vocab.eos]
        # position j predicts ids[j + 1]; only solution tokens (and </s>) are targets
        targets = [-100] * (len(prompt.ids) - 1) + ids[len(prompt.ids) :] + [-100]
        examples.append(Example(ids, targets))
    return examples


def revision_example(problem: task.Problem, attempts: list[str], worked: bool = False) -> Example:
    """``attempts`` (earlier solutions, oldest first, without ``</s>``), then the reference
    (``worked``: worked in parts, :meth:`task.Problem.worked_solution`)."""
    return _after(revision_context(problem.prompt, attempts),
                  problem.worked_solution() if worked else problem.solution())


def worked_examples(problems: list[task.Problem]) -> list[Example]:
    """Each problem's prompt, the revision separator, then its worked solution (the loss on
    that): the format a revision writes, without the earlier attempt it revises."""
    return [_after(p.prompt + REVISION_SEPARATOR.lstrip("\n"), p.worked_solution())
            for p in problems]


def _after(context: str, text: str) -> Example:
    """``context`` then ``text`` and ``</s>``, the loss on ``text`` and ``</s>``."""
    tok, vocab = build_tokenizer(), Vocab.load()
    start = len(tok.encode(context).ids)
    ids = tok.encode(context + text).ids + [vocab.eos]
    return Example(ids, [-100] * (start - 1) + ids[start:] + [-100])


def solution_steps(solution: str) -> list[str]:
    """The lines of a solution that :func:`task.label_steps` labels, in order."""
    return task.step_lines(solution)


def prm_text(problem: task.Problem, steps: list[str]) -> str:
    """What the PRM reads: the question is the prompt without its trailing newline."""
    return math_shepherd_text(f"Q: {problem.text}", steps)


def prm_example(problem: task.Problem, solution: str, flags: bool = False) -> Example | None:
    """The solution's Math-Shepherd text with ``+``/``-`` targets at its step tags (None if no
    steps), and with ``flags``, its result flags."""
    steps = solution_steps(solution)
    if not steps:
        return None
    labels = task.label_steps(problem, solution)
    vocab = Vocab.load()
    text = prm_text(problem, steps)
    encoding = build_tokenizer().encode(text)
    ids = encoding.ids
    tags = [j for j, t in enumerate(ids) if t == vocab.step_tag]
    targets = [-100] * len(ids)
    for j, right in zip(tags, labels, strict=True):
        targets[j] = vocab.good if right else vocab.bad
    example = Example(ids, targets)
    if flags:
        token_at = {start: j for j, (start, end) in enumerate(encoding.offsets) if end > start}
        example.flags = [-100] * len(ids)
        for step in _results(text, len(f"Q: {problem.text} ")):
            true = str(task.apply(int(step[1]), step[2], int(step[3])))
            for k in range(len(step[4])):
                example.flags[token_at[step.start(4) + k]] = int(true[: k + 1] != step[4][: k + 1])
    return example


def _results(text: str, start: int) -> list[re.Match]:
    """Each step's operands and result in ``text`` from ``start``: a worked product's whole line
    (its result after the parts), any other step as written."""
    found = []
    for line in re.finditer(r"[^\n]+", text[start:]):
        a, b = start + line.start(), start + line.end()
        worked = _WORKED.match(text, a, b)
        found += [worked] if worked else list(_RESULT.finditer(text, a, b))
    return found


def slip_twins(problem: task.Problem, solution: str) -> tuple[list[str], list[str]] | None:
    """For a solution whose first wrong step is an arithmetic slip (:func:`task.first_slip`): the
    reference's steps up to that one with the true result, and the same with the slip. None for
    any other solution."""
    k = task.first_slip(problem, solution)
    if k is None:
        return None
    reference = problem.steps()
    return reference[: k + 1], reference[:k] + [solution_steps(solution)[k].strip()]


def prm_lm_example(problem: task.Problem) -> Example:
    """The reference solution in the PRM's layout, as language modelling: every token after the
    question is a target. Keeps the PRM computing the arithmetic it judges."""
    return prm_lm_examples([problem])[0]


def prm_lm_examples(problems: list[task.Problem], worked: bool = False) -> list[Example]:
    """:func:`prm_lm_example` of each problem, tokenized in one batch; ``worked``: of its worked
    solution (:meth:`task.Problem.worked_solution`), as a revision writes it."""
    tok = build_tokenizer()
    solutions = [p.worked_solution() if worked else p.solution() for p in problems]
    fulls = tok.encode_batch([prm_text(p, s.splitlines()) for p, s in zip(problems, solutions)])
    questions = tok.encode_batch([f"Q: {p.text} " for p in problems])
    examples = []
    for full, question in zip(fulls, questions, strict=True):
        ids, start = full.ids, len(question.ids)
        examples.append(Example(ids, [-100] * (start - 1) + ids[start:] + [-100]))
    return examples


def batch(examples: list[Example], pad: int) -> tuple[Tensor, Tensor]:
    """Right-padded ``ids [B, T]`` and ``targets [B, T]`` (padding is no target)."""
    width = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), width), pad, dtype=torch.long)
    targets = torch.full((len(examples), width), -100, dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, : len(e.ids)] = torch.tensor(e.ids)
        targets[i, : len(e.targets)] = torch.tensor(e.targets)
    return ids, targets


def batch_flags(examples: list[Example]) -> Tensor:
    """Right-padded result flags ``[B, T]`` (-100 where an example has none)."""
    width = max(len(e.ids) for e in examples)
    flags = torch.full((len(examples), width), -100, dtype=torch.long)
    for i, e in enumerate(examples):
        if e.flags is not None:
            flags[i, : len(e.flags)] = torch.tensor(e.flags)
    return flags
