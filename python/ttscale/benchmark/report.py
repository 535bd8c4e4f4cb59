"""Numbers and tables of ``ttscale bench throughput``: the machine, the compute floor, each
backend's summary (vLLM's field names), the ratios to the first backend."""

from __future__ import annotations

import os
import platform
import statistics
import time

from ttscale.benchmark.workloads import Workload


def describe_machine() -> dict:
    """The CPU (model, cores, memory), a GPU if torch sees one, and the load average now."""
    cpu = platform.processor() or platform.machine()
    memory = None
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name")), cpu)
        with open("/proc/meminfo") as f:
            memory = round(int(f.readline().split()[1]) / 2**20, 1)  # MemTotal, kB -> GiB
    except OSError:
        pass
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": memory, "gpu": gpu,
            "load_average_start": list(os.getloadavg())}


def matmul_rate(dtype: str, threads: int) -> tuple[float, str]:
    """FLOP/s of a 2048 × 2048 product in ``dtype`` with ``threads`` threads: the faster of
    ``torch.mm`` and oneDNN on packed weights (what ttscale's CPU linears run), best of 5."""
    import torch

    from ttscale.model import cpu_linear

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    a = torch.randn(2048, 2048).to(getattr(torch, dtype))
    products = {"torch.mm": lambda: torch.mm(a, a)}
    packed = cpu_linear.pack(a)
    if packed is not None:
        products["oneDNN on packed weights"] = lambda: cpu_linear.linear(a, packed, None)
    rates = {}
    for name, product in products.items():
        product()
        best = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            product()
            best = min(best, time.perf_counter() - start)
        rates[name] = 2 * 2048**3 / best
    torch.set_num_threads(before)
    name = max(rates, key=rates.get)
    shown = ", ".join(f"{k} {v / 1e9:.0f}" for k, v in rates.items())
    return rates[name], (f"{rates[name] / 1e9:.0f} GFLOP/s ({name}, {dtype}, {threads} threads, "
                         f"2048x2048, measured now: {shown} GFLOP/s)")


def compute_floor(config: dict, workload: Workload) -> float:
    """FLOPs the workload needs at least: each distinct prompt token through the layers once (a
    shared prefix once for all), and every generated token of every sample or beam through the
    layers and the LM head; 2 FLOPs a weight, and attention's 4 × layers × heads × head_dim a
    context token."""
    h, layers = config["hidden_size"], config["num_hidden_layers"]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or h // heads
    layer_weights = layers * (h * heads * head_dim * 2 + 2 * h * kv_heads * head_dim
                              + 3 * h * config["intermediate_size"])
    head_weights = config["vocab_size"] * h
    attention = 4 * layers * heads * head_dim  # per context token of one query token
    shared = workload.shared_prefix
    flops = 2 * layer_weights * shared + attention * shared * (shared + 1) / 2
    samples = workload.beam_width or workload.n
    t = workload.output_len
    for prompt in workload.prompts:
        length = len(prompt)
        own_context = (length * (length + 1) - shared * (shared + 1)) / 2  # positions past it
        flops += 2 * layer_weights * (length - shared) + attention * own_context
        decode_context = t * length + t * (t - 1) / 2  # contexts length .. length + t - 1
        flops += samples * (2 * (layer_weights + head_weights) * t + attention * decode_context)
    return flops


def run_line(repeat: int, repeats: int, result: dict, workload: Workload) -> str:
    output = sum(result["output_tokens"])
    return (f"run {repeat}/{repeats} {_label(result):34} start-up {result['startup_s']:6.1f} s, "
            f"{result['elapsed_time']:7.2f} s, {output / result['elapsed_time']:8.0f} output tok/s"
            f" (load {result['load_average'][0]:.1f})")


def _label(result: dict) -> str:
    name, block = result["name"], result.get("block_size")
    if block is None:
        return name
    default = "" if ":" in result["backend"] else ", its default"
    return f"{name} (block {block}{default})"


