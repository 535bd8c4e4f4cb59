"""Glue to the compiled module ``ttscale._C``: addresses, dtype codes, streams.

Tensors cross the binding as data addresses of contiguous tensors; their sizes are checked in
:mod:`ttscale.ops` before anything reaches a kernel.
"""

from __future__ import annotations

import torch

try:
    from ttscale import _C
except ImportError as error:  # an install without the extension: only torch/triton backends
    _C = None
    IMPORT_ERROR: ImportError | None = error
else:
    IMPORT_ERROR = None

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def built() -> bool:
    return _C is not None


def built_with_cuda() -> bool:
    return _C is not None and bool(_C.with_cuda)


def address(t: torch.Tensor | None) -> int:
    if t is None:
        return 0
    assert t.is_contiguous(), "native kernels take contiguous tensors"
    return t.data_ptr()


def stream_of(t: torch.Tensor) -> int:
    """The caller's current CUDA stream for ``t``'s device (0 for CPU tensors)."""
    if t.device.type != "cuda":
        return 0
    return torch.cuda.current_stream(t.device).cuda_stream


def attention_params(
    q, k_cache, v_cache, prompt_block_tables, prompt_lens, problem_ids, suffix_block_tables,
    suffix_lens, scale, out, lse, q_starts=None, plan=(),
):
    """Fill ``_C.AttentionParams`` from validated tensors (index tensors int32, contiguous)."""
    p = _C.AttentionParams()
    p.q, p.out, p.lse = address(q), address(out), address(lse)
    p.k_cache, p.v_cache = address(k_cache), address(v_cache)
    p.prompt_block_tables, p.prompt_lens = address(prompt_block_tables), address(prompt_lens)
    p.problem_ids = address(problem_ids)
    p.suffix_block_tables, p.suffix_lens = address(suffix_block_tables), address(suffix_lens)
    p.q_starts = address(q_starts)
    if plan:
        p.seq_order, p.problem_starts = address(plan[0]), address(plan[1])
    p.num_seqs = problem_ids.shape[0]
    p.num_problems = prompt_lens.shape[0]
    p.total_q = q.shape[0]
    p.num_q_heads, p.head_dim = q.shape[1], q.shape[2]
    p.num_blocks, p.block_size, p.num_kv_heads = k_cache.shape[0], k_cache.shape[1], k_cache.shape[2]
    p.max_prompt_blocks = prompt_block_tables.shape[1]
    p.max_suffix_blocks = suffix_block_tables.shape[1]
    p.scale = float(scale)
    p.dtype = DTYPE_CODES[q.dtype]
    p.stream = stream_of(q)
    return p
