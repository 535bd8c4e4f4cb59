"""Random inputs for the ops, shared by the tests, the self-check and the benchmarks."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PagedCase:
    q: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    prompt_block_tables: torch.Tensor
    prompt_lens: torch.Tensor
    problem_ids: torch.Tensor
    suffix_block_tables: torch.Tensor
    suffix_lens: torch.Tensor

    def args(self):
        return (self.q, self.k_cache, self.v_cache, self.prompt_block_tables, self.prompt_lens,
                self.problem_ids, self.suffix_block_tables, self.suffix_lens)


def make_case(
    seqs_per_problem: list[int],
    prompt_lens: list[int],
    suffix_lens: list[int] | None = None,
    *,
    q_rows: int | None = None,
    q_heads: int = 4,
    kv_heads: int = 2,
    head_dim: int = 64,
    block_size: int = 16,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    seed: int = 0,
    spare_blocks: int = 3,
    interleave: bool = True,
) -> PagedCase:
    """A pool with shuffled (non-contiguous) blocks, problems with their prompts and sequences.

    ``interleave`` deals the sequences of different problems into the batch in a mixed order, so
    kernels cannot assume a problem's sequences are adjacent.
    """
    gen = torch.Generator().manual_seed(seed)
    batch = sum(seqs_per_problem)
    problem_ids = torch.repeat_interleave(torch.arange(len(seqs_per_problem)), torch.tensor(seqs_per_problem))
    if interleave and batch > 1:
        problem_ids = problem_ids[torch.randperm(batch, generator=gen)]
    if suffix_lens is None:
        suffix_lens = torch.randint(0, 40, (batch,), generator=gen).tolist()
    assert len(suffix_lens) == batch and len(prompt_lens) == len(seqs_per_problem)

    def blocks(n):
        return -(-n // block_size)

    need = sum(blocks(n) for n in prompt_lens) + sum(blocks(n) for n in suffix_lens)
    num_blocks = need + spare_blocks
    pool_order = torch.randperm(num_blocks, generator=gen).tolist()

    def table(lens):
        width = max([blocks(n) for n in lens] + [1]) + 1  # a spare column: tables may be wider than needed
        out = torch.full((len(lens), width), -7, dtype=torch.int32)  # unused entries are garbage
        for row, n in enumerate(lens):
            for j in range(blocks(n)):
                out[row, j] = pool_order.pop()
        return out

    pbt, sbt = table(prompt_lens), table(suffix_lens)
    rows = batch if q_rows is None else q_rows
    q = torch.randn(rows, q_heads, head_dim, generator=gen)
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=gen)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=gen)
    i32 = dict(dtype=torch.int32, device=device)
    return PagedCase(
        q=q.to(device=device, dtype=dtype),
        k_cache=k_cache.to(device=device, dtype=dtype),
        v_cache=v_cache.to(device=device, dtype=dtype),
        prompt_block_tables=pbt.to(device),
        prompt_lens=torch.tensor(prompt_lens, **i32),
        problem_ids=problem_ids.to(**i32),
        suffix_block_tables=sbt.to(device),
        suffix_lens=torch.tensor(suffix_lens, **i32),
    )


# ---------------------------------------------------------------------------------------------
# sample

# (temperature, top_k, top_p, min_p) of the rows of a sampling case, cycled over the batch so
# that every path of the kernels runs: greedy, plain, each filter alone, and combinations. A
# top_k of -1 stands for the vocabulary size (top-k on but keeping everything).
SAMPLING_SETTINGS = [
    (0.0, 0, 1.0, 0.0),
    (1.0, 0, 1.0, 0.0),
    (0.7, 20, 1.0, 0.0),
    (1.0, 0, 0.9, 0.0),
    (1.3, 0, 1.0, 0.1),
    (0.8, 40, 0.8, 0.0),
    (1.0, 5, 0.95, 0.05),
    (1.0, -1, 0.5, 0.0),
]


@dataclass
class SamplingCase:
    logits: torch.Tensor  # [B, V]
    temperature: torch.Tensor  # [B] float32
    top_k: torch.Tensor  # [B] int32
    top_p: torch.Tensor  # [B] float32
    min_p: torch.Tensor  # [B] float32
    offsets: torch.Tensor  # [B] int64

    def args(self, seed: int):
        """The positional arguments of ``ops.sample`` up to ``offsets``."""
        return (self.logits, self.temperature, self.top_k, self.top_p, self.min_p, seed,
                self.offsets)


def make_sampling_case(
    batch: int,
    vocab: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    seed: int = 0,
    settings: list[tuple[float, int, float, float]] | None = None,
) -> SamplingCase:
    """Rows of random logits, from flat (scale 0.5) to peaked (scale 8), with row settings.

    Offsets are random int64 (both 32-bit words vary) and distinct.
    """
    gen = torch.Generator().manual_seed(seed)
    scale = 0.5 + 7.5 * torch.rand(batch, 1, generator=gen)
    logits = torch.randn(batch, vocab, generator=gen) * scale
    settings = settings or SAMPLING_SETTINGS
    rows = [settings[b % len(settings)] for b in range(batch)]
    temperature = [row[0] for row in rows]
    top_k = [vocab if row[1] == -1 else row[1] for row in rows]
    top_p, min_p = [row[2] for row in rows], [row[3] for row in rows]
    offsets = torch.randperm(2**20, generator=gen)[:batch] * 7919 + 2**35
    f32 = dict(dtype=torch.float32, device=device)
    return SamplingCase(
        logits=logits.to(device=device, dtype=dtype),
        temperature=torch.tensor(temperature, **f32),
        top_k=torch.tensor(top_k, dtype=torch.int32, device=device),
        top_p=torch.tensor(top_p, **f32),
        min_p=torch.tensor(min_p, **f32),
        offsets=offsets.to(device),
    )
