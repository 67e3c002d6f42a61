"""JSON Schema's `pattern` and `format` for strings, as automata over code points that the grammar
(grammar.py) runs inside a string's text.

A pattern is an ECMA-262 regular expression, as JSON Schema says, matched anywhere in the string
unless `^` / `$` anchor it (Python's `re.search`). The subset held is the one that is a regular
language: characters, `.`, classes (`[a-z]`, `[^...]`, `\\d \\w \\s` and their complements),
groups, `|`, `* + ? {n} {n,} {n,m}` (lazy or not: the same strings), `^` at the start of the whole
pattern's alternatives, `$` anywhere (inside, a lookahead that no character follows), and
lookaheads, `(?=...)` and `(?!...)`, read beside the pattern (`_with_lookaheads`). Lookbehinds,
backreferences, word boundaries and Unicode property classes are refused by name. `\\d`, `\\w` are
ASCII's, `\\s` ECMA's whitespace; `.` is any code point but a line terminator. A `format` (OpenAI's
list, and `uri`) is a pattern of its own (FORMATS), as RFC 3339, 4122, 1123, 4291 and 3986 write
them (a date's day checked against its month and year; a hostname at most 253 characters, an email
254: FORMAT_LENGTHS). A string's `minLength` / `maxLength` are an automaton of its count of
characters (`length_pattern`, or `counted` beside a pattern or format: the two read together), and
a pattern and a format on one string are read together too (`intersect`). A number's bounds and
multiple are DFAs of its own (numbers.py), Patterns as these are.

`Pattern` is a Thompson NFA: states with code point ranges to follow and empty moves; a reading is
the set of states it may be in. Every state can still reach the end over code points a JSON string
can hold (surrogates are left out of every class), so a reading that is not empty never leads to
a dead end, and the grammar's mask never allows a byte it would later have to refuse.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

from fastblt.errors import InputError
from fastblt.runtime.courtesy import pause

MAX_STATES = 5000  # an NFA past this (a repeat of a repeat) is refused: masks are read off its states
MAX_CODE = 0x10FFFF
CODE_POINTS = ((0, 0xD7FF), (0xE000, MAX_CODE))  # a JSON string's: no surrogates
Ranges = tuple[tuple[int, int], ...]


def _ranges(*spans: str | tuple[int, int]) -> Ranges:
    """Sorted, merged ranges of single characters and (lo, hi) spans, surrogates left out."""
    spans_ = sorted((ord(s), ord(s)) if isinstance(s, str) else s for s in spans)
    out: list[tuple[int, int]] = []
    for lo, hi in spans_:
        for a, b in CODE_POINTS:  # cut out the surrogates
            lo2, hi2 = max(lo, a), min(hi, b)
            if lo2 > hi2:
                continue
            if out and lo2 <= out[-1][1] + 1:
                out[-1] = (out[-1][0], max(out[-1][1], hi2))
            else:
                out.append((lo2, hi2))
    return tuple(out)


def _complement(r: Ranges) -> Ranges:
    out, at = [], 0
    for lo, hi in r:
        if lo > at:
            out.append((at, lo - 1))
        at = hi + 1
    if at <= MAX_CODE:
        out.append((at, MAX_CODE))
    return _ranges(*out)


ANY = _ranges(*CODE_POINTS)
DOT = _complement(_ranges("\n", "\r", "\u2028", "\u2029"))
DIGIT = _ranges((ord("0"), ord("9")))
WORD = _ranges((ord("a"), ord("z")), (ord("A"), ord("Z")), (ord("0"), ord("9")), "_")
SPACE = _ranges(*"\t\n\v\f\r \u00a0\u1680\u2028\u2029\u202f\u205f\u3000\ufeff", (0x2000, 0x200A))  # ECMA's
CLASSES = {"d": DIGIT, "D": _complement(DIGIT), "w": WORD, "W": _complement(WORD), "s": SPACE,
           "S": _complement(SPACE)}  # fmt: skip
CONTROL = {"t": "\t", "n": "\n", "r": "\r", "f": "\f", "v": "\v", "0": "\0"}
REFUSED = {"b": "word boundaries (\\b)", "B": "word boundaries (\\B)", "k": "backreferences (\\k)",
           "p": "Unicode property classes (\\p)", "P": "Unicode property classes (\\P)",
           "c": "control escapes (\\c)"}  # fmt: skip


# ------------------------------------------------------------------------ parsing
MAX_NESTING = 50  # groups inside groups: deeper is refused rather than recursed into


# a regex's tree: ("chars", Ranges) | ("seq", [tree]) | ("alt", [tree]) | ("repeat", tree, least, most or None)
# | ("start",) | ("end",) | ("look", positive, tree)
class _Parser:
    """An ECMA-262 pattern -> its tree; InputError at `at` naming what is not held."""

    def __init__(self, text: str, at: str):
        self.text, self.at, self.i = text, at, 0
        self.depth = 0  # groups open at the cursor

    def fail(self, why: str) -> InputError:
        return InputError(f"option {self.at}: {why} (at character {self.i} of {self.text[:60]!r})")

    def peek(self) -> str | None:
        return self.text[self.i] if self.i < len(self.text) else None

    def take(self) -> str:
        if self.i >= len(self.text):
            raise self.fail("the pattern ends too soon")
        self.i += 1
        return self.text[self.i - 1]

    def parse(self) -> tuple:
        tree = self.alternatives()
        if self.i < len(self.text):
            raise self.fail(f"unbalanced {self.text[self.i]!r}")
        return tree

    def alternatives(self) -> tuple:
        alts = [self.sequence()]
        while self.peek() == "|":
            self.take()
            alts.append(self.sequence())
        return alts[0] if len(alts) == 1 else ("alt", alts)

    def sequence(self) -> tuple:
        items = []
        while self.peek() not in (None, "|", ")"):
            atom = self.atom()
            items.append(self.quantified(atom))
        return ("seq", items)

    def quantified(self, atom: tuple) -> tuple:
        c = self.peek()
        bounds = {"*": (0, None), "+": (1, None), "?": (0, 1)}.get(c or "")
        if bounds is not None:
            self.take()
        elif c == "{":
            bounds = self.braces()
        if bounds is None:
            return atom
        if atom[0] in ("start", "end", "look"):
            raise self.fail(f"a quantifier on {'a lookahead' if atom[0] == 'look' else 'an anchor'}")
        if self.peek() == "?":  # lazy: the same strings match
            self.take()
        if self.peek() in ("*", "+", "?") or (self.peek() == "{" and self.braces(look=True)):
            raise self.fail("a quantifier right after a quantifier")
        return ("repeat", atom, *bounds)

    def braces(self, look: bool = False) -> tuple[int, int | None] | None:
        """{n}, {n,} or {n,m} at the cursor (consumed unless `look`), or None: then "{" is itself."""
        end = self.text.find("}", self.i)
        body = self.text[self.i + 1 : end] if end > 0 else ""
        least, comma, most = body.partition(",")
        if comma and not least and most.isdecimal() and most.isascii():
            raise self.fail(f"{{{body}}}: ECMA-262 reads it as its characters, Python as {{0,{most}}}: write "
                            f"{{0,{most}}}, or \\{{{body}}} for the characters")  # fmt: skip
        digits = (least + most).isascii()  # ECMA's quantifiers count in ASCII digits
        if not digits or not least.isdigit() or not (most.isdigit() or most == "") or (most and not comma):
            return None
        if not look:
            self.i = end + 1
        bounds = (int(least), int(most) if most else (None if comma else int(least)))
        if bounds[1] is not None and bounds[1] < bounds[0]:
            raise self.fail(f"{{{body}}}: the most is less than the least")
        return bounds

    def atom(self) -> tuple:
        pause()  # a format's pattern has hundreds of atoms
        c = self.take()
        if c == "(":
            if self.text.startswith("?:", self.i):
                self.i += 2
            elif self.text.startswith("?<", self.i) and self.text[self.i + 2 : self.i + 3] not in ("=", "!"):
                close = self.text.find(">", self.i)  # a named group: a name only, the same strings
                if close < 0:
                    raise self.fail("an unclosed group name")
                self.i = close + 1
            elif self.text.startswith(("?=", "?!"), self.i):
                positive = self.text[self.i + 1] == "="
                self.i += 2
                return ("look", positive, self.group())
            elif self.text.startswith(("?<=", "?<!"), self.i):
                raise self.fail("lookbehinds ((?<=, (?<!) are not held")
            elif self.text.startswith("?P", self.i):
                raise self.fail("Python's (?P<name>...) and (?P=name) are not held (a named group is (?<name>...))")
            elif self.text.startswith("?#", self.i):
                raise self.fail("comments ((?#...)) are not held")
            elif self.peek() == "?":
                raise self.fail("inline flags ((?i), (?s), (?x), (?i:...)) are not held")
            return self.group()
        if c == "[":
            return ("chars", self.bracket())
        if c == ".":
            return ("chars", DOT)
        if c == "^":
            return ("start",)
        if c == "$":
            return ("end",)
        if c == "\\":
            return ("chars", self.escape(in_class=False))
        if c in ")*+?":
            raise self.fail(f"{c!r} with nothing before it")
        return ("chars", _ranges(c))

    def group(self) -> tuple:
        """A group's alternatives, up to and past its ")"."""
        self.depth += 1
        if self.depth > MAX_NESTING:
            raise self.fail(f"groups nested more than {MAX_NESTING} deep")
        tree = self.alternatives()
        self.depth -= 1
        if self.peek() != ")":
            raise self.fail("an unclosed group")
        self.take()
        return tree

    def escape(self, in_class: bool) -> Ranges:
        c = self.take()
        if c in CLASSES:
            return CLASSES[c]
        if c in CONTROL:
            return _ranges(CONTROL[c])
        if c == "b" and in_class:
            return _ranges("\b")
        if c in REFUSED or c.isdigit():
            what = REFUSED.get(c) or "backreferences (\\" + c + ")"
            raise self.fail(f"{what} are not held")
        if c in "xu":
            n = 2 if c == "x" else 4
            digits = self.text[self.i : self.i + n]
            if len(digits) != n or any(d not in "0123456789abcdefABCDEF" for d in digits):
                raise self.fail(f"\\{c} needs {n} hex digits")
            self.i += n
            code = int(digits, 16)
            if 0xD800 <= code <= 0xDFFF:
                raise self.fail("a surrogate (a JSON string's text holds none)")
            return _ranges(chr(code))
        if c.isalnum():
            raise self.fail(f"\\{c} is not an escape ECMA-262 defines")
        return _ranges(c)

    def bracket(self) -> Ranges:
        negated = self.peek() == "^"
        if negated:
            self.take()
        spans: list = []
        while (c := self.take()) != "]":  # ECMA's: "]" first closes an empty class ("[^]": any character)
            lo = self.escape(in_class=True) if c == "\\" else _ranges(c)
            if self.peek() == "-" and self.text[self.i + 1 : self.i + 2] not in ("]", ""):
                self.take()
                d = self.take()
                hi = self.escape(in_class=True) if d == "\\" else _ranges(d)
                if len(lo) != 1 or len(hi) != 1 or lo[0][0] != lo[0][1] or hi[0][0] != hi[0][1]:
                    raise self.fail("a range between classes")
                if hi[0][0] < lo[0][0]:
                    raise self.fail("a range out of order")
                spans.append((lo[0][0], hi[0][0]))
            else:
                spans.extend(lo)
        ranges = _ranges(*spans)
        ranges = _complement(ranges) if negated else ranges
        if not ranges:
            raise self.fail("a class no character is in")
        return ranges


