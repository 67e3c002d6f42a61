"""JSON mode: which ids a request may generate next so that its text stays the beginning of one
JSON object (RFC 8259, in UTF-8), as a mask over the model's ids.

A byte model reads text as it is written, so the grammar needs no alignment of tokens to text:
each byte either continues a JSON text or does not, one step of a pushdown automaton over bytes
(`step`). The stack holds the open containers; the rest of a state is what the automaton expects
next (a value, a key, a colon, a comma or closing bracket, the rest of a string, number or
literal). Strings are checked as UTF-8 (no overlong forms, no surrogates, nothing past U+10FFFF)
and escapes as JSON's. The text starts with "{"; runs of whitespace between tokens are cut at
MAX_WS bytes, so a model that likes spaces cannot spend its bytes on them; once the object closes,
only EOS may follow.

Which ids a state allows depends only on what it expects next and the innermost container, not
on the whole stack, so masks are computed once per such key (`mask`) and shared. A mask is what
the sampler takes off the logits (sampling.steer): 0 for an allowed id, +inf for the rest.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from fastblt.model.config import BYTE_OFFSET, EOS_ID, VOCAB_SIZE

MAX_WS = 20  # whitespace bytes in a row: a newline and indentation, not a model stuck on spaces (llama.cpp's
# JSON grammar allows about as many)
FORMATS = ("json",)  # DecodeOptions.format

# what a state expects next
START, VALUE, KEY, COLON, AFTER, STRING, NUMBER, LITERAL, DONE = range(9)
WHITESPACE = frozenset(b" \t\n\r")
DIGITS = frozenset(b"0123456789")
HEX = frozenset(b"0123456789abcdefABCDEF")
ESCAPES = frozenset(b'"\\/bfnrt')
COMPLETE_NUMBERS = frozenset(("zero", "int", "frac", "exp"))  # number phases a value may end in
LITERALS = {ord("t"): b"rue", ord("f"): b"alse", ord("n"): b"ull"}

# a state: (open containers, innermost last: "o" object, "a" array; what it expects; its detail;
# whitespace bytes in a row)
State = tuple[str, int, object, int]
BEGIN: State = ("", START, None, 0)


def step(s: State, b: int) -> State | None:
    """The state after byte b (0-255), or None when b cannot come next."""
    stack, mode, sub, ws = s
    if mode == STRING:
        return _string(s, b)
    if mode == NUMBER:
        phase = _number(sub, b)  # type: ignore[arg-type]
        if phase is not None:
            return (stack, NUMBER, phase, 0)
        return step((stack, AFTER, None, 0), b) if sub in COMPLETE_NUMBERS else None  # b ends the number
    if mode == LITERAL:
        rest: bytes = sub  # type: ignore[assignment]
        if b != rest[0]:
            return None
        return (stack, LITERAL, rest[1:], 0) if len(rest) > 1 else (stack, AFTER, None, 0)
    if b in WHITESPACE:  # between tokens: not before the object, nor after it
        return (stack, mode, sub, ws + 1) if mode not in (START, DONE) and ws < MAX_WS else None
    if mode == START:
        return ("o", KEY, True, 0) if b == ord("{") else None  # JSON mode's text is an object
    if mode == VALUE:
        return _value(stack, bool(sub), b)
    if mode == KEY:  # sub: right after "{", where "}" closes an empty object
        if b == ord('"'):
            return (stack, STRING, (True, "n", 0, 0, 0), 0)
        return _close(stack) if b == ord("}") and sub else None
    if mode == COLON:
        return (stack, VALUE, False, 0) if b == ord(":") else None
    if mode == AFTER:
        top = stack[-1]
        if b == ord(","):
            return (stack, KEY, False, 0) if top == "o" else (stack, VALUE, False, 0)
        if b == (ord("}") if top == "o" else ord("]")):
            return _close(stack)
    return None


def _value(stack: str, first: bool, b: int) -> State | None:
    """A value starting with b (`first`: right after "[", where "]" closes an empty array)."""
    if b == ord("{"):
        return (stack + "o", KEY, True, 0)
    if b == ord("["):
        return (stack + "a", VALUE, True, 0)
    if b == ord("]") and first:
        return _close(stack)
    if b == ord('"'):
        return (stack, STRING, (False, "n", 0, 0, 0), 0)
    if b == ord("-"):
        return (stack, NUMBER, "minus", 0)
    if b in DIGITS:
        return (stack, NUMBER, "zero" if b == ord("0") else "int", 0)
    if b in LITERALS:
        return (stack, LITERAL, LITERALS[b], 0)
    return None


def _close(stack: str) -> State:
    stack = stack[:-1]
    return (stack, AFTER, None, 0) if stack else ("", DONE, None, 0)


def _number(phase: str, b: int) -> str | None:
    """The number's phase after byte b, or None when b does not continue it."""
    digit = b in DIGITS
    if phase == "minus":
        return ("zero" if b == ord("0") else "int") if digit else None
    if phase in ("zero", "int"):
        if digit and phase == "int":
            return "int"
        return "dot" if b == ord(".") else "e" if b in b"eE" else None
    if phase in ("dot", "frac"):
        if digit:
            return "frac"
        return "e" if phase == "frac" and b in b"eE" else None
    if phase == "e":
        return "exp" if digit else "esign" if b in b"+-" else None
    return "exp" if digit else None  # "esign", "exp"


