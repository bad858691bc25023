"""OpenAI's two logprobs shapes, from the target's TokenLogprob records.

Completions (legacy): {"tokens", "token_logprobs", "top_logprobs", "text_offset"}, one entry per
token (with echo, the prompt's first: logprob and top null, as OpenAI); each top dict holds the N
best alternatives plus the chosen token (so up to N + 1 keys, as OpenAI documents); two tokens
with the same text keep the larger logprob. Chat: {"content": [{"token", "logprob", "bytes",
"top_logprobs": [...]}]}. A token's text is that token decoded alone (special tokens included),
or "token_id:N" when the gateway has no tokenizer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from client import TokenLogprob
from openai_gateway.chat import GatewayTokenizer

FLOOR = -9999.0  # in place of -inf, which JSON cannot carry (vLLM's choice)


def _value(x: float) -> float:
    return x if x > FLOOR else FLOOR


@dataclass(frozen=True, slots=True)
class Entry:
    """One token of a choice: its text, logprob (None: the prompt's first token) and alternatives."""

    token_id: int
    text: str
    logprob: float | None
    top: tuple[tuple[str, float], ...] | None


class TokenTexts:
    """Token id -> the text of that token alone (cached)."""

    def __init__(self, tokenizer: GatewayTokenizer | None) -> None:
        self._tok = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            text = (self._tok.tokenizer.decode([token_id], skip_special_tokens=False) if self._tok is not None
                    else f"token_id:{token_id}")
            self._cache[token_id] = text
        return text

    def entries(self, records: Sequence[TokenLogprob], first_prompt_id: int | None = None) -> list[Entry]:
        """Entries of `records`, after an unscored first prompt token when `first_prompt_id` is given."""
        out = [] if first_prompt_id is None else [Entry(first_prompt_id, self(first_prompt_id), None, None)]
        for r in records:
            out.append(Entry(r.token_id, self(r.token_id), _value(r.logprob),
                             tuple((self(t), _value(lp)) for t, lp in r.top)))
        return out


def completion_logprobs(entries: Sequence[Entry], offset: int = 0) -> dict[str, Any]:
    """The /v1/completions shape; text_offset counts from `offset` in the choice's text."""
    tokens, token_logprobs, top_logprobs, text_offset = [], [], [], []
    for e in entries:
        tokens.append(e.text)
        token_logprobs.append(e.logprob)
        if e.top is None:
            top_logprobs.append(None)
        else:
            top: dict[str, float] = {}
            for text, lp in e.top:
                top.setdefault(text, lp)
            top.setdefault(e.text, e.logprob)  # OpenAI: the chosen token is always there
            top_logprobs.append(top)
        text_offset.append(offset)
        offset += len(e.text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
            "text_offset": text_offset}


def chat_logprobs(entries: Sequence[Entry]) -> dict[str, Any]:
    """The /v1/chat/completions shape."""

    def item(text: str, lp: float) -> dict[str, Any]:
        return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}

    return {"content": [{**item(e.text, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top or ()]}
                        for e in entries]}
