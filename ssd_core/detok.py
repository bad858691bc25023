"""Incremental detokenization and the stop-string check of one sequence (the engine owns both).

Each committed token is pushed once: a fast tokenizer decodes it with tokenizers' DecodeStream
(constant work per token, so streaming is linear in the output length); a slow one falls back to
re-decoding the whole output. `release()` hands out the text that can be streamed now: all but a
suffix that could still become a stop string, so streamed text never shows a stop string the
final text cuts off, and the streamed pieces always add up to `Result.text`.
"""

from __future__ import annotations

try:  # tokenizers >= 0.21
    from tokenizers.decoders import DecodeStream
except ImportError:  # pragma: no cover - older tokenizers: the slow path
    DecodeStream = None


class TextStream:
    """The text of one sequence's new tokens, one token at a time (see module docstring)."""

    def __init__(self, tokenizer, stops: tuple[str, ...] = ()) -> None:
        self._tok = tokenizer
        backend = getattr(tokenizer, "_tokenizer", None)
        self._backend = backend if DecodeStream is not None and backend is not None else None
        self._stream = DecodeStream(skip_special_tokens=True) if self._backend is not None else None
        self._stops = tuple(stops)
        self._max_stop = max((len(s) for s in self._stops), default=0)
        self.ids: list[int] = []
        self.text = ""  # decoded so far (bytes of an unfinished character are not in it yet)
        self.released = 0  # characters of `text` handed out by release()

    def push(self, token_id: int) -> int | None:
        """Add one token; the index in `text` where a stop string starts if this token completed
        one (the earliest such index), else None."""
        self.ids.append(token_id)
        if self._stream is not None:
            piece = self._stream.step(self._backend, token_id) or ""
        else:
            full = self._tok.decode(self.ids, skip_special_tokens=True)
            ok = full.startswith(self.text) and not full.endswith("\ufffd")
            piece = full[len(self.text):] if ok else ""
        if not piece:
            return None
        self.text += piece
        if not self._stops:
            return None
        start = max(0, len(self.text) - len(piece) - self._max_stop + 1)  # a new match ends in `piece`
        hits = [i for s in self._stops if (i := self.text.find(s, start)) >= 0]
        return min(hits) if hits else None

    def release(self) -> str:
        """Text that can be streamed now (see module docstring)."""
        end = len(self.text) - self._held()
        out = self.text[self.released:end] if end > self.released else ""
        self.released = max(self.released, end)
        return out

    def finish(self, stop_at: int | None = None) -> str:
        """The rest of the final text after what was released: up to a stop string's start, or
        everything (including the replacement character a full decode gives for trailing bytes
        of an unfinished character, so the final text equals tokenizer.decode of the ids)."""
        if stop_at is None and self.ids:
            full = self._tok.decode(self.ids, skip_special_tokens=True)
            if full.startswith(self.text):
                self.text = full
            stop_at = len(self.text)
        end = len(self.text) if stop_at is None else stop_at
        out = self.text[self.released:end] if end > self.released else ""
        self.released = max(self.released, end)
        self.text = self.text[:end]
        return out

    def _held(self) -> int:
        """Length of the longest unreleased suffix of `text` that is a proper prefix of a stop string."""
        room = min(self._max_stop - 1, len(self.text) - self.released)
        for n in range(room, 0, -1):
            tail = self.text[-n:]
            if any(s.startswith(tail) for s in self._stops):
                return n
        return 0
