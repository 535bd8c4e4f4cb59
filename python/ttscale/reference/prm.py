"""PRM step scoring: a step's score from its hidden state and the reward head, folded into its
sequence's running aggregate (last, min, prod or mean)."""

from __future__ import annotations

import torch

PRM_KINDS = ("two_token", "two_class", "value")
PRM_AGGS = ("last", "min", "prod", "mean")

# The aggregate of a sequence with no steps yet (its count is 0).
PRM_EMPTY_AGGREGATE = {"last": 0.0, "min": float("inf"), "prod": 1.0, "mean": 0.0}


def prm_empty_state(num_seqs: int, agg: str, device=None) -> torch.Tensor:
    """The state ``[num_seqs, 2]`` float32 (aggregate, step count) of sequences with no steps."""
    state = torch.zeros(num_seqs, 2, dtype=torch.float32, device=device)
    state[:, 0] = PRM_EMPTY_AGGREGATE[agg]
    return state


def prm_head_scores(hidden, weight, bias=None, kind="two_token"):
    """Step scores ``[T]`` float32 from hidden states ``[T, H]`` and a head ``weight [2 or 1, H]``.

    two_token: P(+) of the softmax over the ``+``/``-`` logits; two_class: P(class 1);
    value: sigmoid of the single logit.
    """
    logits = hidden.float() @ weight.float().T
    if bias is not None:
        logits = logits + bias.float()
    if kind == "two_token":
        return torch.softmax(logits, dim=-1)[:, 0]
    if kind == "two_class":
        return torch.softmax(logits, dim=-1)[:, 1]
    return torch.sigmoid(logits[:, 0])


def two_token_from_full_vocab(hidden, lm_head, plus_id: int, minus_id: int):
    """P(+) the unfused way: all ``[T, V]`` logits, softmax, take ``+`` and ``-``, renormalise."""
    probs = torch.softmax(hidden.float() @ lm_head.float().T, dim=-1)
    plus, minus = probs[:, plus_id], probs[:, minus_id]
    return plus / (plus + minus)


def prm_step_scores(hidden, seq_ids, weight, bias=None, kind="two_token", agg="last", state=None):
    """Score each step and fold it into its sequence's running aggregate, one step at a time.

    hidden ``[T, H]``, seq_ids ``[T]`` (earlier rows of a sequence are earlier steps), state
    ``[S, 2]`` float32 (aggregate, count) or None for ``S = max(seq_ids) + 1`` empty sequences.
    A row with count 0 is empty whatever its aggregate. Returns scores ``[T]`` float32 and a new
    state; the input state is not modified.
    """
    scores = prm_head_scores(hidden, weight, bias, kind)
    if state is None:
        state = prm_empty_state(int(seq_ids.max()) + 1 if seq_ids.numel() else 0, agg, hidden.device)
    state = state.clone()
    empty = torch.tensor(PRM_EMPTY_AGGREGATE[agg], dtype=torch.float32, device=state.device)
    for t in range(scores.shape[0]):
        # 0-d float32 tensors: every operation rounds to float32, as in the kernels.
        s, step = int(seq_ids[t]), scores[t]
        count = state[s, 1]
        before = state[s, 0] if count > 0 else empty
        state[s, 0], state[s, 1] = prm_fold(agg, before, step, count), count + 1
    return scores, state


def prm_fold(agg: str, before, step, count):
    """One step's score folded into an aggregate of ``count`` steps (float32 tensors: each
    operation rounds to float32, as in the kernels); ``before`` is the empty aggregate when
    ``count`` is 0. ``min`` is ``fmin``, as the kernels': a NaN step leaves the minimum.

    The one definition of the fold: the op's reference, the host verifiers' ``fold_scores`` and
    ``search.select.aggregate`` all step through it."""
    if agg == "last":
        return step
    if agg == "min":
        return torch.fmin(before, step)
    if agg == "prod":
        return before * step
    return before + (step - before) / (count + 1)
