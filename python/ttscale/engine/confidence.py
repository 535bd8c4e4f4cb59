"""Token confidence, group confidence over a sliding window, and the stop it drives on the device.

The measures of Fu et al. (2025), "Deep Think with Confidence" (DeepConf):

- a token's confidence is the negated mean of its top-k log-probabilities,
  ``C_i = -(1/k) sum_j log P_i(j)``: a peaked distribution (the top token near certain, the
  others far below) gives a large value, a flat one a small value;
- a group's confidence is the mean token confidence over a window of ``W`` consecutive tokens;
  the groups of a trace are its full windows, one ending at each token from the ``W``-th on
  (a trace shorter than ``W`` has one group: all its tokens);
- a trace's scores: its lowest group, the mean of its bottom 10% of groups, its tail (the mean
  over its last ``tail`` tokens), and its mean token confidence.

:func:`token_confidence` and :func:`trace_scores` are the host-side definitions (plain Python on
a sequence's ``top_logprobs``). :class:`ConfidenceStop` is the online stop: a control handed to
``Engine.decode`` that keeps, per watched sequence, a ring buffer of its last ``W`` token
confidences and their running sum on the device, and flags a row stopped at the first token
whose full window's mean falls below the sequence's threshold, inside the decode window, without
reading the host. :class:`WindowConfidence` is what one decode window does with those controls:
the runner calls :meth:`WindowConfidence.begin`, then :meth:`~WindowConfidence.step` after each
sampled token, and :meth:`~WindowConfidence.end` once; nothing else in the runner knows about
confidence.
"""

from __future__ import annotations

import math
from collections.abc import Sequence as Seq

import torch

from ttscale.engine.sequence import Sequence

TOKEN_STOP = 1  # a stop or end-of-sequence token (the stop table's flag)
CONFIDENCE_STOP = 2  # the window's mean confidence fell below the threshold
BOTTOM_FRACTION = 0.1  # the "bottom 10%" of groups


def token_confidence(top_logprobs: Seq[float], k: int) -> float:
    """``-(1/k) * sum`` of the first ``k`` of a token's top log-probabilities (largest first)."""
    return -math.fsum(top_logprobs[:k]) / k


def group_confidences(confidences: Seq[float], window: int) -> list[float]:
    """The mean of every full window of ``window`` consecutive token confidences, in order (one
    group, the mean of all, when there are fewer tokens than ``window``; none for no tokens)."""
    values = list(confidences)
    if not values:
        return []
    if len(values) < window:
        return [math.fsum(values) / len(values)]
    return [math.fsum(values[i - window : i]) / window for i in range(window, len(values) + 1)]


def trace_scores(confidences: Seq[float], window: int, tail: int) -> dict[str, float]:
    """A trace's confidence scores from its token confidences: ``lowest`` (its lowest group),
    ``bottom10`` (the mean of its lowest 10% of groups, at least one), ``tail`` (the mean of its
    last ``tail`` tokens) and ``mean`` (of all its tokens). An empty trace scores 0 on each."""
    values = list(confidences)
    if not values:
        return {"lowest": 0.0, "bottom10": 0.0, "tail": 0.0, "mean": 0.0}
    groups = sorted(group_confidences(values, window))
    bottom = groups[: max(1, math.ceil(BOTTOM_FRACTION * len(groups)))]
    last = values[-tail:]
    return {"lowest": groups[0], "bottom10": math.fsum(bottom) / len(bottom),
            "tail": math.fsum(last) / len(last), "mean": math.fsum(values) / len(values)}


class ConfidenceStop:
    """The online stop of DeepConf, as a control for ``Engine.decode(..., confidence_stop=)``.

    Watched sequences (:meth:`watch`, each with its own threshold) stop at the first sampled
    token where the mean confidence of their last ``window`` tokens (tokens sampled under this
    control) is below their threshold; that token is kept and the sequence's finish reason is
    ``"confidence"``. Token confidence uses the first ``top_k`` top log-probabilities, so the
    decode's ``SamplingParams.logprobs`` must be at least ``top_k``. Rows of the same decode
    windows that the control does not watch are never stopped by it.

    The state lives on the device, one slot per watched sequence: ``ring`` ``float64 [S, W]``
    (its last ``W`` token confidences, position ``count % W``), ``total`` ``float64 [S]`` (their
    running sum; float64 so that thousands of updates do not drift from a fresh sum), ``count``
    ``int64 [S]`` and ``threshold`` ``float64 [S]``. A decode window gathers its rows' slots,
    updates them per step and scatters them back, all on the device.

    A row flagged in a window (a stop token, EOS, or this stop) takes no further updates in that
    window: the tokens after its stop are discarded by the host. A stop string that spans two
    tokens is found only on the host; tokens after it still entered the state, which matters
    only if the caller decodes that sequence again under the same control.
    """

    def __init__(self, window: int, top_k: int):
        self.window = int(window)
        self.top_k = int(top_k)
        self.slots: dict[Sequence, int] = {}
        self.ring = self.total = self.count = self.threshold = None

    def watch(self, seqs: Seq[Sequence], threshold: float) -> None:
        """Stop ``seqs`` when their window's mean confidence falls below ``threshold``."""
        new = [s for s in seqs if s not in self.slots]
        for seq in new:
            self.slots[seq] = len(self.slots)
        device = None if self.ring is None else self.ring.device
        thresholds = torch.full((len(new),), float(threshold), dtype=torch.float64, device=device)
        if self.ring is None:
            self.ring = torch.zeros(len(new), self.window, dtype=torch.float64)
            self.total = torch.zeros(len(new), dtype=torch.float64)
            self.count = torch.zeros(len(new), dtype=torch.int64)
            self.threshold = thresholds
            return
        self.ring = torch.cat([self.ring, self.ring.new_zeros(len(new), self.window)])
        self.total = torch.cat([self.total, self.total.new_zeros(len(new))])
        self.count = torch.cat([self.count, self.count.new_zeros(len(new))])
        self.threshold = torch.cat([self.threshold, thresholds])
        for seq in seqs:  # a sequence watched again takes the new threshold
            self.threshold[self.slots[seq]] = float(threshold)

    def _to(self, device) -> None:
        if self.ring is not None and self.ring.device != device:
            self.ring, self.total = self.ring.to(device), self.total.to(device)
            self.count, self.threshold = self.count.to(device), self.threshold.to(device)


