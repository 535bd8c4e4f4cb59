"""What every benchmark file reads from the environment, read here once, and the dimensions of
the tiny models its ``TINY`` rows use.

- ``TTSCALE_BENCH_TINY=1`` (:data:`TINY`): tiny shapes, to check the benchmark code itself
  (``bench/gpu.sh --dry-run``, and the CPU runs with benchmarks disabled).
- ``TTSCALE_BENCH_QUICK=1`` (:data:`QUICK`): only the rows one short GPU run measures.
- ``TTSCALE_BENCH_DEVICES`` (:data:`DEVICES`): comma-separated devices to benchmark; by default
  every device this machine has (:data:`AVAILABLE_DEVICES`: ``cpu``, plus ``cuda`` when present).
"""

from __future__ import annotations

import os

import torch


def _flag(name: str) -> bool:
    """An environment switch: set and neither empty nor ``0``."""
    return os.environ.get(name, "0") not in ("", "0")


TINY = _flag("TTSCALE_BENCH_TINY")
QUICK = _flag("TTSCALE_BENCH_QUICK")
AVAILABLE_DEVICES = ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]
DEVICES = (os.environ.get("TTSCALE_BENCH_DEVICES") or ",".join(AVAILABLE_DEVICES)).split(",")

# A tiny decoder's config.json fields: two layers of width 64, GQA with two kv heads, a vocabulary
# of 512. Each benchmark lays them over its own family's config (Llama, Qwen2).
TINY_DIMS = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512}
