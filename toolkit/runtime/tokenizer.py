"""Tokenizers a decoder bundle names (`generation.tokenizer`): the reference models' UTF-8 bytes,
self-contained and lossless, or a Hugging Face model's own tokenizer (`tokenizer.json` carried in the
bundle, run by the light, torch-free `tokenizers` package)."""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from toolkit.bundle import Bundle
from toolkit.errors import ToolkitError

__all__ = ["HF_TOKENIZER_FILE", "ByteTokenizer", "HFTokenizer", "tokenizer_for"]

HF_TOKENIZER_FILE = "tokenizer.json"


class ByteTokenizer:
    kind = "bytes"
    eos_id = 256
    eos_ids = (256,)
    vocab_size = 257

    def encode(self, text: str, special_tokens: bool = False) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; the end-of-text token and a UTF-8 sequence cut short become nothing / U+FFFD."""
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def stream_decoder(self) -> _ByteStream:
        """Turns tokens into text as they arrive, holding back a multi-byte character until it is whole."""
        return _ByteStream()

    def token_bytes(self, token: int) -> bytes:
        """The bytes `token` stands for (the end-of-text token: none)."""
        return bytes([token]) if token < 256 else b""


class _ByteStream:
    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token: int) -> str:
        return self._decoder.decode(bytes([token])) if token < 256 else ""

    def flush(self) -> str:
        return self._decoder.decode(b"", final=True)


class HFTokenizer:
    """A Hugging Face `tokenizer.json` with the model's end-of-text token(s)."""

    kind = "hf"

    def __init__(self, source: Path | bytes, eos_ids: Iterable[int]):
        """`source`: the tokenizer.json file, or its contents (a sealed bundle's, decrypted in memory)."""
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise ToolkitError("this bundle's tokenizer needs the tokenizers package: pip install tokenizers.") from None
        self._tokenizer = Tokenizer.from_str(source.decode()) if isinstance(source, bytes) else Tokenizer.from_file(str(source))
        self._byte_level = '"ByteLevel"' in json.dumps(json.loads(self._tokenizer.to_str()).get("decoder") or {})
        self.eos_ids = tuple(eos_ids)
        self.eos_id = self.eos_ids[0] if self.eos_ids else None

    def encode(self, text: str, special_tokens: bool = False) -> list[int]:
        """Token ids of `text`; with `special_tokens`, as the tokenizer's post-processor frames a
        whole input (an encoder-decoder's source)."""
        return self._tokenizer.encode(text, add_special_tokens=special_tokens).ids

    def decode(self, ids: Iterable[int]) -> str:
        return self._tokenizer.decode([i for i in ids if i not in self.eos_ids])

    def stream_decoder(self) -> _HFStream:
        return _HFStream(self)

    def token_bytes(self, token: int) -> bytes:
        """The bytes `token` stands for: a byte-level BPE token's through GPT-2's byte-to-character
        table, a byte-fallback token's (`<0xE2>`) its byte, any other token's text in UTF-8."""
        piece = self._tokenizer.id_to_token(token)
        if piece is None:
            return b""
        if self._byte_level and all(c in _UNICODE_TO_BYTE for c in piece):
            return bytes(_UNICODE_TO_BYTE[c] for c in piece)
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            return bytes([int(piece[3:5], 16)])
        return self._tokenizer.decode([token], skip_special_tokens=False).encode("utf-8")


class _HFStream:
    """Incremental decoding: the text of every token so far, minus what was already given, holding
    back a trailing U+FFFD (a byte-level character that the next token completes)."""

    def __init__(self, tokenizer: HFTokenizer):
        self.tokenizer, self.ids, self.sent = tokenizer, [], 0

    def push(self, token: int) -> str:
        if token in self.tokenizer.eos_ids:
            return ""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        ready = len(text.rstrip("\ufffd"))
        piece, self.sent = text[self.sent : ready], max(self.sent, ready)
        return piece

    def flush(self) -> str:
        text = self.tokenizer.decode(self.ids)
        piece, self.sent = text[self.sent :], len(text)
        return piece


def tokenizer_for(generation: Mapping[str, Any] | None, bundle: Bundle | None = None) -> ByteTokenizer | HFTokenizer:
    """The tokenizer a bundle's manifest names (`generation.tokenizer`); a Hugging Face one is the
    bundle's own `tokenizer.json`, verified like its graphs."""
    kind = (generation or {}).get("tokenizer")
    if kind == ByteTokenizer.kind:
        return ByteTokenizer()
    if kind == HFTokenizer.kind and bundle is not None:
        return HFTokenizer(bundle.asset(HF_TOKENIZER_FILE), generation.get("eos_token_ids") or [generation["eos_token_id"]])
    raise ToolkitError(f"no tokenizer for {kind!r}: toolkit knows 'bytes' (the reference gpt's) and 'hf' (a bundle's "
                       f"{HF_TOKENIZER_FILE}); pass token ids instead.")


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's table of a printable character for every byte, which byte-level BPE vocabularies spell tokens in."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + extra)
            extra += 1
    return table


_UNICODE_TO_BYTE = {c: b for b, c in _byte_to_unicode().items()}
