"""Turns the engine's prompts and sequences into model steps: batch tensors, forward, sample.

Every step is described to the model as an :class:`~ttscale.model.AttentionBatch` over the two
KV levels: the prompts touched by the step (their blocks, read once per prompt) and the step's
sequences (their own suffix blocks).
"""

from __future__ import annotations

import torch

from ttscale import ops
from ttscale.engine.confidence import ConfidenceStop, WindowConfidence
from ttscale.engine.pool import Pool
from ttscale.engine.sequence import Prompt, Sequence
from ttscale.engine.thinking import Controls
from ttscale.engine.threads import ThreadGovernor, governed
from ttscale.model import AttentionBatch
from ttscale.sampling_params import SamplingParams


def _read_back(pool: Pool, out_tokens, out_lp, out_stop, out_top, B: int, window: int,
               thinking=None):
    """A window's per-step outputs as per-sequence lists, read with the pool's figures (and the
    thinking rows' states) in the window's one host read."""
    parts = [torch.stack(out_tokens, 1), torch.stack(out_lp, 1), torch.stack(out_stop, 1)]
    if out_top:
        parts += [torch.stack([t[0] for t in out_top], 1), torch.stack([t[1] for t in out_top], 1)]
    if thinking is not None:
        parts.append(thinking.history_tensor())
    host = pool.read_host(parts)
    if thinking is not None:
        thinking.history = host.pop().tolist()
    tokens, logprobs, stopped = (t.tolist() for t in host[:3])
    top = None
    if out_top:
        ids, values = host[3].tolist(), host[4].tolist()
        top = [[list(zip(ids[b][j], values[b][j])) for j in range(window)] for b in range(B)]
    return tokens, logprobs, top, stopped


