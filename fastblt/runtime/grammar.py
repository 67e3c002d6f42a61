"""JSON mode: which ids a request may generate next so that its text stays the beginning of one
JSON object (RFC 8259, in UTF-8), or of one that a JSON schema admits, as a mask over the ids.

A byte model reads text as it is written, so the grammar needs no alignment of tokens to text:
each byte either continues a JSON text or does not, one step of a pushdown automaton over bytes
(`step`). The stack holds the open containers (each with its schema and, in an object, the
property reached, in an array the elements so far); the rest of a path is what the automaton
expects next (a value of some schema, a key, a colon, a comma or closing bracket, the rest of a
string, number or literal). Where an anyOf's alternatives start alike, a text is read along each
at once: a state is its live paths, a byte keeps those that can take it, and a schema that could
keep more than MAX_PATHS live is refused when compiled. Strings are checked as UTF-8 (no overlong
forms, no surrogates, nothing past U+10FFFF) and escapes as JSON's. The text starts with "{" (or
the first byte of another root, `begin`); runs of whitespace between tokens are cut at MAX_WS
bytes, so a model that likes spaces cannot spend its bytes on them; once the root closes, only
EOS may follow.

A schema (`compile_schema`) is OpenAI's strict subset of JSON Schema, with optional properties:
`type` (one or a list), `properties` (written in their order, as OpenAI's structured outputs write
them; those not `required` may be left out) and no others, `items`, `minItems`, `maxItems`, `enum`,
`const`, `anyOf`, `$ref`s to the root's `$defs` or to the root (recursive ones too, from inside an
object or array: trees, lists, expressions); beyond it, maps (an object without properties:
`additionalProperties` a schema, `propertyNames`, `maxProperties`) and tuples (`prefixItems`), as
Pydantic writes dict and tuple fields, `uniqueItems` over a few values (Pydantic's set of an Enum),
a `oneOf` whose alternatives no value can be of two of (a discriminated union) and an `allOf` of
one schema (Pydantic 1's described reference). Annotations (`description`, `title`, ...) are
ignored and any other keyword is refused, so what the grammar lets through is what the schema
admits. Without a schema, any object. Other grammars (a list of tool calls) are built of the nodes
and `union`. Beside JSON, a text may be held to a regular expression as a whole (`Raw`, pattern.py's
subset, matched as `re.fullmatch` does) or to a context-free grammar (`Cfg`, cfg.py's Earley
recognizer): its UTF-8 bytes are read a character at a time, with no escapes.

Which ids a path allows depends only on what it expects next and the innermost container, not
on the rest of the stack, so masks are computed once per such key (`mask`) and shared; a state of
several paths allows what any of them does. A state keeps MAX_PATHS paths at most: compiling
refuses a schema that could need more, but for a recursive one, whose nesting is the text's, the
first MAX_PATHS found are kept (the text stays one the schema admits; a text only the paths cut
would have read cannot be written). A mask is what the sampler takes off the logits
(sampling.steer): 0 for an allowed id, +inf for the rest.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable
from decimal import Decimal
from functools import cached_property, lru_cache
from typing import Any

import numpy as np

from fastblt.errors import InputError
from fastblt.model.config import BYTE_OFFSET, EOS_ID, VOCAB_SIZE
from fastblt.runtime import cfg, numbers
from fastblt.runtime.courtesy import pause
from fastblt.runtime.numbers import number_pattern
from fastblt.runtime.pattern import (
    FORMAT_LENGTHS,
    MAX_STATES,
    Pattern,
    clear_caches,
    compile_format,
    compile_pattern,
    compile_whole,
    counted,
    intersect,
    length_pattern,
    states_built,
)

MAX_WS = 20  # whitespace bytes in a row: a newline and indentation, not a model stuck on spaces (llama.cpp's
# JSON grammar allows about as many)
FORMATS = ("json",)  # DecodeOptions.format, as users ask for it
CALLS = "calls"  # the format of DecodeOptions.calls (set with them, never asked for alone)
REGEX = "regex"  # the format of DecodeOptions.pattern (likewise)
GRAMMAR = "grammar"  # the format of DecodeOptions.grammar (likewise)

# what a state expects next
(START, VALUE, KEY, KEY_TEXT, COLON, AFTER, STRING, NUMBER, LITERAL, DONE, FREE, END, OPEN, PATTERN, BOUNDED,
 KEY_PATTERN, RAW, CFG) = range(18)  # fmt: skip
WHITESPACE = frozenset(b" \t\n\r")
BETWEEN_TOKENS = frozenset((VALUE, KEY, COLON, AFTER))  # where whitespace may come
DIGITS = frozenset(b"0123456789")
NUMBER_BYTES = b"-.0123456789"  # a number held to bounds or a multiple (numbers.py: no exponent)
HEX = frozenset(b"0123456789abcdefABCDEF")
ESCAPES = frozenset(b'"\\/bfnrt')
COMPLETE_NUMBERS = frozenset(("zero", "int", "frac", "exp"))  # number phases a value may end in


# ------------------------------------------------------------------------ schemas
class Node:
    """A compiled schema: what one value may be. Compared and hashed by identity (masks are cached
    by it); `first` is the bytes a value of it may start with, `width` the most paths (below) a
    value of it may keep live at once; where they depend on other nodes, worked out at first use
    (a node may hold a Ref to a definition still being compiled)."""

    first: frozenset[int] = frozenset()
    width = 1


class Obj(Node):
    """An object: these keys (JSON text, quotes included) in this order, with values of these
    schemas, the ones not `required` free to be left out; or, keys None, a map: any keys (held to
    `names`, a string automaton, if given) with values of `extra` (None: any value), `least` (0
    or 1: a key may repeat, so more pairs would not promise more keys) to `most` (None: no most)
    pairs of them. A map's frame counts the pairs before the current one up to `cap`, as an
    array's counts its elements."""

    first = frozenset(b"{")

    def __init__(self, keys: tuple[bytes, ...] | None = None, values: tuple[Node, ...] = (),
                 required: tuple[bool, ...] | None = None, extra: Node | None = None, names: Pattern | None = None,
                 least: int = 0, most: int | None = None):  # fmt: skip
        self.keys, self.values = keys, values
        self.required = required if required is not None else (True,) * len(values)
        self.extra, self.names, self.least, self.most = extra, names, least, most
        self.cap = max(least, most or 0)

    @cached_property
    def width(self) -> int:  # type: ignore[override]
        values = self.values if self.keys is not None else (self.extra,) if self.extra is not None else ()
        return max((v.width for v in values), default=1)  # one value is read at a time

    def candidates(self, i: int) -> tuple[tuple[bytes, int], ...]:
        """(key text after its opening quote, index) of the keys that may come next from key i on:
        up to the first required one."""
        out = []
        for j in range(i, len(self.keys or ())):
            out.append((self.keys[j][1:], j))  # type: ignore[index]
            if self.required[j]:
                break
        return tuple(out)

    def may_close(self, i: int) -> bool:
        """Whether the object may end before key i (no required key from i on)."""
        return not any(self.required[i:])


class Arr(Node):
    """An array: its first elements of the schemas `prefix` (a tuple's), the rest of `items` (None:
    any value), min_items to max_items of them (None: no most). Its stack frame counts the
    elements before the current one up to `cap`, past which counts allow the same bytes (so a
    plain array's masks are one set, whatever its length). `unique`: items a Lit each of whose
    values is written at most once; its frame's array is then the one of the values not written
    yet (`using`), so its masks follow what is left."""

    first = frozenset(b"[")

    def __init__(self, items: Node | None = None, min_items: int = 0, max_items: int | None = None,
                 prefix: tuple[Node, ...] = (), unique: bool = False):  # fmt: skip
        self.items, self.min_items, self.max_items, self.prefix = items, min_items, max_items, prefix
        self.cap = max(min_items, max_items or 0, len(prefix))
        self.unique, self._using = unique, {}

    def using(self, text: bytes) -> Arr:
        """A unique array once its element `text` is written: its items the values not written yet
        (each such array made once, so a frame's masks are shared)."""
        if text not in self._using:
            rest = tuple(t for t in self.items.texts if t != text)  # type: ignore[union-attr]
            self._using[text] = Arr(Lit(rest) if rest else None, self.min_items, self.max_items, unique=True)
        return self._using[text]

    def element(self, n: int) -> Node:
        """The schema of the element after n others (n capped: past `cap`, `items`)."""
        return self.prefix[n] if n < len(self.prefix) else self.items or ANY

    @cached_property
    def width(self) -> int:  # type: ignore[override]
        if self.unique and isinstance(self.items, Lit):  # a reading per value its first byte may begin
            return max(sum(t[0] == b for t in self.items.texts) for b in self.items.first)
        return max((p.width for p in (*self.prefix, *(self.items,) * (self.items is not None))), default=1)


