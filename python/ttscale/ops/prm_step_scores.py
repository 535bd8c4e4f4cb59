"""``prm_step_scores``: a PRM's step scores from hidden states, and their running aggregate."""

from __future__ import annotations

import torch
from torch import Tensor

from ttscale import backends
from ttscale._checks import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_range,
    check_tensor,
    check_values,
)
from ttscale.errors import InvalidArgument
from ttscale.ops import dispatch
from ttscale.reference import PRM_AGGS, PRM_KINDS, prm_empty_state


@torch.library.custom_op("ttscale::prm_step_scores", mutates_args=())
def _prm_step_scores(
    hidden: Tensor, seq_ids: Tensor, weight: Tensor, bias: Tensor | None, kind: str, agg: str,
    state: Tensor, backend: str,
) -> tuple[Tensor, Tensor]:
    fn = backends.implementation("prm_step_scores", backend)
    return fn(hidden, seq_ids, weight, bias, kind, agg, state)


@_prm_step_scores.register_fake
def _(hidden, seq_ids, weight, bias, kind, agg, state, backend):
    return hidden.new_empty(hidden.shape[:1], dtype=torch.float32), torch.empty_like(state)


def prm_step_scores(
    hidden: Tensor,
    seq_ids: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    kind: str = "two_token",
    agg: str = "last",
    state: Tensor | None = None,
    *,
    num_seqs: int | None = None,
    backend: str | None = None,
) -> tuple[Tensor, Tensor]:
    """Score the steps of a PRM from its hidden states and fold them into per-sequence aggregates.

    Only the head's one or two rows are read, never the full vocabulary: for a two-token PRM the
    softmax over the ``+``/``-`` logits equals the full-vocabulary softmax restricted to those
    two tokens and renormalised.

    Parameters
    ----------
    hidden : Tensor
        ``[T, H]`` float32, float16 or bfloat16: the hidden states at the positions that end a
        step (the step-tag positions), after the model's final norm.
    seq_ids : Tensor
        ``[T]`` any integer dtype, the sequence of each step: a row of ``state``. Rows of one
        sequence are in step order (earlier rows are earlier steps).
    weight : Tensor
        The head, hidden's dtype and device. ``kind="two_token"``: ``[2, H]``, the lm_head rows
        of the ``+`` token then the ``-`` token; score P(+). ``"two_class"``: ``[2, H]``; score
        P(class 1). (Qwen2.5-Math-PRM's head is Linear(H, H) -> ReLU -> Linear(H, 2), stored as
        ``score.0``/``score.2``: run the first layer and the ReLU before this op and pass
        ``score.2``.) ``"value"``: ``[1, H]``; score sigmoid of the single logit.
    bias : Tensor, optional
        ``[2]`` or ``[1]`` (weight's rows), hidden's dtype, added to the logits.
    kind : str
        ``"two_token"``, ``"two_class"`` or ``"value"``.
    agg : str
        How a sequence's step scores combine: ``"last"``, ``"min"``, ``"prod"`` or ``"mean"``.
    state : Tensor, optional
        ``[S, 2]`` float32, (aggregate, step count) per sequence, as returned by the previous
        call; a beam fork forks it as ``state[parents]``. A row with count 0 is a sequence with
        no steps, whatever its aggregate. None starts every sequence empty (see
        :func:`prm_empty_state`), with ``S = num_seqs``.
    num_seqs : int, optional
        ``S`` when ``state`` is None. If both are None, ``S = max(seq_ids) + 1``, which reads
        ``seq_ids`` on the host (a synchronisation on CUDA; pass ``num_seqs`` or a state there).
    backend : str, optional
        Force ``"torch"``, ``"cpu"`` or ``"triton"``.

    Returns
    -------
    scores : Tensor
        ``[T]`` float32, each step's score.
    state : Tensor
        ``[S, 2]`` float32, a new tensor (the input state is not modified): each sequence's
        aggregate over all its steps so far and its step count. The aggregate of a sequence with
        no steps is 0 for last and mean, +inf for min and 1 for prod; a row without steps in this
        call is returned exactly as it came. Aggregating over several calls equals aggregating
        over one call with the steps concatenated in order (up to float32 rounding for mean and
        prod, whose kernels may group the additions or products differently).
    """
    if kind not in PRM_KINDS:
        raise InvalidArgument(f"kind: expected one of {', '.join(PRM_KINDS)}, got {kind!r}")
    if agg not in PRM_AGGS:
        raise InvalidArgument(f"agg: expected one of {', '.join(PRM_AGGS)}, got {agg!r}")
    check_tensor("hidden", hidden, ndim=2, dtype=FLOAT_DTYPES)
    device, (steps, hidden_size) = hidden.device, hidden.shape
    check_tensor("weight", weight, ndim=2, dtype=hidden.dtype, device=device)
    rows = 1 if kind == "value" else 2
    if tuple(weight.shape) != (rows, hidden_size):
        raise InvalidArgument(
            f"weight: expected shape [{rows}, {hidden_size}] for kind {kind!r} (hidden size "
            f"{hidden_size}), got {list(weight.shape)}"
        )
    if bias is not None:
        check_tensor("bias", bias, dtype=hidden.dtype, device=device, shape=(rows,))
    check_tensor("seq_ids", seq_ids, ndim=1, dtype=INDEX_DTYPES, device=device)
    if seq_ids.shape[0] != steps:
        raise InvalidArgument(
            f"seq_ids: expected {steps} entries (one per row of hidden), got {seq_ids.shape[0]}"
        )
    if num_seqs is not None and (type(num_seqs) is not int or num_seqs < 0):
        raise InvalidArgument(f"num_seqs: expected an int >= 0, got {num_seqs!r}")
    if state is not None:
        check_tensor("state", state, ndim=2, dtype=torch.float32, device=device, shape=(None, 2))
        if num_seqs is not None and num_seqs != state.shape[0]:
            raise InvalidArgument(f"num_seqs: {num_seqs} disagrees with state's {state.shape[0]} rows")
    if state is None and num_seqs is None:
        if steps and int(seq_ids.min()) < 0:
            raise InvalidArgument(f"seq_ids: value {int(seq_ids.min())} is negative")
        num_seqs = int(seq_ids.max()) + 1 if steps else 0
    seqs = state.shape[0] if state is not None else num_seqs
    if check_values(seq_ids):
        check_range("seq_ids", seq_ids, 0, seqs)
    if state is None:
        state = prm_empty_state(seqs, agg, device)
    chosen = backends.resolve("prm_step_scores", device, backend)
    if bias is not None:
        bias = bias.contiguous()
    hidden, weight, state = dispatch.contiguous(hidden, weight, state)
    return dispatch.run(_prm_step_scores, "prm_step_scores", hidden,
                seq_ids.to(torch.int64).contiguous(), weight, bias, kind, agg, state, chosen)
