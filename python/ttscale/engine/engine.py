"""The engine: prefill each prompt once, fork sequences that share it, decode them together.

What strategies use::

    prompt = engine.add(prompt_ids)              # prefilled once, into its own blocks
    seqs = engine.fork(prompt, 16)               # 16 sequences sharing the prompt's KV
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
import weakref
from collections.abc import Sequence as Seq

import torch

from ttscale import backends, ops
from ttscale.engine import forking, thinking
from ttscale.engine.confidence import ConfidenceStop
from ttscale.engine.fair_lock import engine_lock
from ttscale.engine.pool import Pool
from ttscale.engine.runner import ModelRunner, copy_kv_blocks
from ttscale.engine.sequence import (
    MAX_STREAM_KEY,
    STREAM_BITS,
    Prompt,
    Sequence,
    copy_sequence,
    keyed_seq_id,
)
from ttscale.engine.settings import (
    DEFAULT_GPU_DECODE_SEQS,
    check_engine_arguments,
    check_token_ids,
    default_kv_budget,
    graphs_possible,
    size_pool,
)
from ttscale.engine.stops import StopRules
from ttscale.errors import InvalidArgument, PoolExhausted
from ttscale.sampling_params import SamplingParams


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
    cpu_threads : int, optional
        On the CPU, the threads every step runs on. Default: chosen by measuring, up to torch's
        thread count, so that on cores shared with other work a step does not wait at every
        barrier for a descheduled thread (:mod:`ttscale.engine.threads`).
    """

    def __init__(self, model, tokenizer=None, *, kv_budget_bytes: int | None = None,
                 memory_share: float | None = None, block_size: int = 16, seed: int = 0,
                 window: int | None = None, max_batch_tokens: int = 4096,
                 backend: str | None = None, cuda_graphs: bool | None = None,
                 max_decode_seqs: int | None = None, cpu_threads: int | None = None):
        check_engine_arguments(kv_budget_bytes=kv_budget_bytes, memory_share=memory_share,
                               block_size=block_size, window=window,
                               max_batch_tokens=max_batch_tokens, backend=backend,
                               cuda_graphs=cuda_graphs, max_decode_seqs=max_decode_seqs,
                               cpu_threads=cpu_threads)
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
        graphs_ok, why_not = graphs_possible(device, backend)
        if cuda_graphs is None:
            cuda_graphs = graphs_ok
        elif cuda_graphs and not graphs_ok:
            raise InvalidArgument(f"cuda_graphs: {why_not}")
        self.memory_lease, kv_budget_bytes, self.max_decode_seqs = size_pool(
            model, kv_budget_bytes, memory_share, cuda_graphs, max_decode_seqs)
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
        # the pool's one owner: counts, free stack and tables on the model's device
        self.pool = Pool(self.kv_cache.num_blocks, block_size, device)
        self.thinking = thinking.Controls(tokenizer, model.config.eos_token_ids,
                                          model.config.vocab_size, device)
        self.runner = ModelRunner(model, self.kv_cache, backend=backend,
                                  max_batch_tokens=max_batch_tokens, cuda_graphs=cuda_graphs,
                                  cpu_threads=cpu_threads, thinking=self.thinking,
                                  pool=self.pool)
        # the pool copies through the cache itself, not the runner: no cycle keeps either alive
        self.pool.copy_blocks = functools.partial(copy_kv_blocks, self.kv_cache, backend)
        self.eos_token_ids = frozenset(model.config.eos_token_ids)
        self.stops = StopRules(tokenizer, model.config.eos_token_ids, model.config.vocab_size)
        # One lock over the pool and the sequences: every method that changes them takes it, and
        # so does a scheduler step, so searches and requests on several threads interleave safely;
        # blocking takes go in the order they asked (a thread driving steps cannot starve others).
        self.lock = engine_lock()
        # the Scheduler that drives this engine, if any, held weakly: the scheduler holds the
        # engine, and without a cycle a dropped LLM gives its KV pool back at once, not at the
        # garbage collector's next full pass
        self._scheduler = None
        self._next_prompt_id = 0
        self._next_seq_id = 0
        self._stream_forks: dict[int, int] = {}  # sequences numbered per stream key
        # Counters, for cost accounting and benchmarks.
        self.prefilled_tokens = 0
        self.generated_tokens = 0
        self.peak_sequences = 0

    @property
    def scheduler(self):
        return self._scheduler() if self._scheduler is not None else None

    @scheduler.setter
    def scheduler(self, scheduler) -> None:
        self._scheduler = weakref.ref(scheduler) if scheduler is not None else None

    # ------------------------------------------------------------------------------------------
    # Prompts and sequences

    def add(self, prompt_ids: Seq[int]) -> Prompt:
        """Prefill one prompt (all but its last token, which each sequence feeds itself)."""
        return self.add_many([prompt_ids])[0]

    @_locked
    def add_many(self, prompts: Seq[Seq[int]], cached: Seq[torch.Tensor | None] | None = None,
                 ) -> list[Prompt]:
        """Prefill several prompts together; each is stored once.

        ``cached``: per prompt, None or the device ids of blocks already holding its first full
        blocks (a prefix cache's hit, referenced for this prompt's table); only the rest is
        prefilled."""
        pool, added = self.pool, []
        cached = list(cached) if cached is not None else [None] * len(prompts)
        for i, prompt in enumerate(prompts):
            ids = self.check_prompt(f"prompts[{i}]", prompt)
            need = pool.blocks_for(len(ids) - 1)
            if need > pool.num_blocks:
                raise PoolExhausted(
                    f"prompts[{i}]: needs {need} KV blocks, the pool has {pool.num_blocks}")
            added.append(Prompt(self._next_prompt_id, ids))
            self._next_prompt_id += 1
        rows = pool.new_rows(len(added))
        start = {}
        try:
            for prompt, row, hit in zip(added, rows, cached, strict=True):
                prompt.row = row
                pool.set_prefix(row, hit if hit is not None else torch.empty(0))
                start[prompt] = pool.used[row] * pool.block_size
            pool.reserve_all(rows, [start[p] for p in added],
                             [len(p.prompt_ids) - 1 - start[p] for p in added])
            self.runner.prefill_prompts(added, start)
        except BaseException:  # a full pool, an interrupt, a device error: nothing stays held
            pool.release(rows)
            for prompt in added:
                prompt.row, prompt.freed = None, True
            raise
        for prompt in added:
            prompt.kv_len = len(prompt.prompt_ids) - 1
            self.prefilled_tokens += prompt.kv_len - start[prompt]
        return added

    @_locked
    def fork(self, parent: Prompt | Sequence, k: int) -> list[Sequence]:
        """``k`` new sequences sharing ``parent``'s KV (a prompt, or a sequence's path)."""
        if not isinstance(k, int) or k < 0:
            raise InvalidArgument(f"k: expected an integer >= 0, got {k!r}")
        if parent.freed:
            raise InvalidArgument("parent: already freed")
        children = []
        pool = self.pool
        rows = pool.new_rows(k) if isinstance(parent, Prompt) else pool.fork(parent.row, k)
        for row in rows:
            if isinstance(parent, Prompt):
                child = Sequence(self._new_seq_id(parent), parent, [parent.prompt_ids[-1]], row)
            else:
                child = copy_sequence(parent, self._new_seq_id(parent.prompt), row)
            children.append(child)
        prompt = parent if isinstance(parent, Prompt) else parent.prompt
        prompt.num_sequences += k
        prompt.live.update(children)
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
        self._check_live(candidates)
        return forking.select_and_fork(self, candidates, scores, group_sizes, keep, children)

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
        live = list(dict.fromkeys(s for s in seqs if not s.freed))
        self.pool.release([s.row for s in live])
        for seq in live:
            seq.row, seq.freed = None, True
            seq.prompt.num_sequences -= 1
            seq.prompt.live.discard(seq)

    @_locked
    def free_prompt(self, prompt: Prompt) -> None:
        """Release a prompt's blocks once none of its sequences is live."""
        if prompt.num_sequences:
            raise InvalidArgument(f"prompt: {prompt.num_sequences} of its sequences are still live")
        if not prompt.freed:
            self.pool.release([prompt.row])
            prompt.row, prompt.freed = None, True

    def _new_seq_id(self, prompt: Prompt) -> int:
        """The next sequence's number: by the prompt's stream key when it has one."""
        if prompt.stream_key is not None:
            return keyed_seq_id(prompt, self._stream_forks)
        self._next_seq_id += 1
        return self._next_seq_id - 1

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
        self.pool.reserve_all([s.row for s, _ in todo], [s.kv_len for s, _ in todo],
                              [n for _, n in todo])
        hidden = self.runner.prefill_sequences(todo, hidden_at=hidden_at)
        for seq, n in todo:
            seq.kv_len += n
            seq.prefilled += n
            self.prefilled_tokens += n
        return hidden

    def decode(self, seqs: Seq[Sequence], sampling: SamplingParams, *, stop: Seq[str] | None = None,
               max_new_tokens: int | Seq[int] | None = None,
               confidence_stop: ConfidenceStop | None = None) -> None:
        """Sample each sequence until it stops; ``seq.finish_reason`` says why.

        A sequence stops at a token whose text contains a stop string (``stop``, else
        ``sampling.stop``; the token is kept), at an end-of-sequence token (unless
        ``sampling.ignore_eos``), after ``max_new_tokens`` new tokens in this call (one number
        for all, or one per sequence), or at ``sampling.max_tokens`` sampled tokens in its life.
        ``confidence_stop`` (:class:`~ttscale.engine.confidence.ConfidenceStop`) also stops the
        sequences it watches, on the device, where their confidence falls below their threshold
        (finish reason ``"confidence"``); it needs ``sampling.logprobs >= confidence_stop.top_k``.

        The rows run as the scheduler's work (:meth:`Scheduler.decode`), beside every request and
        search on this engine; an engine without one (not made by an ``LLM``) gets a scheduler of
        its own for the call.
        """
        scheduler = self.scheduler
        if scheduler is None:
            from ttscale.engine.scheduler import Scheduler  # it builds on this module

            scheduler = Scheduler(self, prefix_caching=False, attach=False)
        scheduler.decode(seqs, sampling, stop=stop, max_new_tokens=max_new_tokens,
                         confidence_stop=confidence_stop)

    # ------------------------------------------------------------------------------------------

    def _accept(self, seq: Sequence, tokens, logprobs, top, stopped, stops, limit) -> None:
        """Take a window's samples up to the first stop; the stopping token stays pending."""
        taken, fed = self.stops.take_window(seq, tokens, logprobs, top, stopped, stops, limit)
        self.generated_tokens += taken
        seq.kv_len += fed
        thinking.accept(seq, fed)
        self.pool.trim(seq.row, seq.kv_len)

    def check_prompt(self, name: str, prompt: Seq[int]) -> list[int]:
        """A prompt's ids as ints: in the vocabulary, not empty, within the model's positions."""
        return check_token_ids(name, prompt, self.model.config.vocab_size,
                               self.model.max_positions)

    def _check_ids(self, name: str, ids: Seq[int]) -> list[int]:
        return check_token_ids(name, ids, self.model.config.vocab_size)

    @staticmethod
    def _check_live(seqs: Seq[Sequence]) -> None:
        for seq in seqs:
            if seq.freed:
                raise InvalidArgument(f"seqs: sequence {seq.seq_id} was freed")


__all__ = ["MAX_STREAM_KEY", "STREAM_BITS", "Engine", "PoolExhausted", "default_kv_budget", "ops"]
