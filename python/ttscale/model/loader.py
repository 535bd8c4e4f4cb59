"""Load a local Hugging Face model directory into a :class:`~ttscale.model.transformer.Transformer`.

A directory holds ``config.json`` and either ``model.safetensors`` or shards listed by
``model.safetensors.index.json``. Nothing is ever downloaded. Every tensor the model needs must
be in the checkpoint with the expected shape, and every tensor in the checkpoint must be used,
except these, which are skipped: ``lm_head.weight`` of a model with tied embeddings or with a
reward head instead of an LM head (Skywork's PRM ships its base model's), and rotary
``inv_freq`` buffers that some older checkpoints saved.

Checkpoint names are the HF ones (``model.layers.{i}.self_attn.q_proj.weight``, ...); the
model's fused projections receive them as row slices (:func:`checkpoint_layout`).
"""

from __future__ import annotations

import dataclasses
import json
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from ttscale.model.config import ConfigError, ModelConfig, ModelLoadError, read_config, token_ids
from ttscale.model.transformer import Linear, Transformer

DTYPE_NAMES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}
SUPPORTED_DTYPES = {
    "cpu": (torch.float32, torch.bfloat16),
    "cuda": (torch.bfloat16, torch.float16, torch.float32),
}
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def check_load_arguments(name: str, model_dir, device, dtype) -> None:
    """What :func:`load_model` takes, checked before anything is read: ``model_dir`` (the
    caller's argument ``name``) a path to a directory, ``device`` a CPU or an available CUDA
    device, ``dtype`` a torch dtype or one of :data:`DTYPE_NAMES`. Errors name the argument."""
    import os

    from ttscale.errors import InvalidArgument

    if not isinstance(model_dir, (str, os.PathLike)) or not os.fspath(model_dir):
        raise InvalidArgument(f"{name}: expected a model directory (a path), got {model_dir!r:.60}",
                              param=name)
    if not Path(model_dir).is_dir():
        what = "is not a directory" if Path(model_dir).exists() else "does not exist"
        raise ModelLoadError(f"{name}: {model_dir} {what}", param=name)
    if device is not None:
        kind = None
        if isinstance(device, (str, torch.device)):
            try:
                kind = torch.device(device).type
            except (RuntimeError, ValueError):
                pass
        if kind not in ("cpu", "cuda"):
            raise InvalidArgument(f"device: expected 'cpu', 'cuda' or 'cuda:N', got {device!r}")
        if kind == "cuda" and not torch.cuda.is_available():
            raise InvalidArgument(f"device: {device!r}: this machine has no CUDA device")
        index = torch.device(device).index
        if kind == "cuda" and index is not None and index >= torch.cuda.device_count():
            raise InvalidArgument(f"device: {device!r}: this machine has "
                                  f"{torch.cuda.device_count()} CUDA devices")
    if dtype is not None and not isinstance(dtype, torch.dtype) and not (
            isinstance(dtype, str) and dtype.removeprefix("torch.") in DTYPE_NAMES):
        raise InvalidArgument(f"dtype: expected one of {', '.join(DTYPE_NAMES)} or a torch dtype, "
                              f"got {dtype!r}")


def load_model(
    model_dir: str | Path,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
    max_positions: int | None = None,
) -> Transformer:
    """Build the model a directory describes and fill it with the directory's weights.

    Parameters
    ----------
    model_dir : str or Path
        A local directory; never fetched from anywhere.
    device : optional
        Default ``"cuda"`` when available, else ``"cpu"``.
    dtype : torch.dtype or str, optional
        ``torch.bfloat16`` or a name (``"bfloat16"``, ``"bf16"``, ``"float32"``, ...). Default: on a
        GPU the checkpoint's ``torch_dtype`` if it is bf16 or fp16, else bf16; on the CPU fp32.
        CPU: fp32 or bf16. GPU: bf16, fp16 or fp32.
    max_positions : int, optional
        Longest sequence (prompt + suffix) to serve; sizes the rotary table. Default
        ``max_position_embeddings``, capped at the sliding window for models that have one.
    """
    model_dir = Path(model_dir)
    if not model_dir.exists():
        raise ModelLoadError(f"model directory not found: {model_dir}")
    if not model_dir.is_dir():
        raise ModelLoadError(f"model directory: {model_dir} is not a directory")
    config = _with_generation_eos(read_config(model_dir), model_dir)
    device = torch.device(
        device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    )
    dtype = resolve_dtype(dtype, device, config)
    max_positions = _max_positions(config, max_positions)
    files = weight_files(model_dir)  # name -> file, before allocating anything
    model = Transformer(config, max_positions, dtype=dtype, device=device)
    load_weights(model, files)
    model.pack_weights()
    return model.eval()


