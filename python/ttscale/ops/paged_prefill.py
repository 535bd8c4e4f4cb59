"""``paged_prefill_attention``: new tokens per sequence, causal over the two levels."""

from __future__ import annotations

import torch
from torch import Tensor

from ttscale import backends
from ttscale._checks import (
    check_range,
    check_tensor,
    check_values,
)
from ttscale.errors import InvalidArgument
from ttscale.ops import dispatch
from ttscale.ops.paged import CascadePlan, _check_paged_attention, _scale


@torch.library.custom_op("ttscale::paged_prefill_attention", mutates_args=())
def _paged_prefill_attention(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, prompt_block_tables: Tensor, prompt_lens: Tensor,
    problem_ids: Tensor, suffix_block_tables: Tensor, suffix_lens: Tensor, q_lens: Tensor,
    scale: float, plan: list[Tensor], backend: str,
) -> tuple[Tensor, Tensor]:
    fn = backends.implementation("paged_prefill_attention", backend)
    return fn(q, k_cache, v_cache, prompt_block_tables, prompt_lens, problem_ids,
              suffix_block_tables, suffix_lens, q_lens, scale, plan)


@_paged_prefill_attention.register_fake
def _(q, k_cache, v_cache, prompt_block_tables, prompt_lens, problem_ids, suffix_block_tables,
      suffix_lens, q_lens, scale, plan, backend):
    return torch.empty_like(q), q.new_empty(q.shape[:2], dtype=torch.float32)


def paged_prefill_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    prompt_block_tables: Tensor,
    prompt_lens: Tensor,
    problem_ids: Tensor,
    suffix_block_tables: Tensor,
    suffix_lens: Tensor,
    q_lens: Tensor,
    scale: float | None = None,
    *,
    plan: CascadePlan | None = None,
    backend: str | None = None,
    validate: bool = True,
) -> tuple[Tensor, Tensor]:
    """Attention of a chunk of new tokens per sequence over its two-level past, causally.

    The new tokens are the last ``q_lens[b]`` tokens of sequence ``b``'s context (its problem's
    prompt, then its suffix), already written with :func:`write_kv`; each sees the context up to
    its own position. For a prompt's own prefill the suffix is empty.

    Parameters
    ----------
    q : Tensor
        ``[total_q, Hq, D]``, each sequence's new tokens packed in order.
    k_cache, v_cache, prompt_block_tables, prompt_lens, problem_ids, suffix_block_tables, suffix_lens
        As in :func:`cascade_decode_attention`, with ``B = q_lens.shape[0]``.
    q_lens : Tensor
        ``[B]`` int32, new tokens per sequence (0 allowed); they sum to ``total_q``.
    scale : float, optional
        Softmax scale, default ``D ** -0.5``.
    validate : bool
        False skips the argument checks (see :func:`cascade_decode_attention`).

    Returns
    -------
    out : Tensor
        ``[total_q, Hq, D]`` in q's dtype.
    lse : Tensor
        ``[total_q, Hq]`` float32, natural log.
    """
    if validate:
        _check_paged_prefill(q, k_cache, v_cache, prompt_block_tables, prompt_lens, problem_ids,
                             suffix_block_tables, suffix_lens, q_lens)
    scale = _scale(scale, q.shape[2])
    chosen = backends.resolve("paged_prefill_attention", q.device, backend)
    plan_tensors = plan.tensors() if plan is not None else []
    q, pbt, pl, pid, sbt, sl, ql = dispatch.contiguous(q, prompt_block_tables, prompt_lens, problem_ids,
                                               suffix_block_tables, suffix_lens, q_lens)
    return dispatch.run(_paged_prefill_attention, "paged_prefill_attention", q, k_cache, v_cache,
                pbt, pl, pid, sbt, sl, ql, scale, plan_tensors, chosen)


def _check_paged_prefill(q, k_cache, v_cache, prompt_block_tables, prompt_lens, problem_ids,
                         suffix_block_tables, suffix_lens, q_lens) -> None:
    _check_paged_attention(q, k_cache, v_cache, prompt_block_tables, prompt_lens, problem_ids,
                           suffix_block_tables, suffix_lens, num_seqs=None)
    batch = problem_ids.shape[0]
    check_tensor("q_lens", q_lens, dtype=torch.int32, device=q.device, shape=(batch,))
    if check_values(q_lens, prompt_lens, suffix_lens):
        check_range("q_lens", q_lens, 0, 2**31 - 1)
        total = int(q_lens.sum())
        if total != q.shape[0]:
            raise InvalidArgument(f"q_lens: sums to {total}, but q has {q.shape[0]} rows")
        context = prompt_lens[problem_ids.long()] + suffix_lens if batch else suffix_lens
        over = q_lens > context
        if bool(over.any()):
            b = int(over.nonzero()[0, 0])
            raise InvalidArgument(
                f"q_lens: sequence {b} has {int(q_lens[b])} new tokens but its context holds "
                f"only {int(context[b])} (prompt + suffix)"
            )
