"""JSON Schema `pattern`, `format` and lengths (runtime/pattern.py), number bounds and multiples
(runtime/numbers.py), alone and together: the NFA matches what Python's `re` matches for the
shared subset of ECMA-262, numbers what exact arithmetic says, and inside the grammar a value held
to them is written byte by byte, never into a dead end; a schema's automata stay within budget."""

from __future__ import annotations

import datetime
import ipaddress
import json
import random
import re
import uuid
from decimal import Decimal
from fractions import Fraction

import jsonschema
import numpy as np
import pydantic
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastblt.errors import InputError
from fastblt.model.config import BYTE_OFFSET, EOS_ID
from fastblt.runtime.grammar import BOUNDS, PATTERN, advance, begin, compile_schema, done, mask, matching, step
from fastblt.runtime.numbers import number_pattern
from fastblt.runtime.pattern import (
    FORMATS,
    compile_format,
    compile_pattern,
    compile_whole,
    escape,
    intersect,
)

# characters where ECMA-262 and Python's re (ASCII classes) agree: no \r or U+2028/9 for ".", no
# non-ASCII whitespace for \s; some past ASCII, one past U+FFFF
ALPHABET = 'abcxyz019_-. \n\t"\\/é中😀'
atoms = st.sampled_from(["a", "b", "x", "1", r"\d", r"\w", r"\D", r"\W", r"\s", ".", "[a-c]", "[^a]", "[0-9x]",
                         r"\.", r"\-", "é", "中", "😀", r"\u00e9", r"[\d_]", r"\n", '"', r"\\"])  # fmt: skip


def quantified(atom: st.SearchStrategy) -> st.SearchStrategy:
    quantifiers = st.sampled_from(["", "", "*", "+", "?", "{2}", "{1,3}", "{0,}", "*?", "+?"])
    return st.tuples(atom, quantifiers).map("".join)


def unrepeated(r: str) -> bool:
    """Whether `r` holds no quantifier: Python's re, the oracle here (and inside hypothesis's
    from_regex, on whole drawn strings), backtracks exponentially through a repeated group of
    repeats ((?:a*)* against 25 a's and a b: 1.5 s, doubling with each a)."""
    return not any(q in r.replace("(?:", "(") for q in "*+?{")


regexes = st.recursive(
    quantified(atoms),
    lambda inner: (
        st.lists(inner, min_size=1, max_size=3).map("".join)
        | st.lists(inner, min_size=2, max_size=3).map(lambda alts: "(" + "|".join(alts) + ")")
        | quantified(inner.filter(unrepeated).map(lambda r: f"(?:{r})"))
    ),
    max_leaves=6,
)
patterns = st.tuples(st.sampled_from(["", "^"]), regexes, st.sampled_from(["", "$"])).map("".join)


SPACE = "\t\n\x0b\x0c\r \xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000\ufeff"  # ECMA-262's \s


@settings(max_examples=500, deadline=None)
@given(st.text(st.sampled_from("ab()[]{}|*+?^$.-,:=!<>\\dwsuxbpkDWS0129é"), max_size=10))
def test_any_pattern_text_compiles_or_is_refused_with_an_input_error(source):
    """Whatever a request's pattern holds, compiling it either works or says why (a 400): never
    another exception from inside the parser."""
    try:
        compile_pattern(source)
    except InputError as e:
        assert str(e).startswith("option pattern: ")


def python_re(source: str, ecma: bool = True) -> re.Pattern:
    """`source` as Python's re reads ECMA-262's: ASCII classes but ECMA's whitespace, and "$"
    only at the very end (\\Z: Python's also matches before a final newline). `ecma` False:
    Python's own classes, for hypothesis to draw strings from within an alphabet."""
    spaces = {"s": f"[{SPACE}]", "S": f"[^{SPACE}]"} if ecma else {}
    out, i, in_class = [], 0, False
    while i < len(source):
        c = source[i : i + 2] if source[i] == "\\" else source[i]
        in_class = (in_class or c == "[") and c != "]"
        out.append(spaces.get(c[1:], c) if len(c) == 2 else r"\Z" if c == "$" and not in_class else c)
        i += len(c)
    return re.compile("".join(out), re.ASCII if ecma else 0)


def drawn(source: str) -> st.SearchStrategy:
    """Strings of ALPHABET that hold a match of `source`."""
    return st.from_regex(python_re(source, ecma=False), alphabet=ALPHABET)


def matches(source: str, text: str, whole: bool = False) -> bool:
    """Whether `source` matches in `text` (or, `whole`, matches all of it)."""
    pat = compile_whole(source) if whole else compile_pattern(source)
    reading = pat.start
    for ch in text:
        reading = pat.step(reading, ord(ch))
        if not reading:
            return False
    return pat.accepts(reading)


@settings(max_examples=200, deadline=None)
@given(patterns, st.data())
def test_a_pattern_matches_what_python_searches_for(source, data):
    """Strings that hold a match (drawn by hypothesis from the regex) and arbitrary ones: the NFA
    and `re.search` (ASCII classes, as ECMA-262's) agree on each."""
    python = python_re(source)
    texts = [data.draw(drawn(source)), data.draw(st.text(ALPHABET, max_size=8))]
    for text in texts:
        assert matches(source, text) == bool(python.search(text)), (source, text)


