"""``ttscale run``: a strategy over a benchmark file, one graded JSON line per problem, resumable
(:mod:`ttscale.evaluate`), in one process or on Ray workers (:mod:`ttscale.distributed`)."""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from pathlib import Path
from typing import Any

from ttscale.cli_flags import (
    DTYPES,
    PRM_FORMATS,
    check_device_available,
    device_name,
    escaped,
    float_in,
    positive_int,
    resolve,
    seed_value,
    writable,
)
from ttscale.errors import InvalidArgument, UsageError
from ttscale.search import registry
from ttscale.search.select import AGGREGATIONS
from ttscale.search.select import REVISION_SELECTIONS as SELECTIONS

PRM_CLASS = "ttscale.verifiers.prm:PRM"


# The command-line flag of a model argument, where it is not the model's own flag.
FLAG_OF_PARAM = {"kv_budget_bytes": "--kv-budget", "dtype": "--dtype", "device": "--device",
                 "seed": "--seed", "format": "--prm-format"}


def add_run_parser(commands) -> argparse.ArgumentParser:
    run = commands.add_parser(
        "run",
        help="search a benchmark's problems with one strategy and grade the answers",
        description="Search every problem of a JSONL file (MATH-500 or GSM8K schema), append one "
        "graded result line per problem to --out as each batch finishes, and print accuracy and "
        "cost. Rerun the same command to continue a stopped run.",
    )
    run.add_argument(
        "--model", required=True, metavar="DIR", help="policy: a local Hugging Face model directory"
    )
    verifier = run.add_mutually_exclusive_group()
    verifier.add_argument(
        "--prm", metavar="DIR", help="process reward model directory (with --prm-format)"
    )
    verifier.add_argument(
        "--oracle",
        action="store_true",
        help="verify with the known answers (rule verifier): an upper bound, not a result",
    )
    run.add_argument("--prm-format", choices=PRM_FORMATS, help="how the PRM reads steps")
    run.add_argument("--strategy", required=True, choices=list(registry.strategies()))
    run.add_argument(
        "--n", required=True, type=positive_int, help="samples (or beams) per problem"
    )
    run.add_argument(
        "--data",
        required=True,
        metavar="FILE.jsonl",
        help="problems: 'problem' or 'question', and 'answer'",
    )
    run.add_argument(
        "--out", required=True, metavar="FILE.jsonl", help="result lines are appended here"
    )
    run.add_argument("--seed", type=seed_value, default=0)
    run.add_argument("--limit", type=positive_int, metavar="K", help="only the first K problems")
    run.add_argument(
        "--batch-size",
        type=positive_int,
        default=16,
        metavar="B",
        help="problems searched together, and written together (default 16)",
    )
    run.add_argument(
        "--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
        help="search on Ray workers: a cluster's address, 'auto', or nothing for a local cluster "
             "(needs ttscale[ray])")
    run.add_argument("--num-workers", type=positive_int, default=None, metavar="K",
                     help="Ray workers, each with the models loaded once (default: one per GPU, "
                          "else 2)")
    run.add_argument("--worker-resources", default=None, metavar="CPU=N,GPU=M",
                     help="what each Ray worker takes (default: one GPU where there are GPUs, "
                          "else one CPU)")
    run.add_argument(
        "--temperature", type=float_in(0, float("inf"), False, True), default=0.8, metavar="T"
    )
    run.add_argument("--top-p", type=float_in(0, 1, True, False), default=1.0, metavar="P")
    run.add_argument(
        "--max-tokens",
        type=positive_int,
        default=2048,
        metavar="M",
        help="new tokens per solution at most (default 2048)",
    )
    run.add_argument(
        "--select",
        choices=SELECTIONS,
        help="final answer: best candidate, weighted vote, majority vote "
        "(default: weighted with a verifier, else majority)",
    )
    run.add_argument(
        "--agg",
        choices=AGGREGATIONS,
        default="last",
        help="step scores -> a candidate's score (default last)",
    )
    add_strategy_flags(run)
    run.add_argument("--system-prompt", metavar="TEXT")
    run.add_argument(
        "--step-delimiter",
        type=escaped,
        metavar="TEXT",
        default="\n\n",
        help="text between solution steps, backslash escapes allowed (default '\\n\\n')",
    )
    run.add_argument(
        "--device", type=device_name, help="cpu, cuda or cuda:N (default: cuda when available)"
    )
    run.add_argument("--dtype", choices=DTYPES, help="default: bf16 on a GPU, fp32 on the CPU")
    run.add_argument(
        "--kv-budget",
        type=float_in(0, float("inf"), True, True),
        metavar="GIB",
        help="the policy's KV cache in GiB (default: 0.9 of free GPU memory, 2 on the CPU)",
    )
    run.add_argument(
        "--save-candidates",
        action="store_true",
        help="also write each problem's whole search result (every candidate)",
    )
    return run


