"""The public ops: one module per op, one dispatch point (:mod:`ttscale.ops.dispatch`).

Each op's module holds its checks, its ``torch.library.custom_op`` registration (with a fake
kernel, what ``torch.compile`` traces) and its public function, which validates its arguments
(an ``InvalidArgument`` naming the argument), picks a backend (:mod:`ttscale.backends`) and runs
its kernel; eager calls (CUDA-graph capture included) run the kernel directly, without the
custom op's dispatch (:func:`ttscale.ops.dispatch.run`).
The plain-torch specification of each op is in :mod:`ttscale.reference`.

Paged KV layout: ``k_cache``/``v_cache`` ``[num_blocks, block_size, kv_heads, head_dim]``,
block size a power of two from 8 to 128. Attention reads two levels: level 0 is the prompt of
the sequence's problem (``prompt_block_tables [P, max_blocks]``, ``prompt_lens [P]``, and
``problem_ids [B]`` naming each sequence's problem); level 1 is the sequence's own suffix
(``suffix_block_tables [B, max_blocks]``, ``suffix_lens [B]``). Index tensors are int32.
Log-sum-exp values are float32 natural logarithms; a row that attends to nothing gets
``out = 0`` and ``lse = -inf``.

The decode step's elementwise work has three fused ops (``add_rms_norm``, ``rope_write_kv``,
``silu_mul``), Triton on the GPU; on the CPU the model runs its unfused torch code.
"""

from ttscale.ops.add_rms_norm import add_rms_norm
from ttscale.ops.cascade_decode import cascade_decode_attention
from ttscale.ops.copy_blocks import copy_blocks
from ttscale.ops.merge import merge_attention_states
from ttscale.ops.paged import CascadePlan, plan_cascade_decode
from ttscale.ops.paged_prefill import paged_prefill_attention
from ttscale.ops.prm_step_scores import prm_empty_state, prm_step_scores
from ttscale.ops.sample import MAX_LOGPROBS, sample
from ttscale.ops.rope_write_kv import rope_write_kv
from ttscale.ops.select_and_fork import ForkResult, select_and_fork
from ttscale.ops.silu_mul import silu_mul
from ttscale.ops.write_kv import write_kv

__all__ = [
    "CascadePlan",
    "plan_cascade_decode",
    "cascade_decode_attention",
    "paged_prefill_attention",
    "merge_attention_states",
    "write_kv",
    "rope_write_kv",
    "add_rms_norm",
    "silu_mul",
    "prm_step_scores",
    "prm_empty_state",
    "select_and_fork",
    "ForkResult",
    "copy_blocks",
    "sample",
    "MAX_LOGPROBS",
]