# ------------------------------------------------------------------------ the automaton
class Pattern:
    """A Thompson NFA over code points: `moves[s]` the (lo, hi, next) ranges out of state s,
    `empty[s]` its empty moves; `start` the reading before any code point."""

    def __init__(self, source: str):
        self.source = source
        self.moves: list[list[tuple[int, int, int]]] = []
        self.empty: list[list[int]] = []
        self.accept = -1
        self.start: frozenset[int] = frozenset()
        # lookaheads, until `_with_lookaheads` reads them into plain states: state -> (positive,
        # body, next state); a body's matches end at `accept` (any text may follow) or, for those
        # ending in $, at `accept_end` (only where the text ends)
        self.looks: dict[int, list[tuple[bool, Pattern, int]]] = {}
        self.accept_end = -1

    def state(self) -> int:
        if len(self.moves) >= MAX_STATES:
            raise InputError(f"pattern {self.source[:60]!r}: more than {MAX_STATES} states once its repeats are "
                             "written out")  # fmt: skip
        self.moves.append([])
        self.empty.append([])
        return len(self.moves) - 1

    def closure(self, states: set[int] | frozenset[int]) -> frozenset[int]:
        out, todo = set(states), list(states)
        while todo:
            for t in self.empty[todo.pop()]:
                if t not in out:
                    out.add(t)
                    todo.append(t)
        return frozenset(out)

    def step(self, states: frozenset[int], code: int) -> frozenset[int]:
        """The reading after code point `code` (empty: the pattern cannot take it)."""
        return _step(self, states, code)

    def takes(self, states: frozenset[int], lo: int, hi: int) -> bool:
        """Whether some code point in lo..hi can come next."""
        return any(a <= hi and lo <= b for s in states for a, b, _ in self.moves[s])

    def accepts(self, states: frozenset[int]) -> bool:
        return self.accept in states

    @property
    def size(self) -> int:
        """States held (what a schema's budget and the caches' count)."""
        return len(self.moves)