def _check_run_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Argument errors argparse cannot see; each names its argument and exits with code 2."""
    data, out = Path(args.data), Path(args.out)
    if not data.is_file():
        parser.error(f"argument --data: no such file: {data}")
    for flag, directory in (("--model", args.model), ("--prm", args.prm)):
        if directory is not None and not Path(directory).is_dir():
            parser.error(f"argument {flag}: no such directory: {directory}")
    if args.prm is not None and args.prm_format is None:
        parser.error("argument --prm-format: required with --prm")
    if args.prm_format is not None and args.prm is None:
        parser.error("argument --prm-format: only with --prm")
    if out.is_dir() or not out.parent.is_dir():
        parser.error(f"argument --out: not a file in an existing directory: {out}")
    if out.exists() and out.resolve() == data.resolve():
        parser.error("argument --out: is the data file; results would be appended to it")
    if not writable(out):
        parser.error(f"argument --out: cannot write {out} (checked before any model loads)")
    from ttscale.llm import DEFAULT_MAX_N  # the LLM this command loads bounds n with it

    if args.n > DEFAULT_MAX_N:
        parser.error(f"argument --n: at most {DEFAULT_MAX_N} samples (or beams) a problem, "
                     f"got {args.n}")
    for flag, value in (("--num-workers", args.num_workers),
                        ("--worker-resources", args.worker_resources)):
        if value is not None and args.ray is None:
            parser.error(f"argument {flag}: only with --ray")
    _check_strategy_flags(args, parser)
    has_verifier = args.prm is not None or args.oracle
    if args.select not in (None, "majority") and not has_verifier:
        parser.error(
            f"argument --select: {args.select!r} needs a verifier (--prm or --oracle); "
            "without one use 'majority'"
        )
    check_device_available(args.device, parser)


def flag_options() -> dict[str, tuple[dataclasses.Field, list[str]]]:
    """Every strategy option ``ttscale run`` offers as a flag: name -> (its declaration, the
    strategies that take it)."""
    flags: dict[str, tuple[dataclasses.Field, list[str]]] = {}
    for name, spec in registry.strategies().items():
        for field in spec.flag_fields():
            flags.setdefault(field.name, (field, []))[1].append(name)
    return flags


def add_strategy_flags(run: argparse.ArgumentParser) -> None:
    """One flag per strategy option, as the strategies declare them (ttscale.search.registry)."""
    for name, (field, users) in flag_options().items():
        meta = field.metadata

        def parse(text: str, name=name, meta=meta):
            try:
                value = {"int": int, "float": float, "choice": str}[meta["kind"]](text)
                return registry.check_option(name, value, meta)
            except ValueError as error:  # InvalidArgument is one
                message = str(error).split(": ", 1)[-1] if isinstance(error, InvalidArgument) else (
                    f"expected {'an integer' if meta['kind'] == 'int' else 'a number'}, got {text!r}")
                raise argparse.ArgumentTypeError(message) from None

        required = field.default is dataclasses.MISSING
        doc = " ".join(meta["doc"].split()).replace("``", "").replace("%", "%%")  # argparse's %
        run.add_argument(f"--{name.replace('_', '-')}", type=parse, metavar=meta["metavar"],
                         help=f"{', '.join(users)}: {doc}" + (" Required." if required else ""))


def _check_strategy_flags(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Flags of other strategies are refused, the strategy's required ones demanded, and its
    options checked against --n, before any model loads."""
    spec = registry.get(args.strategy)
    for name, (_, users) in flag_options().items():
        if getattr(args, name, None) is not None and name not in spec.option_names:
            parser.error(f"argument --{name.replace('_', '-')}: not an option of {args.strategy} "
                         f"(only of {', '.join(users)})")
    for name in spec.required():
        if getattr(args, name, None) is None:
            parser.error(f"argument --{name.replace('_', '-')}: required with --strategy {args.strategy}")
    try:
        spec.options(**_strategy_options(args)).check(args.n)
    except InvalidArgument as error:
        flag = "--n" if error.param == "n" else f"--{error.param.replace('_', '-')}"
        parser.error(f"argument {flag}: {str(error).split(': ', 1)[-1]}")


def _strategy_options(args: argparse.Namespace) -> dict[str, Any]:
    """The options of ``--strategy`` its flags set."""
    return {name: getattr(args, name) for name in registry.get(args.strategy).option_names
            if getattr(args, name, None) is not None}


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    """What a result line records of its run: everything that changes the answers."""
    return {
        "model": Path(args.model).resolve().name,
        "verifier": "oracle" if args.oracle else (args.prm_format if args.prm else None),
        "prm": Path(args.prm).resolve().name if args.prm else None,
        "strategy": args.strategy,
        "n": args.n,
        "seed": args.seed,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "max_tokens": args.max_tokens,
        "select": args.select,
        "agg": args.agg,
        "system_prompt": args.system_prompt,
        "step_delimiter": args.step_delimiter,
        # precision and the device change results (float sums); the batch does not: a problem's
        # random streams are keyed by its index in the data file
        "device": args.device,
        "dtype": args.dtype,
        "kv_budget": args.kv_budget,
        **_strategy_options(args),
    }


