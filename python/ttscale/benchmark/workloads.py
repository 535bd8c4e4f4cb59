"""What ``ttscale bench throughput`` asks every backend: prompts as token ids, ``n``, lengths.

Datasets (``--dataset-name``):

- ``random``: ``--num-prompts`` prompts of ``--input-len`` random token ids, the first
  ``--prefix-len`` of them shared by all (vLLM's random dataset);
- ``prefix-repeat``: the same prompts, each sampled ``--n`` >= 2 times: the test-time-compute
  workload, where the samples of a prompt share it (every backend gets one request per prompt
  with ``n``, as a user would send it);
- ``gsm8k``, ``math500``: the first ``--num-prompts`` ``question`` (GSM8K) or ``problem``
  (MATH-500) texts of the JSONL file ``--dataset-path``, through the model's tokenizer;
- ``jsonl``: the same with a ``prompt`` field.

The prompts are made once, in the harness, and the same token ids go to every backend.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from ttscale.errors import UsageError

DATASETS = ("random", "prefix-repeat", "gsm8k", "math500", "jsonl")
TEXT_FIELDS = {"gsm8k": "question", "math500": "problem", "jsonl": "prompt"}


@dataclass
class Workload:
    dataset: str
    prompts: list[list[int]]  # token ids, one list per request
    n: int  # samples per request (1 with beam search)
    output_len: int  # new tokens per sample (or per beam)
    beam_width: int | None  # token-level beam search, or None
    shared_prefix: int  # leading tokens every prompt shares

    @property
    def num_requests(self) -> int:
        return len(self.prompts)

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    def describe(self) -> str:
        lengths = sorted(len(p) for p in self.prompts)
        prompt = (f"prompt {lengths[0]}" if lengths[0] == lengths[-1]
                  else f"prompts {lengths[0]}-{lengths[-1]} (median {lengths[len(lengths) // 2]})")
        search = f"beam search, width {self.beam_width}" if self.beam_width else f"n={self.n}"
        return (f"{self.dataset}: {self.num_requests} requests, {prompt} tokens, {search}, "
                f"{self.output_len} new tokens (EOS ignored)")


def random_prompts(count: int, length: int, prefix_len: int, vocab_size: int,
                   seed: int) -> list[list[int]]:
    """``count`` prompts of ``length`` ids from [1, vocab_size), the first ``prefix_len`` shared."""
    rng = random.Random(seed)
    draw = lambda k: [rng.randrange(1, vocab_size) for _ in range(k)]
    prefix = draw(prefix_len)
    return [prefix + draw(length - prefix_len) for _ in range(count)]


def read_texts(path: Path, field: str, count: int) -> list[str]:
    """The first ``count`` values of ``field`` in a JSONL file; errors name --dataset-path."""
    texts = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise UsageError(f"argument --dataset-path: {path} line {number} is not JSON "
                                 f"({error.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get(field), str):
                raise UsageError(f"argument --dataset-path: {path} line {number} has no "
                                 f"{field!r} text")
            texts.append(record[field])
            if len(texts) == count:
                return texts
    raise UsageError(f"argument --num-prompts: {path} has {len(texts)} prompts, asked for {count}")


def build(args, vocab_size: int) -> Workload:
    """The workload the parsed flags describe (checked by the harness before this)."""
    width = (args.beam_width or args.n) if args.use_beam_search else None
    n = 1 if width else args.n
    if args.dataset_name in ("random", "prefix-repeat"):
        prompts = random_prompts(args.num_prompts, args.input_len, args.prefix_len or 0,
                                 vocab_size, args.seed)
        return Workload(args.dataset_name, prompts, n, args.output_len, width,
                        args.prefix_len or 0)
    from ttscale.model import load_tokenizer

    tokenizer = load_tokenizer(Path(args.model))
    texts = read_texts(Path(args.dataset_path), TEXT_FIELDS[args.dataset_name], args.num_prompts)
    return Workload(args.dataset_name, [tokenizer.encode(t) for t in texts], n,
                    args.output_len, width, 0)
