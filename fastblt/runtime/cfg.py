"""Context-free grammars over a whole text: which characters may come next so that the text stays
the beginning of one the grammar derives, read by an Earley recognizer one character at a time.

A grammar is written as Lark writes one (`start: expr`, `expr: term ("+" term)*`, strings (`"x"i`:
any case; `"a".."z"` a range), /regexes/, `( )`, `[ ]` optional, `? * + ~ n..m`, aliases `-> name`
(read past); rules in lower case, terminals in upper case, both read as rules: a byte model has no
lexer; `%import common.NAME` defines one of Lark's common terminals; `%ignore` items may come
before, between and after the tokens of lower-case rules), or as llama.cpp's GBNF (`root ::= ...`,
where `[...]` is a character class, and `{m,n}` a repeat). Its start symbol is `start` (or `root`).
A string or a regex (pattern.py's subset, matched whole) is one terminal, read by its automaton a
character at a time inside an Earley item, so a long terminal costs a step per character, not a rule
per state. Repeats are left-recursive rules, which Earley reads in constant work per character.
Other directives are refused by name, and so is a rule that derives no text (every item an Earley
set holds can then still be completed: a text the mask lets through never reaches a dead end).

An Earley set is a frozenset of items (production, dot, origin, reading: the terminal's automaton
states when the item is inside its next terminal, else None). A state holds the chart (the sets so
far) as a list shared by the states that extend it: a state that continues where another already
went (a draft checked, then the same bytes committed) reuses that set.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property, lru_cache

from fastblt.errors import InputError
from fastblt.runtime.courtesy import pause
from fastblt.runtime.pattern import Pattern, compile_whole, escape

MAX_RULES = 2000  # productions after repeats and groups are written out
MAX_REPEAT = 100  # the most of a `~ n..m` bound
MAX_NESTING = 50  # groups inside groups: deeper is refused rather than recursed into

_PARTS = [
    r"(?P<space>\s+|//[^\n]*|\#[^\n]*)",
    r'(?P<string>"(?:[^"\\\n]|\\.)*"i?)',
    r"(?P<regex>/(?:[^/\\\n]|\\.)+/[a-z]*)",
    r"(?P<name>[?!]?[A-Za-z_][A-Za-z_0-9]*)",
    r"(?P<define>::=|:)",
    r"(?P<punct>->|[|()\[\]?*+~]|\.\.)",
    r"(?P<number>\d+)",
    r"(?P<directive>%[a-z]+)",
]
_TOKEN = re.compile("|".join(_PARTS))
_GBNF = [r"(?P<cls>\[(?:[^\]\\]|\\.)+\])", r"(?P<brace>\{\s*\d+\s*(?:,\s*\d*\s*)?\})"]  # [a-z], {m,n}
_GBNF_TOKEN = re.compile("|".join([*_GBNF, *_PARTS]))
# Lark's common.lark terminals (`%import common.NAME`), as regexes of pattern.py's subset
_DECIMAL, _EXP = r"([0-9]+\.[0-9]*|\.[0-9]+)", "[eE][+-]?[0-9]+"
_FLOAT = f"[0-9]+{_EXP}|{_DECIMAL}({_EXP})?"
_NUMBER = f"[0-9]+({_EXP})?|{_DECIMAL}({_EXP})?"
COMMON = {
    "DIGIT": "[0-9]", "HEXDIGIT": "[0-9a-fA-F]", "INT": "[0-9]+", "SIGNED_INT": "[+-]?[0-9]+",
    "DECIMAL": _DECIMAL, "FLOAT": _FLOAT, "SIGNED_FLOAT": f"[+-]?({_FLOAT})",
    "NUMBER": _NUMBER, "SIGNED_NUMBER": f"[+-]?({_NUMBER})", "ESCAPED_STRING": r'"([^"\\\n]|\\[^\n])*"',
    "LCASE_LETTER": "[a-z]", "UCASE_LETTER": "[A-Z]", "LETTER": "[A-Za-z]", "WORD": "[A-Za-z]+",
    "CNAME": "[_A-Za-z][_A-Za-z0-9]*", "WS_INLINE": r"[ \t]+", "WS": r"[ \t\f\r\n]+", "CR": r"\r", "LF": r"\n",
    "NEWLINE": r"(\r?\n)+", "SH_COMMENT": r"#[^\n]*", "CPP_COMMENT": r"//[^\n]*",
    "C_COMMENT": r"/\*([^*]|\*+[^*/])*\*+/", "SQL_COMMENT": r"--[^\n]*",
}  # fmt: skip
_IGNORE = re.compile(r"^[ \t]*%ignore[ \t]+(.+?)[ \t]*$", re.MULTILINE)
IGNORED = "__ignored"  # the rule %ignore's items make: what may come between any two tokens
_IMPORT = re.compile(r"^[ \t]*%import[ \t]+common(?:\.(\w+)(?:[ \t]*->[ \t]*(\w+))?|[ \t]*\(([\w\s,]*)\))[ \t]*$",
                     re.MULTILINE)  # fmt: skip


@dataclass(frozen=True)
class Terminal:
    """A string or regex, matched whole by `pattern` a character at a time."""

    pattern: Pattern
    source: str


@dataclass(eq=False)  # compared and hashed by identity (masks are cached by what refers to it)
class Grammar:
    """Productions as (lhs, rhs): rhs a tuple of nonterminal ids (ints) and Terminals."""

    productions: list[tuple[int, tuple]]
    by_lhs: dict[int, list[int]]
    nullable: frozenset[int]
    start: int
    names: dict[str, int]


class _Parser:
    """A grammar's text -> productions; InputError naming what is not held."""

    def __init__(self, text: str):
        self.gbnf = "::=" in text  # GBNF: [...] is a character class; Lark: an optional group
        self.imports: dict[str, str] = {}  # name defined -> the common terminal it is
        text = _IMPORT.sub(self._imported, text)
        ignored = [m.group(1) for m in _IGNORE.finditer(text)]
        if ignored:  # a rule of its own, read as the others
            text = _IGNORE.sub("", text) + f"\n{IGNORED}: " + " | ".join(f"({item})" for item in ignored)
        self.tokens = self._tokens(text, self.gbnf)
        self.i = 0
        self.depth = 0  # groups open at the cursor
        self.names: dict[str, int] = {}
        self.productions: list[tuple[int, tuple]] = []
        self.lexical: set[int] = set()  # terminals (upper-case rules, imports, %ignore's) and their parts
        self._in_terminal = False
        self.start: int | None = None  # where %ignore makes a start of its own

    def _imported(self, m: re.Match) -> str:
        pairs = [(m.group(1), m.group(2) or m.group(1))] if m.group(1) else [
            (n, n) for n in re.split(r"[\s,]+", m.group(3).strip()) if n]  # fmt: skip
        for common, name in pairs:
            if common not in COMMON:
                raise InputError(f"option grammar: %import common.{common}: not one of Lark's common terminals "
                                 f"fastblt knows ({', '.join(sorted(COMMON))})")  # fmt: skip
            self.imports[name] = common
        return ""

    @staticmethod
    def _tokens(text: str, gbnf: bool) -> list[tuple[str, str]]:
        out, at = [], 0
        while at < len(text):
            m = (_GBNF_TOKEN if gbnf else _TOKEN).match(text, at)
            if m is None:
                raise InputError(f"option grammar: unexpected {text[at : at + 20]!r} at character {at}")
            at = m.end()
            kind = m.lastgroup or ""
            if kind == "directive":
                raise InputError(f"option grammar: {m.group()} is not held (a byte model's grammar has no lexer: "
                                 "write whitespace into the rules; %import takes common terminals only)")  # fmt: skip
            if kind != "space":
                out.append((kind, m.group()))
        return out

    def peek(self, k: int = 0) -> tuple[str, str]:
        return self.tokens[self.i + k] if self.i + k < len(self.tokens) else ("end", "")

    def take(self) -> tuple[str, str]:
        token = self.peek()
        self.i += 1
        return token

    def fail(self, why: str) -> InputError:
        return InputError(f"option grammar: {why} (at {self.peek()[1]!r:.30}, token {self.i})")

    def nonterminal(self, name: str) -> int:
        return self.names.setdefault(name, len(self.names))

    def fresh(self) -> int:
        n = self.nonterminal(f"#{len(self.names)}")
        if self._in_terminal:
            self.lexical.add(n)
        return n

    def add(self, lhs: int, rhs: tuple) -> None:
        if len(self.productions) >= MAX_RULES:
            raise InputError(f"option grammar: more than {MAX_RULES} productions once repeats are written out")
        self.productions.append((lhs, rhs))

    def parse(self) -> None:
        defined = set()
        while self.peek()[0] != "end":
            kind, name = self.take()
            if kind != "name" or self.peek()[0] != "define":
                raise self.fail("expected a rule: name, then : (Lark) or ::= (GBNF)")
            self.take()
            name = name.lstrip("?!")
            if name in defined:
                raise self.fail(f"rule {name} is defined twice")
            defined.add(name)
            lhs = self.nonterminal(name)
            self._in_terminal = name[0].isupper() or name == IGNORED
            if self._in_terminal:
                self.lexical.add(lhs)
            for alt in self.alternatives():
                self.add(lhs, alt)
            self._in_terminal = False
        for name, common in self.imports.items():
            if name in defined:
                raise self.fail(f"rule {name} is defined and imported")
            if name in self.names:  # used: defined as the common terminal
                self.add(self.nonterminal(name), (_terminal(COMMON[common], f"common.{common}"),))
                self.lexical.add(self.names[name])
                defined.add(name)
        missing = sorted(n for n in self.names if not n.startswith("#") and n not in defined)
        if missing:
            raise InputError(f"option grammar: rule {missing[0]} is used but not defined")
        if IGNORED in self.names:
            self._ignoring()

    def _ignoring(self) -> None:
        """%ignore as Lark reads it: its items may come before, between and after the tokens (the
        terminals and upper-case rules) of the other rules, as often as they like."""
        many = self.nonterminal("#ignored")  # many -> empty | many ignored
        rewritten = [(lhs, rhs) if lhs in self.lexical else
                     (lhs, tuple(x for sym in rhs for x in ((sym, many) if self._token(sym) else (sym,))))
                     for lhs, rhs in self.productions]  # fmt: skip
        self.productions[:] = rewritten
        self.add(many, ())
        self.add(many, (many, self.names[IGNORED]))
        start = self.names.get("start", self.names.get("root"))
        if start is not None:
            self.start = self.nonterminal("#start")
            self.add(self.start, (many, start))

    def _token(self, symbol: int | Terminal) -> bool:
        return isinstance(symbol, Terminal) or symbol in self.lexical

    def at_rule_head(self) -> bool:
        return self.peek()[0] == "name" and self.peek(1)[0] == "define"

    def alternatives(self) -> list[tuple]:
        alts = [self.sequence()]
        while self.peek() == ("punct", "|"):
            self.take()
            alts.append(self.sequence())
        return alts

    def sequence(self) -> tuple:
        items: list = []
        while not self.at_rule_head() and self.peek()[0] != "end" and self.peek()[1] not in ("|", ")", "]"):
            if self.peek() == ("punct", "->"):  # Lark's alias names the tree's node: the text is the same
                self.take()
                if self.take()[0] != "name":
                    raise self.fail("expected a name after ->")
                continue
            items.extend(self.quantified())
        return tuple(items)

    def quantified(self) -> tuple:
        atom = self.atom()
        kind, value = self.peek()
        if kind == "punct" and value in ("?", "*", "+"):
            self.take()
            return (self.repeat(atom, {"?": (0, 1), "*": (0, None), "+": (1, None)}[value]),)
        if kind == "brace":  # GBNF's {m}, {m,}, {m,n}
            self.take()
            least, comma, most = value[1:-1].replace(" ", "").partition(",")
            bounds = (int(least), (int(most) if most else None) if comma else int(least))
            if bounds[0] > MAX_REPEAT or (bounds[1] is not None and not bounds[0] <= bounds[1] <= MAX_REPEAT):
                raise self.fail(f"{value}: expected counts up to {MAX_REPEAT}, the most no less than the least")
            return (self.repeat(atom, bounds),)
        if (kind, value) == ("punct", "~"):
            self.take()
            least = self.count()
            most = least
            if self.peek() == ("punct", ".."):
                self.take()
                most = self.count()
            if most < least:
                raise self.fail(f"~ {least}..{most}: the most is less than the least")
            return (self.repeat(atom, (least, most)),)
        return atom

    def count(self) -> int:
        kind, value = self.take()
        if kind != "number" or int(value) > MAX_REPEAT:
            raise self.fail(f"expected a count up to {MAX_REPEAT} after ~")
        return int(value)

    def repeat(self, atom: tuple, bounds: tuple[int, int | None]) -> int:
        """A nonterminal deriving `atom` repeated least..most times (None: any); a repeat without a
        bound is left-recursive (Earley's constant work per character)."""
        least, most = bounds
        n = self.fresh()
        if most is None:
            rest = self.fresh()  # rest -> empty | rest atom
            self.add(rest, ())
            self.add(rest, (rest, *atom))
            self.add(n, (*atom * least, rest))
        else:
            for k in range(least, most + 1):
                pause()
                self.add(n, atom * k)
        return n

    def atom(self) -> tuple:
        kind, value = self.take()
        if kind == "name":
            if value[0] in "?!":
                raise self.fail(f"{value[0]} only before a rule's name where it is defined")
            return (self.nonterminal(value),)
        if kind == "string":
            folded = value.endswith("i")  # Lark's "text"i: any case
            text = _unescaped(value[1 : -2 if folded else -1], self)
            if self.peek() == ("punct", ".."):  # Lark's "a".."z": one character of the range
                self.take()
                kind, last = self.take()
                high = _unescaped(last[1:-1], self) if kind == "string" and not last.endswith("i") else ""
                if len(text) != 1 or len(high) != 1 or high < text:
                    raise self.fail('expected a range of one character to another, as "a".."z"')
                return (_terminal(f"[{escape(text)}-{escape(high)}]", f"{value}..{last}"),)
            if folded:
                pattern = "".join(f"[{c.lower()}{c.upper()}]" if c.lower() != c.upper() else escape(c) for c in text)
                return (_terminal(pattern, value),) if text else ()
            return (_terminal(escape(text), value),) if text else ()
        if kind == "regex":
            body, _, flags = value[1:].rpartition("/")
            if flags:
                raise self.fail(f"regex flags ({flags}) are not held")
            return (_terminal(body, value),)
        if kind == "cls":  # GBNF's character class
            return (_terminal(value, value),)
        if (kind, value) in (("punct", "("), ("punct", "[")):  # a group; Lark's [...] is optional
            close = ")" if value == "(" else "]"
            self.depth += 1
            if self.depth > MAX_NESTING:
                raise self.fail(f"groups nested more than {MAX_NESTING} deep")
            alts = self.alternatives()
            self.depth -= 1
            if self.take() != ("punct", close):
                raise self.fail(f"expected {close}")
            return (self.group(alts + ([()] if close == "]" else [])),)
        raise self.fail("expected a string, a /regex/, a rule's name or a group")

    def group(self, alts: list[tuple]) -> int:
        n = self.fresh()
        for alt in alts:
            self.add(n, alt)
        return n


