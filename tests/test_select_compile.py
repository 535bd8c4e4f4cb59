"""The select_and_fork and copy_blocks Triton kernels compile for a Hopper GPU, without one.

The other tests run the kernels under the interpreter, which accepts code the GPU compiler
rejects (a global that is not constexpr, say). Compiling ahead of time for sm_90 with the ptxas
that ships in the Triton wheel catches that on machines without a GPU. It runs in a subprocess,
since the tests' interpreter mode replaces every @triton.jit function.
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
    from ttscale.kernels import select

    KERNELS = [  # kernel, pointer types other than int32, compile-time constants
        (select._rank_kernel, {"scores_ptr": "*fp32"}, {"BLOCK": 64}),
        (select._release_kernel, {"freed_ptr": "*i8"}, {"CHUNK": 1024, "BLOCK": 64}),
        (select._push_kernel, {"freed_ptr": "*i8"}, {"CHUNK": 1024, "CHUNKS": 128}),
        (select._fork_kernel, {}, {"CHUNKS": 128, "SEARCH_STEPS": 4, "BLOCK": 64}),
        (select._finish_kernel, {}, {"CHUNKS": 128}),
        (select._copy_blocks_kernel, {"k_ptr": "*bf16", "v_ptr": "*bf16"}, {"BLOCK": 1024}),
    ]
    for kernel, pointers, constants in KERNELS:
        signature = {}
        for name in inspect.signature(kernel.fn).parameters:
            if name in constants:
                signature[name] = "constexpr"
            else:
                signature[name] = pointers.get(name, "*i32") if name.endswith("_ptr") else "i32"
        source = ASTSource(fn=kernel, signature=signature, constexprs=constants)
        triton.compile(source, target=GPUTarget("cuda", 90, 32))
    print("compiled", len(KERNELS))
""")


def test_triton_kernels_compile_for_sm90():
    stdout = compile_in_child([sys.executable, "-c", SCRIPT])
    assert "compiled 6" in stdout
