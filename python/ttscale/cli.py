"""The ``ttscale`` command line."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

import ttscale
from ttscale.errors import InvalidArgument, UsageError  # UsageError re-exported here
from ttscale.search import registry
from ttscale.search.select import AGGREGATIONS
from ttscale.search.select import REVISION_SELECTIONS as SELECTIONS

PRM_CLASS = "ttscale.verifiers.prm:PRM"
PRM_FORMATS = ("math-shepherd", "rlhflow", "qwen2.5-math-prm", "skywork")
DTYPES = ("float32", "bfloat16", "float16")


def resolve(target: Any) -> Any:
    """The object a ``"module:name"`` string names; anything else is returned as it is."""
    if not isinstance(target, str):
        return target
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def _float_in(low: float, high: float, low_open: bool, high_open: bool):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        above = value > low if low_open else value >= low
        below = value < high if high_open else value <= high
        if not (above and below):
            interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
            raise argparse.ArgumentTypeError(f"expected a value in {interval}, got {text}")
        return value

    return parse


def _escaped(text: str) -> str:
    """Backslash escapes decoded (``'\\n\\n'`` typed in a shell is two newlines)."""
    try:
        value = text.encode("latin-1", "backslashreplace").decode("unicode_escape")
    except UnicodeDecodeError as error:
        raise argparse.ArgumentTypeError(f"bad escape in {text!r} ({error.reason})") from None
    if not value:
        raise argparse.ArgumentTypeError("expected a non-empty string")
    return value


def _device(text: str) -> str:
    if not re.fullmatch(r"cpu|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")
    return text


def _add_run_parser(commands) -> argparse.ArgumentParser:
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
        "--n", required=True, type=_positive_int, help="samples (or beams) per problem"
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
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--limit", type=_positive_int, metavar="K", help="only the first K problems")
    run.add_argument(
        "--batch-size",
        type=_positive_int,
        default=16,
        metavar="B",
        help="problems searched together, and written together (default 16)",
    )
    run.add_argument(
        "--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
        help="search on Ray workers: a cluster's address, 'auto', or nothing for a local cluster "
             "(needs ttscale[ray])")
    run.add_argument("--num-workers", type=_positive_int, default=None, metavar="K",
                     help="Ray workers, each with the models loaded once (default: one per GPU, "
                          "else 2)")
    run.add_argument("--worker-resources", default=None, metavar="CPU=N,GPU=M",
                     help="what each Ray worker takes (default: one GPU where there are GPUs, "
                          "else one CPU)")
    run.add_argument(
        "--temperature", type=_float_in(0, float("inf"), False, True), default=0.8, metavar="T"
    )
    run.add_argument("--top-p", type=_float_in(0, 1, True, False), default=1.0, metavar="P")
    run.add_argument(
        "--max-tokens",
        type=_positive_int,
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
    _add_strategy_flags(run)
    run.add_argument("--system-prompt", metavar="TEXT")
    run.add_argument(
        "--step-delimiter",
        type=_escaped,
        metavar="TEXT",
        default="\n\n",
        help="text between solution steps, backslash escapes allowed (default '\\n\\n')",
    )
    run.add_argument(
        "--device", type=_device, help="cpu, cuda or cuda:N (default: cuda when available)"
    )
    run.add_argument("--dtype", choices=DTYPES, help="default: bf16 on a GPU, fp32 on the CPU")
    run.add_argument(
        "--kv-budget",
        type=_float_in(0, float("inf"), True, True),
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
    if not _writable(out):
        parser.error(f"argument --out: cannot write {out} (checked before any model loads)")
    _check_strategy_flags(args, parser)
    has_verifier = args.prm is not None or args.oracle
    if args.select not in (None, "majority") and not has_verifier:
        parser.error(
            f"argument --select: {args.select!r} needs a verifier (--prm or --oracle); "
            "without one use 'majority'"
        )
    _check_device_available(args.device, parser)


def _writable(path: Path) -> bool:
    """Whether ``path`` (a file, existing or not) can be written: tried, not guessed from modes."""
    if path.exists():
        return os.access(path, os.W_OK) and path.is_file()
    try:
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".ttscale-check-"):
            return True
    except OSError:
        return False


def _check_device_available(device: str | None, parser: argparse.ArgumentParser) -> None:
    if device is not None and device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            parser.error(f"argument --device: {device} is not available on this machine")


def _flag_options() -> dict[str, tuple[dataclasses.Field, list[str]]]:
    """Every strategy option ``ttscale run`` offers as a flag: name -> (its declaration, the
    strategies that take it)."""
    flags: dict[str, tuple[dataclasses.Field, list[str]]] = {}
    for name, spec in registry.strategies().items():
        for field in dataclasses.fields(spec.options):
            if field.metadata.get("flag"):
                flags.setdefault(field.name, (field, []))[1].append(name)
    return flags


def _add_strategy_flags(run: argparse.ArgumentParser) -> None:
    """One flag per strategy option, as the strategies declare them (ttscale.search.registry)."""
    for name, (field, users) in _flag_options().items():
        meta = field.metadata

        def parse(text: str, name=name, meta=meta):
            try:
                value = (int if meta["kind"] == "int" else float)(text)
                return registry.check_option(name, value, meta)
            except ValueError as error:  # InvalidArgument is one
                message = str(error).split(": ", 1)[-1] if isinstance(error, InvalidArgument) else (
                    f"expected {'an integer' if meta['kind'] == 'int' else 'a number'}, got {text!r}")
                raise argparse.ArgumentTypeError(message) from None

        required = field.default is dataclasses.MISSING
        doc = " ".join(meta["doc"].split()).replace("``", "")
        run.add_argument(f"--{name.replace('_', '-')}", type=parse, metavar=meta["metavar"],
                         help=f"{', '.join(users)}: {doc}" + (" Required." if required else ""))


def _check_strategy_flags(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Flags of other strategies are refused, the strategy's required ones demanded, and its
    options checked against --n, before any model loads."""
    spec = registry.get(args.strategy)
    for name, (_, users) in _flag_options().items():
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
    """``build()``, with a load failure (missing or malformed files) reported against ``flag``."""
    try:
        return build()
    except (ValueError, OSError) as error:
        raise UsageError(f"argument {flag}: {error}") from None


