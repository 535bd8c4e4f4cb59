"""The fused elementwise Triton kernels compile for an H100 (sm_90) on this machine, without a
GPU, for every dtype the model runs in (the interpreter does not compile them; see
test_sampling_compile.py). Compiling needs Triton out of interpreter mode: a child process."""

from __future__ import annotations

import sys

from paged import compile_in_child

FLOAT32_POINTERS = ("cos_sin_ptr",)
INT64_POINTERS = ("slots_ptr",)
FLOAT_SCALARS = ("eps",)
KERNELS = {
    "_add_rms_norm_kernel": dict(BLOCK=4096),
    "_rope_write_kv_kernel": dict(HEAD_DIM=128, HALF_BLOCK=64),
    "_silu_mul_kernel": dict(BLOCK=1024),
}


def _signature(kernel, data_type):
    types = {}
    for name in kernel.arg_names:
        if name in FLOAT32_POINTERS:
            types[name] = "*fp32"
        elif name in INT64_POINTERS:
            types[name] = "*i64"
        elif name.endswith("_ptr"):
            types[name] = data_type
        elif name in FLOAT_SCALARS:
            types[name] = "fp32"
        else:
            types[name] = "constexpr" if name.isupper() else "i32"
    return types


def compile_all() -> None:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from ttscale.kernels import elementwise

    sm90 = GPUTarget("cuda", 90, 32)
    for name, constants in KERNELS.items():
        kernel = getattr(elementwise, name)
        for data_type in ("*bf16", "*fp16", "*fp32"):
            source = ASTSource(fn=kernel, signature=_signature(kernel, data_type),
                               constexprs=constants)
            compiled = triton.compile(source, target=sm90, options={"num_warps": 4})
            assert compiled.asm["cubin"], name
            assert ".f64" not in compiled.asm["ptx"], f"{name}: float64 in a float32 kernel"
            print(name, data_type, "ok")


def test_kernels_compile_for_sm90():
    compile_in_child([sys.executable, __file__])


if __name__ == "__main__":
    compile_all()
