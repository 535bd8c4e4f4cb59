"""Loading a model directory: config parsing, and every error naming what is wrong."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from tiny_models import build_hf_model, edit_checkpoint, edit_config
from ttscale.model import (
    ConfigError,
    ModelConfig,
    ModelLoadError,
    load_model,
    load_tokenizer,
    read_config,
)
from ttscale.model.config import parse_rope


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    directory = tmp_path_factory.mktemp("qwen2")
    build_hf_model("qwen2", directory)
    return directory


@pytest.fixture
def model_dir(saved, tmp_path):
    """A fresh copy of a saved Qwen2 model, for a test to break."""
    return shutil.copytree(saved, tmp_path / "model")


# ---------------------------------------------------------------------------------------------
# config.json


def _config(**overrides) -> dict:
    base = dict(
        architectures=["LlamaForCausalLM"],
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
    )
    return {**base, **overrides}


def test_family_switches_follow_the_architecture():
    qwen2 = ModelConfig.from_dict(_config(architectures=["Qwen2ForCausalLM"]))
    assert qwen2.qkv_bias and not qwen2.o_bias and not qwen2.qk_norm
    qwen3 = ModelConfig.from_dict(_config(architectures=["Qwen3ForCausalLM"], head_dim=32))
    assert qwen3.qk_norm and qwen3.head_dim == 32 and not qwen3.qkv_bias
    llama = ModelConfig.from_dict(_config(attention_bias=True))
    assert llama.qkv_bias and llama.o_bias and llama.head_dim == 16 and llama.head == "lm"
    assert ModelConfig.from_dict(_config(architectures=["Qwen2ForPrmModel"])).head == "value"


def test_rope_styles_parse_alike():
    scaling = {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    published = parse_rope(
        {"rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", **scaling}}
    )
    older = parse_rope({"rope_theta": 500000.0, "rope_scaling": {"type": "llama3", **scaling}})
    modern = parse_rope(
        {"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, **scaling}}
    )
    assert published == older == modern
    assert modern.kind == "llama3" and modern.theta == 500000.0 and modern.factor == 8.0
    assert parse_rope({}).theta == 10000.0 and parse_rope({}).kind == "default"


def test_unsupported_rope_type_is_named():
    with pytest.raises(ConfigError, match="rope type 'dynamic' is not supported"):
        ModelConfig.from_dict(_config(rope_scaling={"type": "dynamic", "factor": 2.0}))


def test_llama3_rope_without_its_parameters_is_named():
    with pytest.raises(ConfigError, match="rope_scaling.low_freq_factor"):
        ModelConfig.from_dict(_config(rope_scaling={"rope_type": "llama3", "factor": 8.0}))


def test_sliding_window_caps_the_context(tmp_path):
    build_hf_model("mistral", tmp_path)
    edit_config(tmp_path, lambda c: c.update(sliding_window=64))
    assert load_model(tmp_path, dtype="float32").max_positions == 64
    with pytest.raises(ModelLoadError, match="max_positions: 100 exceeds the sliding window"):
        load_model(tmp_path, dtype="float32", max_positions=100)


def test_qwen2_sliding_window_applies_only_when_used():
    off = ModelConfig.from_dict(
        _config(architectures=["Qwen2ForCausalLM"], sliding_window=4096, use_sliding_window=False)
    )
    assert off.sliding_window is None
    on = ModelConfig.from_dict(
        _config(
            architectures=["Qwen2ForCausalLM"],
            sliding_window=4096,
            use_sliding_window=True,
            max_window_layers=1,
        )
    )
    assert on.sliding_window == 4096


def test_generation_config_adds_end_of_sequence_tokens(model_dir):
    edit_config(model_dir, lambda c: c.update(eos_token_id=7))
    (model_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 9]}))
    assert load_model(model_dir, dtype="float32").config.eos_token_ids == (7, 9)


@pytest.mark.parametrize("keep", [100, 5000])
def test_damaged_weights_file_is_named(model_dir, keep):
    path = model_dir / "model.safetensors"
    path.write_bytes(path.read_bytes()[:keep])  # a header cut short, or tensors cut short
    with pytest.raises(ModelLoadError, match=r"model\.safetensors: not a readable safetensors"):
        load_model(model_dir, dtype="float32")


@pytest.mark.parametrize("where", ["config.json", "generation_config.json"])
def test_end_of_sequence_token_outside_the_vocabulary_is_named(model_dir, where):
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    if where == "config.json":
        edit_config(model_dir, lambda c: c.update(eos_token_id=vocab))
    else:
        (model_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [vocab + 5]}))
    with pytest.raises(ModelLoadError, match=r"eos_token_id: \d+ is outside the vocabulary"):
        load_model(model_dir, dtype="float32")


# ---------------------------------------------------------------------------------------------
# dtype


@pytest.mark.parametrize("dtype", ["float32", "fp32", "torch.float32", torch.float32])
def test_dtype_accepts_a_name_or_a_torch_dtype(saved, dtype):
    assert load_model(saved, dtype=dtype).dtype == torch.float32


def test_default_dtype_on_cpu_is_float32(saved):
    model = load_model(saved, device="cpu")
    assert model.dtype == torch.float32 and model.device.type == "cpu"


def test_float16_on_cpu_is_refused(saved):
    with pytest.raises(ModelLoadError, match="dtype: float16 is not supported on cpu"):
        load_model(saved, device="cpu", dtype="fp16")


def test_unknown_dtype_name_is_named(saved):
    with pytest.raises(ModelLoadError, match="dtype: unknown name 'int8'"):
        load_model(saved, dtype="int8")


def test_non_float_torch_dtype_is_refused(saved):
    with pytest.raises(ModelLoadError, match="dtype: int32 is not supported on cpu"):
        load_model(saved, dtype=torch.int32)


# ---------------------------------------------------------------------------------------------
# Missing and malformed files


def test_missing_directory_is_named(tmp_path):
    with pytest.raises(ModelLoadError, match="model directory not found: .*nowhere"):
        load_model(tmp_path / "nowhere")


def test_file_instead_of_directory_is_named(tmp_path):
    (tmp_path / "weights").write_text("")
    with pytest.raises(ModelLoadError, match="is not a directory"):
        load_model(tmp_path / "weights")


def test_missing_config_is_named(model_dir):
    (model_dir / "config.json").unlink()
    with pytest.raises(ConfigError, match="config.json: not found"):
        load_model(model_dir)


def test_malformed_config_is_named(model_dir):
    (model_dir / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json: not valid JSON"):
        load_model(model_dir)


def test_unknown_architecture_is_named(model_dir):
    edit_config(model_dir, lambda c: c.update(architectures=["GPT2LMHeadModel"]))
    with pytest.raises(ConfigError, match="unknown architecture GPT2LMHeadModel"):
        load_model(model_dir)


def test_missing_architectures_entry_is_named(model_dir):
    edit_config(model_dir, lambda c: c.pop("architectures"))
    with pytest.raises(ConfigError, match="no 'architectures' entry"):
        load_model(model_dir)


def test_missing_weights_are_named(model_dir):
    (model_dir / "model.safetensors").rename(model_dir / "weights.safetensors")
    with pytest.raises(
        ModelLoadError,
        match="no weights: neither model.safetensors nor .*found weights.safetensors",
    ):
        load_model(model_dir)


def test_missing_shard_is_named(tmp_path):
    build_hf_model("qwen2", tmp_path, max_shard_size="40KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(ModelLoadError, match=f"lists {shard.name}, which is missing"):
        load_model(tmp_path)


def test_index_naming_a_tensor_its_shard_lacks_is_named(tmp_path):
    build_hf_model("qwen2", tmp_path, max_shard_size="40KB")
    index_path = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shards = sorted(set(index["weight_map"].values()))
    wrong = next(name for name, shard in index["weight_map"].items() if shard != shards[0])
    index["weight_map"][wrong] = shards[0]
    index_path.write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match=f"puts {wrong} in {shards[0]}, which lacks it"):
        load_model(tmp_path)


def test_missing_tensor_is_named(model_dir):
    edit_checkpoint(
        model_dir,
        lambda t: {k: v for k, v in t.items() if k != "model.layers.1.self_attn.k_proj.bias"},
    )
    with pytest.raises(
        ModelLoadError,
        match="missing tensors in the checkpoint: model.layers.1.self_attn.k_proj.bias",
    ):
        load_model(model_dir)


def test_extra_tensor_is_named(model_dir):
    edit_checkpoint(
        model_dir, lambda t: {**t, "model.layers.0.mlp.surprise.weight": torch.zeros(3)}
    )
    with pytest.raises(
        ModelLoadError,
        match="unexpected tensors in the checkpoint: model.layers.0.mlp.surprise.weight",
    ):
        load_model(model_dir)


def test_shape_mismatch_names_tensor_and_both_shapes(model_dir):
    edit_checkpoint(model_dir, lambda t: {**t, "model.norm.weight": torch.ones(65)})
    with pytest.raises(
        ModelLoadError, match=r"shape mismatch: model.norm.weight expected \[64\], got \[65\]"
    ):
        load_model(model_dir)


def test_reward_head_without_its_tensors_is_named(model_dir):
    edit_config(model_dir, lambda c: c.update(architectures=["Qwen2ForProcessRewardModel"]))
    with pytest.raises(
        ModelLoadError, match="missing tensors in the checkpoint: score.0.bias, score.0.weight"
    ):
        load_model(model_dir)


def test_rotary_buffers_of_old_checkpoints_are_skipped(model_dir):
    edit_checkpoint(
        model_dir, lambda t: {**t, "model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)}
    )
    assert load_model(model_dir).config.architecture == "Qwen2ForCausalLM"


def test_read_config_accepts_the_directory_or_the_file(saved):
    assert read_config(saved) == read_config(saved / "config.json")


# ---------------------------------------------------------------------------------------------
# Tokenizer


def _write_tokenizer(directory, chat_template: str | None):
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<s>", "</s>", "<unk>", "user", "assistant", ":", "what", "is", "2+2", "?"]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(directory / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": {"content": "</s>"}}
    if chat_template is not None:
        config["chat_template"] = chat_template
    (directory / "tokenizer_config.json").write_text(json.dumps(config))


def test_tokenizer_encodes_decodes_and_renders_its_chat_template(tmp_path):
    template = (
        "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}assistant :{% endif %}"
    )
    _write_tokenizer(tmp_path, template)
    tokenizer = load_tokenizer(tmp_path)
    ids = tokenizer.encode("what is 2+2 ?")
    assert ids == [6, 7, 8, 9] and tokenizer.decode(ids) == "what is 2+2 ?"
    assert tokenizer.eos_token == "</s>" and tokenizer.eos_token_id == 1
    text = tokenizer.apply_chat_template([{"role": "user", "content": "what is 2+2 ?"}])
    assert text == "user : what is 2+2 ? assistant :"


def test_tokenizer_without_a_chat_template_says_so(tmp_path):
    _write_tokenizer(tmp_path, None)
    with pytest.raises(
        ValueError, match="chat template: this model's tokenizer_config.json has none"
    ):
        load_tokenizer(tmp_path).apply_chat_template([{"role": "user", "content": "hi"}])


def test_missing_tokenizer_is_named(tmp_path):
    with pytest.raises(ValueError, match="tokenizer.json: not found"):
        load_tokenizer(tmp_path)
