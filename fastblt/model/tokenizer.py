"""Bytes <-> token ids: id = byte + 4 (BOE 0, BOS 1, EOS 2, BPE-delimiter 3), as the released BLT."""

from __future__ import annotations

import operator
from collections.abc import Iterable

from fastblt.errors import InputError
from fastblt.model.config import BOS_ID, BYTE_OFFSET, VOCAB_SIZE


def encode(text_or_bytes: str | bytes | bytearray, bos: bool = True) -> list[int]:
    """BOS + (byte + 4) for each UTF-8 byte; no EOS (Meta's generation prompts carry none)."""
    if isinstance(text_or_bytes, str):
        try:
            data = text_or_bytes.encode("utf-8")
        except UnicodeEncodeError as e:
            raise InputError(f"prompt: not encodable as UTF-8 (a lone surrogate at character {e.start})") from None
    elif isinstance(text_or_bytes, (bytes, bytearray)):
        data = bytes(text_or_bytes)
    else:
        raise InputError(f"prompt: expected str or bytes, got {type(text_or_bytes).__name__}")
    if not data:
        raise InputError("prompt: empty (give at least one byte)")
    return ([BOS_ID] if bos else []) + [b + BYTE_OFFSET for b in data]


def ids_to_bytes(ids: Iterable[int]) -> bytes:
    """Drop special ids (< 4) and map the rest back to bytes."""
    if isinstance(ids, (str, bytes, bytearray)):  # iterating them would give characters, or bytes as ids
        raise InputError(f"ids: expected a sequence of token ids, got {type(ids).__name__}")
    try:
        items = iter(ids)
    except TypeError:
        raise InputError(f"ids: expected a sequence of token ids, got {type(ids).__name__}") from None
    out = bytearray()
    for i in items:
        try:
            i = operator.index(i)  # ints, numpy ints, one-element integer tensors; never a float
        except TypeError:
            raise InputError(f"ids: expected a flat sequence of int token ids, got an item {i!r}") from None
        if not 0 <= i < VOCAB_SIZE:
            raise InputError(f"token id {i}: outside the vocabulary [0, {VOCAB_SIZE})")
        if i >= BYTE_OFFSET:
            out.append(i - BYTE_OFFSET)
    return bytes(out)


def decode(ids: Iterable[int]) -> str:
    """Token ids -> text (special ids dropped; invalid UTF-8 replaced with U+FFFD)."""
    return ids_to_bytes(ids).decode("utf-8", errors="replace")