# lookaheads (and $ inside a pattern, a lookahead of its own) between plain parts: (the pattern,
# the plain parts alone, for hypothesis to draw texts from, and the lookaheads' bodies, whose
# texts meet or fail them)
# bodies without nested repeats (as `regexes`: see `unrepeated`)
bodies = st.lists(quantified(atoms), min_size=1, max_size=3).map("".join)
lookahead = st.tuples(st.sampled_from(["(?=", "(?!"]), bodies, st.sampled_from(["", "$"]))
parts = st.lists(st.one_of(regexes.map(lambda r: ("plain", r)), lookahead.map(lambda t: ("look", t)),
                           st.just(("end", "$"))), min_size=1, max_size=4)  # fmt: skip


def looked(start: str, items: list, end: str) -> tuple[str, str, list[str]]:
    source = start + "".join(x if kind != "look" else f"{x[0]}{x[1]}{x[2]})" for kind, x in items) + end
    plain = start + "".join(x for kind, x in items if kind == "plain") + end
    return source, plain, [x[1] for kind, x in items if kind == "look"]


looked_patterns = st.builds(looked, st.sampled_from(["", "^"]), parts, st.sampled_from(["", "$"]))


@settings(max_examples=300, deadline=None)
@given(looked_patterns, st.data())
def test_a_pattern_with_lookaheads_matches_what_python_searches_for(drawn_pattern, data):
    """Lookaheads (a must-match or must-not-match reading beside the pattern's own, pattern.py's
    `_with_lookaheads`) and $ inside a pattern: the automaton and `re.search` agree on texts drawn
    from the plain parts, from the lookaheads' bodies, and on arbitrary ones."""
    source, plain, bodies = drawn_pattern
    python = python_re(source)
    try:
        compile_pattern(source)
    except InputError as e:
        assert "no text matches" in str(e), source
        texts = [data.draw(drawn(plain))[:10], data.draw(st.text(ALPHABET, max_size=6))]
        assert not any(python.search(t) for t in texts), source
        return
    texts = [data.draw(drawn(plain)), data.draw(st.text(ALPHABET, max_size=6))]
    texts += [data.draw(drawn(body)) + data.draw(drawn(plain)) for body in bodies[:2]]
    for text in texts:
        text = text[:10]
        assert matches(source, text) == bool(python.search(text)), (source, text)


@settings(max_examples=100, deadline=None)
@given(looked_patterns, st.data())
def test_a_string_held_to_a_pattern_with_lookaheads_never_leads_into_a_dead_end(drawn_pattern, data):
    """The bytes the mask allows, followed at random, always leave a way on, and the strings they
    close match (the product keeps only states whose lookaheads can still be decided well)."""
    source, _, _ = drawn_pattern
    python = python_re(source)
    schema = holding({"type": "string", "pattern": source})
    try:
        s = follows(schema, b'{"a":"')
    except InputError as e:
        assert "no text matches" in str(e), source
        return
    rng, written = random.Random(data.draw(st.integers(0, 2**32))), b""
    for _ in range(30):
        allowed = np.flatnonzero(mask(s)[BYTE_OFFSET:] == 0)
        assert len(allowed), (source, written)
        b = int(rng.choice(allowed))
        written += bytes([b])
        s = step(s, b)
        assert s is not None
        if all(path[1] != PATTERN for path in s):
            assert python.search(json.loads(b'"' + written)), (source, written)
            break


def test_pydantic_decimals_are_held_and_read_back():
    """Pydantic writes a Decimal field as a number or a string of its pattern, which opens with a
    negative lookahead (not only signs and dots), and a condecimal's with one inside: both held
    as JSON Schema reads them (the condecimal's pattern is not anchored at its end, so it takes
    more than Pydantic then reads), and every Decimal a walk along the mask closes reads back."""
    from decimal import Decimal

    import pydantic

    class Price(pydantic.BaseModel):
        amount: Decimal
        rounded: pydantic.condecimal(max_digits=5, decimal_places=2)

    schema = Price.model_json_schema()
    assert "(?!" in json.dumps(schema) and "(?=" in json.dumps(schema)
    root = compile_schema(schema)
    for amount, rounded in (("12.50", "123.45"), ("-0.001", "0.5"), ("7", "999")):
        text = json.dumps({"amount": amount, "rounded": rounded}).encode()
        s = advance(begin(root), [b + BYTE_OFFSET for b in text])
        assert s is not None and done(s), text
        assert Price.model_validate_json(text).rounded == Decimal(rounded)
    for wrong in ({"amount": "+."}, {"amount": "-"}, {"amount": "1x"}, {"rounded": ""}, {"rounded": "-."}):
        text = json.dumps({"amount": "1", "rounded": "1"} | wrong).encode()
        s = advance(begin(root), [b + BYTE_OFFSET for b in text])
        assert s is None or not done(s), wrong

    class Amount(pydantic.BaseModel):
        amount: Decimal

    root, rng = compile_schema(Amount.model_json_schema()), random.Random(0)
    for _ in range(40):
        s, text = begin(root), b""
        while not done(s) and len(text) < 200:
            allowed = [b for b in np.flatnonzero(mask(s)[BYTE_OFFSET:] == 0) if b not in b" \n\t\r"]
            b = int(rng.choice(allowed or np.flatnonzero(mask(s)[BYTE_OFFSET:] == 0)))
            text += bytes([b])
            s = step(s, b)
        if done(s) and isinstance(json.loads(text)["amount"], str):  # (a number past a double's range is JSON
            Amount.model_validate_json(text)  # but inf to Pydantic): raises if the pattern let through what it refuses


