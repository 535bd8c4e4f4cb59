"""A tiny random Llama with the toy character tokenizer: a policy for end-to-end search tests.

Its text is noise over the toy alphabet, newlines and end-of-sequence included, so with the
step delimiter ``"\\n"`` it writes solutions of a few short steps that end on their own.
"""

from __future__ import annotations

from pathlib import Path

import torch
from ttscale.toy.tokenizer import build_tokenizer, save_tokenizer


def save_tiny_policy(directory: Path) -> Path:
    import transformers

    tokenizer = build_tokenizer()
    config = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=tokenizer.get_vocab_size(),
        max_position_embeddings=512,
        eos_token_id=tokenizer.token_to_id("</s>"),
        bos_token_id=1,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if "norm" in name else 0.0, 0.2 if "norm" in name else 0.3)
    model.save_pretrained(directory)
    save_tokenizer(directory, chat_template=False)  # prompts as the tests were written for
    return directory
