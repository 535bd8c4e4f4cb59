"""Tokenizers and tiny random PRMs of every format, built locally (nothing is downloaded).

Tokenizers are small BPEs trained here on synthetic math text, in the three shapes real PRMs
use: byte-level with Qwen2's or Llama 3's pre-tokenizer regex, and SentencePiece-like (a
Metaspace pre-tokenizer that prepends ``▁`` to the text, as Mistral's and Llama 2's do); plus
the toy character tokenizer. Chat templates are written here in the style of ChatML and of
Llama 3 (a BOS, role headers, trimmed contents).

PRMs are random transformers models saved in HF layout: causal LMs for the token-head formats,
and a Qwen2 backbone with ``score.0``/``score.2`` (Qwen2ForProcessRewardModel) or
``v_head.summary`` (Qwen2ForPrmModel) heads, whose classes transformers does not ship. The
``reference_scores`` functions rescore a whole sequence with one transformers forward.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"
               r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

CHATML_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<extra_0>"]
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                   "<|end_header_id|>", "<|eot_id|>"]
SENTENCEPIECE_SPECIALS = ["<unk>", "<s>", "</s>"]

CHATML_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant."
    "<|im_end|>\n{% endif %}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>"
    "\n\n{{ m['content'] | trim }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}"
    "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)

QUESTION = "Let $x = 3$ and $y = 4$. What is $x^2 + y^2$, and is it a perfect square?"
STEPS = [
    "Step 1: We have $x^2 = 9$ and $y^2 = 16$.",
    "Step 2: So $x^2 + y^2 = 9 + 16 = 25$.\nThat is $5^2$.",
    "The answer is $\\boxed{25}$, a perfect square.",
]


def math_corpus(n: int = 400, seed: int = 0) -> list[str]:
    """Lines of arithmetic prose with LaTeX, steps tagged with ``ки`` and ``+``/``-`` labels."""
    rng = random.Random(seed)
    lines = [QUESTION, *STEPS]
    for _ in range(n):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        lines.append(f"What is {a} + {b}? Let $x = {a}$. Step 1: We compute {a}+{b}={a + b}. ки\n"
                     f"So the answer is $\\boxed{{{a + b}}}$, a perfect square + - ки\n\n")
    return lines


def byte_level_tokenizer(specials: list[str], regex: str = QWEN2_REGEX,
                         corpus: list[str] | None = None, vocab_size: int = 600) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(regex), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus if corpus is not None else math_corpus(), trainer)
    return tok


def sentencepiece_like_tokenizer(vocab_size: int = 600) -> Tokenizer:
    """BPE whose pieces start at ``▁``; encoding prepends ``▁`` to the text (Llama 2, Mistral)."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first", split=True)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SENTENCEPIECE_SPECIALS,
                                  initial_alphabet=["\n"])
    # Llama's and Mistral's vocabularies hold no piece with a newline in it: train on lines.
    lines = [line for text in math_corpus() for line in text.split("\n")]
    tok.train_from_iterator(lines, trainer)
    # Trained on words; encodes whole texts, as SentencePiece does.
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first", split=False)
    tok.decoder = decoders.Metaspace(prepend_scheme="first", split=False)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                       special_tokens=[("<s>", bos)])
    return tok


def save_tokenizer(tok: Tokenizer, directory: Path, **config) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


# name -> (builder, tokenizer_config.json)
TOKENIZERS = {
    "toy": (None, {"bos_token": "<s>", "eos_token": "</s>"}),
    "sentencepiece": (sentencepiece_like_tokenizer, {"bos_token": "<s>", "eos_token": "</s>"}),
    "chatml": (lambda: byte_level_tokenizer(CHATML_SPECIALS),
               {"eos_token": "<|im_end|>", "chat_template": CHATML_TEMPLATE}),
    "llama3": (lambda: byte_level_tokenizer(LLAMA3_SPECIALS, LLAMA3_REGEX),
               {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
                "chat_template": LLAMA3_TEMPLATE}),
}


