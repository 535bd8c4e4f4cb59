"""The floor of every GPU row in bench/RESULTS.md, from the performance model of DESIGN.md.

A step cannot be faster than the larger of bytes / memory bandwidth and FLOPs / peak rate. The
rates are an H100's: 3.0 TB/s measured copy bandwidth and 989 TFLOP/s dense bf16. Model shapes
come from the published config.json of each model. Run ``python bench/floors.py`` to print the
tables that RESULTS.md quotes. The benchmarks take from here what their rows share with these
tables: the bytes an op moves (``sample_bytes``) and the ratio cells (``ratios``).
"""

from __future__ import annotations

from dataclasses import dataclass

BANDWIDTH = 3.0e12  # bytes/s
PEAK = 989e12  # FLOP/s, dense bf16
BF16, FP32 = 2, 4


@dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    intermediate: int
    layers: int
    q_heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    qkv_bias: bool

    def layer_params(self) -> int:
        q = self.hidden * self.q_heads * self.head_dim
        kv = 2 * self.hidden * self.kv_heads * self.head_dim
        bias = (self.q_heads + 2 * self.kv_heads) * self.head_dim if self.qkv_bias else 0
        o = self.q_heads * self.head_dim * self.hidden
        mlp = 3 * self.hidden * self.intermediate
        return q + kv + bias + o + mlp + 2 * self.hidden

    def params(self) -> int:
        embed = self.vocab * self.hidden
        return self.layers * self.layer_params() + embed * (1 if self.tied else 2) + self.hidden

    def matmul_params(self, lm_head: bool = True) -> int:
        """Weights every token multiplies (and a decode step reads): layers plus the lm_head."""
        return self.layers * self.layer_params() + (self.vocab * self.hidden if lm_head else 0)

    def kv_bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * BF16

    def attention_flops(self, context: float) -> float:
        """One query token over ``context`` keys, all layers (QK and PV)."""
        return 4 * self.layers * self.q_heads * self.head_dim * context


LLAMA_1B = Shape("Llama-3.2-1B", 2048, 8192, 16, 32, 8, 64, 128256, tied=True, qkv_bias=False)
QWEN_05B = Shape("Qwen2.5-0.5B", 896, 4864, 24, 14, 2, 64, 151936, tied=True, qkv_bias=True)
LLAMA_8B = Shape("Llama-3.1-8B", 4096, 14336, 32, 32, 8, 128, 128256, tied=False, qkv_bias=False)
QWEN_15B = Shape("Qwen2.5-Math-1.5B", 1536, 8960, 28, 12, 2, 128, 151936, tied=True, qkv_bias=True)
QWEN_7B = Shape("Qwen2.5-Math-7B", 3584, 18944, 28, 28, 4, 128, 152064, tied=False, qkv_bias=True)


def floor(nbytes: float, flops: float) -> float:
    return max(nbytes / BANDWIDTH, flops / PEAK)


def prefill_seconds(m: Shape, tokens: int, prompt_len: int) -> float:
    """Prefill of ``tokens`` prompt tokens in prompts of ``prompt_len``: compute-bound."""
    flops = tokens * (2 * m.matmul_params(lm_head=False) + m.attention_flops(prompt_len / 2))
    return floor(m.matmul_params() * BF16, flops)


def decode_seconds(
    m: Shape, problems: int, samples: int, prompt_len: int, new_tokens: int
) -> float:
    """Sum over decode steps of the step floor: weights + prompt KV once per problem + suffixes."""
    seqs = problems * samples
    total = 0.0
    for t in range(new_tokens):
        kv = (problems * prompt_len + seqs * t) * m.kv_bytes_per_token()
        nbytes = m.matmul_params() * BF16 + kv + seqs * m.kv_bytes_per_token()  # + new KV written
        flops = seqs * (2 * m.matmul_params() + m.attention_flops(prompt_len + t))
        total += floor(nbytes, flops)
    return total


