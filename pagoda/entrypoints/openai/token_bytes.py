"""The raw bytes of one token, for logprobs' `bytes` field.

Decoding a token alone gives U+FFFD when it holds part of a multi-byte
character; clients rebuild text from the bytes instead, so these must be the
token's own bytes. Byte-level BPE vocabularies (GPT-2 style, the default
model's) spell each byte as one printable character; SentencePiece ones have
byte-fallback tokens `<0xNN>` and mark spaces with "▁".
"""

from __future__ import annotations

import functools
import re

_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@functools.cache
def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's map from the printable stand-in characters back to byte values."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    stand_ins = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            stand_ins.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, stand_ins)}


def _is_byte_level(tokenizer) -> bool:
    cached = getattr(tokenizer, "_pagoda_byte_level", None)
    if cached is None:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        decoder = getattr(backend, "decoder", None) if backend is not None else None
        cached = decoder is not None and "ByteLevel" in repr(decoder)
        try:
            tokenizer._pagoda_byte_level = cached
        except AttributeError:
            pass
    return cached


def token_bytes(tokenizer, token_id: int) -> bytes:
    if tokenizer is None:
        return b""
    piece = tokenizer.convert_ids_to_tokens(token_id)
    if piece is None:
        return b""
    if token_id in getattr(tokenizer, "all_special_ids", ()):
        return piece.encode()
    if _is_byte_level(tokenizer):
        table = _byte_level_decoder()
        if all(ch in table for ch in piece):
            return bytes(table[ch] for ch in piece)
        return piece.encode()
    match = _BYTE_FALLBACK.match(piece)
    if match:
        return bytes([int(match.group(1), 16)])
    return piece.replace("\u2581", " ").encode()
