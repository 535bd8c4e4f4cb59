"""Triton kernels of the fused PRM step-scoring op (``ttscale.ops.prm_step_scores``).

Two launches. ``_head_scores_kernel``: each program takes ``BLOCK_T`` step rows, streams their
hidden states once against the head's one or two rows (never the vocabulary) and applies the
head's normalisation; the op is a memory-bound GEMV with two outputs per row, so plain
multiply-and-sum beats ``tl.dot`` (and keeps bf16 exact under the interpreter).
``_aggregate_kernel``: one program per sequence folds that sequence's new scores into its state,
step by step for prod and mean (the float32 fold the C++ kernel and the reference compute). The steps are grouped by sequence with a stable sort on the device, so a
sequence's steps keep their order ("last" is the final one) and nothing waits on the host.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ttscale.backends import new_output

KIND_CODES = {"two_token": 0, "two_class": 1, "value": 2}
AGG_CODES = {"last": 0, "min": 1, "prod": 2, "mean": 3}
TILE = 4096  # hidden elements per program per loop iteration


@triton.jit
def _sigmoid(x):
    # 1 / (1 + exp(-x)) without overflow warnings for large |x|: exp of a non-positive argument.
    e = tl.exp(-tl.abs(x))
    return tl.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def _head_scores_kernel(
    hidden_ptr, weight_ptr, bias_ptr, scores_ptr, T, H, stride_t,
    KIND: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_mask = rows < T
    row_offsets = rows.to(tl.int64) * stride_t
    two_rows = KIND != 2
    # Elementwise partial products, reduced once at the end rather than once per chunk.
    acc0 = tl.zeros([BLOCK_T, BLOCK_H], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_T, BLOCK_H], dtype=tl.float32)
    for start in range(0, H, BLOCK_H):
        cols = start + tl.arange(0, BLOCK_H)
        col_mask = cols < H
        x = tl.load(hidden_ptr + row_offsets[:, None] + cols[None, :],
                    mask=row_mask[:, None] & col_mask[None, :], other=0.0).to(tl.float32)
        w0 = tl.load(weight_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        acc0 += x * w0[None, :]
        if two_rows:
            w1 = tl.load(weight_ptr + H + cols, mask=col_mask, other=0.0).to(tl.float32)
            acc1 += x * w1[None, :]
    z0 = tl.sum(acc0, axis=1)
    z1 = tl.sum(acc1, axis=1)
    if HAS_BIAS:
        z0 += tl.load(bias_ptr).to(tl.float32)
        if two_rows:
            z1 += tl.load(bias_ptr + 1).to(tl.float32)
    # A softmax over two logits is the sigmoid of their difference.
    if KIND == 0:
        score = _sigmoid(z0 - z1)
    elif KIND == 1:
        score = _sigmoid(z1 - z0)
    else:
        score = _sigmoid(z0)
    tl.store(scores_ptr + rows, score, mask=row_mask)


@triton.jit
def _aggregate_kernel(
    scores_ptr, order_ptr, seg_starts_ptr, state_in_ptr, state_out_ptr,
    AGG: tl.constexpr, BLOCK: tl.constexpr,
):
    seq = tl.program_id(0)
    start = tl.load(seg_starts_ptr + seq)
    end = tl.load(seg_starts_ptr + seq + 1)
    new_steps = end - start
    stored = tl.load(state_in_ptr + 2 * seq)
    count = tl.load(state_in_ptr + 2 * seq + 1)
    # The aggregate of no steps; a count of 0 means empty, whatever the stored aggregate.
    if AGG == 1:
        empty = float("inf")
    elif AGG == 2:
        empty = 1.0
    else:
        empty = 0.0
    before = tl.where(count > 0, stored, empty)
    # Steps of this sequence sit at order[start:end], in their original order (a stable sort).
    if AGG == 0:
        final = tl.load(order_ptr + tl.maximum(end - 1, 0))  # order has >= 1 entry: T > 0
        after = tl.load(scores_ptr + final)
    elif AGG == 1:  # order does not change a minimum: reduce a block at a time
        part = tl.full([BLOCK], float("inf"), tl.float32)
        for offset in range(start, end, BLOCK):
            idx = offset + tl.arange(0, BLOCK)
            mask = idx < end
            step = tl.load(order_ptr + idx, mask=mask, other=0)
            part = tl.minimum(part, tl.load(scores_ptr + step, mask=mask, other=float("inf")))
        after = tl.minimum(before, tl.min(part, axis=0))
    else:
        # prod and mean fold one step at a time, rounding after each as the C++ kernel and the
        # reference do: a tree reduction rounds differently, and searches rank by this number,
        # which must not depend on the backend. A search scores one step per sequence a call.
        after = before
        seen = count
        for i in range(start, end):
            x = tl.load(scores_ptr + tl.load(order_ptr + i))
            if AGG == 2:
                after = after * x
            else:
                after = after + (x - after) / (seen + 1.0)
            seen += 1.0
    total = count + new_steps.to(tl.float32)
    # A sequence with no new steps keeps its row exactly as it was.
    tl.store(state_out_ptr + 2 * seq, tl.where(new_steps > 0, after, stored))
    tl.store(state_out_ptr + 2 * seq + 1, total)


def prm_step_scores(hidden, seq_ids, weight, bias, kind, agg, state):
    """hidden ``[T, H]``, seq_ids ``[T]`` int64, weight ``[2 or 1, H]``, state ``[S, 2]`` f32."""
    steps, hidden_size = hidden.shape
    seqs = state.shape[0]
    scores = new_output((steps,), torch.float32, hidden.device)
    state_out = new_output((seqs, 2), torch.float32, hidden.device)
    if steps == 0:
        state_out.copy_(state)
        return scores, state_out
    # Enough programs to fill a GPU even at small T, and a tile of about TILE elements each.
    block_t = min(16, triton.next_power_of_2(triton.cdiv(steps, 256)))
    block_h = min(triton.next_power_of_2(hidden_size), max(TILE // block_t, 16))
    _head_scores_kernel[(triton.cdiv(steps, block_t),)](
        hidden, weight, weight if bias is None else bias, scores, steps, hidden_size,
        hidden.stride(0), KIND=KIND_CODES[kind], HAS_BIAS=bias is not None, BLOCK_T=block_t,
        BLOCK_H=block_h,
    )
    if seqs == 0:
        return scores, state_out
    sorted_ids, order = torch.sort(seq_ids, stable=True)
    seg_starts = torch.searchsorted(sorted_ids, torch.arange(seqs + 1, device=hidden.device))
    _aggregate_kernel[(seqs,)](scores, order, seg_starts, state, state_out, AGG=AGG_CODES[agg],
                               BLOCK=128)
    return scores, state_out