class Str(Node):
    """A string; with `pattern` (its JSON Schema pattern, format and length bounds as one
    automaton, pattern.py), one whose text it matches."""

    first = frozenset(b'"')

    def __init__(self, pattern: Pattern | None = None):
        self.pattern = pattern


class Num(Node):
    """A number (an integer if `integer`); with `pattern` (its bounds and multipleOf,
    numbers.number_pattern), one whose text it matches."""

    first = frozenset(b"-0123456789")

    def __init__(self, integer: bool = False, pattern: Pattern | None = None):
        self.integer, self.pattern = integer, pattern


class Lit(Node):
    """One of these JSON texts exactly (true / false / null, an enum's or a const's values)."""

    def __init__(self, texts: tuple[bytes, ...]):
        self.texts, self.first = texts, frozenset(t[0] for t in texts)


class Union(Node):
    """One of these schemas: a value is read along each alternative its first byte admits
    (`by_byte`), so the paths of alternatives that start alike add up in `width`."""

    def __init__(self, alts: tuple[Node, ...]):
        self.alts = alts

    @cached_property
    def first(self) -> frozenset[int]:  # type: ignore[override]
        return frozenset().union(*(a.first for a in self.alts))

    @cached_property
    def by_byte(self) -> dict[int, tuple[Node, ...]]:
        return {b: tuple(a for a in self.alts if b in a.first) for b in self.first}

    @cached_property
    def width(self) -> int:  # type: ignore[override]
        return max((sum(a.width for a in same) for same in self.by_byte.values()), default=1)


class Ref(Node):
    """A definition referred to from inside itself (a recursive schema), `target` once compiled.
    Its width is not known when the nodes around it are built; it counts as 1 there, and `step`
    keeps at most MAX_PATHS paths of a text (the first found) where a recursion's alike
    alternatives would keep more."""

    def __init__(self, ref: str):
        self.ref, self.target = ref, None

    @property
    def first(self) -> frozenset[int]:  # type: ignore[override]
        if self.target is None:
            raise RuntimeError(f"{self.ref} was read before its definition was compiled")
        return self.target.first


class Tagged(Node):
    """Free text in which each `start` opens one value of `call` (whitespace may come between),
    closed by `end` (likewise), at most `most` of them (None: any number; 0: none, the start text
    never written): tool calls in a model's own format (chat's tools, serve/tools.py). `lead`:
    the text starts with a call (a call asked for), else the model decides. Free text takes any
    byte (a text holds no special ids); EOS comes only there. Only a root (`begin`); its frame
    counts the calls made, up to `most`."""

    first = frozenset(range(256))

    def __init__(self, start: bytes, call: Node, end: bytes = b"", most: int | None = None, lead: bool = False):
        if not start:
            raise InputError("option calls: start must be a non-empty text")
        self.start, self.call, self.end, self.most, self.lead = start, call, end, most, lead
        self.width = call.width + 1  # + whitespace read both before an end text and as its start


class Raw(Node):
    """A text (not JSON) that `pattern` matches as a whole: any UTF-8 text, a character at a time.
    Only a root (`begin`)."""

    def __init__(self, pattern: Pattern):
        self.pattern = pattern


class Cfg(Node):
    """A text (not JSON) that a context-free grammar derives (cfg.py). Only a root (`begin`)."""

    def __init__(self, grammar: cfg.Grammar):
        self.grammar = grammar


ANY = Union((Obj(), Arr(), Str(), Num(), Lit((b"true", b"false", b"null"))))
JSON_OBJECT = ANY.alts[0]
# paths live at once, at most: each costs a step a byte (~1 us of Python), so the worst byte stays
# near a tenth of a model's step while a call of any of OpenAI's 128 tools (serve/tools.py: alike
# objects told apart by their name) is one grammar
MAX_PATHS = 128


def union(alts: list[Node], at: str, check: bool = True) -> Node:
    """One of the schemas `alts` (nested unions' alternatives among them, duplicates merged; a
    single one is itself); InputError at `at` when more than MAX_PATHS paths could be live at once
    (every Obj and Arr is as wide as its widest value, so a root built of unions from here is
    within it). `check` False: checked later (`check_width`), once no Ref in it is still open."""
    flat = _alternatives(alts)
    if len(flat) == 1:
        return flat[0]
    node = Union(tuple(flat))
    if check:
        check_width(node, at)
    return node


def check_width(node: Node, at: str) -> None:
    """InputError at `at` when a value of `node` could keep more than MAX_PATHS paths live."""
    if node.width > MAX_PATHS:
        raise InputError(f"option {at}: alternatives that start alike keep up to {node.width} readings of a text "
                         f"open at once, more than {MAX_PATHS}")  # fmt: skip


def _alternatives(alts: list[Node]) -> list[Node]:
    """The alternatives of `alts` with nested unions flattened and the cheap duplicates merged:
    a node once, one plain Str, one plain Num (a number admits every integer), one Lit of all the
    texts."""
    flat: list[Node] = []
    for a in alts:
        flat.extend(_alternatives(list(a.alts)) if isinstance(a, Union) else [a])
    lits = [a for a in flat if isinstance(a, Lit)]
    one = {Str: next((a for a in flat if isinstance(a, Str) and a.pattern is None), None),
           Num: min((a for a in flat if isinstance(a, Num) and a.pattern is None), key=lambda a: a.integer,
                    default=None),
           Lit: lits[0] if len(lits) == 1 else Lit(tuple(dict.fromkeys(t for a in lits for t in a.texts)))}  # fmt: skip
    out: dict = {}
    for a in flat:
        kind = type(a) if type(a) in one and not (isinstance(a, (Str, Num)) and a.pattern) else id(a)
        out.setdefault(kind, one.get(kind, a))
    return list(out.values())


ANNOTATIONS = frozenset(
    ("description", "title", "$schema", "$id", "$comment", "examples", "default", "discriminator")
)  # OpenAPI's discriminator (Pydantic writes it beside oneOf) holds nothing
BOUNDS = ("minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum")
MAX_BOUND = 10**18  # a bound's size: past it a bound is not worth its automaton
KEYWORDS = frozenset(("type", "properties", "required", "additionalProperties", "propertyNames", "minProperties",
                      "maxProperties", "items", "prefixItems", "minItems", "maxItems", "uniqueItems", "pattern",
                      "format",
                      "minLength", "maxLength", *BOUNDS, "multipleOf", "enum", "const", "anyOf", "oneOf", "allOf",
                      "$ref", "$defs", "definitions"))  # fmt: skip
NAME_KEYWORDS = frozenset(("type", "pattern", "format", "minLength", "maxLength"))  # a map's propertyNames
TYPES = ("object", "array", "string", "number", "integer", "boolean", "null")
MAX_DEPTH = 32  # schemas nested in a schema: deeper is refused rather than recursed into
# OpenAI's limits on a structured-outputs schema, which also bound the grammar's work per byte
LIMITS = {"enum and const values": 1000, "properties": 5000, "bytes of property names and values": 120_000,
          "states of its strings' and numbers' automata": 100_000}  # fmt: skip
OPENAI_LIMITS = ("enum and const values", "properties", "bytes of property names and values")
# states of automata (~1 KB each at most) compiled since the caches were cleared: past it a server's
# grammar and pattern caches start again, so requests with ever new schemas cannot grow them without end
STATES_BUDGET = 200_000
# this process's compilations of schemas and call formats (cache misses; refused ones too), their
# seconds, and the budget's clears: a server's /metrics shows them
COMPILES = {"schemas": 0, "seconds": 0.0, "clears": 0}


def compile_schema(schema: Any) -> Obj:
    """A JSON schema (OpenAI's strict subset; its root an object) -> the Obj the grammar follows;
    InputError naming the place in the schema that fastblt cannot hold a text to."""
    node = _Compiler(schema).root("schema")
    if not isinstance(node, Obj):
        raise InputError('option schema: the root must be an object schema ({"type": "object", ...}), as OpenAI\'s')
    _within_budget()
    return node


def _within_budget() -> None:
    """Past STATES_BUDGET, drop the compiled schemas, automata and masks kept (the requests that
    hold a schema keep it; later ones compile theirs again)."""
    if states_built() > STATES_BUDGET:
        drop_caches()
        COMPILES["clears"] += 1


