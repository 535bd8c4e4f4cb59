"""The command line's bad inputs, one row each: the arguments, the flag the error must name, and
the exit code (2: the user's mistake, 1: a failure of the run itself). Every row runs in-process
through ``cli.main(argv)``: stderr is one line naming the flag, without a traceback, and no
model is searched with (nor, for ``serve``, any server started). A few rows also run as real
processes."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable

import pytest
import torch

from ttscale import cli
from ttscale.errors import UsageError
from ttscale.search import registry
from ttscale.toy import policy_dir, prm_dir

GPU = torch.cuda.is_available()


class Files:
    """The paths rows name: a data file, an output file, a plain file and a folder."""

    def __init__(self, folder):
        self.folder = folder
        self.data = folder / "data.jsonl"
        self.data.write_text('{"problem": "Q: 1+1\\n", "answer": "2"}\n')
        self.broken = folder / "broken.jsonl"
        self.broken.write_text('{"problem": "Q: 1+1\\n", "answer": "2"}\n{nope\n')
        self.out = folder / "out.jsonl"
        self.damaged = folder / "damaged.jsonl"
        self.damaged.write_text("not a result line\n")
        self.file = folder / "file.txt"
        self.file.write_text("x")
        self.empty_model = folder / "empty_model"
        self.empty_model.mkdir()


def command(name: str, base: Callable[[Files], list[str]]) -> Callable[..., list[str]]:
    """A row builder: ``builder(f, *extra)`` is ``ttscale NAME`` with the arguments every row of
    that command shares (``base(f)``), then the row's ``extra`` flags (the last of a flag given
    twice wins)."""
    return lambda f, *extra: [name, *base(f), *extra]


# best-of-N on the toy policy
run = command("run", lambda f: [
    "--model", str(policy_dir()), "--strategy", "best_of_n", "--n", "2", "--data", str(f.data),
    "--out", str(f.out), "--device", "cpu", "--max-tokens", "8", "--step-delimiter", "\\n"])
demo = command("demo", lambda f: ["--out", str(f.folder / "demo_out")])
serve = command("serve", lambda f: ["toy"])


# (name, argv given the files, the flag stderr names, the exit code)
ROWS = [
    ("run --n 0", lambda f: run(f, "--n", "0"), "--n", 2),
    ("run --n two", lambda f: run(f, "--n", "two"), "--n", 2),
    ("run --n above max_n", lambda f: run(f, "--n", "2000"), "--n", 2),
    ("run --strategy unknown", lambda f: run(f, "--strategy", "nope"), "--strategy", 2),
    ("run --seed < 0", lambda f: run(f, "--seed", "-1"), "--seed", 2),
    ("run --seed 1.5", lambda f: run(f, "--seed", "1.5"), "--seed", 2),
    ("run --seed 2**64", lambda f: run(f, "--seed", str(2**64)), "--seed", 2),
    ("run --temperature < 0", lambda f: run(f, "--temperature", "-1"), "--temperature", 2),
    ("run --temperature nan", lambda f: run(f, "--temperature", "nan"), "--temperature", 2),
    ("run --top-p 0", lambda f: run(f, "--top-p", "0"), "--top-p", 2),
    ("run --max-tokens 0", lambda f: run(f, "--max-tokens", "0"), "--max-tokens", 2),
    ("run --limit 0", lambda f: run(f, "--limit", "0"), "--limit", 2),
    ("run --batch-size 0", lambda f: run(f, "--batch-size", "0"), "--batch-size", 2),
    ("run --select best without a verifier", lambda f: run(f, "--select", "best"), "--select", 2),
    ("run --select unknown", lambda f: run(f, "--select", "nope"), "--select", 2),
    ("run --agg unknown", lambda f: run(f, "--agg", "max"), "--agg", 2),
    ("run --beam-width with best_of_n", lambda f: run(f, "--beam-width", "4"), "--beam-width", 2),
    ("run --sequential with best_of_n", lambda f: run(f, "--sequential", "2"), "--sequential", 2),
    ("run revisions without --sequential", lambda f: run(f, "--strategy", "revisions"),
     "--sequential", 2),
    ("run --reject-fraction 1", lambda f: run(f, "--strategy", "rejection_best_of_n",
                                              "--reject-fraction", "1"), "--reject-fraction", 2),
    ("run --resample-temperature 0", lambda f: run(f, "--strategy", "particle_filtering",
                                                   "--oracle", "--resample-temperature", "0"),
     "--resample-temperature", 2),
    ("run --branching with best_of_n", lambda f: run(f, "--branching", "2"), "--branching", 2),
    ("run --prm without --prm-format", lambda f: run(f, "--prm", str(prm_dir())),
     "--prm-format", 2),
    ("run --prm-format without --prm", lambda f: run(f, "--prm-format", "skywork"),
     "--prm-format", 2),
    ("run --prm missing", lambda f: run(f, "--prm", str(f.folder / "none"), "--prm-format",
                                        "skywork"), "--prm", 2),
    ("run --prm with --oracle", lambda f: run(f, "--prm", str(prm_dir()), "--prm-format",
                                              "math-shepherd", "--oracle"), "--oracle", 2),
    ("run --prm of another format", lambda f: run(f, "--prm", str(prm_dir()), "--prm-format",
                                                  "skywork"), "--prm-format", 2),
    ("run --model missing", lambda f: run(f, "--model", str(f.folder / "none")), "--model", 2),
    ("run --model a file", lambda f: run(f, "--model", str(f.file)), "--model", 2),
    ("run --model without config.json", lambda f: run(f, "--model", str(f.empty_model)),
     "--model", 2),
    ("run --data missing", lambda f: run(f, "--data", str(f.folder / "none.jsonl")), "--data", 2),
    ("run --data a folder", lambda f: run(f, "--data", str(f.folder)), "--data", 2),
    ("run --data malformed", lambda f: run(f, "--data", str(f.broken)), "--data", 2),
    ("run --out in a missing folder", lambda f: run(f, "--out", str(f.folder / "no" / "o.jsonl")),
     "--out", 2),
    ("run --out the data file", lambda f: run(f, "--out", str(f.data)), "--out", 2),
    ("run --out a folder", lambda f: run(f, "--out", str(f.folder)), "--out", 2),
    ("run --out not result lines", lambda f: run(f, "--out", str(f.damaged)), "--out", 2),
    ("run --device gpu", lambda f: run(f, "--device", "gpu"), "--device", 2),
    ("run --device unavailable", lambda f: run(f, "--device", "cuda:99" if GPU else "cuda"),
     "--device", 2),
    ("run --dtype unknown", lambda f: run(f, "--dtype", "int8"), "--dtype", 2),
    ("run --dtype fp16 on the CPU", lambda f: run(f, "--dtype", "float16"), "--dtype", 2),
    ("run --kv-budget 0", lambda f: run(f, "--kv-budget", "0"), "--kv-budget", 2),
    ("run --kv-budget holds no block", lambda f: run(f, "--kv-budget", "1e-9"), "--kv-budget", 2),
    ("run --step-delimiter ''", lambda f: run(f, "--step-delimiter", ""), "--step-delimiter", 2),
    ("run --step-delimiter bad escape", lambda f: run(f, "--step-delimiter", "\\x"),
     "--step-delimiter", 2),
    ("run --num-workers without --ray", lambda f: run(f, "--num-workers", "2"),
     "--num-workers", 2),
    ("run --worker-resources without --ray", lambda f: run(f, "--worker-resources", "CPU=1"),
     "--worker-resources", 2),
    ("run without --model", lambda f: ["run", "--strategy", "best_of_n", "--n", "2", "--data",
                                       str(f.data), "--out", str(f.out)], "--model", 2),
    ("run --n without a value", lambda f: ["run", "--n"], "--n", 2),
    ("an unknown command", lambda f: ["nope"], "command", 2),
    ("an unknown flag", lambda f: ["--nope"], "--nope", 2),
    ("demo --n 0", lambda f: demo(f, "--n", "0"), "--n", 2),
    ("demo --n x", lambda f: demo(f, "--n", "x"), "--n", 2),
    ("demo --n not a multiple of the beams", lambda f: demo(f, "--n", "6", "--strategies",
                                                            "beam_search"), "--n", 2),
    ("demo --n above max_n", lambda f: demo(f, "--n", "2048", "--strategies", "greedy"), "--n", 2),
    ("demo --strategies unknown", lambda f: demo(f, "--strategies", "nope"), "--strategies", 2),
    ("demo --strategies ''", lambda f: demo(f, "--strategies", ""), "--strategies", 2),
    ("demo --problems 0", lambda f: demo(f, "--problems", "0"), "--problems", 2),
    ("demo --problems 10**9", lambda f: demo(f, "--problems", str(10**9)), "--problems", 2),
    ("demo --seed < 0", lambda f: demo(f, "--seed", "-1"), "--seed", 2),
    ("demo --device tpu", lambda f: demo(f, "--device", "tpu"), "--device", 2),
    ("demo --out a file", lambda f: ["demo", "--out", str(f.file)], "--out", 2),
    ("demo --models missing", lambda f: demo(f, "--models", str(f.folder / "none")), "--models", 2),
    ("selfcheck --device tpu", lambda f: ["selfcheck", "--device", "tpu"], "--device", 2),
    ("selfcheck --seed < 0", lambda f: ["selfcheck", "--seed", "-1"], "--seed", 2),
    ("serve model missing", lambda f: ["serve", str(f.folder / "none")], "model", 2),
    ("serve --prm missing", lambda f: serve(f, "--prm", str(f.folder / "none"), "--prm-format",
                                            "skywork"), "--prm", 2),
    ("serve --prm without --prm-format", lambda f: serve(f, "--prm", str(prm_dir())),
     "--prm-format", 2),
    ("serve --prm-format unknown", lambda f: serve(f, "--prm", "toy", "--prm-format", "nope"),
     "--prm-format", 2),
    ("serve --prm-format without --prm", lambda f: serve(f, "--prm-format", "skywork"),
     "--prm-format", 2),
    ("serve --port 99999", lambda f: serve(f, "--port", "99999"), "--port", 2),
    ("serve --port x", lambda f: serve(f, "--port", "x"), "--port", 2),
    ("serve --max-n 0", lambda f: serve(f, "--max-n", "0"), "--max-n", 2),
    ("serve --max-queue 0", lambda f: serve(f, "--max-queue", "0"), "--max-queue", 2),
    ("serve --max-tokens 0", lambda f: serve(f, "--max-tokens", "0"), "--max-tokens", 2),
    ("serve --grace < 0", lambda f: serve(f, "--grace", "-1"), "--grace", 2),
    ("serve --api-key ''", lambda f: serve(f, "--api-key", ""), "--api-key", 2),
    ("serve --host ''", lambda f: serve(f, "--host", ""), "--host", 2),
    ("serve --served-model-name ''", lambda f: serve(f, "--served-model-name", ""),
     "--served-model-name", 2),
    ("serve --step-delimiter ''", lambda f: serve(f, "--step-delimiter", ""), "--step-delimiter", 2),
    ("serve --seed < 0", lambda f: serve(f, "--seed", "-1"), "--seed", 2),
    ("serve --device tpu", lambda f: serve(f, "--device", "tpu"), "--device", 2),
    ("serve --dtype unknown", lambda f: serve(f, "--dtype", "int8"), "--dtype", 2),
    # a failure of the run itself (the strategy breaks): exit 1, one line, the hint to --debug
    ("run whose search fails", lambda f: run(f, "--strategy", "broken"), "--debug", 1),
]


def broken_strategy(*args, **kwargs):
    raise RuntimeError("the device fell over")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return Files(tmp_path_factory.mktemp("cli_errors"))


@pytest.fixture
def no_server(monkeypatch):
    """``serve`` rows must fail before a server starts; ``run`` rows may use a broken strategy."""
    def started(args):
        raise AssertionError("a bad serve argument must be refused before the server starts")

    monkeypatch.setattr("ttscale.serve.server.run", started)
    registry.strategies()  # the real ones first, so that they do not load later over this one
    monkeypatch.setitem(registry._REGISTRY, "broken", registry.Strategy(
        "broken", broken_strategy, registry.Options, needs_verifier=False, budget="n",
        summary="broken"))


def main(argv: list[str], capsys) -> tuple[int, str]:
    try:
        code = cli.main(argv)
    except SystemExit as exit_:  # argparse's errors
        code = exit_.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize("argv, flag, code", [row[1:] for row in ROWS], ids=[r[0] for r in ROWS])
def test_bad_flag_is_one_line_naming_it(files, no_server, capsys, argv, flag, code):
    got, err = main(argv(files), capsys)
    assert got == code, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert flag in lines[-1], err
    if code == 2:  # refused before any work: the one line is all
        assert len(lines) == 1 and not files.out.exists(), err
    files.out.unlink(missing_ok=True)  # a failed run leaves its (empty) output file


def test_the_table_covers_every_command():
    assert len(ROWS) >= 60
    assert {name.split()[0] for name, *_ in ROWS} >= {"run", "demo", "selfcheck", "serve"}


def test_debug_shows_the_traceback_of_a_usage_error(files, no_server, capsys):
    argv = run(files, "--model", str(files.empty_model))
    with pytest.raises(UsageError, match="argument --model"):
        cli.main([*argv, "--debug"])


@pytest.mark.parametrize("row", ["run --n above max_n", "run --model without config.json",
                                 "demo --strategies ''", "serve --api-key ''"])
def test_in_a_real_process(files, row):
    (argv, flag, code), = [r[1:] for r in ROWS if r[0] == row]
    done = subprocess.run([sys.executable, "-m", "ttscale", *argv(files)], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "TTSCALE_DEBUG": "0"})
    assert done.returncode == code and "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and flag in lines[0], done.stderr


def test_ttscale_debug_shows_the_traceback_in_a_real_process(files):
    argv = run(files, "--model", str(files.empty_model))
    done = subprocess.run([sys.executable, "-m", "ttscale", *argv], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "TTSCALE_DEBUG": "1"})
    assert done.returncode != 0 and "Traceback" in done.stderr and "--model" in done.stderr
