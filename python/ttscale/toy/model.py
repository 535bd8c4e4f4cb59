"""A small Llama for training on the CPU with autograd, saved in the HF layout our loader reads.

The serving transformer (:mod:`ttscale.model.transformer`) runs on a paged KV cache without
gradients; this one trains on padded batches ``[B, T]`` with dense causal attention. Module
names follow HF's ``LlamaForCausalLM`` (``model.layers.{i}.self_attn.q_proj.weight``, ...), so
``state_dict()`` is the checkpoint, and the arithmetic is the same as the serving model's:
RMSNorm in float32 then scale, rotary on the "rotate half" layout, SwiGLU, no biases.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ttscale.model.config import RopeConfig
from ttscale.model.rope import rotary_table
from ttscale.toy.tokenizer import BOS, EOS, PAD, build_tokenizer, save_tokenizer


@dataclass(frozen=True)
class TinyConfig:
    vocab_size: int
    hidden_size: int = 128
    intermediate_size: int = 384
    num_layers: int = 4
    num_heads: int = 4
    max_positions: int = 256
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def hf_config(self) -> dict:
        """``config.json`` of the equivalent ``LlamaForCausalLM``."""
        tokenizer = build_tokenizer()
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_positions,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "attention_bias": False,
            "mlp_bias": False,
            "tie_word_embeddings": False,
            "bos_token_id": tokenizer.token_to_id(BOS),
            "eos_token_id": tokenizer.token_to_id(EOS),
            "pad_token_id": tokenizer.token_to_id(PAD),
            "torch_dtype": "float32",
        }


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


class Attention(nn.Module):
    def __init__(self, c: TinyConfig):
        super().__init__()
        self.num_heads, self.head_dim = c.num_heads, c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, c.hidden_size, bias=False)
        self.k_proj = nn.Linear(c.hidden_size, c.hidden_size, bias=False)
        self.v_proj = nn.Linear(c.hidden_size, c.hidden_size, bias=False)
        self.o_proj = nn.Linear(c.hidden_size, c.hidden_size, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        b, t, h = x.shape
        q, k, v = (
            proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)  # [B, H, T, D]
            for proj in (self.q_proj, self.k_proj, self.v_proj)
        )
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, h))


class MLP(nn.Module):
    def __init__(self, c: TinyConfig):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, c: TinyConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = Attention(c)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = MLP(c)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    """HF's ``model.`` prefix: embeddings, layers, final norm."""

    def __init__(self, c: TinyConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(c) for _ in range(c.num_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)


class TinyLlama(nn.Module):
    """``forward(ids [B, T]) -> logits [B, T, V]``; right padding is harmless under causal masking."""

    def __init__(self, config: TinyConfig):
        super().__init__()
        self.config = config
        self.model = Decoder(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        rope = RopeConfig(theta=config.rope_theta)
        table = rotary_table(rope, config.head_dim, config.max_positions)
        self.register_buffer("rotary", table, persistent=False)
        self.apply(_init)

    def forward(self, ids: Tensor) -> Tensor:
        return self.logits_at(self.hidden_states(ids)[-1])

    def hidden_states(self, ids: Tensor) -> list[Tensor]:
        """Each layer's output ``[B, T, H]``, first to last."""
        half = self.config.head_dim // 2
        cos, sin = self.rotary[: ids.shape[1], :half], self.rotary[: ids.shape[1], half:]
        x = self.model.embed_tokens(ids)
        out = []
        for layer in self.model.layers:
            x = layer(x, cos, sin)
            out.append(x)
        return out

    def logits_at(self, hidden: Tensor) -> Tensor:
        """The logits a layer's output gives through the final norm and the LM head."""
        return self.lm_head(self.model.norm(hidden))

    def grown(self, extra_layers: int) -> TinyLlama:
        """A copy with ``extra_layers`` more decoder layers on top, each starting as the identity
        (its attention and MLP output projections zero): the same function, more depth to learn
        with."""
        c = self.config
        bigger = TinyLlama(TinyConfig(c.vocab_size, c.hidden_size, c.intermediate_size,
                                      c.num_layers + extra_layers, c.num_heads, c.max_positions,
                                      c.rms_norm_eps, c.rope_theta))
        state = bigger.state_dict()
        state.update(self.state_dict())
        bigger.load_state_dict(state)
        for layer in bigger.model.layers[c.num_layers :]:
            nn.init.zeros_(layer.self_attn.o_proj.weight)
            nn.init.zeros_(layer.mlp.down_proj.weight)
        return bigger

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def save(self, directory: Path) -> None:
        """An HF ``LlamaForCausalLM`` directory: weights, config, tokenizer, generation config."""
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {name: p.detach().float().contiguous() for name, p in self.state_dict().items()}
        save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
        hf = self.config.hf_config()
        (directory / "config.json").write_text(json.dumps(hf, indent=1) + "\n")
        generation = {"bos_token_id": hf["bos_token_id"], "eos_token_id": hf["eos_token_id"],
                      "pad_token_id": hf["pad_token_id"]}
        (directory / "generation_config.json").write_text(json.dumps(generation, indent=1) + "\n")
        save_tokenizer(directory)

    @classmethod
    def from_pretrained(cls, directory: Path) -> TinyLlama:
        """A model :meth:`save` wrote (for evaluation and further training)."""
        hf = json.loads((Path(directory) / "config.json").read_text())
        config = TinyConfig(
            vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"], num_layers=hf["num_hidden_layers"],
            num_heads=hf["num_attention_heads"], max_positions=hf["max_position_embeddings"],
            rms_norm_eps=hf["rms_norm_eps"], rope_theta=hf["rope_theta"],
        )
        model = cls(config)
        model.load_state_dict(load_file(Path(directory) / "model.safetensors"))
        return model.eval()


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary embedding of ``x [B, H, T, D]``: dimension ``i`` pairs with ``i + D/2``."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def _init(module: nn.Module) -> None:
    # GPT-2's small normal initialisation; norms start at one (their constructor).
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