def drop_caches() -> None:
    """Drop every compiled schema, automaton and mask kept here, in pattern.py and numbers.py."""
    for cached in (compiled, tagged, matching, derived, _matched, _mask, _joined_mask, _expected_mask):
        cached.cache_clear()
    clear_caches()
    numbers.clear_caches()
    cfg.compile_grammar.cache_clear()


def _counted_in_compiles(compile: Callable[[str], Node]) -> Callable[[str], Node]:
    """`compile`, each call (a cache's miss) counted in COMPILES with its seconds."""

    @functools.wraps(compile)
    def counted(text: str) -> Node:
        t0 = time.perf_counter()
        try:
            return compile(text)
        finally:
            COMPILES["schemas"] += 1
            COMPILES["seconds"] += time.perf_counter() - t0

    return counted


@lru_cache(maxsize=64)
@_counted_in_compiles
def tagged(text: str) -> Tagged:
    """The Tagged root in JSON text `text`: {"start": str, "end": str, "most": int or null,
    "lead": bool, "schema": a JSON schema of one call (any root)}, compiled once
    (DecodeOptions.calls)."""
    try:
        spec = json.loads(text)
    except ValueError as e:
        raise InputError(f"option calls: not JSON ({e})") from None
    if not isinstance(spec, dict) or set(spec) != {"start", "end", "most", "lead", "schema"}:
        raise InputError('option calls: expected {"start": str, "end": str, "most": int or null, "lead": bool, '
                         '"schema": {...}}')  # fmt: skip
    start, end, most, lead = spec["start"], spec["end"], spec["most"], spec["lead"]
    if not (isinstance(start, str) and start and isinstance(end, str)):
        raise InputError("option calls: start must be a non-empty string, end a string")
    if most is not None and (isinstance(most, bool) or not isinstance(most, int) or most < 0):
        raise InputError(f"option calls.most: expected an integer >= 0 or null, got {most!r}")
    if not isinstance(lead, bool) or (lead and most == 0):
        raise InputError(f"option calls.lead: expected true or false (false when most is 0), got {lead!r}")
    call = _Compiler(spec["schema"]).root("calls.schema")
    _within_budget()
    return Tagged(start.encode(), call, end.encode(), most, lead)


@lru_cache(maxsize=64)
@_counted_in_compiles
def matching(source: str) -> Raw:
    """The Raw root of regular expression `source`, compiled once (DecodeOptions.pattern)."""
    pat = compile_whole(source)
    _within_budget()
    return Raw(pat)


@lru_cache(maxsize=64)
@_counted_in_compiles
def derived(text: str) -> Cfg:
    """The Cfg root of grammar text `text`, compiled once (DecodeOptions.grammar)."""
    g = cfg.compile_grammar(text)
    _within_budget()
    return Cfg(g)


@lru_cache(maxsize=64)
@_counted_in_compiles
def compiled(text: str) -> Obj:
    """The schema in JSON text `text`, compiled once (requests with the same schema share it, and
    the masks of its states)."""
    try:
        schema = json.loads(text)
    except ValueError as e:
        raise InputError(f"option schema: not JSON ({e})") from None
    return compile_schema(schema)


