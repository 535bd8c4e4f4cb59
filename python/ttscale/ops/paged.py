"""The paged two-level layout shared by the attention ops: the per-step plan and the checks."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ttscale._checks import (
    FLOAT_DTYPES,
    check_block_table,
    check_range,
    check_tensor,
    check_values,
)
from ttscale.errors import InvalidArgument


@dataclass(frozen=True)
class CascadePlan:
    """Which sequences share which prompt, computed once per step (FlashInfer's plan/run split).

    ``seq_order [B]`` int32 lists the sequences grouped by problem (stable within a problem);
    ``problem_starts [P + 1]`` int32 delimits each problem's run in ``seq_order``. Built on the
    device without a host synchronisation, so it can be captured in a CUDA graph.
    """

    seq_order: Tensor
    problem_starts: Tensor

    def tensors(self) -> list[Tensor]:
        return [self.seq_order, self.problem_starts]


def plan_cascade_decode(problem_ids: Tensor, num_problems: int) -> CascadePlan:
    """Group the sequences of a decode step by problem.

    Parameters
    ----------
    problem_ids : Tensor
        ``[B]`` int32, the problem of each sequence.
    num_problems : int
        ``P``, the number of rows of ``prompt_block_tables``.
    """
    check_tensor("problem_ids", problem_ids, ndim=1, dtype=torch.int32)
    if num_problems < 0:
        raise InvalidArgument(f"num_problems: expected >= 0, got {num_problems}")
    if check_values(problem_ids):
        check_range("problem_ids", problem_ids, 0, max(num_problems, 1))
    order = torch.argsort(problem_ids, stable=True)
    # searchsorted, not bincount: CUDA's bincount reads the input's max on the host (a sync).
    problems = torch.arange(num_problems + 1, dtype=torch.int32, device=problem_ids.device)
    starts = torch.searchsorted(problem_ids[order], problems, out_int32=True)
    return CascadePlan(order.to(torch.int32), starts)


# ---------------------------------------------------------------------------------------------
# Validation shared by the two paged attention ops.


def _check_paged_attention(
    q, k_cache, v_cache, prompt_block_tables, prompt_lens, problem_ids, suffix_block_tables,
    suffix_lens, num_seqs: int | None,
) -> None:
    check_tensor("q", q, ndim=3, dtype=FLOAT_DTYPES)
    device = q.device
    check_tensor("k_cache", k_cache, ndim=4, dtype=q.dtype, device=device)
    check_tensor("v_cache", v_cache, dtype=q.dtype, device=device, shape=tuple(k_cache.shape))
    num_blocks, block_size, kv_heads, head_dim = k_cache.shape
    if head_dim != q.shape[2]:
        raise InvalidArgument(f"k_cache: expected head_dim {q.shape[2]} (q's), got {head_dim}")
    if kv_heads == 0 or q.shape[1] % kv_heads != 0:
        raise InvalidArgument(
            f"q: number of query heads ({q.shape[1]}) must be a multiple of k_cache's kv heads ({kv_heads})"
        )
    if block_size < 8 or block_size > 128 or block_size & (block_size - 1):
        raise InvalidArgument(f"k_cache: block_size must be a power of two from 8 to 128, got {block_size}")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise InvalidArgument("k_cache/v_cache: the pool must be contiguous", param="k_cache")
    num_problems = check_tensor("prompt_lens", prompt_lens, ndim=1, dtype=torch.int32, device=device).shape[0]
    check_tensor("prompt_block_tables", prompt_block_tables, ndim=2, dtype=torch.int32, device=device)
    if prompt_block_tables.shape[0] != num_problems:
        raise InvalidArgument(
            f"prompt_block_tables: expected {num_problems} rows (one per prompt_lens entry), "
            f"got {prompt_block_tables.shape[0]}"
        )
    batch = check_tensor("problem_ids", problem_ids, ndim=1, dtype=torch.int32, device=device).shape[0]
    if num_seqs is not None and batch != num_seqs:
        raise InvalidArgument(f"problem_ids: expected {num_seqs} entries (one per query), got {batch}")
    check_tensor("suffix_lens", suffix_lens, dtype=torch.int32, device=device, shape=(batch,))
    check_tensor("suffix_block_tables", suffix_block_tables, ndim=2, dtype=torch.int32, device=device)
    if suffix_block_tables.shape[0] != batch:
        raise InvalidArgument(f"suffix_block_tables: expected {batch} rows (one per sequence), got {suffix_block_tables.shape[0]}")
    if check_values(problem_ids, prompt_lens, suffix_lens):
        if batch and num_problems == 0:
            raise InvalidArgument("prompt_lens: empty, but problem_ids names problems")
        check_range("problem_ids", problem_ids, 0, max(num_problems, 1))
        check_range("prompt_lens", prompt_lens, 0, 2**31 - 1)
        check_range("suffix_lens", suffix_lens, 0, 2**31 - 1)
        check_block_table("prompt_block_tables", prompt_block_tables, prompt_lens, block_size, num_blocks)
        check_block_table("suffix_block_tables", suffix_block_tables, suffix_lens, block_size, num_blocks)


def _scale(scale: float | None, head_dim: int) -> float:
    if scale is None:
        return head_dim**-0.5
    scale = float(scale)
    if not scale > 0 or scale == float("inf"):
        raise InvalidArgument(f"scale: expected a positive finite number, got {scale}")
    return scale
