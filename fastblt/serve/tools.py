"""OpenAI's tool calling over chat completions: the request's `tools` go to the chat template,
and when the request asks for calls (`tool_choice` "required" or a named function) the answer is
held by the grammar (runtime/grammar.py) to one JSON text of calls, read back into the message's
`tool_calls`.

A model has no call format of its own that fastblt could look for in free text (no released BLT
checkpoint is tuned for tools), so fastblt does not guess whether a text is a call: `auto`, what
OpenAI assumes when tools come without a `tool_choice`, is refused by name. Asked for, calls are
written as

    {"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}, ...]}

keys in that order, `name` one of the tools' (the named one only, for a named choice), `arguments`
what that function's `parameters` schema admits (grammar.compile_schema's subset; none given: `{}`),
one call or more (one with `parallel_tool_calls: false` or a named choice). The template is where
a model is told this format; docs/serving.md shows one that does.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from fastblt.errors import InputError
from fastblt.runtime import grammar
from fastblt.serve.api import ApiError, get_field, json_kind

MAX_TOOLS = 128  # OpenAI's limit
NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for a function's name
FUNCTION_FIELDS = {"name", "description", "parameters", "strict"}
NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}  # OpenAI's reading of none


@dataclass(frozen=True)
class Tools:
    """A request's tools, as its chat template reads them, and what it asks of them: `schema` is
    the JSON schema (text) its answer is held to, None when it asks for no calls (tool_choice
    "none": the tools are still rendered, as OpenAI's model still sees them)."""

    listed: list[dict]
    schema: str | None = None
    named: bool = False  # a named choice: OpenAI's finish_reason is then "stop", not "tool_calls"


def parse_tools(body: dict) -> Tools | None:
    """`tools`, `tool_choice` and `parallel_tool_calls` checked; None when the request has no
    tools. Errors name the field (a function's parameters by their place in `tools`)."""
    listed, choice = body.get("tools"), body.get("tool_choice")
    parallel = get_field(body, "parallel_tool_calls", bool, default=True)
    if listed in (None, []):
        if choice not in (None, "none"):
            raise ApiError(400, f"tool_choice: {json.dumps(choice)[:60]} asks for a call, but the request has no "
                           "tools", "tool_choice")  # fmt: skip
        return None
    functions = _functions(listed)
    if choice is None or choice == "auto":
        raise ApiError(400, 'tool_choice: "auto" (OpenAI\'s default when tools are given) is not served: fastblt '
                       'does not guess whether free text is a call; send "required", {"type": "function", '
                       '"function": {"name": ...}} or "none"', "tool_choice")  # fmt: skip
    if choice == "none":
        return Tools(listed)
    if choice == "required":
        return Tools(listed, _checked(calls_schema(functions, parallel)))
    name = _named(choice)
    if name not in functions:
        raise ApiError(400, f"tool_choice: function {name!r} is not one of the tools ({', '.join(functions)})",
                       "tool_choice")  # fmt: skip
    return Tools(listed, _checked(calls_schema({name: functions[name]}, parallel=False)), named=True)


def _checked(schema: dict) -> str:
    """The calls' schema as JSON text, compiled once here (the engine finds it cached) so that
    what only the whole can exceed (the grammar's paths, OpenAI's size limits) names `tools`."""
    text = json.dumps(schema, ensure_ascii=False)
    try:
        grammar.compiled(text)
    except InputError as e:
        raise ApiError(400, str(e).replace("option schema", "tools: the calls' schema", 1), "tools") from None
    return text


def _functions(listed: Any) -> dict[str, dict]:
    """`tools` -> {name: parameters schema}, each checked as the grammar will hold it."""
    if not isinstance(listed, list):
        raise ApiError(400, f"tools: expected a list of tools, got {json_kind(listed)}", "tools")
    if len(listed) > MAX_TOOLS:
        raise ApiError(400, f"tools: at most {MAX_TOOLS} tools, got {len(listed)}", "tools")
    functions: dict[str, dict] = {}
    for i, tool in enumerate(listed):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function" or set(tool) != {"type", "function"}:
            raise ApiError(400, f'{where}: expected {{"type": "function", "function": {{...}}}}, got '
                           f"{json.dumps(tool)[:60]}", "tools")  # fmt: skip
        spec = tool["function"]
        if not isinstance(spec, dict) or set(spec) - FUNCTION_FIELDS:
            fields = ", ".join(sorted(FUNCTION_FIELDS))
            raise ApiError(400, f"{where}.function: expected an object of {fields}", "tools")
        name = get_field(spec, "name", str, required=True, label=f"{where}.function.name")
        if not NAME.fullmatch(name):
            raise ApiError(400, f"{where}.function.name: {name[:80]!r} is not 1 to 64 letters, digits, _ or -",
                           "tools")  # fmt: skip
        if name in functions:
            raise ApiError(400, f"{where}.function.name: {name!r} is named twice", "tools")
        get_field(spec, "description", str, label=f"{where}.function.description")
        get_field(spec, "strict", bool, label=f"{where}.function.strict")  # held strictly either way
        parameters = spec.get("parameters")
        parameters = NO_PARAMETERS if parameters is None else parameters
        try:
            grammar.compile_schema(parameters)
        except InputError as e:
            message = str(e).replace("option schema", f"{where}.function.parameters", 1)
            raise ApiError(400, message, "tools") from None
        functions[name] = parameters
    return functions


def _named(choice: Any) -> str:
    if isinstance(choice, str):
        raise ApiError(400, f'tool_choice: expected "none", "required" or {{"type": "function", "function": '
                       f'{{"name": ...}}}}, got {choice[:40]!r}', "tool_choice")  # fmt: skip
    ok = isinstance(choice, dict) and set(choice) == {"type", "function"} and choice["type"] == "function"
    spec = choice["function"] if ok else None
    if not (isinstance(spec, dict) and set(spec) == {"name"} and isinstance(spec["name"], str)):
        raise ApiError(400, f'tool_choice: expected {{"type": "function", "function": {{"name": ...}}}}, got '
                       f"{json.dumps(choice)[:60]}", "tool_choice")  # fmt: skip
    return spec["name"]


def calls_schema(functions: dict[str, dict], parallel: bool) -> dict:
    """The JSON schema of an answer calling `functions` (name -> parameters): {"tool_calls": [a
    call, ...]}, a call {"name": one of them, "arguments": what its parameters admit}. Each
    function's `$defs` move to the root under "NAME." (their `$ref`s with them), so functions
    may name definitions alike."""
    calls, defs = [], {}
    for name, parameters in functions.items():
        moved = _moved_refs(parameters, f"{name}.")
        for key in ("$defs", "definitions"):
            defs |= {f"{name}.{k}": v for k, v in moved.pop(key, {}).items()}
        calls.append({"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
                      "properties": {"name": {"const": name}, "arguments": moved}})  # fmt: skip
    items = calls[0] if len(calls) == 1 else {"anyOf": calls}
    array = {"type": "array", "items": items, "minItems": 1, **({} if parallel else {"maxItems": 1})}
    schema = {"type": "object", "additionalProperties": False, "required": ["tool_calls"],
              "properties": {"tool_calls": array}}  # fmt: skip
    return schema | ({"$defs": defs} if defs else {})


def _moved_refs(schema: Any, prefix: str) -> Any:
    """`schema` with its `$ref`s to "#/$defs/X" (or "#/definitions/X") pointing at
    "#/$defs/PREFIX X", and its definitions renamed alike; only where a schema is (not inside
    enum or const values). compile_schema has checked the rest."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    ref = schema.get("$ref")
    if isinstance(ref, str):
        for p in ("#/$defs/", "#/definitions/"):
            if ref.startswith(p):
                out["$ref"] = "#/$defs/" + prefix + ref[len(p) :]
    for key in ("properties", "$defs", "definitions"):
        if isinstance(schema.get(key), dict):
            out[key] = {k: _moved_refs(v, prefix) for k, v in schema[key].items()}
    if "items" in schema:
        out["items"] = _moved_refs(schema["items"], prefix)
    if isinstance(schema.get("anyOf"), list):
        out["anyOf"] = [_moved_refs(s, prefix) for s in schema["anyOf"]]
    return out


# ---------------------------------------------------------------------------- answers
def read_calls(text: str) -> list[dict]:
    """The calls of an answer held to calls_schema: OpenAI's `tool_calls` entries (a fresh id
    each; arguments as compact JSON text). An answer cut short (by max_tokens or a stop string)
    gives the calls that closed before the cut."""
    start = text.find("[")
    if start < 0:
        return []
    decoder, pos, calls = json.JSONDecoder(), start + 1, []
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        try:
            call, pos = decoder.raw_decode(text, pos)
        except ValueError:
            return calls
        arguments = json.dumps(call["arguments"], ensure_ascii=False, separators=(",", ":"))
        calls.append({"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                      "function": {"name": call["name"], "arguments": arguments}})  # fmt: skip


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
