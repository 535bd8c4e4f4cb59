"""Serving benchmark: requests arriving at a rate against an OpenAI-compatible server.

Takes the flags of ``vllm bench serve`` (``--help``) and prints its summary: request and token
throughput, and the mean, median and 99th percentile of TTFT, TPOT, ITL and end-to-end latency.
It speaks only the OpenAI API (``POST /v1/completions``, ``stream: true``,
``stream_options.include_usage``), so it measures any such server; without ``--base-url`` it
starts ``python -m ttscale serve MODEL`` on a free loopback port and stops it (SIGTERM) at the end::

    python bench/bench_serve.py --num-prompts 64 --request-rate 4          # the toy model
    python bench/bench_serve.py --base-url http://127.0.0.1:8000 --model M \\
        --dataset-name random --random-input-len 1024 --random-output-len 128 --ignore-eos

Datasets: ``toy`` (default: held-out problems of the embedded arithmetic task, answered in
30-60 tokens unless ``--ignore-eos``), ``random`` (random ids of ``--tokenizer``'s vocabulary,
specials left out, sent as id lists so the length is exact), ``jsonl`` (``--dataset-path``, a
``prompt`` or ``problem`` field a line). Each asks for ``--random-output-len`` tokens.

Per request, as the client sees it: TTFT (sent to the first chunk with choices), ITL (gaps
between chunks), end-to-end latency (sent to the last chunk), output tokens (the stream's
``usage``; a stream without it fails); TPOT is ``(latency - TTFT) / (output tokens - 1)``. ITL
is per chunk, as vLLM records it: ttscale streams a chunk per decode window (1 token on a CPU,
8 on a GPU), so its ITL is the time between windows (``tokens per chunk`` says how many) and
TPOT is the per-token figure. Percentiles interpolate linearly (numpy's default). One warm-up
request runs first, unmeasured; if it fails, the benchmark stops with its error.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import math
import random
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx


@dataclass
class Request:
    prompt: str | list[int]
    output_len: int


@dataclass
class Result:
    start: float = 0.0  # seconds after the benchmark's start
    prompt_len: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    itl: list[float] = field(default_factory=list)  # gaps between successive chunks
    latency: float = 0.0
    error: str = ""

    @property
    def success(self) -> bool:
        return not self.error


def sample_len(rng: random.Random, length: int, range_ratio: float) -> int:
    """A length drawn uniformly from [length * (1 - r), length * (1 + r)], at least 1."""
    low, high = math.floor(length * (1 - range_ratio)), math.ceil(length * (1 + range_ratio))
    return rng.randint(max(1, low), max(1, high))


def random_prompts(count: int, length: int, range_ratio: float, tokenizer_dir: str,
                   rng: random.Random) -> list[list[int]]:
    from tokenizers import Tokenizer

    path = Path(tokenizer_dir) / "tokenizer.json"
    if not path.is_file():
        raise SystemExit(f"--tokenizer: no tokenizer.json in {tokenizer_dir}")
    tokenizer = Tokenizer.from_file(str(path))
    special = {i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}
    ids = [i for i in range(tokenizer.get_vocab_size()) if i not in special]
    return [rng.choices(ids, k=sample_len(rng, length, range_ratio)) for _ in range(count)]


def jsonl_prompts(path: str, count: int, rng: random.Random) -> list[str]:
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    prompts = [r.get("prompt", r.get("problem")) for r in rows]
    if not prompts or any(not isinstance(p, str) for p in prompts):
        raise SystemExit(f"--dataset-path: every line of {path} needs a 'prompt' or 'problem'")
    rng.shuffle(prompts)
    return [prompts[k % len(prompts)] for k in range(count)]  # repeats past len(prompts)


def arrival_times(count: int, rate: float, burstiness: float, rng: random.Random) -> list[float]:
    """Send times in seconds, the first at 0. Gaps are gamma distributed with shape
    ``burstiness`` and mean ``1 / rate`` (burstiness 1: a Poisson process; below 1 burstier,
    above 1 more even); ``rate`` inf sends everything at once."""
    if math.isinf(rate):
        return [0.0] * count
    times, t = [], 0.0
    for _ in range(count):
        times.append(t)
        t += rng.gammavariate(burstiness, 1.0 / (rate * burstiness))
    return times


async def send(client: httpx.AsyncClient, url: str, body: dict, started: float) -> Result:
    """One streamed completion, timed from the moment it is sent."""
    result = Result(start=time.perf_counter() - started)
    sent = last = time.perf_counter()
    chunks, usage = 0, None
    try:
        async with client.stream("POST", url, json=body) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                result.error = f"HTTP {response.status_code}: {text[:300]}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue  # blank separators, ": ping" comments, event names
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    result.error = f"error event: {json.dumps(chunk['error'])[:300]}"
                    return result
                if chunk.get("choices"):
                    now = time.perf_counter()
                    if chunks == 0:
                        result.ttft = now - sent
                    else:
                        result.itl.append(now - last)
                    last, chunks = now, chunks + 1
                if chunk.get("usage"):
                    usage = chunk["usage"]
    except Exception as error:  # noqa: BLE001  (a failed request, counted with its message)
        result.error = f"{type(error).__name__}: {error}"
        return result
    if chunks == 0:
        result.error = "the stream ended without a chunk of text"
    elif usage is None:
        result.error = "the stream carried no usage (stream_options.include_usage ignored?)"
    else:
        result.prompt_len, result.output_tokens = usage["prompt_tokens"], usage["completion_tokens"]
        result.latency = last - sent
    return result


async def run(base_url: str, model: str, requests: list[Request], at: list[float],
              args) -> tuple[list[Result], float]:
    """Send each request at its arrival time, at most ``--max-concurrency`` in flight (a
    request past the limit waits, and is timed from when it is sent). Returns the results in
    request order and the duration, first send to last response."""
    url = f"{base_url}/v1/completions"
    extra = {**({"ignore_eos": True} if args.ignore_eos else {}),
             **({"temperature": args.temperature} if args.temperature is not None else {})}
    body = lambda r: {"model": model, "prompt": r.prompt, "max_tokens": r.output_len,
                      "stream": True, "stream_options": {"include_usage": True}, **extra}
    limit = asyncio.Semaphore(args.max_concurrency or len(requests))
    pool = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=pool) as client:
        warm = await send(client, url, body(Request(requests[0].prompt, 4)), time.perf_counter())
        if not warm.success:
            raise SystemExit(f"the warm-up request failed, so the benchmark did not start: "
                             f"{warm.error}")
        started = time.perf_counter()

        async def one(request: Request, delay: float) -> Result:
            await asyncio.sleep(max(0.0, started + delay - time.perf_counter()))
            async with limit:
                return await send(client, url, body(request), started)

        results = await asyncio.gather(*[one(r, t) for r, t in zip(requests, at, strict=True)])
    return list(results), time.perf_counter() - started


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile, linear between the sorted values (numpy's default)."""
    s = sorted(values)
    pos = (len(s) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summarize(results: list[Result], duration: float) -> dict:
    """Throughputs over ``duration`` and latency statistics (ms) of the successful requests;
    failed ones are counted, and their errors counted by message."""
    ok = [r for r in results if r.success]
    output = sum(r.output_tokens for r in ok)
    prompt = sum(r.prompt_len for r in ok)
    chunks = sum(len(r.itl) + 1 for r in ok)
    summary = {
        "completed": len(ok), "failed": len(results) - len(ok), "duration_s": duration,
        "total_input_tokens": prompt, "total_output_tokens": output,
        "request_throughput": len(ok) / duration, "output_throughput": output / duration,
        "total_token_throughput": (prompt + output) / duration,
        "tokens_per_chunk": output / chunks if chunks else None,
        "errors": dict(collections.Counter(r.error for r in results if not r.success)),
    }
    samples = {
        "ttft": [r.ttft for r in ok],
        "tpot": [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1],
        "itl": [gap for r in ok for gap in r.itl],
        "e2el": [r.latency for r in ok],
    }
    for name, values in samples.items():
        empty = not values
        summary[f"mean_{name}_ms"] = None if empty else sum(values) / len(values) * 1e3
        summary[f"median_{name}_ms"] = None if empty else percentile(values, 50) * 1e3
        summary[f"p99_{name}_ms"] = None if empty else percentile(values, 99) * 1e3
    return summary


def print_summary(s: dict) -> None:
    def line(label: str, value) -> None:
        shown = "-" if value is None else f"{value:.2f}" if isinstance(value, float) else value
        print(f"{label:<40} {shown}")

    print(" Serving Benchmark Result ".center(50, "="))
    line("Successful requests:", s["completed"])
    line("Failed requests:", s["failed"])
    line("Benchmark duration (s):", s["duration_s"])
    line("Total input tokens:", s["total_input_tokens"])
    line("Total generated tokens:", s["total_output_tokens"])
    line("Request throughput (req/s):", s["request_throughput"])
    line("Output token throughput (tok/s):", s["output_throughput"])
    line("Total token throughput (tok/s):", s["total_token_throughput"])
    line("Tokens per stream chunk:", s["tokens_per_chunk"])
    for name, title in (("ttft", "Time to First Token"),
                        ("tpot", "Time per Output Token (excl. 1st token)"),
                        ("itl", "Inter-token Latency (per chunk)"), ("e2el", "End-to-end Latency")):
        print(title.center(50, "-"))
        for stat, shown in (("mean", "Mean"), ("median", "Median"), ("p99", "P99")):
            line(f"{shown} {name.upper()} (ms):", s[f"{stat}_{name}_ms"])
    print("=" * 50)
    for error, count in s["errors"].items():
        print(f"FAILED x{count}: {error}")


class Server:
    """``python -m ttscale serve MODEL`` on a free loopback port, ready when ``/health``
    answers, stopped with SIGTERM (killed after 30 s) on close. Its output goes to a temporary
    file, shown if it fails to start."""

    def __init__(self, model: str, extra: list[str], timeout: float = 300.0):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.log = tempfile.TemporaryFile(mode="w+")
        command = [sys.executable, "-m", "ttscale", "serve", model, "--host", "127.0.0.1",
                   "--port", str(port), "--served-model-name", model, *extra]
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        self.log.seek(0)
        output = self.log.read()[-3000:]
        self.close()
        raise SystemExit(f"the server did not start: {shlex.join(command)}\n{output}")

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


def positive(kind):
    def parse(text: str):
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"expected > 0, got {text}")
        return value

    return parse


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = p.add_argument
    add("--base-url", help="a running server (default: start ttscale serve MODEL)")
    add("--model", help="the model ttscale serve starts (default: toy), or the running "
        "server's model name (default: its first)")
    add("--server-args", default="", help="more ttscale serve flags, e.g. '--device cpu'")
    add("--num-prompts", type=positive(int), default=64)
    add("--request-rate", type=positive(float), default=math.inf, help="per s; inf: all at once")
    add("--burstiness", type=positive(float), default=1.0, help="gamma shape of gaps (1: Poisson)")
    add("--max-concurrency", type=positive(int), help="most requests in flight (default: no limit)")
    add("--dataset-name", choices=("toy", "random", "jsonl"),
        help="default: jsonl with --dataset-path, else toy")
    add("--dataset-path", help="JSONL with a 'prompt' or 'problem' field a line")
    add("--tokenizer", help="a folder with tokenizer.json, for --dataset-name random "
        "(default: the toy policy's for toy, else --model)")
    add("--random-input-len", type=positive(int), default=256,
        help="default 256 (vLLM's is 1024; the toy model has 1024 positions)")
    add("--random-output-len", type=positive(int), default=128, help="max_tokens of each request")
    add("--random-range-ratio", type=float, default=0.0, help="lengths in [L(1-r), L(1+r)]")
    add("--ignore-eos", action="store_true", help="generate max_tokens tokens, past EOS")
    add("--temperature", type=float, help="default: the server's")
    add("--seed", type=int, default=0)
    add("--save-result", action="store_true", help="write the summary and every request as JSON")
    add("--result-filename", help="where --save-result writes (implies it)")
    args = p.parse_args(argv)
    if not 0 <= args.random_range_ratio < 1:
        p.error(f"--random-range-ratio: expected in [0, 1), got {args.random_range_ratio}")
    args.dataset_name = args.dataset_name or ("jsonl" if args.dataset_path else "toy")
    if args.dataset_name == "jsonl" and not args.dataset_path:
        p.error("--dataset-name jsonl: needs --dataset-path")
    return args