class _Search:
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


def _run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from ttscale.evaluate import DataError, format_summary, read_problems, run_evaluation

    _check_run_args(args, parser)
    strategy = registry.get(args.strategy).function
    execute = _ray_executor(args, parser) if args.ray is not None else None
    try:
        every_problem = read_problems(args.data)
        problems = every_problem[: args.limit]
        search = _Search(args, strategy)
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
    except (DataError, UsageError) as error:
        print(f"ttscale run: error: {error}", file=sys.stderr)
        return 2
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


def _budgets(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _add_serve_parser(commands) -> argparse.ArgumentParser:
    serve = commands.add_parser(
        "serve", help="an OpenAI-compatible HTTP server (needs ttscale[serve])",
        description="Serve MODEL over the OpenAI API: /v1/completions, /v1/chat/completions, "
        "/v1/models, /health, /metrics. Every request shares the engine's decode steps.")
    serve.add_argument("model", help="a local Hugging Face model folder, or 'toy' for the embedded policy")
    serve.add_argument("--prm", default=None, help="a PRM folder for searches, or 'toy'")
    serve.add_argument("--prm-format", default=None,
                       choices=["math-shepherd", "rlhflow", "qwen2.5-math-prm", "skywork"])
    serve.add_argument("--step-delimiter", default=None,
                       help="text between a solution's steps (default '\\n\\n'; '\\n' for toy)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=_port, default=8000)
    serve.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' "
                       "(also TTSCALE_API_KEY)")
    serve.add_argument("--served-model-name", default=None)
    serve.add_argument("--max-queue", type=_positive_int, default=1024,
                       help="waiting requests beyond which new ones get 429 (default 1024)")
    serve.add_argument("--max-n", type=_positive_int, default=1024,
                       help="most samples a request may ask for (default 1024)")
    serve.add_argument("--max-tokens", type=_positive_int, default=256,
                       help="max_tokens when a request gives none (default 256)")
    serve.add_argument("--grace", type=float, default=30.0,
                       help="seconds in-flight requests get to finish after SIGTERM (default 30)")
    serve.add_argument("--device", type=_device, default=None)
    serve.add_argument("--dtype", default=None, choices=DTYPES)
    serve.add_argument("--seed", type=int, default=0)
    return serve


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port in [0, 65535], got {port}")
    return port


def _names(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def main(argv: list[str] | None = None) -> int:
    """The ``ttscale`` command. A user's mistake is one line on stderr naming the flag (exit 2);
    a failure of the run itself one line too (exit 1); ``--debug`` or ``TTSCALE_DEBUG=1`` shows
    the traceback instead."""
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv or os.environ.get("TTSCALE_DEBUG", "0") not in ("", "0")
    try:
        return _main([a for a in argv if a != "--debug"])
    except (UsageError, InvalidArgument) as error:
        if debug:
            raise
        print(f"ttscale: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if debug:
            raise
        print("ttscale: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001  (one line, not a traceback; --debug shows it)
        if debug:
            raise
        print(f"ttscale: error: {type(error).__name__}: {error} (rerun with --debug for the "
              "traceback)", file=sys.stderr)
        return 1


def _main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="ttscale", description=__doc__)
    parser.add_argument("--version", action="version", version=f"ttscale {ttscale.__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an error (also TTSCALE_DEBUG=1)")
    commands = parser.add_subparsers(dest="command")
    check = commands.add_parser("selfcheck", help="run every op on every available backend against the reference")
    check.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available, and cpu)")
    check.add_argument("--seed", type=int, default=0)
    run = _add_run_parser(commands)
    demo = commands.add_parser("demo", help="test-time scaling of the embedded toy policy and PRM (CPU, no download)")
    demo.add_argument("--n", type=_budgets, default=(1, 4, 16, 64), metavar="N[,N...]",
                      help="budgets N (default 1,4,16,64)")
    demo.add_argument("--strategies", type=_names, default=None, metavar="NAME[,NAME...]",
                      help="greedy, majority, best_of_n, weighted, beam_search, dvts, revisions "
                           "(default all)")
    demo.add_argument("--problems", type=int, default=200, help="held-out problems (default 200)")
    demo.add_argument("--device", type=_device, default=None,
                      help="cpu, cuda or cuda:N (default: cuda when available)")
    demo.add_argument("--out", type=Path, default=Path("demo_out"), help="folder for results.json and the plot")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--models", type=Path, default=None, metavar="DIR",
                      help="policy/ and prm/ from python -m ttscale.toy.train --out DIR "
                           "(default: the embedded models)")
    serve = _add_serve_parser(commands)
    from ttscale.benchmark import throughput  # `ttscale bench throughput`

    throughput.add_parser(commands)
    args = parser.parse_args(argv)
    if args.command == "bench":
        return throughput.run(args)
    if args.command == "serve":
        if args.prm is not None and args.prm != "toy" and args.prm_format is None:
            serve.error("argument --prm-format: required with --prm DIR")
        _check_device_available(args.device, serve)
        from ttscale.serve.server import run as run_server

        return run_server(args)
    if args.command == "demo":
        from ttscale.demo import STRATEGIES, choices, model_dirs, run_demo

        strategies = args.strategies or STRATEGIES
        bad = [s for s in strategies if s not in choices()]
        if bad or args.problems < 1:
            demo.error(f"argument --strategies: unknown {bad}; choose from {', '.join(choices())}"
                       if bad else f"argument --problems: expected >= 1, got {args.problems}")
        _check_device_available(args.device, demo)
        if args.models is not None:
            try:
                model_dirs(args.models)
            except ValueError as error:
                demo.error(f"argument --{error}")
        if args.out.exists() and not args.out.is_dir():
            demo.error(f"argument --out: {args.out} is a file; the demo writes a folder")
        try:
            args.out.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            demo.error(f"argument --out: cannot create {args.out}: {error.strerror}")
        try:
            run_demo(ns=args.n, strategies=strategies, num_problems=args.problems,
                     device=args.device, out=args.out, seed=args.seed, models=args.models)
        except InvalidArgument as error:  # the demo checks its options before any model work
            if error.param in ("n", "strategies", "problems"):
                demo.error(f"argument --{error.param}: {str(error).split(': ', 1)[-1]}")
            raise
        return 0
    if args.command == "selfcheck":
        from ttscale.selfcheck import run_selfcheck

        if args.device is not None and args.device not in ("cpu", "cuda") and not re.fullmatch(
                r"cuda:\d+", args.device):
            check.error(f"argument --device: expected cpu or cuda, got {args.device!r}")
        _check_device_available(args.device, check)
        return run_selfcheck(device=args.device, seed=args.seed)
    if args.command == "run":
        return _run(args, run)
    parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
