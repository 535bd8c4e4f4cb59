"""The embedded task: multi-step integer arithmetic, solved one operation per line.

A problem chains 2 to 5 operations left to right, written with explicit parentheses so the
order is unambiguous::

    Q: ((37+48)*3)-12
    37+48=85
    85*3=255
    255-12=243
    answer: 243

A revision (:func:`worked_solution`) writes each product in parts, the way one checks a
multiplication by hand, and the other steps as above::

    85*37=80*30+80*7+5*30+5*7=2400+560+150+35=2960+150+35=3110+35=3145

Operands have 1 or 2 digits; every intermediate result lies in [0, 9999]. A problem's
difficulty is its number of operations and of two-digit operands; the demo reports accuracy by
``level`` (1 to 4), see :func:`difficulty_level`. Train and held-out problems are disjoint: a
problem's split is a hash of its text.
"""

from __future__ import annotations

import random
import re
import zlib
from dataclasses import dataclass

from ttscale.errors import InvalidArgument

OPS = ("+", "-", "*")
MAX_VALUE = 9999
MAX_OPS = 5  # operations in a problem: 2 to MAX_OPS
STEP_DELIMITER = "\n"
HELD_OUT_FRACTION = 0.2

# a step: operands, operator, then its result after the last "=" (a worked product's parts before)
_STEP = re.compile(r"^(\d+)([+\-*])(\d+)=(?:[\d+*=]*=)?(\d+)$")
_ANSWER = re.compile(r"^answer: (\d+)$")


@dataclass(frozen=True)
class Problem:
    first: int
    ops: tuple[tuple[str, int], ...]  # (operator, operand) applied left to right

    @property
    def text(self) -> str:
        expr = str(self.first)
        for i, (op, operand) in enumerate(self.ops):
            expr = f"{expr}{op}{operand}" if i == 0 else f"({expr}){op}{operand}"
        return expr

    @property
    def prompt(self) -> str:
        return f"Q: {self.text}\n"

    def steps(self) -> list[str]:
        lines, value = [], self.first
        for op, operand in self.ops:
            result = apply(value, op, operand)
            lines.append(f"{value}{op}{operand}={result}")
            value = result
        return lines

    @property
    def answer(self) -> int:
        value = self.first
        for op, operand in self.ops:
            value = apply(value, op, operand)
        return value

    def solution(self) -> str:
        return "".join(s + STEP_DELIMITER for s in self.steps()) + f"answer: {self.answer}\n"

    def worked_solution(self) -> str:
        """The solution with every product worked in parts (:func:`worked_step`): what a revision
        writes."""
        return _solution(self, {})

    @property
    def num_ops(self) -> int:
        return len(self.ops)

    @property
    def two_digit_operands(self) -> int:
        return sum(v >= 10 for v in [self.first, *(o for _, o in self.ops)])

    @property
    def level(self) -> int:
        return difficulty_level(self)

    @property
    def split(self) -> str:
        """``"heldout"`` or ``"train"``, fixed by the problem's text."""
        bucket = zlib.crc32(self.text.encode()) % 1000
        return "heldout" if bucket < HELD_OUT_FRACTION * 1000 else "train"


def apply(a: int, op: str, b: int) -> int:
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    raise InvalidArgument(f"op: expected one of {OPS}, got {op!r}")


def difficulty_level(problem: Problem) -> int:
    """1 (two operations, mostly small numbers) to 4 (five operations, or four with large numbers)."""
    score = problem.num_ops - 2 + (problem.two_digit_operands >= problem.num_ops)
    return max(1, min(4, score + 1))


def random_problem(rng: random.Random, num_ops: int | None = None) -> Problem:
    """One problem whose intermediate results stay in [0, MAX_VALUE]."""
    num_ops = num_ops if num_ops is not None else rng.randint(2, MAX_OPS)
    while True:
        value = _operand(rng)
        first, ops = value, []
        for _ in range(num_ops):
            choices = [
                (op, b)
                for op in OPS
                for b in [_operand(rng)]
                if 0 <= apply(value, op, b) <= MAX_VALUE and not (op == "*" and (b < 2 or value == 0))
            ]
            if not choices:
                break
            op, b = rng.choice(choices)
            ops.append((op, b))
            value = apply(value, op, b)
        if len(ops) == num_ops:
            return Problem(first, tuple(ops))


