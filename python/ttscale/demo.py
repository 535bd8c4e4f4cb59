"""``ttscale demo``: test-time scaling in miniature, on any CPU, with no download.

The embedded toy policy (a ~1M-parameter Llama trained on multi-step arithmetic) and its
Math-Shepherd PRM search 200 held-out problems with each strategy at several budgets N. The
output shows what the test-time-compute literature found at scale: searching with a verifier buys
accuracy the model alone does not have.

Best-of-N and the votes draw one pool of ``max(N)`` samples per problem and take its first N for
each N (so their curves share samples); beam search and DVTS run once per N with beam width
``min(4, N)``. Revisions spend one fixed budget (16 attempts, or the largest N if smaller) at
every sequential:parallel ratio, from all parallel (1:16) to one chain (16:1), and get a plot
of their own (``revisions.png``): accuracy against the ratio, overall and by difficulty.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from ttscale.engine.memory import pair_shares
from ttscale.errors import InvalidArgument
from ttscale.grading import coverage_at_k
from ttscale.sampling_params import SamplingParams
from ttscale.search import registry
from ttscale.search.select import aggregate, choose

# The default rows: greedy decoding, the three choices from one best-of-N pool, and searches.
STRATEGIES = ("greedy", "majority", "best_of_n", "weighted", "beam_search", "dvts", "revisions")
POOLED = {"majority": "majority", "best_of_n": "best", "weighted": "weighted"}  # row -> select
REVISION_BUDGET = 16
CALIBRATION_PROBLEMS = 100  # training problems compute_optimal is fitted on
AGG = "min"  # a solution is as good as its worst step: the toy PRM's errors compound
EQUAL_TOKENS_ROW = "majority-equal-tokens"  # the vote RSA's rows are set against (at its tokens)
MAX_TOKENS = 96
# Budget forcing's rows: chains thinking to 1-4 attempts' worth of tokens, an attempt's worth
# being what a best-of-N sample of these settings writes on average (144,788 tokens for 16
# samples of 200 problems in the README's table: 45).
ATTEMPT_TOKENS = 45
FORCING_ATTEMPTS = (1, 2, 3, 4)


@dataclass
class Row:
    strategy: str
    n: int
    accuracy: float
    problems: int
    tokens: int
    seconds: float
    by_difficulty: dict[str, float]


def _mean_by(values: Sequence[float], levels: Sequence[int]) -> dict[str, float]:
    by: dict[str, list[float]] = {}
    for value, level in zip(values, levels):
        by.setdefault(str(level), []).append(value)
    return {k: sum(v) / len(v) for k, v in sorted(by.items())}


def _accuracy(correct: Sequence[bool], levels: Sequence[int]) -> tuple[float, dict[str, float]]:
    by: dict[str, list[bool]] = {}
    for ok, level in zip(correct, levels):
        by.setdefault(str(level), []).append(ok)
    overall = sum(correct) / max(len(correct), 1)
    return overall, {k: sum(v) / len(v) for k, v in sorted(by.items())}


# Held-out problems a demo takes at most: they are drawn before the first search, and 10,000
# already take hours of search on a CPU (200 take minutes); a larger count is a typo, not a demo.
MAX_PROBLEMS = 10_000


def choices() -> list[str]:
    """Every row the demo can run: greedy, the pooled choices, every registered strategy (each
    searched at every N with its options ``for_budget(N)``, a row per entry of its options'
    ``variants(N)`` such as DeepConf's offline and online; without the PRM where it needs none;
    revisions at several chain lengths), and compute_optimal (fitted at each N on training problems, never held-out ones)."""
    return list(dict.fromkeys(["greedy", *POOLED, *registry.strategies(), "compute_optimal"]))


def _searched(strategies: Sequence[str]) -> list[str]:
    """The rows searched on their own at each N: registered strategies other than the pool's."""
    return [s for s in strategies if s in registry.strategies() and s not in POOLED
            and s not in ("revisions", "budget_forcing")]