def follows(schema: dict, data: bytes):
    return advance(begin(compile_schema(schema)), [b + BYTE_OFFSET for b in data])


def holding(prop: dict) -> dict:
    return {"type": "object", "properties": {"a": prop}, "required": ["a"], "additionalProperties": False}


@settings(max_examples=100, deadline=None)
@given(patterns, st.data())
def test_a_string_held_to_a_pattern_is_written_one_way_and_never_into_a_dead_end(source, data):
    """A matching string, as json.dumps writes it without \\u escapes, is accepted byte by byte and
    closes (a character JSON can hold as itself is not taken escaped); the bytes the mask allows,
    followed at random, always leave a way on (a byte or the closing quote allowed at every step),
    and a string they close matches."""
    python = python_re(source)
    value = data.draw(drawn(source).filter(python.search))  # Python's \w takes "é", ECMA's does not
    schema = holding({"type": "string", "pattern": source})
    text = json.dumps({"a": value}, ensure_ascii=False).encode()
    s = follows(schema, text)
    assert s is not None and done(s), (source, text)
    if any(0x20 <= ord(c) < 0x7F and c not in '"\\' for c in value) and max(map(ord, value)) <= 0xFFFF:
        escaped = "".join(f"\\u{ord(c):04x}" for c in value)  # the same, every character escaped: refused
        assert follows(schema, f'{{"a": "{escaped}"}}'.encode()) is None
    s, rng, written = follows(schema, b'{"a":"'), random.Random(data.draw(st.integers(0, 2**32))), b""
    for _ in range(30):
        allowed = np.flatnonzero(mask(s)[BYTE_OFFSET:] == 0)
        assert len(allowed), (source, written)  # a way on
        b = int(rng.choice(allowed))
        written += bytes([b])
        s = step(s, b)
        assert s is not None
        if all(path[1] != PATTERN for path in s):  # the string closed: what it holds matches
            assert python.search(json.loads(b'"' + written)), (source, written)
            break


@settings(max_examples=200, deadline=None)
@given(patterns, st.data())
def test_a_whole_text_pattern_matches_what_python_fullmatches(source, data):
    """A regex held to a whole text (constrained decoding's regex) takes what re.fullmatch takes,
    on texts drawn to match it and on arbitrary ones."""
    python = python_re(source)  # fullmatch: a ^ or $ at its ends changes nothing
    texts = [data.draw(st.from_regex(python_re(source, ecma=False), alphabet=ALPHABET, fullmatch=True)),
             data.draw(st.text(ALPHABET, max_size=8))]  # fmt: skip
    for text in texts:
        assert matches(source, text, whole=True) == bool(python.fullmatch(text)), (source, text)


@settings(max_examples=100, deadline=None)
@given(patterns, st.data())
def test_a_text_held_to_a_pattern_is_read_as_utf8_and_never_into_a_dead_end(source, data):
    """As a grammar's root: a matching text's UTF-8 bytes are taken and may end there (EOS allowed);
    bytes the mask allows, followed at random, always leave a way on (a byte, or EOS where the text
    matches), and every text where EOS is allowed fullmatches."""
    python = python_re(source)  # fullmatch: a ^ or $ at its ends changes nothing
    root = matching(source)
    value = data.draw(st.from_regex(python_re(source, ecma=False), alphabet=ALPHABET, fullmatch=True).filter(
        python.fullmatch))  # fmt: skip
    s = advance(begin(root), [b + BYTE_OFFSET for b in value.encode()])
    assert s is not None and done(s) and mask(s)[EOS_ID] == 0, (source, value)
    s, rng, written = begin(root), random.Random(data.draw(st.integers(0, 2**32))), b""
    for _ in range(30):
        m = mask(s)
        if m[EOS_ID] == 0:
            assert python.fullmatch(written.decode()), (source, written)
        allowed = np.flatnonzero(m[BYTE_OFFSET:] == 0)
        if not len(allowed):
            assert m[EOS_ID] == 0, (source, written)  # nothing more may come: the text is whole
            break
        b = int(rng.choice(allowed))
        written += bytes([b])
        s = step(s, b)
        assert s is not None, (source, written)


def test_escaped_choices_match_themselves_alone():
    choices = ["yes", "no", "a.b*c", "(x|y)", "[é]{2}", "\\d", "中 😀", "tab\there", "line\n"]
    source = "|".join(escape(c) for c in choices)
    for c in choices:
        assert matches(source, c, True) and matches(escape(c), c, True), c
    for other in ("ye", "yess", "a b*c", "x", "éé", "\\dd", "d"):
        assert not matches(source, other, True), other
    with pytest.raises(InputError, match="option structured_outputs.regex: backreferences"):
        compile_whole(r"(a)\1", "structured_outputs.regex")