def _unescaped(body: str, parser: _Parser) -> str:
    out, i = [], 0
    simple = {"n": "\n", "t": "\t", "r": "\r", '"': '"', "\\": "\\", "/": "/"}
    while i < len(body):
        c = body[i]
        if c == "\\":
            nxt = body[i + 1 : i + 2]
            if nxt in simple:
                out.append(simple[nxt])
                i += 2
                continue
            if nxt in ("x", "u"):
                n = 2 if nxt == "x" else 4
                digits = body[i + 2 : i + 2 + n]
                if len(digits) != n or not all(d in "0123456789abcdefABCDEF" for d in digits):
                    raise parser.fail(f"\\{nxt} needs {n} hex digits")
                out.append(chr(int(digits, 16)))
                i += 2 + n
                continue
            raise parser.fail(f"unknown escape \\{nxt}")
        out.append(c)
        i += 1
    return "".join(out)


def _terminal(source: str, shown: str) -> Terminal:
    try:
        return Terminal(compile_whole(source, "grammar"), shown)
    except InputError as e:
        raise InputError(f"{e} (in {shown[:40]})") from None


@lru_cache(maxsize=64)
def compile_grammar(text: str) -> Grammar:
    """The grammar in `text`, checked: a start rule (start, or root), every rule defined and
    deriving some text; compiled once per text."""
    parser = _Parser(text)
    parser.parse()
    names = parser.names
    start = parser.start if parser.start is not None else names.get("start", names.get("root"))
    if start is None:
        raise InputError("option grammar: no start rule (start: ..., or root ::= ...)")
    productive = _closed(parser.productions, lambda s, known: isinstance(s, Terminal) or s in known)
    if dead := sorted(name for name, n in names.items() if n not in productive and not name.startswith("#")):
        raise InputError(f"option grammar: rule {dead[0]} derives no text (each of its alternatives recurs "
                         "without end)")  # fmt: skip
    productions = [(lhs, rhs) for lhs, rhs in parser.productions
                   if all(isinstance(s, Terminal) or s in productive for s in rhs)]  # fmt: skip
    by_lhs: dict[int, list[int]] = {}
    for i, (lhs, _) in enumerate(productions):
        by_lhs.setdefault(lhs, []).append(i)
    nullable = _closed(productions, _nullable)
    return Grammar(productions, by_lhs, frozenset(nullable), start, names)