def run_demo(ns: Sequence[int] = (1, 4, 16, 64), strategies: Sequence[str] = STRATEGIES,
             num_problems: int = 200, device: str | None = None, out: Path = Path("demo_out"),
             seed: int = 0, progress: bool = True, models: Path | None = None,
             revision_lengths: Sequence[int] | None = None) -> list[Row]:
    """Run the demo; write ``results.json`` and ``scaling.png`` under ``out``; return the rows.

    ``models``: a folder with ``policy/`` and ``prm/``, as ``python -m ttscale.toy.train --out``
    writes it (default: the embedded models). ``revision_lengths``: the chain lengths S of the
    ``revisions-S`` rows (default every power of two that divides the revision budget)."""
    import ttscale
    from ttscale.llm import DEFAULT_MAX_N
    from ttscale.toy import policy_dir, prm_dir, task

    started = time.perf_counter()
    unknown = [s for s in strategies if s not in choices()]
    if unknown:
        raise InvalidArgument(f"strategies: unknown {unknown}; choose from {', '.join(choices())}")
    if not ns or any(n < 1 for n in ns):
        raise InvalidArgument(f"n: expected positive budgets, got {list(ns)}")
    if max(ns) > DEFAULT_MAX_N:  # what the demo's LLM takes
        raise InvalidArgument(f"n: at most {DEFAULT_MAX_N}, got {max(ns)}")
    for name in _searched(strategies):
        options = registry.get(name).options
        for n in ns:
            try:
                for chosen in options.variants(n).values():
                    options(**chosen).check(n)
            except InvalidArgument as error:
                raise InvalidArgument(f"n: {name} cannot run at N={n} ({error})") from None
    if (not isinstance(num_problems, int) or isinstance(num_problems, bool)
            or not 1 <= num_problems <= MAX_PROBLEMS):
        raise InvalidArgument(f"problems: expected an integer in [1, {MAX_PROBLEMS}], got "
                              f"{num_problems!r}")
    if revision_lengths is not None and any(s < 1 or revision_budget(ns) % s for s in revision_lengths):
        raise InvalidArgument(f"revision_lengths: expected divisors of the revision budget "
                         f"{revision_budget(ns)}, got {list(revision_lengths)}")
    policy, verifier = model_dirs(models) if models is not None else (policy_dir(), prm_dir())
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    problems = task.problems("heldout", num_problems, seed=seed)
    texts = [f"Q: {p.text}" for p in problems]
    references = [str(p.answer) for p in problems]
    levels = [p.level for p in problems]
    policy_share, prm_share = pair_shares(device)  # one GPU's KV budget, split
    llm = ttscale.LLM(policy, device=device, seed=seed, memory_share=policy_share)
    prm = ttscale.PRM(verifier, format="math-shepherd", device=device, memory_share=prm_share)
    common = dict(references=references, step_delimiter=task.STEP_DELIMITER,
                  prompt_fn=lambda problem: problem + "\n", progress=False, seed=seed)
    sampling = SamplingParams(temperature=1.0, max_tokens=MAX_TOKENS)
    ns = sorted(set(ns))
    rows: list[Row] = []
    wall: dict[str, float] = {"loading the models": time.perf_counter() - started}
    bar = tqdm(total=_work(ns, strategies, revision_lengths), desc="demo", unit="run", disable=not progress)

    def record(strategy, n, results, tokens, seconds):
        correct = [r.answer is not None and _same(r.answer, ref) for r, ref in zip(results, references)]
        acc, by = _accuracy(correct, levels)
        rows.append(Row(strategy, n, acc, len(results), tokens, seconds, by))
        bar.set_postfix(last=f"{strategy}@{n}={acc:.2f}")

    if "greedy" in strategies:
        start = time.perf_counter()
        results = ttscale.best_of_n(llm, texts, 1, sampling=SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS),
                                    **common)
        record("greedy", 1, results, _tokens(results), time.perf_counter() - start)
        wall["greedy"] = time.perf_counter() - start
        bar.update(1)

    pooled = [s for s in POOLED if s in strategies]
    if pooled:
        start = time.perf_counter()
        pool = ttscale.best_of_n(llm, texts, max(ns), verifier=prm, sampling=sampling, agg=AGG, **common)
        seconds = time.perf_counter() - start
        wall[f"one pool of {max(ns)} ({', '.join(pooled)})"] = seconds
        total_tokens = _tokens(pool)
        right = [sum(c.answer is not None and _same(c.answer, ref) for c in r.candidates)
                 for r, ref in zip(pool, references)]
        for n in ns:
            share = n / max(ns)  # the first n of the pool cost this share of it
            for strategy in pooled:
                chosen = [_choose_first(r, n, POOLED[strategy]) for r in pool]
                record(strategy, n, chosen, int(total_tokens * share), seconds * share)
            # the oracle line: is any of n samples right (unbiased over the pool's samples)
            covered = [coverage_at_k(max(ns), c, n) for c in right]
            rows.append(Row("coverage", n, sum(covered) / len(covered), len(pool),
                            int(total_tokens * share), seconds * share,
                            _mean_by(covered, levels)))
            bar.update(len(pooled))

    for strategy in _searched(strategies):
        spec = registry.get(strategy)
        # a strategy that needs no verifier runs without the PRM: its row is what it does alone,
        # to set against the majority vote
        verifier = prm if spec.needs_verifier else None
        for n in ns:
            for suffix, chosen in spec.options.variants(n).items():
                start = time.perf_counter()
                results = spec.function(llm, texts, n, verifier=verifier, sampling=sampling,
                                        agg=AGG, **chosen, **common)
                record(strategy + suffix, n, results, _tokens(results), time.perf_counter() - start)
                wall[strategy] = wall.get(strategy, 0.0) + time.perf_counter() - start
                bar.update(1)
            if strategy == "rsa":
                start = time.perf_counter()
                matched, votes = _majority_at_tokens(llm, texts, results, sampling, common)
                seconds = time.perf_counter() - start
                record(EQUAL_TOKENS_ROW, matched, votes, _tokens(votes), seconds)
                wall[EQUAL_TOKENS_ROW] = wall.get(EQUAL_TOKENS_ROW, 0.0) + seconds
                bar.update(1)

    if "compute_optimal" in strategies:
        # fitted on the task's training split (its answers known), then run on the held-out set
        calibration = task.problems("train", CALIBRATION_PROBLEMS, seed=seed)
        cal_texts = [f"Q: {p.text}" for p in calibration]
        cal_refs = [str(p.answer) for p in calibration]
        for n in ns:
            start = time.perf_counter()
            results = ttscale.compute_optimal(
                llm, cal_texts, cal_refs, texts, n, prm, sampling, beam_width=min(4, n),
                strategies=("best_of_n", "beam_search"), pilot_n=min(4, n), agg=AGG, **common)
            record("compute_optimal", n, results, _tokens(results), time.perf_counter() - start)
            wall["compute_optimal"] = wall.get("compute_optimal", 0.0) + time.perf_counter() - start
            bar.update(1)

    if "budget_forcing" in strategies:
        # without the PRM (a majority vote over every finished attempt): a verifier-free row
        for n in ns:
            for attempts in FORCING_ATTEMPTS:
                start = time.perf_counter()
                results = ttscale.budget_forcing(llm, texts, n, sampling=sampling,
                                                 budget=attempts * ATTEMPT_TOKENS, **common)
                record(f"budget_forcing-{attempts}", n, results, _tokens(results),
                       time.perf_counter() - start)
                wall["budget_forcing"] = wall.get("budget_forcing", 0.0) + time.perf_counter() - start
                bar.update(1)

    if "revisions" in strategies:
        from ttscale.toy.evaluate import MAX_REVISION_TOKENS

        # room for a revision that works its products in parts, as the embedded policy's do
        # (the cap the training script measures revisions with)
        revising = SamplingParams(temperature=1.0, max_tokens=MAX_REVISION_TOKENS)
        budget = revision_budget(ns)
        for sequential in revision_ratios(budget) if revision_lengths is None else revision_lengths:
            start = time.perf_counter()
            results = ttscale.revisions(llm, texts, budget, sequential, verifier=prm, sampling=revising,
                                        agg=AGG, **common)
            record(f"revisions-{sequential}", budget, results, _tokens(results),
                   time.perf_counter() - start)
            wall["revisions"] = wall.get("revisions", 0.0) + time.perf_counter() - start
            bar.update(1)
    bar.close()

    (out / "results.json").write_text(json.dumps([r.__dict__ for r in rows], indent=1))
    plot = _plot(rows, out / "scaling.png")
    ratio_plot = _plot_revisions(rows, out / "revisions.png")
    print_table(rows)
    if pooled:
        print(f"\nBest-of-N, weighted and majority take the first N of one pool of {max(ns)} "
              "samples per problem;\ncoverage is the chance that any N of its samples hold a "
              "right one (pass@N, unbiased): their ceiling.")
    if "budget_forcing" in strategies:
        print(f"budget_forcing-K: N chains thinking to K attempts' worth ({ATTEMPT_TOKENS} tokens "
              "each), majority vote over every finished attempt, no PRM.")
    if "rsa" in strategies:
        rounds = registry.get("rsa").options().aggregation_rounds
        print(f"rsa: a population of N rewritten in {rounds} rounds, each member after min(3, N) "
              "others; tokens generated plus the aggregation "
              f"contexts' prefill.\n{EQUAL_TOKENS_ROW}: a majority vote over as many samples as "
              "rsa's tokens buy (its N).")
    if ratio_plot is not None:
        print("revisions-S: N attempts as N/S parallel chains of S attempts (S sequential), "
              "weighted vote with the PRM over all attempts.")
    print(f"results: {out / 'results.json'}\nplot:    {plot}")
    if ratio_plot is not None:
        print(f"plot:    {ratio_plot}")
    print_wall_time(wall, time.perf_counter() - started)
    return rows


