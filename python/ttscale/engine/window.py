"""One decode window over the scheduler's mixed work: each admitted row's own settings.

Rows of one step may belong to requests and to searches, each with its sampling settings, stop
strings, limit and random stream; this module lines those up per row, runs the runner's window
once for all of them, and hands each row's tokens back to the engine.
"""

from __future__ import annotations

from ttscale.engine.sequence import DRAWS_PER_SEQUENCE, Sequence
from ttscale.engine.work import DecodeItem, Request


def decode_rows(engine, admitted: list[tuple[Sequence, Request | DecodeItem]]) -> None:
    """One window for every admitted row. A request's rows draw from its own streams (seed,
    stream, sample index); a search's from its seed and each sequence's number."""
    rows, seeds, offsets, stops, limits, controls = [], [], [], [], [], []
    for seq, owner in admitted:
        if isinstance(owner, DecodeItem):
            rows.append(owner.sampling)
            seeds.append(owner.seed)
            offsets.append(seq.seq_id * DRAWS_PER_SEQUENCE + seq.generated)
            stops.append(owner.stops)
            limits.append(owner.limits[seq])
            controls.append(owner.confidence_stop)
        else:
            rows.append(owner.params)
            seeds.append(0)
            offsets.append(owner.stream_offsets[seq] + seq.generated)
            stops.append(owner.params.stop_strings)
            limits.append(owner.params.max_tokens)
            controls.append(None)
    window = min([engine.window] + [most - s.generated for (s, _), most in zip(admitted, limits)])
    seqs = [s for s, _ in admitted]
    groups = [engine.stops.group(stop) for stop in stops]
    tokens, logprobs, top, stopped = engine.runner.decode_window(
        seqs, window, rows, seeds, offsets, engine.stops.group_table(), groups, controls)
    for i, seq in enumerate(seqs):
        asked = rows[i].logprobs
        row_top = None if top is None or not asked else [t[:asked] for t in top[i]]
        engine._accept(seq, tokens[i], logprobs[i], row_top, stopped[i], stops[i], limits[i])
    engine.peak_sequences = max(engine.peak_sequences, len(admitted))
