"""The CPU rows of bench_attention.py on one thread, timed in thread CPU time.

On cores that other jobs share, wall time measures the scheduler as much as the kernel (a
parallel region waits a time slice for every descheduled thread). One thread's CPU time does
not count the time it waits descheduled, so it compares kernels, and a kernel with its floor,
on a loaded machine. Everything is measured in this process the same way: the floor's rates (a
torch copy of 256 MB of written memory, a read-only pass over it, an fp32 2048² torch.mm) and
every row's time (best of several calls, caches flushed before each), for ours and for SDPA
over replicated KV; each output is checked against the plain-torch two-level version first.

Run: ``OMP_NUM_THREADS=1 .venv/bin/python bench/attention_cpu_time.py [--extension PATH]
[--json OUT]``; ``--extension`` loads another build of ``ttscale._C`` (for example main's) in
place of the installed one, to compare two kernels on the same rows.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path


def load_extension(path: str) -> None:
    spec = importlib.util.spec_from_file_location("ttscale._C", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["ttscale._C"] = module
    spec.loader.exec_module(module)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--extension", help="a ttscale._C build to load instead of the installed one")
    parser.add_argument("--json", help="write the rates and rows here")
    parser.add_argument("--calls", type=int, default=9, help="timed calls of ours per row")
    args = parser.parse_args()
    if args.extension:
        load_extension(args.extension)
    sys.path.insert(0, str(Path(__file__).parent))
    import torch

    import bench_attention as ba
    from ttscale import ops

    if torch.get_num_threads() != 1:
        sys.exit("run with OMP_NUM_THREADS=1: thread CPU time counts the calling thread only")
    flush = torch.empty(64 * 2**20, dtype=torch.int8)

    def cpu_seconds(fn, calls: int, flush_caches: bool = True) -> float:
        fn()
        best = float("inf")
        for _ in range(calls):
            if flush_caches:
                flush.zero_()
            start = time.thread_time()
            fn()
            best = min(best, time.thread_time() - start)
        return best

    src = torch.ones(64 * 2**20)  # written: a never-written tensor reads as the zero page
    dst = torch.empty_like(src)
    nbytes = src.numel() * 4
    copy_bw = 2 * nbytes / cpu_seconds(lambda: dst.copy_(src), 5, False)
    read_bw = nbytes / cpu_seconds(lambda: src.sum(), 5, False)
    a = torch.randn(2048, 2048)
    peak = 2 * 2048**3 / cpu_seconds(lambda: torch.mm(a, a), 3, False)
    print(f"one thread: copy {copy_bw / 1e9:.1f} GB/s (read + write), read-only "
          f"{read_bw / 1e9:.1f} GB/s, torch.mm {peak / 1e9:.0f} GFLOP/s (thread CPU time)")
    result = {"copy_bandwidth": copy_bw, "read_bandwidth": read_bw, "peak_flops": peak, "rows": {}}
    print(f"{'workload':24s} {'floor ms':>9s} {'ours ms':>9s} {'sdpa ms':>9s} "
          f"{'ours ÷ floor':>13s} {'SDPA ÷ ours':>12s}")
    for w in ba.WORKLOADS:
        if not w.fits_cpu():
            continue
        inputs = ba._build(w, torch.device("cpu"), torch.float32)
        plan = ops.plan_cascade_decode(inputs.problem_ids, 1)

        def ours():
            return ops.cascade_decode_attention(*inputs.args(), plan=plan, backend="cpu",
                                                validate=False)[0]

        if not ba._agrees(ours(), ba.torch_two_level(inputs)):
            sys.exit(f"{w.label}: output differs from the torch two-level version")
        k, v = ba.replicate_kv(inputs.k_cache, inputs), ba.replicate_kv(inputs.v_cache, inputs)
        ours_s = cpu_seconds(ours, args.calls)
        sdpa_s = cpu_seconds(lambda: ba.sdpa_replicated(inputs.q, k, v, inputs.scale), 3)
        nbytes, flops = w.bytes_floor(torch.float32), w.flops()
        floor = max(nbytes / copy_bw, flops / peak)
        result["rows"][w.label] = {"bytes": nbytes, "flops": flops, "floor_s": floor,
                                   "ours_s": ours_s, "sdpa_s": sdpa_s}
        print(f"{w.label:24s} {floor * 1e3:9.2f} {ours_s * 1e3:9.2f} {sdpa_s * 1e3:9.2f} "
              f"{ours_s / floor:12.2f}x {sdpa_s / ours_s:11.1f}x", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