def model_dirs(models: Path) -> tuple[Path, Path]:
    """The policy's and the PRM's folders in ``models`` (a training run's ``--out``)."""
    dirs = (Path(models) / "policy", Path(models) / "prm")
    missing = [str(d) for d in dirs if not (d / "config.json").is_file()]
    if missing:
        raise InvalidArgument(f"models: expected a folder with policy/ and prm/ as python -m "
                         f"ttscale.toy.train --out writes it; no model in {', '.join(missing)}")
    return dirs


class _Picked:
    def __init__(self, answer):
        self.answer = answer


def _choose_first(result, n: int, select: str) -> _Picked:
    """The answer ``select`` picks among a pooled result's first ``n`` candidates."""
    candidates = result.candidates[:n]
    for c in candidates:
        c.score = aggregate(c.step_scores, AGG) if c.step_scores else c.score
    index = choose(candidates, select)
    return _Picked(None if index is None else candidates[index].answer)


def _same(answer: str, reference: str) -> bool:
    try:
        return int(answer.strip()) == int(reference)
    except ValueError:
        return False


def _tokens(results) -> int:
    """Tokens generated, and for RSA the tokens its aggregation contexts cost to prefill."""
    return sum(r.cost.generated_tokens + r.extra.get("aggregation_prefill_tokens", 0)
               for r in results)


