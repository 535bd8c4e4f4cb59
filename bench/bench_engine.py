"""Repeated sampling end to end: ttscale's ``LLM.generate`` against transformers ``generate``.

Workload: P problems × N samples × T new tokens each, EOS ignored, on one random-weight model
that both implementations load from the same directory (a config.json written here with the
published shape, weights drawn by transformers and saved). Same prompts (random token ids),
same lengths, same sampling (temperature, no top-k or top-p). Each row prints generated tokens
per second, peak memory, and the run's floor from the performance model (DESIGN.md):

- a decode step moves at least the weights, each problem's prompt KV once, each sequence's
  suffix KV, and the new KV; and computes ``2 × matmul params`` FLOPs plus attention per
  sequence; its floor is the larger of bytes / bandwidth and FLOPs / peak (the machine's rates,
  see conftest.py);
- the prompts' prefill is compute-bound: ``P × prompt × (2 × layer params + attention)``;
- the run's floor is the prefill's plus every step's.

Peak memory is what the implementation took above the process before it was built (weights,
KV, activations): on the CPU the resident-set high-water mark (``VmHWM``, reset through
``/proc/self/clear_refs``; ``ru_maxrss`` deltas where that is not available), on a GPU
``torch.cuda.max_memory_allocated``. ttscale's KV pool is sized to the workload (every prompt
and every sequence at its full length); transformers' cache grows as it goes.

The headline GPU row is the Tokasaurus repeated-sampling workload (Llama-3.2-1B shape, 128
problems × 1024 samples, prompt 700, 256 new tokens, temperature 0.6), whose KV does not fit at
once: the engine gets its default KV budget and streams sequences through the pool; the row
prints the sequences resident at peak (``engine.peak_sequences``). transformers does not run it.

Run: ``pytest bench/bench_engine.py --benchmark-enable -s`` (CPU rows: fp32, a Qwen2-shaped
model of about 20M parameters; GPU rows, bf16, only with CUDA). ``TTSCALE_BENCH_TINY=1``: tiny
shapes to check the code (``bench/gpu.sh --dry-run``).
"""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import json
import os
import re
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from conftest import flush_caches
from settings import DEVICES, TINY, TINY_DIMS

DTYPES = {"cpu": torch.float32, "cuda": torch.bfloat16}
BLOCK_SIZE = 16
IMPLS = ("ttscale", "transformers")
TABLE = "repeated sampling, end to end ({device}, {dtype})"
HEADLINE_TABLE = "Tokasaurus repeated-sampling workload ({device}, {dtype})"


# ---------------------------------------------------------------------------------------------
# Model shapes: config.json as published (random weights; nothing is downloaded).


@dataclass(frozen=True)
class Shape:
    name: str
    config: dict = field(hash=False, compare=False)

    def config_json(self) -> dict:
        return {"torch_dtype": "float32", "use_cache": True, **self.config}


QWEN2_20M = Shape(  # Qwen2 layout (qkv bias, tied embeddings) scaled to 19.5M parameters
    "Qwen2-20M",
    {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 384,
        "intermediate_size": 1024, "num_hidden_layers": 8, "num_attention_heads": 6,
        "num_key_value_heads": 2, "vocab_size": 16384, "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "tie_word_embeddings": True,
        "use_sliding_window": False, "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
    },
)
QWEN25_05B = Shape(  # Qwen/Qwen2.5-0.5B config.json
    "Qwen2.5-0.5B",
    {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 896,
        "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
        "num_key_value_heads": 2, "vocab_size": 151936, "max_position_embeddings": 32768,
        "max_window_layers": 24, "sliding_window": 32768, "use_sliding_window": False,
        "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "tie_word_embeddings": True,
        "bos_token_id": 151643, "eos_token_id": 151643, "hidden_act": "silu",
        "attention_dropout": 0.0, "initializer_range": 0.02,
    },
)
LLAMA32_1B = Shape(  # meta-llama/Llama-3.2-1B config.json
    "Llama-3.2-1B",
    {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048,
        "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
        "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128256,
        "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "rope_scaling": {
            "factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
            "original_max_position_embeddings": 8192, "rope_type": "llama3",
        },
        "tie_word_embeddings": True, "attention_bias": False, "mlp_bias": False,
        "bos_token_id": 128000, "eos_token_id": 128001, "hidden_act": "silu",
        "attention_dropout": 0.0, "initializer_range": 0.02, "pretraining_tp": 1,
    },
)
TINY_QWEN2 = Shape(
    "tiny-Qwen2",
    {**QWEN2_20M.config, **TINY_DIMS},
)