def build_tokenizer(name: str, directory: Path, **config_overrides) -> Path:
    builder, config = TOKENIZERS[name]
    if builder is None:
        from ttscale.toy.tokenizer import build_tokenizer as toy_tokenizer

        tok = toy_tokenizer()
    else:
        tok = builder()
    return save_tokenizer(tok, directory, **{**config, **config_overrides})


# ---------------------------------------------------------------------------------------------
# Tiny models

BASE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512)

# format -> (model_type, architecture)
ARCHITECTURES = {
    "math-shepherd": ("llama", "LlamaForCausalLM"),
    "rlhflow": ("llama", "LlamaForCausalLM"),
    "qwen2.5-math-prm": ("qwen2", "Qwen2ForProcessRewardModel"),
    "skywork": ("qwen2", "Qwen2ForPrmModel"),
}


def _redraw(module: torch.nn.Module, seed: int) -> None:
    """Weights larger than transformers' init (so a misplaced op shows), norms away from 1."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1.0 + 0.2 * noise if "norm" in name else 0.2 * noise)


def build_prm(fmt: str, directory: Path, vocab_size: int, seed: int = 0):
    """A random PRM of ``fmt`` saved in ``directory``; returns ``(backbone, head)`` for rescoring:
    the transformers model and a function hidden/logits ``[T, ...]`` -> head output."""
    import transformers

    model_type, architecture = ARCHITECTURES[fmt]
    config = transformers.AutoConfig.for_model(model_type, vocab_size=vocab_size, **BASE)
    config.architectures = [architecture]
    if architecture.endswith("ForCausalLM"):
        model = transformers.AutoModelForCausalLM.from_config(config).eval()
        _redraw(model, seed)
        with torch.no_grad():  # a head in a sane range, so P(+) is not always 0 or 1
            model.lm_head.weight.mul_(0.1)
        model.save_pretrained(directory)
        return model, None
    backbone = transformers.AutoModel.from_config(config).eval()
    _redraw(backbone, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    h = BASE["hidden_size"]
    if architecture == "Qwen2ForProcessRewardModel":
        head = {"score.0.weight": torch.randn(h, h, generator=gen) * 0.2,
                "score.0.bias": torch.randn(h, generator=gen) * 0.2,
                "score.2.weight": torch.randn(2, h, generator=gen) * 0.1,
                "score.2.bias": torch.randn(2, generator=gen) * 0.1}
        config.num_labels = 2
    else:
        head = {"v_head.summary.weight": torch.randn(1, h, generator=gen) * 0.1,
                "v_head.summary.bias": torch.randn(1, generator=gen) * 0.1}
    tensors = {f"model.{k}": v.contiguous() for k, v in backbone.state_dict().items()}
    save_file({**tensors, **head}, directory / "model.safetensors")
    config.save_pretrained(directory)
    return backbone, head


@torch.no_grad()
def reference_scores(fmt: str, built, ids: list[int], positions: list[int],
                     head_tokens: tuple[int, int] | None = None) -> list[float]:
    """One transformers forward over the whole sequence; the format's head at ``positions``."""
    model, head = built
    input_ids = torch.tensor([ids])
    if fmt in ("math-shepherd", "rlhflow"):
        logits = model(input_ids).logits[0, positions][:, list(head_tokens)]
        return logits.softmax(-1)[:, 0].tolist()
    hidden = model(input_ids).last_hidden_state[0, positions]
    if fmt == "qwen2.5-math-prm":
        inner = torch.relu(hidden @ head["score.0.weight"].T + head["score.0.bias"])
        logits = inner @ head["score.2.weight"].T + head["score.2.bias"]
        return logits.softmax(-1)[:, 1].tolist()
    value = hidden @ head["v_head.summary.weight"].T + head["v_head.summary.bias"]
    return torch.sigmoid(value[:, 0]).tolist()