VALID = {
    "date-time": "2026-12-07T03:38:08.5+01:00",
    "date": "2026-12-07",
    "time": "23:59:60Z",
    "duration": "P1Y2M3DT4H5M6S",
    "email": "first.last+tag@mail.example-host.org",
    "hostname": "a-1.example.com",
    "ipv4": "192.168.0.255",
    "ipv6": "2001:db8::8a2e:370:7334",
    "uuid": "123e4567-e89b-12d3-a456-426614174000",
    "uri": "https://api.example.com:8443/v1/a%20b;p=1?q=x&r=/y#top",
}
INVALID = {
    "date-time": "2026-12-07 03:38:08Z",
    "date": "2026-13-07",
    "time": "24:00:00Z",
    "duration": "P",
    "email": "first@",
    "hostname": "-a.com",
    "ipv4": "256.1.1.1",
    "ipv6": "1::2::3",
    "uuid": "123e4567e89b12d3a456426614174000",
    "uri": "http://999.0.0.1/",  # a name ending in digits is an IPv4 address to a WHATWG parser, and this is none
}
# the stdlib's readers, and Pydantic's for URLs (a WHATWG parser's)
CHECKS = {"ipv4": ipaddress.IPv4Address, "ipv6": ipaddress.IPv6Address, "uuid": uuid.UUID,
          "uri": pydantic.TypeAdapter(pydantic.AnyUrl).validate_python}  # fmt: skip


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_formats_hold_what_their_rfcs_write(name):
    schema = holding({"type": "string", "format": name})
    for value, ok in ((VALID[name], True), (INVALID[name], False)):
        s = follows(schema, json.dumps({"a": value}).encode())
        assert (s is not None and done(s)) == ok, (name, value)


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(sorted(FORMATS)), st.data())
def test_what_a_format_admits_its_reader_reads(name, data):
    """Values drawn from a format's pattern are admitted; with a character changed, a value still
    admitted is one the standard library reads (IP addresses, UUIDs)."""
    python = python_re(FORMATS[name])
    value = data.draw(st.from_regex(python, fullmatch=True))
    pat = compile_format(name, "format")
    assert matches(pat.source, value), (name, value)
    if name in CHECKS and value:
        i = data.draw(st.integers(0, len(value) - 1))
        changed = value[:i] + data.draw(st.sampled_from("0:.-aGf")) + value[i + 1 :]
        if matches(pat.source, changed):
            CHECKS[name](changed)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 9999), st.integers(0, 13), st.integers(0, 32))
def test_a_dates_day_is_held_to_its_month_and_year(year, month, day):
    """RFC 3339's full-date: 30 days in April, 28 in February but 29 in leap years (2000 and 2024,
    not 1900 or 2026), as the calendar has them; years 0001 to 9999, those Python's (and
    Pydantic's, jsonschema's) readers take."""
    text = f"{year:04d}-{month:02d}-{day:02d}"
    try:
        real = bool(datetime.date(year, month, day))
    except ValueError:
        real = False
    assert matches(FORMATS["date"], text) == real, text
    assert [matches(FORMATS["date"], f"{y}-02-29") for y in (2000, 2024, 1900, 2026)] == [True, True, False, False]
    assert not matches(FORMATS["date"], "0000-01-01") and matches(FORMATS["date"], "0001-01-01")


HOST = ".".join(["a" * 63] * 3 + ["b" * 59])  # 251 characters, each label within 63


@pytest.mark.parametrize(
    ("name", "value", "ok"),
    [("hostname", HOST + "bb", True), ("hostname", HOST + "bbb", False), ("email", "xy@" + HOST, True),
     ("email", "xyz@" + HOST, False)],
)  # fmt: skip
def test_hostnames_and_emails_are_held_to_their_most_characters(name, value, ok):
    """RFC 1123's 253 characters for a hostname, RFC 5321's 254 for an email, with no maxLength
    given (a smaller one given still holds)."""
    assert len(value) == (253 if name == "hostname" else 254) + (not ok)
    s = follows(holding({"type": "string", "format": name}), json.dumps({"a": value}).encode())
    assert (s is not None and done(s)) == ok, (name, len(value))
    s = follows(holding({"type": "string", "format": name, "maxLength": 20}), json.dumps({"a": value}).encode())
    assert s is None


