"""The bytes each token of an imported tokenizer stands for in a decoded text (stop strings read them).

- ``tokenizer.json`` with a ``ByteLevel`` decoder (GPT-2, Llama 3, Qwen2, BART): every symbol of a
  token is one byte, through GPT-2's byte-to-symbol table (Radford et al. 2019's BPE on bytes: the
  bytes that are printable characters stand for themselves, the others for the characters from
  U+0100 on, in order), so a token may hold half a UTF-8 character.
- ``Metaspace`` / sentencepiece-style decoders (T5, NLLB, Llama 2, Mistral, Gemma): ``▁`` is a
  space, and with byte fallback a ``<0xNN>`` token is the byte NN.
- Special tokens (those decoding skips) are no bytes.
"""

from __future__ import annotations

import functools
import json
import re

BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
SPACE = "\u2581"  # sentencepiece's word boundary


@functools.cache
def _symbol_to_byte() -> dict[str, int]:
    """The inverse of GPT-2's byte-to-symbol table."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[chr(byte)] = byte
        else:
            table[chr(256 + extra)] = byte
            extra += 1
    return table


def _decoder_kinds(decoder: dict | None) -> set[str]:
    if not decoder:
        return set()
    kinds = {decoder.get("type")}
    for inner in decoder.get("decoders") or []:
        kinds |= _decoder_kinds(inner)
    return kinds


def fast_tokenizer_bytes(tokenizer) -> list[bytes]:
    """Every id's bytes for a ``tokenizers.Tokenizer`` (see the module docstring)."""
    spec = json.loads(tokenizer.to_str())
    kinds = _decoder_kinds(spec.get("decoder"))
    added = {t["id"]: t for t in spec.get("added_tokens") or []}
    symbols = _symbol_to_byte()
    out = []
    for i in range(tokenizer.get_vocab_size(with_added_tokens=True)):
        token = tokenizer.id_to_token(i)
        if token is None or added.get(i, {}).get("special"):
            out.append(b"")
        elif i in added:  # an added token that is not special: its text as written
            out.append(added[i]["content"].encode("utf-8"))
        elif "ByteLevel" in kinds:
            out.append(bytes(symbols[c] for c in token if c in symbols))
        elif "ByteFallback" in kinds and BYTE_TOKEN.match(token):
            out.append(bytes([int(BYTE_TOKEN.match(token).group(1), 16)]))
        else:
            out.append(token.replace(SPACE, " ").encode("utf-8"))
    return out


def piece_bytes(piece: str) -> bytes:
    """A sentencepiece piece's bytes in a decoded text (``▁`` a space, ``<0xNN>`` a byte)."""
    match = BYTE_TOKEN.match(piece)
    return bytes([int(match.group(1), 16)]) if match else piece.replace(SPACE, " ").encode("utf-8")
