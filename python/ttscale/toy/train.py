"""Train the embedded policy and PRM on the CPU: ``python -m ttscale.toy.train [--out DIR]``.

Phases, each timed:

1. base: a ~1M-parameter Llama learns to write solutions of train-split problems, in the policy's
   layout, in the PRM's (Math-Shepherd) layout and, for a ``base_revisions`` share, worked in
   parts after the revision separator (the arithmetic a revision does, see below). Its
   checkpoint at ``policy_step`` becomes the policy: stopped early on purpose, so that it still
   makes real mistakes (search has something to fix). The run goes on to ``base_steps``; that
   more trained model is where the PRM starts (a verifier that knows more arithmetic than the
   policy, as a larger PRM does at scale). At the policy's checkpoint the base grows by a layer,
   and the steps after it train on problems with at least two multiplications, the operation
   whose results a PRM fails to check;
2. revisions: the policy samples solutions of train problems at a high temperature; chains of one
   to three attempts, its own wrong one first, then worked revisions right or with a slip, end
   in the worked reference solution and teach the policy to revise in the layout of
   :func:`ttscale.search.revisions.revision_context`; plain solutions are mixed in;
3. samples: the final policy writes solutions of other train problems at temperature 1 (through
   the engine, :class:`ttscale.llm.LLM`), each step labelled exactly by :func:`task.label_steps`;
4. PRM: the base model, grown by two layers, fine-tuned as a Math-Shepherd PRM (the base's own
   layers at a tenth of the rate of the added ones, so that it keeps the arithmetic it judges
   with) on those samples and on reference solutions with one step made wrong (some worked in
   parts, as a wrong revision is): at every step tag, cross-entropy between the ``+`` and ``-``
   logits, classes weighted to balance; the same at each result digit (does the result so far
   agree with its operands); a hint that trains the added layers to read the base's prediction
   one position back (what checking a written digit compares it with, see
   :class:`PRMObjective`); and language modelling of reference solutions, some worked;
5. evaluation on held-out problems: policy accuracy by level, first attempts against revised
   ones (:func:`ttscale.revisions`) and how often a revision is right after a right and after a
   wrong attempt, beside the same for two independent samples (a revision that ignores the
   earlier attempt), PRM step-label accuracy and AUC and whether it reads a step's result, and
   a preview of best-of-N with the PRM against majority vote and greedy, beside two yardsticks
   for the PRM: the exact step labels (its ceiling on the same pool) and the base model's own
   likelihood of each step (how much checking the model the PRM starts from already holds).

Worked revisions (issue 8): a revision writes every product in parts
(:meth:`task.Problem.worked_solution`: one-digit products, then sums two at a time), which the
policy gets right far more often than a whole product, so a revision can be right where its
first attempt was not. What it took (seed 0, 2026-11-24, one T=1 chain of four attempts on 200
held-out problems):

- revision chains of the policy's own wrong attempts ending in the plain reference (the recipe
  shipped before): revised attempts no better than first ones (36.5% first, 33 / 34.5 / 27.5%
  after);
- worked revisions taught by the revision phase alone (``base_revisions=0``): the policy writes
  the format but not its arithmetic (``7*9=14``): 31% first, 22.5 / 16 / 13.5% after;
- the base learning worked solutions with a quarter of its examples, the policy's checkpoint at
  step 1600 of 3200: 49.5% first, 68 / 60 / 57% after, but the policy got good enough (greedy
  57%) that no search at N=64 was 20 points above greedy;
- the same with the policy's checkpoint at step 1200 of 2800 (the PRM's base keeps its 1600
  multiplication-rich steps) and half as many worked examples for the PRM, the shipped recipe:
  38% first, 62 / 54.5 / 56% after (a revision after a wrong attempt is right 33% of the time,
  an independent sample 10.5%); greedy 45.75%, temperature 1 38.75% on 400 problems. The run
  took 2,539 s on a machine that ran the base's 1,600 steps after the checkpoint (the same work
  in every recipe since issue 7) at 0.40 s/step, against 0.27 on the machine of the earlier
  runs: about 1,715 s (28.6 min) there.

Everything is drawn from ``--seed`` with fixed step counts, so a run is reproducible (on the same
torch version and thread count). ``--minutes`` is a nominal budget on 2 cores that scales the
step and sample counts; it never reads the clock, so a slow machine trains the same models.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import ttscale
from ttscale.errors import InvalidArgument
from ttscale.llm import LLM
from ttscale.sampling_params import SamplingParams
from ttscale.toy import task
from ttscale.toy.data import (
    Example,
    Vocab,
    batch,
    batch_flags,
    policy_examples,
    prm_example,
    prm_lm_examples,
    revision_example,
    worked_examples,
)
from ttscale.toy.evaluate import (
    MAX_REVISION_TOKENS,
    accuracy_by_level,
    is_correct,
    prm_quality,
    sample,
    search_preview,
)
from ttscale.toy.model import TinyConfig, TinyLlama
from ttscale.toy.tokenizer import build_tokenizer

THREADS = 2
DEFAULT_OUT = Path(__file__).parent


@dataclass(frozen=True)
class Recipe:
    """Everything a run depends on besides the seed. ``NOMINAL`` is the shipped models' recipe."""

    hidden_size: int = 128
    intermediate_size: int = 384
    num_layers: int = 4
    num_heads: int = 4
    max_positions: int = 1024  # room for a revision chain: the prompt and four worked attempts
    batch_size: int = 64
    base_steps: int = 2800
    policy_step: int = 1200  # the policy is the base run at this step
    base_lr: float = 3e-3
    base_revisions: float = 0.25  # share of the base's examples to the policy's that are worked
    prm_base_revisions: float = 0.0  # the same share in the base's steps after it (the PRM's)
    revision_problems: int = 4000  # train problems whose samples make the revision chains
    revision_samples: int = 3
    revision_temperature: float = 1.3
    revision_steps: int = 1000
    revision_lr: float = 2e-3
    revision_worked: bool = True  # a revision works its products in parts
    revision_worked_right: float = 0.5  # a chain's later attempts are worked: right this often
    prm_problems: int = 2500  # train problems the final policy samples for the PRM's data
    prm_samples: int = 4  # samples per problem
    prm_temperature: float = 1.0
    prm_base_multiplications: int = 2  # after policy_step: problems with this many multiplications
    prm_base_grown_layers: int = 1  # the base grows by these at policy_step (the PRM's only)
    prm_extra_layers: int = 2  # decoder layers the PRM adds on top of the base model's
    prm_base_lr_scale: float = 0.1  # the base's embeddings and layers learn at this times prm_lr
    prm_corrupted: int = 8000  # reference solutions of other train problems with one step wrong
    prm_worked: int = 1000  # of those, worked in parts with a slip (as a wrong revision is)
    prm_lm_problems: int = 4000  # reference solutions the PRM keeps language-modelling
    prm_lm_worked: int = 500  # of those, worked in parts
    prm_steps: int = 1500
    prm_lr: float = 3e-3
    prm_lm_weight: float = 0.5
    prm_flag_weight: float = 1.0
    prm_hint_weight: float = 1.0
    eval_problems: int = 400  # held-out problems for pass@1
    revision_eval_problems: int = 200  # held-out problems for first against revised attempts
    revision_eval_attempts: int = 4
    preview_problems: int = 100
    preview_n: int = 16

    def scaled(self, factor: float) -> Recipe:
        """The same recipe with work counts multiplied by ``factor`` (at least one of each)."""
        counts = ("base_steps", "policy_step", "revision_problems", "revision_steps", "prm_problems",
                  "prm_corrupted", "prm_worked", "prm_lm_problems", "prm_lm_worked", "prm_steps",
                  "eval_problems", "revision_eval_problems", "preview_problems")
        return Recipe(**{**asdict(self), **{k: max(1, round(getattr(self, k) * factor)) for k in counts}})