class _Compiler:
    """One schema's compilation: `$ref`s to its root's `$defs` (or `definitions`, as Pydantic and
    OpenAI's client write nested models) and to the root itself ("#") are followed, each
    definition compiled once. A definition may refer to itself (a tree, a list, an expression)
    from inside an object or array of its own: the reference becomes a Ref to the node being
    compiled. One that would be its own value with nothing read first is refused."""

    def __init__(self, root: Any):
        defs = root.get("$defs", root.get("definitions", {})) if isinstance(root, dict) else {}
        self.schema = root
        self.defs: dict = (defs if isinstance(defs, dict) else {}) | {"#": root}
        self.done: dict[str, Node] = {}
        self.open: dict[str, int] = {}  # definitions being compiled: how many containers were open then
        self.containers = 0  # objects and arrays open where the compiler is
        self.refs: dict[str, list[Ref]] = {}  # references to open definitions, to point at them once compiled
        self.unchecked: list[tuple[Node, str]] = []  # unions built while a Ref was open: checked at the end
        self.one_ofs: list[tuple[list[Node], str]] = []  # oneOfs' alternatives, checked apart at the end
        self.depth = 0
        self.spent = dict.fromkeys(LIMITS, 0)
        self.automata: dict[int, Pattern] = {}  # by id, each counted once (and kept alive while compiling)

    def root(self, at: str) -> Node:
        """The root schema's node (a definition "#" refers to)."""
        node = self.definition("#", at)
        for union_, where in self.unchecked:  # every Ref points at its node now (counted 1 wide)
            check_width(union_, where)
        for alts, where in self.one_ofs:  # a recursive one's alternatives are compiled now too
            _check_apart(alts, where)
        return node

    def union(self, alts: list[Node], at: str) -> Node:
        node = union(alts, at, check=not self.refs)  # a width is known once no Ref is open
        if self.refs and isinstance(node, Union):
            self.unchecked.append((node, at))
        return node

    def definition(self, name: str, at: str) -> Node:
        """Definition `name` ("#": the root) compiled once; references from inside it point at it."""
        if name not in self.done:
            self.open[name] = self.containers
            self.done[name] = node = self.compile(self.defs[name], at)
            del self.open[name]
            for ref in self.refs.pop(name, []):
                ref.target = node
        return self.done[name]

    def compile(self, schema: Any, at: str) -> Node:
        pause()  # a schema may have thousands of nodes
        self.depth += 1
        try:
            if self.depth > MAX_DEPTH:
                raise InputError(f"option {at}: schemas nested more than {MAX_DEPTH} deep")
            return self._compile(schema, at)
        finally:
            self.depth -= 1

    def inside(self, schema: Any, at: str) -> Node:
        """A schema of an object's value or an array's element: a reference to a definition open
        around that container is a recursion with bytes read between."""
        self.containers += 1
        try:
            return self.compile(schema, at)
        finally:
            self.containers -= 1

    def spend(self, what: str, n: int, at: str) -> None:
        self.spent[what] += n
        if self.spent[what] > LIMITS[what]:
            whose = " (OpenAI's limit)" if what in OPENAI_LIMITS else ""
            raise InputError(f"option {at}: more than {LIMITS[what]:,} {what} in the schema{whose}")

    def automaton(self, pat: Pattern, at: str) -> Pattern:
        """`pat`, its states spent once per schema (fields that share a pattern share its automaton)."""
        if id(pat) not in self.automata:
            self.automata[id(pat)] = pat
            self.spend("states of its strings' and numbers' automata", pat.size, at)
        return pat

    def literal(self, schema: dict, at: str) -> Lit:
        """An `enum`'s or a `const`'s values, those of the schema's `type` where it gives one (Pydantic
        writes both: `{"enum": [...], "type": "string"}`); any other keyword beside them is refused."""
        name = "const" if "const" in schema else "enum"
        values = [schema["const"]] if name == "const" else schema["enum"]
        if not isinstance(values, list) or not values:
            raise InputError(f"option {at}.enum: expected a non-empty list")
        if beside := self.beside(schema, name, "type"):
            raise InputError(f"option {at}.{beside[0]}: not beside {name} (only type and annotations are: its values "
                             "are written as they are)")  # fmt: skip
        if "type" in schema:
            kinds = _kinds(schema["type"], at)
            values = [v for v in values if _json_types(v) & set(kinds)]
            if not values:
                raise InputError(f"option {at}.{name}: no value of it is of type {schema['type']!r}")
        return self.literals(values, f"{at}.{name}")

    def literals(self, values: list, at: str) -> Lit:
        texts = tuple(dict.fromkeys(_text(v) for v in values))
        self.spend("enum and const values", len(values), at)
        self.spend("bytes of property names and values", sum(map(len, texts)), at)
        return Lit(texts)

    def _compile(self, schema: Any, at: str) -> Node:
        if not isinstance(schema, dict):
            raise InputError(f"option {at}: expected a JSON schema object, got {type(schema).__name__}")
        for name in schema:
            if name not in KEYWORDS and name not in ANNOTATIONS:
                known = ", ".join(sorted(KEYWORDS))
                raise InputError(f"option {at}.{name}: not supported (fastblt holds a text to {known})")
        places = (("minItems", "array"), ("maxItems", "array"), ("prefixItems", "array"), ("uniqueItems", "array"),
                  ("pattern", "string"),
                  ("format", "string"), ("minLength", "string"), ("maxLength", "string"), ("propertyNames", "object"),
                  ("minProperties", "object"), ("maxProperties", "object"),
                  *((b, "number") for b in (*BOUNDS, "multipleOf")))  # fmt: skip
        for bound, kind in places:
            kinds = schema.get("type")
            kinds = kinds if isinstance(kinds, list) else [kinds]
            if bound in schema and (kind not in kinds and (kind != "number" or "integer" not in kinds)
                                    or {"$ref", "const", "enum"} & set(schema)):  # fmt: skip
                described = '"number" or "integer"' if kind == "number" else f'"{kind}"'
                raise InputError(f'option {at}.{bound}: only beside "type": {described} (and no enum, const or $ref)')
        if "allOf" in schema:  # Pydantic 1 and others wrap a described reference: {"allOf": [{"$ref": ...}], ...}
            parts = schema["allOf"]
            if not isinstance(parts, list) or len(parts) != 1 or set(schema) - {"allOf"} - ANNOTATIONS:
                raise InputError(f"option {at}.allOf: only a list of one schema, beside annotations only (fastblt "
                                 "does not intersect schemas)")  # fmt: skip
            return self.compile(parts[0], f"{at}.allOf[0]")
        if "$ref" in schema:
            return self.ref(schema, at)
        if "const" in schema or "enum" in schema:
            return self.literal(schema, at)
        for name in ("anyOf", "oneOf"):
            if name in schema:
                alts = schema[name]
                if not isinstance(alts, list) or not alts or self.beside(schema, name):
                    raise InputError(f"option {at}.{name}: expected a non-empty list of schemas, alone (beside "
                                     "annotations only: fastblt does not intersect schemas)")  # fmt: skip
                nodes = [self.compile(s, f"{at}.{name}[{i}]") for i, s in enumerate(alts)]
                if name == "oneOf":
                    self.one_ofs.append((nodes, f"{at}.oneOf"))
                return self.union(nodes, f"{at}.{name}")
        kind = schema.get("type", "object" if "properties" in schema else None)
        if kind is None:
            if held := self.beside(schema):  # they would hold nothing: any value passes
                raise InputError(f'option {at}.{held[0]}: only beside a "type" (without one any value is admitted)')
            return ANY
        return self.union([self.typed(k, schema, at) for k in dict.fromkeys(_kinds(kind, at))], f"{at}.type")

    def beside(self, schema: dict, *own: str) -> list[str]:
        """The keywords of `schema` other than `own`, its annotations and (at the root) its definitions."""
        roots = {"$defs", "definitions"} if schema is self.schema else set()
        return sorted(set(schema) - set(own) - ANNOTATIONS - roots)

    def ref(self, schema: dict, at: str) -> Node:
        ref = schema["$ref"]
        siblings = self.beside(schema, "$ref")
        prefix = next((p for p in ("#/$defs/", "#/definitions/") if isinstance(ref, str) and ref.startswith(p)), None)
        name = "#" if ref == "#" else None if prefix is None else ref[len(prefix) :]
        if siblings or name not in self.defs or (name == "#") != (ref == "#"):
            raise InputError(f'option {at}.$ref: expected "#" or "#/$defs/NAME" of the root\'s $defs, alone, got '
                             f"{ref!r}")  # fmt: skip
        if name in self.open:
            if self.open[name] == self.containers:
                raise InputError(f"option {at}.$ref: {ref} refers to itself with no object or array between: it "
                                 "would be its own value")  # fmt: skip
            self.refs.setdefault(name, []).append(node := Ref(ref))
            return node
        return self.definition(name, "schema" if name == "#" else f"schema.$defs.{name}")

    def typed(self, kind: str, schema: dict, at: str) -> Node:
        if kind == "object":
            props = schema.get("properties")
            if props is not None and not isinstance(props, dict):
                raise InputError(f"option {at}.properties: expected an object of schemas")
            if not props:
                return self.map(schema, at)
            if schema.get("additionalProperties") not in (None, False):
                raise InputError(f"option {at}.additionalProperties: only false (or left out) beside properties: "
                                 "the keys are the properties'")  # fmt: skip
            if "propertyNames" in schema:
                raise InputError(f"option {at}.propertyNames: only in an object without properties (a map)")
            required = schema.get("required", [])
            if not isinstance(required, list) or not all(isinstance(k, str) for k in required):
                raise InputError(f"option {at}.required: expected a list of property names")
            if unknown := sorted(set(required) - set(props)):
                raise InputError(f"option {at}.required: {unknown[0]!r} is not one of the properties")
            keys = tuple(_text(k) for k in props)
            self.spend("properties", len(keys), f"{at}.properties")
            self.spend("bytes of property names and values", sum(map(len, keys)), f"{at}.properties")
            least, most = _counts(schema, at, "minProperties", "maxProperties")
            if least > len(required) or most is not None and most < len(props):
                name = "minProperties" if least > len(required) else "maxProperties"
                raise InputError(f"option {at}.{name}: beside properties, only a bound every object of them meets "
                                 f"(minProperties up to the {len(required)} required, maxProperties from the "
                                 f"{len(props)} properties)")  # fmt: skip
            values = tuple(self.inside(s, f"{at}.properties.{k}") for k, s in props.items())
            return Obj(keys, values, tuple(k in required for k in props))
        if kind == "array":
            return self.array(schema, at)
        if kind == "string":
            return self.string(schema, at)
        if kind in ("number", "integer"):
            return self.number(kind == "integer", schema, at)
        return Lit((b"true", b"false")) if kind == "boolean" else Lit((b"null",))

    def map(self, schema: dict, at: str) -> Obj:
        """An object without properties: a map whose values are of its `additionalProperties`
        (false: none; true or left out: any), its keys held to its `propertyNames` (a string
        schema), `minProperties` to `maxProperties` pairs of them. A key may repeat (JSON allows
        it; a reader keeps one value), so a pair past the first can't promise another key: a
        minProperties above 1 is refused."""
        extra, names = schema.get("additionalProperties"), schema.get("propertyNames")
        if schema.get("required"):
            raise InputError(f"option {at}.required: keys required of an object without properties are not held "
                             "(give them as properties)")  # fmt: skip
        least, most = _counts(schema, at, "minProperties", "maxProperties")
        if least > 1:
            raise InputError(f"option {at}.minProperties: at most 1: a map's keys may repeat, so more than one "
                             "property cannot be promised")  # fmt: skip
        if extra is False or names is False:
            if least:
                raise InputError(f"option {at}.minProperties: no object has a property where no key or value is "
                                 "admitted (additionalProperties or propertyNames false)")  # fmt: skip
            return Obj((), ())
        if names is not None:
            if not isinstance(names, dict) or names.get("type", "string") != "string":
                raise InputError(f'option {at}.propertyNames: expected a string schema ({{"pattern": ...}})')
            if unknown := sorted(set(names) - NAME_KEYWORDS - ANNOTATIONS):
                raise InputError(f"option {at}.propertyNames.{unknown[0]}: not supported (a map's keys are held to "
                                 f"{', '.join(sorted(NAME_KEYWORDS))})")  # fmt: skip
        value = None if extra is None or extra is True else self.inside(extra, f"{at}.additionalProperties")
        key = self.string(names, f"{at}.propertyNames") if names else Str()
        if value in (None, ANY) and key.pattern is None and least == 0 and most is None:
            return JSON_OBJECT  # any object: one node, its masks shared
        return Obj(None, extra=value, names=key.pattern, least=least, most=most)

    def array(self, schema: dict, at: str) -> Arr:
        """An array: its first elements of its `prefixItems` (a tuple's), the rest of its `items`
        (false: none; true or left out: any), minItems to maxItems of them."""
        prefix = schema.get("prefixItems", [])
        if "prefixItems" in schema and (not isinstance(prefix, list) or not prefix):
            raise InputError(f"option {at}.prefixItems: expected a non-empty list of schemas")
        head = tuple(self.inside(s, f"{at}.prefixItems[{i}]") for i, s in enumerate(prefix))
        items = schema.get("items")
        if isinstance(items, list):
            raise InputError(f"option {at}.items: expected a schema (a list of them is an older draft's tuple: write "
                             "it as prefixItems)")  # fmt: skip
        least, most = _counts(schema, at, "minItems", "maxItems")
        if items is False:
            most = len(head) if most is None else min(most, len(head))
            if least > most:
                raise InputError(f"option {at}.minItems: {least} elements, but items: false ends it after its "
                                 f"{len(head)} prefixItems")  # fmt: skip
        rest = None if items is None or isinstance(items, bool) else self.inside(items, f"{at}.items")
        unique = schema.get("uniqueItems", False)
        if not isinstance(unique, bool):
            raise InputError(f"option {at}.uniqueItems: expected true or false, got {unique!r}")
        if not unique:
            return Arr(rest, least, most, head)
        if head or not isinstance(rest, Lit) or len(rest.texts) > MAX_PATHS:
            raise InputError(f"option {at}.uniqueItems: only of items that are one of at most {MAX_PATHS} values "
                             "(an enum, a const, booleans): a grammar cannot remember every string or number "
                             "written")  # fmt: skip
        if len({_equal_as_json(t) for t in rest.texts}) < len(rest.texts):
            raise InputError(f"option {at}.uniqueItems: its items' values hold a value twice (as 1 and 1.0)")
        most = len(rest.texts) if most is None else min(most, len(rest.texts))
        if least > most:
            raise InputError(f"option {at}.minItems: {least} different values, but its items have "
                             f"{len(rest.texts)}")  # fmt: skip
        return Arr(rest, least, most, unique=True)

    def string(self, schema: dict, at: str) -> Str:
        """A string schema: plain, or held to its `pattern`, its `format` and its length bounds,
        any of them together."""
        text = None
        for name, compile in (("pattern", compile_pattern), ("format", compile_format)):
            if name in schema:
                if not isinstance(schema[name], str):
                    raise InputError(f"option {at}.{name}: expected a string, got {type(schema[name]).__name__}")
                held = compile(schema[name], f"{at}.{name}")
                if held is not None:  # None: a format any text meets
                    text = held if text is None else intersect(text, held, f"{at}.{name}")
        lengths = [k for k in ("minLength", "maxLength") if k in schema]
        limit = FORMAT_LENGTHS.get(schema.get("format"))  # a hostname's or an email's own most characters
        if not lengths and limit is None:
            return Str(text if text is None else self.automaton(text, at))
        least, most = _counts(schema, at, "minLength", "maxLength")
        if max(least, most or 0) > MAX_STATES - 2:
            raise InputError(f"option {at}.{lengths[-1]}: at most {MAX_STATES - 2:,} characters are held")
        if limit is not None:
            most = limit if most is None else min(most, limit)
        where = f"{at}.{lengths[-1] if lengths else 'format'}"
        held = length_pattern(least, most) if text is None else counted(text, least, most, where)
        return Str(self.automaton(held, at))

    def number(self, integer: bool, schema: dict, at: str) -> Num:
        """A number schema: plain, or held to its bounds (any decimals) and its multipleOf, one
        automaton (numbers.number_pattern)."""
        lows, highs = [], []  # (bound, open)
        for name in BOUNDS:
            v = schema.get(name)
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not abs(v) <= MAX_BOUND:
                raise InputError(f"option {at}.{name}: expected a number within ±{MAX_BOUND:.0e}, got "
                                 f"{json.dumps(v)[:40]}")  # fmt: skip
            bound = (Decimal(repr(v)) if isinstance(v, float) else Decimal(v), name.startswith("exclusive"))
            (lows if name in ("minimum", "exclusiveMinimum") else highs).append(bound)
        multiple = self.multiple(schema["multipleOf"], f"{at}.multipleOf") if "multipleOf" in schema else None
        if not lows and not highs and multiple is None:
            return Num(integer)
        lo = max(lows, default=None)  # the stricter: the higher, open on a tie
        hi = min(highs, key=lambda b: (b[0], not b[1]), default=None)  # the lower, open on a tie
        held = number_pattern(lo, hi, multiple, integer, at)
        if held is None:
            what = "within its bounds" if multiple is None else "within its bounds and a multiple of its multipleOf"
            raise InputError(f"option {at}: no {'integer' if integer else 'number'} is {what}")
        return Num(integer, self.automaton(held, at))

    def multiple(self, value: Any, at: str) -> tuple[int, int]:
        """A number's `multipleOf` as its decimal digits and places (0.25: 25 and 2)."""
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= MAX_BOUND:
            raise InputError(f"option {at}: expected a number above 0 within {MAX_BOUND:.0e}, got "
                             f"{json.dumps(value)[:40]}")  # fmt: skip
        _, digits, exponent = Decimal(repr(value)).normalize().as_tuple()
        return int("".join(map(str, digits))) * 10 ** max(exponent, 0), max(-exponent, 0)


