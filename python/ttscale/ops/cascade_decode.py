"""``cascade_decode_attention``: one query per sequence over its problem's prompt and its suffix."""

from __future__ import annotations

import torch
from torch import Tensor

from ttscale import backends
from ttscale.ops import dispatch
from ttscale.ops.paged import CascadePlan, _check_paged_attention, _scale, plan_cascade_decode


@torch.library.custom_op("ttscale::cascade_decode_attention", mutates_args=())
def _cascade_decode_attention(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, prompt_block_tables: Tensor, prompt_lens: Tensor,
    problem_ids: Tensor, suffix_block_tables: Tensor, suffix_lens: Tensor, scale: float,
    plan: list[Tensor], backend: str,
) -> tuple[Tensor, Tensor]:
    fn = backends.implementation("cascade_decode_attention", backend)
    return fn(q, k_cache, v_cache, prompt_block_tables, prompt_lens, problem_ids,
              suffix_block_tables, suffix_lens, scale, plan)


@_cascade_decode_attention.register_fake
def _(q, k_cache, v_cache, prompt_block_tables, prompt_lens, problem_ids, suffix_block_tables,
      suffix_lens, scale, plan, backend):
    return torch.empty_like(q), q.new_empty(q.shape[:2], dtype=torch.float32)


def cascade_decode_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    prompt_block_tables: Tensor,
    prompt_lens: Tensor,
    problem_ids: Tensor,
    suffix_block_tables: Tensor,
    suffix_lens: Tensor,
    scale: float | None = None,
    *,
    plan: CascadePlan | None = None,
    backend: str | None = None,
    validate: bool = True,
) -> tuple[Tensor, Tensor]:
    """Decode attention of one query token per sequence over a shared prompt and its own suffix.

    The level-0 pass reads each problem's prompt KV once for all of that problem's sequences.

    Parameters
    ----------
    q : Tensor
        ``[B, Hq, D]`` float32, float16 or bfloat16.
    k_cache, v_cache : Tensor
        ``[num_blocks, block_size, Hkv, D]``, q's dtype; ``Hq`` a multiple of ``Hkv``.
    prompt_block_tables : Tensor
        ``[P, max_prompt_blocks]`` int32, the blocks of each problem's prompt.
    prompt_lens : Tensor
        ``[P]`` int32 (0 allowed).
    problem_ids : Tensor
        ``[B]`` int32, each sequence's problem.
    suffix_block_tables : Tensor
        ``[B, max_suffix_blocks]`` int32, the blocks of each sequence's own tokens.
    suffix_lens : Tensor
        ``[B]`` int32 (0 allowed).
    scale : float, optional
        Softmax scale, default ``D ** -0.5``.
    plan : CascadePlan, optional
        From :func:`plan_cascade_decode`, computed once per step and reused by every layer.
    backend : str, optional
        Force ``"torch"``, ``"cpu"``, ``"triton"`` or ``"cuda"``.
    validate : bool
        False skips the argument checks, for a caller that has just checked these same
        arguments (a model's layers after the first read one step's tables and lengths, and
        caches of one shape); checking reads the tables and lengths on the CPU.

    Returns
    -------
    out : Tensor
        ``[B, Hq, D]`` in q's dtype.
    lse : Tensor
        ``[B, Hq]`` float32, natural-log log-sum-exp of the scaled scores.
    """
    if validate:
        _check_paged_attention(q, k_cache, v_cache, prompt_block_tables, prompt_lens, problem_ids,
                               suffix_block_tables, suffix_lens,
                               num_seqs=q.shape[0] if isinstance(q, Tensor) else None)
    scale = _scale(scale, q.shape[2])
    chosen = backends.resolve("cascade_decode_attention", q.device, backend)
    if plan is None:
        plan = plan_cascade_decode(problem_ids, prompt_lens.shape[0])
    q, pbt, pl, pid, sbt, sl = dispatch.contiguous(q, prompt_block_tables, prompt_lens, problem_ids,
                                           suffix_block_tables, suffix_lens)
    return dispatch.run(_cascade_decode_attention, "cascade_decode_attention", q, k_cache, v_cache,
                pbt, pl, pid, sbt, sl, scale, plan.tensors(), chosen)
