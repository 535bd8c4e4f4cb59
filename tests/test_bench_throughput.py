"""``ttscale bench throughput``: its argument errors, its workloads, and one tiny run end to end
(ttscale and transformers, each in its own process; vLLM asked for but not installed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny_models import build_tiny_llama

from ttscale.benchmark import report, workloads
from ttscale.cli import main
from ttscale.errors import UsageError

RESULT_FIELDS = {"backend", "elapsed_time", "num_requests", "total_num_tokens",
                 "requests_per_second", "tokens_per_second", "output_tokens_per_second", "runs",
                 "startup_s", "compute_floor_share", "block_size", "prefix_caching"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


def bench(*flags) -> list[str]:
    return ["bench", "throughput", *flags]


def error_of(capsys, argv) -> str:
    """The one-line error ``ttscale`` prints for ``argv`` (exit code 2)."""
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    assert code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("flags,expected", [
    (["--backend", "ttscale,sglang"], "argument --backend: unknown backend 'sglang'"),
    (["--backend", "vllm:12"], "block size must be 8, 16, 32, 64 or 128"),
    (["--backend", "ttscale,ttscale"], "'ttscale' is named twice"),
    (["--input-len", "0"], "argument --input-len: expected an integer >= 1, got 0"),
    (["--output-len", "-3"], "argument --output-len: expected an integer >= 1, got -3"),
    (["--n", "many"], "argument --n: expected an integer >= 1, got 'many'"),
    (["--dataset-name", "sharegpt"], "argument --dataset-name: invalid choice"),
    (["--neighbours", "-1", "--input-len", "8"], "argument --neighbours: expected 0 to"),
    (["--neighbours", "x"], "argument --neighbours: invalid int value"),
])
def test_flag_errors_name_the_flag(capsys, model_dir, flags, expected):
    assert expected in error_of(capsys, bench("--model", str(model_dir), *flags))


@pytest.mark.parametrize("flags,expected", [
    (["--prefix-len", "8"], "argument --prefix-len: expected 0 to --input-len - 1 (7), got 8"),
    (["--input-len", "500", "--output-len", "100"],
     "argument --output-len: --input-len + --output-len (600) exceeds the model's 512 positions"),
    (["--dataset-name", "gsm8k"], "argument --dataset-path: required with --dataset-name gsm8k"),
    (["--dataset-path", "x.jsonl"], "argument --dataset-path: only with gsm8k, math500 or jsonl"),
    (["--dataset-name", "prefix-repeat"], "argument --n: prefix-repeat samples each prompt n >= 2"),
    (["--beam-width", "2"], "argument --beam-width: only with --use-beam-search"),
    (["--use-beam-search", "--beam-width", "11"], "argument --beam-width: at most 10, got 11"),
])
def test_workload_errors_name_the_flag(capsys, model_dir, flags, expected):
    err = error_of(capsys, bench("--model", str(model_dir), "--input-len", "8", *flags))
    assert err.startswith("ttscale: error: ") and expected in err


def test_missing_model_is_a_clear_error(capsys, tmp_path):
    err = error_of(capsys, bench("--model", str(tmp_path / "nowhere")))
    assert "argument --model:" in err and "no config.json" in err


def test_prompts_share_the_prefix_and_nothing_else():
    prompts = workloads.random_prompts(3, 20, 5, 1000, seed=7)
    assert [len(p) for p in prompts] == [20, 20, 20]
    assert prompts[0][:5] == prompts[1][:5] == prompts[2][:5]
    assert len({tuple(p[5:]) for p in prompts}) == 3
    assert prompts == workloads.random_prompts(3, 20, 5, 1000, seed=7)


def test_dataset_texts_are_read_by_their_field(tmp_path):
    path = tmp_path / "gsm8k.jsonl"
    path.write_text("\n".join(json.dumps({"question": f"q{i}", "answer": "1"}) for i in range(3)))
    assert workloads.read_texts(path, "question", 2) == ["q0", "q1"]
    with pytest.raises(UsageError, match="has 3 prompts, asked for 5"):
        workloads.read_texts(path, "question", 5)
    with pytest.raises(UsageError, match="line 1 has no 'problem' text"):
        workloads.read_texts(path, "problem", 1)


def test_compute_floor_counts_a_shared_prompt_once():
    config = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 100}
    one = workloads.Workload("prefix-repeat", [[1] * 10], 4, 3, None, 0)
    layer = 2 * (64 * 64 * 2 + 2 * 64 * 32 + 3 * 64 * 128)  # q, o; k, v; the MLP
    attention = 4 * 2 * 4 * 16
    prefill = 2 * layer * 10 + attention * 55
    decode = 4 * (2 * (layer + 100 * 64) * 3 + attention * (10 + 11 + 12))
    assert report.compute_floor(config, one) == pytest.approx(prefill + decode)
    beams = workloads.Workload("random", [[1] * 10], 1, 3, 4, 0)  # 4 beams cost as 4 samples
    assert report.compute_floor(config, beams) == pytest.approx(prefill + decode)


def test_tiny_run_end_to_end(capsys, model_dir, tmp_path):
    out = tmp_path / "result.json"
    code = main(bench("--model", str(model_dir), "--backend", "ttscale,transformers,vllm",
                      "--dataset-name", "prefix-repeat", "--input-len", "12", "--output-len", "4",
                      "--num-prompts", "2", "--n", "3", "--threads", "1",
                      "--vllm-python", str(tmp_path / "no-vllm" / "python"),
                      "--output-json", str(out)))
    printed = capsys.readouterr()
    assert code == 1  # vLLM could not run; the others did
    assert "make vllm-env" in printed.err
    assert "prefix caching on for ttscale and vLLM" in printed.out
    document = json.loads(out.read_text())
    assert {"command", "device", "versions", "results", "ratios"} <= set(document)
    assert document["command"].startswith("ttscale bench throughput --model ")
    assert "make vllm-env" in document["errors"]["vllm"]
    results = {r["backend"]: r for r in document["results"]}
    assert set(results) == {"ttscale", "transformers"}
    for result in results.values():
        assert RESULT_FIELDS <= set(result)
        assert result["num_requests"] == 2
        # each prompt once, and every generated token of all n samples
        assert result["total_num_tokens"] == 2 * 12 + 2 * 3 * 4
        assert result["tokens_per_second"] == pytest.approx(
            result["total_num_tokens"] / result["elapsed_time"])
        assert len(result["runs"]) == 1 and result["startup_s"] > 0
    assert results["ttscale"]["block_size"] == 16 and results["ttscale"]["prefix_caching"]
    assert [r["backend"] for r in document["ratios"]] == ["ttscale", "transformers"]
    assert document["ratios"][0]["tokens_per_second"] == 1.0
    assert {"ttscale", "transformers"} <= set(document["versions"])


def test_neighbours_run_beside_each_run_and_the_fixed_count_is_a_backend(capsys, model_dir,
                                                                        tmp_path, monkeypatch):
    """--neighbours K starts K busy processes beside every worker and stops them after it;
    ttscale-fixed runs ttscale with every step on --threads."""
    import subprocess

    from ttscale.benchmark import throughput

    started, specs = [], []
    real_popen, real_run = subprocess.Popen, subprocess.run

    def popen(argv, *a, **kw):
        process = real_popen(argv, *a, **kw)
        if argv[1:] == ["-c", "while True: pass"]:
            started.append(process)
        return process

    def run(argv, *a, **kw):
        if str(argv[1]).endswith("worker.py"):
            specs.append(json.loads(Path(argv[2]).read_text()))
            assert sum(p.poll() is None for p in started) == 2  # both neighbours are running
        return real_run(argv, *a, **kw)

    monkeypatch.setattr(throughput.subprocess, "Popen", popen)
    monkeypatch.setattr(throughput.subprocess, "run", run)
    out = tmp_path / "result.json"
    code = main(bench("--model", str(model_dir), "--backend", "ttscale,ttscale-fixed",
                      "--input-len", "12", "--output-len", "4", "--n", "2", "--threads", "1",
                      "--neighbours", "2", "--output-json", str(out)))
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert len(started) == 4 and all(p.poll() is not None for p in started)  # all stopped
    assert [(s["backend"], s["cpu_threads"]) for s in specs] == [("ttscale", None),
                                                                 ("ttscale-fixed", 1)]
    document = json.loads(out.read_text())
    assert document["settings"]["neighbours"] == 2
    assert "--seed 0 --neighbours 2 " in document["command"]
    assert {r["backend"] for r in document["results"]} == {"ttscale", "ttscale-fixed"}
