"""Measure the toy models: policy accuracy by level, PRM step-label quality, best-of-N with the PRM.

Sampling goes through :class:`ttscale.llm.LLM` (the engine the demo uses); PRM scores come from
one plain forward pass of the training model over each solution's Math-Shepherd text, reading
P(+) = softmax over the ``+``/``-`` logits at each step tag.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from pathlib import Path

import torch

from ttscale.llm import LLM
from ttscale.sampling_params import SamplingParams
from ttscale.toy import task
from ttscale.toy.data import (
    Example,
    Vocab,
    batch,
    prm_example,
    prm_text,
    slip_twins,
    solution_steps,
)
from ttscale.toy.model import TinyLlama
from ttscale.toy.tokenizer import build_tokenizer

MAX_SOLUTION_TOKENS = 128
MAX_REVISION_TOKENS = 256  # a revision works its products in parts (task.worked_step)


def sample(
    model_dir: Path, problems: list[task.Problem], n: int, temperature: float, seed: int
) -> list[list[str]]:
    """``n`` solutions per problem from the policy saved in ``model_dir``."""
    llm = LLM(model_dir, device="cpu", seed=seed, kv_budget_bytes=256 << 20)
    params = SamplingParams(n=n, temperature=temperature, max_tokens=MAX_SOLUTION_TOKENS, seed=seed)
    outputs = llm.generate([p.prompt for p in problems], params, use_tqdm=False)
    return [[c.text for c in out.outputs] for out in outputs]


def is_correct(problem: task.Problem, solution: str) -> bool:
    return task.final_answer(solution) == str(problem.answer)


def accuracy_by_level(problems: list[task.Problem], solutions: list[str]) -> dict[str, float]:
    """``{"all": ..., "1": ..., "4": ...}``: the fraction of correct final answers."""
    right: dict[str, list[bool]] = defaultdict(list)
    for problem, solution in zip(problems, solutions, strict=True):
        ok = is_correct(problem, solution)
        right["all"].append(ok)
        right[str(problem.level)].append(ok)
    return {k: round(sum(v) / len(v), 4) for k, v in sorted(right.items())}


@torch.no_grad()
def step_scores(prm: TinyLlama, examples: list[Example], batch_size: int = 256) -> list[list[float]]:
    """P(+) at each step tag of each example."""
    vocab = Vocab.load()
    prm.eval()
    scores = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        ids, targets = batch(chunk, vocab.pad)
        logits = prm(ids)[..., [vocab.good, vocab.bad]]
        p_good = logits.float().softmax(-1)[..., 0]
        scores += [p_good[i][targets[i] != -100].tolist() for i in range(len(chunk))]
    return scores


def prm_quality(prm: TinyLlama, problems: list[task.Problem], samples: list[list[str]]) -> dict:
    """Step-label accuracy (threshold 0.5), balanced accuracy and AUC over every labelled step,
    and how the PRM ranks the true result of each arithmetic slip (:func:`arithmetic_slips`)."""
    examples = [prm_example(p, s) for p, group in zip(problems, samples) for s in group]
    examples = [e for e in examples if e is not None]
    vocab = Vocab.load()
    labels = [t == vocab.good for e in examples for t in e.targets if t != -100]
    scores = [s for row in step_scores(prm, examples) for s in row]
    predicted = [s > 0.5 for s in scores]
    hits = Counter((label, guess) for label, guess in zip(labels, predicted))
    positives, negatives = labels.count(True), labels.count(False)
    return {
        "steps": len(labels),
        "positive_fraction": round(positives / len(labels), 4),
        "accuracy": round((hits[True, True] + hits[False, False]) / len(labels), 4),
        "balanced_accuracy": round(
            0.5 * hits[True, True] / max(positives, 1) + 0.5 * hits[False, False] / max(negatives, 1), 4
        ),
        "auc": round(auc(scores, labels), 4),
        "arithmetic_slips": arithmetic_slips(prm, problems, samples),
    }


def arithmetic_slips(prm: TinyLlama, problems: list[task.Problem],
                     samples: list[list[str]]) -> dict:
    """Does the PRM read a step's result? On each distinct arithmetic slip in the samples (the
    first wrong step of a solution, with the right operands and a wrong result), its score of
    that step against the same step with the true result, both after the right earlier steps:
    ``right_above_wrong`` is the fraction of pairs where the true result scores higher (ties
    count half; a PRM blind to results gets 0.5; None when the samples hold no slip)."""
    twins: dict[tuple[str, str], tuple[Example, Example]] = {}
    for problem, group in zip(problems, samples, strict=True):
        for solution in group:
            pair = slip_twins(problem, solution)
            if pair is None:
                continue
            right, wrong = pair
            if (problem.text, wrong[-1]) not in twins:  # each distinct slip once
                twins[problem.text, wrong[-1]] = (_steps_example(problem, right),
                                                  _steps_example(problem, wrong))
    pairs = list(twins.values())
    scores = step_scores(prm, [e for pair in pairs for e in pair])
    wins = sum(1.0 if r[-1] > w[-1] else 0.5 if r[-1] == w[-1] else 0.0
               for r, w in zip(scores[0::2], scores[1::2], strict=True))
    ranked = round(wins / len(pairs), 4) if pairs else None
    return {"pairs": len(pairs), "right_above_wrong": ranked}


def _steps_example(problem: task.Problem, steps: list[str]) -> Example:
    """``steps`` as a solution's PRM example (its tags are where :func:`step_scores` reads)."""
    example = prm_example(problem, "".join(step + task.STEP_DELIMITER for step in steps))
    assert example is not None  # at least one step
    return example


