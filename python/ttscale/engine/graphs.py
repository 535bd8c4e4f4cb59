"""CUDA graphs of one decode step: forward, LM head, sample, and the next step's inputs.

A decode step of a small model is hundreds of short kernels; launched one by one from Python its
host time dwarfs the device time (measured on an H100, Llama-3.2-1B shape, 256 sequences: 91%
of the wall outside kernels). A captured step replays all of them in one launch.

A graph is captured per key: the batch padded up to a size bucket, the block tables' widths
(powers of two), the sampling seed and the number of top log-probabilities (both are arguments of
the sampling kernel itself), and the attention backend. Everything else a step reads lives in the
graph's static buffers, written before the window's first replay. Each replay also advances its
own inputs on the device (positions, suffix lengths, draw offsets, the slot of the next token,
computed from the suffix table; the sampled token becomes the next input), so a window of ``w``
steps is ``w`` replays and a copy of each step's outputs.

Padded rows are inert: slot -1 (no KV write), one suffix token read from block 0 (finite: the
pool starts zeroed and holds only what the model wrote), prompt 0, temperature 0.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from ttscale import ops
from ttscale.model import AttentionBatch

MAX_GRAPHS = 48  # captured steps kept; the least recently used goes first


def bucket(n: int) -> int:
    """The padded batch size: 1, 2, 3, 4, 6, 8, 12, 16, ... (two per octave, at most 1/3 idle)."""
    size = 1
    while size < n:
        half = size + size // 2
        if size >= 2 and half >= n:
            return half
        size *= 2
    return size


def width_bucket(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


@dataclass(frozen=True)
class GraphKey:
    rows: int
    prompts: int
    prompt_width: int
    suffix_width: int
    seed: int
    num_logprobs: int
    backend: str | None


class DecodeGraph:
    """One captured decode step and its static buffers."""

    def __init__(self, key: GraphKey, model, kv_cache, pool, device):
        self.key = key
        rows, i32, i64 = key.rows, torch.int32, torch.int64
        zeros = lambda *shape, dtype: torch.zeros(*shape, dtype=dtype, device=device)  # noqa: E731
        self.tokens_in = zeros(rows, dtype=i64)
        self.positions = zeros(rows, dtype=i64)
        self.live = zeros(rows, dtype=torch.bool)
        self.prompt_tables = zeros(key.prompts, key.prompt_width, dtype=i32)
        self.prompt_lens = zeros(key.prompts, dtype=i32)
        self.problem_ids = zeros(rows, dtype=i32)
        self.suffix_tables = zeros(rows, key.suffix_width, dtype=i32)
        self.suffix_lens = zeros(rows, dtype=i32)
        self.temperature = zeros(rows, dtype=torch.float32)
        self.top_k = zeros(rows, dtype=i32)
        self.top_p = zeros(rows, dtype=torch.float32)
        self.min_p = zeros(rows, dtype=torch.float32)
        self.offsets = zeros(rows, dtype=i64)
        self.block_size = kv_cache.block_size
        self.model, self.kv_cache = model, kv_cache
        self._capture(pool, device)

    def _capture(self, pool, device) -> None:
        # Warm up outside the capture (Triton compiles, cuBLAS picks its kernels), on a side
        # stream as capture requires; then capture on it.
        self.reset_padding()
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            self._step()
        torch.cuda.current_stream(device).wait_stream(stream)
        self.reset_padding()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool, stream=stream):
            self.outputs = self._step()
        torch.cuda.current_stream(device).wait_stream(stream)

    def reset_padding(self) -> None:
        """Every row inert (the state a capture needs, and what padded rows keep). Positions too:
        a cached graph's unused rows would otherwise keep where an earlier call's rows ended,
        which may be past the rotary table."""
        self.live.zero_()
        self.positions.zero_()
        self.tokens_in.zero_()
        self.suffix_lens.fill_(1)
        self.temperature.zero_()
        self.top_k.zero_()
        self.top_p.fill_(1.0)
        self.min_p.zero_()

    def _step(self):
        bs = self.block_size
        index = (self.suffix_lens - 1).to(torch.int64)
        block = self.suffix_tables.gather(1, (index // bs).unsqueeze(1)).squeeze(1).to(torch.int64)
        slots = torch.where(self.live, block * bs + index % bs, -1)
        batch = AttentionBatch(
            "decode", positions=self.positions, slots=slots,
            prompt_block_tables=self.prompt_tables, prompt_lens=self.prompt_lens,
            problem_ids=self.problem_ids, suffix_block_tables=self.suffix_tables,
            suffix_lens=self.suffix_lens, backend=self.key.backend,
        )
        hidden = self.model(self.tokens_in, batch, self.kv_cache)
        logits = self.model.compute_logits(hidden)
        tokens, logprobs, top = ops.sample(
            logits, self.temperature, self.top_k, self.top_p, self.min_p, self.key.seed,
            self.offsets, num_logprobs=self.key.num_logprobs,
        )
        # The next step's inputs (padded rows stay put: their slot is -1 whatever they read).
        self.tokens_in.copy_(tokens)
        step = self.live.to(torch.int64)
        self.positions.add_(step)
        self.suffix_lens.add_(step.to(torch.int32))
        self.offsets.add_(step)
        return tokens, logprobs, top

    def load(self, tokens_in, positions, prompt_tables, prompt_lens, problem_ids, suffix_tables,
             suffix_lens, offsets, sampling) -> None:
        """Write one window's real rows (host lists) into the static buffers."""
        rows, prompts = len(tokens_in), len(prompt_tables)
        device = self.tokens_in.device
        self.reset_padding()
        self.prompt_tables.zero_()
        self.prompt_lens.zero_()
        self.suffix_tables.zero_()
        self.problem_ids.zero_()
        put = lambda buffer, values, dtype: buffer[: len(values)].copy_(  # noqa: E731
            torch.tensor(values, dtype=dtype).to(device, non_blocking=True))
        put(self.tokens_in, tokens_in, torch.int64)
        put(self.positions, positions, torch.int64)
        put(self.offsets, offsets, torch.int64)
        put(self.problem_ids, problem_ids, torch.int32)
        put(self.suffix_lens, suffix_lens, torch.int32)
        put(self.prompt_lens, prompt_lens, torch.int32)
        self.live[:rows] = True
        per_row = list(sampling) if isinstance(sampling, (list, tuple)) else [sampling] * rows
        put(self.temperature, [p.temperature for p in per_row], torch.float32)
        put(self.top_k, [p.top_k for p in per_row], torch.int32)
        put(self.top_p, [p.top_p for p in per_row], torch.float32)
        put(self.min_p, [p.min_p for p in per_row], torch.float32)
        self.prompt_tables[:prompts, : prompt_tables.shape[1]].copy_(prompt_tables)
        self.suffix_tables[:rows, : suffix_tables.shape[1]].copy_(suffix_tables)

    def replay(self):
        self.graph.replay()
        return self.outputs


class DecodeGraphs:
    """The captured decode steps of one model runner, by key, least recently used first out."""

    def __init__(self, model, kv_cache, graph_class=DecodeGraph):
        self.model, self.kv_cache = model, kv_cache
        self.device = model.device
        self.graph_class = graph_class  # a test's stand-in runs the step instead of replaying it
        self.pool = torch.cuda.graph_pool_handle() if self.device.type == "cuda" else None
        self.graphs: OrderedDict[GraphKey, DecodeGraph] = OrderedDict()
        self.captures = 0  # how many steps were captured (a benchmark's check)

    def get(self, key: GraphKey) -> DecodeGraph:
        graph = self.graphs.pop(key, None)
        if graph is None:
            while len(self.graphs) >= MAX_GRAPHS:
                self.graphs.popitem(last=False)
            graph = self.graph_class(key, self.model, self.kv_cache, self.pool, self.device)
            self.captures += 1
        self.graphs[key] = graph
        return graph
