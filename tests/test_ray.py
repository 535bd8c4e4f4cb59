"""``ttscale run --ray`` on a real local Ray cluster (CPU, two workers, the toy models): the
single-process answers, a killed worker, a killed driver. One cluster for the module."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from ttscale import cli, distributed
from ttscale.toy import policy_dir, prm_dir

ray = pytest.importorskip("ray")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    import random

    rng = random.Random(0)
    rows = []
    for _ in range(12):
        a, b, c = rng.randint(10, 99), rng.randint(10, 99), rng.randint(2, 9)
        rows.append({"problem": f"({a}+{b})-{c}", "answer": str(a + b - c), "level": 1})
    path = tmp_path_factory.mktemp("data") / "toy.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def argv(data, out, *extra) -> list[str]:
    return ["run", "--model", str(policy_dir()), "--prm", str(prm_dir()), "--prm-format",
            "math-shepherd", "--strategy", "beam_search", "--n", "4", "--beam-width", "2",
            "--data", str(data), "--out", str(out), "--batch-size", "1", "--max-tokens", "60",
            "--step-delimiter", "\\n", "--device", "cpu", *extra]


def lines(path) -> list[dict]:
    out = []
    for line in path.read_text().splitlines():
        record = json.loads(line)
        record.pop("wall_seconds")
        record["cost"].pop("seconds")
        out.append(record)
    return out


@pytest.fixture(scope="module")
def single(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "out.jsonl"
    assert cli.main(argv(data, out)) == 0
    return lines(out)


def test_ray_run_equals_the_single_process_run(cluster, data, single, tmp_path):
    out = tmp_path / "ray.jsonl"
    assert cli.main(argv(data, out, "--ray", "--num-workers", "2")) == 0
    assert lines(out) == single  # line for line, in the data's order
    assert sum(r["correct"] for r in single) >= 9  # the toy search solves these


def test_a_killed_worker_loses_nothing(cluster, data, single, tmp_path):
    out = tmp_path / "ray.jsonl"
    killed = []

    def kill_one():
        deadline = time.time() + 120
        while time.time() < deadline:
            if out.exists() and out.read_text().count("\n") >= 2:
                ray.kill(ray.get_actor(distributed.worker_name(0)))
                killed.append(True)
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_one)
    killer.start()
    assert cli.main(argv(data, out, "--ray", "--num-workers", "2")) == 0
    killer.join()
    assert killed  # it died mid-run
    assert lines(out) == single  # every problem exactly once, with the same answer


def test_a_killed_driver_resumes(cluster, data, single, tmp_path):
    out = tmp_path / "ray.jsonl"
    driver = subprocess.Popen([sys.executable, "-m", "ttscale", *argv(data, out, "--ray", "auto")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    while time.time() < deadline and driver.poll() is None:
        if out.exists() and out.read_text().count("\n") >= 3:
            break
        time.sleep(0.05)
    assert driver.poll() is None, driver.stderr.read()
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait()
    written = out.read_text().count("\n")
    assert 3 <= written < len(single)
    assert cli.main(argv(data, out, "--ray")) == 0
    assert lines(out) == single


def test_a_worker_that_cannot_load_the_model_fails_the_run(cluster, data, tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    args = argv(data, tmp_path / "out.jsonl", "--ray", "--num-workers", "1")
    args[args.index("--model") + 1] = str(broken)
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert "a Ray worker could not load the models" in err and "config.json" in err


def test_without_ray_the_flag_says_how_to_install_it(data, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(distributed, "ray_module", lambda: None)
    with pytest.raises(SystemExit) as caught:
        cli.main(argv(data, tmp_path / "out.jsonl", "--ray"))
    assert caught.value.code == 2
    assert "pip install 'ttscale[ray]'" in capsys.readouterr().err


def test_worker_resources_are_parsed():
    assert distributed.parse_resources("CPU=2,gpu=1") == {"num_cpus": 2.0, "num_gpus": 1.0}
    assert distributed.parse_resources(None) == {}
    for bad in ("TPU=1", "CPU=x", "CPU=-1"):
        with pytest.raises(ValueError):
            distributed.parse_resources(bad)