def auc(scores: list[float], labels: list[bool]) -> float:
    """Probability that a random right step scores above a random wrong one (ties count half)."""
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    ranks = [0.0] * len(scores)
    i = 0
    while i < len(order):  # average ranks over ties
        j = i
        while j + 1 < len(order) and scores[order[j + 1]] == scores[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    positives = sum(labels)
    negatives = len(labels) - positives
    if positives == 0 or negatives == 0:
        return float("nan")
    rank_sum = sum(r for r, label in zip(ranks, labels) if label)
    return (rank_sum - positives * (positives + 1) / 2) / (positives * negatives)


def search_preview(
    prm: TinyLlama,
    problems: list[task.Problem],
    samples: list[list[str]],
    greedy: list[str],
    sizes: tuple[int, ...],
    reference_lm: TinyLlama | None = None,
) -> dict:
    """Accuracy of greedy, majority vote and best-of-N by several scores, for each N.

    The scores: the PRM's (its minimum step score, and its last); ``oracle``, the exact step
    labels (the most any PRM can reach with this pool); and, with ``reference_lm``, that
    language model's likelihood of each step (:func:`likelihood_step_scores`), aggregated by
    the minimum, which shows how much of the checking a model of the PRM's size already
    holds. Every N takes the first N samples of one pool per problem, as the demo does.
    """
    step_rows = {"prm": [step_scores(prm, [prm_example(p, s) or _empty() for s in group])
                         for p, group in zip(problems, samples)],
                 "oracle": [[[float(x) for x in task.label_steps(p, s)] for s in group]
                            for p, group in zip(problems, samples)]}
    if reference_lm is not None:
        step_rows["reference_lm"] = likelihood_step_scores(reference_lm, problems, samples)
    scorers = {"prm_min": ("prm", min), "prm_last": ("prm", lambda s: s[-1]),
               "oracle": ("oracle", min), "reference_lm_min": ("reference_lm", min)}
    scorers = {name: rule for name, rule in scorers.items() if rule[0] in step_rows}
    result: dict = {"greedy": accuracy_by_level(problems, greedy)["all"], "pass@n": {},
                    "majority": {}, **{name: {} for name in scorers}}
    for n in sizes:
        picks: dict[str, list[str]] = defaultdict(list)
        covered = []
        for i, (problem, group) in enumerate(zip(problems, samples, strict=True)):
            group = group[:n]
            covered.append(any(is_correct(problem, s) for s in group))
            picks["majority"].append(_majority(group))
            for name, (source, agg) in scorers.items():
                rows = step_rows[source][i][:n]
                picks[name].append(_best(group, [agg(r) if r else 0.0 for r in rows]))
        result["pass@n"][n] = round(sum(covered) / len(covered), 4)
        for name, chosen in picks.items():
            result[name][n] = accuracy_by_level(problems, chosen)["all"]
    return result


@torch.no_grad()
def likelihood_step_scores(lm: TinyLlama, problems: list[task.Problem],
                           samples: list[list[str]]) -> list[list[list[float]]]:
    """Per problem, per sample, per step: the probability ``lm`` gives the step's text (its
    tokens after the previous tag's newline, up to the space before its tag), read from one
    forward pass over the solution's Math-Shepherd text."""
    vocab, tok = Vocab.load(), build_tokenizer()
    lm.eval()
    out = []
    for problem, group in zip(problems, samples, strict=True):
        question = len(tok.encode(f"Q: {problem.text} ").ids)
        texts = [prm_text(problem, solution_steps(s)) for s in group]
        encoded = [tok.encode(t).ids for t in texts]
        ids, _ = batch([Example(e, [-100] * len(e)) for e in encoded], vocab.pad)
        # token j + 1's log-probability, predicted at position j
        token_lp = lm(ids).float().log_softmax(-1)[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]
        rows = []
        for i, e in enumerate(encoded):
            tags = [j for j, t in enumerate(e) if t == vocab.step_tag]
            starts = ([question] + [t + 2 for t in tags])[: len(tags)]  # after a tag's newline
            rows.append([math.exp(token_lp[i, a - 1 : t - 2].sum().item())
                         for a, t in zip(starts, tags, strict=True)])
        out.append(rows)
    return out


def _majority(group: list[str]) -> str:
    answers = [task.final_answer(s) for s in group]
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return group[0]
    top = counts.most_common(1)[0][0]
    return group[answers.index(top)]


def _best(group: list[str], scores: list[float]) -> str:
    return group[max(range(len(group)), key=lambda i: scores[i])]


def _empty() -> Example:
    return Example([Vocab.load().pad], [-100])