_built = [0]  # states of the automata built since the caches were last cleared


def note_built(states: int) -> None:
    """Count `states` as built into a cached automaton (here or in numbers.py)."""
    _built[0] += states


def kept(pat: Pattern) -> Pattern:
    """`pat`, counted as built (cached automata are what a server keeps)."""
    note_built(pat.size)
    return pat


def states_built() -> int:
    """States of the automata built since `clear_caches`: a server clears the caches past a budget
    (grammar.py), so requests with ever new schemas cannot grow them without end."""
    return _built[0]


@lru_cache(maxsize=65536)
def _step(pat: Pattern, states: frozenset[int], code: int) -> frozenset[int]:
    return pat.closure({t for s in states for a, b, t in pat.moves[s] if a <= code <= b})


def _build(pat: Pattern, tree: tuple) -> tuple[int, int]:
    """(entry, exit) states of a fragment reading `tree`."""
    pause()  # a long repeat builds its item thousands of times
    kind = tree[0]
    if kind == "chars":
        a, b = pat.state(), pat.state()
        pat.moves[a].extend((lo, hi, b) for lo, hi in tree[1])
        return a, b
    if kind == "seq":
        a = b = pat.state()
        for item in tree[1]:
            x, y = _build(pat, item)
            pat.empty[b].append(x)
            b = y
        return a, b
    if kind == "alt":
        a, b = pat.state(), pat.state()
        for item in tree[1]:
            x, y = _build(pat, item)
            pat.empty[a].append(x)
            pat.empty[y].append(b)
        return a, b
    if kind == "look":
        a, b = pat.state(), pat.state()
        pat.looks.setdefault(a, []).append((tree[1], _look_body(tree[2], pat.source), b))
        return a, b
    _, item, least, most = tree  # "repeat"
    a = b = pat.state()
    for _ in range(least):
        x, y = _build(pat, item)
        pat.empty[b].append(x)
        b = y
    if most is None:  # then any more
        x, y = _build(pat, item)
        pat.empty[b].append(x)
        pat.empty[y].append(x)
        end = pat.state()
        pat.empty[b].append(end)
        pat.empty[y].append(end)
        return a, end
    end = pat.state()
    for _ in range(most - least):  # each optional one may end the run
        pat.empty[b].append(end)
        x, y = _build(pat, item)
        pat.empty[b].append(x)
        b = y
    pat.empty[b].append(end)
    return a, end