def _closed(productions: list[tuple[int, tuple]], holds: Callable[[int | Terminal, set[int]], bool]) -> set[int]:
    """The nonterminals with a production all of whose symbols `holds` for, given those found so
    far (derives some text; derives the empty text), to a fixed point."""
    found: set[int] = set()
    changed = True
    while changed:
        changed = False
        for lhs, rhs in productions:
            if lhs not in found and all(holds(s, found) for s in rhs):
                found.add(lhs)
                changed = True
    return found


def _nullable(symbol: int | Terminal, nullable: set[int] | frozenset[int]) -> bool:
    if isinstance(symbol, Terminal):
        return symbol.pattern.accepts(symbol.pattern.start)
    return symbol in nullable


# ------------------------------------------------------------------------ the recognizer
Item = tuple[int, int, int, frozenset | None]  # production, dot, origin, reading inside the next terminal


def _closure(g: Grammar, chart: list[frozenset], items: set[Item], at: int) -> frozenset:
    """Set `at` from its scanned items: predicted rules and completed ones (nullable rules
    skipped over as they are predicted, Aycock and Horspool's way)."""
    todo = list(items)
    done = set(items)

    def add(item: Item) -> None:
        if item not in done:
            done.add(item)
            todo.append(item)

    while todo:
        p, dot, origin, reading = todo.pop()
        lhs, rhs = g.productions[p]
        if reading is not None:
            continue  # inside a terminal: the next character moves it
        if dot == len(rhs):
            if origin == at:  # it derived no text: its lhs is nullable, and predicting it stepped over it
                continue
            for q, d, o, r in chart[origin]:
                if r is None and d < len(g.productions[q][1]) and g.productions[q][1][d] == lhs:
                    add((q, d + 1, o, None))
            continue
        symbol = rhs[dot]
        if isinstance(symbol, Terminal):
            if symbol.pattern.accepts(symbol.pattern.start):
                add((p, dot + 1, origin, None))
            continue
        for q in g.by_lhs.get(symbol, ()):
            add((q, 0, at, None))
        if symbol in g.nullable:
            add((p, dot + 1, origin, None))
    return frozenset(done)


