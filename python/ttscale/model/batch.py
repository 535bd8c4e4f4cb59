"""What one forward step attends over: the new tokens and the two-level paged KV they join.

The engine builds one :class:`AttentionBatch` per step; every layer of the model reads it. It
describes the new tokens (their positions and the pool slots their K/V go to) and the context
they attend to, in the two levels of :mod:`ttscale.ops`:

- level 0, a problem's prompt: ``prompt_block_tables[p]`` holds its blocks, ``prompt_lens[p]``
  its length, and ``problem_ids[b]`` names sequence ``b``'s problem;
- level 1, a sequence's own tokens after the prompt: ``suffix_block_tables[b]`` and
  ``suffix_lens[b]``.

Lengths count the new tokens too: a step's new tokens are the last ``q_lens[b]`` tokens of
sequence ``b``'s context (prompt, then suffix). So

- a prompt's own prefill (or a chunk of it) is a sequence whose new tokens are the prompt's last
  tokens, with an empty suffix: ``prompt_lens[p]`` = tokens of the prompt so far,
  ``suffix_lens[b] = 0``, ``q_lens[b]`` = the chunk's length; its K/V slots are in the prompt's
  blocks;
- a continuation (the PRM scoring a new step, a revision's new attempt) is a sequence whose new
  tokens end its suffix: ``suffix_lens[b]`` includes them and the slots are in its suffix blocks;
- a decode step has one new token per sequence, at the end of its suffix.

A decode step carries a :class:`~ttscale.ops.CascadePlan`, computed once when the batch is
built (or passed in) and reused by every layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ttscale import ops
from ttscale.errors import InvalidArgument

PREFILL = "prefill"
DECODE = "decode"


@dataclass
class AttentionBatch:
    """One step's attention metadata; index tensors are converted to the ops' dtypes.

    Attributes
    ----------
    mode : str
        ``"prefill"`` (any number of new tokens per sequence, packed) or ``"decode"`` (exactly
        one new token per sequence).
    positions : Tensor
        ``[T]`` int64, each new token's position in its sequence (prompt + suffix), 0-based;
        selects its rotary angles.
    slots : Tensor
        ``[T]`` int64, the flat pool slot ``block * block_size + offset`` each new token's K/V is
        written to; -1 skips the row (padding).
    prompt_block_tables, prompt_lens : Tensor
        ``[P, max_prompt_blocks]`` and ``[P]`` int32.
    problem_ids : Tensor
        ``[B]`` int32.
    suffix_block_tables, suffix_lens : Tensor
        ``[B, max_suffix_blocks]`` and ``[B]`` int32.
    q_lens : Tensor or None
        ``[B]`` int32 new tokens per sequence (prefill); None in decode, where it is 1.
    plan : CascadePlan or None
        Decode only: the grouping of sequences by problem, shared by all layers; planned from
        ``problem_ids`` when not given (pass one to reuse buffers, e.g. in a CUDA graph).
    backend : str or None
        Force an ops backend (``"torch"``, ``"cpu"``, ``"triton"``, ``"cuda"``); None chooses by
        device.
    """

    mode: str
    positions: Tensor
    slots: Tensor
    prompt_block_tables: Tensor
    prompt_lens: Tensor
    problem_ids: Tensor
    suffix_block_tables: Tensor
    suffix_lens: Tensor
    q_lens: Tensor | None = None
    plan: ops.CascadePlan | None = None
    backend: str | None = None

    def __post_init__(self) -> None:
        # The ops' dtypes: int64 for gathers (positions, slots), int32 for tables and lengths.
        # .to() of a tensor already in its dtype is the same tensor, so static buffers (CUDA
        # graphs) stay static.
        self.positions = self.positions.to(torch.int64)
        self.slots = self.slots.to(torch.int64)
        for name in (
            "prompt_block_tables",
            "prompt_lens",
            "problem_ids",
            "suffix_block_tables",
            "suffix_lens",
            "q_lens",
        ):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.to(torch.int32))
        if self.slots.shape != self.positions.shape:
            raise InvalidArgument(
                f"slots: expected shape {list(self.positions.shape)} (positions'), "
                f"got {list(self.slots.shape)}"
            )
        if self.mode == PREFILL:
            if self.q_lens is None:
                raise InvalidArgument("q_lens: a prefill step needs the new tokens per sequence")
        elif self.mode == DECODE:
            if self.num_tokens != self.problem_ids.shape[0]:
                raise InvalidArgument(
                    f"positions: a decode step has one new token per sequence, expected "
                    f"{self.problem_ids.shape[0]} (problem_ids'), got {self.num_tokens}"
                )
            if self.plan is None:
                self.plan = ops.plan_cascade_decode(self.problem_ids, self.prompt_lens.shape[0])
        else:
            raise InvalidArgument(f"mode: expected {PREFILL!r} or {DECODE!r}, got {self.mode!r}")

    @property
    def num_tokens(self) -> int:
        return self.positions.shape[0]
