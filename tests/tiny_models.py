"""Tiny random-weight HF models saved to disk, and a minimal paged driver for our transformer.

transformers is the independent reference here and only here (tests). Weights are redrawn
larger than transformers' initialisation (std 0.02 would make every logit nearly zero and any
comparison pass), and norm weights away from 1 so a misplaced norm shows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from ttscale.model import AttentionBatch, KVCache, Transformer

BASE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=256,
    max_position_embeddings=512,
)

# name -> (model_type, architecture, config overrides)
VARIANTS = {
    "llama": ("llama", "LlamaForCausalLM", {}),
    "llama_tied": ("llama", "LlamaForCausalLM", {"tie_word_embeddings": True}),
    "llama3_rope": (
        "llama",
        "LlamaForCausalLM",
        {
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 10000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            }
        },
    ),
    "qwen2": ("qwen2", "Qwen2ForCausalLM", {}),
    "qwen2_tied": ("qwen2", "Qwen2ForCausalLM", {"tie_word_embeddings": True}),
    "mistral": ("mistral", "MistralForCausalLM", {"num_key_value_heads": 1}),
    # head_dim 32 is not hidden / heads (16): Qwen3 states it explicitly.
    "qwen3": ("qwen3", "Qwen3ForCausalLM", {"head_dim": 32}),
}


def build_hf_model(
    variant: str, directory: Path, *, seed: int = 0, max_shard_size: str | None = None
):
    """A random transformers model of ``variant`` (fp32, eval), saved to ``directory``."""
    import transformers

    model_type, architecture, overrides = VARIANTS[variant]
    config = transformers.AutoConfig.for_model(model_type, **{**BASE, **overrides})
    config.architectures = [architecture]
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.2)
            else:
                p.normal_(0.0, 0.2)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(directory, **kwargs)
    return model


def edit_checkpoint(directory: Path, edit) -> None:
    """Rewrite a single-file checkpoint through ``edit(tensors) -> tensors``."""
    path = directory / "model.safetensors"
    tensors = edit(dict(load_file(path)))
    save_file({k: v.contiguous() for k, v in tensors.items()}, path)


def edit_config(directory: Path, edit) -> None:
    path = directory / "config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))


@dataclass
class Sequence:
    problem: int
    blocks: list[int] = field(default_factory=list)
    length: int = 0  # suffix tokens whose K/V are in the cache


class PagedDriver:
    """The least an engine must do to run the model: hand out blocks, build each step's batch.

    Blocks come from a shuffled free list so no kernel can lean on contiguous tables.
    """

    def __init__(
        self,
        model: Transformer,
        *,
        num_blocks: int = 96,
        block_size: int = 8,
        seed: int = 0,
        backend: str | None = None,
    ):
        self.model = model
        self.backend = backend
        self.block_size = block_size
        self.kv = KVCache.allocate(
            model.config, num_blocks, block_size=block_size, dtype=model.dtype, device=model.device
        )
        self.free = torch.randperm(
            num_blocks, generator=torch.Generator().manual_seed(seed)
        ).tolist()
        self.prompt_blocks: list[list[int]] = []
        self.prompt_lens: list[int] = []

    def _slots(self, blocks: list[int], start: int, count: int) -> list[int]:
        while len(blocks) * self.block_size < start + count:
            blocks.append(self.free.pop())
        return [
            blocks[p // self.block_size] * self.block_size + p % self.block_size
            for p in range(start, start + count)
        ]

    def _batch(self, mode, positions, slots, seqs: list[Sequence], q_lens=None) -> AttentionBatch:
        """The step's two levels: every problem's prompt, and each sequence's suffix so far."""
        prompt_tables = torch.zeros(
            len(self.prompt_blocks), _width(self.prompt_blocks), dtype=torch.int32
        )
        for p, blocks in enumerate(self.prompt_blocks):
            prompt_tables[p, : len(blocks)] = torch.tensor(blocks)
        suffix_tables = torch.zeros(len(seqs), _width([s.blocks for s in seqs]), dtype=torch.int32)
        for b, s in enumerate(seqs):
            suffix_tables[b, : len(s.blocks)] = torch.tensor(s.blocks)
        on = lambda t: t.to(self.model.device)  # noqa: E731
        return AttentionBatch(
            mode,
            positions=on(torch.tensor(positions)),
            slots=on(torch.tensor(slots)),
            prompt_block_tables=on(prompt_tables),
            prompt_lens=on(torch.tensor(self.prompt_lens)),
            problem_ids=on(torch.tensor([s.problem for s in seqs])),
            suffix_block_tables=on(suffix_tables),
            suffix_lens=on(torch.tensor([s.length for s in seqs])),
            q_lens=None if q_lens is None else on(torch.tensor(q_lens)),
            backend=self.backend,
        )

    def add_prompt(self, ids: list[int], *, chunk: int | None = None) -> tuple[int, torch.Tensor]:
        """Prefill a new problem's prompt into its own blocks (in chunks if asked).

        Returns the problem id and the logits ``[len, V]`` of every prompt token.
        """
        problem = len(self.prompt_blocks)
        self.prompt_blocks.append([])
        self.prompt_lens.append(0)
        chunk = chunk or len(ids)
        hidden = [
            self._prefill_prompt(problem, ids[start : start + chunk], start)
            for start in range(0, len(ids), chunk)
        ]
        return problem, self.model.compute_logits(torch.cat(hidden))

    def prompt_hidden(self, ids: list[int], rows: torch.Tensor) -> torch.Tensor:
        """Prefill a new problem's prompt in one step; the final hidden states of ``rows``."""
        self.prompt_blocks.append([])
        self.prompt_lens.append(0)
        return self._prefill_prompt(len(self.prompt_blocks) - 1, ids, 0, rows)

    def _prefill_prompt(self, problem: int, new: list[int], start: int, rows=None) -> torch.Tensor:
        """Prompt tokens ``start : start + len(new)``, the last of its context; empty suffix."""
        slots = self._slots(self.prompt_blocks[problem], start, len(new))
        self.prompt_lens[problem] = start + len(new)
        positions = list(range(start, start + len(new)))
        batch = self._batch("prefill", positions, slots, [Sequence(problem)], [len(new)])
        return self.model(torch.tensor(new, device=self.model.device), batch, self.kv, rows=rows)

    def extend(self, seqs: list[Sequence], new_tokens: list[list[int]]) -> torch.Tensor:
        """Prefill new suffix tokens of several sequences in one step; logits of every new token."""
        positions, slots = [], []
        for s, new in zip(seqs, new_tokens, strict=True):
            start = self.prompt_lens[s.problem] + s.length
            positions += range(start, start + len(new))
            slots += self._slots(s.blocks, s.length, len(new))
            s.length += len(new)
        batch = self._batch("prefill", positions, slots, seqs, [len(new) for new in new_tokens])
        ids = torch.tensor([t for new in new_tokens for t in new], device=self.model.device)
        return self.model.compute_logits(self.model(ids, batch, self.kv))

    def decode(
        self, seqs: list[Sequence], tokens: list[int], *, padded_rows: int = 0
    ) -> torch.Tensor:
        """One token per sequence; ``padded_rows`` extra rows carry slot -1. Logits ``[B, V]``."""
        positions, slots = [], []
        for s in seqs:
            positions.append(self.prompt_lens[s.problem] + s.length)
            slots += self._slots(s.blocks, s.length, 1)
            s.length += 1
        pads = [Sequence(problem=0) for _ in range(padded_rows)]
        batch = self._batch(
            "decode", positions + [0] * padded_rows, slots + [-1] * padded_rows, seqs + pads
        )
        ids = torch.tensor(tokens + [0] * padded_rows, device=self.model.device)
        return self.model.compute_logits(self.model(ids, batch, self.kv))[: len(seqs)]


def _width(tables: list[list[int]]) -> int:
    return max([len(t) for t in tables] + [1])


def build_tiny_llama(directory: Path) -> Path:
    """A two-layer random Llama on the toy tokenizer (45 tokens), weights far from identity so
    that samples differ: the engine and step-API tests' model."""
    import transformers

    from ttscale.toy.tokenizer import build_tokenizer, save_tokenizer

    tokenizer = build_tokenizer()
    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=tokenizer.get_vocab_size(), max_position_embeddings=512,
        eos_token_id=tokenizer.token_to_id("</s>"), bos_token_id=1,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if "norm" in name else 0.0, 0.2 if "norm" in name else 0.3)
    model.save_pretrained(directory)
    save_tokenizer(directory)
    return directory