@pytest.mark.parametrize(
    ("prop", "match"),
    [
        ({"type": "string", "pattern": "(?<=a)b"}, r"a\.pattern: lookbehinds"),
        ({"type": "string", "pattern": "(?<!a)b"}, r"a\.pattern: lookbehinds"),
        ({"type": "string", "pattern": "(?i)ab"}, r"a\.pattern: inline flags"),
        ({"type": "string", "pattern": "(?s:.)"}, r"a\.pattern: inline flags"),
        ({"type": "string", "pattern": "(?#c)ab"}, r"a\.pattern: comments"),
        ({"type": "string", "pattern": "(?P<n>ab)"}, r"a\.pattern: Python's \(\?P<name>"),
        ({"type": "string", "pattern": "a{,3}"}, r"a\.pattern: \{,3\}: ECMA-262 reads it as its characters"),
        ({"type": "string", "pattern": "(?=(?=a))"}, r"a\.pattern: a lookahead inside a lookahead"),
        ({"type": "string", "pattern": "(?=a$b)"}, r"a\.pattern: \$ inside a lookahead is not held"),
        ({"type": "string", "pattern": "(?=a)*"}, r"a\.pattern: a quantifier on a lookahead"),
        ({"type": "string", "pattern": "(?=^a)"}, r"a\.pattern: \^ only at the start"),
        ({"type": "string", "pattern": "^(?=a)b"}, r"a\.pattern: no text matches"),
        ({"type": "string", "pattern": "^a(?!b)b"}, r"a\.pattern: no text matches"),
        ({"type": "string", "pattern": r"(a)\1"}, r"a\.pattern: backreferences \(\\1\)"),
        ({"type": "string", "pattern": r"\bx"}, r"a\.pattern: word boundaries"),
        ({"type": "string", "pattern": r"\p{L}"}, r"a\.pattern: Unicode property classes"),
        ({"type": "string", "pattern": "(a"}, r"a\.pattern: an unclosed group"),
        ({"type": "string", "pattern": "(" * 300 + "a" + ")" * 300}, r"a\.pattern: groups nested more than 50 deep"),
        ({"type": "string", "pattern": "(?=" * 300 + "a" + ")" * 300}, r"a\.pattern: groups nested more than 50"),
        ({"type": "string", "pattern": "[]"}, r"a\.pattern: a class no character is in"),
        ({"type": "string", "pattern": "a^b"}, r"a\.pattern: \^ only at the start of the pattern's alternatives"),
        ({"type": "string", "pattern": "a**"}, r"a\.pattern: a quantifier right after a quantifier"),
        ({"type": "string", "pattern": r"\ud800"}, r"a\.pattern: a surrogate"),
        ({"type": "string", "pattern": "(a{1,60}){1,99}"}, r"a\.pattern: .*more than 5000 states"),
        ({"type": "string", "pattern": 5}, r"a\.pattern: expected a string"),
        ({"type": "string", "format": "uri-reference"}, r"a\.format: 'uri-reference' is not one of the formats held"),
        ({"type": "string", "format": "date", "pattern": "x"}, r"a\.format: no text is both 'x' and"),
        ({"type": "integer", "pattern": "1"}, r"a\.pattern: only beside \"type\": \"string\""),
        ({"enum": ["a"], "format": "date"}, r"a\.format: only beside"),
    ],
)
def test_patterns_and_formats_that_are_not_held_are_refused_by_name(prop, match):
    with pytest.raises(InputError, match=r"option schema\.properties\." + match):
        compile_schema(holding(prop))


@settings(max_examples=150, deadline=None)
@given(patterns, patterns, st.data())
def test_two_patterns_together_take_what_both_take_and_never_lead_into_a_dead_end(first, second, data):
    """A pattern beside a format (any two automata, pattern.intersect): a text is taken exactly
    when both searches find a match; a walk along the characters the reading takes always has a
    way on to a text both match (the product keeps only pairs of states that can end together)."""
    a, b = python_re(first), python_re(second)
    try:
        both = intersect(compile_pattern(first), compile_pattern(second), "pattern")
    except InputError as e:
        assert "no text is both" in str(e)
        assert not any(a.search(t) and b.search(t) for t in (data.draw(drawn(first)), data.draw(drawn(second))))
        return
    for text in (data.draw(drawn(first)), data.draw(drawn(second)), data.draw(st.text(ALPHABET, max_size=8))):
        text = text[:10]  # Python's re backtracks: a long text that one nested repeat does not match takes ages
        reading = both.start
        for ch in text:
            reading = both.step(reading, ord(ch)) if reading else reading
        assert bool(reading and both.accepts(reading)) == bool(a.search(text) and b.search(text)), (first, second, text)
    rng, reading, text = random.Random(data.draw(st.integers(0, 2**32))), both.start, ""
    for _ in range(12):
        nexts = [c for c in ALPHABET if both.step(reading, ord(c))]
        others = any(lo <= hi for s in reading for lo, hi, _ in both.moves[s])  # beyond ALPHABET
        assert both.accepts(reading) or nexts or others, (first, second, text)  # a way on
        if both.accepts(reading):
            assert a.search(text) and b.search(text), (first, second, text)
        if not nexts or rng.random() < 0.1:
            break
        text += rng.choice(nexts)
        reading = both.step(reading, ord(text[-1]))


def test_a_pattern_string_sits_beside_others_in_a_union_and_eos_waits_for_the_object():
    schema = holding({"anyOf": [{"type": "string", "format": "date"}, {"type": "string", "pattern": "^x+$"}]})
    for value, ok in (("2026-01-02", True), ("xxx", True), ("2026-x", False), ("", False)):
        s = follows(schema, json.dumps({"a": value}).encode())
        assert (s is not None and done(s)) == ok, value
    s = follows(schema, b'{"a":"2026-01-02"')
    assert mask(s)[EOS_ID] != 0 and mask(s)[BYTE_OFFSET + ord("}")] == 0


# ---------------------------------------------------------------------------- number bounds
NUMBER_TEXTS = [str(i) for i in range(-160, 161)] + [
    f"{i}.{f}" for i in range(-160, 161, 7) for f in ("0", "5", "00", "25")
]
NUMBER_TEXTS += ["-0", "-0.0", "0.0", "-0.5", "007", "1e2", "1.", "-1.0", "2.50", "1E1", "0.001"]


