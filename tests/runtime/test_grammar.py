"""JSON mode's grammar over bytes: every JSON object (as json.dumps writes it, in every style) is
accepted byte by byte and ends closed; whatever it accepts as closed, json.loads reads as an
object; masks are the bytes one step allows, whatever the rest of the stack. Under a schema, what
it admits is accepted and what is accepted validates (jsonschema), anyOf alternatives that start
alike read side by side; what it cannot hold a text to is refused by name."""

from __future__ import annotations

import functools
import json
from decimal import Decimal
from typing import Annotated, Literal, Union

import jsonschema
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastblt.errors import InputError
from fastblt.model.config import BYTE_OFFSET, EOS_ID
from fastblt.runtime import grammar
from fastblt.runtime.grammar import (
    BEGIN,
    MAX_PATHS,
    MAX_WS,
    Arr,
    Lit,
    Num,
    Obj,
    Str,
    advance,
    begin,
    compile_schema,
    done,
    mask,
    step,
    tagged,
    union,
)

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
    assert done(states[-1]) and not any(map(done, states[:-1]))
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
    if s is not None and done(s):
        assert isinstance(loaded, dict), data
    if isinstance(loaded, dict) and data.strip() == data and longest_whitespace(data) <= MAX_WS and b"NaN" not in data \
            and b"Infinity" not in data:  # fmt: skip
        assert s is not None and done(s), data


def test_bytes_that_break_json_are_refused():
    for data in (b" {}", b"[]", b'"a"', b"{}}", b"{} ", b"{,}", b'{"a"}', b'{"a":}', b'{"a":01}', b'{"a":1.}',
                 b'{"a":-}', b'{"a":1e}', b'{"a":tru}', b'{"a":[1,]}', b'{"a":1,}', b'{"a":"\x1f"}', b'{"a":"\\x"}',
                 b'{"a":"\\u12g"}', b'{"\xc0\x80":1}', b'{"\xed\xa0\x80":1}', b'{"\xf4\x90\x80\x80":1}', b'{"\xff":1}',
                 b'{"a":"\xe2\x82"}'):  # fmt: skip
        s = run(data)
        assert s is None or not done(s), data
    for data in (b'{"a":"\xe2\x82\xac \xf0\x9f\x98\x80 \\u00e9 \\n"}', b'{"a":[[],{},-0.5e+3,true,null]}', b"{}"):
        assert done(run(data)), data


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
    assert deep != flat and mask(deep) is mask(flat)
    assert not np.array_equal(mask(run(b'{"a":1')), mask(run(b'{"a":[1')))  # "}" vs "]"


def test_masks_read_off_texts_and_patterns_are_those_of_every_byte_tried():
    """Inside a key's or a literal's text the mask is read off the texts still possible, inside a
    string held to a pattern off the code points its reading may take, and inside a number held to
    bounds off its characters and what may follow it: it must allow
    exactly the bytes a step takes (and EOS as a step would), along texts that walk keys, enums,
    consts, alike alternatives, a pattern's characters raw, escaped and in every UTF-8 length,
    and one-byte changes of them."""
    schema = obj({"kind": {"enum": ["a", "ab", "abc", 1, 12, True, None]}, "n": {"const": {"x": [1, "y"]}},
                  "o": {"anyOf": [obj({"k": {"const": "p"}}), obj({"k": {"const": "q"}, "z": {}}, [False, True])]},
                  "p": {"type": "string", "pattern": "^(é|[^\\d\\n\"]+)\\d+(中|😀|[\\x00-\\x1f]|\\\\)?$"},
                  "f": {"type": "string", "format": "email"},
                  "m": {"type": "number", "minimum": -2.5, "exclusiveMaximum": 100, "multipleOf": 0.5},
                  "l": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99}},
                  "d": {"type": "object", "propertyNames": {"pattern": "^[a-c]+é?$"}, "maxProperties": 2}},
                 [False, False, True, True, True, True, True, True])  # fmt: skip
    root = compile_schema(schema)
    texts = [
        b'{"kind": "ab", "n": {"x": [1, "y"]}, "o": {"k": "q", "z": null}}',
        b'{"kind":1,"n":{"x":[1,"y"]}}',
        b'{"kind": 12 ,"n":{"x":[1,"y"]}}',
        b'{"kind": true, "n": {"x": [1, "y"]}, "o": {"k": "p"}}',
        '{"kind": 1, "n": {"x":[1,"y"]}, "p": "é12中", "f": "a.b@c-d.e"}'.encode(),
        b'{"kind": 1, "n": {"x":[1,"y"]}, "p": "x y\\u00017\\n", "f": "a@b"}',
        '{"kind": 1, "n": {"x":[1,"y"]}, "p": "\u0100\U0001f600 7😀"}'.encode(),
        b'{"kind": 1, "n": {"x":[1,"y"]}, "m": -2.5, "l": [0, 17,99 ,5]}',
        b'{"kind": 1, "n": {"x":[1,"y"]}, "m": 99.5}',
        '{"kind": 1, "n": {"x":[1,"y"]}, "d": {"abé": 1, "c" :{"a": "é"}}}'.encode(),
    ]
    seen = 0
    for text in texts + [t[:i] + bytes([c]) + t[i + 1 :] for t in texts for i in range(len(t)) for c in b'a"7}']:
        s = begin(root)
        for b in text:
            for path in s:
                if path[1] in (grammar.KEY_TEXT, grammar.LITERAL, grammar.PATTERN, grammar.BOUNDED,
                               grammar.KEY_PATTERN):  # fmt: skip
                    seen += 1
                    want = [b for b in range(256) if grammar._step(path, b)]
                    assert allowed((path,)) == bytes(want), (text, path)
            s = step(s, b)
            if s is None:
                break
    assert seen > 1000


# ---------------------------------------------------------------------------- schemas
def obj(props: dict, optional: list[bool] | tuple[bool, ...] = ()) -> dict:
    """An object schema of `props`, each required unless `optional` says so (by position)."""
    required = [k for i, k in enumerate(props) if not (i < len(optional) and optional[i])]
    return {"type": "object", "properties": props, "required": required, "additionalProperties": False}


small_values = st.one_of(st.text(max_size=3), st.integers(-20, 20), st.booleans(), st.none())
HELD = [  # values held by keywords together (runtime/pattern.py), and values they admit as json.dumps writes them
    ({"type": "string", "pattern": "^[a-c]+$", "maxLength": 3}, st.from_regex(r"\A[a-c]{1,3}\Z")),
    ({"type": "string", "format": "date", "pattern": "^20"}, st.dates().map(str).filter(lambda d: d.startswith("20"))),
    ({"type": "string", "format": "email", "minLength": 6}, st.sampled_from(["a@b.cd", "x.y@example.org"])),
    ({"type": "integer", "minimum": -5, "maximum": 20, "multipleOf": 5}, st.sampled_from([-5, 0, 5, 10, 15, 20])),
    ({"type": "number", "exclusiveMinimum": -1.5, "maximum": 2.25}, st.integers(-5, 9).map(lambda k: k / 4)),
    ({"type": "number", "multipleOf": 0.25}, st.integers(-400, 400).map(lambda k: k / 4)),
]  # fmt: skip
leaf_schemas = (
    st.sampled_from([held for held, _ in HELD])
    | st.sampled_from([{"type": t} for t in ("string", "number", "integer", "boolean", "null")]
                    + [{"type": ["string", "null"]}, {"type": ["integer", "boolean"]}, {}, {"type": "object"}])
    | st.lists(small_values, min_size=1, max_size=4).map(lambda v: {"enum": v, "description": "one of these"})
    | st.lists(small_values, min_size=1, max_size=4)  # beside a type: only the values of that type
    .filter(lambda v: any(isinstance(x, str) for x in v))
    .map(lambda v: {"enum": v, "type": "string"})
    | small_values.map(lambda v: {"const": v})
    | st.sampled_from([
        {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "integer"}}]},
        {"anyOf": [{"type": "string"}, {"enum": ["a", "ab", 1]}]},  # alternatives that start alike from here on
        {"anyOf": [{"type": "integer"}, {"type": "number"}, {"const": 12}]},
        {"anyOf": [{"anyOf": [{"type": "string"}, {"type": "number"}]}, {"type": "boolean"}]},
    ])
)  # fmt: skip


