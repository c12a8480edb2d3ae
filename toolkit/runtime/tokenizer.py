"""The reference gpt's tokenizer: UTF-8 bytes are the tokens (0-255) plus one end-of-text token.
Self-contained (no vocabulary file, no hub) and lossless for any text."""

from __future__ import annotations

import codecs
from collections.abc import Iterable
from typing import Any

from toolkit.errors import ToolkitError

__all__ = ["ByteTokenizer", "tokenizer_for"]


class ByteTokenizer:
    kind = "bytes"
    eos_id = 256
    vocab_size = 257

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; the end-of-text token and a UTF-8 sequence cut short become nothing / U+FFFD."""
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def stream_decoder(self) -> _StreamDecoder:
        """Turns tokens into text as they arrive, holding back a multi-byte character until it is whole."""
        return _StreamDecoder()


class _StreamDecoder:
    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token: int) -> str:
        return self._decoder.decode(bytes([token])) if token < 256 else ""

    def flush(self) -> str:
        return self._decoder.decode(b"", final=True)


def tokenizer_for(generation: dict[str, Any] | None) -> ByteTokenizer:
    """The tokenizer a bundle's manifest names (`generation.tokenizer`)."""
    kind = (generation or {}).get("tokenizer")
    if kind != ByteTokenizer.kind:
        raise ToolkitError(f"no tokenizer for {kind!r}: toolkit knows 'bytes' (the reference gpt's); pass token ids instead.")
    return ByteTokenizer()
