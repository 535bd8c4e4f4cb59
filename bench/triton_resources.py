"""Registers, local memory and shared memory of the Triton decode kernels, compiled for a GPU
without one (the ptxas and cuobjdump of the Triton wheel): how many programs of each launch
shape fit on one multiprocessor, before any GPU time is spent.

Run (not under ``TRITON_INTERPRET``): ``python bench/triton_resources.py [--arch 90]``. The
launch shapes are the target row's of ``bench_attention.py`` (Llama-3.2-1B heads, bf16). No
timing: occupancy is a reason to try a shape, the GPU table says whether it wins.
"""

from __future__ import annotations

import argparse
import inspect
import os
import subprocess
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from ttscale.kernels import cascade_decode as cd

REGISTERS_PER_SM, THREADS_PER_SM, SHARED_PER_SM = 65536, 2048, 228 * 1024  # sm_80 / sm_90
FLOAT32 = {"part_lse_ptr", "lse_ptr"}
DATA = {"q_ptr", "k_ptr", "v_ptr", "part_out_ptr", "out_ptr"}
# (block_m, num_splits, overlap, suffix keys a step, suffix warps), as in bench_attention.py
SHAPES = [(128, 3, False, 64, 4), (128, 3, False, 64, 8), (128, 3, False, 32, 4),
          (128, 3, False, 32, 8), (64, 2, False, 64, 4), (128, 3, True, 64, 4)]


def resources(kernel, constants: dict, num_warps: int, arch: int) -> dict:
    names = list(inspect.signature(kernel.fn).parameters)
    constants = {k: v for k, v in constants.items() if k in names}
    signature = {
        name: "constexpr" if name in constants
        else ("*bf16" if name in DATA else "*fp32" if name in FLOAT32 else "*i32")
        if name.endswith("_ptr") else "fp32" if name == "qk_scale" else "i32"
        for name in names
    }
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constants),
                              target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": num_warps, "num_stages": 2})
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([str(tool), "-res-usage", cubin.name], capture_output=True,
                               text=True, check=True).stdout
    line = next(line for line in usage.splitlines() if "REG:" in line)
    fields = dict(item.split(":") for item in line.split() if ":" in item)
    registers, shared = int(fields["REG"]), compiled.metadata.shared
    threads = 32 * num_warps
    per_sm = min(REGISTERS_PER_SM // (registers * threads), THREADS_PER_SM // threads,
                 SHARED_PER_SM // max(shared, 1))
    return {"registers": registers, "local": int(fields["LOCAL"]), "shared": shared,
            "programs/SM": per_sm, "warps/SM": per_sm * num_warps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 80, 90")
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("unset TRITON_INTERPRET: the interpreter compiles nothing")
    common = dict(GROUP=4, HEAD_DIM=64, BLOCK_D=64, BLOCK_SIZE=16, DOT_PRECISION="tf32",
                  BLOCK_N=64, PROMPT_BLOCK_N=64, BLOCK_G=16)
    print(f"sm_{args.arch}, Llama-3.2-1B heads (group 4, D 64), bf16, triton {triton.__version__}")
    print(f"{'launch shape':<44} {'kernel':<20} registers  local  shared  programs/SM  warps/SM")
    for block_m, splits, overlap, suffix_n, suffix_warps in SHAPES:
        shape = f"block_m={block_m} splits={splits} suffix {suffix_n}/{suffix_warps} warps" + (
            " overlapped" if overlap else "")
        level0_warps = 8 if block_m >= 128 else 4
        constants = dict(common, BLOCK_M=block_m, NUM_SPLITS=splits, SUFFIX_BLOCK_N=suffix_n)
        if overlap:
            kernels = [(cd.overlapped_kernel, level0_warps), (cd.merge_splits_kernel, suffix_warps)]
        else:
            kernels = [(cd.prompt_kernel, level0_warps), (cd.suffix_merge_kernel, suffix_warps)]
        for kernel, warps in kernels:
            # the level-1 kernel names its suffix step BLOCK_N
            level1 = kernel is cd.suffix_merge_kernel
            r = resources(kernel, dict(constants, BLOCK_N=suffix_n) if level1 else constants,
                          warps, args.arch)
            print(f"{shape:<44} {kernel.fn.__name__:<20} {r['registers']:>9}  {r['local']:>5}  "
                  f"{r['shared']:>6}  {r['programs/SM']:>11}  {r['warps/SM']:>8}")


if __name__ == "__main__":
    main()
