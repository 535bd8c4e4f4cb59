"""Train the embedded policy and PRM on the CPU: ``python -m ttscale.toy.train [--out DIR]``.

Phases, each timed:

1. policy: a ~1M-parameter Llama learns to write solutions of train-split problems, stopped
   early on purpose so that it still makes real mistakes (search has something to fix);
2. samples: the policy writes many solutions per train problem at temperature 1 (through the
   engine, :class:`ttscale.llm.LLM`), each step labelled exactly by :func:`task.label_steps`;
3. PRM: a copy of the policy, fine-tuned as a Math-Shepherd PRM on those samples: at every step
   tag, cross-entropy between the ``+`` and ``-`` logits, classes weighted to balance;
4. evaluation on held-out problems: policy accuracy by level, PRM step-label accuracy and AUC,
   and a preview of best-of-N with the PRM against majority vote and greedy.

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
from torch import Tensor

import ttscale
from ttscale.toy import task
from ttscale.toy.data import Example, Vocab, batch, policy_examples, prm_example, prm_lm_example
from ttscale.toy.evaluate import (
    accuracy_by_level,
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
    batch_size: int = 64
    policy_steps: int = 1600
    policy_lr: float = 4e-3
    prm_problems: int = 1500  # train problems the policy samples for the PRM's data
    prm_samples: int = 8  # samples per problem
    prm_temperature: float = 1.0
    prm_steps: int = 1500
    prm_lr: float = 1e-3
    prm_lm_weight: float = 0.5
    eval_problems: int = 400  # held-out problems for pass@1
    preview_problems: int = 100
    preview_n: int = 16

    def scaled(self, factor: float) -> Recipe:
        """The same recipe with work counts multiplied by ``factor`` (at least one of each)."""
        counts = ("policy_steps", "prm_problems", "prm_steps", "eval_problems", "preview_problems")
        return Recipe(**{**asdict(self), **{k: max(1, round(getattr(self, k) * factor)) for k in counts}})


NOMINAL = Recipe()
NOMINAL_MINUTES = 15.0
# A recipe whose every phase takes a second or two: the smoke test of the script.
TINY = Recipe(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, batch_size=8,
              policy_steps=5, prm_problems=4, prm_samples=2, prm_steps=5, eval_problems=8,
              preview_problems=4, preview_n=2)


def fit(model: TinyLlama, examples: list[Example], *, steps: int, batch_size: int, lr: float,
        seed: int, loss_fn, name: str) -> list[float]:
    """AdamW with linear warm-up and cosine decay; batches drawn in a seeded order, epoch by epoch."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, steps // 20)
    pad = Vocab.load().pad
    batches = _batches(examples, steps, batch_size, generator)
    losses = []
    model.train()
    start = time.perf_counter()
    for step, chosen in enumerate(batches):
        ids, targets = batch([examples[i] for i in chosen], pad)
        loss = loss_fn(model(ids), ids, targets)
        scale = min(1.0, (step + 1) / warmup) * (0.55 + 0.45 * math.cos(math.pi * step / steps))
        for group in optimizer.param_groups:
            group["lr"] = lr * scale
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        if (step + 1) % max(1, steps // 10) == 0:
            recent = losses[-max(1, steps // 10):]
            rate = (time.perf_counter() - start) / (step + 1)
            print(f"  {name} step {step + 1}/{steps}  loss {sum(recent) / len(recent):.4f}  "
                  f"{rate:.2f} s/step", flush=True)
    model.eval()
    return losses


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


def policy_loss(logits: Tensor, ids: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)


def prm_loss(weights: Tensor, lm_weight: float):
    """Class-weighted cross-entropy over the ``+``/``-`` logits at step tags that carry a label,
    plus ``lm_weight`` times the language-modelling loss everywhere else a target is set."""
    vocab = Vocab.load()

    def loss(logits: Tensor, ids: Tensor, targets: Tensor) -> Tensor:
        labelled = (ids == vocab.step_tag) & ((targets == vocab.good) | (targets == vocab.bad))
        modelled = (targets != -100) & ~labelled
        total = logits.new_zeros(())
        if labelled.any():
            two = logits[labelled][:, [vocab.good, vocab.bad]]
            total = total + F.cross_entropy(two, (targets[labelled] == vocab.bad).long(), weight=weights)
        if modelled.any():
            total = total + lm_weight * F.cross_entropy(logits[modelled], targets[modelled])
        return total

    return loss


def train_policy(config: TinyConfig, recipe: Recipe, seed: int) -> tuple[TinyLlama, list[task.Problem]]:
    """The policy and the train problems it saw (each once)."""
    policy = TinyLlama(config)
    problems = task.problems("train", recipe.policy_steps * recipe.batch_size, seed=seed)
    fit(policy, policy_examples(problems), steps=recipe.policy_steps, batch_size=recipe.batch_size,
        lr=recipe.policy_lr, seed=seed, loss_fn=policy_loss, name="policy")
    return policy, problems


def labelled_samples(policy_dir: Path, problems: list[task.Problem], recipe: Recipe,
                     seed: int) -> tuple[list[Example], dict]:
    """The policy's own solutions to ``problems``, as PRM examples with exact step labels."""
    samples = sample(policy_dir, problems, recipe.prm_samples, recipe.prm_temperature, seed)
    examples = [prm_example(p, s) for p, group in zip(problems, samples) for s in group]
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


def train_prm(policy: TinyLlama, labelled: list[Example], problems: list[task.Problem],
              recipe: Recipe, seed: int) -> TinyLlama:
    """A copy of the policy, fine-tuned on labelled steps and on reference solutions of
    ``problems`` (fresh train problems, so it keeps learning the arithmetic it judges)."""
    prm = TinyLlama(policy.config)
    prm.load_state_dict(policy.state_dict())
    vocab = Vocab.load()
    labels = [t for e in labelled for t in e.targets if t != -100]
    good = labels.count(vocab.good) / max(len(labels), 1)
    weights = torch.tensor([0.5 / max(good, 1e-3), 0.5 / max(1 - good, 1e-3)])
    examples = labelled + [prm_lm_example(p) for p in problems]
    fit(prm, examples, steps=recipe.prm_steps, batch_size=recipe.batch_size, lr=recipe.prm_lr,
        seed=seed + 1, loss_fn=prm_loss(weights, recipe.prm_lm_weight), name="prm")
    return prm


def prm_lm_problems(count: int, seen: list[task.Problem], seed: int) -> list[task.Problem]:
    """``count`` train problems the policy did not train on, for the PRM's language modelling."""
    texts = {p.text for p in seen}
    pool = task.problems("train", count + len(seen), seed=seed + 1)
    return [p for p in pool if p.text not in texts][:count]


def evaluate_models(policy_dir: Path, prm: TinyLlama, recipe: Recipe, seed: int) -> dict:
    """Policy pass@1 by level, PRM quality on held-out samples, and the best-of-N preview."""
    heldout = task.problems("heldout", max(recipe.eval_problems, recipe.preview_problems), seed=seed)
    evaluation = heldout[: recipe.eval_problems]
    greedy = [g[0] for g in sample(policy_dir, evaluation, 1, 0.0, seed)]
    sampled = [g[0] for g in sample(policy_dir, evaluation, 1, 1.0, seed)]
    report = {"policy_pass@1": {"greedy": accuracy_by_level(evaluation, greedy),
                                "temperature_1": accuracy_by_level(evaluation, sampled)}}
    print(f"policy pass@1 by level on {len(evaluation)} held-out problems: "
          f"{report['policy_pass@1']}", flush=True)
    preview = heldout[: recipe.preview_problems]
    pool = sample(policy_dir, preview, recipe.preview_n, recipe.prm_temperature, seed + 2)
    report["prm_heldout"] = prm_quality(prm, preview, pool)
    print(f"PRM on held-out samples: {report['prm_heldout']}", flush=True)
    sizes = tuple(n for n in (1, 4, 16, 64) if n <= recipe.preview_n)
    greedy_preview = [g[0] for g in sample(policy_dir, preview, 1, 0.0, seed)]
    report["preview"] = search_preview(prm, preview, pool, greedy_preview, sizes)
    print(f"best-of-N on {len(preview)} held-out problems: {report['preview']}", flush=True)
    return report


def train(out: Path, seed: int, recipe: Recipe) -> dict:
    torch.set_num_threads(THREADS)
    torch.set_flush_denormal(True)
    torch.manual_seed(seed)
    config = TinyConfig(build_tokenizer().get_vocab_size(), recipe.hidden_size,
                        recipe.intermediate_size, recipe.num_layers, recipe.num_heads)
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
    policy, train_problems = train_policy(config, recipe, seed)
    report["parameters"] = policy.num_parameters()
    policy.save(policy_dir)
    phase("policy")

    chosen = random.Random(seed).sample(train_problems, min(recipe.prm_problems, len(train_problems)))
    labelled, report["prm_data"] = labelled_samples(policy_dir, chosen, recipe, seed)
    print(f"PRM data: {report['prm_data']}", flush=True)
    phase("samples")

    fresh = prm_lm_problems(len(labelled), train_problems, seed)
    prm = train_prm(policy, labelled, fresh, recipe, seed)
    prm.save(prm_dir)
    phase("prm")

    report.update(evaluate_models(policy_dir, prm, recipe, seed))
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