NOMINAL = Recipe()


NOMINAL_MINUTES = 29.0  # what NOMINAL takes on 2 cores (estimated, see the docstring)
# A recipe whose every phase takes a second or two: the smoke test of the script.
TINY = Recipe(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, batch_size=8,
              base_steps=6, policy_step=4, revision_problems=4, revision_samples=2, revision_steps=3,
              prm_problems=4, prm_samples=2, prm_extra_layers=1, prm_corrupted=4, prm_worked=2,
              prm_lm_problems=4, prm_lm_worked=2,
              prm_steps=5, eval_problems=8, revision_eval_problems=4,
              revision_eval_attempts=2, preview_problems=4, preview_n=2)


def fit(model: TinyLlama, examples: list[Example], *, steps: int, batch_size: int, lr: float,
        seed: int, loss_fn, name: str, slow: tuple[list[nn.Parameter], float] | None = None,
        stop: int | None = None, schedule: tuple[int, int] | None = None) -> list[float]:
    """AdamW with linear warm-up and cosine decay; batches drawn in a seeded order, epoch by epoch.

    ``loss_fn(model, examples) -> loss`` of one batch; when it is a module (an objective with
    heads of its own), its parameters train too. ``slow=(parameters, scale)``: those learn at
    ``scale`` times the rate of the others. ``stop``: end after that many of the ``steps``, with
    the batches and rates of the whole run (a checkpoint of it). ``schedule=(offset, total)``:
    the cosine is that of a run of ``total`` steps from step ``offset`` (the continuation of one,
    with a warm-up of its own for the fresh optimizer)."""
    offset, total = schedule if schedule is not None else (0, steps)
    if not (0 <= offset and offset + steps <= total):
        raise InvalidArgument(f"schedule: expected 0 <= offset and offset + {steps} steps <= total, "
                         f"got {schedule}")
    generator = torch.Generator().manual_seed(seed)
    parameters = list(model.parameters())
    if isinstance(loss_fn, nn.Module):
        parameters += list(loss_fn.parameters())
    slow_ids = {id(p) for p in slow[0]} if slow is not None else set()
    groups = [{"params": [p for p in parameters if id(p) not in slow_ids], "scale": 1.0}]
    if slow_ids:
        groups.append({"params": [p for p in parameters if id(p) in slow_ids], "scale": slow[1]})
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    batches = _batches(examples, steps, batch_size, generator)[:stop]
    losses = []
    model.train()
    start = time.perf_counter()
    for step, chosen in enumerate(batches):
        loss = loss_fn(model, [examples[i] for i in chosen])
        for group in optimizer.param_groups:
            group["lr"] = lr * lr_scale(step, steps, offset, total) * group["scale"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        losses.append(loss.item())
        if (step + 1) % max(1, steps // 10) == 0:
            recent = losses[-max(1, steps // 10):]
            rate = (time.perf_counter() - start) / (step + 1)
            print(f"  {name} step {step + 1}/{steps}  loss {sum(recent) / len(recent):.4f}  "
                  f"{rate:.2f} s/step", flush=True)
    model.eval()
    return losses


def lr_scale(step: int, steps: int, offset: int = 0, total: int | None = None) -> float:
    """The rate of ``step`` (from 0) of a fit of ``steps``, as a fraction of the peak: a linear
    warm-up over its first twentieth, times a cosine from 1 down to 0.1 over a run of ``total``
    steps (default ``steps``) of which this fit starts at step ``offset``."""
    total = steps if total is None else total
    warmup = max(1, steps // 20)
    cosine = 0.55 + 0.45 * math.cos(math.pi * (offset + step) / total)
    return min(1.0, (step + 1) / warmup) * cosine


def _batches(examples: list[Example], steps: int, batch_size: int, generator) -> list[list[int]]:
    """``steps`` batches of example indices, epoch after epoch in a seeded order.

    Each run of 16 batches is sorted by length before it is cut, so a batch pads little.
    """
    order: list[int] = []
    while len(order) < steps * batch_size:
        order += torch.randperm(len(examples), generator=generator).tolist()
    span = 16 * batch_size
    batches = []
    for start in range(0, steps * batch_size, span):
        run = sorted(order[start : min(start + span, steps * batch_size)],
                     key=lambda i: len(examples[i].ids))
        batches += [run[i : i + batch_size] for i in range(0, len(run), batch_size)]
    shuffled = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in shuffled]


def policy_loss(model: TinyLlama, examples: list[Example]) -> Tensor:
    """Language modelling: cross-entropy at every position with a target."""
    ids, targets = batch(examples, Vocab.load().pad)
    return F.cross_entropy(model(ids).flatten(0, 1), targets.flatten(), ignore_index=-100)


class PRMObjective(nn.Module):
    """The PRM's training loss, for a model whose top ``judge_layers`` layers were added to a
    base language model (:meth:`TinyLlama.grown`):

    - at each step tag with a label: class-weighted cross-entropy between the ``+`` and ``-``
      logits (the Math-Shepherd objective, the only output the PRM is read by);
    - ``flag_weight`` times the same two-logit cross-entropy at each result digit of an example
      with result flags: does the result so far agree with its operands' true result;
    - ``hint_weight`` times a copy hint: the first added layer, read through a linear head of
      this objective's own, predicts at each position what the base layers predicted at the
      position before (KL divergence to their distribution, held fixed). Spotting a slip at a
      result digit means comparing that digit with the prediction made one position earlier;
      the hint trains the previous-position read that comparison needs, which the tag and flag
      labels alone teach only after a long plateau. The head is discarded after training;
    - ``lm_weight`` times language modelling at every other position with a target.
    """

    def __init__(self, model: TinyLlama, judge_layers: int, class_weights: Tensor, *,
                 lm_weight: float, flag_weight: float, hint_weight: float):
        super().__init__()
        self.vocab = Vocab.load()
        self.base_layers = model.config.num_layers - judge_layers
        self.copy_head = nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=False)
        self.register_buffer("class_weights", class_weights)
        self.lm_weight, self.flag_weight, self.hint_weight = lm_weight, flag_weight, hint_weight

    def forward(self, model: TinyLlama, examples: list[Example]) -> Tensor:
        vocab = self.vocab
        ids, targets = batch(examples, vocab.pad)
        flags = batch_flags(examples)
        hidden = model.hidden_states(ids)
        logits = model.logits_at(hidden[-1])
        two = logits[..., [vocab.good, vocab.bad]]
        labelled = (ids == vocab.step_tag) & ((targets == vocab.good) | (targets == vocab.bad))
        modelled = (targets != -100) & ~labelled
        flagged = flags != -100
        total = logits.new_zeros(())
        if labelled.any():
            total = total + F.cross_entropy(two[labelled], (targets[labelled] == vocab.bad).long(),
                                            weight=self.class_weights)
        if modelled.any() and self.lm_weight:
            total = total + self.lm_weight * F.cross_entropy(logits[modelled], targets[modelled])
        if flagged.any() and self.flag_weight:
            total = total + self.flag_weight * F.cross_entropy(two[flagged], flags[flagged])
        if self.hint_weight and 0 < self.base_layers < len(hidden):
            earlier = model.logits_at(hidden[self.base_layers - 1])[:, :-1].detach().log_softmax(-1)
            read = self.copy_head(model.model.norm(hidden[self.base_layers]))[:, 1:].log_softmax(-1)
            kl = (earlier.exp() * (earlier - read)).sum(-1)
            total = total + self.hint_weight * kl[ids[:, 1:] != vocab.pad].mean()
        return total


def train_base(config: TinyConfig, recipe: Recipe, seed: int, policy_dir: Path,
               problems: list[task.Problem], later: list[task.Problem]) -> TinyLlama:
    """The base model after ``base_steps``; its checkpoint at ``policy_step``, the policy, is
    saved to ``policy_dir``. Up to that checkpoint the model learns from ``problems``, half in
    the policy's layout, half in the PRM's, each seen once. Then (only the PRM goes on from here)
    it grows by ``prm_base_grown_layers`` and learns the remaining steps from ``later`` problems
    (or, with none, ``problems`` again) in the same two layouts, the cosine going on where it
    was, with a fresh optimizer and a warm-up of its own. ``base_revisions`` and
    ``prm_base_revisions`` are the worked shares (:func:`_both_layouts`) before and after the
    checkpoint."""
    model = TinyLlama(config)
    switch = min(recipe.policy_step, recipe.base_steps)
    examples = _both_layouts(problems, recipe.base_revisions)
    fit(model, examples, steps=recipe.base_steps, batch_size=recipe.batch_size,
        lr=recipe.base_lr, seed=seed, loss_fn=policy_loss, name="base", stop=switch)
    model.save(policy_dir)
    print(f"  base step {switch}: the policy, saved to {policy_dir}", flush=True)
    if switch == recipe.base_steps:
        return model
    model = model.grown(recipe.prm_base_grown_layers)
    fit(model, _both_layouts(later or problems, recipe.prm_base_revisions),
        steps=recipe.base_steps - switch,
        batch_size=recipe.batch_size, lr=recipe.base_lr, seed=seed + 1, loss_fn=policy_loss,
        name=f"base ({model.config.num_layers} layers)", schedule=(switch, recipe.base_steps))
    return model


def _both_layouts(problems: list[task.Problem], worked: float = 0.0) -> list[Example]:
    """The first half of ``problems`` as policy examples, the rest in the PRM's layout, but for
    a ``worked`` share of all, written in parts after the revision separator
    (:func:`worked_examples`): the format a revision writes, learnt with the arithmetic."""
    half = len(problems) // 2
    count = min(int(worked * len(problems)), len(problems) - half)
    return (policy_examples(problems[:half]) + worked_examples(problems[half : half + count])
            + prm_lm_examples(problems[half + count :]))


def multiplication_rich(count: int, minimum: int, seen: set[str], seed: int) -> list[task.Problem]:
    """``count`` train problems with at least ``minimum`` multiplications, none of ``seen``."""
    if not 1 <= minimum <= task.MAX_OPS:
        raise InvalidArgument(f"minimum: expected 1 to {task.MAX_OPS} multiplications, got {minimum}")
    drawn = 5 * count
    while True:
        rich = [p for p in task.problems("train", drawn, seed=seed + 11)
                if sum(op == "*" for op, _ in p.ops) >= minimum and p.text not in seen]
        if len(rich) >= count:
            return rich[:count]
        drawn *= 2


def train_revisions(policy_dir: Path, problems: list[task.Problem], fresh: list[task.Problem],
                    recipe: Recipe, seed: int) -> tuple[TinyLlama, dict]:
    """The policy fine-tuned to revise: chains of one to three of its own wrong solutions of
    ``problems`` (sampled at ``revision_temperature``) then the reference, mixed one to one with
    plain solutions of ``fresh`` problems. A problem the policy never got wrong has no chain.

    With ``revision_worked``, the reference is worked in parts, and a chain's attempts after its
    first are worked revisions as the policy writes them: right with probability
    ``revision_worked_right`` (the revision then copies it) or with a slip
    (:func:`task.worked_slip_solution`)."""
    samples = sample(policy_dir, problems, recipe.revision_samples, recipe.revision_temperature,
                     seed + 3)
    rng = random.Random(seed + 3)
    chains = []
    for problem, group in zip(problems, samples, strict=True):
        wrong = [s for s in group if not is_correct(problem, s)]
        if not wrong:
            continue
        attempts = wrong[: rng.randint(1, min(3, len(wrong)))]
        if recipe.revision_worked:
            attempts = attempts[:1] + [
                problem.worked_solution() if rng.random() < recipe.revision_worked_right
                else task.worked_slip_solution(problem, rng) for _ in attempts[1:]]
        chains.append(revision_example(problem, attempts, worked=recipe.revision_worked))
    stats = {"chains": len(chains),
             "sampled_accuracy": accuracy_by_level(
                 [p for p in problems for _ in range(recipe.revision_samples)],
                 [s for g in samples for s in g])["all"]}
    policy = TinyLlama.from_pretrained(policy_dir)
    fit(policy, chains + policy_examples(fresh[: len(chains)]), steps=recipe.revision_steps,
        batch_size=recipe.batch_size // 2, lr=recipe.revision_lr, seed=seed + 2, loss_fn=policy_loss,
        name="revisions")
    return policy, stats


def labelled_samples(policy_dir: Path, problems: list[task.Problem], recipe: Recipe,
                     seed: int) -> tuple[list[Example], dict]:
    """The policy's own solutions to ``problems``, as PRM examples with exact step labels."""
    samples = sample(policy_dir, problems, recipe.prm_samples, recipe.prm_temperature, seed)
    examples = [prm_example(p, s, flags=True) for p, group in zip(problems, samples) for s in group]
    examples = [e for e in examples if e is not None]
    vocab = Vocab.load()
    labels = [t for e in examples for t in e.targets if t != -100]
    repeated = [p for p in problems for _ in range(recipe.prm_samples)]
    stats = {
        "problems": len(problems),
        "solutions": len(examples),
        "steps": len(labels),
        "positive_fraction": round(labels.count(vocab.good) / max(len(labels), 1), 4),
        "solution_accuracy": accuracy_by_level(repeated, [s for g in samples for s in g])["all"],
    }
    return examples, stats


def train_prm(base: TinyLlama, labelled: list[Example], problems: list[task.Problem],
              recipe: Recipe, seed: int) -> TinyLlama:
    """The PRM: ``base`` grown by ``prm_extra_layers`` layers (:meth:`TinyLlama.grown`) and
    fine-tuned (:class:`PRMObjective`) on the policy's labelled solutions, on reference solutions
    of the first ``prm_corrupted`` of ``problems`` with one step made wrong
    (:func:`task.corrupt_solution`; the first ``prm_worked`` of them worked in parts with a slip,
    :func:`task.worked_slip_solution`, as a wrong revision is), all with result flags, and on
    reference solutions of the next ``prm_lm_problems`` as language modelling (so it keeps the
    arithmetic it judges; the first ``prm_lm_worked`` worked in parts).
    The base's embeddings and layers learn at ``prm_base_lr_scale`` times the rate: at the full
    rate they forget much of the arithmetic the PRM checks steps against."""
    vocab = Vocab.load()
    rng = random.Random(seed + 5)
    corrupted = problems[: recipe.prm_corrupted]
    worked = min(recipe.prm_worked, len(corrupted))
    judged = labelled + [prm_example(p, task.worked_slip_solution(p, rng), flags=True)
                         for p in corrupted[:worked]]
    judged += [prm_example(p, task.corrupt_solution(p, rng), flags=True)
               for p in corrupted[worked:]]
    labels = [t for e in judged for t in e.targets if t != -100]
    good = labels.count(vocab.good) / max(len(labels), 1)
    weights = torch.tensor([0.5 / max(good, 1e-3), 0.5 / max(1 - good, 1e-3)])
    modelled = problems[recipe.prm_corrupted : recipe.prm_corrupted + recipe.prm_lm_problems]
    prm = base.grown(recipe.prm_extra_layers)
    kept = (prm.model.embed_tokens, *prm.model.layers[: base.config.num_layers])
    inherited = [p for module in kept for p in module.parameters()]
    objective = PRMObjective(prm, recipe.prm_extra_layers, weights, lm_weight=recipe.prm_lm_weight,
                             flag_weight=recipe.prm_flag_weight, hint_weight=recipe.prm_hint_weight)
    lm_worked = min(recipe.prm_lm_worked, len(modelled))
    lm = prm_lm_examples(modelled[:lm_worked], worked=True) + prm_lm_examples(modelled[lm_worked:])
    fit(prm, judged + lm, steps=recipe.prm_steps,
        batch_size=recipe.batch_size, lr=recipe.prm_lr, seed=seed + 1, loss_fn=objective,
        name="prm", slow=(inherited, recipe.prm_base_lr_scale))
    return prm


def prm_lm_problems(count: int, seen: list[task.Problem], seed: int) -> list[task.Problem]:
    """``count`` train problems the policy did not train on, for the PRM's language modelling."""
    texts = {p.text for p in seen}
    pool = task.problems("train", count + len(seen), seed=seed + 1)
    return [p for p in pool if p.text not in texts][:count]


def revision_accuracy(policy_dir: Path, problems: list[task.Problem], attempts: int,
                      seed: int) -> tuple[dict[str, float], dict[str, float | None]]:
    """Accuracy of each position of one revision chain of ``attempts`` per problem, run by
    :func:`ttscale.revisions` at temperature 1: ``"1"`` is a first attempt (a plain sample),
    ``"2"`` its revision, ...; and how often a revision is right after a right and after a
    wrong attempt (every position after the first)."""
    llm = LLM(policy_dir, device="cpu", seed=seed, kv_budget_bytes=256 << 20)
    results = ttscale.revisions(
        llm, [f"Q: {p.text}" for p in problems], attempts, attempts,
        sampling=SamplingParams(temperature=1.0, max_tokens=MAX_REVISION_TOKENS),
        prompt_fn=lambda question: question + "\n", progress=False, seed=seed)
    chains = []  # one chain per problem: one attempt per position
    for problem, result in zip(problems, results, strict=True):
        ordered = sorted(result.candidates, key=lambda c: c.position)
        chains.append([is_correct(problem, c.text) for c in ordered])
    by_position = {str(k + 1): round(sum(c[k] for c in chains) / max(len(chains), 1), 4)
                   for k in range(attempts)}
    return by_position, transitions([(c[k - 1], c[k]) for c in chains for k in range(1, attempts)])


def transitions(pairs: list[tuple[bool, bool]]) -> dict[str, float | None]:
    """``{"after_right", "after_wrong"}``: the fraction of ``(earlier, later)`` pairs whose later
    attempt is right, given the earlier one was right, or wrong (None when there is none)."""
    out = {}
    for name, earlier in (("after_right", True), ("after_wrong", False)):
        later = [b for a, b in pairs if a == earlier]
        out[name] = round(sum(later) / len(later), 4) if later else None
    return out


def resample_transitions(problems: list[task.Problem],
                         pool: list[list[str]]) -> dict[str, float | None]:
    """:func:`transitions` for two independent samples of the same problem, from a pool of
    samples per problem: what a "revision" that ignores the earlier attempt would get."""
    pairs = []
    for problem, group in zip(problems, pool, strict=True):
        right = [is_correct(problem, s) for s in group]
        pairs += [(a, b) for i, a in enumerate(right) for j, b in enumerate(right) if i != j]
    return transitions(pairs)


def evaluate_models(policy_dir: Path, prm: TinyLlama, recipe: Recipe, seed: int,
                    reference_lm: TinyLlama | None = None) -> dict:
    """Policy pass@1 by level, PRM quality on held-out samples, and the best-of-N preview
    (with ``reference_lm``'s step likelihood as a yardstick, when given)."""
    heldout = task.problems("heldout", max(recipe.eval_problems, recipe.preview_problems,
                                          recipe.revision_eval_problems), seed=seed)
    evaluation = heldout[: recipe.eval_problems]
    greedy = [g[0] for g in sample(policy_dir, evaluation, 1, 0.0, seed)]
    sampled = [g[0] for g in sample(policy_dir, evaluation, 1, 1.0, seed)]
    report = {"policy_pass@1": {"greedy": accuracy_by_level(evaluation, greedy),
                                "temperature_1": accuracy_by_level(evaluation, sampled)}}
    print(f"policy pass@1 by level on {len(evaluation)} held-out problems: "
          f"{report['policy_pass@1']}", flush=True)
    revised = heldout[: recipe.revision_eval_problems]
    report["revisions"], after = revision_accuracy(policy_dir, revised,
                                                   recipe.revision_eval_attempts, seed)
    print(f"accuracy by attempt in one revision chain on {len(revised)} held-out problems "
          f"(1 = first attempt): {report['revisions']}", flush=True)
    preview = heldout[: recipe.preview_problems]
    pool = sample(policy_dir, preview, recipe.preview_n, recipe.prm_temperature, seed + 2)
    report["revision_transitions"] = {"revised": after,
                                      "independent_resample": resample_transitions(preview, pool)}
    print(f"a revision is right after a right / a wrong attempt: {report['revision_transitions']}",
          flush=True)
    report["prm_heldout"] = prm_quality(prm, preview, pool)
    print(f"PRM on held-out samples: {report['prm_heldout']}", flush=True)
    sizes = tuple(n for n in (1, 4, 16, 64) if n <= recipe.preview_n)
    greedy_preview = [g[0] for g in sample(policy_dir, preview, 1, 0.0, seed)]
    report["preview"] = search_preview(prm, preview, pool, greedy_preview, sizes, reference_lm)
    print(f"best-of-N on {len(preview)} held-out problems: {report['preview']}", flush=True)
    return report


def train(out: Path, seed: int, recipe: Recipe) -> dict:
    torch.set_num_threads(THREADS)
    torch.set_flush_denormal(True)
    torch.manual_seed(seed)
    config = TinyConfig(build_tokenizer().get_vocab_size(), recipe.hidden_size,
                        recipe.intermediate_size, recipe.num_layers, recipe.num_heads,
                        recipe.max_positions)
    report: dict = {"seed": seed, "recipe": asdict(recipe), "threads": THREADS,
                    "versions": {"ttscale": ttscale.__version__, "torch": torch.__version__,
                                 "python": platform.python_version()},
                    "wall_seconds": {}, "cpu_seconds": {}}
    clock = [time.perf_counter(), time.process_time()]

    def phase(name: str) -> None:
        wall, cpu = time.perf_counter() - clock[0], time.process_time() - clock[1]
        report["wall_seconds"][name], report["cpu_seconds"][name] = round(wall, 1), round(cpu, 1)
        print(f"[{name}] {wall:.1f} s wall, {cpu:.1f} s CPU", flush=True)
        clock[:] = [time.perf_counter(), time.process_time()]

    policy_dir, prm_dir = out / "policy", out / "prm"
    train_problems = task.problems("train", recipe.base_steps * recipe.batch_size, seed=seed)
    fresh = prm_lm_problems(recipe.revision_problems + recipe.prm_problems, train_problems, seed)
    # the PRM's checking fails mostly at multiplications: the base's steps after the policy's
    # checkpoint, which only the PRM goes on from, are spent on problems rich in them
    later = []
    if recipe.prm_base_multiplications and recipe.policy_step < recipe.base_steps:
        later = multiplication_rich((recipe.base_steps - recipe.policy_step) * recipe.batch_size,
                                    recipe.prm_base_multiplications,
                                    {p.text for p in train_problems + fresh}, seed)
    base = train_base(config, recipe, seed, policy_dir, train_problems, later)
    # the policy's size: the base has grown past it
    report["parameters"] = TinyLlama.from_pretrained(policy_dir).num_parameters()
    phase("base")

    chain_problems = random.Random(seed).sample(train_problems,
                                                min(recipe.revision_problems, len(train_problems)))
    policy, report["revision_data"] = train_revisions(
        policy_dir, chain_problems, fresh[: recipe.revision_problems], recipe, seed)
    policy.save(policy_dir)
    print(f"revision data: {report['revision_data']}", flush=True)
    phase("revisions")

    chosen = fresh[recipe.revision_problems :]
    labelled, report["prm_data"] = labelled_samples(policy_dir, chosen, recipe, seed)
    print(f"PRM data: {report['prm_data']}", flush=True)
    phase("samples")

    prm = train_prm(base, labelled,
                    prm_lm_problems(recipe.prm_corrupted + recipe.prm_lm_problems,
                                    train_problems + later + fresh, seed + 7), recipe, seed)
    prm.save(prm_dir)
    report["prm_parameters"] = prm.num_parameters()
    phase("prm")

    # train_prm trains a grown copy, so the base is as it was: the PRM's yardstick
    report.update(evaluate_models(policy_dir, prm, recipe, seed, reference_lm=base))
    phase("evaluation")
    for key in ("wall_seconds", "cpu_seconds"):
        report[key]["total"] = round(sum(report[key].values()), 1)
    print(f"total: {report['wall_seconds']['total']} s wall, {report['cpu_seconds']['total']} s CPU")
    for directory in (policy_dir, prm_dir):
        (directory / "training_report.json").write_text(json.dumps(report, indent=1) + "\n")
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="writes OUT/policy and OUT/prm (default: the package's own)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--minutes", type=float, default=NOMINAL_MINUTES,
                        help=f"nominal budget on 2 cores (default {NOMINAL_MINUTES:g}); scales "
                             "step counts, never reads the clock")
    parser.add_argument("--tiny", action="store_true",
                        help="a one-layer model and a few steps of everything (smoke test)")
    args = parser.parse_args(argv)
    recipe = TINY if args.tiny else NOMINAL.scaled(args.minutes / NOMINAL_MINUTES)
    train(args.out, args.seed, recipe)


if __name__ == "__main__":
    main()
