"""The benchmark's model, made here: no weights or tokenizer can be downloaded.

A 21.7M-parameter random model of the Qwen2 layout (hidden 384, intermediate 1024, 6 layers,
6 query / 2 KV heads of 64, vocabulary 32,000, qkv bias, tied embeddings), written as
``config.json`` + ``model.safetensors``, and a byte-level BPE tokenizer of 32,000 ids trained
once with the ``tokenizers`` library on benchmark questions (GSM8K's ``question``, MATH-500's
``problem``), written as ``tokenizer.json`` + ``tokenizer_config.json`` so that ttscale, vLLM
and transformers all read the same one. Where the text has fewer merges than the vocabulary
wants, the rest of the ids are reserved special tokens (``<|reserved_K|>``), so ids run to
exactly 32,000 and match the model's embedding rows.

    python -m ttscale.benchmark.models --out bench/models/qwen2-21m \
        --questions ../shared/data/gsm8k_test.jsonl ../shared/data/math500.jsonl

(``make bench-model``). Both steps are skipped when their files exist.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

QWEN2_21M = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 384,
    "intermediate_size": 1024, "num_hidden_layers": 6, "num_attention_heads": 6,
    "num_key_value_heads": 2, "vocab_size": 32000, "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "tie_word_embeddings": True,
    "use_sliding_window": False, "sliding_window": None, "max_window_layers": 6,
    "bos_token_id": 0, "eos_token_id": 0, "hidden_act": "silu", "torch_dtype": "float32",
    "initializer_range": 0.02, "attention_dropout": 0.0, "use_cache": True,
}
EOS = "<|endoftext|>"


def write_model(directory: Path, config: dict = QWEN2_21M, seed: int = 0) -> int:
    """Random weights of ``config``'s Qwen2 layout (normal, std 0.02; norms 1) as
    model.safetensors beside config.json; returns the parameter count."""
    import torch
    from safetensors.torch import save_file

    h, inter = config["hidden_size"], config["intermediate_size"]
    head_dim = h // config["num_attention_heads"]
    kv = config["num_key_value_heads"] * head_dim
    gen = torch.Generator().manual_seed(seed)
    normal = lambda *shape: torch.randn(*shape, generator=gen) * config["initializer_range"]
    tensors = {"model.embed_tokens.weight": normal(config["vocab_size"], h),
               "model.norm.weight": torch.ones(h)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        tensors |= {
            p + "self_attn.q_proj.weight": normal(h, h), p + "self_attn.q_proj.bias": normal(h),
            p + "self_attn.k_proj.weight": normal(kv, h), p + "self_attn.k_proj.bias": normal(kv),
            p + "self_attn.v_proj.weight": normal(kv, h), p + "self_attn.v_proj.bias": normal(kv),
            p + "self_attn.o_proj.weight": normal(h, h),
            p + "mlp.gate_proj.weight": normal(inter, h),
            p + "mlp.up_proj.weight": normal(inter, h),
            p + "mlp.down_proj.weight": normal(h, inter),
            p + "input_layernorm.weight": torch.ones(h),
            p + "post_attention_layernorm.weight": torch.ones(h),
        }
    if not config["tie_word_embeddings"]:
        tensors["lm_head.weight"] = normal(config["vocab_size"], h)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config, indent=1))
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    return sum(t.numel() for t in tensors.values())


def read_questions(paths: list[Path]) -> list[str]:
    """Every ``question`` (GSM8K) or ``problem`` (MATH-500) of JSONL files."""
    texts = []
    for path in paths:
        for line in path.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                texts.append(record.get("question") or record.get("problem") or "")
    return [t for t in texts if t]


def write_tokenizer(directory: Path, texts: list[str], vocab_size: int) -> int:
    """A byte-level BPE tokenizer of exactly ``vocab_size`` ids trained on ``texts``; returns
    how many of them are learnt (the rest are reserved special tokens)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer)
    learnt = tokenizer.get_vocab_size()
    tokenizer.add_special_tokens([f"<|reserved_{k}|>" for k in range(vocab_size - learnt)])
    assert tokenizer.get_vocab_size() == vocab_size, tokenizer.get_vocab_size()
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS, "bos_token": None,
        "pad_token": EOS, "model_max_length": QWEN2_21M["max_position_embeddings"],
        "add_bos_token": False, "clean_up_tokenization_spaces": False}, indent=1))
    return learnt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, metavar="DIR")
    parser.add_argument("--questions", type=Path, nargs="+", required=True, metavar="FILE.jsonl",
                        help="JSONL files whose question/problem texts train the tokenizer")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    missing = [str(p) for p in args.questions if not p.is_file()]
    if missing:
        parser.error(f"argument --questions: no such file: {', '.join(missing)}")
    if not (args.out / "model.safetensors").exists():
        params = write_model(args.out, seed=args.seed)
        print(f"model: {params / 1e6:.2f}M parameters in {args.out}")
    if not (args.out / "tokenizer.json").exists():
        texts = read_questions(args.questions)
        learnt = write_tokenizer(args.out, texts, QWEN2_21M["vocab_size"])
        print(f"tokenizer: {learnt} ids learnt from {len(texts)} texts, "
              f"{QWEN2_21M['vocab_size'] - learnt} reserved, in {args.out}")
    print(f"ready: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