def array(items: dict, least: int, more: int | None) -> dict:
    """An array schema of `items`, minItems `least` (0: left out), maxItems `least + more` (None: left out)."""
    bounds = {"minItems": least} if least else {}
    return {"type": "array", "items": items, **bounds, **({} if more is None else {"maxItems": least + more})}


NAMES = [  # a map's propertyNames, and keys they admit
    (None, st.text(max_size=3)),
    ({"pattern": "^[a-c]{1,2}$"}, st.from_regex(r"\A[a-c]{1,2}\Z")),
    ({"type": "string", "maxLength": 10, "format": "date"}, st.dates().map(str).filter(lambda d: len(d) == 10)),
    ({"minLength": 1, "pattern": "^(x|é)"}, st.from_regex(r"\A(x|é)[a-z]{0,2}\Z")),
]


def map_of(values: dict | bool | None, names: int, least: int, more: int | None) -> dict:
    """A map schema: values of `values` (None: left out), keys held to NAMES[names], minProperties
    `least` (0: left out), maxProperties `least + more` (None: left out)."""
    schema = {"type": "object", **({} if values is None else {"additionalProperties": values})}
    schema |= {"minProperties": least} if least and values is not False else {}
    schema |= {} if more is None else {"maxProperties": least + more}
    return schema | ({} if NAMES[names][0] is None else {"propertyNames": NAMES[names][0]})


def tuple_of(prefix: list[dict], rest: dict | bool | None, whole: bool) -> dict:
    """A tuple schema: prefixItems `prefix`, then items `rest` (None: left out), minItems the
    prefix's length if `whole`."""
    return {"type": "array", "prefixItems": prefix, **({} if rest is None else {"items": rest}),
            **({"minItems": len(prefix)} if whole else {})}  # fmt: skip


def objects_of(inner: st.SearchStrategy) -> st.SearchStrategy:
    return st.builds(obj, st.dictionaries(st.sampled_from(["a", "b", "ab"]) | st.text(max_size=3), inner, max_size=3),
                     st.lists(st.booleans(), max_size=3))  # fmt: skip


schemas = st.recursive(
    leaf_schemas,
    lambda inner: (
        st.builds(array, inner, st.integers(0, 2), st.none() | st.integers(0, 2))
        | objects_of(inner)
        | st.builds(
            map_of,
            st.none() | st.booleans() | inner,
            st.integers(0, len(NAMES) - 1),
            st.integers(0, 1),
            st.none() | st.integers(0, 2),
        )
        | st.builds(tuple_of, st.lists(inner, min_size=1, max_size=3), st.none() | st.booleans() | inner, st.booleans())
        | st.lists(objects_of(inner), min_size=2, max_size=3).map(lambda alts: {"anyOf": alts})  # all start "{"
        | st.lists(inner, min_size=2, max_size=3).map(lambda alts: {"anyOf": alts})
    ),
    max_leaves=8,
)
root_schemas = st.builds(
    obj, st.dictionaries(st.text(max_size=4), schemas, max_size=4), st.lists(st.booleans(), max_size=4)
)
json_values = st.recursive(
    small_values | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
    max_leaves=6,
)


def instances(schema: dict) -> st.SearchStrategy:
    """Values the schema admits, objects' keys in its order."""
    for held, values in HELD:
        if schema == held:
            return values
    if "const" in schema:
        return st.just(schema["const"])
    if "enum" in schema:
        return st.sampled_from([v for v in schema["enum"] if "type" not in schema or isinstance(v, str)])
    if "anyOf" in schema:
        return st.one_of([instances(s) for s in schema["anyOf"]])
    kind = schema.get("type")
    if isinstance(kind, list):
        return st.one_of([instances({"type": k}) for k in kind])
    if kind == "object" and "properties" not in schema:
        keys = next(k for n, k in NAMES if n == schema.get("propertyNames"))
        values = schema.get("additionalProperties", True)
        least = schema.get("minProperties", 0)
        most = 0 if values is False else schema.get("maxProperties", least + 2)
        if most == 0:
            return st.just({})
        return st.dictionaries(keys, json_values if values is True else instances(values), min_size=least,
                               max_size=most)  # fmt: skip
    if kind == "array" and "prefixItems" in schema:
        prefix, rest = schema["prefixItems"], schema.get("items", True)
        head = st.integers(schema.get("minItems", 0), len(prefix)).flatmap(
            lambda n: st.tuples(*map(instances, prefix[:n])).map(list)
        )
        more = st.just([]) if rest is False else st.lists(json_values if rest is True else instances(rest), max_size=2)
        return st.tuples(head, more).map(lambda hm: hm[0] + hm[1] if len(hm[0]) == len(prefix) else hm[0])
    if kind == "object":
        keys, required = list(schema["properties"]), set(schema["required"])
        present = st.tuples(*[st.just(True) if k in required else st.booleans() for k in keys])
        values = st.tuples(*map(instances, schema["properties"].values()))
        return st.tuples(present, values).map(  # optional keys left out or not, in order
            lambda pv: {k: v for k, here, v in zip(keys, *pv, strict=True) if here}
        )
    if kind == "array":
        least = schema.get("minItems", 0)
        return st.lists(instances(schema["items"]), min_size=least, max_size=schema.get("maxItems", least + 2))
    numbers = st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    kinds = {"string": st.text(max_size=5), "integer": st.integers(), "boolean": st.booleans(), "null": st.none(),
             "number": numbers}  # fmt: skip
    return kinds.get(kind, json_values)


def follows(schema: dict, data: bytes):
    """The state after data under `schema`, or None where a byte is refused."""
    return read(compile_schema(schema), data)


def read(root, data: bytes):
    """The state after data from the start of a value of node `root`, or None where a byte is refused."""
    return advance(begin(root), [b + BYTE_OFFSET for b in data])


def allowed(s) -> bytes:
    """The bytes the mask allows in state s."""
    return bytes((np.flatnonzero(mask(s)[BYTE_OFFSET:] == 0)).tolist())


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_what_a_schema_admits_is_accepted_and_what_is_accepted_it_admits(data):
    """A value the schema admits, written by json.dumps (compact or indented), is accepted byte by
    byte, each byte one the mask allows, and ends closed; the same text with one byte changed, if
    still accepted as closed, validates against the schema (jsonschema)."""
    schema = data.draw(root_schemas)
    admitted_and_mutants_validate(data, schema, data.draw(instances(schema)), MAX_PATHS)


