"""JSON mode's grammar over bytes: every JSON object (as json.dumps writes it, in every style) is
accepted byte by byte and ends closed; whatever it accepts as closed, json.loads reads as an
object; masks are the bytes one step allows, whatever the rest of the stack."""

from __future__ import annotations

import json

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from fastblt.model.config import BYTE_OFFSET, EOS_ID
from fastblt.runtime.grammar import BEGIN, DONE, MAX_WS, advance, mask, step

leaves = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text()
values = st.recursive(leaves, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
                      max_leaves=12)  # fmt: skip
objects = st.dictionaries(st.text(), values, max_size=5)
STYLES = [
    {},
    {"indent": 1},
    {"ensure_ascii": False},
    {"separators": (",", ":")},
    {"indent": "\t", "ensure_ascii": False},
]


def run(data: bytes):
    """The state after data, or None where a byte is refused."""
    return advance(BEGIN, [b + BYTE_OFFSET for b in data])


def longest_whitespace(data: bytes) -> int:
    best = cur = 0
    in_string = escaped = False
    for b in data:
        if in_string:
            in_string, escaped = (escaped or b != ord('"')), (not escaped and b == ord("\\"))
            continue
        in_string = b == ord('"')
        cur = cur + 1 if b in b" \t\n\r" else 0
        best = max(best, cur)
    return best


@settings(max_examples=300, deadline=None)
@given(objects, st.sampled_from(STYLES))
def test_every_json_object_is_accepted_byte_by_byte_and_ends_closed(obj, style):
    data = json.dumps(obj, **style).encode()
    if longest_whitespace(data) > MAX_WS:  # deep indentation: past what the grammar lets through
        return
    states = [BEGIN]
    for b in data:
        states.append(step(states[-1], b))
        assert states[-1] is not None, (data, len(states))
    assert states[-1][1] == DONE and all(s[1] != DONE for s in states[:-1])
    for s, b in zip(states, data, strict=False):  # what the mask allows is what step allows
        assert mask(s)[BYTE_OFFSET + b] == 0
    assert mask(states[-1])[EOS_ID] == 0 and np.isinf(np.delete(mask(states[-1]), EOS_ID)).all()


@settings(max_examples=300, deadline=None)
@given(objects, st.integers(0, 10_000), st.integers(0, 255))
def test_what_it_accepts_as_closed_json_reads_as_an_object(obj, where, byte):
    """One byte of an object's text changed: if the grammar still accepts the text as a closed
    object, it is one (json.loads); if json.loads reads an object, the grammar accepts it."""
    data = bytearray(json.dumps(obj, ensure_ascii=False).encode())
    data[where % len(data)] = byte
    data = bytes(data)
    s = run(data)
    try:
        loaded = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        loaded = None
    if s is not None and s[1] == DONE:
        assert isinstance(loaded, dict), data
    if isinstance(loaded, dict) and data.strip() == data and longest_whitespace(data) <= MAX_WS and b"NaN" not in data \
            and b"Infinity" not in data:  # fmt: skip
        assert s is not None and s[1] == DONE, data


def test_bytes_that_break_json_are_refused():
    for data in (b" {}", b"[]", b'"a"', b"{}}", b"{} ", b"{,}", b'{"a"}', b'{"a":}', b'{"a":01}', b'{"a":1.}',
                 b'{"a":-}', b'{"a":1e}', b'{"a":tru}', b'{"a":[1,]}', b'{"a":1,}', b'{"a":"\x1f"}', b'{"a":"\\x"}',
                 b'{"a":"\\u12g"}', b'{"\xc0\x80":1}', b'{"\xed\xa0\x80":1}', b'{"\xf4\x90\x80\x80":1}', b'{"\xff":1}',
                 b'{"a":"\xe2\x82"}'):  # fmt: skip
        s = run(data)
        assert s is None or s[1] != DONE, data
    for data in (b'{"a":"\xe2\x82\xac \xf0\x9f\x98\x80 \\u00e9 \\n"}', b'{"a":[[],{},-0.5e+3,true,null]}', b"{}"):
        assert run(data)[1] == DONE, data


def test_whitespace_runs_are_cut_and_eos_comes_only_after_the_object():
    s = run(b'{"a":' + b" " * MAX_WS)
    assert s is not None and step(s, ord(" ")) is None and step(s, ord("1")) is not None
    assert run(b'{"a":"' + b" " * 100) is not None  # inside a string, spaces are text
    for data in (b"", b"{", b'{"a":1'):
        m = mask(run(data))
        assert np.isinf(m[EOS_ID]) and np.isinf(m[:BYTE_OFFSET]).all()
    assert np.flatnonzero(mask(BEGIN) == 0).tolist() == [BYTE_OFFSET + ord("{")]
    assert advance(run(b"{}"), [EOS_ID, EOS_ID]) is not None  # EOS again (stop_on_eos off) stays closed


def test_a_mask_reads_only_the_innermost_container():
    """Masks are shared between states that differ below the top of the stack."""
    deep, flat = run(b'{"a":[{"b":[1'), run(b'{"c":[1')
    assert deep[0] != flat[0] and mask(deep) is mask(flat)
    assert not np.array_equal(mask(run(b'{"a":1')), mask(run(b'{"a":[1')))  # "}" vs "]"
