"""The prm_step_scores Triton kernels compile for a Hopper GPU, on a machine without one.

The other tests run the kernels under TRITON_INTERPRET=1, which accepts code the GPU compiler
rejects. Compiling ahead of time for sm_90 (Triton's wheel ships ptxas) catches that here. It
runs in a subprocess because this test process has the interpreter switched on.
"""

from __future__ import annotations

import sys
import textwrap

from paged import compile_in_child

SCRIPT = textwrap.dedent("""
    import itertools
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from ttscale.kernels import prm

    target = GPUTarget("cuda", 90, 32)
    count = 0
    head = dict(hidden_ptr="*bf16", weight_ptr="*bf16", bias_ptr="*bf16", scores_ptr="*fp32",
                T="i32", H="i32", stride_t="i32", KIND="constexpr", HAS_BIAS="constexpr",
                BLOCK_T="constexpr", BLOCK_H="constexpr")
    for kind, has_bias, (block_t, block_h) in itertools.product(
            (0, 1, 2), (False, True), ((1, 4096), (16, 256))):
        constants = dict(KIND=kind, HAS_BIAS=has_bias, BLOCK_T=block_t, BLOCK_H=block_h)
        triton.compile(ASTSource(prm._head_scores_kernel, head, constants), target=target)
        count += 1
    aggregate = dict(scores_ptr="*fp32", order_ptr="*i64", seg_starts_ptr="*i64",
                     state_in_ptr="*fp32", state_out_ptr="*fp32", AGG="constexpr",
                     BLOCK="constexpr")
    for agg in range(4):
        constants = dict(AGG=agg, BLOCK=128)
        triton.compile(ASTSource(prm._aggregate_kernel, aggregate, constants), target=target)
        count += 1
    print("compiled", count)
""")


def test_prm_triton_kernels_compile_for_sm90():
    stdout = compile_in_child([sys.executable, "-c", SCRIPT])
    assert "compiled 16" in stdout