def resolve_dtype(
    dtype: torch.dtype | str | None, device: torch.device, config: ModelConfig
) -> torch.dtype:
    """The parameter dtype from a dtype or its name; an error if the device cannot run it."""
    if dtype is None:
        if device.type == "cpu":
            return torch.float32
        return {"float16": torch.float16}.get(config.torch_dtype or "", torch.bfloat16)
    if isinstance(dtype, str):
        name = dtype.removeprefix("torch.")
        if name not in DTYPE_NAMES:
            raise ModelLoadError(f"dtype: unknown name {dtype!r} (known: {', '.join(DTYPE_NAMES)})",
                                 param="dtype")
        dtype = DTYPE_NAMES[name]
    supported = SUPPORTED_DTYPES.get(device.type, ())
    if dtype not in supported:
        names = ", ".join(str(d).removeprefix("torch.") for d in supported) or "none"
        raise ModelLoadError(
            f"dtype: {str(dtype).removeprefix('torch.')} is not supported on {device.type} "
            f"(supported: {names})",
            param="dtype",
        )
    return dtype


def weight_files(model_dir: Path) -> dict[str, Path]:
    """Every checkpoint tensor's name and the safetensors file holding it."""
    index = model_dir / INDEX_FILE
    single = model_dir / SINGLE_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ModelLoadError(f"{INDEX_FILE}: malformed ({error!r}) in {model_dir}") from None
        files = {name: model_dir / file for name, file in weight_map.items()}
        for path in sorted(set(files.values())):
            if not path.is_file():
                raise ModelLoadError(
                    f"{INDEX_FILE} lists {path.name}, which is missing from {model_dir}"
                )
        return files
    if single.is_file():
        with _open_weights(single) as f:
            return {name: single for name in f.keys()}
    others = sorted(p.name for p in model_dir.glob("*.bin")) + sorted(
        p.name for p in model_dir.glob("*.safetensors")
    )
    found = (
        f"; found {', '.join(others)}, but only {SINGLE_FILE} or an index are read"
        if others
        else ""
    )
    raise ModelLoadError(
        f"no weights: neither {SINGLE_FILE} nor {INDEX_FILE} in {model_dir}{found}"
    )


@contextmanager
def _open_weights(path: Path):
    """``safe_open(path)``, with a damaged file (truncated, not safetensors) named."""
    try:
        with safe_open(path, framework="pt") as f:
            yield f
    except SafetensorError as error:
        raise ModelLoadError(f"{path}: not a readable safetensors file ({error})") from None


def load_weights(model: Transformer, files: dict[str, Path]) -> None:
    """Check names and shapes of every tensor first, then copy them in (converting dtype)."""
    layout = checkpoint_layout(model)
    present = {name for name in files if not _skipped(name, model.config)}
    missing = sorted(set(layout) - present)
    extra = sorted(present - set(layout))
    if missing:
        raise ModelLoadError(f"missing tensors in the checkpoint: {_names(missing)}")
    if extra:
        raise ModelLoadError(f"unexpected tensors in the checkpoint: {_names(extra)}")
    by_file: dict[Path, list[str]] = {}
    for name in sorted(present):
        by_file.setdefault(files[name], []).append(name)
    for path, names in by_file.items():
        with _open_weights(path) as f:
            held = set(f.keys())
            for name in names:
                if name not in held:
                    raise ModelLoadError(f"{INDEX_FILE} puts {name} in {path.name}, which lacks it")
                got = list(f.get_slice(name).get_shape())
                expected = list(layout[name].shape)
                if got != expected:
                    raise ModelLoadError(
                        f"shape mismatch: {name} expected {expected}, got {got} (in {path.name})"
                    )
    for path, names in by_file.items():
        with _open_weights(path) as f:
            for name in names:
                layout[name].copy_(f.get_tensor(name))


