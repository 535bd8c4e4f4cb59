"""The engine: prefill each prompt once, fork sequences that share it, decode them together.

What strategies use::

    problem = engine.add(prompt_ids)             # prefilled once, into its own blocks
    seqs = engine.fork(problem, 16)              # 16 sequences sharing the prompt's KV
    engine.decode(seqs, sampling, stop=["\\n\\n"]) # each runs to a step delimiter, EOS or budget
    kids = engine.fork(seqs[3], 4)               # beams: copy a block table, not a cache
    engine.free(seqs)

Decoding runs in windows of ``window`` steps: the sampled token of one step feeds the next on
the device, stops are detected on the device from a per-token table, and the host reads the
window's tokens once at its end (one synchronisation per window, not per token). Sequences past
their stop inside a window keep computing until it ends; their extra tokens are dropped.
"""

from __future__ import annotations

import functools
import numbers
import threading
import weakref
from collections.abc import Sequence as Seq

import torch

from ttscale import _checks, backends, ops
from ttscale.engine import memory, thinking
from ttscale.engine.block_manager import BlockManager, PoolExhausted
from ttscale.engine.runner import ModelRunner
from ttscale.engine.sequence import Problem, Sequence
from ttscale.engine.stops import TokenTexts, find_stop
from ttscale.errors import InvalidArgument
from ttscale.sampling_params import SamplingParams

# A draw's RNG offset is seq_id * DRAWS_PER_SEQUENCE + its index in the sequence, so a sequence's
# draws depend neither on its batch nor on other sequences.
DRAWS_PER_SEQUENCE = 1 << 24
# A problem with a stream key numbers its sequences key * 2**STREAM_BITS + k, k counting that key's
# sequences since restart_sequence_ids: a search's samples of a problem then depend on the key,
# the seed and that problem's own forks only, not on which problems share its call or its wave.
STREAM_BITS = 16
MAX_STREAM_KEY = 1 << 18  # keeps seq_id * DRAWS_PER_SEQUENCE below 2**63