def _operand(rng: random.Random) -> int:
    return rng.randint(1, 9) if rng.random() < 0.5 else rng.randint(10, 99)


def problems(split: str, count: int, seed: int = 0) -> list[Problem]:
    """``count`` distinct problems of ``split`` (``"train"`` or ``"heldout"``), reproducible from ``seed``."""
    if split not in ("train", "heldout"):
        raise InvalidArgument(f"split: expected 'train' or 'heldout', got {split!r}")
    if count < 0:
        raise InvalidArgument(f"count: expected >= 0, got {count}")
    rng = random.Random(f"{split}:{seed}")
    seen: set[str] = set()
    out: list[Problem] = []
    while len(out) < count:
        problem = random_problem(rng)
        if problem.split == split and problem.text not in seen:
            seen.add(problem.text)
            out.append(problem)
    return out


def parse_problem(text: str) -> Problem:
    """Inverse of :attr:`Problem.text` (also accepts the ``Q: ...`` prompt)."""
    expr = text.strip().removeprefix("Q:").strip().replace("(", "").replace(")", "")
    tokens = re.findall(r"\d+|[+\-*]", expr)
    if len(tokens) < 3 or len(tokens) % 2 == 0:
        raise InvalidArgument(f"text: not an arithmetic chain: {text!r}")
    first = int(tokens[0])
    ops = tuple((tokens[i], int(tokens[i + 1])) for i in range(1, len(tokens), 2))
    return Problem(first, ops)


def step_lines(solution: str) -> list[str]:
    """The lines of a solution that :func:`label_steps` labels (its non-blank lines), in order."""
    return [line for line in solution.split(STEP_DELIMITER) if line.strip()]


def label_steps(problem: Problem, solution: str) -> list[bool]:
    """Whether each step of a (possibly wrong) solution is right.

    A step is right when its arithmetic is right and it follows from the previous ones: it
    applies the problem's next operation to the previous correct result. Once a step is wrong,
    every later step is wrong too (it builds on a wrong state). The final ``answer:`` line is a
    step: right when it states the problem's answer after right steps.
    """
    lines = step_lines(solution)
    labels: list[bool] = []
    value, ok = problem.first, True
    for i, line in enumerate(lines):
        step = _STEP.match(line.strip())
        answer = _ANSWER.match(line.strip())
        if ok and step and i < problem.num_ops:
            a, op, b, result = int(step[1]), step[2], int(step[3]), int(step[4])
            want_op, want_b = problem.ops[i]
            ok = a == value and op == want_op and b == want_b and result == apply(a, op, b)
            value = result
        elif ok and answer and i == problem.num_ops:
            ok = int(answer[1]) == problem.answer
        else:
            ok = False
        labels.append(ok)
    return labels


def first_slip(problem: Problem, solution: str) -> int | None:
    """The index of a solution's first wrong step when that step is an arithmetic slip: it applies
    the problem's next operation to the right value and writes a wrong result. None when the
    solution has no wrong step, or its first one is wrong some other way (a copy error, a
    missing or malformed step, a wrong answer line)."""
    labels = label_steps(problem, solution)
    if all(labels):
        return None
    k = labels.index(False)
    if k >= problem.num_ops:
        return None
    step = _STEP.match(step_lines(solution)[k].strip())
    want = problem.steps()[k]
    return k if step and f"{step[1]}{step[2]}{step[3]}" == want.partition("=")[0] else None


def near_miss(value: int, rng: random.Random) -> int:
    """A different number in [0, MAX_VALUE] close to ``value`` the way an arithmetic slip is: one
    digit changed (60%), or off by a small amount or a power of ten."""
    text = str(value)
    if rng.random() < 0.6:
        j = rng.randrange(len(text))
        leading_zero = j == 0 and len(text) > 1
        digits = [d for d in "0123456789" if d != text[j] and not (leading_zero and d == "0")]
        return int(text[:j] + rng.choice(digits) + text[j + 1 :])
    wrong = value + rng.choice([-1, 1]) * rng.choice([1, 2, 9, 10, 11, 20, 100])
    if 0 <= wrong <= MAX_VALUE:
        return wrong
    return value + 10 if value + 10 <= MAX_VALUE else value - 10