def _anchored(tree: tuple, at: str, source: str) -> list[tuple[tuple, bool, bool]]:
    """The top-level alternatives of `tree` as (body, starts at ^, ends at $). A `$` elsewhere is
    a lookahead that no character follows; a `^` elsewhere is refused, but where it opens the body
    of a lookahead right after an alternative's own `^` (Pydantic's decimals: `^(?!^[-+.]*$)...`),
    where it always holds."""
    out = []
    for items in _alternative_items(tree):
        start = bool(items) and items[0] == ("start",)
        end = bool(items) and items[-1] == ("end",) and (len(items) > 1 or not start)
        body = items[start : len(items) - end]
        for k in range(len(body) if start else 0):
            if body[k][0] != "look":
                break
            body[k] = ("look", body[k][1], _alternatives_map(body[k][2], lambda xs: xs[xs[:1] == [("start",)] :]))
        if _has(("seq", body), "start", looks=True):
            raise InputError(f"option {at}: ^ only at the start of the pattern's alternatives "
                             f"({source[:60]!r})")  # fmt: skip
        out.append((_end_as_look(("seq", body)), start, end))
    return out


def _alternative_items(tree: tuple) -> list[list]:
    """The items of each of `tree`'s top-level alternatives."""
    return [list(alt[1]) if alt[0] == "seq" else [alt] for alt in (tree[1] if tree[0] == "alt" else [tree])]


def _alternatives_map(tree: tuple, f: Callable[[list], list]) -> tuple:
    """`tree` with each of its top-level alternatives' items (a list) passed through `f`."""
    mapped = [("seq", f(items)) for items in _alternative_items(tree)]
    return mapped[0] if len(mapped) == 1 else ("alt", mapped)


def _end_as_look(tree: tuple) -> tuple:
    """`tree` with each `$` (outside lookaheads, which read their own) as `(?![^])`."""
    kind = tree[0]
    if kind == "end":
        return ("look", False, ("chars", ANY))
    if kind in ("seq", "alt"):
        return (kind, [_end_as_look(t) for t in tree[1]])
    if kind == "repeat":
        return ("repeat", _end_as_look(tree[1]), *tree[2:])
    return tree


def _has(tree: tuple, kind: str, looks: bool = False) -> bool:
    """Whether `tree` holds a node of `kind` (inside lookaheads' bodies too, with `looks`)."""
    if tree[0] == kind:
        return True
    if tree[0] in ("seq", "alt"):
        return any(_has(t, kind, looks) for t in tree[1])
    if tree[0] == "look":
        return looks and _has(tree[2], kind, looks)
    return tree[0] == "repeat" and _has(tree[1], kind, looks)