def within(text: str, integer: bool, bounds: dict) -> bool:
    """Whether `text` is a number the bounds (and multipleOf) admit, written one way (no exponent,
    "-0" or leading zero; an integer without a fraction; a multiple with no more decimals than its
    multipleOf has)."""
    multiple = Fraction(repr(bounds["multipleOf"])) if "multipleOf" in bounds else None
    places = max(-Decimal(repr(bounds["multipleOf"])).normalize().as_tuple().exponent, 0) if multiple else None
    fraction = r"(\.[0-9]+)?" if places is None else rf"(\.[0-9]{{1,{places}}})?" if places else ""
    shape = r"-?(0|[1-9][0-9]*)" + ("" if integer else fraction)
    if not re.fullmatch(shape, text) or re.fullmatch(r"-0(\.0+)?", text):
        return False
    v = Fraction(text)
    if multiple is not None and (v / multiple).denominator != 1:
        return False
    b = {k: Fraction(repr(x)) for k, x in bounds.items()}  # a bound is the decimal the schema writes, not a double
    checks = {"minimum": v >= b.get("minimum", v), "exclusiveMinimum": "exclusiveMinimum" not in b or v >
              b["exclusiveMinimum"], "maximum": v <= b.get("maximum", v),
              "exclusiveMaximum": "exclusiveMaximum" not in b or v < b["exclusiveMaximum"]}  # fmt: skip
    return all(checks.values())


@settings(max_examples=150, deadline=None)
@given(st.booleans(), st.data())
def test_a_number_is_held_to_its_bounds(integer, data):
    """Drawn bounds (whole or with decimals) and multipleOf (whole or decimal, alone or beside
    bounds): a number's text is taken to its end exactly when it is written one way and
    they admit it (Fraction arithmetic; jsonschema agrees where its float division is exact);
    bounds no number meets are refused."""
    values = st.integers(-150, 150) | st.floats(-150, 150).map(lambda x: round(x, data.draw(st.integers(1, 3))))
    bounds = data.draw(st.dictionaries(st.sampled_from(BOUNDS), values, max_size=3))
    if data.draw(st.booleans()) or not bounds:
        bounds["multipleOf"] = data.draw(st.sampled_from([1, 2, 3, 5, 7, 10, 25, 0.5, 0.25, 0.1, 0.3, 1.5, 0.05]))
    schema = holding({"type": "integer" if integer else "number", **bounds})
    try:
        root = compile_schema(schema)
    except InputError as e:
        assert "is within its bounds" in str(e), str(e)
        assert not any(within(t, integer, bounds) for t in NUMBER_TEXTS + [str(x / 10) for x in range(-1600, 1601)])
        return
    head = advance(begin(root), [b + BYTE_OFFSET for b in b'{"a": '])  # states are values: shared by each text
    validator = jsonschema.validators.validator_for(schema)(schema)  # jsonschema.validate checks the schema each time
    near = [Decimal(repr(v)) + Decimal(d) for k, v in bounds.items() if k != "multipleOf"
            for d in ("-0.1", "-0.01", "-0.001", "0", "0.001", "0.01", "0.1")]  # fmt: skip
    cut = [repr(v)[:i] for k, v in bounds.items() if k != "multipleOf" for i in range(1, len(repr(v)))]  # 1.2 for 1.25
    for text in NUMBER_TEXTS + [format(x, "f") for x in near] + [format(x, "f") + "0" for x in near] + cut:
        s = advance(head, [b + BYTE_OFFSET for b in f"{text}}}".encode()])
        ok = s is not None and done(s)
        assert ok == within(text, integer, bounds), (bounds, text)
        if ok and isinstance(bounds.get("multipleOf", 1), int):
            validator.validate({"a": json.loads(text)})


def test_number_automata_are_minimal_dfas():
    """A number's bounds and multiple are minimized DFAs (so their product stays small): multiples
    of 1,000 need only the count of trailing zeros (0-3), not 1,000 remainders; multiples of 7 the
    7 remainders (each with the start, "-", "0" and the end); the bounds 0 to 10^18 under 100 states;
    a reading has one state with characters to follow (the rest are ways to the end)."""
    assert len(number_pattern(None, None, (1000, 0), True, "a").moves) == 8
    assert len(number_pattern(None, None, (7, 0), True, "a").moves) == 11
    bounds = number_pattern((Decimal(0), False), (Decimal(10**18), False), None, True, "a")
    assert len(bounds.moves) < 100
    reading = bounds.start
    for c in "1234567":
        reading = bounds.step(reading, ord(c))
        assert sum(1 for state in reading if bounds.moves[state]) == 1 and bounds.accepts(reading)


