"""OpenAI's tool calling over chat completions: the request's `tools` go to the chat template,
and the answer is held by the grammar (runtime/grammar.py) to the calls it may make, then read
back into the message's `tool_calls`.

`tool_choice` "required" or a named function ask for calls: the answer is one JSON text of them,

    {"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}, ...]}

keys in that order, `name` one of the tools' (the named one only, for a named choice),
`arguments` what that function's `parameters` schema admits (grammar.compile_schema's subset;
none given: `{}`), one call or more (one with `parallel_tool_calls: false` or a named choice).

A model tuned for tools writes calls in a format of its own: the operator names the text that
starts one and the text that ends it (`CallTags`, `fastblt serve --tool-call-start /
--tool-call-end`), and every choice is then held to that format (DecodeOptions.calls): free text
(no grammar on it) in which each start text opens one call, `{"name": ..., "arguments": ...}`
held like the above, closed by the end text; "auto" (OpenAI's default with tools) lets the model
decide, "required" and a named function lead with a call, "none" keeps the start text out.
Without tags "auto" is refused by name: fastblt does not guess whether free text is a call. The
template is where a model is told the format; docs/serving.md shows one that does.

A custom tool (`{"type": "custom", ...}`) takes text: when tool_choice names it, the whole answer
is its call's input, held to its format's grammar (Lark's, or a regex: DecodeOptions.grammar /
pattern) or free. Among other calls ("required", "auto") its `arguments` are a JSON string, held
whole to a regex format, read back as its input; one with a Lark grammar is called only when named.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

from fastblt.errors import InputError
from fastblt.runtime import grammar
from fastblt.serve.api import ApiError, get_field, json_kind

MAX_TOOLS = 128  # OpenAI's limit
NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for a function's name
FUNCTION_FIELDS = {"name", "description", "parameters", "strict"}
CUSTOM_FIELDS = {"name", "description", "format"}
# a custom tool's grammar syntax -> the option that holds its input to it, and that option's compiler
SYNTAXES: dict[str, tuple[str, Callable[[str], Any]]] = {"lark": ("grammar", grammar.derived),
                                                         "regex": ("pattern", grammar.matching)}  # fmt: skip
NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}  # OpenAI's reading of none


@dataclass(frozen=True)
class CallTags:
    """How a template's format marks a call in free text: `start` before its JSON, `end` after
    it (`fastblt serve --tool-call-start / --tool-call-end`)."""

    start: str
    end: str = ""


@dataclass(frozen=True)
class Tools:
    """A request's tools, as its chat template reads them, and what it asks of them: `schema` is
    the JSON schema (text) its answer is held to when it asks for calls; `calls` the
    DecodeOptions.calls of free text with calls (tool_choice "auto"); neither when it asks for
    none (tool_choice "none": the tools are still rendered, as OpenAI's model still sees them)."""

    listed: list[dict]
    schema: str | None = None
    named: bool = False  # a named choice: OpenAI's finish_reason is then "stop", not "tool_calls"
    calls: str | None = None
    none: bool = False  # tool_choice "none": `calls`, if any, only keeps the start text out
    custom: str | None = None  # a custom tool tool_choice names: the answer is its call's input
    custom_format: tuple[tuple[str, str], ...] = ()  # the options that hold that input (its grammar)
    customs: frozenset[str] = frozenset()  # custom tools among the calls' names (their input a JSON string)


def parse_tools(body: dict, tags: CallTags | None = None) -> Tools | None:
    """`tools`, `tool_choice` and `parallel_tool_calls` checked; None when the request has no
    tools. "auto" (OpenAI's default with tools) needs the template's call tags. Errors name the
    field (a function's parameters by their place in `tools`)."""
    listed, choice = body.get("tools"), body.get("tool_choice")
    parallel = get_field(body, "parallel_tool_calls", bool, default=True)
    if listed in (None, []):
        if choice not in (None, "none"):
            raise ApiError(400, f"tool_choice: {json.dumps(choice)[:60]} asks for a call, but the request has no "
                           "tools", "tool_choice")  # fmt: skip
        return None
    functions, customs = _functions(listed)
    choice = "auto" if choice is None else choice
    if isinstance(choice, dict) and choice.get("type") == "custom":
        name = _named_custom(choice)
        if name not in customs:
            raise ApiError(400, f"tool_choice: custom tool {name!r} is not one of the tools "
                           f"({', '.join(customs) or 'none is custom'})", "tool_choice")  # fmt: skip
        return Tools(_for_template(listed), named=True, custom=name, custom_format=customs[name])
    listed = _for_template(listed)
    if choice in ("auto", "required"):  # custom tools are called among the functions, their input a JSON string
        lark = [name for name, fmt in customs.items() if fmt and fmt[0][0] == "grammar"]
        if lark:
            raise ApiError(400, f"tool_choice: custom tool {lark[0]!r} takes a Lark grammar, which holds an input only "
                           f'when tool_choice names its tool ({{"type": "custom", "custom": {{"name": ...}}}}); '
                           f'"{choice}" calls tools by a JSON text', "tool_choice")  # fmt: skip
        functions = functions | {name: _string_schema(fmt) for name, fmt in customs.items()}
    customs_called = frozenset(customs) & frozenset(functions)
    if choice == "auto" and tags is None:
        raise ApiError(400, 'tool_choice: "auto" (OpenAI\'s default when tools are given) needs the text that '
                       "starts a call in the template's format (this server has no --tool-call-start); send "
                       '"required", {"type": "function", "function": {"name": ...}} or "none"',
                       "tool_choice")  # fmt: skip
    if choice == "none":  # in the model's format, the start text is kept out: no call (of any tool's shape)
        kept_out = functions or dict.fromkeys(customs, {"type": "string"})
        return Tools(listed, calls=None if tags is None else _tagged(tags, kept_out, most=0, lead=False), none=True)
    named = choice not in ("auto", "required")
    if named:
        name = _named(choice)
        if name not in functions:
            raise ApiError(400, f"tool_choice: function {name!r} is not one of the tools ({', '.join(functions)})",
                           "tool_choice")  # fmt: skip
        functions, parallel = {name: functions[name]}, False
    if tags is not None:  # the model's own format: calls asked for lead the text
        return Tools(listed, named=named, calls=_tagged(tags, functions, None if parallel else 1, choice != "auto"),
                     customs=customs_called)  # fmt: skip
    return Tools(listed, _checked(calls_schema(functions, parallel)), named=named, customs=customs_called)


def _tagged(tags: CallTags, functions: dict[str, dict], most: int | None, lead: bool) -> str:
    """DecodeOptions.calls for `functions` in the format `tags` mark."""
    call, defs = _call_schema(functions)
    spec = {"start": tags.start, "end": tags.end, "most": most, "lead": lead,
            "schema": call | ({"$defs": defs} if defs else {})}  # fmt: skip
    return _checked(spec, grammar.tagged)


def _checked(schema: dict, compile: Callable[[str], Any] = grammar.compiled) -> str:
    """The calls' schema (or calls spec) as JSON text, compiled once here (the engine finds it
    cached) so that what only the whole can exceed (the grammar's paths, OpenAI's size limits)
    names `tools`."""
    text = json.dumps(schema, ensure_ascii=False)
    try:
        compile(text)
    except InputError as e:
        message = str(e).replace("option schema", "tools: the calls' schema", 1)
        raise ApiError(400, message.replace("option calls", "tools: the calls' schema", 1), "tools") from None
    return text


def _functions(listed: Any) -> tuple[dict[str, dict], dict[str, tuple[tuple[str, str], ...]]]:
    """`tools` -> ({name: parameters schema} of the functions, each checked as the grammar will
    hold it; {name: the options that hold its input} of the custom tools, their grammars compiled)."""
    if not isinstance(listed, list):
        raise ApiError(400, f"tools: expected a list of tools, got {json_kind(listed)}", "tools")
    if len(listed) > MAX_TOOLS:
        raise ApiError(400, f"tools: at most {MAX_TOOLS} tools, got {len(listed)}", "tools")
    functions: dict[str, dict] = {}
    customs: dict[str, tuple[tuple[str, str], ...]] = {}
    for i, tool in enumerate(listed):
        where = f"tools[{i}]"
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind not in ("function", "custom") or set(tool) != {"type", kind}:
            raise ApiError(400, f'{where}: expected {{"type": "function", "function": {{...}}}} or {{"type": "custom", '
                           f'"custom": {{...}}}}, got {json.dumps(tool)[:60]}', "tools")  # fmt: skip
        spec, fields = tool[kind], FUNCTION_FIELDS if kind == "function" else CUSTOM_FIELDS
        if not isinstance(spec, dict) or set(spec) - fields:
            raise ApiError(400, f"{where}.{kind}: expected an object of {', '.join(sorted(fields))}", "tools")
        name = get_field(spec, "name", str, required=True, label=f"{where}.{kind}.name")
        if not NAME.fullmatch(name):
            raise ApiError(400, f"{where}.{kind}.name: {name[:80]!r} is not 1 to 64 letters, digits, _ or -",
                           "tools")  # fmt: skip
        if name in functions or name in customs:
            raise ApiError(400, f"{where}.{kind}.name: {name!r} is named twice", "tools")
        get_field(spec, "description", str, label=f"{where}.{kind}.description")
        if kind == "custom":
            customs[name] = _custom_format(spec.get("format"), f"{where}.custom.format")
            continue
        get_field(spec, "strict", bool, label=f"{where}.function.strict")  # held strictly either way
        parameters = spec.get("parameters")
        parameters = NO_PARAMETERS if parameters is None else parameters
        try:
            grammar.compile_schema(parameters)
        except InputError as e:
            message = str(e).replace("option schema", f"{where}.function.parameters", 1)
            raise ApiError(400, message, "tools") from None
        functions[name] = parameters
    return functions, customs


def _custom_format(fmt: Any, where: str) -> tuple[tuple[str, str], ...]:
    """A custom tool's `format` -> the options that hold its input: none for text (the default),
    `grammar` for a Lark grammar, `pattern` for a regular expression; compiled here, so that what
    they cannot hold names the tool."""
    if fmt is None or fmt == {"type": "text"}:
        return ()
    ok = isinstance(fmt, dict) and set(fmt) == {"type", "grammar"} and fmt["type"] == "grammar"
    spec = fmt["grammar"] if ok else None
    if not isinstance(spec, dict) or set(spec) != {"syntax", "definition"}:
        raise ApiError(400, f'{where}: expected {{"type": "text"}} or {{"type": "grammar", "grammar": {{"syntax": '
                       f'"lark" or "regex", "definition": str}}}}, got {json.dumps(fmt)[:80]}', "tools")  # fmt: skip
    syntax, definition = spec["syntax"], spec["definition"]
    if not isinstance(syntax, str) or syntax not in SYNTAXES or not isinstance(definition, str):
        raise ApiError(400, f'{where}.grammar: expected "syntax" lark or regex and a "definition" string', "tools")
    option, compile_ = SYNTAXES[syntax]
    try:
        compile_(definition)
    except InputError as e:
        raise ApiError(400, f"{where}.grammar.definition: {str(e).partition(': ')[2]}", "tools") from None
    return ((option, definition),)


def _string_schema(fmt: tuple[tuple[str, str], ...]) -> dict:
    """A custom tool's input as a call's `arguments` in a JSON text of calls: a string, which a
    regex format holds whole."""
    if not fmt:
        return {"type": "string"}
    ((_, regex),) = fmt
    return {"type": "string", "pattern": f"^(?:{regex})$"}


def _for_template(listed: list[dict]) -> list[dict]:
    """The tools as a chat template reads them: a custom tool also as a `function` of its name and
    description, so that a template written for function tools lists it."""
    return [t if t["type"] == "function" else {**t, "function": {k: t["custom"][k] for k in ("name", "description")
                                                                 if k in t["custom"]}} for t in listed]  # fmt: skip


def _named_custom(choice: dict) -> str:
    spec = choice.get("custom")
    if set(choice) != {"type", "custom"} or not isinstance(spec, dict) or set(spec) != {"name"} or not isinstance(
            spec["name"], str):  # fmt: skip
        raise ApiError(400, f'tool_choice: expected {{"type": "custom", "custom": {{"name": ...}}}}, got '
                       f"{json.dumps(choice)[:60]}", "tool_choice")  # fmt: skip
    return spec["name"]


def _named(choice: Any) -> str:
    if isinstance(choice, str):
        raise ApiError(400, f'tool_choice: expected "auto", "none", "required" or {{"type": "function", "function": '
                       f'{{"name": ...}}}}, got {choice[:40]!r}', "tool_choice")  # fmt: skip
    ok = isinstance(choice, dict) and set(choice) == {"type", "function"} and choice["type"] == "function"
    spec = choice["function"] if ok else None
    if not (isinstance(spec, dict) and set(spec) == {"name"} and isinstance(spec["name"], str)):
        raise ApiError(400, f'tool_choice: expected {{"type": "function", "function": {{"name": ...}}}}, got '
                       f"{json.dumps(choice)[:60]}", "tool_choice")  # fmt: skip
    return spec["name"]


def calls_schema(functions: dict[str, dict], parallel: bool) -> dict:
    """The JSON schema of an answer calling `functions` (name -> parameters): {"tool_calls": [a
    call, ...]} (_call_schema)."""
    call, defs = _call_schema(functions)
    array = {"type": "array", "items": call, "minItems": 1, **({} if parallel else {"maxItems": 1})}
    schema = {"type": "object", "additionalProperties": False, "required": ["tool_calls"],
              "properties": {"tool_calls": array}}  # fmt: skip
    return schema | ({"$defs": defs} if defs else {})


def _call_schema(functions: dict[str, dict]) -> tuple[dict, dict]:
    """(the schema of one call of `functions`: {"name": one of them, "arguments": what its
    parameters admit}, the definitions its root must hold). Each function's `$defs` move to the
    root under "NAME." (their `$ref`s with them), so functions may name definitions alike; a
    parameters schema that refers to itself ("#") becomes the definition "NAME.#"."""
    calls, defs = [], {}
    for name, parameters in functions.items():
        roots: set[str] = set()
        moved = _moved_refs(parameters, f"{name}.", roots)
        for key in ("$defs", "definitions"):
            defs |= {f"{name}.{k}": v for k, v in moved.pop(key, {}).items()}
        if roots:  # the parameters refer to themselves
            defs[f"{name}.#"] = moved
        calls.append({"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
                      "properties": {"name": {"const": name}, "arguments": moved}})  # fmt: skip
    return (calls[0] if len(calls) == 1 else {"anyOf": calls}), defs


def _moved_refs(schema: Any, prefix: str, roots: set[str]) -> Any:
    """`schema` with its `$ref`s to "#/$defs/X" (or "#/definitions/X") pointing at
    "#/$defs/PREFIX X", and its definitions renamed alike; only where a schema is (not inside
    enum or const values). A `$ref` to the root ("#") points at "#/$defs/PREFIX #" and is noted in
    `roots`. compile_schema has checked the rest."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    ref = schema.get("$ref")
    if ref == "#":
        out["$ref"] = f"#/$defs/{prefix}#"
        roots.add(ref)
    elif isinstance(ref, str):
        for p in ("#/$defs/", "#/definitions/"):
            if ref.startswith(p):
                out["$ref"] = "#/$defs/" + prefix + ref[len(p) :]
    for key in ("properties", "$defs", "definitions"):
        if isinstance(schema.get(key), dict):
            out[key] = {k: _moved_refs(v, prefix, roots) for k, v in schema[key].items()}
    for key in ("items", "additionalProperties"):
        if key in schema:
            out[key] = _moved_refs(schema[key], prefix, roots)
    for key in ("anyOf", "oneOf", "allOf", "prefixItems"):
        if isinstance(schema.get(key), list):
            out[key] = [_moved_refs(s, prefix, roots) for s in schema[key]]
    return out


# ---------------------------------------------------------------------------- answers
WHITESPACE = " \t\r\n"


class CallReader:
    """Reads the calls out of an answer as its text comes (`feed`), for a stream's deltas and a
    whole answer alike: a call begins (OpenAI's `tool_calls` entry: a fresh id, its name) once its
    name's string closes, and its `arguments` grow as they are written, in the model's own
    spelling less the whitespace outside strings (numbers and escapes as written: re-serializing
    would turn 1e400 into `Infinity`, which is not JSON). `tags` None: an answer held to
    calls_schema; else free text with calls in the format `tags` mark (Tools.calls). A call of a
    custom tool (`customs`) is a custom entry whose `input` is its arguments' string, decoded."""

    def __init__(self, tags: CallTags | None = None, customs: frozenset[str] = frozenset()):
        self.customs = customs  # names whose calls are custom: their arguments a JSON string, read as its text
        self._begun: list[tuple[str, str]] = []  # (id, name) of each call begun, in order
        self._args: list[list[str]] = []  # each one's arguments as far as written
        self._read_at: dict[int, int] = {}  # a custom call's: how much of its arguments is decoded
        self._inputs: dict[int, list[str]] = {}  # ... and its input, in the pieces decoded
        self.closed = 0  # how many of them closed: an answer cut short leaves its last one open
        self._read: Any = self._answer() if tags is None else self._tagged(tags)
        next(self._read)

    def feed(self, text: str) -> list[dict]:
        """What `text` adds, as OpenAI streams it: a call's first entry with its index, id, type,
        name and the arguments (a custom call's input) so far; later ones with the index and more
        of them."""
        begun, written = len(self._begun), [len(a) for a in self._args]
        for ch in text:
            try:
                self._read.send(ch)
            except StopIteration:  # the answer's calls are over: what follows is not read
                break
        out: list[dict] = []
        for j, args in enumerate(self._args):
            if self._begun[j][1] in self.customs:  # its input as far as its string is written and decoded
                if j >= begun:
                    out.append({"index": j, **self._entry(j)})
                elif more := self._decode(j):
                    out.append({"index": j, "custom": {"input": more}})
            elif j >= begun:
                out.append({"index": j, **self._entry(j)})
            elif len(args) > written[j]:
                out.append({"index": j, "function": {"arguments": "".join(args[written[j] :])}})
        return out

    def begun(self) -> list[dict]:
        """Every call begun, as far as written (a stream has sent them so)."""
        return [self._entry(j) for j in range(len(self._begun))]

    def done(self) -> list[dict]:
        """The calls that closed, as a whole answer's message gives them."""
        return [self._entry(j) for j in range(self.closed)]

    def _decode(self, j: int) -> str:
        """What a custom call's input gained since last decoded: its JSON string from where it was
        last read to the last whole escape (each character read once)."""
        read = self._read_at.get(j, 1)  # 1: past the string's opening quote
        whole, more = _decoded("".join(self._args[j][read:]))
        self._read_at[j] = read + whole
        self._inputs.setdefault(j, []).append(more)
        return more

    def _entry(self, j: int) -> dict:
        call_id, name = self._begun[j]
        if name in self.customs:
            self._decode(j)
            return {"id": call_id, "type": "custom", "custom": {"name": name, "input": "".join(self._inputs[j])}}
        return {"id": call_id, "type": "function", "function": {"name": name, "arguments": "".join(self._args[j])}}

    def _answer(self) -> Generator[None, str, None]:
        """{"tool_calls": [call, ...]}: each call after the array opens."""
        while (yield) != "[":
            pass
        while True:
            ch = yield
            while ch in WHITESPACE or ch == ",":
                ch = yield
            if ch != "{":  # "]": no more calls
                return
            yield from self._call()

    def _tagged(self, tags: CallTags) -> Generator[None, str, None]:
        """Free text in which each start text opens a call, closed by the end text (whitespace may
        come before it: _past_end); the free text after it may open another."""
        while True:
            seen = ""
            while not seen.endswith(tags.start):
                seen = (seen + (yield))[-len(tags.start) :]
            ch = yield
            while ch in WHITESPACE:
                ch = yield
            if ch != "{":
                return
            yield from self._call()
            tail = ""
            while tags.end and not _past_end(tail, 0, tags.end):
                tail += yield

    def _call(self) -> Generator[None, str, None]:
        """One call's JSON after its "{": its name begins the entry, its arguments grow it."""
        j, argued, ch = None, False, (yield)
        while True:
            while ch in WHITESPACE or ch == ",":
                ch = yield
            if ch != '"':  # "}": the call closed
                self.closed += j is not None and argued
                return
            key = yield from _string(None)
            while (yield) != ":":
                pass
            ch = yield
            while ch in WHITESPACE:
                ch = yield
            if key == "name" and ch == '"' and j is None:
                j = self._begin(json.loads(f'"{(yield from _string(None))}"'))
                ch = yield
            else:
                argued |= key == "arguments" and j is not None
                ch = yield from _value(ch, self._args[j] if key == "arguments" and j is not None else None)

    def _begin(self, name: str) -> int:
        self._begun.append((f"call_{uuid.uuid4().hex[:24]}", name))
        self._args.append([])
        return len(self._begun) - 1


def _string(out: list[str] | None) -> Generator[None, str, str]:
    """A JSON string's text after its opening quote, as written (escapes kept), to its closing
    quote, which `out` (if any) gets too."""
    chars = []
    while (ch := (yield)) != '"':
        chars.append(ch)
        if ch == "\\":
            chars.append((yield))
    if out is not None:
        out.extend(chars)
        out.append('"')
    return "".join(chars)


def _value(ch: str, out: list[str] | None) -> Generator[None, str, str]:
    """A JSON value starting with `ch`, into `out` (if any) less the whitespace outside its
    strings; returns the character after it."""
    depth = 0
    while True:
        if ch == '"':
            if out is not None:
                out.append(ch)
            yield from _string(out)
        elif depth == 0 and (ch in WHITESPACE or ch in ",}]"):  # the end of a number or literal
            return ch
        elif ch not in WHITESPACE:
            depth += (ch in "{[") - (ch in "}]")
            if out is not None:
                out.append(ch)
        if depth == 0 and (ch == '"' or ch in "}]"):
            return (yield)
        ch = yield


def _decoded(body: str) -> tuple[int, str]:
    """(how much of `body` was read, its text) for the inside of a JSON string written as far as
    `body` (its closing quote, if there, ends it): escapes decoded, less one not yet whole and a
    high surrogate whose low half is still to come."""
    i = whole = 0
    while i < len(body) and body[i] != '"':
        step = 1 if body[i] != "\\" else 6 if body[i + 1 : i + 2] == "u" else 2
        if i + step > len(body):
            break
        i += step
        whole = i
    text = json.loads(f'"{body[:whole]}"') if whole else ""
    if text and "\ud800" <= text[-1] <= "\udbff":
        return whole - 6, text[:-1]
    return whole, text


def read_calls(text: str, customs: frozenset[str] = frozenset()) -> list[dict]:
    """The calls of an answer held to calls_schema (CallReader; `customs`: the custom tools'
    names). An answer cut short (by max_tokens or a stop string) gives the calls that closed
    before the cut."""
    reader = CallReader(customs=customs)
    reader.feed(text)
    return reader.done()


def read_tagged(text: str, tags: CallTags, customs: frozenset[str] = frozenset()) -> tuple[str, list[dict]]:
    """(the content, the calls) of free text with calls (Tools.calls): the content is the text
    before the first call's start; the calls, each start's JSON that closed (a cut answer's last
    one may not have)."""
    first = text.find(tags.start)
    if first < 0:
        return text, []
    reader = CallReader(tags, customs)
    reader.feed(text)
    return text[:first], reader.done()


def _past_end(text: str, pos: int, end: str) -> int:
    """Where free text starts again after a call's JSON ending at `pos`: past its end text and the
    whitespace before it (the end text's bytes may hold the start text's, and it may itself start
    with whitespace); `pos` while the end text is not all there."""
    p = pos
    while not text.startswith(end, p) and p < len(text) and text[p] in WHITESPACE:
        p += 1
    return p + len(end) if text.startswith(end, p) else pos


def call_message(m: dict, where: str) -> list[dict]:
    """An assistant message's `tool_calls` (a conversation passing back the calls it got) as a
    chat template reads them: Hugging Face's templates take `arguments` as an object, so
    arguments that are a JSON object's text are parsed (as vLLM passes them)."""
    calls = m.get("tool_calls")
    if not isinstance(calls, list):
        raise ApiError(400, f"{where}.tool_calls: expected a list of calls, got {json_kind(calls)}",
                       f"{where}.tool_calls")  # fmt: skip
    out = []
    for j, call in enumerate(calls):
        at = f"{where}.tool_calls[{j}]"
        if isinstance(call, dict) and call.get("type") == "custom":
            out.append(_custom_call(call, at, f"{where}.tool_calls"))
            continue
        spec = call.get("function") if isinstance(call, dict) else None
        if (not isinstance(spec, dict) or call.get("type", "function") != "function" or set(call) - {"id", "type",
                "function"} or set(spec) != {"name", "arguments"} or not isinstance(spec["name"], str)
                or not isinstance(spec["arguments"], str)):  # fmt: skip
            raise ApiError(400, f'{at}: expected {{"id": str, "type": "function", "function": {{"name": str, '
                           f'"arguments": str}}}}', f"{where}.tool_calls")  # fmt: skip
        get_field(call, "id", str, label=f"{at}.id")
        try:
            arguments = json.loads(spec["arguments"])
        except ValueError:
            arguments = spec["arguments"]
        if not isinstance(arguments, dict):
            arguments = spec["arguments"]
        out.append({"id": call.get("id"), "type": "function",
                    "function": {"name": spec["name"], "arguments": arguments}})  # fmt: skip
    return out


def _custom_call(call: dict, at: str, param: str) -> dict:
    """A custom tool's call passed back, as a chat template reads it: as given, and also as a
    `function` whose arguments are its input (for templates written for function calls)."""
    spec = call.get("custom")
    if set(call) - {"id", "type", "custom"} or not isinstance(spec, dict) or set(spec) != {"name", "input"} or not all(
            isinstance(v, str) for v in spec.values()):  # fmt: skip
        raise ApiError(400, f'{at}: expected {{"id": str, "type": "custom", "custom": {{"name": str, "input": str}}}}',
                       param)  # fmt: skip
    get_field(call, "id", str, label=f"{at}.id")
    return {"id": call.get("id"), "type": "custom", "custom": dict(spec),
            "function": {"name": spec["name"], "arguments": spec["input"]}}  # fmt: skip