def _check_apart(alts: list[Node], at: str) -> None:
    """InputError at `at` unless no value is of two of `alts`, so that oneOf (exactly one) is anyOf:
    every two are of different JSON types (their first bytes differ: `1` is no string), or objects
    told apart by a property both require, of different constants (a discriminated union, as
    Pydantic writes one)."""
    nodes = []
    for node in alts:
        while isinstance(node, Ref) and node.target is not None:
            node = node.target
        nodes.append(node)
    if not all(_apart(a, b) for i, a in enumerate(nodes) for b in nodes[:i]):
        raise InputError(f"option {at}: only alternatives no value can be of two of: of different types, or objects "
                         "told apart by a property both require, of different constants (a discriminated union); "
                         "anyOf admits a value of several")  # fmt: skip


def _apart(a: Node, b: Node) -> bool:
    """Whether no value can be of both `a` and `b` (False where it cannot tell)."""
    if isinstance(a, Ref) or isinstance(b, Ref):
        return False
    if not a.first & b.first:
        return True
    if not (isinstance(a, Obj) and isinstance(b, Obj) and a.keys is not None and b.keys is not None):
        return False
    for i, key in enumerate(a.keys):
        if key not in b.keys:
            continue
        j = b.keys.index(key)
        x, y = a.values[i], b.values[j]
        told = a.required[i] and b.required[j] and isinstance(x, Lit) and isinstance(y, Lit)
        if told and not {*map(_equal_as_json, x.texts)} & {*map(_equal_as_json, y.texts)}:  # type: ignore[attr-defined]
            return True
    return False


def _equal_as_json(text: bytes) -> object:
    """A literal's text, as JSON Schema compares it: 1 and 1.0 the same number (booleans are not)."""
    value = json.loads(text)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return Decimal(repr(value)).normalize()
    return text


def _counts(schema: dict, at: str, low: str, high: str) -> tuple[int, int | None]:
    """A schema's minItems and maxItems (or minLength and maxLength): counts, the first no more
    than the second."""
    least, most = schema.get(low, 0), schema.get(high)
    for name, n in ((low, least), (high, most)):
        if (n is not None or name == low) and (type(n) is not int or n < 0):
            raise InputError(f"option {at}.{name}: expected a non-negative integer, got {n!r}")
    if most is not None and most < least:
        raise InputError(f"option {at}.{high}: {most} is less than {low} ({least})")
    return least, most


def _kinds(kind: Any, at: str) -> list[str]:
    """A schema's `type` as a list of type names; InputError at `at` when it is not one or a list."""
    kinds = kind if isinstance(kind, list) else [kind]
    if not kinds or not all(isinstance(k, str) and k in TYPES for k in kinds):
        raise InputError(f"option {at}.type: expected one of {', '.join(TYPES)} or a list of them, got {kind!r}")
    return kinds


def _json_types(value: Any) -> set[str]:
    """The JSON Schema types a JSON value is of (a whole number is an integer, 1.0 too)."""
    if value is None:
        return {"null"}
    if isinstance(value, bool):
        return {"boolean"}
    if isinstance(value, (int, float)):
        return {"number", "integer"} if isinstance(value, int) or value.is_integer() else {"number"}
    return {str: {"string"}, list: {"array"}, dict: {"object"}}.get(type(value), set())


def _text(value: Any) -> bytes:
    pause()  # a schema's keys and values: up to thousands
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


# ------------------------------------------------------------------------ the automaton
# a path: one deterministic reading of the text so far, (open containers, innermost last, each (its
# schema, in an object the property reached, in an array the elements before this one up to its
# cap); what it expects; its detail; whitespace bytes in a row). A state: the live paths, no two
# alike, in the order they were found (one, unless an anyOf's alternatives start alike).
Path = tuple[tuple, int, Any, int]
State = tuple[Path, ...]
_DONE: Path = ((), DONE, None, 0)