def _locked(method):
    """Run ``method`` holding the engine's lock."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with self.lock:
            return method(self, *args, **kwargs)

    return wrapper


class Engine:
    """Paged shared-prefix generation over one model and one KV pool.

    Parameters
    ----------
    model : Transformer
        From :func:`ttscale.model.load_model`.
    tokenizer : Tokenizer, optional
        Needed for stop strings and text; not for token ids alone.
    kv_budget_bytes : int, optional
        Bytes for the KV pool. Default: on a GPU, a share of the process's budget for the device
        (``memory_share``); on the CPU 2 GiB.
    memory_share : float, optional
        The share of the device's KV budget (0.9 of its free memory, one budget per process and
        device, see :mod:`ttscale.engine.memory`) this engine leases: e.g. ``POLICY_SHARE`` and
        ``PRM_SHARE`` for a policy beside a PRM. Default: all that other engines left. On the
        CPU a share is taken only when given.
    block_size : int
        Tokens per KV block.
    seed : int
        Default sampling seed.
    window : int, optional
        Decode steps per host synchronisation (default 1 on the CPU, 8 on a GPU).
    max_batch_tokens : int
        Most tokens in one prefill forward pass (longer work is chunked).
    backend : str, optional
        Force an attention backend (``"torch"``, ``"cpu"``, ``"triton"``, ``"cuda"``).
    cuda_graphs : bool, optional
        Replay each decode step from a captured CUDA graph (default: on a CUDA device).
    max_decode_seqs : int, optional
        Most sequences in one decode step (default 4096 on a GPU, where a step's activations
        and logits must fit beside the KV pool, and the matrix products are at full rate long
        before; no limit on the CPU). The rest wait for the next window.
    """

    def __init__(self, model, tokenizer=None, *, kv_budget_bytes: int | None = None,
                 memory_share: float | None = None, block_size: int = 16, seed: int = 0,
                 window: int | None = None, max_batch_tokens: int = 4096,
                 backend: str | None = None, cuda_graphs: bool | None = None,
                 max_decode_seqs: int | None = None):
        check_engine_arguments(kv_budget_bytes=kv_budget_bytes, memory_share=memory_share,
                               block_size=block_size, window=window,
                               max_batch_tokens=max_batch_tokens, backend=backend,
                               cuda_graphs=cuda_graphs, max_decode_seqs=max_decode_seqs)
        self.model = model
        self.tokenizer = tokenizer
        self.seed = seed
        device = model.device
        self.window = int(window) if window is not None else (1 if device.type == "cpu" else 8)
        if max_decode_seqs is None:
            max_decode_seqs = DEFAULT_GPU_DECODE_SEQS if device.type != "cpu" else None
        if backend is not None:  # one the model's forward can run with, named now, not mid-step
            for op in ("write_kv", "paged_prefill_attention", "cascade_decode_attention"):
                backends.resolve(op, device, backend)
        graphs_ok, why_not = _graphs_possible(device, backend)
        if cuda_graphs is None:
            cuda_graphs = graphs_ok
        elif cuda_graphs and not graphs_ok:
            raise InvalidArgument(f"cuda_graphs: {why_not}")
        self.memory_lease: memory.Lease | None = None
        if kv_budget_bytes is None and (device.type != "cpu" or memory_share is not None):
            owner = f"the engine of a {model.config.architecture}"
            self.memory_lease = memory.lease(device, memory_share, owner)
            # The lease is all this engine may use: keep back what its largest decode step's
            # activations take (twice with CUDA graphs: their pool and an eager step's), at most
            # half the lease; a step then runs no more sequences than that reserve holds.
            lease = self.memory_lease.bytes
            per_seq = (2 if cuda_graphs else 1) * decode_row_bytes(model.config, model.dtype)
            if max_decode_seqs is not None:
                max_decode_seqs = max(1, min(max_decode_seqs, lease // 2 // per_seq))
            kv_budget_bytes = lease - min((max_decode_seqs or 0) * per_seq, lease // 2)
        elif kv_budget_bytes is None:
            kv_budget_bytes = CPU_KV_BYTES
        self.max_decode_seqs = max_decode_seqs
        try:
            self.kv_cache = model.allocate_kv_cache(kv_budget_bytes, block_size=block_size)
        except InvalidArgument as error:  # the pool's size came from one of the two arguments
            if self.memory_lease is not None:
                self.memory_lease.release()
            if error.param != "budget_bytes":
                raise
            name = "kv_budget_bytes" if self.memory_lease is None else "memory_share"
            reason = str(error).removeprefix(f"{error.param}: ")
            raise InvalidArgument(f"{name}: {reason}", param=name) from None
        except BaseException:
            if self.memory_lease is not None:
                self.memory_lease.release()
            raise
        if self.memory_lease is not None:  # the share returns when the engine (and pool) goes
            weakref.finalize(self, self.memory_lease.release)
        self.blocks = BlockManager(self.kv_cache.num_blocks, block_size)
        self.thinking = thinking.Controls(tokenizer, model.config.eos_token_ids,
                                          model.config.vocab_size, device)
        self.runner = ModelRunner(model, self.kv_cache, backend=backend,
                                  max_batch_tokens=max_batch_tokens, cuda_graphs=cuda_graphs,
                                  thinking=self.thinking)
        self.eos_token_ids = frozenset(model.config.eos_token_ids)
        self._texts = TokenTexts(lambda i: tokenizer.decode([i], skip_special_tokens=False),
                                 model.config.vocab_size) if tokenizer is not None else None
        # One lock over the pool and the sequences: every method that changes them takes it, and
        # so does a scheduler step, so searches and requests on several threads interleave safely.
        self.lock = threading.RLock()
        self.scheduler = None  # set by the Scheduler that drives this engine, if any
        self._next_problem_id = 0
        self._next_seq_id = 0
        self._stream_forks: dict[int, int] = {}  # sequences numbered per stream key
        # Counters, for cost accounting and benchmarks.
        self.prefilled_tokens = 0
        self.generated_tokens = 0
        self.peak_sequences = 0

    # ------------------------------------------------------------------------------------------
    # Problems and sequences

    def add(self, prompt_ids: Seq[int]) -> Problem:
        """Prefill one prompt (all but its last token, which each sequence feeds itself)."""
        return self.add_many([prompt_ids])[0]

    @_locked
    def add_many(self, prompts: Seq[Seq[int]], cached: Seq[list[int]] | None = None) -> list[Problem]:
        """Prefill several prompts together; each is stored once.

        ``cached``: per prompt, blocks already holding its first full blocks (a prefix cache's
        hit, referenced for this prompt's table); only the rest is prefilled."""
        problems = []
        cached = list(cached) if cached is not None else [[] for _ in prompts]
        for i, prompt in enumerate(prompts):
            ids = self.check_prompt(f"prompts[{i}]", prompt)
            need = self.blocks.blocks_for(len(ids) - 1)
            if need > self.blocks.num_blocks:
                raise PoolExhausted(f"prompts[{i}]: needs {need} KV blocks, the pool has {self.blocks.num_blocks}")
            problems.append(Problem(self._next_problem_id, ids))
            self._next_problem_id += 1
        start = {}
        try:
            for problem, hit in zip(problems, cached, strict=True):
                problem.block_table = list(hit)  # referenced by the caller for this table
                start[problem] = len(hit) * self.blocks.block_size
            for problem in problems:
                problem.block_table += self.blocks.allocate(
                    self.blocks.blocks_for(len(problem.prompt_ids) - 1) - len(problem.block_table))
            self.runner.prefill_prompts(problems, start)
        except BaseException:  # a full pool, an interrupt, a device error: nothing stays held
            for problem in problems:
                self.blocks.free(problem.block_table)
                problem.block_table, problem.freed = [], True
            raise
        for problem in problems:
            problem.kv_len = len(problem.prompt_ids) - 1
            self.prefilled_tokens += problem.kv_len - start[problem]
        return problems

    @_locked
    def fork(self, parent: Problem | Sequence, k: int) -> list[Sequence]:
        """``k`` new sequences sharing ``parent``'s KV (a problem's prompt, or a sequence's path)."""
        if not isinstance(k, int) or k < 0:
            raise InvalidArgument(f"k: expected an integer >= 0, got {k!r}")
        if parent.freed:
            raise InvalidArgument("parent: already freed")
        children = []
        for _ in range(k):
            if isinstance(parent, Problem):
                child = Sequence(self._new_seq_id(parent), parent, [parent.prompt_ids[-1]])
            else:
                child = Sequence(self._new_seq_id(parent.problem), parent.problem,
                                 list(parent.tokens),
                                 self.blocks.fork(parent.block_table), parent.kv_len,
                                 list(parent.logprobs), list(parent.top_logprobs),
                                 list(parent.sampled_at), parent.finish_reason)
                child.thinking = parent.thinking and parent.thinking.copy()
            children.append(child)
        problem = parent if isinstance(parent, Problem) else parent.problem
        problem.num_sequences += k
        problem.live.update(children)
        return children

    @_locked
    def select_and_fork(self, candidates: Seq[Sequence], scores: Seq[float], group_sizes: Seq[int],
                        keep: int | Seq[int], children: int | Seq[int]) -> tuple[list[Sequence], list[int], list[int]]:
        """One search step's selection through the on-device ``ops.select_and_fork``.

        Candidates come in consecutive groups (``group_sizes``, e.g. one per problem); each
        group keeps its ``keep`` best by score (ties to the earlier candidate, NaN last) and
        forks each kept one into ``children`` sequences (an int, or one per group). Every
        candidate is consumed: a kept candidate's first child is its own sequence (its id, and so
        its future random draws, carry on), its other children are new sequences sharing its
        blocks, and every other candidate is freed.

        Returns the children, each child's parent (an index into ``candidates``), and the
        children's group offsets (``[G + 1]``).
        """
        from ttscale.block_pool import BlockPool
        from ttscale.engine.block_manager import CopyOnWrite

        self._check_live(candidates)
        if len(scores) != len(candidates) or sum(group_sizes) != len(candidates):
            raise InvalidArgument(
                f"scores/group_sizes: expected {len(candidates)} scores and group sizes summing to it, "
                f"got {len(scores)} scores and sizes summing to {sum(group_sizes)}", param="scores"
            )
        device = self.model.device
        int32 = dict(dtype=torch.int32, device=device)
        bm = self.blocks
        for seq in candidates:
            bm.trim(seq.block_table, seq.kv_len)
        width = max([len(s.block_table) for s in candidates] + [1])
        tables = torch.full((len(candidates), width), -1, dtype=torch.int32)
        for row, seq in enumerate(candidates):
            tables[row, : len(seq.block_table)] = torch.tensor(seq.block_table, dtype=torch.int32)
        free = torch.zeros(bm.num_blocks, dtype=torch.int32)
        free[: bm.num_free] = torch.tensor(bm.free_stack, dtype=torch.int32)
        pool = BlockPool(torch.tensor(bm.ref_counts, **int32), free.to(device),
                         torch.tensor([bm.num_free], **int32), torch.zeros(1, **int32), bm.block_size)
        offsets = [0]
        for size in group_sizes:
            offsets.append(offsets[-1] + size)
        bounds = {}
        if not isinstance(keep, int):
            bounds["max_keep"] = max(list(keep) + [0])
            keep = torch.tensor(list(keep), **int32)
        if not isinstance(children, int):
            bounds["max_children"] = max(list(children) + [0])
            children = torch.tensor(list(children), **int32)
        result = ops.select_and_fork(
            torch.tensor(list(scores), dtype=torch.float32, device=device), torch.tensor(offsets, **int32),
            keep, children, tables.to(device), torch.tensor([s.kv_len for s in candidates], **int32), pool,
            **bounds,
        )
        # The pool's new state becomes the host's (one read-back per search step).
        top = int(pool.free_top)
        bm.ref_counts = pool.ref_counts.tolist()
        bm.free_stack = pool.free_stack[:top].tolist()
        child_offsets = result.child_offsets.tolist()
        num_children = child_offsets[-1]
        parents = result.parents[:num_children].tolist()
        lens = result.lens[:num_children].tolist()
        child_tables = result.block_tables[:num_children].tolist()
        pairs = [CopyOnWrite(src, dst) for src, dst in zip(result.copy_src.tolist(), result.copy_dst.tolist())
                 if src >= 0]
        self.runner.copy_blocks(pairs)
        kids, continuing = [], set()
        for slot, p in enumerate(parents):
            parent = candidates[p]
            kv_len = lens[slot]  # shorter than the parent's only if the pool ran out: re-prefilled
            table = child_tables[slot][: bm.blocks_for(kv_len)]
            if p not in continuing:  # the first child carries on as the candidate itself
                continuing.add(p)
                parent.block_table, parent.kv_len = table, kv_len
                kids.append(parent)
                continue
            kid = Sequence(self._new_seq_id(parent.problem), parent.problem, list(parent.tokens),
                           table, kv_len, list(parent.logprobs), list(parent.top_logprobs),
                           list(parent.sampled_at), parent.finish_reason)
            kid.thinking = parent.thinking and parent.thinking.copy()
            kid.problem.num_sequences += 1
            kid.problem.live.add(kid)
            kids.append(kid)
        for p, seq in enumerate(candidates):
            if p not in continuing:
                seq.block_table = []
                seq.freed = True
                seq.problem.num_sequences -= 1
                seq.problem.live.discard(seq)
        return kids, parents, child_offsets

    @_locked
    def extend(self, seq: Sequence, token_ids: Seq[int]) -> None:
        """Append tokens to a sequence (text the caller inserts); they are prefilled at its next step."""
        self._check_live([seq])
        seq.tokens.extend(self._check_ids("token_ids", token_ids))
        seq.finish_reason = None

    @_locked
    def drop_last_sample(self, seq: Sequence) -> None:
        """Take back a sequence's last sampled token while it is still pending (not yet in the KV
        cache), as if it had never been sampled: a revision drops the end-of-sequence token that
        closed an attempt before appending the text that introduces the next one. The next draw
        takes its place in the sequence's random stream."""
        self._check_live([seq])
        if not seq.pending or not seq.sampled_at or seq.sampled_at[-1] != len(seq.tokens) - 1:
            raise InvalidArgument(f"seq: sequence {seq.seq_id}'s last token is not a pending sample")
        seq.tokens.pop()
        seq.sampled_at.pop()
        seq.logprobs.pop()
        if len(seq.top_logprobs) > len(seq.sampled_at):
            seq.top_logprobs.pop()
        thinking.drop_last(seq)
        seq.finish_reason = None

    @_locked
    def free(self, seqs: Seq[Sequence]) -> None:
        """Release sequences' blocks; their tokens stay readable."""
        for seq in seqs:
            if not seq.freed:
                self.blocks.free(seq.block_table)
                seq.freed = True
                seq.problem.num_sequences -= 1
                seq.problem.live.discard(seq)

    @_locked
    def free_problem(self, problem: Problem) -> None:
        """Release a prompt's blocks once none of its sequences is live."""
        if problem.num_sequences:
            raise InvalidArgument(f"problem: {problem.num_sequences} of its sequences are still live")
        if not problem.freed:
            self.blocks.free(problem.block_table)
            problem.freed = True

    @property
    def next_sequence_number(self) -> int:
        """The number the next sequence of a problem without a stream key gets."""
        return self._next_seq_id

    def number_sequences_from(self, start: int) -> None:
        """Number the next sequences of problems without a stream key from ``start`` on."""
        self._next_seq_id = start

    def restart_sequence_ids(self) -> None:
        """Number the next sequences from 0 again.

        A draw's random stream derives from its sequence's id, so a search that restarts the
        numbering and uses the same seed draws the same samples on every run. Sequences still
        live keep their ids (a new one may share a number, and so a stream, with one of them).
        """
        self._next_seq_id = 0
        self._stream_forks.clear()

    def _new_seq_id(self, problem: Problem) -> int:
        """The next sequence's number: by the problem's stream key when it has one (beyond
        2**STREAM_BITS sequences of one key they run into the next key's numbers)."""
        key = problem.stream_key
        if key is None:
            self._next_seq_id += 1
            return self._next_seq_id - 1
        if not 0 <= key < MAX_STREAM_KEY:
            raise InvalidArgument(f"problem: stream key {key} outside [0, {MAX_STREAM_KEY})")
        counters = problem.stream_counters if problem.stream_counters is not None else self._stream_forks
        k = counters.get(key, 0)
        counters[key] = k + 1
        return (key << STREAM_BITS) + k

    def text(self, seq: Sequence) -> str:
        """The sequence's text after the prompt."""
        if self.tokenizer is None:
            raise InvalidArgument("text: the engine has no tokenizer")
        return self.tokenizer.decode(seq.output_ids)

    # ------------------------------------------------------------------------------------------
    # Running

    @_locked
    def run_pending(
        self, seqs: Seq[Sequence], keep_last: bool = False,
        hidden_at: dict[Sequence, Seq[int]] | None = None,
    ) -> dict[Sequence, torch.Tensor]:
        """Put sequences' pending tokens into the KV cache without sampling (all but the last
        one each when ``keep_last``).

        ``hidden_at`` maps a sequence to indices (into its ``tokens``, among those run now) whose
        final hidden states to return, as a dict sequence -> ``[k, H]`` (a PRM's step tags).
        """
        self._check_live(seqs)
        todo = [(s, s.pending - keep_last) for s in seqs if s.pending - keep_last > 0]
        if not todo:
            return {}
        self._reserve([s for s, _ in todo], [n for _, n in todo])
        hidden = self.runner.prefill_sequences(todo, hidden_at=hidden_at)
        for seq, n in todo:
            seq.kv_len += n
            seq.prefilled += n
            self.prefilled_tokens += n
        return hidden

    def decode(self, seqs: Seq[Sequence], sampling: SamplingParams, *, stop: Seq[str] | None = None,
               max_new_tokens: int | Seq[int] | None = None) -> None:
        """Sample each sequence until it stops; ``seq.finish_reason`` says why.

        A sequence stops at a token whose text contains a stop string (``stop``, else
        ``sampling.stop``; the token is kept), at an end-of-sequence token (unless
        ``sampling.ignore_eos``), after ``max_new_tokens`` new tokens in this call (one number
        for all, or one per sequence), or at ``sampling.max_tokens`` sampled tokens in its life.
        """
        if not isinstance(sampling, SamplingParams):
            raise InvalidArgument(f"sampling: expected SamplingParams, got {type(sampling).__name__}")
        if not isinstance(max_new_tokens, (list, tuple)):
            max_new_tokens = [max_new_tokens] * len(seqs)
        elif len(max_new_tokens) != len(seqs):
            raise InvalidArgument(f"max_new_tokens: expected one per sequence ({len(seqs)}), "
                             f"got {len(max_new_tokens)}")
        for i, n in enumerate(max_new_tokens):
            if n is not None and (not isinstance(n, numbers.Integral) or isinstance(n, bool)
                                  or n < 1):
                where = "" if len(set(max_new_tokens)) == 1 else f" at {i}"
                raise InvalidArgument(f"max_new_tokens: expected an int >= 1, got {n!r}{where}")
        stops = tuple(stop) if stop is not None else sampling.stop_strings
        self.thinking.control(sampling)  # its texts in this model's tokens, or an error naming one
        if stops and self._texts is None:
            raise InvalidArgument("stop: stop strings need a tokenizer")
        self._check_live(seqs)
        limits = {}
        for seq, most in zip(seqs, max_new_tokens, strict=True):
            limit = sampling.max_tokens
            if most is not None:
                limit = min(limit, seq.generated + int(most))
            limits[seq] = limit
            seq.finish_reason = "length" if seq.generated >= limit else None
        active = [s for s in seqs if s.finish_reason is None]
        if self.scheduler is not None and active:
            # one piece of work for the scheduler: these rows join the steps every other request
            # and search runs, and this thread drives steps until they stop
            seed = sampling.seed if sampling.seed is not None else self.seed
            self.scheduler.run_decode(active, sampling, stops, limits, seed)
            return
        while active:
            active = self.step(active, sampling, stops, limits)

    @_locked
    def step(self, active: list[Sequence], sampling: SamplingParams, stops: tuple[str, ...],
             limits: dict[Sequence, int]) -> list[Sequence]:
        """Advance the sequences that fit in the pool by one window; return those still running."""
        self.run_pending(active, keep_last=True)
        admitted = self._admit(active, [min(self.window, limits[s] - s.generated) for s in active])
        self.peak_sequences = max(self.peak_sequences, len(admitted))
        window = min(min(limits[s] - s.generated for s in admitted), self.window)
        stop_table = self._texts.table(stops) if stops else None
        seed = sampling.seed if sampling.seed is not None else self.seed
        offsets = [s.seq_id * DRAWS_PER_SEQUENCE + s.generated for s in admitted]
        tokens, logprobs, top, stopped = self.runner.decode_window(
            admitted, window, sampling, seed, offsets, stop_table
        )
        for i, seq in enumerate(admitted):
            self._accept(seq, tokens[i], logprobs[i], None if top is None else top[i], stopped[i],
                         stops, limits[seq])
        return [s for s in active if s.finish_reason is None]

    # ------------------------------------------------------------------------------------------

    def _accept(self, seq: Sequence, tokens, logprobs, top, stopped, stops, limit) -> None:
        """Take a window's samples up to the first stop; the stopping token stays pending."""
        n = len(tokens)
        if not stops and not any(stopped) and seq.generated + n < limit:
            # Nothing can stop inside this window (no stop strings, no flagged token, the limit
            # beyond it): take it whole, without a Python step per token.
            start = len(seq.tokens)
            seq.tokens.extend(tokens)
            seq.sampled_at.extend(range(start, start + n))
            seq.logprobs.extend(logprobs)
            if top is not None:
                seq.top_logprobs.extend(top)
            self.generated_tokens += n
            seq.kv_len += n
            thinking.accept(seq, n)
            return
        fed = 0
        for j, token in enumerate(tokens):
            seq.tokens.append(token)
            seq.sampled_at.append(len(seq.tokens) - 1)
            seq.logprobs.append(logprobs[j])
            if top is not None:
                seq.top_logprobs.append(top[j])
            self.generated_tokens += 1
            fed = j + 1  # this window fed the pending token and the first j samples
            reason = self._stop_reason(seq, token, stopped[j], stops, limit)
            if reason is not None:
                seq.finish_reason = reason
                break
        seq.kv_len += fed
        thinking.accept(seq, fed)
        self.blocks.trim(seq.block_table, seq.kv_len)

    def _stop_reason(self, seq: Sequence, token: int, flagged: bool, stops, limit) -> str | None:
        """Why the sequence stops at ``token`` (flagged on the device: a stop or EOS token)."""
        if flagged:
            return "eos" if token in self.eos_token_ids and not self._in_stop_table(token, stops) else "stop"
        if stops:
            # A stop string split across tokens: look for one ending inside this token's text,
            # in the text after the prompt (tokens[0] is the prompt's last token). A token has a
            # character or more (8 spare for byte pieces), so the longest stop string fits.
            longest = max(map(len, stops))
            tail = self.tokenizer.decode(seq.tokens[max(1, len(seq.tokens) - longest - 8):],
                                         skip_special_tokens=False)
            start = len(tail) - len(self._texts.all()[token]) - longest + 1
            if find_stop(tail, stops, max(0, start)) is not None:
                return "stop"
        if seq.generated >= limit:
            return "length"
        return None

    def _in_stop_table(self, token: int, stops) -> bool:
        return bool(stops) and bool(self._texts.table(stops)[token])

    def _admit(self, active: list[Sequence], steps: list[int]) -> list[Sequence]:
        """Reserve KV slots for each sequence's next window, in order, while the pool lasts."""
        admitted, copies = [], []
        limit = len(active) if self.max_decode_seqs is None else self.max_decode_seqs
        for seq, n in zip(active[:limit], steps):
            try:
                copies += self.blocks.reserve(seq.block_table, seq.kv_len, n)
            except PoolExhausted:
                break
            admitted.append(seq)
        if not admitted:
            seq = active[0]
            need = self.blocks.blocks_needed(seq.block_table, seq.kv_len, steps[0])
            raise PoolExhausted(
                f"no sequence fits: the next needs {need} free KV blocks, {self.blocks.num_free} of "
                f"{self.blocks.num_blocks} are free ({seq.context_len} tokens so far); free finished "
                f"sequences or give the engine a larger kv_budget_bytes"
            )
        self.runner.copy_blocks(copies)
        return admitted

    def _reserve(self, seqs: list[Sequence], counts: list[int]) -> None:
        copies = []
        for seq, n in zip(seqs, counts):
            copies += self.blocks.reserve(seq.block_table, seq.kv_len, n)
        self.runner.copy_blocks(copies)

    def check_prompt(self, name: str, prompt: Seq[int]) -> list[int]:
        """A prompt's ids as ints: in the vocabulary, not empty, within the model's positions."""
        ids = self._check_ids(name, prompt)
        if not ids:
            raise InvalidArgument(f"{name}: empty prompt")
        if len(ids) > self.model.max_positions:
            raise InvalidArgument(
                f"{name}: {len(ids)} tokens, the model serves {self.model.max_positions}")
        return ids

    def _check_ids(self, name: str, ids: Seq[int]) -> list[int]:
        ids = [int(i) for i in ids]
        vocab = self.model.config.vocab_size
        bad = next((i for i in ids if not 0 <= i < vocab), None)
        if bad is not None:
            raise InvalidArgument(f"{name}: token id {bad} outside the vocabulary [0, {vocab})")
        return ids

    @staticmethod
    def _check_live(seqs: Seq[Sequence]) -> None:
        for seq in seqs:
            if seq.freed:
                raise InvalidArgument(f"seqs: sequence {seq.seq_id} was freed")


CPU_KV_BYTES = 2 << 30  # the CPU pool when no budget is given
DEFAULT_GPU_DECODE_SEQS = 4096  # most sequences in a GPU decode step (see Engine)


def decode_row_bytes(config, dtype: torch.dtype) -> int:
    """Activation bytes one sequence of a decode step takes at its peak: its logits in the
    model's dtype plus 8 bytes a vocabulary entry for the sampler and what else a step keeps
    around, the MLP's intermediate and a few hidden-size vectors in float32.

    Sized from a measurement, not only from a count of tensors: on an H100 (Llama-3.2-1B shape,
    bf16, 4,096 sequences a step) the captured steps held 6.1 GB and the next eager step failed
    to get 1 GB more with no reserve; with this estimate (twice: 11.4 GB) the run completed."""
    size = torch.empty((), dtype=dtype).element_size()
    return (config.vocab_size * (size + 8) + 3 * config.intermediate_size * size
            + 8 * config.hidden_size * 4)


BLOCK_SIZES = (8, 16, 32, 64, 128)  # what the attention kernels take


def check_engine_arguments(*, kv_budget_bytes=None, memory_share=None, block_size=16,
                           window=None, max_batch_tokens=4096, backend=None, cuda_graphs=None,
                           max_decode_seqs=None) -> None:
    """The engine's arguments, checked before a model is loaded for it (by ``LLM`` and ``PRM``)
    or a pool allocated; what needs the device (a backend's kernels, graphs) is checked later."""
    if kv_budget_bytes is not None:
        _checks.check_int("kv_budget_bytes", kv_budget_bytes, low=1)
    if memory_share is not None and not (
            _checks.check_real("memory_share", memory_share) > 0 and memory_share <= 1):
        raise InvalidArgument(f"memory_share: expected a fraction in (0, 1], got {memory_share!r}")
    if kv_budget_bytes is not None and memory_share is not None:
        raise InvalidArgument("memory_share: give kv_budget_bytes or memory_share, not both")
    if _checks.check_int("block_size", block_size) not in BLOCK_SIZES:
        raise InvalidArgument(f"block_size: expected a power of two from 8 to 128, got {block_size!r}")
    for name, value in (("window", window), ("max_decode_seqs", max_decode_seqs)):
        if value is not None:
            _checks.check_int(name, value, low=1)
    _checks.check_int("max_batch_tokens", max_batch_tokens, low=1)
    if backend is not None and backend not in backends.BACKENDS:
        raise InvalidArgument(f"backend: expected one of {', '.join(backends.BACKENDS)} or None, "
                              f"got {backend!r}")
    if cuda_graphs is not None and not isinstance(cuda_graphs, bool):
        raise InvalidArgument(f"cuda_graphs: expected True, False or None, got {cuda_graphs!r}")


def _graphs_possible(device: torch.device, backend: str | None) -> tuple[bool, str]:
    """Whether a decode step can be captured on ``device`` with ``backend``, and why not."""
    if device.type != "cuda":
        return False, f"the model is on {device}, not a CUDA device"
    if _checks.DEBUG:
        return False, "TTSCALE_DEBUG=1 checks values on the host, which a captured step cannot"
    for op, requested in (("cascade_decode_attention", backend), ("write_kv", backend),
                          ("sample", None)):
        try:
            chosen = backends.resolve(op, device, requested)
        except ValueError as error:
            return False, f"{op}: {error}"
        if chosen == "torch":
            return False, f"the torch backend of {op} reads values on the host"
    return True, ""


def default_kv_budget(device: torch.device) -> int:
    """What a lone engine's pool gets: the device's whole KV budget (see
    :mod:`ttscale.engine.memory`) on a GPU, 2 GiB on the CPU. Takes no lease."""
    if device.type == "cpu":
        return CPU_KV_BYTES
    budget = memory.device_budget(device)
    return int(budget.fraction * memory.free_memory(budget.device))


__all__ = ["Engine", "PoolExhausted", "default_kv_budget", "ops"]