def _majority_at_tokens(llm, texts, results, sampling, common) -> tuple[int, list]:
    """A majority vote at RSA's tokens: over as many samples per problem as its tokens (generated
    plus aggregation prefill) buy at the mean length of its first population's samples."""
    import ttscale
    from ttscale.llm import DEFAULT_MAX_N

    first = sum(r.extra["generated_tokens"][0] for r in results)
    per_sample = first / (results[0].extra["population"] * len(results))
    n = min(DEFAULT_MAX_N, max(1, round(_tokens(results) / len(results) / per_sample)))
    return n, ttscale.best_of_n(llm, texts, n, sampling=sampling, select="majority", **common)


def revision_budget(ns: Sequence[int]) -> int:
    return min(REVISION_BUDGET, max(ns))


def revision_ratios(budget: int) -> list[int]:
    """The sequential lengths tried at ``budget``: the powers of two that divide it."""
    return [s for s in (2**k for k in range(budget.bit_length())) if budget % s == 0]


def _work(ns, strategies, revision_lengths=None) -> int:
    pooled = len([s for s in POOLED if s in strategies])
    searched = sum(len(registry.get(s).options.variants(max(ns))) for s in _searched(strategies))
    lengths = revision_ratios(revision_budget(ns)) if revision_lengths is None else revision_lengths
    revised = len(lengths) if "revisions" in strategies else 0
    fitted = len(ns) if "compute_optimal" in strategies else 0
    forced = len(ns) * len(FORCING_ATTEMPTS) if "budget_forcing" in strategies else 0
    matched = len(ns) if "rsa" in strategies else 0  # the majority vote at RSA's tokens
    return (("greedy" in strategies) + (pooled + searched) * len(ns) + fitted + revised + forced
            + matched)


