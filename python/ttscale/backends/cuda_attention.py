"""The ``cuda`` backend of cascade_decode_attention: the kernel in csrc/cuda/attention.cu."""

from __future__ import annotations

import torch

from ttscale.backends import new_output
from ttscale.backends.native import _C, address, attention_params


def cascade_decode_attention(
    q, k_cache, v_cache, pbt, prompt_lens, problem_ids, sbt, suffix_lens, scale, plan
):
    out = new_output(q.shape, q.dtype, q.device)
    lse = new_output(q.shape[:2], torch.float32, q.device)
    params = attention_params(
        q, k_cache, v_cache, pbt, prompt_lens, problem_ids, sbt, suffix_lens, scale, out, lse,
        plan=plan,
    )
    params.device = q.device.index
    # Split-K partial results. Torch's caching allocator hands out stream-ordered memory without
    # synchronising, also under CUDA-graph capture.
    workspace = torch.empty(
        _C.cascade_decode_workspace_floats_cuda(params), dtype=torch.float32, device=q.device
    )
    params.workspace, params.workspace_floats = address(workspace), workspace.numel()
    _C.cascade_decode_attention_cuda(params)
    return out, lse
