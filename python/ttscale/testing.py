"""Random inputs for the ops, shared by the tests, the self-check and the benchmarks."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ttscale.block_pool import BlockPool


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


@dataclass
class ForkCase:
    """Candidates of a search step in groups, with their block tables in a consistent pool."""

    scores: torch.Tensor
    group_offsets: torch.Tensor
    block_tables: torch.Tensor
    lens: torch.Tensor
    pool: BlockPool


def make_fork_case(
    group_sizes: list[int],
    *,
    block_size: int = 8,
    max_own_tokens: int = 40,
    spare_blocks: int = 6,
    seed: int = 0,
    device: str = "cpu",
    scores: list[float] | None = None,
) -> ForkCase:
    """Groups of candidates as a beam search leaves them.

    A group's candidates share a few full blocks (their common past), then hold blocks of their
    own, the last often partial. Reference counts are exact, block ids shuffled, the unused
    table entries garbage (-7), and ``spare_blocks`` blocks free in a shuffled stack.
    """
    gen = torch.Generator().manual_seed(seed)

    def draw(n: int) -> int:
        return int(torch.randint(0, n, (1,), generator=gen))

    shared = [draw(3) if size else 0 for size in group_sizes]
    own = [draw(max_own_tokens + 1) for _ in range(sum(group_sizes))]
    own_blocks = [-(-n // block_size) for n in own]
    num_blocks = sum(shared) + sum(own_blocks) + spare_blocks
    ids = torch.randperm(num_blocks, generator=gen).tolist()
    row_shared = [p for p, size in zip(shared, group_sizes, strict=True) for _ in range(size)]
    row_blocks = [s + o for s, o in zip(row_shared, own_blocks, strict=True)]
    width = max(row_blocks, default=0) + 1  # a spare column
    tables = torch.full((len(own), width), -7, dtype=torch.int32)
    counts = [0] * num_blocks
    lens, row = [], 0
    for size, prefix in zip(group_sizes, shared, strict=True):
        common = [ids.pop() for _ in range(prefix)]
        for _ in range(size):
            blocks = common + [ids.pop() for _ in range(own_blocks[row])]
            for block in blocks:
                counts[block] += 1
            tables[row, : len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
            lens.append(prefix * block_size + own[row])
            row += 1
    stack = ids + [0] * (num_blocks - len(ids))
    int32 = dict(dtype=torch.int32, device=device)
    pool = BlockPool(
        ref_counts=torch.tensor(counts, **int32),
        free_stack=torch.tensor(stack, **int32),
        free_top=torch.tensor([len(ids)], **int32),
        status=torch.zeros(1, **int32),
        block_size=block_size,
    )
    values = torch.randn(len(own), generator=gen) if scores is None else torch.tensor(scores)
    offsets = torch.zeros(len(group_sizes) + 1, dtype=torch.int32)
    offsets[1:] = torch.cumsum(torch.tensor(group_sizes, dtype=torch.int32), 0)
    return ForkCase(
        scores=values.to(device=device, dtype=torch.float32),
        group_offsets=offsets.to(device),
        block_tables=tables.to(device),
        lens=torch.tensor(lens, **int32),
        pool=pool,
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
