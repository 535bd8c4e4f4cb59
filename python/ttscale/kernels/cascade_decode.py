"""Triton cascade decode attention: one query token per sequence over a shared prompt and a suffix.

Two kernels per call:

1. ``prompt_kernel`` (level 0). The query rows of all sequences, taken in the plan's
   ``seq_order`` (grouped by problem) and times the ``G`` query heads that share a kv head, form
   one row space ``[B * G]`` per kv head, cut into tiles of ``BLOCK_M`` rows. A tile loads its
   rows once and, for each problem its rows belong to (usually one), streams that problem's
   prompt keys through ``tl.dot``: every prompt block is read once per tile for up to
   ``BLOCK_M`` rows, not once per sequence (Hydragen; FlashInfer's cascade). A third grid axis
   splits each prompt into ``NUM_SPLITS`` equal key ranges, so that few problems with long
   prompts still fill the GPU (:func:`prompt_splits` says how many); each split writes a
   partial output (normalised, in q's dtype) and its lse per row.
2. ``suffix_merge_kernel`` (level 1). One program per (sequence, kv head), the ``G`` query
   heads as the rows of the dot, streams the sequence's own paged suffix, then folds in the
   prompt splits' partial states by their log-sum-exps and writes the final out and lse.

With ``DecodeConfig(overlap=True)`` the two levels run in one launch instead
(``overlapped_kernel``: level 0's programs first, level 1's beside them, the suffix's state
written as one more partial state), and ``merge_splits_kernel`` merges every row's states:
level 0's matrix products overlap level 1's reads, as in the CUDA kernel.

The grid depends only on shapes known on the host (``B``, heads, table widths), never on values
in device memory, so the op can be captured in a CUDA graph.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch
import triton
import triton.language as tl

from ttscale.backends import new_output
from ttscale.kernels.paged import (
    LOG2E,
    block_d,
    dot_precision,
    finish,
    kv_rows,
    load_kv,
    softmax_step,
)


@triton.jit
def split_range(length, split, NUM_SPLITS: tl.constexpr, BLOCK_N: tl.constexpr):
    """Keys ``[start, end)`` of one split of a prompt: equal ranges, rounded up to whole blocks."""
    chunk = tl.cdiv(tl.cdiv(length, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * chunk
    return start, tl.minimum(start + chunk, length)


@triton.jit
def prompt_tile(
    q_ptr, k_ptr, v_ptr, prompt_tables_ptr, prompt_lens_ptr, problem_ids_ptr, seq_order_ptr,
    part_out_ptr, part_lse_ptr, tile, kv_head, split,
    num_rows, qk_scale,
    stride_qb, stride_qh, stride_kt, stride_kh, stride_table,
    stride_part_split, stride_part_seq,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, NUM_SPLITS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Level 0 of one tile of rows, one kv head and one key range: partial states per row."""
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)  # rows of the problem-sorted space [B * G]
    row_ok = rows < num_rows
    seq = tl.load(seq_order_ptr + rows // GROUP, mask=row_ok, other=0).to(tl.int64)
    head = kv_head * GROUP + rows % GROUP
    row_problem = tl.load(problem_ids_ptr + seq, mask=row_ok, other=-1)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    q = tl.load(q_ptr + seq[:, None] * stride_qb + head[:, None] * stride_qh + d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)

    # Rows are sorted by problem, so the tile's problems are the range between its first and
    # last row's; a tile straddles a boundary only where a problem's rows end mid-tile.
    last_row = tl.minimum(tile * BLOCK_M + BLOCK_M, num_rows) - 1
    first_problem = tl.load(problem_ids_ptr + tl.load(seq_order_ptr + tile * BLOCK_M // GROUP))
    last_problem = tl.load(problem_ids_ptr + tl.load(seq_order_ptr + last_row // GROUP))
    for problem in range(first_problem, last_problem + 1):
        mine = row_ok & (row_problem == problem)
        prompt_len = tl.load(prompt_lens_ptr + problem)
        start, end = split_range(prompt_len, split, NUM_SPLITS, BLOCK_N)
        if (start < end) & (tl.sum(mine.to(tl.int32), 0) > 0):
            table = prompt_tables_ptr + problem * stride_table
            m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
            l_i = tl.zeros([BLOCK_M], tl.float32)
            acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
            for key in range(start, end, BLOCK_N):
                n = key + tl.arange(0, BLOCK_N)
                n_ok = n < end
                k, v = load_kv(k_ptr, v_ptr, kv_rows(table, n, n_ok, BLOCK_SIZE), kv_head, n_ok,
                               stride_kt, stride_kh, HEAD_DIM, BLOCK_D)
                m_i, l_i, acc = softmax_step(q, k, v, n_ok[None, :], m_i, l_i, acc, qk_scale,
                                             DOT_PRECISION)
            # Every split that runs has at least one key, so l_i > 0. Partial lse in base 2; the
            # normalised partial output in q's dtype (half the traffic of float32 in bf16).
            part = split * stride_part_split + seq * stride_part_seq + head
            tl.store(part_lse_ptr + part, m_i + tl.log2(l_i), mask=mine)
            tl.store(part_out_ptr + part[:, None] * HEAD_DIM + d[None, :],
                     (acc / l_i[:, None]).to(part_out_ptr.dtype.element_ty),
                     mask=mine[:, None] & d_ok[None, :])


@triton.jit
def prompt_kernel(
    q_ptr, k_ptr, v_ptr, prompt_tables_ptr, prompt_lens_ptr, problem_ids_ptr, seq_order_ptr,
    part_out_ptr, part_lse_ptr,
    num_rows, qk_scale,
    stride_qb, stride_qh, stride_kt, stride_kh, stride_table,
    stride_part_split, stride_part_seq,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, NUM_SPLITS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    prompt_tile(
        q_ptr, k_ptr, v_ptr, prompt_tables_ptr, prompt_lens_ptr, problem_ids_ptr, seq_order_ptr,
        part_out_ptr, part_lse_ptr, tl.program_id(0), tl.program_id(1), tl.program_id(2),
        num_rows, qk_scale, stride_qb, stride_qh, stride_kt, stride_kh, stride_table,
        stride_part_split, stride_part_seq, GROUP, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N,
        BLOCK_SIZE, NUM_SPLITS, DOT_PRECISION,
    )


@triton.jit
def suffix_state(
    q_ptr, k_ptr, v_ptr, suffix_tables_ptr, suffix_lens_ptr, seq, kv_head, qk_scale,
    stride_qb, stride_qh, stride_kt, stride_kh, stride_table,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Level 1: the running softmax (m, l, acc) of one sequence's group heads over its suffix."""
    g = tl.arange(0, BLOCK_G)
    head = kv_head * GROUP + g
    d = tl.arange(0, BLOCK_D)
    row = seq * stride_qb + head * stride_qh
    q = tl.load(q_ptr + row[:, None] + d[None, :],
                mask=(g < GROUP)[:, None] & (d < HEAD_DIM)[None, :], other=0.0)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    suffix_len = tl.load(suffix_lens_ptr + seq)
    table = suffix_tables_ptr + seq * stride_table
    for key in range(0, suffix_len, BLOCK_N):
        n = key + tl.arange(0, BLOCK_N)
        n_ok = n < suffix_len
        k, v = load_kv(k_ptr, v_ptr, kv_rows(table, n, n_ok, BLOCK_SIZE), kv_head, n_ok,
                       stride_kt, stride_kh, HEAD_DIM, BLOCK_D)
        m_i, l_i, acc = softmax_step(q, k, v, n_ok[None, :], m_i, l_i, acc, qk_scale, DOT_PRECISION)
    return m_i, l_i, acc


@triton.jit
def fold_state(m_i, l_i, acc, part_lse, part_out):
    """A normalised partial state (base-2 lse, -inf where absent) into a running softmax: the
    log-sum-exp merge of ``merge_attention_states``, with the running side unnormalised."""
    m_new = tl.maximum(m_i, part_lse)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    beta = tl.exp2(part_lse - m_safe)  # the partial output is normalised: its sum is 1
    return m_new, l_i * alpha + beta, acc * alpha[:, None] + part_out * beta[:, None]


@triton.jit
def merge_and_store(
    m_i, l_i, acc, prompt_lens_ptr, problem_ids_ptr, part_out_ptr, part_lse_ptr, out_ptr, lse_ptr,
    seq, head, g_ok,
    stride_qb, stride_qh, stride_part_split, stride_part_seq,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, NUM_SPLITS: tl.constexpr,
    PROMPT_BLOCK_N: tl.constexpr,
):
    """Level 1's end in either launch order, in a program of the ``(B, Hkv)`` grid: fold the
    prompt's splits into the running state of the sequence's group heads, then write the final
    out and lse. A split that covered no keys wrote nothing and is skipped."""
    d = tl.arange(0, BLOCK_D)
    prompt_len = tl.load(prompt_lens_ptr + tl.load(problem_ids_ptr + seq))
    for split in tl.static_range(NUM_SPLITS):
        start, end = split_range(prompt_len, split, NUM_SPLITS, PROMPT_BLOCK_N)
        ok = g_ok & (start < end)
        part = split * stride_part_split + seq * stride_part_seq + head
        part_lse = tl.load(part_lse_ptr + part, mask=ok, other=float("-inf"))
        part_out = tl.load(part_out_ptr + part[:, None] * HEAD_DIM + d[None, :],
                           mask=ok[:, None] & (d < HEAD_DIM)[None, :], other=0.0).to(tl.float32)
        m_i, l_i, acc = fold_state(m_i, l_i, acc, part_lse, part_out)
    out, lse = finish(m_i, l_i, acc)
    row = seq * stride_qb + head * stride_qh  # q and out share the layout [B, Hq, D]
    tl.store(out_ptr + row[:, None] + d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=g_ok[:, None] & (d < HEAD_DIM)[None, :])
    tl.store(lse_ptr + seq * (GROUP * tl.num_programs(1)) + head, lse, mask=g_ok)


@triton.jit
def suffix_merge_kernel(
    q_ptr, k_ptr, v_ptr, suffix_tables_ptr, suffix_lens_ptr, prompt_lens_ptr, problem_ids_ptr,
    part_out_ptr, part_lse_ptr, out_ptr, lse_ptr,
    qk_scale,
    stride_qb, stride_qh, stride_kt, stride_kh, stride_table,
    stride_part_split, stride_part_seq,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, NUM_SPLITS: tl.constexpr,
    PROMPT_BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    seq, kv_head = tl.program_id(0).to(tl.int64), tl.program_id(1)
    head = kv_head * GROUP + tl.arange(0, BLOCK_G)
    g_ok = tl.arange(0, BLOCK_G) < GROUP
    m_i, l_i, acc = suffix_state(
        q_ptr, k_ptr, v_ptr, suffix_tables_ptr, suffix_lens_ptr, seq, kv_head, qk_scale,
        stride_qb, stride_qh, stride_kt, stride_kh, stride_table,
        GROUP, HEAD_DIM, BLOCK_D, BLOCK_G, BLOCK_N, BLOCK_SIZE, DOT_PRECISION,
    )
    merge_and_store(
        m_i, l_i, acc, prompt_lens_ptr, problem_ids_ptr, part_out_ptr, part_lse_ptr, out_ptr,
        lse_ptr, seq, head, g_ok, stride_qb, stride_qh, stride_part_split, stride_part_seq,
        GROUP, HEAD_DIM, BLOCK_D, NUM_SPLITS, PROMPT_BLOCK_N,
    )


@triton.jit
def overlapped_kernel(
    q_ptr, k_ptr, v_ptr, prompt_tables_ptr, prompt_lens_ptr, problem_ids_ptr, seq_order_ptr,
    suffix_tables_ptr, suffix_lens_ptr, part_out_ptr, part_lse_ptr,
    num_rows, num_tiles, kv_heads, qk_scale,
    stride_qb, stride_qh, stride_kt, stride_kh, stride_prompt_table, stride_suffix_table,
    stride_part_split, stride_part_seq,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr, SUFFIX_BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, NUM_SPLITS: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Both levels in one launch, level 0's programs first (the longest start first, level 1's
    fill the multiprocessors beside them); every program writes partial states, the suffix's in
    slot ``NUM_SPLITS``."""
    program = tl.program_id(0)
    prompt_programs = num_tiles * kv_heads * NUM_SPLITS
    if program < prompt_programs:
        prompt_tile(
            q_ptr, k_ptr, v_ptr, prompt_tables_ptr, prompt_lens_ptr, problem_ids_ptr,
            seq_order_ptr, part_out_ptr, part_lse_ptr, program % num_tiles,
            program // num_tiles % kv_heads, program // (num_tiles * kv_heads),
            num_rows, qk_scale, stride_qb, stride_qh, stride_kt, stride_kh, stride_prompt_table,
            stride_part_split, stride_part_seq, GROUP, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N,
            BLOCK_SIZE, NUM_SPLITS, DOT_PRECISION,
        )
    else:
        seq = ((program - prompt_programs) // kv_heads).to(tl.int64)
        kv_head = (program - prompt_programs) % kv_heads
        m_i, l_i, acc = suffix_state(
            q_ptr, k_ptr, v_ptr, suffix_tables_ptr, suffix_lens_ptr, seq, kv_head, qk_scale,
            stride_qb, stride_qh, stride_kt, stride_kh, stride_suffix_table,
            GROUP, HEAD_DIM, BLOCK_D, BLOCK_G, SUFFIX_BLOCK_N, BLOCK_SIZE, DOT_PRECISION,
        )
        g = tl.arange(0, BLOCK_G)
        d = tl.arange(0, BLOCK_D)
        seen = l_i > 0  # an empty suffix: lse -inf and a zero output, which the merge weighs 0
        safe_l = tl.where(seen, l_i, 1.0)
        part = NUM_SPLITS * stride_part_split + seq * stride_part_seq + kv_head * GROUP + g
        tl.store(part_lse_ptr + part, tl.where(seen, m_i + tl.log2(safe_l), float("-inf")),
                 mask=g < GROUP)
        tl.store(part_out_ptr + part[:, None] * HEAD_DIM + d[None, :],
                 (acc / safe_l[:, None]).to(part_out_ptr.dtype.element_ty),
                 mask=(g < GROUP)[:, None] & (d < HEAD_DIM)[None, :])


@triton.jit
def merge_splits_kernel(
    prompt_lens_ptr, problem_ids_ptr, part_out_ptr, part_lse_ptr, out_ptr, lse_ptr,
    stride_qb, stride_qh, stride_part_split, stride_part_seq,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_G: tl.constexpr,
    NUM_SPLITS: tl.constexpr, PROMPT_BLOCK_N: tl.constexpr,
):
    """After :func:`overlapped_kernel`: each row's suffix state and prompt splits, merged."""
    seq, kv_head = tl.program_id(0).to(tl.int64), tl.program_id(1)
    g = tl.arange(0, BLOCK_G)
    g_ok = g < GROUP
    head = kv_head * GROUP + g
    d = tl.arange(0, BLOCK_D)
    part = NUM_SPLITS * stride_part_split + seq * stride_part_seq + head
    m_i = tl.load(part_lse_ptr + part, mask=g_ok, other=float("-inf"))
    l_i = tl.where(m_i > float("-inf"), 1.0, 0.0)  # a normalised state: its sum is 1
    acc = tl.load(part_out_ptr + part[:, None] * HEAD_DIM + d[None, :],
                  mask=g_ok[:, None] & (d < HEAD_DIM)[None, :], other=0.0).to(tl.float32)
    merge_and_store(
        m_i, l_i, acc, prompt_lens_ptr, problem_ids_ptr, part_out_ptr, part_lse_ptr, out_ptr,
        lse_ptr, seq, head, g_ok, stride_qb, stride_qh, stride_part_split, stride_part_seq,
        GROUP, HEAD_DIM, BLOCK_D, NUM_SPLITS, PROMPT_BLOCK_N,
    )


@dataclass(frozen=True)
class DecodeConfig:
    """Launch shape of the decode kernels (tests force small ones to cross tile/split edges)."""

    block_m: int  # level-0 query rows (sequence x group head) per tile
    block_n: int  # level-0 keys per step
    num_splits: int  # level-0 key ranges per prompt
    suffix_block_n: int  # level-1 keys per step
    num_warps: int = 4  # of the level-0 kernel; level 1 is a small memory-bound tile
    num_stages: int = 2
    # One launch running both levels side by side, then a merge launch (the CUDA kernel's
    # order), instead of level 0 and then level 1 with the merge: overlaps level 0's matrix
    # products with level 1's reads, for the round trip of one more partial state per row.
    overlap: bool = False
    # Of the level-1 kernel (two launches) or the merge (overlapped). At 64 keys a step its
    # compiled code holds ~200 registers a thread at 4 warps, ~100 at 8 (sm_90, D=64): which
    # occupancy the memory-bound suffix pass wants is for a GPU to say.
    suffix_num_warps: int = 4


@cache
def _multiprocessors(device: torch.device) -> int:
    if device.type != "cuda":
        return 1  # the interpreter: no parallel hardware to fill
    return torch.cuda.get_device_properties(device).multi_processor_count


def prompt_splits(tiles: int, max_prompt_len: int, multiprocessors: int) -> int:
    """Key ranges per prompt: just enough level-0 programs to give every multiprocessor one.

    A split buys parallelism when few tiles stream long prompts, and costs every row a partial
    state written by level 0 and read back by level 1 (``2 x D`` elements in q's dtype per row
    and split: at 1B heads, N=256, prompt 2048 each split adds 4 MB to a 40 MB floor). So split
    only as far as one wave fills the machine, never below 256 keys a split, at most 16.
    """
    most = max(1, min(16, max_prompt_len // 256))
    return max(1, min(most, triton.cdiv(multiprocessors, tiles)))


def decode_config(batch: int, q_heads: int, kv_heads: int, num_problems: int, max_prompt_len: int,
                  max_suffix_len: int, device: torch.device) -> DecodeConfig:
    """A launch shape from host-known sizes only (no device read: CUDA-graph safe)."""
    rows = batch * (q_heads // kv_heads)
    # Tiles as tall as the rows one problem has, up to 128: taller tiles read each prompt block
    # for more rows, but rows of other problems in a tile only cost extra passes.
    rows_per_problem = triton.cdiv(rows, max(num_problems, 1))
    block_m = min(128, max(16, triton.next_power_of_2(rows_per_problem)))
    tiles = triton.cdiv(rows, block_m) * kv_heads
    num_splits = prompt_splits(tiles, max_prompt_len, _multiprocessors(device))
    suffix_block_n = min(64, max(16, triton.next_power_of_2(max_suffix_len)))
    return DecodeConfig(block_m=block_m, block_n=64, num_splits=num_splits,
                        suffix_block_n=suffix_block_n, num_warps=8 if block_m >= 128 else 4)


def cascade_decode_attention(q, k_cache, v_cache, prompt_block_tables, prompt_lens, problem_ids,
                             suffix_block_tables, suffix_lens, scale, plan,
                             config: DecodeConfig | None = None):
    """See :func:`ttscale.ops.cascade_decode_attention`; ``plan[0]`` is ``seq_order``."""
    batch, q_heads, head_dim = q.shape
    _, block_size, kv_heads, _ = k_cache.shape
    group = q_heads // kv_heads
    out = new_output(q.shape, q.dtype, q.device)
    lse = new_output((batch, q_heads), torch.float32, q.device)
    if batch == 0:
        return out, lse
    if config is None:
        config = decode_config(batch, q_heads, kv_heads, prompt_lens.shape[0],
                               prompt_block_tables.shape[1] * block_size,
                               suffix_block_tables.shape[1] * block_size, q.device)
    seq_order = plan[0]
    # Partial states of the prompt splits (and of the suffix, last, when overlapped): written
    # by level 0 wherever a split has keys, read only there (poisoned in tests, so reading an
    # unwritten one shows).
    slots = config.num_splits + config.overlap
    part_out = new_output((slots, batch, q_heads, head_dim), q.dtype, q.device)
    part_lse = new_output((slots, batch, q_heads), torch.float32, q.device)
    common = dict(GROUP=group, HEAD_DIM=head_dim, BLOCK_D=block_d(head_dim), BLOCK_SIZE=block_size,
                  NUM_SPLITS=config.num_splits, DOT_PRECISION=dot_precision(q.dtype),
                  num_stages=config.num_stages)
    strides = (q.stride(0), q.stride(1), k_cache.stride(1), k_cache.stride(2))
    part_strides = (part_lse.stride(0), part_lse.stride(1))
    qk_scale = scale * LOG2E
    rows = batch * group
    block_g = max(16, triton.next_power_of_2(group))
    if config.overlap:
        tiles = triton.cdiv(rows, config.block_m)
        grid = (tiles * kv_heads * config.num_splits + batch * kv_heads,)
        overlapped_kernel[grid](
            q, k_cache, v_cache, prompt_block_tables, prompt_lens, problem_ids, seq_order,
            suffix_block_tables, suffix_lens, part_out, part_lse, rows, tiles, kv_heads, qk_scale,
            *strides, prompt_block_tables.stride(0), suffix_block_tables.stride(0),
            *part_strides, BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_G=block_g,
            SUFFIX_BLOCK_N=config.suffix_block_n, num_warps=config.num_warps, **common,
        )
        merge_splits_kernel[(batch, kv_heads)](
            prompt_lens, problem_ids, part_out, part_lse, out, lse, q.stride(0), q.stride(1),
            *part_strides, GROUP=group, HEAD_DIM=head_dim, BLOCK_D=common["BLOCK_D"],
            BLOCK_G=block_g, NUM_SPLITS=config.num_splits, PROMPT_BLOCK_N=config.block_n,
            num_warps=config.suffix_num_warps,
        )
        return out, lse
    grid = (triton.cdiv(rows, config.block_m), kv_heads, config.num_splits)
    prompt_kernel[grid](
        q, k_cache, v_cache, prompt_block_tables, prompt_lens, problem_ids, seq_order,
        part_out, part_lse, rows, qk_scale, *strides, prompt_block_tables.stride(0), *part_strides,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, num_warps=config.num_warps, **common,
    )
    suffix_merge_kernel[(batch, kv_heads)](
        q, k_cache, v_cache, suffix_block_tables, suffix_lens, prompt_lens, problem_ids,
        part_out, part_lse, out, lse, qk_scale, *strides, suffix_block_tables.stride(0),
        *part_strides, BLOCK_G=block_g,
        BLOCK_N=config.suffix_block_n, PROMPT_BLOCK_N=config.block_n,
        num_warps=config.suffix_num_warps, **common,
    )
    return out, lse