def _look_body(tree: tuple, source: str) -> Pattern:
    """A lookahead's body as an NFA of its own (`Pattern.looks`); a `$` is held only at the end of
    its alternatives, and a lookahead inside a lookahead is refused."""
    body = Pattern(source)
    entry, body.accept, body.accept_end = body.state(), body.state(), body.state()
    for items in _alternative_items(tree):
        end = bool(items) and items[-1] == ("end",)
        items = items[: len(items) - end]
        nested = _has(("seq", items), "look")
        if nested or _has(("seq", items), "end"):
            what = "a lookahead inside a lookahead" if nested else "$ inside a lookahead"
            raise InputError(f"{what} is not held, but $ at the end of its alternatives ({source[:60]!r})")
        x, y = _build(body, ("seq", items))
        body.empty[entry].append(x)
        body.empty[y].append(body.accept_end if end else body.accept)
    body.start = body.closure({entry})
    return body


def compile_pattern(source: str, at: str = "pattern") -> Pattern:
    """A pattern's NFA (searched: unanchored sides take any text), compiled once per text (schemas
    that share a pattern share its masks); InputError at `at`."""
    try:
        return _compiled(source)
    except InputError as e:
        raise InputError(str(e).replace("option pattern", f"option {at}", 1)) from None


def escape(text: str) -> str:
    """`text` as a pattern that matches it alone: every character but a letter or digit escaped
    (an escaped one of those is a class or refused; any other stands for itself)."""
    return "".join(c if c.isalnum() else "\\" + c for c in text)


def compile_whole(source: str, at: str = "pattern") -> Pattern:
    """A regular expression's NFA matched against a whole text (Python's `re.fullmatch`, as
    constrained decoding reads a regex: `^` and `$` at the ends of its alternatives change
    nothing), compiled once per text; InputError at `at`."""
    try:
        return _whole(source)
    except InputError as e:
        raise InputError(str(e).replace("option pattern", f"option {at}", 1)) from None


@lru_cache(maxsize=256)
def _compiled(source: str) -> Pattern:
    tree = _Parser(source, "pattern").parse()
    free = ("repeat", ("chars", ANY), 0, None)
    alts = [("seq", ([] if start else [free]) + [body] + ([] if end else [free]))
            for body, start, end in _anchored(tree, "pattern", source)]  # fmt: skip
    return _automaton(source, alts)


@lru_cache(maxsize=256)
def _whole(source: str) -> Pattern:
    tree = _Parser(source, "pattern").parse()
    return _automaton(source, [body for body, _, _ in _anchored(tree, "pattern", source)])


def _automaton(source: str, alts: list[tuple]) -> Pattern:
    """The NFA of a pattern's alternatives (trees), its lookaheads read in."""
    pat = Pattern(source)
    try:
        entry, pat.accept = _build(pat, ("alt", alts))
        pat.start = pat.closure({entry})
        if pat.looks:
            pat = _with_lookaheads(pat)
    except InputError as e:
        raise InputError(f"option pattern: {e}") from None
    if not pat.start:
        raise InputError(f"option pattern: no text matches {source[:60]!r}")
    return kept(pat)


def _with_lookaheads(raw: Pattern) -> Pattern:
    """`raw`, its lookaheads read into plain states: a state is one of `raw`'s with the lookaheads
    passed but not yet decided, each a reading of its body (must match, or must not: a positive one
    is met once its body's reading reaches `accept`, dead once it is empty; a negative one the other
    way round; at the text's end, those still open are decided by `accept_end`), as far as reached
    from the start, then trimmed. Lookaheads passed again with the same reading are one."""
    out, ids = Pattern(raw.source), {}
    out.accept = out.state()
    todo: list[tuple[int, frozenset]] = []

    def state(m: int, looks: frozenset) -> int | None:
        open_ = set()
        for look in looks:
            positive, body, reading = look
            matched = body.accept in reading
            if matched or not reading:  # decided: met, or failed
                if matched != positive:
                    return None
                continue
            open_.add(look)
        key = (m, frozenset(open_))
        if key not in ids:
            if len(ids) >= MAX_PAIRS:
                raise InputError(f"{raw.source[:60]!r}: more than {MAX_PAIRS:,} states with its lookaheads")
            ids[key] = out.state()
            todo.append(key)
        return ids[key]

    starts = {i for s in raw.start if (i := state(s, frozenset())) is not None}
    while todo:
        pause()
        m, looks = key = todo.pop()
        i = ids[key]
        nexts = [state(t, looks) for t in raw.empty[m]]
        nexts += [state(t, looks | {(positive, body, body.start)}) for positive, body, t in raw.looks.get(m, ())]
        if m == raw.accept and all((body.accept_end in reading) == positive for positive, body, reading in looks):
            nexts.append(out.accept)
        out.empty[i] = [t for t in nexts if t is not None]
        for lo, hi, t in raw.moves[m]:
            cuts = {lo, hi + 1}
            for _, body, reading in looks:
                cuts.update(x for s in reading for a, b, _ in body.moves[s] for x in (a, b + 1) if lo < x <= hi)
            edges = sorted(cuts)
            for a, b in zip(edges, edges[1:], strict=False):
                stepped = frozenset((p, body, body.step(reading, a)) for p, body, reading in looks)
                if (j := state(t, stepped)) is not None:
                    out.moves[i].append((a, b - 1, j))
    return trimmed(out, starts, raw.source)


