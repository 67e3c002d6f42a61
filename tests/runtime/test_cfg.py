"""Context-free grammars over a whole text (runtime/cfg.py, the grammar root in grammar.py): the
Earley recognizer takes exactly the texts Lark's Earley parser derives (on texts drawn from each
grammar and on arbitrary ones), a text followed byte by byte along the mask never stalls and ends
(EOS allowed) only where Lark accepts it, and what cannot be held is refused by name."""

from __future__ import annotations

import random

import lark
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastblt.errors import InputError
from fastblt.model.config import BYTE_OFFSET, EOS_ID
from fastblt.runtime.cfg import begin_cfg, compile_grammar
from fastblt.runtime.grammar import advance, begin, derived, done, mask, step

GRAMMARS = {
    "arithmetic": """
        start: expr
        expr: term (("+" | "-") term)*
        term: NUMBER | "(" expr ")" | NAME "(" [expr ("," expr)*] ")"
        NUMBER: /[0-9]+/
        NAME: /[a-z_]+/
    """,
    "left and right recursion, empty rules": """
        start: a b
        a: a "x" |
        b: "y" b | "z"?
    """,
    "nested lists": """
        start: list
        list: "[" [value ("," " "? value)*] "]"
        value: list | WORD | "é" | "中"
        WORD: /[a-c]{1,3}/
    """,
    "keywords beside names": """
        start: stmt+
        stmt: ("if" | "while") " " NAME ":" | NAME " = " NAME ";"
        NAME: /[a-z]+/
    """,
    "character ranges": """
        start: ("a".."c" | "0".."9")+ "!"?
    """,
    "ambiguous": """
        start: s
        s: s s | "a" | "ab" | "b"
    """,
}
GRAMMARS["ignored whitespace"] = GRAMMARS["arithmetic"] + '%ignore " "\n%ignore /[\t]+/\n'
ALPHABET = "0123456789+-(),abcxyz_[]é中 :=;iwhle\t"


def reads(text: str, source: str) -> bool:
    s = begin_cfg(compile_grammar(source))
    for ch in text:
        s = s.step(ord(ch))
        if s is None:
            return False
    return s.accepts()


def lark_reads(text: str, source: str) -> bool:
    parser = _lark(source)
    try:
        parser.parse(text)
        return True
    except lark.exceptions.LarkError:
        return False


_PARSERS: dict[str, lark.Lark] = {}


def _lark(source: str) -> lark.Lark:
    if source not in _PARSERS:
        _PARSERS[source] = lark.Lark(source, parser="earley", lexer="dynamic_complete")
    return _PARSERS[source]


def derivation(source: str, rng: random.Random, depth: int = 0) -> str:
    """A text the grammar derives, drawn by walking its productions (shallow ones past a depth)."""
    g = compile_grammar(source)
    out: list[str] = []

    def expand(symbol, d: int) -> None:
        if not isinstance(symbol, int):
            out.append(_sample(symbol.source, rng))
            return
        choices = g.by_lhs[symbol]
        if d > 6:
            choices = sorted(choices, key=lambda p: len(g.productions[p][1]))[:1]
        for s in g.productions[rng.choice(choices)][1]:
            expand(s, d + 1)

    expand(g.start, depth)
    return "".join(out)


def _sample(shown: str, rng: random.Random) -> str:
    """A text of a terminal as the grammars above write them (what %ignore takes: a space)."""
    if shown.startswith('"') and '".."' in shown:  # a range: its first or last character
        return rng.choice([shown[1], shown[-2]])
    if shown.startswith('"'):
        return shown[1:-1]
    return {"/[0-9]+/": "12", "/[a-z_]+/": rng.choice(["f", "ab_c"]), "/[\t]+/": "\t",
            "/[a-c]{1,3}/": rng.choice(["a", "abc"]), "/[a-z]+/": rng.choice(["x", "ifz"])}[shown]  # fmt: skip


@pytest.mark.parametrize("name", sorted(GRAMMARS))
@settings(max_examples=60, deadline=None)
@given(st.data())
def test_the_recognizer_takes_what_lark_derives(name, data):
    source = GRAMMARS[name]
    rng = random.Random(data.draw(st.integers(0, 2**32)))
    texts = [derivation(source, rng), data.draw(st.text(ALPHABET, max_size=10))]
    texts.append(texts[0][: data.draw(st.integers(0, len(texts[0])))])  # a prefix: whole or not
    for text in texts:
        assert reads(text, source) == lark_reads(text, source), (name, text)