def workload(args, model: str) -> list[Request]:
    from ttscale.toy import policy_dir, task

    rng = random.Random(args.seed)
    if args.dataset_name == "toy":
        prompts = [p.prompt for p in task.problems("heldout", args.num_prompts, args.seed)]
    elif args.dataset_name == "jsonl":
        prompts = jsonl_prompts(args.dataset_path, args.num_prompts, rng)
    else:
        tokenizer = args.tokenizer or (str(policy_dir()) if model == "toy" else model)
        prompts = random_prompts(args.num_prompts, args.random_input_len,
                                 args.random_range_ratio, tokenizer, rng)
    return [Request(p, sample_len(rng, args.random_output_len, args.random_range_ratio))
            for p in prompts]


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark, print its summary; returns the record ``--save-result`` writes."""
    args = parse_args(argv)
    server = None
    try:
        if args.base_url is None:
            model = args.model or "toy"
            server = Server(model, shlex.split(args.server_args))
            base_url = server.url
        else:
            base_url = args.base_url.rstrip("/")
            models = httpx.get(f"{base_url}/v1/models", timeout=30).json()["data"]
            model = args.model or models[0]["id"]
        requests = workload(args, model)
        at = arrival_times(len(requests), args.request_rate, args.burstiness,
                           random.Random(args.seed + 1))
        print(f"{len(requests)} requests ({args.dataset_name}) to {base_url}, model {model!r}, "
              f"rate {args.request_rate}/s, burstiness {args.burstiness}, "
              f"max concurrency {args.max_concurrency}")
        results, duration = asyncio.run(run(base_url, model, requests, at, args))
    finally:
        if server is not None:
            server.close()
    summary = summarize(results, duration)
    print_summary(summary)
    config = {**vars(args), "model": model, "base_url": base_url,
              "request_rate": str(args.request_rate)}  # str: JSON has no inf
    record = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "config": config, **summary,
              "requests": [asdict(r) for r in results]}
    if args.save_result or args.result_filename:
        path = Path(args.result_filename or f"bench_serve-{Path(model).name}-{args.request_rate}"
                                            f"qps-{time.strftime('%Y%m%d-%H%M%S')}.json")
        path.write_text(json.dumps(record, indent=1))
        print(f"wrote {path}")
    return record


if __name__ == "__main__":
    sys.exit(0 if main()["completed"] else 1)
