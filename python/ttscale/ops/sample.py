"""``sample``: one token per row, reproducible from (seed, offset), with log-probabilities."""

from __future__ import annotations

import torch
from torch import Tensor

from ttscale import backends
from ttscale._checks import (
    FLOAT_DTYPES,
    check_tensor,
    check_values,
)
from ttscale.errors import InvalidArgument
from ttscale.ops import dispatch

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
            raise InvalidArgument(f"{name}: expected {want}, got {values[row].item()} at row {row}")
    if bool(torch.isfinite(logits.sum(dtype=torch.float32))):
        return  # no NaN or infinity anywhere: one pass
    row_max = logits.amax(dim=1)  # NaN propagates: one pass finds every bad row
    row = _first_bad_row(torch.isnan(row_max) | torch.isposinf(row_max))
    if row is not None:
        raise InvalidArgument(f"logits: row {row} contains NaN or +inf")
    row = _first_bad_row(torch.isneginf(row_max))
    if row is not None:
        raise InvalidArgument(f"logits: row {row} is all -inf (no token can be drawn)")


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

    The draw is Gumbel-max: the kept token with the largest key ``(x - max x) + g`` wins, where
    ``g`` is Gumbel noise from a counter-based hash of ``(seed, offsets[b], token)``
    (:func:`ttscale.reference.sampling_uniforms`; every backend computes the same bits). A
    row's token therefore depends only on its own logits, parameters, seed and offset, never on
    its batch. Backends agree on the token except when two kept tokens' keys ``(x - max x) + g``
    lie within a few float32 rounding errors, or a token's mass sits within rounding of a top-p
    threshold: an estimated one row in a million (none in 40,000 test rows of mixed settings).

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
        raise InvalidArgument("logits: expected at least one token per row, got V = 0")
    device = logits.device
    for name, t in (("temperature", temperature), ("top_p", top_p), ("min_p", min_p)):
        check_tensor(name, t, dtype=torch.float32, device=device, shape=(batch,))
    check_tensor("top_k", top_k, dtype=torch.int32, device=device, shape=(batch,))
    check_tensor("offsets", offsets, dtype=torch.int64, device=device, shape=(batch,))
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise InvalidArgument(f"seed: expected an int, got {type(seed).__name__}")
    if not 0 <= seed < 2**64:
        raise InvalidArgument(f"seed: expected an int in [0, 2**64), got {seed}")
    if not isinstance(num_logprobs, int) or isinstance(num_logprobs, bool):
        raise InvalidArgument(f"num_logprobs: expected an int, got {type(num_logprobs).__name__}")
    most = min(MAX_LOGPROBS, vocab)
    if not 0 <= num_logprobs <= most:
        raise InvalidArgument(f"num_logprobs: expected 0 to {most}, got {num_logprobs}")
    if check_values(logits, temperature, top_k, top_p, min_p):
        _check_sampling_values(logits, temperature, top_k, top_p, min_p)
    chosen = backends.resolve("sample", device, backend)
    signed_seed = seed - 2**64 if seed >= 2**63 else seed  # the op schema's int is int64
    tokens, logprobs, top_ids, top_values = dispatch.run(_sample, "sample",
        *dispatch.contiguous(logits, temperature, top_k, top_p, min_p), signed_seed, offsets.contiguous(),
        num_logprobs, chosen,
    )
    return tokens, logprobs, ((top_ids, top_values) if num_logprobs else None)
