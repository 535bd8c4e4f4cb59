"""A model's ``config.json`` as a dataclass: the transformer's shape, rotary embedding and head.

One transformer serves the Llama, Qwen2, Mistral and Qwen3 families; they differ only in the
switches below (qkv bias, q/k norm, explicit head_dim, tied embeddings) and in the head on top:

- ``"lm"``: a causal LM (``*ForCausalLM``). Token-head PRMs (Math-Shepherd, RLHFlow) are causal
  LMs whose ``+``/``-`` logits are read, so they load as this kind too.
- ``"two_class"``: ``Qwen2ForProcessRewardModel`` (Qwen2.5-Math-PRM): ``score.0`` Linear(H, H),
  ReLU, ``score.2`` Linear(H, num_labels). ``Qwen2ForRewardModel`` (Qwen2.5-Math-RM, an ORM) has
  the same head with one label.
- ``"value"``: ``Qwen2ForPrmModel`` (Skywork-o1-Open-PRM): ``v_head.summary`` Linear(H, 1).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ttscale.errors import ConfigError, ModelLoadError  # re-exported here

# architecture -> (family, head kind)
ARCHITECTURES: dict[str, tuple[str, str]] = {
    "LlamaForCausalLM": ("llama", "lm"),
    "MistralForCausalLM": ("mistral", "lm"),
    "Qwen2ForCausalLM": ("qwen2", "lm"),
    "Qwen3ForCausalLM": ("qwen3", "lm"),
    "Qwen2ForProcessRewardModel": ("qwen2", "two_class"),
    "Qwen2ForRewardModel": ("qwen2", "two_class"),
    "Qwen2ForPrmModel": ("qwen2", "value"),
}

# Default label count of the two-class-style heads when config.json does not say.
DEFAULT_NUM_LABELS = {"Qwen2ForProcessRewardModel": 2, "Qwen2ForRewardModel": 1}

ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding: ``theta`` and, for scaled variants, the scaling parameters.

    ``kind`` is ``"default"``, ``"linear"`` (positions divided by ``factor``) or ``"llama3"``
    (Llama 3.1's per-frequency scaling with ``low_freq_factor``, ``high_freq_factor`` and
    ``original_max_position_embeddings``).
    """

    theta: float = 10000.0
    kind: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    family: str
    head: str  # "lm", "two_class" or "value"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope: RopeConfig
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    tie_word_embeddings: bool = False
    num_labels: int = 0  # outputs of the two-class head (0 for other heads)
    # The longest context over which the model's attention is full attention; None = unlimited.
    # Sliding-window attention is not implemented, so contexts are capped at the window, where
    # sliding and full attention agree.
    sliding_window: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    torch_dtype: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Parse a config.json dictionary; :class:`ConfigError` names what is wrong."""
        architecture = _architecture(d)
        family, head = ARCHITECTURES[architecture]
        hidden = _int(d, "hidden_size")
        heads = _int(d, "num_attention_heads")
        kv_heads = int(d.get("num_key_value_heads") or heads)
        head_dim = int(d.get("head_dim") or 0) or hidden // heads
        if heads % kv_heads:
            raise ConfigError(
                f"config.json: num_attention_heads ({heads}) must be a multiple of "
                f"num_key_value_heads ({kv_heads})"
            )
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"config.json: hidden_act {act!r} is not supported (only 'silu')")
        attention_bias = bool(d.get("attention_bias", False))
        num_labels = 0
        if head == "two_class":
            num_labels = int(
                d.get("num_labels")
                or len(d.get("id2label") or {})
                or DEFAULT_NUM_LABELS[architecture]
            )
        return cls(
            architecture=architecture,
            family=family,
            head=head,
            vocab_size=_int(d, "vocab_size"),
            hidden_size=hidden,
            intermediate_size=_int(d, "intermediate_size"),
            num_layers=_int(d, "num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
            rope=parse_rope(d),
            # Qwen2 always has q/k/v biases and none on o_proj; Llama, Mistral and Qwen3 put
            # attention_bias on all four projections.
            qkv_bias=family == "qwen2" or attention_bias,
            o_bias=family != "qwen2" and attention_bias,
            mlp_bias=bool(d.get("mlp_bias", False)),
            qk_norm=family == "qwen3",
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            num_labels=num_labels,
            sliding_window=_sliding_window(d, family),
            eos_token_ids=token_ids(d.get("eos_token_id")),
            bos_token_id=d.get("bos_token_id"),
            torch_dtype=d.get("torch_dtype") or d.get("dtype"),
            raw=d,
        )


def read_config(path: str | Path) -> ModelConfig:
    """Read and parse ``config.json`` (a file, or the model directory holding it)."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ConfigError(f"config.json: not found at {path}")
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ConfigError(f"config.json: not valid JSON ({path}: {error})") from None
    if not isinstance(d, dict):
        raise ConfigError(f"config.json: expected a JSON object, got {type(d).__name__} ({path})")
    return ModelConfig.from_dict(d)