# UTF-8 lead bytes: (continuation bytes, the first one's range); RFC 3629's table
_LEADS = {
    **{b: (1, 0x80, 0xBF) for b in range(0xC2, 0xE0)},
    0xE0: (2, 0xA0, 0xBF),
    **{b: (2, 0x80, 0xBF) for b in (*range(0xE1, 0xED), 0xEE, 0xEF)},
    0xED: (2, 0x80, 0x9F),  # not the surrogates
    0xF0: (3, 0x90, 0xBF),
    **{b: (3, 0x80, 0xBF) for b in range(0xF1, 0xF4)},
    0xF4: (3, 0x80, 0x8F),  # not past U+10FFFF
}


def _string(s: State, b: int) -> State | None:
    """Inside a string: sub is (a key's, "n" plain / "e" after a backslash / "x" hex digits to come
    / "c" UTF-8 continuation bytes to come, how many, the next byte's range)."""
    stack, _, sub, _ = s
    key, kind, n, lo, hi = sub  # type: ignore[misc]
    if kind == "n":
        if b == ord('"'):
            return (stack, COLON, None, 0) if key else (stack, AFTER, None, 0)
        if b == ord("\\"):
            return (stack, STRING, (key, "e", 0, 0, 0), 0)
        if 0x20 <= b < 0x80:
            return s
        if b in _LEADS:
            return (stack, STRING, (key, "c", *_LEADS[b]), 0)
        return None  # a control character, or not a UTF-8 lead byte
    if kind == "e":
        if b in ESCAPES:
            return (stack, STRING, (key, "n", 0, 0, 0), 0)
        return (stack, STRING, (key, "x", 4, 0, 0), 0) if b == ord("u") else None
    if kind == "x":
        if b not in HEX:
            return None
        return (stack, STRING, (key, "x", n - 1, 0, 0) if n > 1 else (key, "n", 0, 0, 0), 0)
    if not lo <= b <= hi:
        return None
    return (stack, STRING, (key, "c", n - 1, 0x80, 0xBF) if n > 1 else (key, "n", 0, 0, 0), 0)


def advance(s: State, ids: list[int]) -> State | None:
    """The state after generated ids (an EOS once the object closed changes nothing), or None
    when one cannot come next."""
    for t in ids:
        if s[1] == DONE and t == EOS_ID:
            continue
        nxt = step(s, t - BYTE_OFFSET) if t >= BYTE_OFFSET else None
        if nxt is None:
            return None
        s = nxt
    return s


def mask(s: State) -> np.ndarray:
    """What to take off each id's logit in state s (VOCAB_SIZE,) float32: 0 for the ids allowed
    next, +inf for the rest (EOS only once the object closed). Shared and read-only."""
    return _mask(s[1], s[2], s[3] >= MAX_WS, s[0][-1:], bool(s[0]))


@lru_cache(maxsize=4096)
def _mask(mode: int, sub: object, ws_full: bool, top: str, open_: bool) -> np.ndarray:
    s = (top if open_ else "", mode, sub, MAX_WS if ws_full else 0)
    out = np.full(VOCAB_SIZE, np.inf, dtype=np.float32)
    for b in range(256):
        if step(s, b) is not None:
            out[BYTE_OFFSET + b] = 0.0
    if mode == DONE:
        out[EOS_ID] = 0.0
    out.flags.writeable = False
    return out