def checkpoint_layout(model: Transformer) -> dict[str, Tensor]:
    """HF checkpoint name -> the tensor (a parameter, or rows of a fused one) it fills."""
    c = model.config
    q, kv, inter = c.q_size, c.kv_size, c.intermediate_size
    layout: dict[str, Tensor] = {
        "model.embed_tokens.weight": model.embed_tokens,
        "model.norm.weight": model.norm.weight,
    }
    for i, layer in enumerate(model.layers):
        prefix = f"model.layers.{i}."
        attn, mlp = layer.self_attn, layer.mlp
        _fused(
            layout,
            prefix + "self_attn.",
            attn.qkv_proj,
            {"q_proj": (0, q), "k_proj": (q, q + kv), "v_proj": (q + kv, q + 2 * kv)},
        )
        _linear(layout, prefix + "self_attn.o_proj", attn.o_proj)
        if attn.q_norm is not None:
            layout[prefix + "self_attn.q_norm.weight"] = attn.q_norm.weight
            layout[prefix + "self_attn.k_norm.weight"] = attn.k_norm.weight
        _fused(
            layout,
            prefix + "mlp.",
            mlp.gate_up_proj,
            {"gate_proj": (0, inter), "up_proj": (inter, 2 * inter)},
        )
        _linear(layout, prefix + "mlp.down_proj", mlp.down_proj)
        layout[prefix + "input_layernorm.weight"] = layer.input_layernorm.weight
        layout[prefix + "post_attention_layernorm.weight"] = layer.post_attention_layernorm.weight
    if c.head == "lm" and not c.tie_word_embeddings:
        layout["lm_head.weight"] = model.lm_head
    elif c.head == "two_class":
        _linear(layout, "score.0", model.score_hidden)
        _linear(layout, "score.2", model.score_out)
    elif c.head == "value":
        _linear(layout, "v_head.summary", model.score_out)
    return layout


def _fused(
    layout: dict[str, Tensor], prefix: str, fused: Linear, parts: dict[str, tuple[int, int]]
) -> None:
    for name, (start, end) in parts.items():
        layout[f"{prefix}{name}.weight"] = fused.weight[start:end]
        if fused.bias is not None:
            layout[f"{prefix}{name}.bias"] = fused.bias[start:end]


def _linear(layout: dict[str, Tensor], prefix: str, linear: Linear) -> None:
    layout[prefix + ".weight"] = linear.weight
    if linear.bias is not None:
        layout[prefix + ".bias"] = linear.bias


def _skipped(name: str, config: ModelConfig) -> bool:
    if name.endswith("rotary_emb.inv_freq"):
        return True
    return name == "lm_head.weight" and (config.head != "lm" or config.tie_word_embeddings)


def _names(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _max_positions(config: ModelConfig, requested: int | None) -> int:
    limit = config.max_position_embeddings
    if config.sliding_window is not None:
        limit = min(limit, config.sliding_window)
    if requested is None:
        return limit
    if requested <= 0:
        raise ModelLoadError(f"max_positions: expected a positive count, got {requested}")
    if config.sliding_window is not None and requested > config.sliding_window:
        raise ModelLoadError(
            f"max_positions: {requested} exceeds the sliding window ({config.sliding_window}); "
            "sliding-window attention is not implemented, so contexts are limited to the window"
        )
    return requested


def _with_generation_eos(config: ModelConfig, model_dir: Path) -> ModelConfig:
    """Add generation_config.json's end-of-sequence tokens (chat models list several there)."""
    path = model_dir / "generation_config.json"
    eos = None
    if path.is_file():
        try:
            eos = json.loads(path.read_text()).get("eos_token_id")
        except (json.JSONDecodeError, AttributeError):
            raise ConfigError(f"generation_config.json: not a valid JSON object ({path})") from None
    merged = tuple(dict.fromkeys(config.eos_token_ids + token_ids(eos)))
    bad = next((i for i in merged if not 0 <= i < config.vocab_size), None)
    if bad is not None:
        raise ConfigError(f"eos_token_id: {bad} is outside the vocabulary [0, {config.vocab_size}) "
                          f"of {model_dir} (config.json or generation_config.json)")
    return dataclasses.replace(config, eos_token_ids=merged)