@dataclass(frozen=True)
class Workload:
    shape: Shape
    problems: int
    samples: int
    prompt_len: int
    new_tokens: int
    temperature: float = 1.0

    @property
    def label(self) -> str:
        return (f"{self.shape.name} {self.problems}x{self.samples} P={self.prompt_len} "
                f"T={self.new_tokens}")

    @property
    def generated(self) -> int:
        return self.problems * self.samples * self.new_tokens


if TINY:
    WORKLOADS = {"cpu": [Workload(TINY_QWEN2, 1, 4, 40, 8)],
                 "cuda": [Workload(TINY_QWEN2, 1, 4, 40, 8)]}
    HEADLINE = Workload(TINY_QWEN2, 4, 16, 24, 8, temperature=0.6)
    HEADLINE_SEQS = 20  # the pool holds the prompts and about this many sequences: it must stream
else:
    WORKLOADS = {
        "cpu": [Workload(QWEN2_20M, 1, n, 512, 64) for n in (16, 64)],
        "cuda": [Workload(s, 1, n, 1024, 256) for s in (QWEN25_05B, LLAMA32_1B)
                 for n in (16, 64, 256, 1024)],
    }
    HEADLINE = Workload(LLAMA32_1B, 128, 1024, 700, 256, temperature=0.6)
    HEADLINE_SEQS = None  # the engine's default budget
    # Knobs for a short GPU run: TTSCALE_BENCH_ENGINE_ROWS="Llama-3.2-1B:256,Qwen2.5-0.5B:64"
    # keeps those GPU rows only; TTSCALE_BENCH_HEADLINE_PROBLEMS=16 runs the headline workload on
    # that many problems (the table says so), every other dimension unchanged; 0 skips it.
    if os.environ.get("TTSCALE_BENCH_ENGINE_ROWS"):
        keep = {tuple(row.split(":")) for row in os.environ["TTSCALE_BENCH_ENGINE_ROWS"].split(",")}
        WORKLOADS["cuda"] = [w for w in WORKLOADS["cuda"] if (w.shape.name, str(w.samples)) in keep]
    if os.environ.get("TTSCALE_BENCH_HEADLINE_PROBLEMS"):
        HEADLINE = dataclasses.replace(
            HEADLINE, problems=int(os.environ["TTSCALE_BENCH_HEADLINE_PROBLEMS"]))


PARAMS = [
    pytest.param(device, w, id=f"{device}-{w.label.replace(' ', '-')}")
    for device in DEVICES
    for w in WORKLOADS[device]
]


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory):
    """Shape name -> a directory with its config.json and random weights (built on first use)."""
    dirs: dict[str, Path] = {}

    def get(shape: Shape, device: str) -> Path:
        if shape.name not in dirs:
            dirs[shape.name] = write_model(shape, tmp_path_factory.mktemp(shape.name), device)
        return dirs[shape.name]

    return get


def write_model(shape: Shape, directory: Path, device: str) -> Path:
    """config.json as published, weights of transformers' own initialisation, saved in bf16 on a
    GPU (what the rows run) and fp32 on the CPU."""
    import transformers

    (directory / "config.json").write_text(json.dumps(shape.config_json(), indent=1))
    config = transformers.AutoConfig.from_pretrained(directory)
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=DTYPES[device])
    model.save_pretrained(directory)
    del model
    _release(device)
    return directory