@dataclass(frozen=True, eq=False)
class CfgState:
    """A text read so far: the chart's first `n` sets (in `chart`, which later states may share)
    and the UTF-8 character begun, if any (continuation bytes to come, the next one's range, the
    code point's bits so far)."""

    grammar: Grammar
    chart: list
    n: int
    partial: tuple[int, int, int, int] = (0, 0, 0, 0)

    @property
    def items(self) -> frozenset:
        return self.chart[self.n - 1]

    def accepts(self) -> bool:
        """Whether the text read is one the grammar derives (EOS may come)."""
        g = self.grammar
        return self.partial[0] == 0 and any(
            origin == 0 and reading is None and g.productions[p][0] == g.start and dot == len(g.productions[p][1])
            for p, dot, origin, reading in self.items
        )

    @cached_property
    def expected(self) -> frozenset:
        """(terminal, reading) for each terminal the next character may continue or begin."""
        return _expected(self.items, self.grammar)

    def takes(self, lo: int, hi: int) -> bool:
        return any(t.pattern.takes(r, lo, hi) for t, r in self.expected)

    def step(self, code: int) -> CfgState | None:
        """The state after character `code`, or None when no text of the grammar continues so."""
        g, at = self.grammar, self.n
        scanned: set[Item] = set()
        for p, dot, origin, reading in self.items:
            rhs = g.productions[p][1]
            if dot == len(rhs) or not isinstance(rhs[dot], Terminal):
                continue
            pat = rhs[dot].pattern
            after = pat.step(pat.start if reading is None else reading, code)
            if after:
                scanned.add((p, dot, origin, after))
                if pat.accepts(after):
                    scanned.add((p, dot + 1, origin, None))
        if not scanned:
            return None
        chart = self.chart if len(self.chart) == at else self.chart[:at]
        new = _closure(g, chart, scanned, at)
        if len(self.chart) > at and self.chart[at] == new:  # the same set another state made: shared
            return CfgState(g, self.chart, at + 1)
        chart.append(new)
        return CfgState(g, chart, at + 1)


def _expected(items: frozenset, g: Grammar) -> frozenset:
    out = set()
    for p, dot, _, reading in items:
        rhs = g.productions[p][1]
        if dot < len(rhs) and isinstance(rhs[dot], Terminal):
            t = rhs[dot]
            out.add((t, t.pattern.start if reading is None else reading))
    return frozenset(out)


def begin_cfg(g: Grammar) -> CfgState:
    """The state before the first character."""
    first = _closure(g, [], {(p, 0, 0, None) for p in g.by_lhs.get(g.start, ())}, 0)
    return CfgState(g, [first], 1)