def attention_rows() -> list[str]:
    """cascade_decode_attention, one layer, bf16 (bench_attention.py prints the same floors)."""
    import torch
    from bench_attention import WORKLOADS

    rows = []
    for w in WORKLOADS:
        nbytes, flops = w.bytes_floor(torch.bfloat16), w.flops()
        rows.append(
            f"| {w.label} | {nbytes / 1e6:.1f} MB | {nbytes / BANDWIDTH * 1e6:.1f} µs | "
            f"{flops / 1e9:.2f} GFLOP | {flops / PEAK * 1e6:.2f} µs | "
            f"{floor(nbytes, flops) * 1e6:.1f} µs |"
        )
    return rows


# What sample_bytes counts, as the sampling benchmarks' notes say it.
SAMPLE_BYTES_ARE = "logits read once + tokens and logprobs written"


def sample_bytes(batch: int, vocab: int) -> int:
    """The sample op's bytes: float32 logits read once, tokens (int64) and log-probabilities
    (float32) written."""
    return batch * vocab * FP32 + batch * (8 + FP32)


def time_unit(device: str) -> tuple[str, float]:
    """The unit a device's table shows times in, and its count per second: µs on a GPU, ms on
    the CPU."""
    return ("µs", 1e6) if device == "cuda" else ("ms", 1e3)


def ratios(data: dict, ours: tuple[str, ...], peers: tuple[str, ...], floor_s: float) -> dict:
    """A benchmark row's ratio cells from its timings so far (``data["<impl>_s"]``): the best of
    ours over the floor (naming it when there are several of ours), each peer over the best of
    ours; none until one of ours has run."""
    times = {impl: data[f"{impl}_s"] for impl in ours if f"{impl}_s" in data}
    if not times:
        return {}
    fastest = min(times, key=times.get)
    best = times[fastest]
    cells = {"ours ÷ floor": f"{best / floor_s:.3g}x" + (f" ({fastest})" if len(ours) > 1 else "")}
    cells.update({f"{p} ÷ ours": f"{data[f'{p}_s'] / best:.3g}x"
                  for p in peers if f"{p}_s" in data})
    return cells


def sample_rows() -> list[str]:
    """Logits read once (fp32), tokens (int64) and log-probabilities (fp32) written."""
    rows = []
    for b in (64, 256, 1024):
        for v in (32000, 128256, 151936):
            nbytes = sample_bytes(b, v)
            rows.append(
                f"| B={b} V={v:,} | {nbytes / 1e6:.1f} MB | {nbytes / BANDWIDTH * 1e6:.1f} µs |"
            )
    return rows


def prm_rows() -> list[str]:
    """Hidden states read once (bf16), the two head rows, scores and per-sequence state written."""
    rows = []
    for t in (64, 1024, 8192):
        for h in (2048, 4096):
            nbytes = t * h * BF16 + 2 * h * BF16 + t * FP32 + t * 2 * FP32
            unfused = nbytes + 128256 * h * BF16 + t * 128256 * BF16 * 2  # lm_head + logits
            rows.append(
                f"| T={t} H={h} | {nbytes / 1e6:.2f} MB | {nbytes / BANDWIDTH * 1e6:.2f} µs | "
                f"{unfused / BANDWIDTH * 1e6:.0f} µs |"
            )
    return rows


def select_rows(max_blocks: int = 64) -> list[str]:
    """Scores and block tables read, new tables written (int32), reference counts touched."""
    rows = []
    for c in (64, 256, 4096):
        nbytes = c * FP32 + 2 * c * max_blocks * 4 + c * max_blocks * 4
        rows.append(f"| C={c} | {nbytes / 1e3:.0f} KB | {nbytes / BANDWIDTH * 1e6:.2f} µs |")
    return rows


def engine_rows() -> list[str]:
    rows = []
    for m in (QWEN_05B, LLAMA_1B):
        for n in (16, 64, 256, 1024):
            seconds = prefill_seconds(m, 1024, 1024) + decode_seconds(m, 1, n, 1024, 256)
            rows.append(
                f"| {m.name} | 1 x {n} | 1024 | 256 | {seconds * 1e3:.1f} ms | "
                f"{n * 256 / seconds:,.0f} |"
            )
    return rows


