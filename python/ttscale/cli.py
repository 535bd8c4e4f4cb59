"""The ``ttscale`` command line: ``run`` (:mod:`ttscale.run_command`), ``demo``, ``selfcheck``
and ``serve``; the flag types they share are in :mod:`ttscale.cli_flags`."""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

import ttscale
from ttscale.cli_flags import (
    DTYPES,
    Parser,
    budgets,
    check_device_available,
    device_name,
    escaped,
    float_in,
    names,
    nonempty_text,
    port,
    positive_int,
    seed_value,
)
from ttscale.errors import InvalidArgument, UsageError  # UsageError re-exported here
from ttscale.run_command import add_run_parser, run_command


def _add_serve_parser(commands) -> argparse.ArgumentParser:
    serve = commands.add_parser(
        "serve", help="an OpenAI-compatible HTTP server (needs ttscale[serve])",
        description="Serve MODEL over the OpenAI API: /v1/completions, /v1/chat/completions, "
        "/v1/models, /health, /metrics. Every request shares the engine's decode steps.")
    serve.add_argument("model", help="a local Hugging Face model folder, or 'toy' for the embedded policy")
    serve.add_argument("--prm", default=None, help="a PRM folder for searches, or 'toy'")
    serve.add_argument("--prm-format", default=None,
                       choices=["math-shepherd", "rlhflow", "qwen2.5-math-prm", "skywork"])
    serve.add_argument("--step-delimiter", type=escaped, default=None,
                       help="text between a solution's steps, backslash escapes allowed (default "
                            "'\\n\\n'; '\\n' for toy)")
    serve.add_argument("--host", type=nonempty_text, default="127.0.0.1")
    serve.add_argument("--port", type=port, default=8000)
    serve.add_argument("--api-key", type=nonempty_text, default=None, help="require 'Authorization: Bearer KEY' "
                       "(also TTSCALE_API_KEY)")
    serve.add_argument("--served-model-name", type=nonempty_text, default=None)
    serve.add_argument("--max-queue", type=positive_int, default=1024,
                       help="waiting requests beyond which new ones get 429 (default 1024)")
    serve.add_argument("--max-n", type=positive_int, default=1024,
                       help="most samples a request may ask for (default 1024)")
    serve.add_argument("--max-tokens", type=positive_int, default=256,
                       help="max_tokens when a request gives none (default 256)")
    serve.add_argument("--grace", type=float_in(0, float("inf"), False, True), default=30.0,
                       help="seconds in-flight requests get to finish after SIGTERM (default 30)")
    serve.add_argument("--device", type=device_name, default=None)
    serve.add_argument("--dtype", default=None, choices=DTYPES)
    serve.add_argument("--seed", type=seed_value, default=0)
    return serve


def _check_serve_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """What argparse cannot see, before any model loads: folders exist, flags that need another
    are given with it."""
    for flag, folder in (("model", args.model), ("--prm", args.prm)):
        if folder is not None and folder != "toy" and not Path(folder).is_dir():
            parser.error(f"argument {flag}: no such directory: {folder} (or 'toy')")
    if args.prm is not None and args.prm != "toy" and args.prm_format is None:
        parser.error("argument --prm-format: required with --prm DIR")
    if args.prm is None and args.prm_format is not None:
        parser.error("argument --prm-format: only with --prm")
    check_device_available(args.device, parser)


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
    parser = Parser(prog="ttscale", description=__doc__)
    parser.add_argument("--version", action="version", version=f"ttscale {ttscale.__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an error (also TTSCALE_DEBUG=1)")
    commands = parser.add_subparsers(dest="command")
    check = commands.add_parser("selfcheck", help="run every op on every available backend against the reference")
    check.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available, and cpu)")
    check.add_argument("--seed", type=seed_value, default=0)
    run = add_run_parser(commands)
    demo = commands.add_parser("demo", help="test-time scaling of the embedded toy policy and PRM (CPU, no download)")
    demo.add_argument("--n", type=budgets, default=(1, 4, 16, 64), metavar="N[,N...]",
                      help="budgets N (default 1,4,16,64)")
    demo.add_argument("--strategies", type=names, default=None, metavar="NAME[,NAME...]",
                      help="rows: greedy, majority, best_of_n, weighted (with coverage, from one "
                           "pool) and any strategy of ttscale run, or 'all' (default greedy, "
                           "majority, best_of_n, weighted, beam_search, dvts, revisions)")
    demo.add_argument("--problems", type=positive_int, default=200,
                      help="held-out problems (default 200)")
    demo.add_argument("--device", type=device_name, default=None,
                      help="cpu, cuda or cuda:N (default: cuda when available)")
    demo.add_argument("--out", type=Path, default=Path("demo_out"), help="folder for results.json and the plot")
    demo.add_argument("--seed", type=seed_value, default=0)
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
        _check_serve_args(args, serve)
        from ttscale.serve.server import run as run_server

        return run_server(args)
    if args.command == "demo":
        from ttscale.demo import STRATEGIES, choices, model_dirs, run_demo

        if args.strategies is not None and not args.strategies:
            demo.error(f"argument --strategies: expected names among {', '.join(choices())}")
        strategies = args.strategies or STRATEGIES
        strategies = choices() if "all" in strategies else strategies
        bad = [s for s in strategies if s not in choices()]
        if bad:
            demo.error(f"argument --strategies: unknown {bad}; choose from {', '.join(choices())}")
        check_device_available(args.device, demo)
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
        check_device_available(args.device, check)
        return run_selfcheck(device=args.device, seed=args.seed)
    if args.command == "run":
        return run_command(args, run)
    parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
