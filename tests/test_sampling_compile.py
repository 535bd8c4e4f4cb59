"""The Triton sampling kernels compile for an H100 (sm_90) on this machine, without a GPU.

The interpreter runs the kernels' Python, not their compiled form: a type the compiler rejects,
or a float literal that silently becomes float64, shows up only here until a GPU runs them.
Compiling needs Triton out of interpreter mode, so it runs in a child process (this file as a
script).
"""

from __future__ import annotations

import sys

from paged import compile_in_child

INT64_POINTERS = ("offsets_ptr", "tokens_ptr", "top_ids_ptr")
INT32_POINTERS = ("top_k_ptr", "chunk_arg_ptr", "row_arg_ptr", "row_id_ptr", "probe_count_ptr",
                  "gather_ptr")
SCALARS = ("seed_lo", "seed_hi", "vocab", "num_chunks", "num_programs", "num_groups")
KERNELS = {
    "_chunk_stats_kernel": dict(BLOCK=4096, NUM_LOGPROBS=5),
    "_row_merge_kernel": dict(CHUNKS=64, ROW_GROUPS=8192, BLOCK=4096, NUM_CANDIDATES=4,
                              NUM_LOGPROBS=5, LOGPROBS_POW2=8),
    "_probe_kernel": dict(BLOCK=4096, NUM_CANDIDATES=4, GATHER_GROUPS=128),
    "_finish_kernel": dict(CHUNKS=64, NUM_CANDIDATES=4, PROBES=16, BLOCK=512, ROW_GROUPS=8192,
                           GATHER_GROUPS=128),
}


def _signature(kernel, logits_type):
    types = {}
    for name in kernel.arg_names:
        if name == "logits_ptr":
            types[name] = logits_type
        elif name in INT64_POINTERS:
            types[name] = "*i64"
        elif name in INT32_POINTERS:
            types[name] = "*i32"
        elif name.endswith("_ptr"):
            types[name] = "*fp32"
        else:
            types[name] = "i32" if name in SCALARS else "constexpr"
    return types


def compile_all() -> None:
    """Compile every kernel for fp32 and bf16 logits; raise on the first failure."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from ttscale.kernels import sampling

    sm90 = GPUTarget("cuda", 90, 32)

    for name, constants in KERNELS.items():
        kernel = getattr(sampling, name)
        for logits_type in ("*fp32", "*bf16"):
            signature = _signature(kernel, logits_type)
            source = ASTSource(fn=kernel, signature=signature, constexprs=constants)
            compiled = triton.compile(source, target=sm90, options={"num_warps": 8})
            assert compiled.asm["cubin"], name
            assert ".f64" not in compiled.asm["ptx"], f"{name}: float64 in a float32 kernel"
            print(name, logits_type, "ok")


def test_kernels_compile_for_sm90():
    compile_in_child([sys.executable, __file__])


if __name__ == "__main__":
    compile_all()
