"""The public ops: one function per op, one dispatch point.

Each function validates its arguments (a ``ValueError`` naming the argument), picks a backend
(:mod:`ttscale.backends`) and calls a ``torch.library.custom_op``, so the ops compose with
``torch.compile`` and CUDA-graph capture. The plain-torch specification of each op is in
:mod:`ttscale.reference`.

Paged KV layout: ``k_cache``/``v_cache`` ``[num_blocks, block_size, kv_heads, head_dim]``,
block size a power of two from 8 to 128. Attention reads two levels: level 0 is the prompt of
the sequence's problem (``prompt_block_tables [P, max_blocks]``, ``prompt_lens [P]``, and
``problem_ids [B]`` naming each sequence's problem); level 1 is the sequence's own suffix
(``suffix_block_tables [B, max_blocks]``, ``suffix_lens [B]``). Index tensors are int32.
Log-sum-exp values are float32 natural logarithms; a row that attends to nothing gets
``out = 0`` and ``lse = -inf``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ttscale import backends
from ttscale._checks import FLOAT_DTYPES, INDEX_DTYPES, check_block_table, check_range, check_tensor, check_values

__all__ = [
    "CascadePlan",
    "plan_cascade_decode",
    "cascade_decode_attention",
    "paged_prefill_attention",
    "merge_attention_states",
    "write_kv",
]


# ---------------------------------------------------------------------------------------------
# Plans: metadata computed once per decode step and reused by every layer.


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
        raise ValueError(f"num_problems: expected >= 0, got {num_problems}")
    if check_values(problem_ids):
        check_range("problem_ids", problem_ids, 0, max(num_problems, 1))
    order = torch.argsort(problem_ids, stable=True).to(torch.int32)
    counts = torch.bincount(problem_ids.long(), minlength=num_problems)[:num_problems]
    starts = torch.zeros(num_problems + 1, dtype=torch.int32, device=problem_ids.device)
    torch.cumsum(counts, 0, out=starts[1:])
    return CascadePlan(order, starts)


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
        raise ValueError(f"k_cache: expected head_dim {q.shape[2]} (q's), got {head_dim}")
    if kv_heads == 0 or q.shape[1] % kv_heads != 0:
        raise ValueError(
            f"q: number of query heads ({q.shape[1]}) must be a multiple of k_cache's kv heads ({kv_heads})"
        )
    if block_size < 8 or block_size > 128 or block_size & (block_size - 1):
        raise ValueError(f"k_cache: block_size must be a power of two from 8 to 128, got {block_size}")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("k_cache/v_cache: the pool must be contiguous")
    num_problems = check_tensor("prompt_lens", prompt_lens, ndim=1, dtype=torch.int32, device=device).shape[0]
    check_tensor("prompt_block_tables", prompt_block_tables, ndim=2, dtype=torch.int32, device=device)
    if prompt_block_tables.shape[0] != num_problems:
        raise ValueError(
            f"prompt_block_tables: expected {num_problems} rows (one per prompt_lens entry), "
            f"got {prompt_block_tables.shape[0]}"
        )
    batch = check_tensor("problem_ids", problem_ids, ndim=1, dtype=torch.int32, device=device).shape[0]
    if num_seqs is not None and batch != num_seqs:
        raise ValueError(f"problem_ids: expected {num_seqs} entries (one per query), got {batch}")
    check_tensor("suffix_lens", suffix_lens, dtype=torch.int32, device=device, shape=(batch,))
    check_tensor("suffix_block_tables", suffix_block_tables, ndim=2, dtype=torch.int32, device=device)
    if suffix_block_tables.shape[0] != batch:
        raise ValueError(f"suffix_block_tables: expected {batch} rows (one per sequence), got {suffix_block_tables.shape[0]}")
    if check_values(problem_ids, prompt_lens, suffix_lens):
        if batch and num_problems == 0:
            raise ValueError("prompt_lens: empty, but problem_ids names problems")
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
        raise ValueError(f"scale: expected a positive finite number, got {scale}")
    return scale


def _contiguous(*tensors: Tensor) -> tuple[Tensor, ...]:
    return tuple(t.contiguous() for t in tensors)


# ---------------------------------------------------------------------------------------------
# cascade_decode_attention


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

    Returns
    -------
    out : Tensor
        ``[B, Hq, D]`` in q's dtype.
    lse : Tensor
        ``[B, Hq]`` float32, natural-log log-sum-exp of the scaled scores.
    """
    _check_paged_attention(q, k_cache, v_cache, prompt_block_tables, prompt_lens, problem_ids,
                           suffix_block_tables, suffix_lens, num_seqs=q.shape[0] if isinstance(q, Tensor) else None)
    scale = _scale(scale, q.shape[2])
    chosen = backends.resolve("cascade_decode_attention", q.device, backend)
    if plan is None:
        plan = plan_cascade_decode(problem_ids, prompt_lens.shape[0])
    q, pbt, pl, pid, sbt, sl = _contiguous(q, prompt_block_tables, prompt_lens, problem_ids,
                                           suffix_block_tables, suffix_lens)
    return _cascade_decode_attention(q, k_cache, v_cache, pbt, pl, pid, sbt, sl, scale,
                                     plan.tensors(), chosen)


