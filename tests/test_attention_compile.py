"""The Triton cascade decode kernels compile for a Hopper GPU, without one.

The other tests run them under the interpreter, which accepts code the GPU compiler rejects.
Compiling ahead of time for sm_90 with the ptxas that ships in the Triton wheel catches that on
machines without a GPU, for both launch orders at the target row's launch shape (bf16, 1B and 8B
head dims). It runs in a subprocess, since the tests' interpreter mode replaces every
@triton.jit function.
"""

from __future__ import annotations

import sys
import textwrap

from paged import compile_in_child

SCRIPT = textwrap.dedent("""
    import inspect
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from ttscale.kernels import cascade_decode as cd

    FLOAT32 = {"part_lse_ptr", "lse_ptr"}
    DATA = {"q_ptr", "k_ptr", "v_ptr", "part_out_ptr", "out_ptr"}
    compiled = 0
    for head_dim in (64, 128):
        shared = dict(GROUP=4, HEAD_DIM=head_dim, BLOCK_D=head_dim, BLOCK_SIZE=16, NUM_SPLITS=3,
                      DOT_PRECISION="tf32", BLOCK_M=128, BLOCK_N=64, BLOCK_G=16,
                      SUFFIX_BLOCK_N=64, PROMPT_BLOCK_N=64)
        for kernel, warps in ((cd.prompt_kernel, 8), (cd.suffix_merge_kernel, 4),
                              (cd.overlapped_kernel, 8), (cd.merge_splits_kernel, 4)):
            names = list(inspect.signature(kernel.fn).parameters)
            constants = {k: v for k, v in shared.items() if k in names}
            signature = {}
            for name in names:
                if name in constants:
                    signature[name] = "constexpr"
                elif name.endswith("_ptr"):
                    signature[name] = ("*bf16" if name in DATA else
                                       "*fp32" if name in FLOAT32 else "*i32")
                else:
                    signature[name] = "fp32" if name == "qk_scale" else "i32"
            source = ASTSource(fn=kernel, signature=signature, constexprs=constants)
            triton.compile(source, target=GPUTarget("cuda", 90, 32),
                           options={"num_warps": warps, "num_stages": 2})
            compiled += 1
    print("compiled", compiled)
""")


def test_decode_kernels_compile_for_sm90():
    stdout = compile_in_child([sys.executable, "-c", SCRIPT])
    assert "compiled 8" in stdout