def corrupt_solution(problem: Problem, rng: random.Random) -> str:
    """The reference solution with one step made wrong the way a policy errs: its result a near
    miss (60%), or its first operand (25%) or its second (15%) copied wrong with the arithmetic
    on it right. Later steps build on the wrong value, as the rest of a sample that slipped
    does (and may leave [0, MAX_VALUE] as it may), so every step from the wrong one on is wrong
    (:func:`label_steps`)."""
    bad, kind = rng.randrange(problem.num_ops), rng.random()
    value, lines = problem.first, []
    for k, (op, b) in enumerate(problem.ops):
        a = value
        if k == bad:
            if 0.6 <= kind < 0.85:
                a = near_miss(value, rng)
            elif kind >= 0.85:
                b = near_miss(b, rng)
            if not (0 <= apply(a, op, b) <= MAX_VALUE and b < 100):  # no such copy error: a slip
                a, b, kind = value, problem.ops[k][1], 0.0
        result = apply(a, op, b)
        if k == bad and kind < 0.6:
            result = near_miss(result, rng)
        lines.append(f"{a}{op}{b}={result}")
        value = result
    return "".join(line + STEP_DELIMITER for line in lines) + f"answer: {value}\n"


def places(value: int) -> list[int]:
    """The nonzero place values of a non-negative integer, largest first: 405 -> [400, 5]."""
    text = str(value)
    return [int(d) * 10 ** (len(text) - 1 - i) for i, d in enumerate(text) if d != "0"]


def worked_step(a: int, op: str, b: int, slip: random.Random | None = None) -> tuple[str, int]:
    """A step's line and result, a product of more than one part worked by hand: the parts,
    their values, then the sum of the first two values at a time::

        48*9=40*9+8*9=360+72=432

    Each move is a one-digit product with its zeros, or one addition of two numbers.
    ``slip``: a slip is made, the way a policy errs, with this generator: one part's value a
    near miss (:func:`near_miss`, carried through the sums) or, for a step with one part, the
    result itself. Sums, differences and products outside [0, MAX_VALUE] are written plainly.
    """
    result = apply(a, op, b)
    in_parts = op == "*" and 0 < a <= MAX_VALUE
    parts = [x * y for x in places(a) for y in places(b)] if in_parts else []
    if len(parts) < 2:
        if slip is not None:
            result = near_miss(result, slip) if 0 <= result <= MAX_VALUE else result + 1
        return f"{a}{op}{b}={result}", result
    if slip is not None:
        k = slip.randrange(len(parts))
        parts[k] = near_miss(parts[k], slip)
    line = f"{a}*{b}=" + "+".join(f"{x}*{y}" for x in places(a) for y in places(b))
    while len(parts) > 1:
        line += "=" + "+".join(map(str, parts))
        parts = [parts[0] + parts[1], *parts[2:]]
    return f"{line}={parts[0]}", parts[0]


def worked_slip_solution(problem: Problem, rng: random.Random) -> str:
    """:meth:`Problem.worked_solution` with one step slipped (:func:`worked_step`), the later
    steps built on its wrong result: a wrong revision, as a policy that revises writes one."""
    return _solution(problem, {rng.randrange(problem.num_ops): rng})


def _solution(problem: Problem, slips: dict[int, random.Random]) -> str:
    lines, value = [], problem.first
    for k, (op, b) in enumerate(problem.ops):
        line, value = worked_step(value, op, b, slips.get(k))
        lines.append(line)
    return "".join(line + STEP_DELIMITER for line in lines) + f"answer: {value}\n"


def final_answer(solution: str) -> str | None:
    """The number after the last ``answer:``, or None."""
    found = re.findall(r"answer:\s*(-?\d+)", solution)
    return found[-1] if found else None