class WindowConfidence:
    """One decode window's confidence state for its rows (``B`` of them): what the runner holds
    between :meth:`begin` and :meth:`end`."""

    def __init__(self, controls: list[tuple[ConfidenceStop, torch.Tensor, torch.Tensor]],
                 ring, total, count, window, threshold, top_k, num_logprobs: int):
        self.controls = controls  # (control, its rows in the batch, their slots)
        self.ring, self.total, self.count = ring, total, count  # [B, Wmax], [B], [B]
        self.window, self.threshold = window, threshold  # [B] int64, [B] float64
        self.k_mask = torch.arange(num_logprobs, device=ring.device)[None, :] < top_k[:, None]
        self.top_k = top_k.to(torch.float64)
        self.done = torch.zeros(ring.shape[0], dtype=torch.bool, device=ring.device)
        self.rows = torch.arange(ring.shape[0], device=ring.device)

    @staticmethod
    def begin(seqs: list[Sequence], controls: list[ConfidenceStop | None] | None,
              device, num_logprobs: int) -> WindowConfidence | None:
        """The window's state gathered from each row's control (None: no row has one)."""
        if not controls or all(c is None for c in controls):
            return None
        B = len(seqs)
        by_control: dict[ConfidenceStop, tuple[list[int], list[int]]] = {}
        for b, (seq, control) in enumerate(zip(seqs, controls, strict=True)):
            if control is not None and seq in control.slots:
                rows, slots = by_control.setdefault(control, ([], []))
                rows.append(b)
                slots.append(control.slots[seq])
        widest = max([c.window for c in by_control] + [1])
        ring = torch.zeros(B, widest, dtype=torch.float64, device=device)
        total = torch.zeros(B, dtype=torch.float64, device=device)
        count = torch.zeros(B, dtype=torch.int64, device=device)
        window = torch.ones(B, dtype=torch.int64)
        threshold = torch.full((B,), -math.inf, dtype=torch.float64, device=device)
        top_k = torch.ones(B, dtype=torch.int64)
        gathered = []
        for control, (rows, slots) in by_control.items():
            control._to(device)
            rows_t = torch.tensor(rows, dtype=torch.long).to(device)
            slots_t = torch.tensor(slots, dtype=torch.long).to(device)
            ring[rows_t, : control.window] = control.ring[slots_t]
            total[rows_t] = control.total[slots_t]
            count[rows_t] = control.count[slots_t]
            threshold[rows_t] = control.threshold[slots_t]
            window[rows] = control.window
            top_k[rows] = min(control.top_k, num_logprobs)
            gathered.append((control, rows_t, slots_t))
        return WindowConfidence(gathered, ring, total, count, window.to(device), threshold,
                                top_k.to(device), num_logprobs)

    def step(self, top_values: torch.Tensor, token_stop: torch.Tensor) -> torch.Tensor:
        """Take one step's top log-probabilities (``float32 [B, K]``) and the rows its sampled
        token stopped (``bool [B]``); return ``int8 [B]`` flags: :data:`TOKEN_STOP` and
        :data:`CONFIDENCE_STOP` bits."""
        confidence = -(top_values.double() * self.k_mask).sum(1) / self.top_k  # [B]
        live = ~self.done
        position = self.count % self.window
        old = self.ring[self.rows, position]
        full = self.count >= self.window
        self.total = torch.where(live, self.total + confidence - torch.where(full, old, 0.0),
                                 self.total)
        self.ring[self.rows, position] = torch.where(live, confidence, old)
        self.count = self.count + live.long()
        below = (self.count >= self.window) & (self.total / self.window < self.threshold)
        stop = live & below
        flags = token_stop.to(torch.int8) * TOKEN_STOP + stop.to(torch.int8) * CONFIDENCE_STOP
        self.done = self.done | token_stop | stop
        return flags

    def end(self) -> None:
        """Write the rows' state back to their controls' slots (on the device)."""
        for control, rows, slots in self.controls:
            control.ring[slots] = self.ring[rows, : control.window]
            control.total[slots] = self.total[rows]
            control.count[slots] = self.count[rows]