def begin(root: Node = JSON_OBJECT) -> State:
    """The state before the first byte of a text of schema `root` (any object by default; an array
    root's text starts with "[" and closes with its "]"; a Tagged root's is free text)."""
    if isinstance(root, Tagged):
        return ((((root, 0),), OPEN if root.lead else FREE, root.start if root.lead else 0, 0),)
    if isinstance(root, Raw):
        return (((), RAW, (root.pattern, root.pattern.start, 0, 0, 0, 0), 0),)
    if isinstance(root, Cfg):
        return (((), CFG, cfg.begin_cfg(root.grammar), 0),)
    return (((), START, root, 0),)


BEGIN = begin()


def step(s: State, b: int) -> State | None:
    """The state after byte b (0-255): every path that can take b, taken; None when none can."""
    if len(s) == 1:
        return _step(s[0], b)[:MAX_PATHS] or None
    return tuple(dict.fromkeys(q for p in s for q in _step(p, b)))[:MAX_PATHS] or None


def done(s: State) -> bool:
    """Whether the text is whole in state s: EOS may come next."""
    return any(_ends(p) for p in s)


def _ends(p: Path) -> bool:
    """Whether the text may end on path p: its root value closed, or a number or literal at the
    root that may end here (its next byte could still continue it)."""
    stack, mode, sub, _ = p
    if mode in (DONE, FREE):
        return True
    if mode == RAW:  # no character begun, and the pattern matches the text so far
        return sub[2] == 0 and sub[0].accepts(sub[1])
    if mode == CFG:
        return sub.accepts()
    return not stack and (mode == NUMBER and sub[0] in COMPLETE_NUMBERS or mode == LITERAL and b"" in sub
                          or mode == BOUNDED and sub[0].accepts(sub[1]))  # fmt: skip


def _step(p: Path, b: int) -> tuple[Path, ...]:
    """The paths after byte b on path p: none when b cannot come next, several where a union's
    alternatives that start alike each take it."""
    stack, mode, sub, ws = p
    if mode == STRING:
        return _string(p, b)
    if mode in (PATTERN, KEY_PATTERN):  # a string held to a pattern: a value's, or a map's key
        return _matched_string(p, b)
    if mode == RAW:
        return _raw_text(sub, b)
    if mode == CFG:
        return _derived_text(sub, b)
    if mode == FREE:  # sub: how many of the start text's bytes the text ends with
        tag, n = stack[-1]
        k = _matched(tag.start, sub, b)
        if k < len(tag.start):
            return ((stack, FREE, k, 0),)
        return () if n == tag.most else ((stack, VALUE, (False, tag.call), 0),)  # a call opens
    if mode in (END, OPEN):  # sub: the rest of a call's end text, or of the start text that leads
        if b != sub[0]:
            return ()
        if len(sub) > 1:
            return ((stack, mode, sub[1:], 0),)
        return (_called(stack),) if mode == END else ((stack, VALUE, (False, stack[-1][0].call), 0),)
    if mode == BOUNDED:  # sub: the bounds' pattern, its reading of the number's text so far
        pat, reading = sub
        after = pat.step(reading, b)
        if after:
            return ((stack, BOUNDED, (pat, after), 0),)
        return _step(_after(stack), b) if pat.accepts(reading) else ()  # b ends a number within the bounds
    if mode == NUMBER:
        phase, integer = sub
        nxt = _number(phase, integer, b)
        if nxt is not None:
            return ((stack, NUMBER, (nxt, integer), 0),)
        return _step(_after(stack), b) if phase in COMPLETE_NUMBERS else ()  # b ends the number
    if mode == LITERAL:
        rests = tuple(sorted({r[1:] for r in sub if r and r[0] == b}))
        if rests:
            return (_literal(stack, rests),)
        return _step(_after(stack), b) if b"" in sub else ()  # b ends a literal that may end
    if mode == KEY_TEXT:  # sub: (the rest of a key's text, its index) of the keys it may still be
        rests = tuple((r[1:], j) for r, j in sub if r[0] == b)
        ended = next((j for r, j in rests if not r), None)  # a key's text ends with its quote: one at most
        if ended is not None:
            return ((stack[:-1] + ((stack[-1][0], ended),), COLON, None, 0),)
        return ((stack, KEY_TEXT, rests, 0),) if rests else ()
    if mode == AFTER and isinstance(stack[-1][0], Tagged):
        return _after_call(p, b)
    if b in WHITESPACE:  # between tokens: not before the root value, nor after it
        return ((stack, mode, sub, ws + 1),) if mode in BETWEEN_TOKENS and ws < MAX_WS else ()
    if mode == START:
        return _value((), False, sub, b)
    if mode == VALUE:
        first, node = sub
        return _value(stack, first, node, b)
    if mode == KEY:  # sub: right after "{"
        obj, i = stack[-1]
        if obj.keys is None:  # a map: its pairs were counted on the comma before ("," refused at its most)
            if b == ord('"') and obj.most != 0:
                if obj.names is not None:
                    return ((stack, KEY_PATTERN, (obj.names, obj.names.start, "n", 0, 0, 0, 0), 0),)
                return ((stack, STRING, (True, "n", 0, 0, 0), 0),)
            return (_close(stack),) if b == ord("}") and sub and obj.least == 0 else ()
        if b == ord('"'):
            keys = obj.candidates(i)
            return ((stack, KEY_TEXT, keys, 0),) if keys else ()
        return (_close(stack),) if b == ord("}") and sub and obj.may_close(i) else ()
    if mode == COLON:
        if b != ord(":"):
            return ()
        obj, i = stack[-1]
        return ((stack, VALUE, (False, (obj.extra or ANY) if obj.keys is None else obj.values[i]), 0),)
    if mode == AFTER:
        node, i = stack[-1]
        if isinstance(node, Arr):
            return _after_item(stack, node, i, b)
        if node.keys is None:
            n = i + 1  # pairs so far (or more, past the cap, where the answer is the same; never past most)
            if b == ord(","):
                if n == node.most:
                    return ()
                return ((stack[:-1] + ((node, n),) if n <= node.cap else stack, KEY, False, 0),)
            return (_close(stack),) if b == ord("}") else ()  # least is 0 or 1 (Obj), met by a pair
        if b == ord(",") and i + 1 < len(node.keys):
            return ((stack[:-1] + ((node, i + 1),), KEY, False, 0),)
        return (_close(stack),) if b == ord("}") and node.may_close(i + 1) else ()
    return ()


def _after_item(stack: tuple, arr: Arr, i: int, b: int) -> tuple[Path, ...]:
    """After an array's element (i before it, capped): "," while it may have more, "]" once it has
    enough."""
    n = i + 1  # elements so far (or more, past the cap, where the answer is the same; never past max_items)
    if b == ord(","):
        if n == arr.max_items:
            return ()
        return ((stack[:-1] + ((arr, n),) if n <= arr.cap else stack, VALUE, (False, arr.element(n)), 0),)
    return (_close(stack),) if b == ord("]") and n >= arr.min_items else ()


def _value(stack: tuple, first: bool, node: Node, b: int) -> tuple[Path, ...]:
    """The paths of a value of schema `node` starting with b: one for each alternative of a union
    that b may start (`first`: right after "[", where "]" may close an empty array)."""
    if first:
        arr = stack[-1][0]
        if b == ord("]"):
            return (_close(stack),) if arr.min_items == 0 else ()
        if arr.max_items == 0:
            return ()
    while isinstance(node, Ref):
        node = node.target
    if b not in node.first:
        return ()
    if isinstance(node, Union):
        alts = node.by_byte[b]
        if len(alts) == 1:
            return _value(stack, False, alts[0], b)
        return tuple(dict.fromkeys(p for a in alts for p in _value(stack, False, a, b)))
    if isinstance(node, Obj):
        return ((stack + ((node, 0),), KEY, True, 0),)
    if isinstance(node, Arr):
        return ((stack + ((node, 0),), VALUE, (True, node.element(0)), 0),)
    if isinstance(node, Str):
        if node.pattern is not None:
            return ((stack, PATTERN, (node.pattern, node.pattern.start, "n", 0, 0, 0, 0), 0),)
        return ((stack, STRING, (False, "n", 0, 0, 0), 0),)
    if isinstance(node, Num):
        if node.pattern is not None:
            reading = node.pattern.step(node.pattern.start, b)
            return ((stack, BOUNDED, (node.pattern, reading), 0),) if reading else ()
        return ((stack, NUMBER, ("minus" if b == ord("-") else "zero" if b == ord("0") else "int", node.integer), 0),)
    top = stack[-1] if stack else None
    if top is not None and isinstance(top[0], Arr) and top[0].unique and node is top[0].items:
        # an element of a unique array: a reading per value, its frame the array of the values left
        return tuple(_literal(stack[:-1] + ((top[0].using(t), top[1]),), (t[1:],)) for t in node.texts if t[0] == b)
    return (_literal(stack, tuple(sorted({t[1:] for t in node.texts if t[0] == b}))),)  # type: ignore[attr-defined]


