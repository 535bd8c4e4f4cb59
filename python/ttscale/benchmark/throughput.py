"""``ttscale bench throughput``: ttscale, vLLM and transformers on one model and one workload.

    ttscale bench throughput --model bench/models/qwen2-21m --backend ttscale,vllm,vllm:16 \\
        --dataset-name prefix-repeat --input-len 512 --output-len 64 --num-prompts 1 --n 64

Flags are ``vllm bench throughput``'s where the idea is the same. Each backend runs in a process
of its own (``worker.py``), so one engine's memory and threads never disturb another's; with
``--repeats R`` the backends alternate R times, so a drifting machine load weighs on all alike,
and every run is reported. ``ttscale`` chooses its CPU threads per step by measuring them
(``ttscale.engine.threads``); ``ttscale-fixed`` runs every step on ``--threads``, as every other
backend does. ``--neighbours K`` keeps K busy processes running beside each run (a machine
shared with other work). ``NAME:B`` runs a backend with KV blocks of B tokens (``vllm`` alone
is vLLM at its own default, 128 tokens on the CPU; ``ttscale`` alone 16). Every backend gets the
same prompts (token ids), dtype, thread count and KV space; ttscale and vLLM run with prefix
caching on; EOS is ignored so that all generate the same tokens; sampling at temperature 1.

Counting, as vLLM counts: a request's prompt once, plus every generated token of all its ``n``
samples (``output_tokens_per_second`` counts only those); with beam search each request's best
sequence. ``elapsed_time`` is the median run's timed call; start-up (process start to an engine
that has served a small warm-up prompt of its own) is reported apart. The compute floor is the
workload's FLOPs (each distinct prompt prefilled once, every generated token of every sample or
beam decoded, attention included) over the matrix-product rate measured at the start of the
run; each backend's share is floor / elapsed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ttscale.benchmark.workloads import DATASETS, TEXT_FIELDS, Workload, build
from ttscale.cli_flags import DTYPES, positive_int
from ttscale.errors import UsageError

BACKENDS = ("ttscale", "ttscale-fixed", "vllm", "transformers")
WORKER = Path(__file__).with_name("worker.py")
REPO = Path(__file__).resolve().parents[3]  # python/ttscale/benchmark/ -> the checkout
VLLM_HINT = ("run `make vllm-env` in the ttscale checkout (vLLM's CPU build in .venv-vllm), "
             "or give --vllm-python the interpreter of an environment that has vllm")
MAX_BEAM_WIDTH = 10  # 2 × width log-probabilities a step; the sampler returns at most 20


def _backends(text: str) -> list[tuple[str, int | None]]:
    """``ttscale,vllm,vllm:16`` -> [(name, block size or None for the backend's default)]."""
    chosen = []
    for item in (x.strip() for x in text.split(",")):
        name, _, block = item.partition(":")
        if name not in BACKENDS:
            raise argparse.ArgumentTypeError(
                f"unknown backend {name!r}; choose from {', '.join(BACKENDS)} (NAME:B for KV "
                "blocks of B tokens)")
        if block and not (block.isdigit() and int(block) in (8, 16, 32, 64, 128)):
            raise argparse.ArgumentTypeError(f"{item!r}: block size must be 8, 16, 32, 64 or 128")
        if name == "transformers" and block:
            raise argparse.ArgumentTypeError("transformers has no KV blocks")
        if (name, int(block) if block else None) in chosen:
            raise argparse.ArgumentTypeError(f"{item!r} is named twice")
        chosen.append((name, int(block) if block else None))
    return chosen


def add_parser(subparsers) -> argparse.ArgumentParser:
    """``bench throughput`` under ``subparsers`` (the ``ttscale`` command's)."""
    bench = subparsers.add_parser("bench", help="engines against each other (throughput)")
    kinds = bench.add_subparsers(dest="bench_command", required=True, metavar="throughput")
    p = kinds.add_parser("throughput", help="offline throughput of ttscale, vLLM, transformers",
                         description=__doc__.split("\n\n")[2].replace("``", ""),
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, metavar="DIR", help="a local Hugging Face model")
    p.add_argument("--backend", type=_backends, default=[("ttscale", None)], metavar="B[,B...]",
                   help="ttscale, vllm, transformers, each optionally NAME:BLOCK_SIZE; the first "
                        "is the ratios' base (default ttscale)")
    p.add_argument("--dataset-name", choices=DATASETS, default="random")
    p.add_argument("--dataset-path", metavar="FILE.jsonl", help="for gsm8k, math500, jsonl")
    p.add_argument("--input-len", type=positive_int, default=512, metavar="L",
                   help="prompt tokens of random and prefix-repeat (default 512)")
    p.add_argument("--output-len", type=positive_int, default=128, metavar="L",
                   help="new tokens per sample (default 128)")
    p.add_argument("--num-prompts", type=positive_int, default=1, metavar="K", help="requests")
    p.add_argument("--n", type=positive_int, default=1, help="samples per request (default 1)")
    p.add_argument("--prefix-len", type=int, default=0, metavar="P",
                   help="leading prompt tokens shared by every request (random, prefix-repeat)")
    p.add_argument("--use-beam-search", action="store_true",
                   help="token-level beam search (LLM.beam_search), width --beam-width")
    p.add_argument("--beam-width", type=positive_int, metavar="W",
                   help="with --use-beam-search (default: --n, as vLLM takes it)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=DTYPES, default="float32")
    p.add_argument("--repeats", type=positive_int, default=1, metavar="R",
                   help="runs of each backend, alternating (default 1)")
    p.add_argument("--threads", type=positive_int, default=os.cpu_count() or 1, metavar="T",
                   help="CPU threads of every backend (default: every core)")
    p.add_argument("--neighbours", type=int, default=0, metavar="K",
                   help="K processes that keep a core busy each, beside every run: the machine "
                        "shared with other work (default 0)")
    p.add_argument("--kv-cache-space", type=positive_int, default=2, metavar="GIB",
                   help="KV cache of every backend in GiB (default 2)")
    p.add_argument("--vllm-python", metavar="PYTHON",
                   default=os.environ.get("TTSCALE_VLLM_PYTHON",
                                          str(REPO / ".venv-vllm" / "bin" / "python")),
                   help="the interpreter that runs vLLM (default .venv-vllm from make vllm-env)")
    p.add_argument("--output-json", metavar="FILE", help="write the results here")
    return bench


def check(args) -> dict:
    """Argument errors, before any engine starts; returns the model's config.json."""
    model = Path(args.model)
    if not (model / "config.json").is_file():
        raise UsageError(f"argument --model: {model} is not a model directory (no config.json)")
    config = json.loads((model / "config.json").read_text())
    text = args.dataset_name in TEXT_FIELDS
    if text and not args.dataset_path:
        raise UsageError(f"argument --dataset-path: required with --dataset-name "
                         f"{args.dataset_name}")
    if text and not Path(args.dataset_path).is_file():
        raise UsageError(f"argument --dataset-path: no such file: {args.dataset_path}")
    if text and not (model / "tokenizer.json").is_file():
        raise UsageError(f"argument --model: {model} has no tokenizer.json ({args.dataset_name} "
                         "prompts are text)")
    if not text and args.dataset_path:
        raise UsageError("argument --dataset-path: only with gsm8k, math500 or jsonl")
    if not 0 <= args.prefix_len < args.input_len:
        raise UsageError(f"argument --prefix-len: expected 0 to --input-len - 1 "
                         f"({args.input_len - 1}), got {args.prefix_len}")
    if args.dataset_name == "prefix-repeat" and args.n < 2 and not args.use_beam_search:
        raise UsageError("argument --n: prefix-repeat samples each prompt n >= 2 times")
    if args.beam_width is not None and not args.use_beam_search:
        raise UsageError("argument --beam-width: only with --use-beam-search")
    width = args.beam_width or args.n
    if args.use_beam_search and width > MAX_BEAM_WIDTH:
        raise UsageError(f"argument --beam-width: at most {MAX_BEAM_WIDTH}, got {width}")
    positions = config.get("max_position_embeddings", 0)
    if not text and args.input_len + args.output_len > positions:
        raise UsageError(f"argument --output-len: --input-len + --output-len "
                         f"({args.input_len + args.output_len}) exceeds the model's {positions} "
                         "positions")
    if args.output_json and not Path(args.output_json).resolve().parent.is_dir():
        raise UsageError(f"argument --output-json: no such directory for {args.output_json}")
    if not 0 <= args.neighbours <= 4 * (os.cpu_count() or 1):
        raise UsageError(f"argument --neighbours: expected 0 to {4 * (os.cpu_count() or 1)} "
                         f"(four per core), got {args.neighbours}")
    if args.threads > (os.cpu_count() or 1):
        raise UsageError(f"argument --threads: this machine has {os.cpu_count()} cores")
    return config


def run(args) -> int:
    """Run the benchmark the flags describe; 0 when every backend ran, 1 otherwise."""
    from ttscale.benchmark import report

    config = check(args)
    workload = build(args, config["vocab_size"])
    device = report.describe_machine()
    rate, rate_note = report.matmul_rate(args.dtype, args.threads)
    floor = report.compute_floor(config, workload)
    wait_policy = os.environ.get("OMP_WAIT_POLICY")  # every backend inherits the environment
    print(f"workload: {workload.describe()}; model {args.model}, {args.dtype}, "
          f"{args.threads} threads (OMP_WAIT_POLICY={wait_policy or 'unset'}), "
          f"{args.neighbours} busy neighbour processes, "
          f"KV space {args.kv_cache_space} GiB")
    print("prefix caching on for ttscale and vLLM (transformers has none); "
          f"compute floor {floor / 1e9:.1f} GFLOP / {rate_note} = {floor / rate:.3f} s")
    errors = {}
    if any(name == "vllm" for name, _ in args.backend):
        problem = _vllm_problem(args.vllm_python)
        if problem:
            errors.update({_key(b): problem for b in args.backend if b[0] == "vllm"})
            print(f"vllm: error: {problem}", file=sys.stderr)
    runs: dict[str, list[dict]] = {_key(b): [] for b in args.backend}
    with tempfile.TemporaryDirectory(prefix="ttscale-bench-") as tmp:
        for repeat in range(args.repeats):
            for backend in args.backend:
                key = _key(backend)
                if key in errors:
                    continue
                try:
                    result = _run_worker(backend, workload, args, Path(tmp))
                except RuntimeError as error:
                    errors[key] = str(error)
                    print(f"{key}: error: {error}", file=sys.stderr)
                    continue
                runs[key].append(result)
                print(report.run_line(repeat + 1, args.repeats, result, workload), flush=True)
    results = [report.summary(key, runs[key], workload, floor / rate)
               for key in runs if runs[key]]
    ratios = report.ratios(results)
    print(report.table(results, ratios))
    for key, error in errors.items():
        print(f"{key}: not measured: {error}")
    if args.output_json:
        document = {
            "command": command(args), "device": device, "workload": vars_of(workload),
            "settings": {"dtype": args.dtype, "threads": args.threads,
                         "neighbours": args.neighbours,
                         "kv_cache_space_gib": args.kv_cache_space, "prefix_caching": True,
                         "omp_wait_policy": wait_policy,
                         "ignore_eos": True, "temperature": 1.0, "seed": args.seed},
            "compute_floor": {"flops": floor, "matmul_flops_per_s": rate, "note": rate_note,
                              "seconds": floor / rate},
            "versions": report.versions(runs), "results": results, "ratios": ratios,
            "errors": errors, "load_average_end": list(os.getloadavg()),
        }
        Path(args.output_json).write_text(json.dumps(document, indent=1) + "\n")
        print(f"wrote {args.output_json}")
    return 1 if errors else 0


def _key(backend: tuple[str, int | None]) -> str:
    name, block = backend
    return name if block is None else f"{name}:{block}"


def _vllm_problem(python: str) -> str | None:
    """Why vLLM cannot run from ``python``, or None when ``import vllm`` works."""
    if not Path(python).exists():
        return f"no vLLM interpreter at {python}: {VLLM_HINT}"
    probe = subprocess.run([python, "-c", "import vllm"], capture_output=True, text=True,
                           timeout=300)
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["(no message)"])[-1]
        return f"`import vllm` fails in {python} ({last}): {VLLM_HINT}"
    return None


def _run_worker(backend, workload: Workload, args, tmp: Path) -> dict:
    """One run of one backend in its own process; its result with start-up and load added."""
    name, block = backend
    spec = {"backend": name, "cpu_threads": args.threads if name == "ttscale-fixed" else None,
            "model": str(Path(args.model).resolve()), "dtype": args.dtype,
            "seed": args.seed, "threads": args.threads, "block_size": block,
            "kv_space_gib": args.kv_cache_space, "prompts": workload.prompts, "n": workload.n,
            "output_len": workload.output_len, "beam_width": workload.beam_width,
            # a prompt of its own, so that the warm-up leaves nothing in a prefix cache
            "warmup_prompt": list(range(3, 35))}
    (tmp / "spec.json").write_text(json.dumps(spec))
    out, log = tmp / "result.json", tmp / f"{name}.log"
    out.unlink(missing_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads),
           "VLLM_CPU_OMP_THREADS_BIND": os.environ.get(
               "VLLM_CPU_OMP_THREADS_BIND", "0" if args.threads == 1 else f"0-{args.threads - 1}"),
           "VLLM_CPU_KVCACHE_SPACE": str(args.kv_cache_space), "TOKENIZERS_PARALLELISM": "false"}
    python = args.vllm_python if name == "vllm" else sys.executable
    load = os.getloadavg()[0]
    neighbours = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
                  for _ in range(args.neighbours)]
    spawned = time.time()
    try:
        with open(log, "w") as f:
            code = subprocess.run([python, str(WORKER), str(tmp / "spec.json"), str(out)],
                                  stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    finally:
        for neighbour in neighbours:
            neighbour.kill()
            neighbour.wait()
    if code != 0 or not out.exists():
        lines = log.read_text(errors="replace").strip().splitlines()
        # the first exception line is the root cause (vLLM's processes repeat it as they stop)
        cause = next((line for line in lines if re.search(r"\w(Error|Exception): ", line)),
                     lines[-1] if lines else "(no output)")
        kept = Path(tempfile.mkstemp(prefix=f"ttscale-bench-{name}-", suffix=".log")[1])
        shutil.copyfile(log, kept)
        raise RuntimeError(f"the {name} worker exited with {code}: {cause.strip()} "
                           f"(its whole log: {kept})")
    result = json.loads(out.read_text())
    result |= {"backend": _key(backend), "name": name,
               "startup_s": result.pop("ready") - spawned,
               "load_average": [load, os.getloadavg()[0]]}
    return result


def command(args) -> str:
    """The command line that reproduces this run (flags in a fixed order)."""
    words = ["ttscale", "bench", "throughput", "--model", args.model,
             "--backend", ",".join(_key(b) for b in args.backend),
             "--dataset-name", args.dataset_name]
    if args.dataset_path:
        words += ["--dataset-path", args.dataset_path]
    else:
        words += ["--input-len", str(args.input_len)]
    if args.prefix_len:
        words += ["--prefix-len", str(args.prefix_len)]
    words += ["--output-len", str(args.output_len), "--num-prompts", str(args.num_prompts),
              "--n", str(args.n)]
    if args.use_beam_search:
        words += ["--use-beam-search"] + (["--beam-width", str(args.beam_width)]
                                          if args.beam_width else [])
    words += ["--dtype", args.dtype, "--threads", str(args.threads), "--repeats",
              str(args.repeats), "--seed", str(args.seed)]
    if args.neighbours:
        words += ["--neighbours", str(args.neighbours)]
    if args.kv_cache_space != 2:
        words += ["--kv-cache-space", str(args.kv_cache_space)]
    if args.output_json:
        words += ["--output-json", args.output_json]
    return shlex.join(words)


def vars_of(workload: Workload) -> dict:
    lengths = [len(p) for p in workload.prompts]
    return {"dataset": workload.dataset, "num_requests": workload.num_requests,
            "n": workload.n, "beam_width": workload.beam_width,
            "output_len": workload.output_len, "prompt_tokens": sum(lengths),
            "prompt_len_min": min(lengths), "prompt_len_max": max(lengths),
            "prompt_len_median": statistics.median(lengths),
            "shared_prefix": workload.shared_prefix, "description": workload.describe()}