def prompts_for(w: Workload, vocab: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(1234)
    return torch.randint(3, vocab, (w.problems, w.prompt_len), generator=gen).tolist()


# ---------------------------------------------------------------------------------------------
# The two implementations: each returns (run, model) where run() generates the whole workload.


def kv_budget(w: Workload, config, dtype: torch.dtype, sequences: int | None = None) -> int:
    """Bytes for every prompt (all but its last token) and ``sequences`` (default all) suffixes
    of T + 1 tokens, as LLM.generate reserves them."""
    from ttscale.model import block_bytes

    blocks = lambda n: -(-n // BLOCK_SIZE)
    sequences = w.problems * w.samples if sequences is None else sequences
    total = w.problems * blocks(w.prompt_len - 1) + sequences * blocks(w.new_tokens + 1)
    return total * block_bytes(config, BLOCK_SIZE, dtype)


def build_ttscale(w: Workload, model_dir: Path, device: str, kv_budget_bytes: int | None):
    from ttscale.llm import LLM

    llm = LLM(model_dir, device=device, dtype=DTYPES[device], kv_budget_bytes=kv_budget_bytes,
              block_size=BLOCK_SIZE)
    return generate_with(llm, w), llm


def generate_with(llm, w: Workload):
    """A call running ``w`` through ``llm.generate``; returns each completion's length."""
    from ttscale.sampling_params import SamplingParams

    params = SamplingParams(n=w.samples, temperature=w.temperature, top_k=0, top_p=1.0,
                            max_tokens=w.new_tokens, ignore_eos=True, seed=0)
    prompts = prompts_for(w, llm.model.config.vocab_size)

    def run():
        outs = llm.generate(prompts, params, use_tqdm=False)
        return [len(c.token_ids) for o in outs for c in o.outputs]

    return run


def build_transformers(w: Workload, model_dir: Path, device: str, model=None):
    import transformers

    if model is None:
        model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=DTYPES[device])
        model = model.to(device).eval()
    config = transformers.GenerationConfig(
        do_sample=True, temperature=w.temperature, top_k=0, top_p=1.0,
        max_new_tokens=w.new_tokens, min_new_tokens=w.new_tokens,  # EOS never ends a sample
        num_return_sequences=w.samples, pad_token_id=0, eos_token_id=model.config.eos_token_id,
    )
    ids = torch.tensor(prompts_for(w, model.config.vocab_size), device=device)
    mask = torch.ones_like(ids)

    def run():
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
        return [out.shape[1] - w.prompt_len] * out.shape[0]

    return run, model


# ---------------------------------------------------------------------------------------------
# Peak memory and the floor.


class PeakMemory:
    """Memory taken above the level at ``start()``: CPU resident set or CUDA allocations."""

    def __init__(self, device: str):
        self.device = device
        self.base = 0

    def start(self) -> None:
        gc.collect()
        _fix_malloc_thresholds()
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        elif _reset_hwm():
            self.base = _proc_status()["VmHWM"]
        else:
            self.base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def peak_bytes(self) -> int:
        if self.device == "cuda":
            return torch.cuda.max_memory_allocated() - self.base
        if os.path.exists("/proc/self/status"):
            return _proc_status()["VmHWM"] - self.base
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self.base


def _fix_malloc_thresholds() -> None:
    """glibc raises its mmap threshold as large blocks are freed, after which freed tensors
    stay in the heap and the next contender reuses them without growing the resident set: fix
    the threshold (128 KiB), so that large blocks are unmapped when freed and each contender's
    high-water mark counts its own memory."""
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(-3, 128 << 10)  # M_MMAP_THRESHOLD
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _proc_status() -> dict[str, int]:
    text = Path("/proc/self/status").read_text()
    return {k: int(re.search(rf"{k}:\s+(\d+) kB", text).group(1)) * 1024 for k in ("VmHWM",)}


def _reset_hwm() -> bool:
    """Reset the resident-set high-water mark to the current resident set (Linux)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _release(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


@dataclass(frozen=True)
class Floor:
    seconds: float  # the whole run: prefill and every decode step
    step_seconds: float  # mean decode step
    params: int
    weight_bytes: int  # read by every decode step (layers and the LM head)
    kv_bytes_per_token: int


def floor_for(w: Workload, model, machine) -> Floor:
    """The performance model of DESIGN.md with ``machine``'s bandwidth and peak rate."""
    c = model.config
    item = model.dtype.itemsize
    layer_params = sum(p.numel() for p in model.layers.parameters())
    matmul_params = layer_params + c.vocab_size * c.hidden_size  # the LM head, tied or not
    params = sum(p.numel() for p in model.parameters())
    kv_token = 2 * c.num_layers * c.num_kv_heads * c.head_dim * item
    attention_flops = lambda context: 4 * c.num_layers * c.num_heads * c.head_dim * context
    weights = matmul_params * item
    prefill_tokens = w.problems * (w.prompt_len - 1)
    prefill = machine.floor_seconds(
        weights, prefill_tokens * (2 * layer_params + attention_flops(w.prompt_len / 2))
    )
    seqs = w.problems * w.samples
    decode = 0.0
    for t in range(w.new_tokens):
        kv = (w.problems * w.prompt_len + seqs * (t + 1)) * kv_token
        flops = seqs * (2 * matmul_params + attention_flops(w.prompt_len + t))
        decode += machine.floor_seconds(weights + kv, flops)
    return Floor(prefill + decode, decode / w.new_tokens, params, weights, kv_token)


_CPU_RATES: dict[str, object] = {}  # machine name -> rates, measured once per pytest run


def cpu_rates(machine):
    """The machine's CPU rates, with the peak raised to oneDNN's matrix product where that is
    faster than the torch.mm it was measured with (the engine's CPU linears run on oneDNN)."""
    if machine.name not in _CPU_RATES:
        _CPU_RATES[machine.name] = _with_onednn_peak(machine)
    return _CPU_RATES[machine.name]


def _with_onednn_peak(machine):
    from ttscale.model import cpu_linear

    a = torch.randn(2048, 2048)
    packed = cpu_linear.pack(a)
    if packed is None:
        return machine
    run = lambda: cpu_linear.linear(a, packed, None)
    run()
    start = time.perf_counter()
    for _ in range(3):
        run()
    rate = 3 * 2 * 2048**3 / (time.perf_counter() - start)
    if rate <= machine.peak_flops:
        return machine
    note = f"{machine.peak_note}; oneDNN on packed weights: {rate / 1e9:.0f} GFLOP/s, used instead"
    return dataclasses.replace(machine, peak_flops=rate, peak_note=note)


# ---------------------------------------------------------------------------------------------
# Timing: end-to-end calls of seconds each, after a warm-up call that keeps first-call costs out.


def time_call(fn, device: str) -> tuple[float, list[int]]:
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    flush_caches(torch.device(device))
    sync()
    start = time.perf_counter()
    result = fn()
    sync()
    return time.perf_counter() - start, result


def rounds_for(device: str, w: Workload) -> int:
    if TINY:
        return 1
    return 3 if device == "cpu" else (1 if w.samples >= 256 else 3)


def _dtype_name(device: str) -> str:
    return str(DTYPES[device]).removeprefix("torch.")


def _load() -> str:
    return f"{os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else "?"


# ---------------------------------------------------------------------------------------------
# The benchmarks.


@dataclass
class Contender:
    name: str
    run: object  # () -> completion lengths
    owner: object  # the LLM or the transformers model
    peak_bytes: int = 0
    times: list[float] = field(default_factory=list)


def build(name: str, w: Workload, model_dir: Path, device: str) -> Contender:
    """Build ``name``, warm it up on a small workload (first-call costs: kernel compilation,
    allocator growth) and time its first round; the peak memory covers all three."""
    memory = PeakMemory(device)
    memory.start()
    small = dataclasses.replace(w, problems=1, samples=2, new_tokens=4)
    if name == "ttscale":
        from ttscale.model import read_config

        budget = kv_budget(w, read_config(model_dir), DTYPES[device])
        run, owner = build_ttscale(w, model_dir, device, budget)
        generate_with(owner, small)()
    else:
        run, owner = build_transformers(w, model_dir, device)
        build_transformers(small, model_dir, device, model=owner)[0]()
    seconds, lengths = time_call(run, device)
    assert lengths == [w.new_tokens] * (w.problems * w.samples), f"{name}: wrong lengths"
    return Contender(name, run, owner, memory.peak_bytes(), [seconds])


def measure_rounds(contenders: list[Contender], device: str, rounds: int) -> None:
    """The rounds after each contender's first alternate between the contenders, so that a
    shared machine's load drifting over the minutes of a row weighs on both alike."""
    for _ in range(rounds - 1):
        for c in contenders:
            c.times.append(time_call(c.run, device)[0])


@pytest.mark.parametrize("device,workload", PARAMS)
def test_repeated_sampling(device, workload, model_dirs, machine, tables):
    table = TABLE.format(device=device, dtype=_dtype_name(device))
    rates = machine(device) if device == "cuda" else cpu_rates(machine(device))
    tables.note(table, "floor: the prefill's and every decode step's, summed; " + rates.floor_note(
        "the weights + each problem's prompt KV once + every sequence's suffix KV", flops=True))
    tables.note(table, "tokens/s: generated tokens over the wall time of the whole call (prefill "
                       "included), median of the rounds after a warm-up call; peak MB: memory "
                       "taken above the process before the implementation was built, over its "
                       "build, warm-up and first round")
    tables.note(table, f"torch threads {torch.get_num_threads()}, OMP_WAIT_POLICY="
                       f"{os.environ.get('OMP_WAIT_POLICY', '(unset)')}")
    tables.declare(table, ["workload", "params M", "floor s", "floor tok/s", "ttscale tok/s",
                           "transformers tok/s", "ttscale ÷ transformers", "ttscale of floor",
                           "ttscale peak MB", "transformers peak MB", "ttscale peak seqs",
                           "load"])
    flush_caches(torch.device(device))  # its buffer stays out of the memory measurement
    model_dir = model_dirs(workload.shape, device)
    cells = {"workload": workload.label}
    data = {"generated": workload.generated, "load_start": _load()}
    rounds = rounds_for(device, workload)
    # On a GPU each contender runs alone (both may not fit at once); on the CPU they alternate.
    contenders, floor, llm = [], None, None
    for name in IMPLS:
        try:
            contender = build(name, workload, model_dir, device)
        except torch.cuda.OutOfMemoryError:
            cells[f"{name} tok/s"] = "OOM"
            _release(device)
            continue
        contenders.append(contender)
        if name == "ttscale":
            llm = contender.owner
            floor = floor_for(workload, llm.model, rates)
        if device == "cuda":
            measure_rounds([contender], device, rounds)
            data["peak_sequences"] = llm.engine.peak_sequences if name == "ttscale" else None
            contender.run = contender.owner = llm = None
            _release(device)
    if device != "cuda":
        measure_rounds(contenders, device, rounds)
    if llm is not None:
        data["peak_sequences"] = llm.engine.peak_sequences

    for c in contenders:
        seconds = sorted(c.times)[len(c.times) // 2]
        cells |= {f"{c.name} tok/s": workload.generated / seconds,
                  f"{c.name} peak MB": c.peak_bytes / 1e6}
        data |= {f"{c.name}_s": seconds, f"{c.name}_times": c.times,
                 f"{c.name}_peak_bytes": c.peak_bytes}
        print(f"\n{table} | {workload.label} | {c.name}: {workload.generated / seconds:.0f} "
              f"tokens/s ({seconds:.2f} s), peak {c.peak_bytes / 1e6:.0f} MB")
    if floor is not None and "ttscale_s" in data:
        cells |= {"params M": floor.params / 1e6, "floor s": floor.seconds,
                  "floor tok/s": workload.generated / floor.seconds,
                  "ttscale of floor": f"{floor.seconds / data['ttscale_s']:.0%}",
                  "ttscale peak seqs": data["peak_sequences"]}
        data |= {"floor_s": floor.seconds, "floor_step_s": floor.step_seconds,
                 "params": floor.params, "weight_bytes": floor.weight_bytes,
                 "kv_bytes_per_token": floor.kv_bytes_per_token}
    if "ttscale_s" in data and "transformers_s" in data:
        cells["ttscale ÷ transformers"] = f"{data['transformers_s'] / data['ttscale_s']:.1f}x"
    cells["load"] = f"{data['load_start']}-{_load()}"
    tables.add(table, workload.label, cells, data)
    contenders.clear()
    _release(device)


@pytest.mark.skipif(not TINY and "cuda" not in DEVICES, reason="a GPU row")
def test_tokasaurus_workload(model_dirs, machine, tables):
    """Streams P × N sequences through the default KV pool; prints tokens/s and peak residency."""
    if HEADLINE.problems == 0:
        pytest.skip("TTSCALE_BENCH_HEADLINE_PROBLEMS=0")
    device = "cuda" if "cuda" in DEVICES else "cpu"
    w = HEADLINE
    table = HEADLINE_TABLE.format(device=device, dtype=_dtype_name(device))
    rates = machine(device)
    model_dir = model_dirs(w.shape, device)
    budget = None
    if HEADLINE_SEQS is not None:
        from ttscale.model import read_config

        budget = kv_budget(w, read_config(model_dir), DTYPES[device], HEADLINE_SEQS)
    run, llm = build_ttscale(w, model_dir, device, budget)
    # A small run first (kernel compilation, allocator), not the whole workload twice.
    generate_with(llm, Workload(w.shape, 2, 8, w.prompt_len, 8, w.temperature))()
    llm.engine.peak_sequences = 0
    memory = PeakMemory(device)
    memory.start()
    seconds, lengths = time_call(run, device)
    peak = memory.peak_bytes()
    assert lengths == [w.new_tokens] * (w.problems * w.samples)
    floor = floor_for(w, llm.model, rates)
    cells = {
        "workload": w.label + f" temperature {w.temperature}",
        "generated tokens": w.generated,
        "wall s": seconds,
        "tokens/s": w.generated / seconds,
        "floor tok/s (all resident)": w.generated / floor.seconds,
        "of floor": f"{floor.seconds / seconds:.0%}",
        "peak sequences": llm.engine.peak_sequences,
        "KV pool blocks": llm.engine.pool.num_blocks,
        "peak MB (after build)": peak / 1e6,
    }
    tables.note(table, "floor tok/s assumes every sequence resident at once (each prompt read "
                       "once per step); the engine streams them through its pool instead")
    tables.add(table, w.label, cells, {"seconds": seconds, "floor_s": floor.seconds,
                                       "peak_sequences": llm.engine.peak_sequences,
                                       "peak_bytes": peak})
    print(f"\n{table} | {w.label}: {w.generated / seconds:.0f} tokens/s, "
          f"peak {llm.engine.peak_sequences} sequences resident")
    del run, llm
    _release(device)
