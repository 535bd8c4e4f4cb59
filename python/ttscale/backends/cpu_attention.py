"""The ``cpu`` backend of the attention ops: C++ kernels in csrc/cpu/ (cascade_decode.cpp for
decode, attention.cpp for the others)."""

from __future__ import annotations

import torch

from ttscale.backends import new_output
from ttscale.backends.native import DTYPE_CODES, _C, address, attention_params


def cascade_decode_attention(q, k_cache, v_cache, pbt, prompt_lens, problem_ids, sbt, suffix_lens, scale, plan):
    out = new_output(q.shape, q.dtype, q.device)
    lse = new_output(q.shape[:2], torch.float32, q.device)
    params = attention_params(
        q, k_cache, v_cache, pbt, prompt_lens, problem_ids, sbt, suffix_lens, scale, out, lse, plan=plan
    )
    _C.cascade_decode_attention_cpu(params)
    return out, lse


def paged_prefill_attention(
    q, k_cache, v_cache, pbt, prompt_lens, problem_ids, sbt, suffix_lens, q_lens, scale, plan
):
    out = new_output(q.shape, q.dtype, q.device)
    lse = new_output(q.shape[:2], torch.float32, q.device)
    q_starts = torch.zeros(q_lens.shape[0] + 1, dtype=torch.int32)
    torch.cumsum(q_lens, 0, out=q_starts[1:])
    params = attention_params(
        q, k_cache, v_cache, pbt, prompt_lens, problem_ids, sbt, suffix_lens, scale, out, lse,
        q_starts=q_starts,
    )
    _C.paged_prefill_attention_cpu(params)
    return out, lse


def merge_attention_states(o_a, lse_a, o_b, lse_b):
    out = new_output(o_a.shape, o_a.dtype, o_a.device)
    lse = new_output(lse_a.shape, torch.float32, o_a.device)
    p = _C.MergeParams()
    p.o_a, p.lse_a, p.o_b, p.lse_b = address(o_a), address(lse_a), address(o_b), address(lse_b)
    p.out, p.lse = address(out), address(lse)
    p.rows, p.heads, p.head_dim = o_a.shape
    p.dtype = DTYPE_CODES[o_a.dtype]
    _C.merge_attention_states_cpu(p)
    return out, lse


def write_kv(k_cache, v_cache, k, v, slots):
    p = _C.WriteKVParams()
    p.k_cache, p.v_cache, p.k, p.v = address(k_cache), address(v_cache), address(k), address(v)
    p.slots = address(slots)
    p.num_rows, p.num_kv_heads, p.head_dim = k.shape
    p.num_slots = k_cache.shape[0] * k_cache.shape[1]
    p.dtype = DTYPE_CODES[k_cache.dtype]
    _C.write_kv_cpu(p)