@pytest.mark.parametrize("name", sorted(GRAMMARS))
def test_a_walk_along_the_mask_never_stalls_and_ends_only_on_a_derived_text(name):
    source = GRAMMARS[name]
    root = derived(source)
    for seed in range(8):
        rng, s, written = random.Random(seed), begin(root), b""
        for _ in range(40):
            m = mask(s)
            if m[EOS_ID] == 0:
                assert lark_reads(written.decode(), source), (name, written)
            allowed = np.flatnonzero(m[BYTE_OFFSET:] == 0)
            if not len(allowed) or (m[EOS_ID] == 0 and rng.random() < 0.1):
                assert m[EOS_ID] == 0 and done(s), (name, written)  # nothing more may come: whole
                break
            b = int(rng.choice(allowed))
            written += bytes([b])
            s = step(s, b)
            assert s is not None, (name, written)
        derivable = derivation(source, random.Random(seed)).encode()
        s = advance(begin(root), [b + BYTE_OFFSET for b in derivable])
        assert s is not None and done(s) and advance(s, [EOS_ID]) is not None, (name, derivable)


def test_gbnf_notation_reads_character_classes_repeats_and_root():
    source = 'root ::= "a" [b-d]+ ("x" | "y")? # a comment'
    for text, ok in [("ab", True), ("abcdx", True), ("a", False), ("abz", False), ("abby", True)]:
        assert reads(text, source) == ok, text
    for text, ok in [("aaa", True), ("aa", True), ("a", False), ("aaaa", False)]:
        assert reads(text, 'root ::= "a"{2,3}') == ok and reads(text, 'root ::= "a"{2,}') == (len(text) >= 2), text


def test_lark_common_terminals_aliases_and_any_case_strings():
    source = """
        start: pair ("," pair)* -> pairs
        pair: ESCAPED_STRING ":" (SIGNED_NUMBER | "null"i) -> pair
        %import common.ESCAPED_STRING
        %import common (SIGNED_NUMBER, WS)
    """
    for text, ok in [('"a":1', True), ('"a\\"b":-1.5e3,"c":NULL', True), ('"a":Null', True), ('"a":', False),
                     ('"a":1,', False), ('"a"b":1', False), ("'a':1", False)]:  # fmt: skip
        assert reads(text, source) == ok, text
    with pytest.raises(InputError, match="common.NOPE: not one of Lark's common terminals"):
        compile_grammar("start: NOPE\n%import common.NOPE")


@pytest.mark.parametrize(
    "source, match",
    [
        ("%import other.WS\nstart: WS", "%import is not held"),
        ('%declare X\nstart: "a"', "%declare is not held"),
        ("start: a", "rule a is used but not defined"),
        ('start: "x"\nstart: "y"', "rule start is defined twice"),
        ('a: "x"', "no start rule"),
        ('start: b\nb: b "x"', "rule b derives no text"),
        ("start: /(?<=a)b/", "lookbehinds"),
        ("start: /a/i", "regex flags"),
        ('start: "a" ~ 200', "a count up to 100"),
        ('start: ("a"', "expected \\)"),
        ("start: @", "unexpected '@'"),
        ("start: " + "(" * 300 + '"a"' + ")" * 300, "groups nested more than 50 deep"),
        ("start: " + "[" * 300 + '"a"' + "]" * 300, "groups nested more than 50 deep"),
        ("start: /" + "(" * 300 + "a" + ")" * 300 + "/", "groups nested more than 50 deep"),
    ],
)
def test_what_a_grammar_cannot_hold_is_refused_by_name(source, match):
    with pytest.raises(InputError, match=match) as e:
        compile_grammar(source)
    assert str(e.value).startswith("option grammar")


def test_bounded_repeats_and_optional_groups():
    source = 'start: "ab" ~ 2..3 ["!"]'
    for text, ok in [("abab", True), ("ababab!", True), ("ab", False), ("abababab", False), ("abab!", True)]:
        assert reads(text, source) == ok, text