def admitted_and_mutants_validate(data, schema: dict, value, most: int) -> None:
    """`value` (which `schema` admits), written by json.dumps in a drawn style, is accepted byte by
    byte (each byte one the mask allows, at most `most` paths live) and ends closed; with one
    byte changed, if still accepted as closed, it validates against the schema (jsonschema)."""
    # keys and enum / const values in their one spelling (json.dumps's without \u escapes); strings free
    style = data.draw(st.sampled_from([{}, {"indent": 1}, {"separators": (",", ":")}]))
    text = json.dumps(value, ensure_ascii=False, **style).encode()
    if longest_whitespace(text) <= MAX_WS:
        s = begin(compile_schema(schema))
        for i, b in enumerate(text):
            assert mask(s)[BYTE_OFFSET + b] == 0, (schema, text[: i + 1])
            s = step(s, b)
            assert s is not None and len(s) <= most, (schema, text[: i + 1])
        assert done(s) and mask(s)[EOS_ID] == 0, (schema, text)
    changed = bytearray(text)
    changed[data.draw(st.integers(0, len(text) - 1))] = data.draw(st.integers(0, 255))
    s = follows(schema, bytes(changed))
    if s is not None and done(s):
        jsonschema.validate(json.loads(bytes(changed).decode()), schema)


def test_optional_properties_may_be_left_out_in_order():
    schema = obj({"a": {"type": "integer"}, "b": {"type": "integer"}, "c": {"type": "integer"}}, (True, False, True))
    for text in (b'{"b":1}', b'{"a":1,"b":2}', b'{"b":2,"c":3}', b'{"a":1,"b":2,"c":3}'):
        assert done(follows(schema, text)), text
    for text in (b"{}", b'{"a":1}', b'{"c":3,"b":2}', b'{"b":2,"a":1}', b'{"a":1,}'):
        s = follows(schema, text)
        assert s is None or not done(s), text
    both = obj({"ab": {"type": "null"}, "a": {"type": "null"}}, (True, True))  # one key's text the start of another's
    assert done(follows(both, b'{"a":null}')) and done(follows(both, b'{"ab":null,"a":null}'))
    assert done(follows(both, b"{}")) and follows(both, b'{"a":null,"ab":null}') is None


def test_a_schema_holds_keys_order_types_and_values():
    schema = obj({"name": {"type": "string"}, "age": {"type": "integer"}, "kind": {"enum": ["a", "ab", 1, 12]},
                  "tags": {"type": "array", "items": {"type": "string"}}, "none": obj({})})  # fmt: skip
    assert done(follows(schema, b'{"name":"x","age":-3,"kind":"ab","tags":["a"],"none":{}}'))
    for text in (b'{"age":3', b'{"name":"x","age":3.5', b'{"name":"x","age":3,"kind":"b"', b'{"name":1',
                 b'{"name":"x","age":3,"kind":1,"tags":[1]', b'{"name":"x","age":3,"kind":1,"tags":[],"none":{"a"',
                 b'{"name":"x","age":3,"kind":1,"tags":[],"none":{},'):  # fmt: skip
        assert follows(schema, text) is None, text
    after = follows(schema, b'{"name":"x","age":3,"kind":1')  # 1 or 12: a comma or a 2 next
    assert sorted(np.flatnonzero(mask(after) == 0) - BYTE_OFFSET) == sorted([*b" \t\n\r", ord(","), ord("2")])


def test_refs_to_defs_are_followed_as_openais_client_writes_pydantic_models():
    """The schema openai's client sends for a Pydantic model with a nested one (its
    to_strict_json_schema): titles, defaults, $defs and a $ref, an anyOf with null."""
    address = {"title": "Address", "type": "object", "additionalProperties": False, "required": ["city", "zip"],
               "properties": {"city": {"title": "City", "type": "string"},
                              "zip": {"anyOf": [{"type": "integer"}, {"type": "null"}], "title": "Zip"}}}  # fmt: skip
    person = {"$defs": {"Address": address}, "title": "Person", "type": "object", "additionalProperties": False,
              "required": ["name", "kind", "home", "score"],
              "properties": {"name": {"title": "Name", "type": "string"},
                             "kind": {"enum": ["a", "b"], "title": "Kind", "type": "string"},
                             "home": {"$ref": "#/$defs/Address"},
                             "score": {"default": 1.0, "title": "Score", "type": "number"}}}  # fmt: skip
    text = b'{"name": "x", "kind": "b", "home": {"city": "y", "zip": null}, "score": 2.5}'
    assert done(follows(person, text))
    jsonschema.validate(json.loads(text), person)
    assert follows(person, b'{"name": "x", "kind": "b", "home": {"zip"') is None  # its own keys, in order
    twice = {**person, "properties": {**person["properties"], "work": {"$ref": "#/$defs/Address"}},
             "required": [*person["required"], "work"]}  # fmt: skip
    root = compile_schema(twice)
    assert root.values[2] is root.values[4]  # a definition is compiled once
    # Pydantic 1 (and other generators) wrap a described reference in a one-schema allOf
    wrapped = {**person, "definitions": {"Address": address}, "properties": {**person["properties"], "home": {
        "title": "Home", "description": "where", "allOf": [{"$ref": "#/definitions/Address"}]}}}  # fmt: skip
    del wrapped["$defs"]
    assert done(follows(wrapped, text)) and follows(wrapped, b'{"name": "x", "kind": "b", "home": {"zip"') is None
    jsonschema.validate(json.loads(text), wrapped)


