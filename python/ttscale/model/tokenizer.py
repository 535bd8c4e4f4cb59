"""A model directory's tokenizer: ``tokenizer.json`` through the ``tokenizers`` package.

Needed only for text; prompts given as token ids never load one, so call :func:`load_tokenizer`
when the first text arrives. ``tokenizer_config.json`` (optional) names the special tokens and
may carry a chat template (or ``chat_template.jinja`` / ``chat_template.json`` beside it).
Rendering a template runs transformers' renderer, which understands the template conventions
(``raise_exception``, ``tojson``, generation prompts); without transformers installed that one
call is an error saying so.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as FastTokenizer

from ttscale.errors import TokenizerError  # re-exported here

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"


class Tokenizer:
    """Text <-> token ids, the special tokens, and the chat template if the model has one."""

    def __init__(self, tokenizer: FastTokenizer, config: dict[str, Any], chat_template: str | None):
        self._tokenizer = tokenizer
        self._config = config
        self.chat_template = chat_template
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        self._renderer = None

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def eos_token_id(self) -> int | None:
        return None if self.eos_token is None else self._tokenizer.token_to_id(self.eos_token)

    def token_to_id(self, token: str) -> int | None:
        return self._tokenizer.token_to_id(token)

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], *, skip_special_tokens: bool = True) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self, messages: list[dict[str, str]], *, add_generation_prompt: bool = True
    ) -> str:
        """The prompt text for a conversation (``[{"role": ..., "content": ...}, ...]``)."""
        if self.chat_template is None:
            raise TokenizerError("chat template: this model's tokenizer_config.json has none")
        return self._chat_renderer().apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tokenize=False
        )

    def _chat_renderer(self):
        if self._renderer is None:
            try:
                from transformers import PreTrainedTokenizerFast
            except ImportError:
                self._renderer = _JinjaRenderer(self.chat_template, self.bos_token, self.eos_token)
            else:
                self._renderer = PreTrainedTokenizerFast(
                    tokenizer_object=self._tokenizer,
                    chat_template=self.chat_template,
                    bos_token=self.bos_token,
                    eos_token=self.eos_token,
                )
        return self._renderer


class _JinjaRenderer:
    """A chat template rendered with jinja2 alone, as transformers renders it (a sandbox that
    trims blocks, ``raise_exception``), for installs without transformers (``ttscale[serve]``)."""

    def __init__(self, template: str, bos_token: str | None, eos_token: str | None):
        try:
            from jinja2.sandbox import ImmutableSandboxedEnvironment
        except ImportError:
            raise TokenizerError(
                "chat template: rendering it needs jinja2 (pip install 'ttscale[serve]') or "
                "transformers, or pass prompts already formatted") from None

        def raise_exception(message):
            raise TokenizerError(f"chat template: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        self.template = env.from_string(template)
        self.tokens = {"bos_token": bos_token or "", "eos_token": eos_token or ""}

    def apply_chat_template(self, messages, *, add_generation_prompt: bool, tokenize: bool) -> str:
        return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                    **self.tokens)


def load_tokenizer(model_dir: str | Path) -> Tokenizer:
    """Read a model directory's ``tokenizer.json`` and, if present, ``tokenizer_config.json``."""
    model_dir = Path(model_dir)
    path = model_dir / TOKENIZER_FILE
    if not path.is_file():
        raise TokenizerError(
            f"{TOKENIZER_FILE}: not found in {model_dir} (needed for text prompts; "
            "token-id prompts need no tokenizer)"
        )
    try:
        tokenizer = FastTokenizer.from_file(str(path))
    except Exception as error:  # tokenizers raises its own exception type for malformed files
        raise TokenizerError(f"{TOKENIZER_FILE}: cannot be read ({path}: {error})") from None
    config = _read_json(model_dir / TOKENIZER_CONFIG) or {}
    return Tokenizer(tokenizer, config, _chat_template(model_dir, config))


def _chat_template(model_dir: Path, config: dict[str, Any]) -> str | None:
    template = config.get("chat_template")
    if template is None and (model_dir / "chat_template.jinja").is_file():
        template = (model_dir / "chat_template.jinja").read_text()
    if template is None:
        template = (_read_json(model_dir / "chat_template.json") or {}).get("chat_template")
    if isinstance(template, list):  # several named templates: the default one
        named = {
            entry.get("name"): entry.get("template")
            for entry in template
            if isinstance(entry, dict)
        }
        template = named.get("default")
    return template


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise TokenizerError(f"{path.name}: not valid JSON ({path}: {error})") from None
    if not isinstance(data, dict):
        raise TokenizerError(f"{path.name}: expected a JSON object ({path})")
    return data


def _token_text(token: Any) -> str | None:
    """Special tokens are written as a string or as ``{"content": ...}``."""
    if isinstance(token, dict):
        return token.get("content")
    return token