def summary(key: str, runs: list[dict], workload: Workload, floor_s: float) -> dict:
    """One backend's results: vLLM's fields from the median run, every run listed."""
    times = sorted(r["elapsed_time"] for r in runs)
    elapsed = statistics.median(times)
    output = sum(runs[0]["output_tokens"])
    total = workload.prompt_tokens + output
    return {
        "backend": key, "label": _label(runs[0]), "block_size": runs[0].get("block_size"),
        "prefix_caching": runs[0].get("prefix_caching"),
        "elapsed_time": elapsed, "elapsed_time_min": times[0],
        "num_requests": workload.num_requests, "total_num_tokens": total,
        "total_output_tokens": output,
        "requests_per_second": workload.num_requests / elapsed,
        "tokens_per_second": total / elapsed, "output_tokens_per_second": output / elapsed,
        "startup_s": statistics.median(r["startup_s"] for r in runs),
        "compute_floor_share": floor_s / elapsed,
        "runs": [{k: r[k] for k in ("elapsed_time", "startup_s", "load_average")}
                 | {"output_tokens": sum(r["output_tokens"])} for r in runs],
    }


def ratios(results: list[dict]) -> list[dict]:
    """Each backend's throughput and start-up over the first backend's."""
    if not results:
        return []
    base = results[0]
    return [{"backend": r["backend"], "base": base["backend"],
             "tokens_per_second": r["tokens_per_second"] / base["tokens_per_second"],
             "startup_s": r["startup_s"] / base["startup_s"]} for r in results]


def table(results: list[dict], ratios: list[dict]) -> str:
    """The summary a person reads: one row a backend."""
    columns = ["backend", "elapsed s (median, min)", "req/s", "total tok/s", "output tok/s",
               "of compute floor", "start-up s", "tok/s vs first"]
    rows = [columns]
    for r, ratio in zip(results, ratios, strict=True):
        rows.append([r["label"], f"{r['elapsed_time']:.2f}, {r['elapsed_time_min']:.2f}",
                     f"{r['requests_per_second']:.2f}", f"{r['tokens_per_second']:.0f}",
                     f"{r['output_tokens_per_second']:.0f}", f"{r['compute_floor_share']:.0%}",
                     f"{r['startup_s']:.1f}", f"{ratio['tokens_per_second']:.2f}x"])
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def versions(runs: dict[str, list[dict]]) -> dict:
    """Each backend's versions (Python, torch, the engine's package), and the harness's."""
    import torch

    import ttscale

    found = {"harness": {"ttscale": ttscale.__version__, "torch": torch.__version__,
                         "python": platform.python_version()}}
    for key, results in runs.items():
        if results:
            found[key] = results[0]["versions"]
    return found


def markdown(documents: dict[str, dict]) -> str:
    """RESULTS.md rows from ``--output-json`` files: one line per backend of every row."""
    lines = ["| row | backend | elapsed s (median, min; runs) | output tok/s | total tok/s | "
             "of compute floor | start-up s | tok/s vs first | load |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for name, doc in documents.items():
        ratios = {r["backend"]: r["tokens_per_second"] for r in doc["ratios"]}
        for r in doc["results"]:
            loads = [x for run in r["runs"] for x in run["load_average"]]
            lines.append(
                f"| {name} | {r['label']} | {r['elapsed_time']:.2f}, {r['elapsed_time_min']:.2f}; "
                f"{len(r['runs'])} | {r['output_tokens_per_second']:,.0f} | "
                f"{r['tokens_per_second']:,.0f} | {r['compute_floor_share']:.0%} | "
                f"{r['startup_s']:.1f} | {ratios[r['backend']]:.2f}x | "
                f"{min(loads):.1f}-{max(loads):.1f} |")
        for backend, error in doc.get("errors", {}).items():
            lines.append(f"| {name} | {backend} | not measured: {error.splitlines()[0][:80]} "
                         "| | | | | | |")
    return "\n".join(lines)


if __name__ == "__main__":  # python -m ttscale.benchmark.report RUN.json ...: RESULTS.md rows
    import json
    import sys
    from pathlib import Path

    print(markdown({Path(p).stem: json.loads(Path(p).read_text()) for p in sys.argv[1:]}))