def _literal(stack: tuple, rests: tuple[bytes, ...]) -> Path:
    return _after(stack) if rests == (b"",) else (stack, LITERAL, rests, 0)


def _after_call(p: Path, b: int) -> tuple[Path, ...]:
    """Right after a call's value: its end text (whitespace may come first, and the end text may
    start with whitespace too: both readings stay), then free text; without an end text, free
    text at once."""
    stack, _, _, ws = p
    tag = stack[-1][0]
    if not tag.end:
        return _step(_called(stack), b)
    out = [(stack, AFTER, None, ws + 1)] if b in WHITESPACE and ws < MAX_WS else []
    if b == tag.end[0]:
        out.append((stack, END, tag.end[1:], 0) if len(tag.end) > 1 else _called(stack))
    return tuple(out)


def _called(stack: tuple) -> Path:
    """Free text again after a call (the Tagged frame counts it, up to `most`)."""
    tag, n = stack[-1]
    return (((tag, n + 1 if tag.most is not None else 0),), FREE, 0, 0)


@lru_cache(maxsize=4096)
def _matched(start: bytes, k: int, b: int) -> int:
    """How many of `start`'s first bytes the text ends with, after byte b where it ended with k."""
    text = start[:k] + bytes((b,))
    return next((n for n in range(len(text), 0, -1) if text.endswith(start[:n])), 0)


def _close(stack: tuple) -> Path:
    stack = stack[:-1]
    return (stack, AFTER, None, 0) if stack else _DONE


def _after(stack: tuple) -> Path:
    """Right after a value: a comma or closing bracket of its container, or the end at the root."""
    return (stack, AFTER, None, 0) if stack else _DONE


def _number(phase: str, integer: bool, b: int) -> str | None:
    """The number's phase after byte b, or None when b does not continue it (an integer has no
    fraction or exponent)."""
    digit = b in DIGITS
    if phase == "minus":
        return ("zero" if b == ord("0") else "int") if digit else None
    if phase in ("zero", "int"):
        if digit and phase == "int":
            return "int"
        if integer:
            return None
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


def _string(p: Path, b: int) -> tuple[Path, ...]:
    """Inside a string: sub is (a key's, "n" plain / "e" after a backslash / "x" hex digits to come
    / "c" UTF-8 continuation bytes to come, how many, the next byte's range)."""
    stack, _, sub, _ = p
    key, kind, n, lo, hi = sub
    if kind == "n":
        if b == ord('"'):
            return ((stack, COLON, None, 0),) if key else (_after(stack),)
        if b == ord("\\"):
            return ((stack, STRING, (key, "e", 0, 0, 0), 0),)
        if 0x20 <= b < 0x80:
            return (p,)
        if b in _LEADS:
            return ((stack, STRING, (key, "c", *_LEADS[b]), 0),)
        return ()  # a control character, or not a UTF-8 lead byte
    if kind == "e":
        if b in ESCAPES:
            return ((stack, STRING, (key, "n", 0, 0, 0), 0),)
        return ((stack, STRING, (key, "x", 4, 0, 0), 0),) if b == ord("u") else ()
    if kind == "x":
        if b not in HEX:
            return ()
        return ((stack, STRING, (key, "x", n - 1, 0, 0) if n > 1 else (key, "n", 0, 0, 0), 0),)
    if not lo <= b <= hi:
        return ()
    return ((stack, STRING, (key, "c", n - 1, 0x80, 0xBF) if n > 1 else (key, "n", 0, 0, 0), 0),)


# the escapes a string held to a pattern takes: where JSON needs one (a quote, a backslash, a control character)
SHORT_ESCAPES = {ord('"'): 0x22, ord("\\"): 0x5C, ord("b"): 0x08, ord("f"): 0x0C, ord("n"): 0x0A, ord("r"): 0x0D,
                 ord("t"): 0x09}  # fmt: skip
CONTROLS = 0x1F  # below 0x20: written \u00XX (where no short escape says it)


def _matched_string(p: Path, b: int) -> tuple[Path, ...]:
    """Inside a string held to a pattern (a value, or a map's key): sub is (the pattern, its
    reading so far, "n" plain / "e" after a backslash / "x" hex digits to come / "c" UTF-8
    continuation bytes to come, how many, the next byte's range, the code point's bits so far).
    Each character moves the reading once whole; a byte that starts one is allowed only if some
    character it may start can move it (pattern.Pattern.takes), so no path is left without a way
    on. A character is written one way: escaped only where JSON needs it (a quote, a backslash, a
    control character), else as itself (a model unsure of the next character would otherwise
    wander into \\u escapes of any)."""
    stack, mode, sub, _ = p
    pat, reading, kind, n, lo, hi, bits = sub
    if kind == "n":
        if b == ord('"'):
            if not pat.accepts(reading):
                return ()
            return ((stack, COLON, None, 0),) if mode == KEY_PATTERN else (_after(stack),)
        if b == ord("\\"):
            escapable = pat.takes(reading, 0, CONTROLS) or any(pat.takes(reading, c, c) for c in (0x22, 0x5C))
            return ((stack, mode, (pat, reading, "e", 0, 0, 0, 0), 0),) if escapable else ()
        if 0x20 <= b < 0x80:
            return _read_char(stack, mode, pat, reading, b)
        if b not in _LEADS:
            return ()
        n, lo, hi = _LEADS[b]
        return _partial_char(stack, mode, pat, reading, "c", n, lo, hi, b & (0x3F >> n))
    if kind == "e":
        if b in SHORT_ESCAPES:
            return _read_char(stack, mode, pat, reading, SHORT_ESCAPES[b])
        return _partial_char(stack, mode, pat, reading, "x", 4, 0, 0, 0) if b == ord("u") else ()
    if kind == "x":
        if b not in HEX:
            return ()
        code = bits << 4 | int(chr(b), 16)
        if n == 1:
            return _read_char(stack, mode, pat, reading, code) if code <= CONTROLS else ()
        return _partial_char(stack, mode, pat, reading, "x", n - 1, 0, 0, code)
    if not lo <= b <= hi:
        return ()
    code = bits << 6 | (b & 0x3F)
    if n == 1:
        return _read_char(stack, mode, pat, reading, code)
    return _partial_char(stack, mode, pat, reading, "c", n - 1, 0x80, 0xBF, code)


def _read_char(stack: tuple, mode: int, pat: Pattern, reading: frozenset, code: int) -> tuple[Path, ...]:
    after = pat.step(reading, code)
    return ((stack, mode, (pat, after, "n", 0, 0, 0, 0), 0),) if after else ()


def _partial_char(stack: tuple, mode: int, pat: Pattern, reading: frozenset, kind: str, n: int, lo: int, hi: int,
                  bits: int) -> tuple[Path, ...]:  # fmt: skip
    """A character begun: kept only if one of the code points it may still be can move the
    reading (`n` hex digits or continuation bytes to come, the next one in lo..hi)."""
    if kind == "x":  # a control character
        least, most = bits << 4 * n, min((bits + 1 << 4 * n) - 1, CONTROLS)
    else:
        least, most = _still(n, lo, hi, bits)
    if least > most or not pat.takes(reading, least, most):
        return ()
    return ((stack, mode, (pat, reading, kind, n, lo, hi, bits), 0),)


def _utf8(partial: tuple[int, int, int, int], b: int) -> int | tuple[int, ...] | None:
    """Byte b of UTF-8 text after `partial`, a character begun (continuation bytes to come, the
    next one's range, the code point's bits so far; none to come: no character begun): the code
    point b completes, or the character still begun and the code points it may yet be (n, lo, hi,
    bits, least, most), or None when b cannot come here."""
    n, lo, hi, bits = partial
    if n == 0:
        if b < 0x80:
            return b
        if b not in _LEADS:
            return None
        n, lo, hi = _LEADS[b]
        bits = b & (0x3F >> n)
    elif not lo <= b <= hi:
        return None
    else:
        bits, n, lo, hi = bits << 6 | (b & 0x3F), n - 1, 0x80, 0xBF
        if n == 0:
            return bits
    least, most = _still(n, lo, hi, bits)
    return None if least > most else (n, lo, hi, bits, least, most)