class ModelRunner:
    def __init__(self, model, kv_cache, *, backend: str | None, max_batch_tokens: int,
                 cuda_graphs: bool = False, cpu_threads: int | None = None,
                 thinking: Controls | None = None, pool: Pool):
        self.model = model
        self.pool = pool  # the block tables and the one host read (engine/pool.py)
        self.thinking = thinking  # the engine's thinking rules (engine/thinking.py)
        self.kv_cache = kv_cache
        self.backend = backend
        self.max_batch_tokens = max_batch_tokens
        self.block_size = kv_cache.block_size
        self.device = model.device
        self.graphs = None
        # on the CPU, each step's thread count, measured (engine/threads.py)
        self.threads = ThreadGovernor(fixed=cpu_threads) if self.device.type == "cpu" else None
        if cuda_graphs:
            from ttscale.engine.graphs import DecodeGraphs

            self.graphs = DecodeGraphs(model, kv_cache)

    def _tensor(self, values, dtype=torch.int64) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype).to(self.device)

    # ------------------------------------------------------------------------------------------
    # Prefill: chunks of known tokens, no sampling.

    @governed("prefill", lambda prompts, start=None: sum(len(p.prompt_ids) for p in prompts))
    def prefill_prompts(self, prompts: list[Prompt],
                        start: dict[Prompt, int] | None = None) -> None:
        """Write each prompt (all but the last token) into its blocks, in chunks, from
        ``start[prompt]`` on (tokens before it are already in its blocks: a prefix-cache hit)."""
        done = {p: (start or {}).get(p, 0) for p in prompts}
        while True:
            chunk, budget = [], self.max_batch_tokens
            for p in prompts:
                left = len(p.prompt_ids) - 1 - done[p]
                if left > 0 and budget > 0:
                    take = min(left, budget)
                    chunk.append((p, take))
                    budget -= take
            if not chunk:
                return
            ids, positions, table_rows = [], [], []
            for p, n in chunk:
                start = done[p]
                ids += p.prompt_ids[start : start + n]
                positions += range(start, start + n)
                table_rows += [p.row] * n
            rows = len(chunk)
            positions_t = self._tensor(positions)
            batch = AttentionBatch(
                "prefill",
                positions=positions_t,
                slots=self.pool.slots(self._tensor(table_rows), positions_t),
                prompt_block_tables=self.pool.gather([p.row for p, _ in chunk]),
                prompt_lens=self._tensor([done[p] + n for p, n in chunk], torch.int32),
                problem_ids=torch.arange(rows, dtype=torch.int32, device=self.device),
                suffix_block_tables=torch.zeros(rows, 1, dtype=torch.int32, device=self.device),
                suffix_lens=torch.zeros(rows, dtype=torch.int32, device=self.device),
                q_lens=self._tensor([n for _, n in chunk], torch.int32),
                backend=self.backend,
            )
            self.model(self._tensor(ids), batch, self.kv_cache, rows=torch.empty(0, dtype=torch.long))
            for p, n in chunk:
                done[p] += n

    def _sequence_batch(self, mode: str, seqs: list[Sequence], q_lens: list[int],
                        positions: list[int], slots: torch.Tensor, suffix_lens: list[int]) -> AttentionBatch:
        prompts: dict[Prompt, int] = {}  # the step's prompts, each with its index in the batch
        for s in seqs:
            prompts.setdefault(s.prompt, len(prompts))
        return AttentionBatch(
            mode,
            positions=self._tensor(positions),
            slots=slots,
            prompt_block_tables=self.pool.gather([p.row for p in prompts]),
            prompt_lens=self._tensor([p.kv_len for p in prompts], torch.int32),
            problem_ids=self._tensor([prompts[s.prompt] for s in seqs], torch.int32),
            suffix_block_tables=self.pool.gather([s.row for s in seqs]),
            suffix_lens=self._tensor(suffix_lens, torch.int32),
            q_lens=self._tensor(q_lens, torch.int32) if mode == "prefill" else None,
            backend=self.backend,
        )

    @governed("prefill", lambda todo, hidden_at=None: sum(n for _, n in todo))
    def prefill_sequences(self, todo: list[tuple[Sequence, int]], hidden_at=None):
        """Feed ``n`` pending tokens of each sequence (slots already reserved).

        ``hidden_at`` optionally maps a sequence to indices (into its ``tokens``) whose final
        hidden states to return, as a dict sequence -> ``[k, H]`` tensor.
        """
        out = {}
        start = 0
        while start < len(todo):
            # Chunk by token count; a single long sequence still runs whole (its own chunk).
            stop, total = start, 0
            while stop < len(todo) and (stop == start or total + todo[stop][1] <= self.max_batch_tokens):
                total += todo[stop][1]
                stop += 1
            chunk = todo[start:stop]
            ids, positions, table_rows, table_positions, rows, owners = [], [], [], [], [], []
            for seq, n in chunk:
                first = seq.kv_len
                for i in range(first, first + n):
                    if hidden_at is not None and i in hidden_at.get(seq, ()):
                        rows.append(len(ids))
                        owners.append(seq)
                    ids.append(seq.tokens[i])
                    positions.append(seq.prompt.kv_len + i)
                table_rows += [seq.row] * n
                table_positions += range(first, first + n)
            slots = self.pool.slots(self._tensor(table_rows), self._tensor(table_positions))
            seqs = [s for s, _ in chunk]
            batch = self._sequence_batch("prefill", seqs, [n for _, n in chunk], positions, slots,
                                         [s.kv_len + n for s, n in chunk])
            hidden = self.model(self._tensor(ids), batch, self.kv_cache, rows=self._tensor(rows))
            for seq in dict.fromkeys(owners):
                out[seq] = hidden[[k for k, o in enumerate(owners) if o is seq]]
            start = stop
        return out

    # ------------------------------------------------------------------------------------------
    # Decode: `window` steps on the device, one read-back.

    @governed("decode", lambda seqs, window, *args, **kwargs: len(seqs) * window)
    def decode_window(self, seqs: list[Sequence], window: int, sampling, seed,
                      offsets: list[int], stop_table: torch.Tensor | None, groups: list[int] | None = None,
                      confidence: list[ConfidenceStop | None] | None = None):
        """Feed each sequence's one pending token, sample, and repeat ``window`` times.

        ``sampling``: one SamplingParams for every row, or a list of one per row (requests with
        different settings share the step). ``seed``: one sampler seed, or one per row (rows of
        each seed are sampled together, so every row draws from its own stream whatever shares
        its step). ``stop_table``: ``[V]`` bool, the stop-string tokens
        of every row; or, with ``groups`` (a group index per row), ``[G, V]``, one table per group.
        End-of-sequence tokens are added per row unless its ``ignore_eos``. ``confidence``: a
        :class:`~ttscale.engine.confidence.ConfidenceStop` per row, or None, stops rows whose
        window of token confidences falls below their threshold (its flag in the stop flags;
        such windows run uncaptured).

        Returns per sequence: its ``window`` sampled tokens, their log-probabilities, their top
        log-probabilities (as many as the most any row asked for, or None), and per token
        whether it is a stop or EOS token (with ``confidence``: the bits of
        :data:`~ttscale.engine.confidence.TOKEN_STOP` and ``CONFIDENCE_STOP``).
        """
        B = len(seqs)
        rows = list(sampling) if isinstance(sampling, (list, tuple)) else [sampling] * B
        seeds = list(seed) if isinstance(seed, (list, tuple)) else [seed] * B
        stop_matrix, group_index = self._stop_matrix(rows, stop_table, groups)
        # rows with a thinking budget or minimum: their state on the device (engine/thinking.py)
        thinking = self.thinking.window(seqs, rows) if self.thinking is not None else None
        if (self.graphs is not None and len(set(seeds)) == 1 and thinking is None
                and not any(confidence or ())):
            # a captured step has one seed and no thinking control or confidence stop
            return self._decode_window_graphed(seqs, window, rows, seeds[0], offsets, stop_matrix,
                                               group_index)
        by_seed: dict[int, list[int]] = {}
        for i, s_ in enumerate(seeds):
            by_seed.setdefault(s_, []).append(i)
        seed_rows = [(s_, None if len(by_seed) == 1 else self._tensor(idx)) for s_, idx in by_seed.items()]
        kv_lens = self._tensor([s.kv_len for s in seqs])
        steps = torch.arange(window, device=self.device)[:, None]
        all_slots = self.pool.slots(self._tensor([s.row for s in seqs]).expand(window, B),
                                    kv_lens[None, :] + steps)  # [window, B]
        base = self._sequence_batch(
            "decode", seqs, [1] * B, [s.context_len - 1 for s in seqs], all_slots[0],
            [s.kv_len + 1 for s in seqs]
        )
        temperature = self._tensor([p.temperature for p in rows], torch.float32)
        top_p = self._tensor([p.top_p for p in rows], torch.float32)
        min_p = self._tensor([p.min_p for p in rows], torch.float32)
        top_k = self._tensor([p.top_k for p in rows], torch.int32)
        num_logprobs = max(p.logprobs for p in rows)
        offsets_t = self._tensor(offsets)
        tokens_in = self._tensor([s.tokens[-1] for s in seqs])
        out_tokens, out_lp, out_stop, out_top = [], [], [], []
        tracker = WindowConfidence.begin(seqs, confidence, self.device, num_logprobs)
        for j in range(window):
            batch = AttentionBatch(
                "decode", positions=base.positions + j, slots=all_slots[j],
                prompt_block_tables=base.prompt_block_tables, prompt_lens=base.prompt_lens,
                problem_ids=base.problem_ids, suffix_block_tables=base.suffix_block_tables,
                suffix_lens=base.suffix_lens + j, plan=base.plan, backend=self.backend,
            )
            hidden = self.model(tokens_in, batch, self.kv_cache)
            logits = self.model.compute_logits(hidden)
            tokens, logprobs, top = self._sample(logits, temperature, top_k, top_p, min_p, seed_rows,
                                                 offsets_t + j, num_logprobs)
            if thinking is not None:  # a forced token replaces the sampled one
                tokens, logprobs = thinking.step(tokens, logprobs, logits)
            out_tokens.append(tokens)
            out_lp.append(logprobs)
            stop = stop_matrix[group_index, tokens]
            out_stop.append(stop if tracker is None else tracker.step(top[1], stop))
            if top is not None:
                out_top.append(top)
            tokens_in = tokens
        if tracker is not None:
            tracker.end()
        result = _read_back(self.pool, out_tokens, out_lp, out_stop, out_top, B, window, thinking)
        if thinking is not None:
            thinking.read_back(seqs)
        return result

    @staticmethod
    def _sample(logits, temperature, top_k, top_p, min_p, seed_rows, offsets, num_logprobs):
        """``ops.sample`` once per seed, each on its rows, put back in row order."""
        if len(seed_rows) == 1:
            return ops.sample(logits, temperature, top_k, top_p, min_p, seed_rows[0][0], offsets,
                              num_logprobs=num_logprobs)
        tokens = torch.empty(logits.shape[0], dtype=torch.int64, device=logits.device)
        logprobs = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
        top = None
        if num_logprobs:
            top = (torch.empty(logits.shape[0], num_logprobs, dtype=torch.int64, device=logits.device),
                   torch.empty(logits.shape[0], num_logprobs, dtype=torch.float32, device=logits.device))
        for seed, idx in seed_rows:
            t, lp, tp = ops.sample(logits[idx], temperature[idx], top_k[idx], top_p[idx], min_p[idx],
                                   seed, offsets[idx], num_logprobs=num_logprobs)
            tokens[idx], logprobs[idx] = t.to(tokens.dtype), lp
            if top is not None:
                top[0][idx], top[1][idx] = tp[0].to(top[0].dtype), tp[1]
        return tokens, logprobs, top

    def _stop_matrix(self, rows: list[SamplingParams], stop_table: torch.Tensor | None,
                     groups: list[int] | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``[G, V]`` stop flags on the device (stop strings' tokens, and EOS where the row's
        settings keep it) and each row's index into it."""
        vocab = self.model.config.vocab_size
        if groups is None:
            groups = [0] * len(rows)
            tables = [torch.zeros(vocab, dtype=torch.bool) if stop_table is None else stop_table.cpu()]
        else:
            tables = list(stop_table.cpu())
        # a group's rows share their stop strings; EOS may differ (ignore_eos), so split on it
        keys: dict[tuple[int, bool], int] = {}
        index = [keys.setdefault((g, p.ignore_eos), len(keys)) for g, p in zip(groups, rows, strict=True)]
        matrix = torch.zeros(max(len(keys), 1), vocab, dtype=torch.bool)
        eos = list(self.model.config.eos_token_ids)
        for (g, ignore_eos), row in keys.items():
            matrix[row] = tables[g]
            if not ignore_eos:
                matrix[row, eos] = True
        return matrix.to(self.device), self._tensor(index)

    def _decode_window_graphed(self, seqs, window, rows, seed, offsets, stop_matrix, group_index):
        """decode_window through a captured step (see :mod:`ttscale.engine.graphs`)."""
        from ttscale.engine.graphs import GraphKey, bucket, width_bucket

        B = len(seqs)
        prompts: dict[Prompt, int] = {}
        for s in seqs:
            prompts.setdefault(s.prompt, len(prompts))
        prompt_tables = self.pool.gather([p.row for p in prompts])
        suffix_tables = self.pool.gather([s.row for s in seqs])
        key = GraphKey(bucket(B), bucket(len(prompts)), width_bucket(prompt_tables.shape[1]),
                       width_bucket(suffix_tables.shape[1]), seed, max(p.logprobs for p in rows),
                       self.backend)
        graph = self.graphs.get(key)
        graph.load(
            tokens_in=[s.tokens[-1] for s in seqs], positions=[s.context_len - 1 for s in seqs],
            prompt_tables=prompt_tables, prompt_lens=[p.kv_len for p in prompts],
            problem_ids=[prompts[s.prompt] for s in seqs], suffix_tables=suffix_tables,
            suffix_lens=[s.kv_len + 1 for s in seqs], offsets=offsets, sampling=rows,
        )
        out_tokens, out_lp, out_top = [], [], []
        for _ in range(window):
            tokens, logprobs, top = graph.replay()
            out_tokens.append(tokens[:B].clone())
            out_lp.append(logprobs[:B].clone())
            if top is not None:
                out_top.append((top[0][:B].clone(), top[1][:B].clone()))
        out_stop = [stop_matrix[group_index, t] for t in out_tokens]
        return _read_back(self.pool, out_tokens, out_lp, out_stop, out_top, B, window)

    def copy_blocks(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        copy_kv_blocks(self.kv_cache, self.backend, src, dst)


def copy_kv_blocks(kv, backend: str | None, src: torch.Tensor, dst: torch.Tensor) -> None:
    """Perform copy-on-write block copies ``src[i] -> dst[i]`` (int32 device tensors, -1 pairs
    skipped) in every layer of the KV cache ``kv`` (``ops.copy_blocks``: one call over the whole
    pool, or one per layer for a pool not allocated as one tensor)."""
    if not src.numel():
        return
    if kv.k_layers is not None:
        ops.copy_blocks(kv.k_layers, kv.v_layers, src, dst, backend=backend)
        return
    for k, v in zip(kv.k, kv.v, strict=True):
        ops.copy_blocks(k, v, src, dst, backend=backend)
