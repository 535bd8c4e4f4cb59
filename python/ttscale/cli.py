"""The ``ttscale`` command line."""

from __future__ import annotations

import argparse
import sys

import ttscale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ttscale", description=__doc__)
    parser.add_argument("--version", action="version", version=f"ttscale {ttscale.__version__}")
    commands = parser.add_subparsers(dest="command")
    check = commands.add_parser("selfcheck", help="run every op on every available backend against the reference")
    check.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available, and cpu)")
    check.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "selfcheck":
        from ttscale.selfcheck import run_selfcheck

        return run_selfcheck(device=args.device, seed=args.seed)
    parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