def parse_rope(d: dict[str, Any]) -> RopeConfig:
    """The rotary parameters from either config style.

    Published checkpoints write ``rope_theta`` and ``rope_scaling`` (``{"type": ...}`` or
    ``{"rope_type": ...}``) at the top level; transformers 5 writes one ``rope_parameters``
    dictionary holding ``rope_theta`` and ``rope_type`` together.
    """
    params = dict(d.get("rope_parameters") or {})
    if any(isinstance(value, dict) for value in params.values()):
        raise ConfigError("config.json: per-layer-type rope_parameters are not supported")
    params.update(d.get("rope_scaling") or {})
    theta = params.get("rope_theta", d.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise ConfigError(
            f"config.json: rope type {kind!r} is not supported (supported: {', '.join(ROPE_TYPES)})"
        )
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ConfigError("config.json: partial_rotary_factor != 1 is not supported")
    rope = RopeConfig(theta=float(theta), kind=kind)
    if kind == "linear":
        rope = RopeConfig(
            theta=float(theta), kind=kind, factor=_float(params, "factor", "rope_scaling")
        )
    elif kind == "llama3":
        rope = RopeConfig(
            theta=float(theta),
            kind=kind,
            factor=_float(params, "factor", "rope_scaling"),
            low_freq_factor=_float(params, "low_freq_factor", "rope_scaling"),
            high_freq_factor=_float(params, "high_freq_factor", "rope_scaling"),
            original_max_position_embeddings=int(
                params.get("original_max_position_embeddings") or _int(d, "max_position_embeddings")
            ),
        )
        if not rope.high_freq_factor > rope.low_freq_factor:
            raise ConfigError("config.json: llama3 rope needs high_freq_factor > low_freq_factor")
    return rope


def token_ids(value: Any) -> tuple[int, ...]:
    """A special-token entry, written as one id, a list of ids, or null."""
    if value is None:
        return ()
    return tuple(int(v) for v in value) if isinstance(value, list) else (int(value),)


def _architecture(d: dict[str, Any]) -> str:
    names = d.get("architectures")
    if not names:
        raise ConfigError(
            f"config.json: no 'architectures' entry (expected one of {', '.join(ARCHITECTURES)})"
        )
    known = [name for name in names if name in ARCHITECTURES]
    if not known:
        raise ConfigError(
            f"config.json: unknown architecture {', '.join(map(str, names))} "
            f"(supported: {', '.join(ARCHITECTURES)})"
        )
    return known[0]


def _sliding_window(d: dict[str, Any], family: str) -> int | None:
    """The window if any layer uses sliding-window attention, else None."""
    window = d.get("sliding_window")
    if window is None:
        return None
    if family == "mistral":
        return int(window)
    layer_types = d.get("layer_types")
    if layer_types is not None:
        return int(window) if "sliding_attention" in layer_types else None
    # Qwen2/Qwen3 before layer_types: the window applies from layer max_window_layers on.
    if not d.get("use_sliding_window", False):
        return None
    first = int(d.get("max_window_layers", 0))
    return int(window) if first < int(d.get("num_hidden_layers", 0)) else None


def _int(d: dict[str, Any], key: str) -> int:
    value = d.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"config.json: {key} must be a positive integer, got {value!r}")
    return value


def _float(d: dict[str, Any], key: str, where: str) -> float:
    value = d.get(key)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ConfigError(f"config.json: {where}.{key} must be a number, got {value!r}")
    return float(value)
