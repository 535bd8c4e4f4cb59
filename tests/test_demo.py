"""``ttscale demo`` (issues 7 and 8): the rows, files and errors it promises, on tiny models.

The shipped models' accuracy is the training script's business; these tests run the demo end to
end on the one-layer models of ``python -m ttscale.toy.train --tiny`` and check its contract:
``results.json`` rows, both plots, the table, and clear errors for bad options.
"""

import json
import os
import re
import subprocess
import sys

import pytest

import ttscale.toy
from ttscale import demo

ROW_KEYS = {"strategy", "n", "accuracy", "problems", "tokens", "seconds", "by_difficulty"}


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "ttscale.toy.train", "--tiny", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return out


@pytest.fixture
def use_tiny(tiny_models, monkeypatch):
    monkeypatch.setattr(ttscale.toy, "policy_dir", lambda: tiny_models / "policy")
    monkeypatch.setattr(ttscale.toy, "prm_dir", lambda: tiny_models / "prm")


@pytest.mark.slow
def test_demo_writes_every_row_and_both_plots(tiny_models, tmp_path, capsys):
    # the models of a training run (--models), not the embedded ones
    rows = demo.run_demo(ns=(1, 2, 4), num_problems=3, device="cpu", out=tmp_path, progress=False,
                         models=tiny_models)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved == [r.__dict__ for r in rows]
    names = [(r["strategy"], r["n"]) for r in saved]
    expected = [("greedy", 1)]
    pooled = ("majority", "best_of_n", "weighted", "coverage")
    expected += [(s, n) for n in (1, 2, 4) for s in pooled]
    expected += [(s, n) for s in ("beam_search", "dvts") for n in (1, 2, 4)]
    expected += [(f"revisions-{s}", 4) for s in (1, 2, 4)]  # budget min(16, max N) = 4
    assert names == expected
    for row in saved:
        assert set(row) == ROW_KEYS
        assert 0.0 <= row["accuracy"] <= 1.0 and row["problems"] == 3
        assert row["tokens"] >= 0 and row["seconds"] >= 0
        assert row["by_difficulty"] and all(0.0 <= v <= 1.0 for v in row["by_difficulty"].values())
    coverage = [r["accuracy"] for r in saved if r["strategy"] == "coverage"]
    assert coverage == sorted(coverage)  # any of N right can only grow with N
    for plot in ("scaling.png", "revisions.png"):
        assert (tmp_path / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "revisions-4" in printed and "tokens/s" in printed and str(tmp_path / "scaling.png") in printed
    # where the time went: one line per strategy (its N together), then the total
    wall = printed[printed.index("wall time:"):].splitlines()[1:]
    seconds = {m[1]: float(m[2]) for m in (re.match(r"\s+(.+?)\s+([\d.]+) s\b", line) for line in wall) if m}
    assert list(seconds) == ["loading the models", "greedy",
                             "one pool of 4 (majority, best_of_n, weighted)", "beam_search", "dvts",
                             "revisions", "total"]
    assert all(s >= 0 for s in seconds.values())
    assert sum(seconds.values()) - seconds["total"] <= seconds["total"] + 1e-6


@pytest.mark.slow
def test_demo_without_revisions_writes_no_ratio_plot(use_tiny, tmp_path):
    rows = demo.run_demo(ns=(1,), strategies=("greedy", "revisions"), num_problems=2, device="cpu",
                         out=tmp_path, progress=False)
    assert [r.strategy for r in rows] == ["greedy", "revisions-1"]
    rows = demo.run_demo(ns=(1,), strategies=("greedy",), num_problems=2, device="cpu",
                         out=tmp_path / "b", progress=False)
    assert not (tmp_path / "b" / "revisions.png").exists()


def test_revision_ratios():
    assert demo.revision_ratios(16) == [1, 2, 4, 8, 16]
    assert demo.revision_ratios(12) == [1, 2, 4]
    assert demo.revision_ratios(1) == [1]
    assert demo.revision_budget((1, 4, 16, 64)) == 16
    assert demo.revision_budget((1, 4)) == 4


@pytest.mark.parametrize(
    "kwargs, name",
    [(dict(strategies=("greedy", "bogus")), "strategies"), (dict(ns=(0, 4)), "n"),
     (dict(ns=()), "n"), (dict(num_problems=0), "problems"),
     (dict(ns=(2, 6), strategies=("greedy", "beam_search")),
      r"n: beam_search cannot run at N=6 \(beam_width: expected a divisor of n=6")],
)
def test_demo_rejects_bad_options_by_name(kwargs, name, tmp_path):
    with pytest.raises(ValueError, match=name):
        demo.run_demo(out=tmp_path, progress=False, **kwargs)


def test_demo_names_a_models_folder_without_models(tmp_path):
    (tmp_path / "run" / "policy").mkdir(parents=True)
    (tmp_path / "run" / "policy" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"models: .*no model in .*prm"):
        demo.run_demo(out=tmp_path, progress=False, models=tmp_path / "run")


def test_cli_demo_names_a_bad_models_folder(tmp_path, capsys):
    from ttscale import cli

    with pytest.raises(SystemExit) as exit_:
        cli.main(["demo", "--models", str(tmp_path / "none"), "--out", str(tmp_path)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "argument --models" in err and "no model in" in err and "none/policy" in err


def test_cli_demo_names_a_bad_strategy(tmp_path):
    done = subprocess.run([sys.executable, "-m", "ttscale.cli", "demo", "--strategies", "bogus",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "--strategies" in done.stderr and "bogus" in done.stderr


@pytest.mark.parametrize("device, message", [("foo", "expected cpu, cuda or cuda:N, got 'foo'"),
                                             ("cuda", "cuda is not available on this machine")])
def test_cli_demo_names_a_bad_device(device, message, tmp_path, capsys):
    import torch

    from ttscale import cli

    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SystemExit) as exit_:
        cli.main(["demo", "--device", device, "--out", str(tmp_path)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "argument --device" in err and message in err


def test_strategies_all_runs_every_row_the_demo_knows(monkeypatch, tmp_path):
    from ttscale import cli

    seen = {}
    monkeypatch.setattr(demo, "run_demo", lambda **kwargs: seen.update(kwargs))
    assert cli.main(["demo", "--strategies", "all", "--out", str(tmp_path / "out")]) == 0
    assert list(seen["strategies"]) == demo.choices()
    assert {"coverage", "particle_filtering", "rebase", "rejection_best_of_n"} - set(
        demo.choices()) == {"coverage"}  # coverage comes with the pool, not as a row to ask for


def test_compute_optimal_row_is_fitted_on_training_problems(tiny_models, tmp_path, monkeypatch):
    import ttscale

    fitted_on = []
    original = ttscale.compute_optimal

    def spy(llm, cal_problems, cal_refs, problems, budget, *args, **kwargs):
        fitted_on.append((list(cal_problems), list(problems), budget))
        return original(llm, cal_problems, cal_refs, problems, budget, *args, **kwargs)

    monkeypatch.setattr(ttscale, "compute_optimal", spy)
    monkeypatch.setattr(demo, "CALIBRATION_PROBLEMS", 4)
    rows = demo.run_demo(ns=(1, 2), strategies=("greedy", "compute_optimal"), num_problems=3,
                         device="cpu", out=tmp_path, progress=False, models=tiny_models)
    assert [(r.strategy, r.n) for r in rows] == [("greedy", 1), ("compute_optimal", 1),
                                                 ("compute_optimal", 2)]
    heldout = {f"Q: {p.text}" for p in ttscale.toy.task.problems("heldout", 3, seed=0)}
    for calibration, problems, _ in fitted_on:
        assert set(problems) == heldout and not set(calibration) & heldout
    assert [budget for *_, budget in fitted_on] == [1, 2]