def print_table(rows: list[Row]) -> None:
    levels = sorted({k for r in rows for k in r.by_difficulty})
    header = ["strategy", "N", "accuracy"] + [f"level {k}" for k in levels] + ["tokens", "tokens/s"]
    cells = [header] + [
        [r.strategy, str(r.n), f"{r.accuracy:.3f}"] + [f"{r.by_difficulty.get(k, float('nan')):.2f}" for k in levels]
        + [str(r.tokens), f"{r.tokens / max(r.seconds, 1e-9):,.0f}"]
        for r in rows
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    for i, row in enumerate(cells):
        print("  ".join(c.rjust(w) if j else c.ljust(w) for j, (c, w) in enumerate(zip(row, widths))))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def print_wall_time(wall: dict[str, float], total: float) -> None:
    """Where the demo's time went: wall seconds per strategy (all its N together) and in total."""
    print("\nwall time:")
    width = max(len(name) for name in wall)
    for name, seconds in wall.items():
        print(f"  {name.ljust(width)}  {seconds:7.1f} s")
    print(f"  {'total'.ljust(width)}  {total:7.1f} s ({total / 60:.1f} min)")


def _axes():
    """A figure and its axes for accuracy against a log2 x axis (matplotlib without a display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    ax.set_xscale("log", base=2)
    return fig, ax


def _finish(fig, ax, rows: list[Row], path: Path, *, title: str, xlabel: str, greedy_style: str) -> Path:
    """Draw the greedy baseline, label, save to ``path`` and close the figure."""
    import matplotlib.pyplot as plt

    greedy = [r for r in rows if r.strategy == "greedy"]
    if greedy:
        ax.axhline(greedy[0].accuracy, color="gray", linestyle=greedy_style, label="greedy (no search)")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("accuracy on held-out problems")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _plot(rows: list[Row], path: Path) -> Path:
    fig, ax = _axes()
    for strategy in dict.fromkeys(r.strategy for r in rows):
        if strategy == "greedy" or strategy.startswith("revisions-"):
            continue  # a line of its own, and a plot of its own
        points = sorted((r.n, r.accuracy) for r in rows if r.strategy == strategy)
        if strategy == "coverage":  # the ceiling every verifier and vote is measured against
            ax.plot(*zip(*points), color="black", linestyle="--", marker="",
                    label="coverage (any of N right)")
        elif points:
            ax.plot(*zip(*points), marker="o", label=strategy)
    return _finish(fig, ax, rows, path, title="Test-time scaling of the toy policy with its PRM",
                   xlabel="N (samples / beams per problem)", greedy_style="--")


def _plot_revisions(rows: list[Row], path: Path) -> Path | None:
    """Accuracy against the sequential:parallel ratio at one budget, overall and by level."""
    revised = sorted((int(r.strategy.split("-")[1]), r) for r in rows if r.strategy.startswith("revisions-"))
    if not revised:
        return None
    budget = revised[0][1].n
    xs = [s for s, _ in revised]
    fig, ax = _axes()
    ax.plot(xs, [r.accuracy for _, r in revised], marker="o", color="black", linewidth=2, label="all")
    for level in sorted({k for _, r in revised for k in r.by_difficulty}):
        ax.plot(xs, [r.by_difficulty.get(level, float("nan")) for _, r in revised], marker=".",
                linestyle="--", label=f"level {level}")
    ax.set_xticks(xs, [f"{s}:{budget // s}" for s in xs])
    return _finish(fig, ax, rows, path, title="Revisions: sequential against parallel at a fixed budget",
                   xlabel=f"sequential : parallel (N = {budget} attempts)", greedy_style=":")