# ---------------------------------------------------------------------------------------------
# paged_prefill_attention


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

    Returns
    -------
    out : Tensor
        ``[total_q, Hq, D]`` in q's dtype.
    lse : Tensor
        ``[total_q, Hq]`` float32, natural log.
    """
    _check_paged_attention(q, k_cache, v_cache, prompt_block_tables, prompt_lens, problem_ids,
                           suffix_block_tables, suffix_lens, num_seqs=None)
    batch = problem_ids.shape[0]
    check_tensor("q_lens", q_lens, dtype=torch.int32, device=q.device, shape=(batch,))
    if check_values(q_lens, prompt_lens, suffix_lens):
        check_range("q_lens", q_lens, 0, 2**31 - 1)
        total = int(q_lens.sum())
        if total != q.shape[0]:
            raise ValueError(f"q_lens: sums to {total}, but q has {q.shape[0]} rows")
        context = prompt_lens[problem_ids.long()] + suffix_lens if batch else suffix_lens
        over = q_lens > context
        if bool(over.any()):
            b = int(over.nonzero()[0, 0])
            raise ValueError(
                f"q_lens: sequence {b} has {int(q_lens[b])} new tokens but its context holds "
                f"only {int(context[b])} (prompt + suffix)"
            )
    scale = _scale(scale, q.shape[2])
    chosen = backends.resolve("paged_prefill_attention", q.device, backend)
    plan_tensors = plan.tensors() if plan is not None else []
    q, pbt, pl, pid, sbt, sl, ql = _contiguous(q, prompt_block_tables, prompt_lens, problem_ids,
                                               suffix_block_tables, suffix_lens, q_lens)
    return _paged_prefill_attention(q, k_cache, v_cache, pbt, pl, pid, sbt, sl, ql, scale,
                                    plan_tensors, chosen)


# ---------------------------------------------------------------------------------------------
# merge_attention_states


@torch.library.custom_op("ttscale::merge_attention_states", mutates_args=())
def _merge_attention_states(
    o_a: Tensor, lse_a: Tensor, o_b: Tensor, lse_b: Tensor, backend: str
) -> tuple[Tensor, Tensor]:
    return backends.implementation("merge_attention_states", backend)(o_a, lse_a, o_b, lse_b)


@_merge_attention_states.register_fake
def _(o_a, lse_a, o_b, lse_b, backend):
    return torch.empty_like(o_a), torch.empty_like(lse_a)


def merge_attention_states(
    o_a: Tensor, lse_a: Tensor, o_b: Tensor, lse_b: Tensor, *, backend: str | None = None
) -> tuple[Tensor, Tensor]:
    """Combine attention over two disjoint key sets from their outputs and log-sum-exps.

    Numerically stable; a side with ``lse = -inf`` (an empty level) yields the other exactly.

    Parameters
    ----------
    o_a, o_b : Tensor
        ``[N, H, D]``, same dtype.
    lse_a, lse_b : Tensor
        ``[N, H]`` float32, natural log.

    Returns
    -------
    out : Tensor
        ``[N, H, D]`` in o_a's dtype.
    lse : Tensor
        ``[N, H]`` float32.
    """
    check_tensor("o_a", o_a, ndim=3, dtype=FLOAT_DTYPES)
    shape = tuple(o_a.shape)
    check_tensor("o_b", o_b, dtype=o_a.dtype, device=o_a.device, shape=shape)
    check_tensor("lse_a", lse_a, dtype=torch.float32, device=o_a.device, shape=shape[:2])
    check_tensor("lse_b", lse_b, dtype=torch.float32, device=o_a.device, shape=shape[:2])
    chosen = backends.resolve("merge_attention_states", o_a.device, backend)
    return _merge_attention_states(*_contiguous(o_a, lse_a, o_b, lse_b), chosen)


# ---------------------------------------------------------------------------------------------
# write_kv


@torch.library.custom_op("ttscale::write_kv", mutates_args=("k_cache", "v_cache"))
def _write_kv(k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor, slots: Tensor, backend: str) -> None:
    backends.implementation("write_kv", backend)(k_cache, v_cache, k, v, slots)


@_write_kv.register_fake
def _(k_cache, v_cache, k, v, slots, backend):
    return None


def write_kv(
    k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor, slots: Tensor, *, backend: str | None = None
) -> None:
    """Scatter new K/V rows into the pool, in place.

    Parameters
    ----------
    k_cache, v_cache : Tensor
        ``[num_blocks, block_size, Hkv, D]``, contiguous.
    k, v : Tensor
        ``[N, Hkv, D]``, the caches' dtype.
    slots : Tensor
        ``[N]`` integer, the flat slot ``block * block_size + offset`` of each row; -1 skips the
        row (the padded rows of a CUDA graph).
    """
    check_tensor("k_cache", k_cache, ndim=4, dtype=FLOAT_DTYPES)
    check_tensor("v_cache", v_cache, dtype=k_cache.dtype, device=k_cache.device, shape=tuple(k_cache.shape))
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("k_cache/v_cache: the pool must be contiguous")
    num_blocks, block_size, kv_heads, head_dim = k_cache.shape
    check_tensor("k", k, ndim=3, dtype=k_cache.dtype, device=k_cache.device, shape=(None, kv_heads, head_dim))
    check_tensor("v", v, dtype=k_cache.dtype, device=k_cache.device, shape=tuple(k.shape))
    check_tensor("slots", slots, dtype=INDEX_DTYPES, device=k_cache.device, shape=(k.shape[0],))
    if check_values(slots):
        check_range("slots", slots, -1, num_blocks * block_size)
    chosen = backends.resolve("write_kv", k_cache.device, backend)
    k, v = _contiguous(k, v)
    _write_kv(k_cache, v_cache, k, v, slots.to(torch.int64).contiguous(), chosen)


# ---------------------------------------------------------------------------------------------
# sample

__all__ += ["sample", "MAX_LOGPROBS"]

MAX_LOGPROBS = 20


@torch.library.custom_op("ttscale::sample", mutates_args=())
def _sample(
    logits: Tensor, temperature: Tensor, top_k: Tensor, top_p: Tensor, min_p: Tensor, seed: int,
    offsets: Tensor, num_logprobs: int, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    fn = backends.implementation("sample", backend)
    return fn(logits, temperature, top_k, top_p, min_p, seed, offsets, num_logprobs)


@_sample.register_fake
def _(logits, temperature, top_k, top_p, min_p, seed, offsets, num_logprobs, backend):
    batch = logits.shape[0]
    tokens = logits.new_empty((batch,), dtype=torch.int64)
    logprobs = logits.new_empty((batch,), dtype=torch.float32)
    top_ids = logits.new_empty((batch, num_logprobs), dtype=torch.int64)
    return tokens, logprobs, top_ids, logits.new_empty((batch, num_logprobs), dtype=torch.float32)


def _first_bad_row(bad: Tensor) -> int | None:
    return int(bad.nonzero()[0, 0]) if bool(bad.any()) else None


def _check_sampling_values(logits, temperature, top_k, top_p, min_p) -> None:
    tiny = torch.finfo(torch.float32).tiny
    t = temperature
    bad_t = torch.isnan(t) | torch.isinf(t) | (t < 0) | ((t > 0) & (t < tiny))
    checks = [
        ("temperature", t, bad_t, f"0 or a positive finite number of at least {tiny:.3g}"),
        ("top_k", top_k, top_k < 0, ">= 0 (0 turns top-k off)"),
        ("top_p", top_p, ~((top_p > 0) & (top_p <= 1)), "a value in (0, 1] (1 turns top-p off)"),
        ("min_p", min_p, ~((min_p >= 0) & (min_p <= 1)), "a value in [0, 1] (0 turns min-p off)"),
    ]
    for name, values, bad, want in checks:
        row = _first_bad_row(bad)
        if row is not None:
            raise ValueError(f"{name}: expected {want}, got {values[row].item()} at row {row}")
    row_max = logits.amax(dim=1)  # NaN propagates: one pass finds every bad row
    row = _first_bad_row(torch.isnan(row_max) | torch.isposinf(row_max))
    if row is not None:
        raise ValueError(f"logits: row {row} contains NaN or +inf")
    row = _first_bad_row(torch.isneginf(row_max))
    if row is not None:
        raise ValueError(f"logits: row {row} is all -inf (no token can be drawn)")


def sample(
    logits: Tensor,
    temperature: Tensor,
    top_k: Tensor,
    top_p: Tensor,
    min_p: Tensor,
    seed: int,
    offsets: Tensor,
    num_logprobs: int = 0,
    *,
    backend: str | None = None,
) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor] | None]:
    """Draw one token per row from the logits, reproducibly, with its log-probability.

    Temperature 0 is argmax (the lowest index among equal maxima). Otherwise the token is drawn
    exactly from the filtered, renormalised distribution of ``x = logits * (1 / temperature)``
    (float32). The filters compose in this order, and each keeps every token at least as likely
    as a token it keeps, so tokens tied at a threshold are all kept or all dropped:

    1. top-k keeps a token when fewer than ``top_k`` tokens are strictly more likely (0: off);
    2. top-p keeps a token of the top-k set when the top-k tokens strictly more likely than it
       hold less than ``top_p`` of the top-k set's probability (1: off). This is the smallest
       set of most probable tokens whose mass reaches ``top_p``, with the ties at its edge;
    3. min-p keeps a token whose probability is at least ``min_p`` times the largest (0: off).

    The draw is Gumbel-max: the kept token with the largest ``x + g`` wins, where ``g`` is
    Gumbel noise from a counter-based hash of ``(seed, offsets[b], token)``
    (:func:`ttscale.reference.sampling_uniforms`; every backend computes the same bits). A
    row's token therefore depends only on its own logits, parameters, seed and offset, never on
    its batch. Backends agree on the token except when two kept tokens' ``x + g`` lie within a
    few float32 rounding errors, or a token's mass sits within rounding of a top-p threshold
    (about one row in a million).

    Parameters
    ----------
    logits : Tensor
        ``[B, V]`` float32, float16 or bfloat16; finite or ``-inf`` (a banned token), with at
        least one finite value per row.
    temperature : Tensor
        ``[B]`` float32, 0 (greedy) or positive.
    top_k : Tensor
        ``[B]`` int32, 0 for off.
    top_p : Tensor
        ``[B]`` float32 in (0, 1].
    min_p : Tensor
        ``[B]`` float32 in [0, 1].
    seed : int
        In ``[0, 2**64)``.
    offsets : Tensor
        ``[B]`` int64, a counter unique to each draw (sequence id * max_tokens + step), so that
        the samples of one prompt differ and a sequence's draws do not depend on its batch.
    num_logprobs : int
        How many top log-probabilities to return per row, 0 to 20.
    backend : str, optional
        Force ``"torch"``, ``"cpu"`` or ``"triton"``.

    Returns
    -------
    tokens : Tensor
        ``[B]`` int64.
    logprobs : Tensor
        ``[B]`` float32: each token's log-probability under ``log_softmax(x)``, the
        temperature-scaled distribution before any filter (at temperature 0,
        ``log_softmax(logits)``).
    top_logprobs : tuple of Tensor or None
        ``(ids int64 [B, n], values float32 [B, n])``, the ``n = num_logprobs`` largest values
        of that same ``log_softmax(x)``, largest first (equal values by lowest id); None when
        ``num_logprobs`` is 0.
    """
    check_tensor("logits", logits, ndim=2, dtype=FLOAT_DTYPES)
    batch, vocab = logits.shape
    if vocab == 0:
        raise ValueError("logits: expected at least one token per row, got V = 0")
    device = logits.device
    for name, t in (("temperature", temperature), ("top_p", top_p), ("min_p", min_p)):
        check_tensor(name, t, dtype=torch.float32, device=device, shape=(batch,))
    check_tensor("top_k", top_k, dtype=torch.int32, device=device, shape=(batch,))
    check_tensor("offsets", offsets, dtype=torch.int64, device=device, shape=(batch,))
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"seed: expected an int, got {type(seed).__name__}")
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed: expected an int in [0, 2**64), got {seed}")
    if not isinstance(num_logprobs, int) or isinstance(num_logprobs, bool):
        raise ValueError(f"num_logprobs: expected an int, got {type(num_logprobs).__name__}")
    most = min(MAX_LOGPROBS, vocab)
    if not 0 <= num_logprobs <= most:
        raise ValueError(f"num_logprobs: expected 0 to {most}, got {num_logprobs}")
    if check_values(logits, temperature, top_k, top_p, min_p):
        _check_sampling_values(logits, temperature, top_k, top_p, min_p)
    chosen = backends.resolve("sample", device, backend)
    signed_seed = seed - 2**64 if seed >= 2**63 else seed  # the op schema's int is int64
    tokens, logprobs, top_ids, top_values = _sample(
        *_contiguous(logits, temperature, top_k, top_p, min_p), signed_seed, offsets.contiguous(),
        num_logprobs, chosen,
    )
    return tokens, logprobs, ((top_ids, top_values) if num_logprobs else None)
