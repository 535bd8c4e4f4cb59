"""bench/bench_serve.py: its metrics from known timings, its workload, and one short run against
the toy server it starts itself."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest

pytest.importorskip("httpx")
sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))
import bench_serve  # noqa: E402
from bench_serve import Result, percentile, summarize  # noqa: E402


def test_percentile_matches_numpy_linear_interpolation():
    np = pytest.importorskip("numpy")
    rng = random.Random(0)
    for size in (1, 2, 7, 100):
        values = [rng.expovariate(1.0) for _ in range(size)]
        for q in (0, 50, 90, 99, 100):
            assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_summary_from_known_timings():
    results = [
        # TTFT 100 ms, 10 tokens in 4 chunks, last chunk at 190 ms: TPOT (190 - 100) / 9 = 10 ms
        Result(prompt_len=20, output_tokens=10, ttft=0.100, itl=[0.02, 0.02, 0.05], latency=0.190),
        # TTFT 300 ms, 5 tokens one a chunk, last at 340 ms: TPOT 40 / 4 = 10 ms
        Result(prompt_len=30, output_tokens=5, ttft=0.300, itl=[0.01] * 4, latency=0.340),
        # one token: a TTFT and a latency, no TPOT and no ITL
        Result(prompt_len=10, output_tokens=1, ttft=0.200, latency=0.200),
        Result(error="HTTP 400: bad max_tokens"),
        Result(error="HTTP 400: bad max_tokens"),
    ]
    s = summarize(results, duration=2.0)
    assert (s["completed"], s["failed"]) == (3, 2)
    assert s["errors"] == {"HTTP 400: bad max_tokens": 2}
    assert (s["total_input_tokens"], s["total_output_tokens"]) == (60, 16)
    assert s["request_throughput"] == pytest.approx(1.5)
    assert s["output_throughput"] == pytest.approx(8.0)
    assert s["total_token_throughput"] == pytest.approx(38.0)
    assert s["tokens_per_chunk"] == pytest.approx(16 / 10)
    assert s["mean_ttft_ms"] == pytest.approx(200.0)
    assert s["median_ttft_ms"] == pytest.approx(200.0)
    assert s["p99_ttft_ms"] == pytest.approx(200 + 100 * 0.98)  # between the top two
    assert s["mean_tpot_ms"] == pytest.approx(10.0)
    assert s["median_tpot_ms"] == pytest.approx(10.0)
    assert s["mean_itl_ms"] == pytest.approx(1e3 * (0.09 + 0.04) / 7)
    assert s["median_itl_ms"] == pytest.approx(10.0)
    assert s["p99_itl_ms"] == pytest.approx(20 + 30 * 0.94)  # 7 gaps: 5.94 of the way
    assert s["median_e2el_ms"] == pytest.approx(200.0)


def test_summary_of_only_failures_has_no_latencies():
    s = summarize([Result(error="ConnectError: refused")], duration=1.0)
    assert (s["completed"], s["failed"], s["mean_ttft_ms"], s["p99_e2el_ms"]) == (0, 1, None, None)


def test_arrivals_at_a_rate_and_all_at_once():
    at = bench_serve.arrival_times(4000, 8.0, 1.0, random.Random(0))
    assert at[0] == 0.0 and at == sorted(at)
    assert at[-1] / 3999 == pytest.approx(1 / 8, rel=0.05)  # mean gap 1 / rate
    even = bench_serve.arrival_times(4000, 8.0, 50.0, random.Random(0))
    gaps = [b - a for a, b in zip(even, even[1:])]
    assert max(gaps) < 3 / 8  # burstiness above 1: gaps close to 1 / rate
    assert bench_serve.arrival_times(5, float("inf"), 1.0, random.Random(0)) == [0.0] * 5


def test_lengths_stay_in_the_range_ratio():
    rng = random.Random(0)
    lengths = [bench_serve.sample_len(rng, 100, 0.25) for _ in range(2000)]
    assert min(lengths) == 75 and max(lengths) == 125
    assert {bench_serve.sample_len(rng, 100, 0.0) for _ in range(10)} == {100}


def test_random_prompts_have_the_length_asked_and_no_special_tokens():
    from ttscale.toy import policy_dir

    prompts = bench_serve.random_prompts(8, 50, 0.0, str(policy_dir()), random.Random(0))
    assert [len(p) for p in prompts] == [50] * 8
    assert min(min(p) for p in prompts) >= 4  # <pad>, <s>, </s>, ки are ids 0-3


def test_run_against_the_toy_server(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "result.json"
    bench_serve.main(["--num-prompts", "4", "--random-output-len", "8", "--ignore-eos",
                      "--request-rate", "50", "--server-args", "--device cpu",
                      "--save-result", "--result-filename", str(out)])
    record = json.loads(out.read_text())
    assert (record["completed"], record["failed"]) == (4, 0)
    assert record["total_output_tokens"] == 4 * 8
    assert all(r["output_tokens"] == 8 and r["prompt_len"] > 0 and not r["error"]
               for r in record["requests"])
    assert all(0 < r["ttft"] <= r["latency"] and len(r["itl"]) >= 1 for r in record["requests"])
    for key in ("request_throughput", "output_throughput", "median_ttft_ms", "p99_tpot_ms",
                "median_itl_ms", "p99_e2el_ms"):
        assert record[key] > 0, key
    assert "Successful requests:                     4" in capsys.readouterr().out
