"""Where a GPU decode step's time goes: the torch profiler over ``LLM.generate`` on a random-weight
Llama-3.2-1B shape (bf16), and the ops alone with their argument checks off.

Run on the GPU machine: ``python bench/profile_engine.py [--out DIR]``. Prints, per workload, the
wall time, the summed kernel time (and so the share of the wall spent outside kernels: host
overhead and idle device), the top kernels and host ops, and the host-device synchronisations.
Writes a Chrome trace per workload under ``--out`` when given.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_engine import LLAMA32_1B, Workload, generate_with, write_model  # noqa: E402


def profile_generate(llm, w: Workload, out: Path | None, label: str, tables: bool = True) -> None:
    from torch.profiler import ProfilerActivity, profile

    run = generate_with(llm, w)
    generate_with(llm, Workload(w.shape, 1, 4, w.prompt_len, 8, w.temperature))()  # warm-up
    torch.cuda.synchronize()
    start = time.perf_counter()
    run()
    torch.cuda.synchronize()
    plain = time.perf_counter() - start
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        run()
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
    events = prof.key_averages()
    kernel_us = sum(e.self_device_time_total for e in events if e.device_type.name == "CUDA")
    print(f"\n==== {label}: {w.label}: {w.generated / plain:.0f} tok/s unprofiled ({plain:.2f} s); "
          f"profiled wall {wall:.2f} s, kernels {kernel_us / 1e6:.2f} s "
          f"({1 - kernel_us / 1e6 / wall:.0%} of the wall outside kernels)")
    if tables:
        print(events.table(sort_by="self_cuda_time_total", row_limit=16, max_name_column_width=50))
        print(events.table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=50))
    if out is not None:
        prof.export_chrome_trace(str(out / f"trace_{label}.json"))


def op_times() -> None:
    """The decode-attention and sampling ops alone, checks off, plan made once: what a step pays."""
    import triton.testing

    from ttscale import ops
    from ttscale.testing import make_case

    def median_us(fn) -> float:
        return triton.testing.do_bench(fn, return_mode="median") * 1e3

    print("\n==== ops alone (triton.testing.do_bench median, µs)")
    for n, prompt, suffix in [(256, 2048, 64), (1024, 700, 128), (4096, 700, 128)]:
        case = make_case([n], [prompt], [suffix] * n, q_heads=32, kv_heads=8, head_dim=64,
                         dtype=torch.bfloat16, device="cuda", seed=0, block_size=16)
        args = case.args()
        plan = ops.plan_cascade_decode(args[5], args[3].shape[0])
        for backend in ("cuda", "triton"):
            us = median_us(lambda a=args, p=plan, b=backend: ops.cascade_decode_attention(
                *a, plan=p, backend=b, validate=False))
            print(f"cascade_decode 1B heads N={n} P={prompt} S={suffix} {backend}: {us:.1f}")
    for b, v in [(256, 151936), (1024, 128256), (4096, 128256)]:
        logits = torch.randn(b, v, device="cuda")
        temperature = torch.ones(b, device="cuda")
        top_k = torch.zeros(b, dtype=torch.int32, device="cuda")
        min_p = torch.zeros(b, device="cuda")
        offsets = torch.arange(b, device="cuda")
        for name, top_p in (("top-p 0.95", 0.95), ("plain", 1.0)):
            p = torch.full((b,), top_p, device="cuda")
            us = median_us(lambda p=p, logits=logits, t=temperature, k=top_k, m=min_p,
                           o=offsets: ops.sample(logits, t, k, p, m, 0, o))
            print(f"sample B={b} V={v} {name}: {us:.1f}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path)
    parser.add_argument("--model-dir", type=Path, default=Path("/tmp/profile-llama1b"))
    parser.add_argument("--window", type=int, default=8)
    parser.add_argument("--no-ops", action="store_true", help="skip the ops-alone timings")
    args = parser.parse_args()
    from ttscale.llm import LLM

    if not args.no_ops:
        op_times()
    if not (args.model_dir / "config.json").exists():
        args.model_dir.mkdir(parents=True, exist_ok=True)
        write_model(LLAMA32_1B, args.model_dir, "cuda")
    for graphs in (True, False):
        llm = LLM(args.model_dir, device="cuda", dtype=torch.bfloat16, window=args.window,
                  cuda_graphs=graphs)
        for w in [Workload(LLAMA32_1B, 1, 64, 1024, 64), Workload(LLAMA32_1B, 1, 256, 1024, 64),
                  Workload(LLAMA32_1B, 4, 1024, 700, 64, 0.6)]:
            label = f"{'graphs' if graphs else 'eager'}-w{args.window}-{w.problems}x{w.samples}"
            profile_generate(llm, w, args.out, label, tables=graphs)
        del llm
        torch.cuda.empty_cache()
    print(json.dumps({"done": True}))


if __name__ == "__main__":
    main()
