"""Incremental detokenisation shared by all models.

Wraps ``tokenizers``' ``DecodeStream`` (multi-byte UTF-8 and byte-fallback pieces yield nothing until the
character is complete). Special tokens are KEPT (grounding tags, table markup and layout tokens are
special in both tokenizers); the caller simply never feeds end-of-sequence ids. Ids the tokenizer does not
know (embedding rows beyond its vocabulary, possible with random weights) decode to nothing.
"""

from __future__ import annotations

from typing import Any

from tokenizers.decoders import DecodeStream


class TextStream:
    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.vocab = int(tokenizer.get_vocab_size(with_added_tokens=True))
        self.stream = DecodeStream(skip_special_tokens=False)
        self.ids: list[int] = []
        self.emitted: list[str] = []

    def step(self, token_id: int) -> str:
        """Feed one generated (non-EOS) id; returns the new text ('' while a character is incomplete)."""
        if token_id < 0 or token_id >= self.vocab:
            return ""
        self.ids.append(token_id)
        try:
            piece = self.stream.step(self.tokenizer, token_id)
        except Exception:  # noqa: BLE001 - DecodeStream raises "Invalid prefix" on some invalid byte runs
            piece = self._resync()
        if piece:
            self.emitted.append(piece)
            return piece
        return ""

    def _resync(self) -> str:
        """Fallback after a DecodeStream error: restart the stream and emit what the full decode has beyond
        the text streamed so far (nothing if the two disagree)."""
        self.stream = DecodeStream(skip_special_tokens=False)
        full = self.tokenizer.decode(self.ids, skip_special_tokens=False)
        done = "".join(self.emitted)
        return full[len(done) :] if full.startswith(done) else ""

    def flush(self) -> str:
        """At the end: whatever the full decode has beyond what was streamed (e.g. a dangling byte)."""
        full = self.tokenizer.decode(self.ids, skip_special_tokens=False)
        done = "".join(self.emitted)
        if full.startswith(done) and len(full) > len(done):
            rest = full[len(done) :]
            self.emitted.append(rest)
            return rest
        return ""

    @property
    def text(self) -> str:
        return "".join(self.emitted)