def tokasaurus_row() -> str:
    """128 problems x 1024 samples, prompt 700, 256 new tokens: streamed through the pool."""
    m, problems, samples, prompt, new = LLAMA_1B, 128, 1024, 700, 256
    seqs = problems * samples
    tokens = seqs * new
    flops = tokens * 2 * m.matmul_params() + seqs * sum(
        m.attention_flops(prompt + t) for t in range(new)
    )
    flops += problems * prompt * 2 * m.matmul_params(lm_head=False)
    # Memory: every suffix read at every later step; the prompt read once per step per problem
    # resident; weights once per step. Resident sequences are bounded by the KV pool (80 GB less
    # the weights), which sets the number of steps.
    resident = int((80e9 - m.params() * BF16) / (m.kv_bytes_per_token() * (new + prompt / samples)))
    steps = tokens / resident
    suffix_kv = seqs * (new * (new - 1) / 2) * m.kv_bytes_per_token()
    prompt_kv = steps * (resident / samples) * prompt * m.kv_bytes_per_token()
    nbytes = suffix_kv + prompt_kv + steps * m.matmul_params() * BF16
    seconds = max(nbytes / BANDWIDTH, flops / PEAK)
    return (
        f"| Tokasaurus: {m.name}, {problems} x {samples}, prompt {prompt}, {new} new | "
        f"{flops / 1e15:.1f} PFLOP -> {flops / PEAK:.1f} s | {nbytes / 1e12:.1f} TB -> "
        f"{nbytes / BANDWIDTH:.1f} s (~{resident:,} resident) | {tokens / seconds:,.0f} tok/s |"
    )


def beam_row() -> str:
    """Llama-3-8B shape, 100 prompts of 256, 256 new tokens, beam width 4 (400 beams resident)."""
    m, prompts, prompt, new, width = LLAMA_8B, 100, 256, 256, 4
    seconds = prefill_seconds(m, prompts * prompt, prompt) + decode_seconds(
        m, prompts, width, prompt, new
    )
    tokens = prompts * width * new
    return (
        f"| beam search: {m.name}, {prompts} prompts, in {prompt}, out {new}, width {width} | "
        f"{seconds:.2f} s | {tokens / seconds:,.0f} generated tok/s |"
    )


def math500_rows(solution_tokens: int = 500, prompt_tokens: int = 150) -> list[str]:
    """Policy generation plus PRM scoring of every generated token, 500 problems x 256."""
    policy, prm, problems, n = QWEN_15B, QWEN_7B, 500, 256
    tokens = problems * n * solution_tokens
    ctx = prompt_tokens + solution_tokens / 2
    policy_flops = tokens * (2 * policy.matmul_params() + policy.attention_flops(ctx))
    prm_flops = tokens * (2 * prm.matmul_params(lm_head=False) + prm.attention_flops(ctx))
    seconds = (policy_flops + prm_flops) / PEAK
    return [
        f"| policy {policy.name}: {tokens / 1e6:.0f}M tokens x "
        f"{2 * policy.matmul_params() / 1e9:.2f} GFLOP | {policy_flops / 1e15:.0f} PFLOP | "
        f"{policy_flops / PEAK / 60:.1f} min |",
        f"| PRM {prm.name} (no lm_head): {tokens / 1e6:.0f}M tokens x "
        f"{2 * prm.matmul_params(lm_head=False) / 1e9:.2f} GFLOP | {prm_flops / 1e15:.0f} PFLOP | "
        f"{prm_flops / PEAK / 60:.1f} min |",
        f"| total (compute floor, either strategy) | {seconds * PEAK / 1e15:.0f} PFLOP | "
        f"{seconds / 60:.1f} min |",
    ]


def main() -> None:
    for m in (QWEN_05B, LLAMA_1B, LLAMA_8B, QWEN_15B, QWEN_7B):
        print(
            f"{m.name}: {m.params():,} params, matmul {m.matmul_params():,}, "
            f"KV {m.kv_bytes_per_token():,} B/token"
        )
    print("\n| workload | bytes | bytes floor | FLOPs | compute floor | floor |")
    print("\n".join(attention_rows()))
    print("\n".join(sample_rows()))
    print("\n".join(prm_rows()))
    print("\n".join(select_rows()))
    print("\n| model | problems x samples | prompt | new | floor | tokens/s floor |")
    print("\n".join(engine_rows()))
    print("\n" + tokasaurus_row())
    print(beam_row())
    print("\n".join(math500_rows()))


if __name__ == "__main__":
    main()