@pytest.mark.parametrize(
    ("prop", "match"),
    [
        ({"type": "integer", "maximum": "9"}, r"a\.maximum: expected a number"),
        ({"type": "integer", "maximum": True}, r"a\.maximum: expected a number"),
        ({"type": "integer", "minimum": 10**19}, r"a\.minimum: expected a number within"),
        ({"type": "integer", "minimum": 3, "exclusiveMaximum": 3}, r"a: no integer is within its bounds"),
        ({"type": "string", "maximum": 3}, r"a\.maximum: only beside \"type\": \"number\" or \"integer\""),
        ({"type": "integer", "multipleOf": 0}, r"a\.multipleOf: expected a number above 0"),
        ({"type": "number", "multipleOf": "1"}, r"a\.multipleOf: expected a number above 0"),
        ({"type": "number", "multipleOf": 0.0997}, r"a\.multipleOf: 0\.0997 is not held: its digits .* \(997\)"),
        ({"type": "string", "format": "email", "pattern": r"([a-z]{1,30}\.){1,40}"}, r"a\.format: .* more than 20,000"),
        ({"type": "integer", "multipleOf": 2499, "minimum": -(10**18), "maximum": 10**18}, r"a: more than 20,000"),
        (
            {"type": "integer", "multipleOf": 7, "minimum": 1, "maximum": 6},
            r"a: no integer is within its bounds and a multiple",
        ),
        ({"type": "string", "multipleOf": 2}, r"a\.multipleOf: only beside \"type\": \"number\" or \"integer\""),
        ({"type": "string", "maxLength": 1, "pattern": "^(ab)+$"}, r"a\.maxLength: no string of '\^\(ab\)\+\$' has 0"),
        ({"type": "string", "minLength": 2, "maxLength": 2, "format": "uuid"}, r"a\.maxLength: no string of"),
        ({"type": "string", "maxLength": 1.5}, r"a\.maxLength: expected a non-negative integer"),
        ({"type": "string", "minLength": 3, "maxLength": 2}, r"a\.maxLength: 2 is less than minLength \(3\)"),
        ({"type": "string", "maxLength": 10**4}, r"a\.maxLength: at most 4,998 characters are held"),
        ({"type": "array", "minLength": 1}, r"a\.minLength: only beside \"type\": \"string\""),
    ],
)
def test_bounds_and_lengths_that_are_not_held_are_refused_by_name(prop, match):
    with pytest.raises(InputError, match=r"option schema\.properties\." + match):
        compile_schema(holding(prop))


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 6), st.none() | st.integers(0, 6), st.text(ALPHABET + "\r\x00", max_size=9))
def test_a_strings_length_is_held_in_characters(least, more, value):
    """minLength / maxLength count characters (code points, as len() and jsonschema do), raw or
    escaped, one byte or four."""
    most = None if more is None else least + more
    schema = holding({"type": "string", "minLength": least, **({} if most is None else {"maxLength": most})})
    s = follows(schema, json.dumps({"a": value}, ensure_ascii=False).encode())
    assert (s is not None and done(s)) == (least <= len(value) and (most is None or len(value) <= most)), value


@settings(max_examples=150, deadline=None)
@given(patterns, st.integers(0, 4), st.none() | st.integers(0, 4), st.data())
def test_a_pattern_with_length_bounds_holds_both_and_never_leads_into_a_dead_end(source, least, more, data):
    """A pattern beside minLength / maxLength: a string is taken whole exactly when it matches and
    has the length; the mask, followed at random, never reaches a reading with no way on (where
    the pattern alone would go on but the count has no room left) and closes only on strings
    that hold both; where no string can, the schema is refused by name."""
    python, most = python_re(source), None if more is None else least + more
    bounds = {"minLength": least, **({} if most is None else {"maxLength": most})}
    schema = holding({"type": "string", "pattern": source, **bounds})

    def holds(text: str) -> bool:
        return bool(python.search(text)) and least <= len(text) and (most is None or len(text) <= most)

    values = [data.draw(drawn(source)), data.draw(st.text(ALPHABET, max_size=9))]
    try:
        compile_schema(schema)
    except InputError as e:
        assert "no string of" in str(e)
        assert not any(holds(v) for v in values), values
        return
    for value in values:
        s = follows(schema, json.dumps({"a": value}, ensure_ascii=False).encode())
        assert (s is not None and done(s)) == holds(value), (source, bounds, value)
    s, rng, written = follows(schema, b'{"a":"'), random.Random(data.draw(st.integers(0, 2**32))), b""
    for _ in range(12):
        allowed = np.flatnonzero(mask(s)[BYTE_OFFSET:] == 0)
        assert len(allowed), (source, bounds, written)  # a way on
        b = int(rng.choice(allowed))
        written += bytes([b])
        s = step(s, b)
        assert s is not None
        if all(path[1] != PATTERN for path in s):
            assert holds(json.loads(b'"' + written)), (source, bounds, written)
            break


@pytest.mark.parametrize(
    ("prop", "value", "ok"),
    [
        ({"format": "email", "maxLength": 12}, "ab@cd.example", False),
        ({"format": "email", "maxLength": 13}, "ab@cd.example", True),
        ({"format": "hostname", "minLength": 4}, "a.b", False),
        ({"format": "hostname", "minLength": 4}, "a.bc", True),
        ({"pattern": "^[a-z]*x$", "maxLength": 3}, "abx", True),
        ({"pattern": "^[a-z]*x$", "maxLength": 3}, "abcx", False),
        ({"pattern": "é", "minLength": 2}, "é", False),
        ({"pattern": "é", "minLength": 2, "maxLength": 2}, "😀é", True),
        ({"format": "email", "pattern": r"@example\.com$", "maxLength": 15}, "ab@example.com", True),
        ({"format": "email", "pattern": r"@example\.com$", "maxLength": 15}, "ab@example.org", False),
        ({"format": "email", "pattern": r"@example\.com$", "maxLength": 15}, "abc.d@example.com", False),
        ({"format": "date", "pattern": "^19"}, "1999-12-31", True),
        ({"format": "date", "pattern": "^19"}, "2000-01-01", False),
    ],
)
def test_a_format_or_pattern_with_length_bounds_counts_characters(prop, value, ok):
    s = follows(holding({"type": "string", **prop}), json.dumps({"a": value}, ensure_ascii=False).encode())
    assert (s is not None and done(s)) == ok