def _still(n: int, lo: int, hi: int, bits: int) -> tuple[int, int]:
    """The code points a UTF-8 character begun may still be: `n` continuation bytes to come, the
    next one in lo..hi, its bits so far."""
    rest = 6 * (n - 1)
    return (bits << 6 | lo & 0x3F) << rest, ((bits << 6 | hi & 0x3F) << rest) | ((1 << rest) - 1)


def _raw_text(sub: tuple, b: int) -> tuple[Path, ...]:
    """A text held to a pattern as a whole: sub is (the pattern, its reading so far, and the
    character begun, as `_utf8` reads it). As in a string held to a pattern, a byte that begins a
    character is allowed only if some character it may begin can move the reading."""
    pat, reading, *partial = sub
    got = _utf8(tuple(partial), b)  # type: ignore[arg-type]
    if got is None:
        return ()
    if isinstance(got, int):
        after = pat.step(reading, got)
        return (((), RAW, (pat, after, 0, 0, 0, 0), 0),) if after else ()
    n, lo, hi, bits, least, most = got
    return (((), RAW, (pat, reading, n, lo, hi, bits), 0),) if pat.takes(reading, least, most) else ()


def _derived_text(s: cfg.CfgState, b: int) -> tuple[Path, ...]:
    """A text a context-free grammar derives: its state reads a character once its UTF-8 bytes
    are whole; a byte that begins one is allowed only if a character it may begin can come next."""
    got = _utf8(s.partial, b)
    if got is None:
        return ()
    if isinstance(got, int):
        after = s.step(got)
        return (((), CFG, after, 0),) if after is not None else ()
    n, lo, hi, bits, least, most = got
    if not s.takes(least, most):
        return ()
    return (((), CFG, cfg.CfgState(s.grammar, s.chart, s.n, (n, lo, hi, bits)), 0),)


def _derived_mask(s: cfg.CfgState) -> np.ndarray:
    """The mask of a text held to a grammar: read off the terminals its state expects (shared by
    every state that expects the same), or, inside a character, each continuation byte that keeps
    a character the state may take (as `_derived_text` would, without its Earley step)."""
    if s.partial[0] == 0:
        return _expected_mask(s.expected, s.accepts())
    out = np.full(VOCAB_SIZE, np.inf, dtype=np.float32)
    for b in range(s.partial[1], s.partial[2] + 1):
        got = _utf8(s.partial, b)
        if got is not None and (s.takes(got, got) if isinstance(got, int) else s.takes(got[4], got[5])):
            out[BYTE_OFFSET + b] = 0.0
    return out


@lru_cache(maxsize=4096)
def _expected_mask(expected: frozenset, accepting: bool) -> np.ndarray:
    out = np.full(VOCAB_SIZE, np.inf, dtype=np.float32)
    allowed = set().union(*(_raw_bytes(t.pattern, r) for t, r in expected)) if expected else set()
    out[[BYTE_OFFSET + b for b in allowed]] = 0.0
    if accepting:
        out[EOS_ID] = 0.0
    out.flags.writeable = False
    return out


def advance(s: State, ids: list[int]) -> State | None:
    """The state after generated ids (EOS once the text is whole closes it, and changes nothing
    after), or None when one cannot come next."""
    for t in ids:
        if t == EOS_ID:
            if not done(s):
                return None
            s = (_DONE,)
            continue
        if t < BYTE_OFFSET:
            return None
        s = _step(s[0], t - BYTE_OFFSET)[:MAX_PATHS] if len(s) == 1 else step(s, t - BYTE_OFFSET)  # step, inlined
        if not s:
            return None
    return s


def mask(s: State) -> np.ndarray:
    """What to take off each id's logit in state s (VOCAB_SIZE,) float32: 0 for the ids allowed
    next on any of its paths, +inf for the rest (EOS only once the text is whole). Shared and
    read-only."""
    if len(s) == 1:
        p = s[0]
        if p[1] == CFG:  # its states are its own: masks are shared by what they expect instead
            return _derived_mask(p[2])
        return _mask(p[1], p[2], p[3] >= MAX_WS, p[0][-1:])
    keys = tuple(dict.fromkeys((p[1], p[2], p[3] >= MAX_WS, p[0][-1:]) for p in s))
    return _mask(*keys[0]) if len(keys) == 1 else _joined_mask(keys)


@lru_cache(maxsize=8192)
def _mask(mode: int, sub: Any, ws_full: bool, top: tuple) -> np.ndarray:
    """The mask of one path, by what it expects and its innermost container."""
    p = (top, mode, sub, MAX_WS if ws_full else 0)
    if mode == BOUNDED:  # the number's own characters, then (where it may end) what comes after it
        pat, reading = sub
        after = _after(top)
        out = _mask(after[1], after[2], after[3] >= MAX_WS, after[0][-1:]).copy() if pat.accepts(reading) else (
            np.full(VOCAB_SIZE, np.inf, dtype=np.float32))  # fmt: skip
        out[[BYTE_OFFSET + c for c in NUMBER_BYTES if pat.step(reading, c)]] = 0.0
        out[EOS_ID] = np.inf
    else:
        out = np.full(VOCAB_SIZE, np.inf, dtype=np.float32)
        allowed = _spelled(mode, sub)
        for b in range(256) if allowed is None else allowed:
            if allowed is not None or _step(p, b):
                out[BYTE_OFFSET + b] = 0.0
    if _ends(p):
        out[EOS_ID] = 0.0
    out.flags.writeable = False
    return out


def _spelled(mode: int, sub: Any) -> set[int] | None:
    """The bytes a path inside a key's, a literal's or an end text allows, read off the texts still
    possible, or None where only trying every byte tells (a literal that may end here). Alike
    alternatives (a call of one of many tools) keep a path each in such texts, and trying 256
    bytes per path would make a schema's first answer slow."""
    if mode == KEY_TEXT:  # a key's text ends with its quote: never empty here
        return {r[0] for r, _ in sub}
    if mode == LITERAL and b"" not in sub:
        return {r[0] for r in sub}
    if mode in (END, OPEN):
        return {sub[0]}
    if mode in (PATTERN, KEY_PATTERN) and sub[2] == "n":
        return _pattern_bytes(sub[0], sub[1])
    if mode == RAW and sub[2] == 0:
        return _raw_bytes(sub[0], sub[1])
    return None


UTF8_LEADS = (
    (0x80, 0x7FF, 6, 0xC0),
    (0x800, 0xFFFF, 12, 0xE0),
    (0x10000, 0x10FFFF, 18, 0xF0),
)  # (from, to, shift, tag)


def _pattern_bytes(pat: Pattern, reading: frozenset) -> set[int]:
    """The bytes that may begin the next character of a string held to `pat` (or close it), read
    off the code point ranges the reading may take: itself for printable ASCII, a backslash for
    what is escaped, a UTF-8 lead byte for the rest (each lead covers a range of code points).
    Trying every byte would read the NFA 256 times for each new reading."""
    out = {ord('"')} if pat.accepts(reading) else set()
    for s in reading:
        for a, b, _ in pat.moves[s]:
            out.update(c for c in range(max(a, 0x20), min(b, 0x7F) + 1) if c not in (0x22, 0x5C))
            if a <= CONTROLS or a <= 0x22 <= b or a <= 0x5C <= b:
                out.add(ord("\\"))
            out.update(_leads(a, b))
    return out


def _leads(a: int, b: int) -> set[int]:
    """The UTF-8 lead bytes of code points a..b past ASCII (each lead covers a range of them)."""
    out = set()
    for first, last, shift, tag in UTF8_LEADS:
        x, y = max(a, first), min(b, last)
        if x <= y:
            out.update(range(tag | x >> shift, (tag | y >> shift) + 1))
    return out


def _raw_bytes(pat: Pattern, reading: frozenset) -> set[int]:
    """The bytes that may begin the next character of a text held to `pat`: itself below 0x80, a
    UTF-8 lead byte for the rest (as `_pattern_bytes`, with nothing escaped)."""
    out = set()
    for s in reading:
        for a, b, _ in pat.moves[s]:
            out.update(range(a, min(b, 0x7F) + 1))
            out.update(_leads(a, b))
    return out


@lru_cache(maxsize=4096)
def _joined_mask(keys: tuple) -> np.ndarray:
    """The mask of several paths (by their `_mask` keys): an id any of them allows is allowed."""
    out = np.minimum.reduce([_mask(*k) for k in keys])
    out.flags.writeable = False
    return out