def _load(flag: str, build):
    """``build()``, with a load failure (missing or malformed files) reported against ``flag``,
    or against the flag of the argument the error names (``--dtype``, ``--kv-budget``, ...)."""
    try:
        return build()
    except InvalidArgument as error:
        raise UsageError(f"argument {FLAG_OF_PARAM.get(error.param, flag)}: {error}") from None
    except (ValueError, OSError) as error:
        raise UsageError(f"argument {flag}: {error}") from None


class Search:
    """problems -> SearchResults for ``ttscale run``, once :meth:`load_models` has run."""

    def __init__(self, args: argparse.Namespace, strategy):
        from ttscale.sampling_params import SamplingParams

        self.args, self.strategy, self.options = args, strategy, _strategy_options(args)
        self.sampling = SamplingParams(
            temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens
        )
        self.llm = self.verifier = None

    def load_models(self) -> None:
        from ttscale.engine.memory import pair_shares
        from ttscale.llm import LLM

        args = self.args
        kv_budget_bytes = None if args.kv_budget is None else int(args.kv_budget * 2**30)
        # a policy and a PRM on one GPU split its KV budget (each sizes its own on the CPU)
        policy_share, prm_share = (
            pair_shares(args.device) if args.prm is not None and kv_budget_bytes is None
            else (None, None)
        )
        policy_lease = {} if policy_share is None else {"memory_share": policy_share}
        prm_lease = {} if prm_share is None else {"memory_share": prm_share}
        self.llm = _load(
            "--model",
            lambda: LLM(
                args.model,
                device=args.device,
                dtype=args.dtype,
                seed=args.seed,
                kv_budget_bytes=kv_budget_bytes,
                **policy_lease,
            ),
        )
        if self.llm.tokenizer is None:
            raise UsageError(
                f"argument --model: {args.model} has no tokenizer.json (problems are text)"
            )
        if args.oracle:
            from ttscale.verifiers.rule import RuleVerifier

            self.verifier = RuleVerifier()
        elif args.prm is not None:
            prm = resolve(PRM_CLASS)
            placement = {
                k: v for k, v in (("device", args.device), ("dtype", args.dtype)) if v is not None
            }
            self.verifier = _load(
                "--prm",
                lambda: prm(args.prm, format=args.prm_format, **prm_lease, **placement),
            )

    def __call__(self, batch):
        args = self.args
        call = lambda: self.strategy(
            self.llm,
            [p.text for p in batch],
            args.n,
            verifier=self.verifier,
            sampling=self.sampling,
            select=args.select,
            agg=args.agg,
            seed=args.seed,
            references=[p.reference for p in batch] if args.oracle else None,
            system_prompt=args.system_prompt,
            step_delimiter=args.step_delimiter,
            problem_ids=[p.index for p in batch],  # streams keyed by the data file's index
            progress=False,
            **self.options,
        )
        # A strategy checks its arguments (and each problem) when called: a ValueError is a usage
        # error, in any batch (earlier batches' results are saved), and a problem it names by its
        # place in the batch is named by its place in the data file.
        try:
            results = call()
        except ValueError as error:
            message = re.sub(r"problems\[(\d+)\]",
                             lambda m: f"problem {batch[int(m[1])].index} of --data", str(error))
            raise UsageError(f"argument --strategy {args.strategy}: {message}") from None
        return results


def run_command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from ttscale.evaluate import DataError, format_summary, read_problems, run_evaluation

    _check_run_args(args, parser)
    strategy = registry.get(args.strategy).function
    execute = _ray_executor(args, parser) if args.ray is not None else None
    # Errors are UsageErrors naming the flag: one line from main (exit 2), a traceback with --debug.
    try:
        every_problem = read_problems(args.data)
    except DataError as error:
        raise UsageError(f"argument --data: {error}") from error
    try:
        problems = every_problem[: args.limit]
        search = Search(args, strategy)
        summary = run_evaluation(
            search,
            problems,
            args.out,
            all_problems=every_problem,
            batch_size=args.batch_size,
            settings=_settings(args),
            save_candidates=args.save_candidates,
            # the models load where the search runs: here, or once on each Ray worker; not at
            # all when a rerun finds every problem answered
            setup=None if execute else search.load_models,
            execute=execute,
        )
    except DataError as error:  # the output file's lines: another run's, or damaged
        raise UsageError(f"argument --out: {error}") from error
    except KeyboardInterrupt:
        print(
            f"ttscale run: interrupted; finished batches are in {args.out}: rerun the same command "
            "to continue",
            file=sys.stderr,
        )
        return 130
    print(f"{args.strategy}, n={args.n}, on {summary.problems} problems of {args.data}")
    print(format_summary(summary))
    return 0


def _ray_executor(args: argparse.Namespace, parser: argparse.ArgumentParser):
    from ttscale import distributed

    if distributed.ray_module() is None:
        parser.error(f"argument --ray: Ray is not installed: {distributed.RAY_HINT}")
    try:
        resources = distributed.parse_resources(args.worker_resources)
    except ValueError as error:
        parser.error(f"argument --worker-resources: {error}")
    return distributed.executor(args, args.num_workers, resources, args.ray)