def test_a_count_that_leaves_no_room_for_the_patterns_end_is_masked_out():
    """`^[a-z]*x$` with at most 3 characters: after "ab" only "x" can come (a letter would leave a
    string the pattern cannot end), and after "abx" only the closing quote."""
    s = follows(holding({"type": "string", "pattern": "^[a-z]*x$", "maxLength": 3}), b'{"a":"ab')
    assert [chr(b) for b in np.flatnonzero(mask(s)[BYTE_OFFSET:] == 0)] == ["x"]
    s = step(s, ord("x"))
    assert [chr(b) for b in np.flatnonzero(mask(s)[BYTE_OFFSET:] == 0)] == ['"']


def test_pydantic_models_with_dates_ids_bounds_patterns_and_lengths_are_held():
    """What openai's client sends for a Pydantic model (to_strict_json_schema) with the field types
    that carry these keywords compiles, and the models' own JSON is taken to its end."""
    import datetime
    from typing import Annotated

    import pydantic
    from openai.lib._pydantic import to_strict_json_schema

    class Event(pydantic.BaseModel):
        when: datetime.datetime
        day: datetime.date
        id: uuid.UUID
        count: Annotated[int, pydantic.Field(ge=0, le=10)]
        p: Annotated[float, pydantic.Field(gt=0, le=1)]
        code: Annotated[str, pydantic.Field(pattern=r"^[A-Z]{3}$")]
        name: Annotated[str, pydantic.Field(min_length=1, max_length=20)]
        tag: Annotated[str, pydantic.Field(pattern=r"^[a-z]+$", max_length=8)]
        link: pydantic.AnyUrl
        home: pydantic.HttpUrl

    schema = to_strict_json_schema(Event)
    assert {"format", "minimum", "exclusiveMinimum", "pattern", "minLength"} <= set(json.dumps(schema).replace(
        '"', " ").split())  # fmt: skip
    root = compile_schema(schema)
    when = datetime.datetime(2026, 12, 7, 3, 38, 8, 500000, tzinfo=datetime.UTC)
    for count, p, name in ((0, 1.0, "x"), (10, 0.25, "é" * 20)):
        event = Event(when=when, day=when.date(), id=uuid.uuid4(), count=count, p=p, code="ABC", name=name,
                      tag="abc", link="s3://bucket.example/a%20b?v=1#x", home="https://example.com")  # fmt: skip
        for text in (event.model_dump_json(), event.model_dump_json(indent=1)):
            s = advance(begin(root), [b + BYTE_OFFSET for b in text.encode()])
            assert s is not None and done(s), text
    for wrong in ({"count": 11}, {"p": 0.0}, {"code": "abc"}, {"name": ""}, {"name": "x" * 21}, {"tag": "a" * 9},
                  {"tag": "A"}, {"link": "no scheme"}, {"home": "https://example.com/" + "a" * 2070}):  # fmt: skip
        value = json.loads(event.model_dump_json()) | wrong
        s = advance(begin(root), [b + BYTE_OFFSET for b in json.dumps(value, ensure_ascii=False).encode()])
        assert s is None or not done(s), wrong


# ---------------------------------------------------------------------------- memory
def test_a_schema_whose_automata_pass_the_budget_is_refused_by_name():
    """Each distinct automaton's states count once per schema (fields that share a pattern share
    it): 30 fields with one pattern pass, 26 with patterns of ~4,400 states each do not."""
    shared = {f"f{i}": {"type": "string", "pattern": "^a[a-z]{2200}$"} for i in range(30)}
    compile_schema({"type": "object", "properties": shared})
    distinct = {
        f"f{i}": {"type": "string", "pattern": f"^{c}[a-z]{{2200}}$"}
        for i, c in enumerate("abcdefghijklmnopqrstuvwxyz")
    }
    with pytest.raises(InputError, match=r"option schema\.properties\.f\d+: more than 100,000 states of its strings' "
                                         r"and numbers' automata in the schema$"):  # fmt: skip
        compile_schema({"type": "object", "properties": distinct})


def test_the_caches_start_again_past_the_states_budget(monkeypatch):
    """Requests with ever new schemas cannot grow the caches without end: once the automata built
    pass STATES_BUDGET the compiled schemas, automata and masks kept are dropped; a schema a
    request still holds keeps working."""
    from fastblt.runtime import grammar, pattern

    monkeypatch.setattr(grammar, "STATES_BUDGET", 12_000)
    grammar.drop_caches()
    held = []
    for c in "pqrs":  # ~4,400 states each: the third passes the budget
        held.append(grammar.compiled(json.dumps(holding({"type": "string", "pattern": f"^{c}[a-z]{{2200}}$"}))))
        assert pattern.states_built() <= 12_000
    assert grammar.compiled.cache_info().currsize < 4 and pattern._compiled.cache_info().currsize < 4
    for c, root in zip("pqrs", held, strict=True):
        value = c + "x" * 2200
        s = advance(begin(root), [b + BYTE_OFFSET for b in json.dumps({"a": value}).encode()])
        assert s is not None and done(s)
