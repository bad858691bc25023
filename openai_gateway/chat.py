"""Chat prompts and a torch-free tokenizer: the model's chat template when it has one, else a plain one.

The plain template (used without --tokenizer, or when the tokenizer has no chat template) renders
each message as "<|{role}|>\\n{content}\\n" and ends with the assistant turn "<|assistant|>\\n",
e.g. [system "Be brief.", user "Hi"] -> "<|system|>\\nBe brief.\\n<|user|>\\nHi\\n<|assistant|>\\n".
It is sent to the target as text (the target tokenizes it).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.sandbox
import tokenizers

from openai_gateway.schemas import ChatMessage

log = logging.getLogger(__name__)


def message_dicts(messages: Sequence[ChatMessage]) -> list[dict[str, Any]]:
    """Messages as the plain dicts chat templates expect (text parts of multi-part content joined)."""
    out = []
    for message in messages:
        content = message.content
        if isinstance(content, list):
            if any(part.type != "text" for part in content):
                raise ValueError("only text content parts are supported")
            content = "".join(part.text or "" for part in content)
        entry: dict[str, Any] = {"role": message.role, "content": content or ""}
        if message.name:
            entry["name"] = message.name
        out.append(entry)
    return out


def plain_chat_prompt(messages: Sequence[dict[str, Any]]) -> str:
    """The documented fallback template: "<|role|>\\ncontent\\n" per message, then "<|assistant|>\\n"."""
    return "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in messages) + "<|assistant|>\n"


def _token_text(value: object) -> str:
    if isinstance(value, dict):
        return str(value.get("content", ""))
    return "" if value is None else str(value)


def _raise(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


class GatewayTokenizer:
    """An HF tokenizer read from tokenizer.json + tokenizer_config.json (no transformers, no torch)."""

    def __init__(self, tokenizer: tokenizers.Tokenizer, chat_template: str | None, special: dict[str, str]) -> None:
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.special = special
        self._template: jinja2.Template | None = None
        if chat_template:
            env = jinja2.sandbox.ImmutableSandboxedEnvironment(
                trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
            )
            env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, ensure_ascii=False, indent=indent)
            env.globals["raise_exception"] = _raise
            env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
            self._template = env.from_string(chat_template)

    @classmethod
    def load(cls, directory: Path) -> GatewayTokenizer:
        """Load from an HF model directory; raises FileNotFoundError without tokenizer.json."""
        directory = Path(directory)
        path = directory / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: the gateway needs a fast (tokenizer.json) tokenizer")
        config: dict[str, Any] = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):
            if (directory / name).is_file():
                config.update(json.loads((directory / name).read_text(encoding="utf-8")))
        template = config.get("chat_template")
        if (directory / "chat_template.jinja").is_file():
            template = (directory / "chat_template.jinja").read_text(encoding="utf-8")
        elif isinstance(template, list):  # named templates: take "default"
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        special = {k: _token_text(config.get(k)) for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
        log.info("tokenizer loaded from %s (chat template: %s)", directory, "yes" if template else "no, plain")
        return cls(tokenizers.Tokenizer.from_file(str(path)), template or None, special)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`."""
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`, special tokens skipped."""
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def render_chat(self, messages: list[dict[str, Any]]) -> str:
        """The chat template applied with the generation prompt; ValueError when it fails or is absent."""
        if self._template is None:
            raise ValueError("the tokenizer has no chat template")
        try:
            return self._template.render(messages=messages, add_generation_prompt=True, **self.special)
        except jinja2.exceptions.TemplateError as exc:
            raise ValueError(f"chat template: {exc}") from exc


@dataclass(frozen=True, slots=True)
class ChatPrompt:
    """A rendered chat prompt: token ids (model chat template) or text (plain template)."""

    text: str | None = None
    token_ids: tuple[int, ...] | None = None


def build_chat_prompt(messages: Sequence[ChatMessage], tokenizer: GatewayTokenizer | None) -> ChatPrompt:
    """Render `messages`: the model's chat template as ids (specials already in it), else plain text."""
    dicts = message_dicts(messages)
    if tokenizer is not None and tokenizer.chat_template:
        return ChatPrompt(token_ids=tuple(tokenizer.encode(tokenizer.render_chat(dicts), add_special_tokens=False)))
    return ChatPrompt(text=plain_chat_prompt(dicts))


class TextDelta:
    """Incremental detokenization for targets that send ids without text."""

    def __init__(self, tokenizer: GatewayTokenizer) -> None:
        self._tok = tokenizer
        self._ids: list[int] = []
        self._text = ""

    def feed(self, token_ids: Sequence[int]) -> str:
        """The text the new ids add (held back while a multi-byte character is incomplete)."""
        self._ids.extend(token_ids)
        text = self._tok.decode(self._ids)
        if text.endswith("\ufffd") or not text.startswith(self._text):
            return ""
        delta, self._text = text[len(self._text) :], text
        return delta

    def flush(self) -> str:
        """Whatever text is still held back, at the end of the stream."""
        text = self._tok.decode(self._ids)
        if not text.startswith(self._text):
            return ""
        delta, self._text = text[len(self._text) :], text
        return delta
