"""Plain-torch definitions of every op: the specification the kernels are tested against.

Slow on purpose: one sequence at a time, everything in float32, no cleverness. The public
ops in :mod:`ttscale.ops` validate their arguments; these functions assume valid input.
Log-sum-exp values are natural logarithms.

One module per family of ops; each op's reference has the op's name:

- :mod:`~ttscale.reference.attention`: ``cascade_decode_attention``, ``paged_prefill_attention``,
  ``merge_attention_states`` (and ``gather_blocks``, ``attend``, ``sequence_kv``, what they
  are built from);
- :mod:`~ttscale.reference.kv_cache`: ``write_kv``, ``copy_blocks``;
- :mod:`~ttscale.reference.elementwise`: ``add_rms_norm``, ``rope_write_kv`` (``rotate``),
  ``silu_mul``;
- :mod:`~ttscale.reference.prm`: ``prm_step_scores``, ``prm_empty_state``, ``prm_fold``;
- :mod:`~ttscale.reference.block_pool`: ``select_and_fork``, and the pool's own ``pool_allocate``
  and ``pool_release``;
- :mod:`~ttscale.reference.sampling`: ``sample``, its filters (``sampling_kept``) and its
  random numbers (``sampling_uniforms``).
"""

from ttscale.reference.attention import (
    NEG_INF,
    attend,
    cascade_decode_attention,
    gather_blocks,
    merge_attention_states,
    paged_prefill_attention,
    sequence_kv,
)
from ttscale.reference.block_pool import (
    POOL_EXHAUSTED,
    pool_allocate,
    pool_release,
    select_and_fork,
)
from ttscale.reference.elementwise import add_rms_norm, rope_write_kv, rotate, silu_mul
from ttscale.reference.kv_cache import copy_blocks, write_kv
from ttscale.reference.prm import (
    PRM_AGGS,
    PRM_EMPTY_AGGREGATE,
    PRM_KINDS,
    prm_empty_state,
    prm_fold,
    prm_head_scores,
    prm_step_scores,
    two_token_from_full_vocab,
)
from ttscale.reference.sampling import (
    MASK32,
    SEED_SALT,
    STEP_SALT,
    fmix32,
    mul32,
    sample,
    sampling_kept,
    sampling_row_key,
    sampling_uniforms,
)

__all__ = [
    "NEG_INF",
    "gather_blocks",
    "attend",
    "sequence_kv",
    "cascade_decode_attention",
    "paged_prefill_attention",
    "merge_attention_states",
    "write_kv",
    "copy_blocks",
    "add_rms_norm",
    "rotate",
    "rope_write_kv",
    "silu_mul",
    "PRM_KINDS",
    "PRM_AGGS",
    "PRM_EMPTY_AGGREGATE",
    "prm_empty_state",
    "prm_fold",
    "prm_head_scores",
    "two_token_from_full_vocab",
    "prm_step_scores",
    "POOL_EXHAUSTED",
    "pool_allocate",
    "pool_release",
    "select_and_fork",
    "MASK32",
    "SEED_SALT",
    "STEP_SALT",
    "mul32",
    "fmix32",
    "sampling_row_key",
    "sampling_uniforms",
    "sampling_kept",
    "sample",
]
