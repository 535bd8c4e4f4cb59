"""An engine's settings: their checks (before a model loads), the default pool sizes, how much
activation memory a decode step's row takes, and whether a step can be captured as a CUDA graph."""

from __future__ import annotations

import numbers

import torch

from ttscale import _checks, backends
from ttscale.engine import memory
from ttscale.errors import InvalidArgument

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
                           max_decode_seqs=None, cpu_threads=None) -> None:
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
    for name, value in (("window", window), ("max_decode_seqs", max_decode_seqs),
                        ("cpu_threads", cpu_threads)):
        if value is not None:
            _checks.check_int(name, value, low=1)
    _checks.check_int("max_batch_tokens", max_batch_tokens, low=1)
    if backend is not None and backend not in backends.BACKENDS:
        raise InvalidArgument(f"backend: expected one of {', '.join(backends.BACKENDS)} or None, "
                              f"got {backend!r}")
    if cuda_graphs is not None and not isinstance(cuda_graphs, bool):
        raise InvalidArgument(f"cuda_graphs: expected True, False or None, got {cuda_graphs!r}")


def graphs_possible(device: torch.device, backend: str | None) -> tuple[bool, str]:
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


def size_pool(model, kv_budget_bytes: int | None, memory_share: float | None, cuda_graphs: bool,
              max_decode_seqs: int | None) -> tuple[memory.Lease | None, int, int | None]:
    """The engine's memory lease (None when the budget is given in bytes, or on the CPU without
    a share), its pool's bytes and the most sequences a decode step runs.

    A lease is all the engine may use: it keeps back what its largest decode step's activations
    take (twice with CUDA graphs: their pool and an eager step's), at most half the lease; a
    step then runs no more sequences than that reserve holds."""
    device = model.device
    if kv_budget_bytes is not None:
        return None, kv_budget_bytes, max_decode_seqs
    if device.type == "cpu" and memory_share is None:
        return None, CPU_KV_BYTES, max_decode_seqs
    lease = memory.lease(device, memory_share, f"the engine of a {model.config.architecture}")
    per_seq = (2 if cuda_graphs else 1) * decode_row_bytes(model.config, model.dtype)
    if max_decode_seqs is not None:
        max_decode_seqs = max(1, min(max_decode_seqs, lease.bytes // 2 // per_seq))
    return lease, lease.bytes - min((max_decode_seqs or 0) * per_seq, lease.bytes // 2), max_decode_seqs


def check_decode_arguments(seqs, sampling, max_new_tokens, confidence_stop) -> list:
    """``Engine.decode``'s arguments; ``max_new_tokens`` as one entry (None or an int) per
    sequence."""
    from ttscale.sampling_params import SamplingParams

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
    if confidence_stop is not None and sampling.logprobs < confidence_stop.top_k:
        raise InvalidArgument(f"sampling: logprobs={sampling.logprobs}, the confidence stop "
                              f"needs its top_k={confidence_stop.top_k}")
    return max_new_tokens


def decode_limits(seqs, sampling, max_new_tokens: list) -> dict:
    """Each sequence's limit of sampled tokens in its life for a decode call:
    ``sampling.max_tokens``, or fewer by its ``max_new_tokens`` entry; a sequence already at
    its limit finishes as "length", the others are unfinished."""
    limits = {}
    for seq, most in zip(seqs, max_new_tokens, strict=True):
        limits[seq] = sampling.max_tokens if most is None else min(sampling.max_tokens,
                                                                   seq.generated + int(most))
        seq.finish_reason = "length" if seq.generated >= limits[seq] else None
    return limits


def check_token_ids(name: str, ids, vocab: int, max_positions: int | None = None) -> list[int]:
    """Token ids as ints, each in the vocabulary ``[0, vocab)``; with ``max_positions``, a
    prompt: not empty and within the model's positions."""
    ids = [int(i) for i in ids]
    bad = next((i for i in ids if not 0 <= i < vocab), None)
    if bad is not None:
        raise InvalidArgument(f"{name}: token id {bad} outside the vocabulary [0, {vocab})")
    if max_positions is not None and not ids:
        raise InvalidArgument(f"{name}: empty prompt")
    if max_positions is not None and len(ids) > max_positions:
        raise InvalidArgument(f"{name}: {len(ids)} tokens, the model serves {max_positions}")
    return ids