NODE = obj({"v": {"type": "integer"}, "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}}})
TREE = {"$defs": {"node": NODE}, **obj({"root": {"$ref": "#/$defs/node"}})}
NUM = obj({"op": {"const": "num"}, "value": {"type": "number"}})
ADD = obj({"op": {"const": "add"}, "left": {"$ref": "#/$defs/expr"}, "right": {"$ref": "#/$defs/expr"}})
EXPR = {"$defs": {"expr": {"anyOf": [NUM, ADD]}}, **obj({"expr": {"$ref": "#/$defs/expr"}})}  # alike: both "{"op"
LIST = obj({"name": {"type": "string"}, "next": {"anyOf": [{"$ref": "#"}, {"type": "null"}]}})  # the root itself
trees = st.recursive(st.builds(lambda v: {"v": v, "kids": []}, st.integers()),
                     lambda inner: st.builds(lambda v, kids: {"v": v, "kids": kids}, st.integers(),
                                             st.lists(inner, max_size=3)), max_leaves=10)  # fmt: skip
numbers = st.integers() | st.floats(allow_nan=False, allow_infinity=False)
exprs = st.recursive(st.builds(lambda x: {"op": "num", "value": x}, numbers),
                     lambda inner: st.builds(lambda a, b: {"op": "add", "left": a, "right": b}, inner, inner),
                     max_leaves=8)  # fmt: skip
lists = st.recursive(st.builds(lambda n: {"name": n, "next": None}, st.text(max_size=3)),
                     lambda inner: st.builds(lambda n, nx: {"name": n, "next": nx}, st.text(max_size=3), inner),
                     max_leaves=8)  # fmt: skip
RECURSIVE = [(TREE, trees.map(lambda t: {"root": t})), (EXPR, exprs.map(lambda e: {"expr": e})), (LIST, lists)]


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_recursive_schemas_admit_what_they_admit_at_any_depth(data):
    """A tree, an expression (alternatives alike up to their "op") and a list through the root
    itself: a value the schema admits is accepted byte by byte, whatever its depth; one byte
    changed, a text still accepted as closed validates (jsonschema follows the recursion)."""
    schema, values = data.draw(st.sampled_from(RECURSIVE))
    value = data.draw(values)
    jsonschema.validate(value, schema)
    admitted_and_mutants_validate(data, schema, value, 2)  # "num" or "add": two readings at most


def test_recursion_goes_deeper_than_schemas_nest_and_pydantics_root_reference_is_read():
    deep = '{"name":"a","next":' * 100 + "null" + "}" * 100  # past MAX_DEPTH: the text's nesting, not the schema's
    assert done(follows(LIST, deep.encode()))
    assert follows(LIST, deep[:-1].encode()) is not None and not done(follows(LIST, deep[:-1].encode()))
    pydantic = {"$defs": {"Node": NODE | {"title": "Node"}}, "$ref": "#/$defs/Node"}  # a recursive model's schema
    pydantic["$defs"]["Node"]["properties"]["kids"]["items"]["$ref"] = "#/$defs/Node"
    assert done(follows(pydantic, b'{"v": 1, "kids": [{"v": 2, "kids": []}]}'))
    assert follows(pydantic, b'{"v": 1, "kids": [{"v": 2, "x"') is None


def test_a_recursion_that_would_keep_more_readings_than_max_paths_keeps_the_first_found():
    """Two alike alternatives inside themselves: each level doubles the readings of a text; a
    state keeps MAX_PATHS of them, and the text they read is still one the schema admits."""
    both = [obj({"k": {"type": "array", "items": {"$ref": "#/$defs/t"}}}) for _ in range(2)]
    schema = {"$defs": {"t": {"anyOf": both}}, **obj({"t": {"$ref": "#/$defs/t"}})}
    opened = b'{"t":' + b'{"k":[' * 9
    s = follows(schema, opened)
    assert len(s) == MAX_PATHS < 2**9
    text = opened + b'{"k":[]}' + b"]}" * 9 + b"}"
    assert done(follows(schema, text))
    jsonschema.validate(json.loads(text), schema)


MAP = {"type": "object", "additionalProperties": {"type": "integer"}, "propertyNames": {"pattern": "^[a-c]+$"},
       "minProperties": 1, "maxProperties": 2}  # fmt: skip
TUPLE = {"type": "array", "prefixItems": [{"type": "integer"}, {"enum": ["a", "b"]}], "items": {"type": "boolean"},
         "minItems": 1, "maxItems": 3}  # fmt: skip


def test_maps_hold_their_values_keys_and_counts_and_tuples_their_elements_in_place():
    cases = [
        (MAP, [b"{}", b'{"a": 1, "b": 2, "c": 3}', b'{"a": "x"}', b'{"d": 1}', b'{"": 1}', b'{"a": 1,}'],
         [b'{"a": 1}', b'{"ab": -2, "c": 0}', b'{"a": 1, "a": 2}']),
        ({"type": "object", "additionalProperties": False}, [b'{"a": 1}'], [b"{}"]),
        ({"type": "object", "propertyNames": {"maxLength": 1}}, [b'{"ab": 1}', b'{"\\u00e9": 1}'],
         ['{"a": [1], "é": null}'.encode()]),  # a key held to a pattern is written one way, raw
        (TUPLE, [b"[]", b'["a"]', b'[1, 1]', b'[1, "c"]', b'[1, "a", 1]', b'[1, "a", true, false]'],
         [b"[1]", b'[1, "b"]', b'[-1, "a", true]']),
        ({"type": "array", "prefixItems": [{"type": "null"}], "items": False}, [b"[null, null]", b"[1]"],
         [b"[]", b"[null]"]),
        ({"type": "array", "prefixItems": [{"type": "null"}]}, [b"[1]"], [b'[null, 1, "x"]']),
    ]  # fmt: skip
    for schema, refused, taken in cases:
        wrapped = obj({"v": schema})
        for text in refused:
            s = follows(wrapped, b'{"v": ' + text + b"}")
            assert s is None or not done(s), (schema, text)
        for text in taken:
            assert done(follows(wrapped, b'{"v": ' + text + b"}")), (schema, text)
            jsonschema.validate({"v": json.loads(text)}, wrapped)
    at_most = follows(obj({"v": MAP}), b'{"v": {"a": 1, "b": 2')  # the second pair: "}" only
    assert allowed(at_most) == b"\t\n\r 0123456789}"
    assert allowed(follows(obj({"v": MAP}), b'{"v": {"')) == b"abc"  # the key's pattern, no escapes
    assert allowed(follows(obj({"v": TUPLE}), b'{"v": [1, ')) == b'\t\n\r "'  # the second element's enum


def walk(root, rng, limit: int = 400) -> bytes | None:
    """Bytes drawn from what the mask allows (structure favoured, closing once the text is long)
    until EOS may come: the text, or None past `limit` bytes. A state that allows nothing fails."""
    s, text = begin(root), b""
    for _ in range(limit):
        ids = np.flatnonzero(mask(s) == 0)
        assert len(ids), text
        if EOS_ID in ids:
            return text
        options = [int(i) - BYTE_OFFSET for i in ids if i >= BYTE_OFFSET]
        liked = [b for b in options if b in (b'}]"' if len(text) > 30 else b'{}[],:"-0123abtfn')]
        b = rng.choice(liked or options)
        s, text = step(s, b), text + bytes([b])
    return None


def validates(text: bytes, schema: dict) -> None:
    """jsonschema's verdict on a text the grammar closed: its numbers read exactly (Decimal, as
    the grammar's bounds compare them), its formats checked."""
    jsonschema.validate(json.loads(text, parse_float=Decimal), schema, format_checker=jsonschema.FormatChecker())


@settings(max_examples=60, deadline=None)
@given(st.sampled_from([MAP, TUPLE, {"type": "object", "additionalProperties": TUPLE, "maxProperties": 3}]),
       st.randoms(use_true_random=False))  # fmt: skip
def test_random_walks_along_the_mask_of_maps_and_tuples_never_stall_and_close_valid(schema, rng):
    """Walks along the mask never reach a state that allows nothing, and close valid."""
    wrapped = obj({"v": schema})
    text = walk(compile_schema(wrapped), rng)
    assert text is not None, "no end after 400 bytes"
    validates(text, wrapped)


KEYWORD_VALUES = {  # every keyword fastblt knows, with values right for it
    "type": st.sampled_from(grammar.TYPES) | st.lists(st.sampled_from(grammar.TYPES), min_size=1, max_size=3,
                                                       unique=True),
    "enum": st.lists(small_values, min_size=1, max_size=3), "const": small_values,
    "pattern": st.sampled_from(["^a+$", "b", "^[0-9]{2}$"]), "format": st.sampled_from(["date", "email", "uuid"]),
    "minLength": st.integers(0, 3), "maxLength": st.integers(0, 4),
    "minimum": st.integers(-3, 3), "maximum": st.integers(-3, 3), "exclusiveMinimum": st.integers(-3, 3),
    "exclusiveMaximum": st.integers(-3, 3), "multipleOf": st.integers(1, 3),
    "minItems": st.integers(0, 2), "maxItems": st.integers(0, 3), "minProperties": st.integers(0, 2),
    "maxProperties": st.integers(0, 2), "required": st.lists(st.sampled_from(["a", "b", "c"]), max_size=2, unique=True),
    "uniqueItems": st.booleans(),
    "propertyNames": st.booleans() | st.sampled_from([{"pattern": "^[ab]+$"}, {"maxLength": 1}]),
    "description": st.just("annotations are ignored"),
}  # fmt: skip
KEYWORDS_OF = {"object": ("required", "minProperties", "maxProperties", "propertyNames", "properties",
                          "additionalProperties"),
               "array": ("minItems", "maxItems", "uniqueItems", "items", "prefixItems"),
               "string": ("pattern", "format", "minLength", "maxLength"),
               "integer": ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"),
               "boolean": (), "null": ()}  # fmt: skip
KEYWORDS_OF["number"] = KEYWORDS_OF["integer"]


def keyword_schemas(inner: st.SearchStrategy | None) -> st.SearchStrategy:
    """Schemas of a type with any of its keywords, enum / const / annotations beside them, and now
    and then any keyword at all (most such are refused: that they are refused is tested too);
    `inner`: the schemas of properties, items and alternatives (None: none)."""
    nested = {} if inner is None else {
        "properties": st.dictionaries(st.sampled_from(["a", "b"]), inner, max_size=2),
        "additionalProperties": st.booleans() | inner, "items": st.booleans() | inner,
        "prefixItems": st.lists(inner, min_size=1, max_size=2), "anyOf": st.lists(inner, min_size=1, max_size=2),
        "oneOf": st.lists(inner, min_size=1, max_size=2),
        "allOf": st.lists(inner, min_size=1, max_size=2)}  # fmt: skip
    values = KEYWORD_VALUES | nested

    def of_type(kind: str) -> st.SearchStrategy:
        names = [k for k in (*KEYWORDS_OF[kind], "enum", "const", "description") if k in values]
        return st.fixed_dictionaries({"type": st.just(kind)}, optional={k: values[k] for k in names})

    return st.one_of(st.sampled_from(grammar.TYPES).flatmap(of_type),
                     st.fixed_dictionaries({}, optional=values))  # fmt: skip


any_keywords = keyword_schemas(keyword_schemas(None))


@settings(max_examples=600, deadline=None)
@given(any_keywords, st.randoms(use_true_random=False))
def test_keywords_in_any_combination_are_held_or_refused_never_ignored(schema, rng):
    """Any combination of the keywords fastblt knows, with values right for each: the schema
    compiles or is refused by name (InputError), and if it compiles, walks along its mask never
    stall and every text they close validates. A keyword the grammar ignored beside another
    (enum beside type, required beside anyOf, ...) shows here as a text that does not validate."""
    wrapped = obj({"v": schema})
    try:
        root = compile_schema(wrapped)
    except InputError:
        return
    for _ in range(3):
        text = walk(root, rng)
        if text is not None:
            validates(text, wrapped)


def test_pydantic_dicts_and_tuples_are_held():
    """What openai's client sends for a Pydantic model with dict and tuple fields (additionalProperties
    as a schema, prefixItems) compiles, its own JSON is taken, and a wrong value is not."""
    import pydantic
    from openai.lib._pydantic import to_strict_json_schema

    class Inventory(pydantic.BaseModel):
        counts: dict[str, int]
        point: tuple[float, float]
        named: tuple[int, str]
        rows: list[tuple[int, ...]]

    root = compile_schema(to_strict_json_schema(Inventory))
    value = Inventory(counts={"apple": 3, "pear": -1}, point=(0.5, -2.0), named=(1, "x"), rows=[(1, 2), ()])
    for text in (value.model_dump_json(), value.model_dump_json(indent=1), Inventory(counts={}, point=(1, 2),
                 named=(0, ""), rows=[]).model_dump_json()):  # fmt: skip
        s = advance(begin(root), [b + BYTE_OFFSET for b in text.encode()])
        assert s is not None and done(s), text
        Inventory.model_validate_json(text)
    for wrong in ({"counts": {"a": 1.5}}, {"point": [1.0]}, {"point": [1, 2, 3]}, {"named": ["x", 1]},
                  {"rows": [[1, "a"]]}):  # fmt: skip
        text = json.dumps(value.model_dump() | wrong)
        s = advance(begin(root), [b + BYTE_OFFSET for b in text.encode()])
        assert s is None or not done(s), wrong


def test_pydantic_bytes_fields_are_any_string_as_its_json_reads_them():
    """A Pydantic `bytes` field's schema is a string of format `binary` (OpenAPI's), and its JSON any
    string (read as UTF-8): held as a plain string, escapes included."""
    import pydantic
    from openai.lib._pydantic import to_strict_json_schema

    class Blob(pydantic.BaseModel):
        data: bytes
        parts: list[bytes]

    schema = to_strict_json_schema(Blob)
    assert schema["properties"]["data"] == {"format": "binary", "title": "Data", "type": "string"}
    root = compile_schema(schema)
    for text in ('{"data": "abc\\n\\u00e9", "parts": ["", "x"]}', '{"data": "", "parts": []}'):
        s = advance(begin(root), [b + BYTE_OFFSET for b in text.encode()])
        assert s is not None and done(s), text
        Blob.model_validate_json(text)
    for wrong in ('{"data": 1, "parts": []}', '{"data": "a", "parts": [null]}'):
        s = advance(begin(root), [b + BYTE_OFFSET for b in wrong.encode()])
        assert s is None or not done(s), wrong


def test_a_discriminated_union_is_held_and_overlapping_one_ofs_are_refused():
    """oneOf (exactly one alternative) is held where no value can be of two: of different types, or
    objects told apart by a required property of different constants, as Pydantic writes
    `Field(discriminator=...)` (`oneOf` beside OpenAPI's `discriminator`); alternatives that
    overlap are refused by name."""
    import pydantic
    from openai.lib._pydantic import to_strict_json_schema

    class Cat(pydantic.BaseModel):
        kind: Literal["cat"]
        lives: int

    class Dog(pydantic.BaseModel):
        kind: Literal["dog"]
        good: bool

    class Owner(pydantic.BaseModel):
        pet: Annotated[Union[Cat, Dog], pydantic.Field(discriminator="kind")]  # noqa: UP007  # as users write it

    schema = to_strict_json_schema(Owner)
    assert "oneOf" in json.dumps(schema) and "discriminator" in json.dumps(schema)
    root = compile_schema(schema)
    for value in (Owner(pet=Cat(kind="cat", lives=9)), Owner(pet=Dog(kind="dog", good=True))):
        assert done(read(root, value.model_dump_json().encode()))
    assert read(root, b'{"pet":{"kind":"dog","lives"') is None
    # a recursive one: checked once its alternatives are compiled (an expression of expressions)
    expr = {"oneOf": [{"$ref": "#/$defs/num"}, {"$ref": "#/$defs/add"}], "discriminator": {"propertyName": "op"}}
    tree = {"$defs": {"num": obj({"op": {"const": "num"}, "v": {"type": "integer"}}),
                      "add": obj({"op": {"const": "add"}, "l": expr, "r": expr})}, **obj({"e": expr})}  # fmt: skip
    text = b'{"e":{"op":"add","l":{"op":"num","v":1},"r":{"op":"add","l":{"op":"num","v":2},"r":{"op":"num","v":3}}}}'
    assert done(follows(tree, text))
    jsonschema.validate(json.loads(text), tree)

    def one_of(*alts):
        return obj({"v": {"oneOf": list(alts)}})

    with_k = lambda k: obj({"k": {"const": k}, "x": {"type": "integer"}})  # noqa: E731
    assert done(follows(one_of(with_k("a"), with_k(2)), b'{"v":{"k":2,"x":1}}'))
    assert done(follows(one_of({"type": "string"}), b'{"v":"s"}'))  # one alternative: nothing to overlap
    types = one_of({"type": "string"}, {"type": "integer"}, with_k("a"), with_k("b"), {"enum": [True, None]})
    for text, held in ((b'"s"', True), (b"-3", True), (b'{"k":"b","x":1}', True), (b"null", True), (b"1.5", False)):
        s = follows(types, b'{"v":' + text + b"}")
        assert (s is not None and done(s)) == held, text
    for alts in (
        ({"type": "integer"}, {"type": "number"}),
        (with_k(1), with_k(1.0)),
        (with_k("a"), with_k("a")),
        ({"type": "string"}, {"enum": ["a", 1]}),
        ({"type": "object"}, with_k("a")),
        (with_k("a"), obj({"k": {"const": "b"}}, (True,))),
    ):  # the last: k not required
        with pytest.raises(InputError, match=r"v\.oneOf: only alternatives no value can be of two of"):
            compile_schema(one_of(*alts))


def test_unique_items_of_values_are_each_written_once():
    """uniqueItems over items of a few values (an enum, booleans; Pydantic's `set[Color]`): a value
    written once is not offered again, the array ends when none is left, and a text never stalls."""
    import enum

    import pydantic

    letters = {"type": "array", "items": {"enum": ["a", "b", "c"]}, "uniqueItems": True}
    numbers_ = {"type": "array", "items": {"enum": [1, 12]}, "uniqueItems": True}  # 1 begins 12: read side by side
    flags = {"type": "array", "items": {"type": "boolean"}, "uniqueItems": True, "minItems": 2}
    cases = ((letters, [b'["a","b"]', b"[]", b'["c","a","b"]'], [b'["a","a"]', b'["a","b","c",']),
             (numbers_, [b"[1,12]", b"[12,1]", b"[1]"], [b"[1,1]", b"[12,12]"]),
             (flags, [b"[true,false]", b"[false,true]"], [b"[true]", b"[true,true]"]))  # fmt: skip
    for schema, taken, refused in cases:
        wrapped = obj({"v": schema})
        for text in taken:
            assert done(follows(wrapped, b'{"v":' + text + b"}")), text
            jsonschema.validate({"v": json.loads(text)}, wrapped)
        for text in refused:
            s = follows(wrapped, b'{"v":' + text + b"}")
            assert s is None or not done(s), text
    assert allowed(follows(obj({"v": letters}), b'{"v":["b","a",')) == b'\t\n\r "'  # and then only c
    assert allowed(follows(obj({"v": letters}), b'{"v":["b","a","')) == b"c"

    class Color(enum.Enum):
        RED = "red"
        GREEN = "green"

    class Paint(pydantic.BaseModel):
        colors: set[Color]

    root = compile_schema(Paint.model_json_schema())
    text = Paint(colors={Color.RED, Color.GREEN}).model_dump_json().encode()
    assert done(read(root, text)) and Paint.model_validate_json(text).colors == {Color.RED, Color.GREEN}
    rng = __import__("random").Random(5)
    for _ in range(20):
        closed = walk(root, rng)
        assert closed is not None
        Paint.model_validate_json(closed)


def test_enum_and_const_beside_a_type_keep_the_values_of_that_type():
    """Pydantic writes `{"enum": [...], "type": "string"}`: a value of another type is not written
    (it was, once: the type was ignored), and an enum or const with none of the type is refused."""
    schema = obj({"v": {"enum": ["a", 1, 2.0, 2.5, None, True], "type": ["string", "integer"]}})
    for text, ok in ((b'"a"', True), (b"1", True), (b"2.0", True), (b"2.5", False), (b"null", False),
                     (b"true", False)):  # fmt: skip
        s = follows(schema, b'{"v":' + text + b"}")
        assert (s is not None and done(s)) == ok, text
        if ok:
            jsonschema.validate({"v": json.loads(text)}, schema)
    for bad, match in (
        ({"const": 1.5, "type": "integer"}, r"v\.const: no value of it is of type 'integer'"),
        ({"enum": [1, 2], "type": "string"}, r"v\.enum: no value"),
        ({"enum": [1], "const": 1}, r"v\.enum: not beside const"),
        ({"enum": [{"a": 1}], "type": "object", "required": ["b"]}, r"v\.required: not beside enum"),
    ):
        with pytest.raises(InputError, match=match):
            compile_schema(obj({"v": bad}))


def test_a_nested_any_of_is_read_as_its_alternatives():
    """An anyOf among an anyOf's alternatives (once an AttributeError at the value's first byte)."""
    schema = obj({"a": {"anyOf": [{"anyOf": [{"type": "string"}, {"type": "number"}]}, {"type": "boolean"}]}})
    for text in (b'{"a":1}', b'{"a":"x"}', b'{"a":true}'):
        assert done(follows(schema, text)), text
    assert follows(schema, b'{"a":n') is None


def test_alternatives_that_start_alike_are_read_side_by_side():
    """anyOf of objects that start alike: each one's texts are accepted, a text that mixes them is
    refused at the first byte neither admits, and until then the mask allows what either does."""
    point = obj({"x": {"type": "integer"}, "y": {"type": "integer"}})
    named = obj({"x": {"type": "string"}, "name": {"type": "string"}}, (False, True))
    schema = obj({"a": {"anyOf": [point, named]}})
    for text in (b'{"a":{"x":1,"y":2}}', b'{"a":{"x":"s","name":"n"}}', b'{"a":{"x":"s"}}'):
        assert done(follows(schema, text)), text
    either = allowed(follows(schema, b'{"a":{"x":'))
    assert set(b'"-0123456789') <= set(either) and b"t" not in either
    for text, other in ((b'{"a":{"x":1,"', b"n"), (b'{"a":{"x":"s","', b"y")):  # a key of the other one's
        assert follows(schema, text) is not None and follows(schema, text + other) is None, text
    assert follows(schema, b'{"a":{"x":1}') is None  # point's y is required
    same_start = obj({"a": {"anyOf": [obj({"id": {"type": "string"}, "n": {"type": "integer"}}),
                                      obj({"id": {"type": "string"}, "b": {"type": "boolean"}})]}})  # fmt: skip
    s = follows(same_start, b'{"a":{"id":"q",')
    assert allowed(s) == b'\t\n\r "' and set(allowed(step(s, ord('"')))) == set(b"nb")
    assert (
        done(follows(same_start, b'{"a":{"id":"q","b":true}}')) and follows(same_start, b'{"a":{"id":"q","b":1') is None
    )
    assert not mask(s).flags.writeable


def test_union_builds_a_grammar_of_tool_calls():
    """A list of one or more calls, each a function's name and its arguments: an Arr root of a
    union of objects that start alike, as the server builds it."""
    f = Obj((b'"name"', b'"arguments"'), (Lit((b'"f"',)), compile_schema(obj({"q": {"type": "string"}}))))
    g = Obj((b'"name"', b'"arguments"'), (Lit((b'"g"',)), compile_schema(obj({"n": {"type": "integer"}}))))
    calls = Arr(union([f, g], "tools"), min_items=1)
    assert allowed(begin(calls)) == b"["
    for text in (
        b'[{"name":"f","arguments":{"q":"x"}}]',
        b'[{"name":"g","arguments":{"n":1}}, {"name":"f","arguments":{"q":""}}]',
    ):
        s = read(calls, text)
        assert done(s) and advance(s, [EOS_ID]) is not None, text
    for text in (b"[]", b'[{"name":"f","arguments":{"n"', b'[{"name":"h"', b"{"):
        assert read(calls, text) is None, text
    flat = union([union([f, g], "t"), Str(), Str()], "t")  # nested unions flattened, duplicates merged
    assert union([f], "tools") is f and flat.alts[:2] == (f, g) and len(flat.alts) == 3
    with pytest.raises(InputError, match=rf"option tools: .* up to {MAX_PATHS + 1} readings"):
        union([Obj((b'"a"',), (Num(),)) for _ in range(MAX_PATHS + 1)], "tools")
    assert done(read(Num(), b"12")) and advance(read(Lit((b"1", b"12")), b"1"), [EOS_ID]) is not None  # scalar roots


def test_min_and_max_items_count_an_arrays_elements():
    """An array closes only once minItems elements are in and takes a comma only while it has fewer
    than maxItems; counts past what the bounds tell apart share their masks."""
    schema = obj({"a": array({"type": "integer"}, 1, 1)})
    for text in (b'{"a":[1]}', b'{"a":[1, 2]}'):
        assert done(follows(schema, text)), text
    assert b"]" not in allowed(follows(schema, b'{"a":[')) and b"," not in allowed(follows(schema, b'{"a":[1,2'))
    assert follows(schema, b'{"a":[]') is None and follows(schema, b'{"a":[1,2,') is None
    empty = obj({"a": array({}, 0, 0)})
    assert follows(empty, b'{"a":[1') is None and done(follows(empty, b'{"a":[]}'))
    plain, two = compile_schema(obj({"a": {"type": "array"}})), compile_schema(obj({"a": array({}, 2, None)}))
    assert mask(read(plain, b'{"a":[1')) is mask(read(plain, b'{"a":[1,2,3,4'))
    assert mask(read(two, b'{"a":[1,2,3')) is mask(read(two, b'{"a":[1,2,3,4,5'))
    assert b"]" not in allowed(read(two, b'{"a":[1')) and b"]" in allowed(read(two, b'{"a":[1,2'))


@pytest.mark.parametrize(
    ("schema", "match"),
    [
        ({"type": "string"}, "the root must be an object"),
        (
            {"type": "object", "properties": {"a": {"type": "string", "contentEncoding": "base64"}}, "required": ["a"]},
            r"schema\.properties\.a\.contentEncoding: not supported",
        ),  # fmt: skip
        ({"type": "object", "properties": {"a": {}, "b": {}}, "required": ["c"]}, r"required: 'c' is not one of"),
        ({"type": "object", "properties": {"a": {}}, "additionalProperties": True}, "additionalProperties: only false"),
        ({"type": "object", "properties": {"a": {}}, "propertyNames": {}}, "propertyNames: only in an object without"),
        (obj({"a": {"allOf": [{"type": "integer"}, {"minimum": 1}]}}), r"a\.allOf: only a list of one schema"),
        (obj({"a": {"anyOf": [{"type": "object"}], "additionalProperties": False}}), r"a\.anyOf: .*, alone \(beside"),
        (obj({"a": {"type": "object", "required": ["k"]}}), r"a\.required: keys required of an object without pro"),
        (obj({"a": {"required": ["k"], "title": "A"}}), r'a\.required: only beside a "type" \(without one any'),
        (obj({"a": {"items": {"type": "integer"}}}), r'a\.items: only beside a "type"'),
        (obj({"a": {"allOf": [{"type": "integer"}], "type": "integer"}}), r"a\.allOf: only a list of one.*, beside"),
        (obj({"a": {"allOf": [{"type": "date"}]}}), r"a\.allOf\[0\]\.type: expected one of"),
        ({**obj({"a": {}, "b": {}}, (False, True)), "minProperties": 2}, r"minProperties: beside .* the 1 required"),
        ({**obj({"a": {}, "b": {}}), "maxProperties": 1}, r"maxProperties: beside properties, .* from the 2 prop"),
        (obj({"m": {"type": "object", "minProperties": 2}}), r"m\.minProperties: at most 1: a map's keys may repeat"),
        (obj({"m": {"type": "object", "minProperties": 2, "maxProperties": 1}}), r"maxProperties: 1 is less than"),
        (
            obj({"m": {"type": "object", "additionalProperties": False, "minProperties": 1}}),
            r"m\.minProperties: no obj",
        ),
        (obj({"m": {"type": "object", "propertyNames": False, "minProperties": 1}}), r"m\.minProperties: no object"),
        (obj({"m": {"type": "object", "propertyNames": {"type": "integer"}}}), r"m\.propertyNames: expected a string"),
        (obj({"m": {"type": "object", "propertyNames": {"enum": ["a"]}}}), r"m\.propertyNames\.enum: not supported"),
        (obj({"m": {"type": "object", "propertyNames": {"pattern": "(?<=a)"}}}), r"m\.propertyNames\.pattern: "),
        (obj({"m": {"type": "string", "maxProperties": 1}}), r"m\.maxProperties: only beside \"type\": \"object\""),
        (obj({"t": {"type": "array", "items": [{}]}}), r"t\.items: expected a schema .* write it as prefixItems"),
        (obj({"u": {"type": "array", "items": {"type": "string"}, "uniqueItems": True}}), r"u\.uniqueItems: only of"),
        (
            obj({"u": {"type": "array", "prefixItems": [{"const": 1}], "items": {"const": 2}, "uniqueItems": True}}),
            r"u\.uniqueItems: only of items",
        ),
        (obj({"u": {"type": "array", "items": {"enum": [1, 1.0]}, "uniqueItems": True}}), r"u\.uniqueItems: its ite"),
        (
            obj({"u": {"type": "array", "items": {"enum": [1, 2]}, "uniqueItems": True, "minItems": 3}}),
            r"u\.minItems: 3 different values, but its items have 2",
        ),
        (obj({"u": {"type": "array", "uniqueItems": 1}}), r"u\.uniqueItems: expected true or false"),
        (obj({"t": {"type": "array", "prefixItems": []}}), r"t\.prefixItems: expected a non-empty list of sch"),
        (obj({"t": {"type": "array", "prefixItems": [{}], "items": False, "minItems": 2}}), r"t\.minItems: 2 elem"),
        (obj({"t": {"type": "array", "prefixItems": [{"type": "date"}]}}), r"t\.prefixItems\[0\]\.type: expected"),
        ({"$ref": "#/$defs/x"}, r"schema\.\$ref: expected \"#\" or \"#/\$defs/NAME\" of the root's \$defs"),
        (
            {"$defs": {"n": {"anyOf": [{"$ref": "#/$defs/n"}, {"type": "null"}]}}, **obj({"a": {"$ref": "#/$defs/n"}})},
            r"schema\.\$defs\.n\.anyOf\[0\]\.\$ref: #/\$defs/n refers to itself with no object or array between",
        ),
        (  # through another definition, still with nothing read between
            {
                "$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"anyOf": [{"$ref": "#/$defs/a"}, {"type": "null"}]}},
                **obj({"x": {"$ref": "#/$defs/a"}}),
            },
            r"schema\.\$defs\.b\.anyOf\[0\]\.\$ref: #/\$defs/a refers to itself with no object",
        ),  # fmt: skip
        ({"$ref": "#"}, r"schema\.\$ref: # refers to itself with no object or array between"),
        (  # wide alike alternatives inside a recursion: checked once the recursion's node is there
            {
                "$defs": {
                    "n": obj(
                        {
                            "x": {
                                "anyOf": [
                                    obj({f"p{i}": {"anyOf": [{"$ref": "#/$defs/n"}, {"type": "null"}]}})
                                    for i in range(MAX_PATHS + 1)
                                ]
                            }
                        }
                    )
                },
                **obj({"n": {"$ref": "#/$defs/n"}}),
            },
            rf"schema\.\$defs\.n\.properties\.x\.anyOf: alternatives that start alike keep up to {MAX_PATHS + 1}",
        ),  # fmt: skip
        (obj({"x": {"$ref": "#/$defs/#"}}), r"x\.\$ref: expected \"#\" or \"#/\$defs/NAME\""),
        ({"$defs": {"n": obj({})}, **obj({"a": {"$ref": "#/$defs/n", "type": "object"}})}, r"a\.\$ref: expected"),
        (
            obj({"x": {"anyOf": [obj({f"p{i}": {"type": "string"}}) for i in range(MAX_PATHS + 1)]}}),
            rf"schema\.properties\.x\.anyOf: alternatives that start alike keep up to {MAX_PATHS + 1} readings",
        ),
        (  # 2 objects, each with a value of MAX_PATHS / 2 + 1 ways to read it: MAX_PATHS + 2 at once
            obj({"x": {"anyOf": [obj({"a": {"anyOf": [obj({str(i): {}}) for i in range(MAX_PATHS // 2 + 1)]}})] * 2}}),
            rf"schema\.properties\.x\.anyOf: .* up to {MAX_PATHS + 2} readings",
        ),
        (obj({"a": {"type": "array", "minItems": -1}}), r"schema\.properties\.a\.minItems: expected a non-negative"),
        (obj({"a": {"type": "array", "maxItems": 1.5}}), r"schema\.properties\.a\.maxItems: expected a non-negative"),
        (obj({"a": {"type": "array", "minItems": 2, "maxItems": 1}}), r"a\.maxItems: 1 is less than minItems \(2\)"),
        (obj({"a": {"type": "string", "minItems": 1}}), r"a\.minItems: only beside \"type\": \"array\""),
        (obj({"a": {"enum": [[1]], "maxItems": 0}}), r"a\.maxItems: only beside"),
        ({"type": "object", "properties": {"a": {"type": "date"}}, "required": ["a"]}, r"properties\.a\.type"),
        ({"type": "object", "properties": {"a": {"enum": []}}, "required": ["a"]}, r"properties\.a\.enum"),
        ([1], "expected a JSON schema object"),
        (
            obj({"a": functools.reduce(lambda inner, _: {"type": "array", "items": inner}, range(40), {})}),
            r"schema\.properties\.a(\.items)+: schemas nested more than 32 deep",
        ),  # fmt: skip
        (
            obj({"a": {"enum": list(range(600))}, "b": {"enum": list(range(600))}}),
            r"schema\.properties\.b\.enum: more than 1,000 enum and const values",
        ),  # fmt: skip
        (obj({str(i): {} for i in range(5001)}), "more than 5,000 properties"),
        (obj({"a": {"const": "x" * 120_000}}), "more than 120,000 bytes of property names and values"),
    ],
)
def test_what_a_schema_cannot_hold_a_text_to_is_refused_by_name(schema, match):
    """Keywords outside the subset, recursion, and schemas past the limits (OpenAI's on enum values,
    properties and their bytes; nesting, which would otherwise be recursed into), each named."""
    with pytest.raises(InputError, match=match):
        compile_schema(schema)


# ---------------------------------------------------------------------------- calls in free text
CALL = obj({"name": {"enum": ["f", "g"]}, "arguments": obj({"q": {"type": "string"}})})


def calls(start="<call>", end="\n</call>", most=None, schema=CALL, lead=False) -> str:
    return json.dumps({"start": start, "end": end, "most": most, "lead": lead, "schema": schema})


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=60))
def test_free_text_is_unconstrained_until_a_start_text(text):
    """Free text takes every byte and EOS (a mask of zeros on them: sampling as without a
    grammar), as long as it does not write the start text."""
    root = tagged(calls())
    if b"<call>" in text:
        return
    s = read(root, text)
    assert s is not None and done(s) and allowed(s) == bytes(range(256)) and mask(s)[EOS_ID] == 0


def test_a_start_text_opens_a_call_held_to_its_schema_and_closed_by_the_end_text():
    root = tagged(calls())
    whole = (
        b'so <<call> {"name": "g", "arguments": {"q": "x"}}  \n</call> then\n<call>{"name":"f","arguments":{"q":""}}'
    )
    whole += b"\n</call>"
    s = read(root, whole)
    assert s is not None and done(s)
    for cut in (
        b"so <call>",
        b'so <call> {"name": "g"',
        b'so <call>{"name":"f","arguments":{"q":""}}',
        b'<call>{"name":"f","arguments":{"q":""}}\n</ca',
    ):
        s = read(root, cut)
        assert not done(s) and mask(s)[EOS_ID] != 0, cut  # no EOS inside a call or its end text
    assert allowed(read(root, b"x <call>")) == b"\t\n\r {"
    closed = read(root, b'<call>{"name":"f","arguments":{"q":""}}')
    assert allowed(closed) == b"\t\n\r "  # whitespace, and the end text, which starts with "\n"
    for bad in (
        b'<call>{"name":"h"',
        b"<call>x",
        b'<call>{"name":"f","arguments":{"q":""}}</call>',
        b'<call>{"name":"f","arguments":{"q":""}}\n</cal!',
    ):
        assert read(root, bad) is None, bad
    # the start found where it overlaps itself, and a call without an end text is followed by free text at once
    assert read(tagged(calls(start="aab", end="")), b'aaab{"name":"f","arguments":{"q":"1"}}aa') is not None
    assert read(tagged(calls(start="aab", end="")), b"aaabx") is None


def test_most_calls_refuses_the_start_of_one_more():
    root = tagged(calls(most=1))
    one = b'<call>{"name":"f","arguments":{"q":""}}\n</call> and <call'
    s = read(root, one)
    assert s is not None and b">" not in allowed(s) and done(s)
    assert read(tagged(calls(most=2)), one + b'>{"name":"g"') is not None
    none = read(tagged(calls(most=0)), b"free <cal")  # no call at all: the start text is never whole
    assert b"l" in allowed(none) and read(tagged(calls(most=0)), b"free <call>") is None


def test_a_leading_call_starts_the_text_and_free_text_may_follow_it():
    """lead (a call asked for): the start text is the text's first bytes, one call follows; then
    free text, where EOS may come or, up to `most`, another call."""
    root = tagged(calls(lead=True))
    assert allowed(begin(root)) == b"<" and mask(begin(root))[EOS_ID] != 0
    assert read(root, b"x") is None and read(root, b"<call>x") is None
    s = read(root, b'<call> {"name": "f", "arguments": {"q": ""}}\n</call>')
    assert s is not None and done(s)
    assert read(root, b'<call> {"name": "f", "arguments": {"q": ""}}\n</call> and <call>{"name": "g"') is not None
    once = tagged(calls(lead=True, most=1))
    assert b">" not in allowed(read(once, b'<call>{"name":"f","arguments":{"q":""}}\n</call><call'))


@pytest.mark.parametrize(
    "spec, match",
    [
        ("{", r"option calls: not JSON"),
        ('{"start": "<c>"}', r"option calls: expected"),
        (calls(start=""), r"start must be a non-empty string"),
        (calls(most=-1), r"option calls\.most: expected an integer >= 0"),
        (calls(most=0, lead=True), r"option calls\.lead: expected true or false \(false when most is 0\)"),
        (
            calls(schema={"type": "object", "properties": {"a": {"pattern": "x"}}}),
            r"calls\.schema\.properties\.a\.pattern",
        ),
    ],
)
def test_a_calls_spec_that_cannot_be_held_is_refused_by_name(spec, match):
    with pytest.raises(InputError, match=match):
        tagged(spec)