@lru_cache(maxsize=256)
def length_pattern(least: int, most: int | None) -> Pattern:
    """Any text of `least` to `most` characters (None: no most): a state per count so far (a
    regex's `[^]{least,most}` would cost several)."""
    top = least if most is None else most
    pat = Pattern(f"[^]{{{least},{'' if most is None else most}}}")
    for _ in range(top + 2):  # counts 0..top, then the end
        pat.state()
    for k in range(top):
        pat.moves[k].extend((lo, hi, k + 1) for lo, hi in ANY)
    if most is None:
        pat.moves[top].extend((lo, hi, top) for lo, hi in ANY)
    pat.accept = top + 1
    for k in range(least, top + 1):
        pat.empty[k].append(pat.accept)
    pat.start = pat.closure({0})
    return kept(pat)


class _Computed:
    """Entries worked out on each read, never kept: a product with a count has up to states x
    4,999 of them, and what the grammar reads of them is cached already (its steps and masks)."""

    def __init__(self, make: Callable[[int], list]):
        self.make = make

    def __getitem__(self, key: int) -> list:
        return self.make(key)


class Counted(Pattern):
    """`inner`'s texts of `least` to `most` characters (None: no most): the product of its NFA
    and a count, state `s * width + count`, its moves worked out as readings reach them. A move
    is kept only where the count it leads to still leaves room for one of the lengths the inner
    state can end in (`_completions`), so a reading that is not empty never leads to a dead end
    here either: `^[a-z]*x$` with maxLength 3 lets "ab" go on only to "x"."""

    def __init__(self, inner: Pattern, least: int, most: int | None):
        super().__init__(f"{inner.source} ({least} to {'any' if most is None else most} characters)")
        self.inner, self.least, self.most = inner, least, most
        self.top = least if most is None else most  # the counts kept: past `least` with no most, all alike
        self.width = self.top + 1
        self.lengths = _completions(inner, self.top + (most is not None))
        self.moves = _Computed(self._moves)  # type: ignore[assignment]
        self.empty = _Computed(self._empty)  # type: ignore[assignment]
        self.start = frozenset(s * self.width for s in inner.start if self._alive(s, 0))

    def _alive(self, s: int, count: int) -> bool:
        """Whether inner state `s`, `count` characters in, can end within the bounds."""
        low = max(self.least - count, 0)
        room = self.lengths[s] >> low
        return bool(room if self.most is None else room & ((2 << (self.most - count - low)) - 1))

    def _moves(self, key: int) -> list[tuple[int, int, int]]:
        s, count = divmod(key, self.width)
        if count == self.most:
            return []
        after = min(count + 1, self.top)
        return [(a, b, t * self.width + after) for a, b, t in self.inner.moves[s] if self._alive(t, after)]

    def _empty(self, key: int) -> list[int]:
        s, count = divmod(key, self.width)
        return [t * self.width + count for t in self.inner.empty[s] if self._alive(t, count)]

    def accepts(self, states: frozenset[int]) -> bool:
        return any(key // self.width == self.inner.accept for key in states)  # alive there: within bounds

    @property
    def size(self) -> int:
        return self.inner.size + len(self.lengths)  # its moves are worked out on each read


def _completions(pat: Pattern, cap: int) -> list[int]:
    """Per state, the lengths of the texts that take it to the end, as bits (bit n: n characters);
    bit `cap` stands for `cap` or more. Worked backwards from the end until nothing changes."""
    into: list[list[tuple[int, bool]]] = [[] for _ in pat.moves]  # state -> (from, by a character)
    for s, moves in enumerate(pat.moves):
        for _, _, t in moves:
            into[t].append((s, True))
        for t in pat.empty[s]:
            into[t].append((s, False))
    full, lengths = (2 << cap) - 1, [0] * len(pat.moves)
    lengths[pat.accept], todo = 1, [pat.accept]
    while todo:
        pause()
        t = todo.pop()
        longer = lengths[t] << 1
        longer = (longer & full) | (1 << cap if longer > full else 0)
        for s, by_char in into[t]:
            now = lengths[s] | (longer if by_char else lengths[t])
            if now != lengths[s]:
                lengths[s] = now
                todo.append(s)
    return lengths


def counted(inner: Pattern, least: int, most: int | None, at: str) -> Pattern:
    """`inner` held to `least`..`most` characters too; InputError at `at` when no text of the
    pattern has such a length."""
    pat = _counted(inner, least, most)
    if not pat.start:
        raise InputError(f"option {at}: no string of {inner.source[:60]!r} has {least} to "
                         f"{'any' if most is None else most} characters")  # fmt: skip
    return pat


@lru_cache(maxsize=256)
def _counted(inner: Pattern, least: int, most: int | None) -> Counted:
    return kept(Counted(inner, least, most))  # once per pattern and bounds: schemas that share them share masks


# states a product may reach before it is refused: each costs ~1 KB while cached (a number
# within ±10^18 and a multiple of 997 reaches ~17,000)
MAX_PAIRS = 20_000
BIG_CACHE = 32  # products kept compiled (most of a server's schemas repeat)


def trimmed(raw: Pattern, starts: set[int], source: str) -> Pattern:
    """`raw`'s states reached from `starts` that can still reach its end, numbered afresh (a
    pattern without dead ends, as the grammar needs); its start empty where none is left."""
    seen, todo = set(starts), list(starts)
    into: dict[int, list[int]] = {}  # state -> the reached states that move to it
    while todo:
        pause()
        s = todo.pop()
        for t in [t for _, _, t in raw.moves[s]] + raw.empty[s]:
            into.setdefault(t, []).append(s)
            if t not in seen:
                seen.add(t)
                todo.append(t)
    alive, todo = {raw.accept} & seen, [raw.accept] if raw.accept in seen else []
    while todo:
        pause()
        for s in into.get(todo.pop(), ()):
            if s not in alive:
                alive.add(s)
                todo.append(s)
    pat = Pattern(source)
    ids = {s: i for i, s in enumerate(sorted(alive))}  # MAX_PAIRS bounds them, not MAX_STATES: no repeats here
    for s in ids:
        pat.moves.append([(a, b, ids[t]) for a, b, t in raw.moves[s] if t in ids])
        pat.empty.append([ids[t] for t in raw.empty[s] if t in ids])
        pause()
    pat.accept = ids.get(raw.accept, -1)
    pat.start = pat.closure({ids[s] for s in starts if s in ids})
    return pat


def intersect(a: Pattern, b: Pattern, at: str) -> Pattern:
    """The texts both `a` and `b` take (a `pattern` beside a `format`): InputError at `at` when
    there are none."""
    try:
        pat = _intersected(a, b)
    except InputError as e:
        raise InputError(f"option {at}: {e}") from None
    if not pat.start:
        raise InputError(f"option {at}: no text is both {a.source[:50]!r} and {b.source[:50]!r}")
    return pat


@lru_cache(maxsize=BIG_CACHE)
def _intersected(a: Pattern, b: Pattern) -> Pattern:
    """The product of the two NFAs (a pair of states moves on the code points both ranges hold, or
    either side alone on an empty move), as far as it is reached, then trimmed."""
    raw, ids = Pattern(f"{a.source} and {b.source}"), {}

    def state(pair: tuple[int, int]) -> int:
        if pair not in ids:
            if len(ids) >= MAX_PAIRS:
                raise InputError(f"{a.source[:50]!r} and {b.source[:50]!r}: more than {MAX_PAIRS:,} pairs of "
                                 "states together")  # fmt: skip
            ids[pair] = len(raw.moves)
            raw.moves.append([])
            raw.empty.append([])
            todo.append(pair)
        return ids[pair]

    todo: list[tuple[int, int]] = []
    starts = {state((x, y)) for x in a.start for y in b.start}
    while todo:
        pause()
        x, y = pair = todo.pop()
        i = ids[pair]
        moves = [(max(lo, lo2), min(hi, hi2), (t, t2)) for lo, hi, t in a.moves[x] for lo2, hi2, t2 in b.moves[y]
                 if lo <= hi2 and lo2 <= hi]  # fmt: skip
        raw.moves[i] = [(lo, hi, state(t)) for lo, hi, t in moves]
        raw.empty[i] = [state((t, y)) for t in a.empty[x]] + [state((x, t)) for t in b.empty[y]]
    raw.accept = ids.get((a.accept, b.accept), -1)
    return kept(trimmed(raw, starts, raw.source))


# ------------------------------------------------------------------------ formats
_LEAP = "([0-9]{2}(0[48]|[2468][048]|[13579][26])|(0[48]|[2468][048]|[13579][26])00)"  # Gregorian leap years
_YEAR = "([1-9][0-9]{3}|0[1-9][0-9]{2}|00[1-9][0-9]|000[1-9])"  # 0001-9999: year 0 is no date to Python's readers
_DATE = (
    f"({_YEAR}-((0[13578]|1[02])-(0[1-9]|[12][0-9]|3[01])|(0[469]|11)-(0[1-9]|[12][0-9]|30)"
    f"|02-(0[1-9]|1[0-9]|2[0-8]))|{_LEAP}-02-29)"
)  # each month's own days: 30 in April, 28 in February, 29 in a leap year's
_TIME = "([01][0-9]|2[0-3]):[0-5][0-9]:([0-5][0-9]|60)(\\.[0-9]+)?([Zz]|[+-]([01][0-9]|2[0-3]):[0-5][0-9])"
_OCTET = "(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_IPV4 = f"({_OCTET}\\.){{3}}{_OCTET}"
_LABEL = "[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = f"{_LABEL}(\\.{_LABEL})*"
_H16 = "[0-9A-Fa-f]{1,4}"
_LS32 = f"({_H16}:{_H16}|{_IPV4})"


def _ipv6() -> str:
    """RFC 3986's IPv6address: eight 16-bit pieces, a run of them written "::" at most once."""
    forms = [f"({_H16}:){{6}}{_LS32}", f"::({_H16}:){{5}}{_LS32}", f"({_H16})?::({_H16}:){{4}}{_LS32}"]
    for k, tail in ((1, f"({_H16}:){{3}}{_LS32}"), (2, f"({_H16}:){{2}}{_LS32}"), (3, f"{_H16}:{_LS32}"),
                    (4, _LS32), (5, _H16), (6, "")):  # fmt: skip
        forms.append(f"(({_H16}:){{0,{k}}}{_H16})?::{tail}")
    return "|".join(f"({f})" for f in forms)


_DURATION_TIME = "T([0-9]+H([0-9]+M([0-9]+S)?)?|[0-9]+M([0-9]+S)?|[0-9]+S)"
_DURATION_DATE = "([0-9]+Y([0-9]+M([0-9]+D)?)?|[0-9]+M([0-9]+D)?|[0-9]+D)"
_ATOM = "[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
# RFC 3986's URI, its authority form (scheme://host[:port]/path?query#fragment) without userinfo:
# the host a hostname whose last label starts with a letter (a WHATWG parser, Pydantic's, reads a
# name ending in digits as an IPv4 address), an IPv4 address or a bracketed IPv6 one; the port
# 0-65535; each character of path, query and fragment one RFC 3986 writes there (pct-encoded too)
_PCHAR = "([A-Za-z0-9._~!$&'()*+,;=:@-]|%[0-9A-Fa-f]{2})"
_PORT = "(6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[1-9][0-9]{0,3}|0)"
_URI_HOST = f"(({_LABEL}\\.)*[A-Za-z]([A-Za-z0-9-]{{0,61}}[A-Za-z0-9])?|{_IPV4}|\\[({_ipv6()})\\])"
_URI = f"[A-Za-z][A-Za-z0-9+.-]*://{_URI_HOST}(:{_PORT})?(/{_PCHAR}*)*(\\?({_PCHAR}|[/?])*)?(#({_PCHAR}|[/?])*)?"
FORMATS = {  # OpenAI's structured outputs' formats, as whole-string patterns
    "date-time": f"^{_DATE}[Tt]{_TIME}$",
    "date": f"^{_DATE}$",
    "time": f"^{_TIME}$",
    "duration": f"^P({_DURATION_DATE}({_DURATION_TIME})?|{_DURATION_TIME}|[0-9]+W)$",
    "email": f"^{_ATOM}(\\.{_ATOM})*@{_HOSTNAME}$",
    "hostname": f"^{_HOSTNAME}$",
    "ipv4": f"^{_IPV4}$",
    "ipv6": f"^({_ipv6()})$",
    "uuid": "^[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}$",
    "uri": f"^{_URI}$",
}


FORMAT_LENGTHS = {"hostname": 253, "email": 254}  # RFC 1123's and RFC 5321's most characters, held as maxLength
# formats that ask nothing of a JSON string's text: OpenAPI's `binary`, what Pydantic writes for a
# `bytes` field, whose JSON is any string (read as its UTF-8 bytes)
ANY_TEXT_FORMATS = ("binary",)


def compile_format(name: str, at: str) -> Pattern | None:
    """The format's pattern; None for a format any text meets."""
    if name in ANY_TEXT_FORMATS:
        return None
    if name not in FORMATS:
        held = ", ".join((*FORMATS, *ANY_TEXT_FORMATS))
        raise InputError(f"option {at}: {name!r} is not one of the formats held ({held})")
    return compile_pattern(FORMATS[name], at)


def clear_caches() -> None:
    """Drop every compiled automaton and reading kept here (requests holding one keep theirs)."""
    for cached in (_step, _compiled, _whole, length_pattern, _counted, _intersected):
        cached.cache_clear()
    _built[0] = 0
