"""sample against its peers: top-p 0.95 at temperature 1 over float32 logits.

Peers, each drawing one token per row from the same logits:
- ``softmax_multinomial``: ``torch.multinomial(softmax(logits / T), 1)``, no filter at all;
- ``sort_top_p``: the usual torch top-p: sort the row, cumulative softmax, mask the tail,
  renormalise, ``torch.multinomial``.

Floor: the logits read once, over the memory bandwidth measured here by a large device copy
(read + write). Our op also returns each token's log-probability; the peers do not.

Run: ``pytest bench/bench_sampling.py --benchmark-enable -s``. Without ``--benchmark-enable``
every row runs once, unmeasured (a smoke test of this file). On CUDA the L2 cache is flushed
before every call and the time is taken between CUDA events.
"""

from __future__ import annotations

import statistics
import time

import pytest
import torch
from ttscale import ops

BATCHES = [64, 256, 1024]
VOCABS = [32_000, 128_256, 151_936]
TOP_P = 0.95
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
PEERS = ["softmax_multinomial", "sort_top_p"]
ROUNDS = {"cpu": 3, "cuda": 30}
# On 2 CPU cores the torch peers take seconds per call on larger rows (and gigabytes of logits).
CPU_MAX_ELEMENTS = 64 * 151_936
L2_FLUSH_BYTES = 256 * 2**20

ROWS: dict[tuple, dict[str, float | None]] = {}
NOTES: list[str] = []


def _inputs(batch, vocab, device):
    gen = torch.Generator().manual_seed(batch + vocab)
    logits = (torch.randn(batch, vocab, generator=gen) * 2).to(device)
    ones = torch.ones(batch, device=device)
    return dict(
        logits=logits, temperature=ones, top_k=torch.zeros(batch, dtype=torch.int32, device=device),
        top_p=torch.full((batch,), TOP_P, device=device), min_p=torch.zeros(batch, device=device),
        seed=0, offsets=torch.arange(batch, device=device))


def _ours(args):
    return lambda: ops.sample(**args)


def _softmax_multinomial(args):
    logits, temperature = args["logits"], args["temperature"]
    return lambda: torch.multinomial(torch.softmax(logits / temperature[:, None], -1), 1)


def _sort_top_p(args):
    logits, temperature, top_p = args["logits"], args["temperature"], args["top_p"]

    def run():
        values, order = torch.sort(logits / temperature[:, None], dim=-1, descending=True)
        probs = torch.softmax(values, -1)
        before = torch.cumsum(probs, -1) - probs  # mass of the more likely tokens
        probs = probs.masked_fill(before >= top_p[:, None], 0.0)
        choice = torch.multinomial(probs / probs.sum(-1, keepdim=True), 1)
        return order.gather(1, choice)

    return run


IMPLEMENTATIONS = {
    "ours": _ours, "softmax_multinomial": _softmax_multinomial, "sort_top_p": _sort_top_p,
}


def _timed(fn, device):
    """A callable that runs fn once and returns its time in seconds (device time on CUDA)."""
    if device != "cuda":
        def call():
            start = time.perf_counter()
            fn()
            return time.perf_counter() - start
        return call
    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device="cuda")

    def call():
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    return call


def _copy_bandwidth(device) -> float:
    """Bytes per second of a 256 MB copy (read + write), the best of a few."""
    src = torch.zeros(2**26, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    call = _timed(lambda: dst.copy_(src), device)
    call()
    return 2 * src.numel() * 4 / min(call() for _ in range(5))


BANDWIDTH: dict[str, float] = {}


@pytest.fixture(scope="module", autouse=True)
def table():
    yield
    if not ROWS:
        return
    header = ["device", "B", "V", "ours us", "GB/s", *[f"{p} us" for p in PEERS], "floor us",
              "ours/floor", *[f"{p}/ours" for p in PEERS]]
    lines = [header]
    for (device, batch, vocab), times in sorted(ROWS.items()):
        floor = batch * vocab * 4 / BANDWIDTH[device]
        ours = times.get("ours")
        cells = [device, str(batch), str(vocab), _us(ours),
                 f"{batch * vocab * 4 / ours / 1e9:.3g}" if ours else "-"]
        cells += [_us(times.get(p)) for p in PEERS]
        cells += [_us(floor), f"{ours / floor:.1f}x" if ours else "-"]
        cells += [f"{times[p] / ours:.1f}x" if ours and times.get(p) else "-" for p in PEERS]
        lines.append(cells)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    print(f"\n\nsample, top-p {TOP_P}, temperature 1, float32 logits (median of rounds)")
    for n, line in enumerate(lines):
        print("  ".join(cell.rjust(w) for cell, w in zip(line, widths, strict=True)))
        if n == 0:
            print("  ".join("-" * w for w in widths))
    for device, bandwidth in BANDWIDTH.items():
        print(f"floor on {device}: logits read once at {bandwidth / 1e9:.0f} GB/s (measured copy)")
    for note in NOTES:
        print(note)


def _us(seconds):
    return f"{seconds * 1e6:.0f}" if seconds else "-"


@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("device", DEVICES)
def test_sample(benchmark, device, batch, vocab, impl):
    if device == "cpu" and batch * vocab > CPU_MAX_ELEMENTS:
        note = f"cpu rows skipped above B*V = {CPU_MAX_ELEMENTS:,} (the peers take seconds per call)"
        if note not in NOTES:
            NOTES.append(note)
        pytest.skip(note)
    if device not in BANDWIDTH:
        BANDWIDTH[device] = _copy_bandwidth(device)
    fn = IMPLEMENTATIONS[impl](_inputs(batch, vocab, device))
    fn()  # warm-up: compilation and allocator
    call, times = _timed(fn, device), []
    benchmark.pedantic(lambda: times.append(call()), rounds=ROUNDS[device], iterations=1)
    row = ROWS.setdefault((device, batch, vocab), {})
    row[impl] = statistics.median(times) if not benchmark.disabled else None
    if benchmark.disabled and "unmeasured" not in " ".join(NOTES):
        NOTES.append("(unmeasured: run with --benchmark-enable for times)")
