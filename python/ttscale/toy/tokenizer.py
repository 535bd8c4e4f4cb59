"""The toy models' character-level tokenizer, built with the ``tokenizers`` library.

One token per character of the task's alphabet, plus specials: ``<pad>``, ``<s>`` (begins every
sequence), ``</s>`` (end of sequence) and ``ки`` (the Math-Shepherd step tag the toy PRM reads).
Saved as ``tokenizer.json`` so it loads like any Hugging Face tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

SPECIALS = ["<pad>", "<s>", "</s>", "ки"]
PAD, BOS, EOS, STEP_TAG = SPECIALS
ALPHABET = list("0123456789+-*=() \n") + list("Q:answerchkoldtypifuAB#")


def build_tokenizer() -> Tokenizer:
    vocab = {token: i for i, token in enumerate(SPECIALS + ALPHABET)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=PAD))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIALS)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, vocab[BOS])])
    return tok


# One user message becomes the task's own prompt, "<s>Q: <problem>\n" (what the demo and the
# training data feed the policy), so chat requests work on the toy models too.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ 'Q: ' + message['content'] + '\\n' }}{% endif %}{% endfor %}"
)


def save_tokenizer(directory: Path, chat_template: bool = True) -> None:
    """``tokenizer.json`` and a ``tokenizer_config.json`` naming the special tokens (and the
    chat template, unless ``chat_template`` is false)."""
    directory.mkdir(parents=True, exist_ok=True)
    build_tokenizer().save(str(directory / "tokenizer.json"))
    config = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "add_bos_token": True}
    if chat_template:
        config["chat_template"] = CHAT_TEMPLATE
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
