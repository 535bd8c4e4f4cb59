"""The model layer: one transformer for the Llama / Qwen2 / Mistral / Qwen3 families, paged KV.

``load_model(dir)`` reads a local HF directory (config.json + safetensors) into a
:class:`Transformer`; an engine allocates a :class:`KVCache`, describes each step with an
:class:`AttentionBatch`, calls ``model(input_ids, batch, kv_cache, rows)`` for hidden states and
``compute_logits`` / ``compute_scores`` for the head. ``load_tokenizer(dir)`` for text.
"""

from ttscale.model.batch import AttentionBatch
from ttscale.model.config import ConfigError, ModelConfig, ModelLoadError, RopeConfig, read_config
from ttscale.model.kv_cache import KVCache, block_bytes
from ttscale.model.loader import load_model
from ttscale.model.tokenizer import Tokenizer, TokenizerError, load_tokenizer
from ttscale.model.transformer import Transformer

__all__ = [
    "AttentionBatch",
    "ConfigError",
    "KVCache",
    "ModelConfig",
    "ModelLoadError",
    "RopeConfig",
    "Tokenizer",
    "TokenizerError",
    "Transformer",
    "block_bytes",
    "load_model",
    "load_tokenizer",
    "read_config",
]
