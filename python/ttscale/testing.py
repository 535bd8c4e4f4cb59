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


@dataclass
class PRMCase:
    hidden: torch.Tensor
    seq_ids: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    state: torch.Tensor

    def args(self):
        return (self.hidden, self.seq_ids, self.weight, self.bias)


def make_prm_case(
    steps: int,
    hidden_size: int,
    num_seqs: int,
    *,
    kind: str = "two_token",
    with_bias: bool | None = None,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    seed: int = 0,
) -> PRMCase:
    """Step rows dealt to sequences in a random order, a head of ``kind``, and a prior state.

    The head is scaled so that logits are of order 1 (scores spread over (0, 1)). The prior
    state has counts 0 to 3 and random aggregates, also in the rows of count 0 (which the op must
    treat as empty). ``with_bias`` defaults to a bias for the two_class and value heads.
    """
    gen = torch.Generator().manual_seed(seed)
    rows = 1 if kind == "value" else 2
    if with_bias is None:
        with_bias = kind != "two_token"
    hidden = torch.randn(steps, hidden_size, generator=gen)
    weight = torch.randn(rows, hidden_size, generator=gen) * (2 / max(hidden_size, 1) ** 0.5)
    bias = torch.randn(rows, generator=gen) if with_bias else None
    seq_ids = torch.randint(0, max(num_seqs, 1), (steps,), generator=gen)
    state = torch.stack([torch.rand(num_seqs, generator=gen),
                         torch.randint(0, 4, (num_seqs,), generator=gen).float()], dim=1)
    return PRMCase(
        hidden=hidden.to(device=device, dtype=dtype),
        seq_ids=seq_ids.to(device),
        weight=weight.to(device=device, dtype=dtype),
        bias=None if bias is None else bias.to(device=device, dtype=dtype),
        state=state.to(device),
    )
