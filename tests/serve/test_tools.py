"""Tool calling in chat completions: `tools` rendered by the chat template, calls asked for with
tool_choice "required" or a named function held by the grammar to the calls' schema and read
back into `tool_calls` (equal to the Generator's text under that schema), conversations passing
calls and their results back; every malformed tool, choice and message a 400 naming its field."""

from __future__ import annotations

import json
import re

import httpx
import jsonschema
import openai
import pydantic
import pytest
from conftest import CHAT_STOP, CHAT_TEMPLATE, KEY
from hypothesis import given, settings
from hypothesis import strategies as st

from fastblt.model.config import EOS_ID
from fastblt.runtime import grammar
from fastblt.serve.api import ApiError
from fastblt.serve.chat import ChatTemplate, TaggedShape, parse_chat_body
from fastblt.serve.process import ServerProcess
from fastblt.serve.tools import CallReader, CallTags, calls_schema, read_calls, read_tagged

MODEL = "fastblt-default"
TEMPLATE = ChatTemplate(CHAT_TEMPLATE, stops=(CHAT_STOP,))
MESSAGES = [{"role": "user", "content": "the weather in Paris, in celsius"}]
WEATHER = {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
           "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}}}  # fmt: skip
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "now, in a city", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time"}},
]
PARAMETERS = {"get_weather": WEATHER, "get_time": {"type": "object", "properties": {}, "additionalProperties": False}}


def parse(**fields):
    body = {"model": MODEL, "messages": MESSAGES, "tools": TOOLS, "tool_choice": "required", **fields}
    return parse_chat_body(json.dumps(body).encode(), MODEL, "blt-s", TEMPLATE)


def accepts(schema: dict, text: str) -> bool:
    """Whether the grammar of `schema` takes `text` to its end (closed)."""
    state = grammar.advance(grammar.begin(grammar.compile_schema(schema)), [b + 4 for b in text.encode()])
    return state is not None and grammar.mask(state)[EOS_ID] == 0  # EOS allowed: the text closed


# ---------------------------------------------------------------------------- no server
def test_asked_for_calls_hold_the_answer_to_the_calls_schema():
    comp = parse()
    assert comp.options["format"] == "json" and json.loads(comp.options["schema"]) == calls_schema(PARAMETERS, True)
    assert comp.prompts == ["# tools: get_weather, get_time\n>>> the weather in Paris, in celsius\n"]
    schema = calls_schema(PARAMETERS, True)
    good = '{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}, ' \
           '{"name": "get_time", "arguments": {}}]}'  # fmt: skip
    assert accepts(schema, good)
    for bad in ('{"tool_calls": []}', '{"tool_calls": [{"name": "get_weather", "arguments": {}}]}',
                '{"tool_calls": [{"name": "get_time", "arguments": {"city": "Paris", "unit": "c"}}]}',
                '{"tool_calls": [{"name": "get_weathe", "arguments": {}}]}',
                '{"tool_calls": [{"arguments": {}, "name": "get_time"}]}'):  # fmt: skip
        assert not accepts(schema, bad), bad
    one = json.loads(parse(parallel_tool_calls=False).options["schema"])
    assert accepts(one, '{"tool_calls": [{"name": "get_time", "arguments": {}}]}')
    assert not accepts(one, '{"tool_calls": [{"name": "get_time", "arguments": {}}, {"name": "get_time", '
                            '"arguments": {}}]}')  # fmt: skip
    named = json.loads(parse(tool_choice={"type": "function", "function": {"name": "get_time"}}).options["schema"])
    assert accepts(named, '{"tool_calls": [{"name": "get_time", "arguments": {}}]}')
    assert not accepts(named, '{"tool_calls": [{"name": "get_weather", "arguments": {"city": "a", "unit": "f"}}]}')
    none = parse(tool_choice="none")  # the tools are shown, the answer is text
    assert "schema" not in none.options and none.prompts == comp.prompts and type(none.shape).__name__ == "ChatShape"


def test_functions_may_name_their_definitions_alike():
    """Each function's $defs move to the root under its name, its $refs with them."""
    unit = {"$defs": {"Unit": {"enum": ["c", "f"]}}, "type": "object", "additionalProperties": False,
            "required": ["u"], "properties": {"u": {"$ref": "#/$defs/Unit"}}}  # fmt: skip
    speed = {"definitions": {"Unit": {"enum": ["kmh", "mph"]}}, "type": "object", "additionalProperties": False,
             "required": ["u"], "properties": {"u": {"$ref": "#/definitions/Unit"}}}  # fmt: skip
    unit_ref = {"$ref": "#/$defs/Unit"}
    inside = {"$defs": {"Unit": {"enum": ["k"]}}, "type": "object", "additionalProperties": False,
              "required": ["m", "t", "w"], "properties": {"m": {"type": "object", "additionalProperties": unit_ref},
                                                          "t": {"type": "array", "prefixItems": [unit_ref]},
                                                          "w": {"allOf": [unit_ref], "title": "W"}}}  # fmt: skip
    schema = calls_schema({"temp": unit, "wind": speed, "map": inside}, True)
    assert sorted(schema["$defs"]) == ["map.Unit", "temp.Unit", "wind.Unit"]
    assert accepts(schema, '{"tool_calls":[{"name":"map","arguments":{"m":{"a":"k"},"t":["k"],"w":"k"}}]}')
    assert not accepts(schema, '{"tool_calls":[{"name":"map","arguments":{"m":{"a":"c"},"t":["k"],"w":"k"}}]}')
    assert accepts(
        schema, '{"tool_calls":[{"name":"temp","arguments":{"u":"c"}},{"name":"wind","arguments":{"u":"mph"}}]}'
    )
    assert not accepts(schema, '{"tool_calls":[{"name":"temp","arguments":{"u":"mph"}}]}')
    assert not accepts(schema, '{"tool_calls":[{"name":"wind","arguments":{"u":"c"}}]}')


def test_a_function_whose_parameters_refer_to_themselves_is_called_with_nested_arguments():
    """Recursive parameters ("#": the parameters themselves) become a definition of the calls'
    schema, in the JSON answer and in the model's own format alike."""
    tree = {"type": "object", "additionalProperties": False, "required": ["name", "kids"],
            "properties": {"name": {"type": "string"}, "kids": {"type": "array", "items": {"$ref": "#"}}}}  # fmt: skip
    tools = [{"type": "function", "function": {"name": "plant", "parameters": tree}}, TOOLS[1]]
    arguments = {"name": "a", "kids": [{"name": "b", "kids": [{"name": "c", "kids": []}]}]}
    call = {"name": "plant", "arguments": arguments}
    assert accepts(json.loads(parse(tools=tools).options["schema"]), json.dumps({"tool_calls": [call]}))
    assert not accepts(json.loads(parse(tools=tools).options["schema"]), json.dumps(
        {"tool_calls": [{"name": "plant", "arguments": {"name": "a", "kids": [{"name": "b"}]}}]}))  # fmt: skip
    body = {"model": MODEL, "messages": MESSAGES, "tools": tools, "tool_choice": "required"}
    root = grammar.tagged(parse_chat_body(json.dumps(body).encode(), MODEL, "blt-s", TAGGED).options["calls"])
    state = grammar.advance(grammar.begin(root), [b + 4 for b in f"> {json.dumps(call)}</call>".encode()])
    assert state is not None and grammar.done(state)
    (read,) = read_calls(json.dumps({"tool_calls": [call]}))
    assert json.loads(read["function"]["arguments"]) == arguments


def test_calls_are_read_back_as_openais_and_a_cut_answer_gives_those_that_closed():
    text = '{"tool_calls": [ {"name": "get_weather", "arguments": {"city": "Paris",  "unit": "c"}},\n {"name": "get_t'
    (call,) = read_calls(text)
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"] == {"name": "get_weather", "arguments": '{"city":"Paris","unit":"c"}'}
    calls = read_calls('{"tool_calls":[{"name":"get_time","arguments":{}},{"name":"get_time","arguments":{}}]}')
    assert [c["function"]["name"] for c in calls] == ["get_time"] * 2 and calls[0]["id"] != calls[1]["id"]
    assert read_calls('{"tool_ca') == [] == read_calls('{"tool_calls": [{"name": "get_weather", "argu')


leaves = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text()
arguments = st.dictionaries(st.text(), st.recursive(leaves, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
    st.text(), inner, max_size=3), max_leaves=8), max_size=4)  # fmt: skip
STYLES = [{}, {"indent": 1}, {"ensure_ascii": False}, {"separators": (",", ":")}, {"indent": "\t"}]


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["f", "get-x_1"]), arguments), min_size=1, max_size=3),
       st.sampled_from(STYLES), st.integers(1, 40), st.booleans())  # fmt: skip
def test_streamed_calls_put_together_are_the_whole_answers_in_the_models_spelling(calls, style, size, tagged):
    """Fed in chunks of any size, a reader's entries put together (as a client does) are the
    calls read from the whole text; each call's arguments are the model's JSON text, less the
    whitespace outside strings (the same value, its spelling kept)."""
    objects = [{"name": name, "arguments": args} for name, args in calls]
    if tagged:
        tags = CallTags("<tool_call>", "</tool_call>")
        text = "Sure.\n" + "".join(f"<tool_call>\n{json.dumps(o, **style)}\n</tool_call> and " for o in objects)
        whole = read_tagged(text, tags)[1]
    else:
        tags, text = None, json.dumps({"tool_calls": objects}, **style)
        whole = read_calls(text)
    reader = CallReader(tags)
    entries = [e for i in range(0, len(text), size) for e in reader.feed(text[i : i + size])]
    assert streamed_calls(entries) == [c["function"] for c in whole] and reader.closed == len(objects)
    assert [c["id"] for c in whole] != [c["id"] for c in reader.done()]  # fresh ids per reading
    for c, o in zip(whole, objects, strict=True):
        assert c["function"]["name"] == o["name"] and json.loads(c["function"]["arguments"]) == o["arguments"]
        spelled = json.dumps(o["arguments"], **style)  # without its whitespace outside strings
        assert c["function"]["arguments"] == json.dumps(json.loads(spelled), separators=(",", ":"),
                                                        ensure_ascii=style.get("ensure_ascii", True))  # fmt: skip


def test_arguments_keep_the_models_numbers_and_escapes():
    """A number past float's range stays JSON (re-serialized it would be Infinity); escapes and
    digits stay as written."""
    text = '{"tool_calls": [{"name": "f", "arguments": {"x": 1e400, "y": 1.50, "s": "\\u00e9\\/ \\" }"}}]}'
    (call,) = read_calls(text)
    args = call["function"]["arguments"]
    assert args == '{"x":1e400,"y":1.50,"s":"\\u00e9\\/ \\" }"}'

    def refuse(name: str):
        raise ValueError(name)

    assert json.loads(args, parse_constant=refuse)["s"] == 'é/ " }'  # strict JSON: no Infinity


def test_a_conversation_passes_calls_and_their_results_back():
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    messages = [*MESSAGES, {"role": "assistant", "content": None, "tool_calls": [call], "refusal": None},
                {"role": "tool", "tool_call_id": "call_1", "content": "21"}]  # fmt: skip
    (prompt,) = parse(messages=messages, tool_choice="none").prompts
    assert prompt.endswith(
        '{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]}\n# call_1 -> 21\n'
    )
    odd = {**call, "function": {"name": "f", "arguments": "not json"}}  # passed on as the client wrote it
    (prompt,) = parse(messages=[*MESSAGES, {"role": "assistant", "tool_calls": [odd]}], tool_choice="none").prompts
    assert '"arguments": "not json"' in prompt


@pytest.mark.parametrize(
    "fields, param, says",
    [
        ({"tool_choice": None}, "tool_choice", '"auto"'),
        ({"tool_choice": "auto"}, "tool_choice", '"auto"'),
        ({"tool_choice": "always"}, "tool_choice", "expected"),
        ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "not one of the tools"),
        ({"tool_choice": {"type": "function", "name": "get_time"}}, "tool_choice", "expected"),
        ({"tools": None}, "tool_choice", "no tools"),
        ({"tools": {"get_time": {}}}, "tools", "expected a list"),
        ({"tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools", "tools[0].function.name"),
        ({"tools": [{"type": "function", "function": {}}]}, "tools[0].function.name", "required"),
        ({"tools": [TOOLS[1], TOOLS[1]]}, "tools", "named twice"),
        ({"tools": [{"type": "retrieval"}]}, "tools", "tools[0]"),
        ({"tools": [{"type": "function", "function": {"name": "f", "returns": {}}}]}, "tools", "tools[0].function"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]}, "tools",
         "tools[0].function.parameters: the root must be an object"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
            "type": "object", "properties": {"a": {"type": "array", "contains": {}}}}}}]}, "tools",
         "tools[0].function.parameters.properties.a.contains: not supported"),
        ({"tools": [{"type": "function", "function": {"name": f"f{i}"}} for i in range(129)]}, "tools", "at most 128"),
        ({"parallel_tool_calls": "yes"}, "parallel_tool_calls", "boolean"),
        ({"response_format": {"type": "json_object"}}, "response_format", "tool calls"),
        ({"messages": [{"role": "tool", "content": "1"}]}, "messages[0].tool_call_id", "required"),
        ({"messages": [{"role": "user", "content": "x", "tool_call_id": "1"}]}, "messages[0].tool_call_id", "tool"),
        ({"messages": [{"role": "user", "content": "x", "tool_calls": [{"id": "1"}]}]}, "messages[0].tool_calls",
         "assistant"),
        ({"messages": [{"role": "assistant", "tool_calls": [{"id": "1"}]}]}, "messages[0].tool_calls", "expected"),
        ({"messages": [{"role": "assistant", "tool_calls": "f()"}]}, "messages[0].tool_calls", "expected a list"),
        ({"messages": [{"role": "assistant", "tool_calls": [{"type": "function", "function": {
            "name": "f", "arguments": {"a": 1}}}]}]}, "messages[0].tool_calls", "expected"),
        ({"messages": [{"role": "function", "content": "1", "name": "f"}]}, "messages[0].role", "not one of"),
        ({"functions": [{"name": "f"}]}, "functions", "supports only"),
    ],
)  # fmt: skip
def test_tools_choices_and_messages_are_checked_by_field(fields, param, says):
    with pytest.raises(ApiError) as e:
        parse(**fields)
    assert e.value.status == 400 and e.value.param == param and says in e.value.message, e.value.message


# ---------------------------------------------------------------------------- a server
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=120)


def streamed_calls(entries: list) -> list[dict]:
    """The calls a client puts together from a stream's `tool_calls` entries (OpenAI's way: a
    call's first entry has its index, id, type and name, later ones more of its arguments)."""
    calls: list[dict] = []
    for t in entries:
        t = t if isinstance(t, dict) else t.model_dump(exclude_none=True)
        if t["index"] == len(calls):  # a call begins
            assert t["id"].startswith("call_") and t["type"] == "function" and t["function"]["name"]
            calls.append({"name": t["function"]["name"], "arguments": t["function"]["arguments"]})
        else:
            assert t["index"] == len(calls) - 1 and set(t) == {"index", "function"} and set(t["function"]) == {
                "arguments"}  # fmt: skip
            calls[-1]["arguments"] += t["function"]["arguments"]
    return calls


def reference_calls(reference, prompt: str, schema: dict, **opts) -> tuple[list[dict], str]:
    gen = reference.generate(prompt, format="json", schema=schema, stop=[CHAT_STOP], **opts)
    return [c["function"] for c in read_calls(gen.text)], gen.stop_reason


@pytest.mark.parametrize("mode", ("ar", "blt-s"))
def test_required_calls_equal_the_generators_answer_under_their_schema(server, reference, mode):
    """tool_choice "required": the calls are the Generator's text under the calls' schema read
    back, streamed or not; closed ones name a tool and their arguments validate."""
    c, prompt = client(server), TEMPLATE.render(MESSAGES, TOOLS)
    closed = 0
    for seed in (1, 2):  # the default writes runs of spaces between tokens: room for them
        opts = dict(mode=mode, max_bytes=300, temperature=0.8, seed=seed)
        want, stop_reason = reference_calls(reference, prompt, calls_schema(PARAMETERS, True), **opts)
        ask = dict(model=MODEL, messages=MESSAGES, tools=TOOLS, tool_choice="required", max_tokens=300,
                   temperature=0.8, seed=seed, extra_body={"mode": mode})  # fmt: skip
        r = c.chat.completions.create(**ask)
        (ch,) = r.choices
        got = [{"name": t.function.name, "arguments": t.function.arguments} for t in ch.message.tool_calls or []]
        assert got == want and ch.message.content is None
        assert ch.finish_reason == ("length" if stop_reason == "max_bytes" else "tool_calls")
        for t in got:
            jsonschema.validate(json.loads(t["arguments"]), PARAMETERS[t["name"]])
        closed += ch.finish_reason == "tool_calls"

        before = calls_counted(server, mode)
        chunks = list(c.chat.completions.create(stream=True, **ask))
        deltas = [x.choices[0].delta for x in chunks]
        assert deltas[0].role == "assistant" and not any(d.content for d in deltas)
        streamed = streamed_calls([t for d in deltas for t in d.tool_calls or []])
        assert streamed[: len(want)] == want and len(deltas) > len(want) + 2  # the calls come as they are written
        assert len(streamed) == len(want) + (ch.finish_reason == "length" and len(streamed) > len(want))
        assert calls_counted(server, mode) - before == len(want)  # streamed calls are counted as they close
        assert [x.choices[0].finish_reason for x in chunks][-1] == ch.finish_reason
    assert closed >= 1


class Weather(pydantic.BaseModel):
    city: str
    unit: str


def test_a_named_function_is_called_and_the_client_parses_its_arguments(server, reference):
    """A named tool_choice: one call of that function, finish_reason "stop" (OpenAI's); the
    client's parse reads a strict Pydantic tool's arguments back into the model."""
    c, tool = client(server), openai.pydantic_function_tool(Weather, name="get_weather")
    choice = {"type": "function", "function": {"name": "get_weather"}}
    prompt = TEMPLATE.render(MESSAGES, [tool])
    parsed = 0
    for seed in range(2):
        try:
            r = c.chat.completions.parse(model=MODEL, messages=MESSAGES, tools=[tool], tool_choice=choice,
                                         max_tokens=300, temperature=0.8, seed=seed)  # fmt: skip
        except openai.LengthFinishReasonError as e:
            r = e.completion
        parameters = tool["function"]["parameters"]
        want, _ = reference_calls(reference, prompt, calls_schema({"get_weather": parameters}, False),
                                  mode="blt-s", max_bytes=300, temperature=0.8, seed=seed)  # fmt: skip
        calls = r.choices[0].message.tool_calls or []
        assert [{"name": t.function.name, "arguments": t.function.arguments} for t in calls] == want
        if r.choices[0].finish_reason == "stop":
            parsed += 1
            assert calls[0].function.parsed_arguments == Weather.model_validate_json(calls[0].function.arguments)
            with c.chat.completions.stream(model=MODEL, messages=MESSAGES, tools=[tool], tool_choice=choice,
                                           max_tokens=300, temperature=0.8, seed=seed) as stream:  # fmt: skip
                pieces = [e.arguments_delta for e in stream if e.type == "tool_calls.function.arguments.delta"]
                (call,) = stream.get_final_completion().choices[0].message.tool_calls
            assert len(pieces) > 2 and "".join(pieces) == call.function.arguments  # the client saw them come
            assert call.function.parsed_arguments == calls[0].function.parsed_arguments
    assert parsed >= 1


def calls_counted(server, mode: str = "blt-s") -> float:
    """fastblt_tool_calls_total{mode=...} on the server's /metrics (0 before the first)."""
    text = httpx.get(f"{server.url}/metrics").text
    m = re.search(rf'^fastblt_tool_calls_total\{{mode="{mode}"\}} (\S+)$', text, re.M)
    return 0.0 if m is None else float(m.group(1))


def test_a_conversation_with_a_calls_result_is_answered(server):
    c, before = client(server), calls_counted(server)
    r = c.chat.completions.create(model=MODEL, messages=MESSAGES, tools=TOOLS, tool_choice="required", max_tokens=300,
                                  temperature=0)  # fmt: skip
    message = r.choices[0].message
    assert calls_counted(server) - before == len(message.tool_calls) >= 1  # /metrics counts them
    results = [{"role": "tool", "tool_call_id": t.id, "content": "21"} for t in message.tool_calls]
    messages = [*MESSAGES, message.model_dump(exclude_none=True), *results]
    r2 = c.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, tool_choice="none", max_tokens=16,
                                   temperature=0)  # fmt: skip
    assert r2.choices[0].message.content is not None and not r2.choices[0].message.tool_calls
    (want,) = parse(messages=messages, tool_choice="none").prompts  # the calls and results, as the template shows them
    assert r2.usage.prompt_tokens == len(want.encode()) and want.count(" -> 21\n") == len(results) >= 1
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model=MODEL, messages=MESSAGES, tools=TOOLS, max_tokens=8)  # "auto": no call tags
    assert e.value.body["param"] == "tool_choice"
    with pytest.raises(openai.BadRequestError) as e:  # the engine's refusal of a JSON answer in blt-d names the choice
        c.chat.completions.create(model=MODEL, messages=MESSAGES, tools=TOOLS, tool_choice="required", max_tokens=8,
                                  extra_body={"mode": "blt-d"})  # fmt: skip
    assert e.value.body["param"] == "tool_choice" and "blt-d" in e.value.body["message"]


# ---------------------------------------------------------------------------- tool_choice "auto"
TAGS = CallTags(">", "</call>")  # the default writes ">" early in its answers here: its calls start there
TAGGED = ChatTemplate(CHAT_TEMPLATE, stops=(CHAT_STOP,), tags=TAGS)


def test_auto_holds_free_text_with_calls_to_their_format():
    """With the template's call tags, "auto" (and no tool_choice) asks for free text in which the
    start text opens a call of one of the tools; parallel_tool_calls false allows one."""
    body = {"model": MODEL, "messages": MESSAGES, "tools": TOOLS}
    comp = parse_chat_body(json.dumps(body).encode(), MODEL, "blt-s", TAGGED)
    spec = json.loads(comp.options["calls"])
    assert "format" not in comp.options and (spec["start"], spec["end"], spec["most"], spec["lead"]) == (
        ">", "</call>", None, False)  # fmt: skip
    root = grammar.tagged(comp.options["calls"])
    text = b'so > {"name": "get_time", "arguments": {}}</call> and '
    text += b'>{"name":"get_weather","arguments":{"city":"a","unit":"f"}}'
    assert grammar.advance(grammar.begin(root), [b + 4 for b in text]) is not None
    one = parse_chat_body(json.dumps({**body, "tool_choice": "auto", "parallel_tool_calls": False}).encode(), MODEL,
                          "blt-s", TAGGED)  # fmt: skip
    assert json.loads(one.options["calls"])["most"] == 1
    with pytest.raises(ApiError) as e:  # a template without tags: no "auto"
        parse(tool_choice="auto")
    assert e.value.param == "tool_choice" and "--tool-call-start" in e.value.message


@pytest.mark.parametrize(
    "choice, most, lead, names",
    [
        ("required", None, True, ["get_weather", "get_time"]),
        ({"type": "function", "function": {"name": "get_time"}}, 1, True, ["get_time"]),
        ("none", 0, False, ["get_weather", "get_time"]),
    ],
)
def test_with_call_tags_every_choice_is_held_to_the_models_own_format(choice, most, lead, names):
    """With the template's call tags, a call asked for leads the text in that format (not the JSON
    answer of a template without them), and "none" keeps the start text out."""
    body = {"model": MODEL, "messages": MESSAGES, "tools": TOOLS, "tool_choice": choice}
    comp = parse_chat_body(json.dumps(body).encode(), MODEL, "blt-s", TAGGED)
    spec = json.loads(comp.options["calls"])
    assert "schema" not in comp.options and (spec["most"], spec["lead"]) == (most, lead)
    root = grammar.tagged(comp.options["calls"])
    for name in ("get_weather", "get_time"):
        call = json.dumps({"name": name, "arguments": {"city": "a", "unit": "c"} if name == "get_weather" else {}})
        state = grammar.advance(grammar.begin(root), [b + 4 for b in f"> {call}</call>".encode()])
        assert (state is not None and grammar.done(state)) == (name in names and most != 0), (choice, name)
    assert (grammar.advance(grammar.begin(root), [b + 4 for b in b"free text"]) is None) == lead
    fmt = {"type": "json_object"}
    if choice == "none":  # a JSON answer with the tools shown: JSON mode holds it, no call can come
        comp = parse_chat_body(json.dumps({**body, "response_format": fmt}).encode(), MODEL, "blt-s", TAGGED)
        assert comp.options["format"] == "json" and "calls" not in comp.options
    else:
        with pytest.raises(ApiError, match="cannot be combined with tool calls"):
            parse_chat_body(json.dumps({**body, "response_format": fmt}).encode(), MODEL, "blt-s", TAGGED)


def test_free_text_with_calls_is_read_into_content_and_calls_and_streamed_without_a_starts_bytes():
    text = 'I will check. <<call> {"name": "f", "arguments": {"a": 1}} <call>{"name": "h", "arguments": {}} then '
    text += '<call>{"name": "g", "arguments": {}'
    tags = CallTags("<call>", " <call>")  # an end text that holds the start text: free text follows it
    content, calls = read_tagged(text, tags)
    assert content == "I will check. <" and [c["function"] for c in calls] == [{"name": "f", "arguments": '{"a":1}'}]
    assert read_tagged("no calls < here <ca", tags) == ("no calls < here <ca", [])
    for size in (1, 2, 3, 7, 200):  # chunked at every size: what could be a start is held back
        shape = TaggedShape(tags)
        chunks = [text[i : i + size] for i in range(0, len(text), size)] + [""]
        deltas = [shape.delta(c, None if i < len(chunks) - 1 else "stop", 0, None, i == 0)
                  for i, c in enumerate(chunks)]  # fmt: skip
        sent = "".join(d["delta"].get("content", "") for d in deltas)
        assert sent == content and deltas[0]["delta"]["role"] == "assistant"
        assert [d["finish_reason"] for d in deltas][-1] == "tool_calls"
        entries = [t for d in deltas for t in d["delta"].get("tool_calls", [])]
        assert streamed_calls(entries) == [c["function"] for c in calls] + [{"name": "g", "arguments": "{}"}]
        plain = TaggedShape(tags)  # a text without calls: all of it, the held-back tail at the end
        ds = [plain.delta(c, None, 0, None, False) for c in ("a <", "ca")] + [plain.delta("", "length", 0, None, False)]
        assert "".join(d["delta"].get("content", "") for d in ds) == "a <ca" and ds[-1]["finish_reason"] == "length"
    whole = TaggedShape(tags).choice(text, "stop", 0, None)
    assert whole["message"]["content"] == content and whole["finish_reason"] == "tool_calls"
    assert TaggedShape(tags).choice("<call>", "length", 0, None)["message"]["content"] == ""


@pytest.fixture(scope="module")
def tagged_server(chat_template):
    args = ["--max-batch", "4", "--lanes", "1", "--api-key", KEY, "--chat-template", str(chat_template), "--chat-stop",
            CHAT_STOP, "--tool-call-start", TAGS.start, "--tool-call-end", TAGS.end]  # fmt: skip
    with ServerProcess(args) as srv:
        yield srv


def test_auto_answers_are_the_generators_free_text_with_calls(tagged_server, reference):
    """A server with call tags: "auto" answers (streamed or not) are the Generator's text under
    the calls' grammar, read into content and calls; a call's arguments validate."""
    c, prompt = client(tagged_server), TEMPLATE.render(MESSAGES, TOOLS)
    body = {"model": MODEL, "messages": MESSAGES, "tools": TOOLS}
    spec = parse_chat_body(json.dumps(body).encode(), MODEL, "blt-s", TAGGED).options["calls"]  # what "auto" asks for
    required = json.loads(parse_chat_body(json.dumps({**body, "tool_choice": "required"}).encode(), MODEL, "blt-s",
                                          TAGGED).options["calls"])  # fmt: skip
    gen = reference.generate(prompt, mode="blt-s", max_bytes=300, calls=json.dumps(required), stop=[CHAT_STOP],
                             temperature=0)  # fmt: skip
    (ch,) = c.chat.completions.create(model=MODEL, messages=MESSAGES, tools=TOOLS, tool_choice="required",
                                      max_tokens=300, temperature=0).choices  # fmt: skip
    assert gen.text.startswith(">") and ch.message.content is None  # the call leads, in the model's format
    assert [t.function.model_dump() for t in ch.message.tool_calls] == [x["function"] for x in read_tagged(
        gen.text, TAGS)[1]]  # fmt: skip
    seen = set()
    for seed in (None, 0, 2):
        sampling = {"temperature": 0} if seed is None else {"temperature": 0.8, "seed": seed}
        gen = reference.generate(prompt, mode="blt-s", max_bytes=300, calls=spec, stop=[CHAT_STOP], **sampling)
        content, calls = read_tagged(gen.text, TAGS)
        ask = dict(model=MODEL, messages=MESSAGES, tools=TOOLS, max_tokens=300, **sampling)
        (ch,) = c.chat.completions.create(**ask).choices
        got = [t.function.model_dump() for t in ch.message.tool_calls or []]
        assert got == [x["function"] for x in calls] and ch.message.content == (
            content if content or not calls else None
        )
        assert ch.finish_reason == ("tool_calls" if calls and gen.stop_reason != "max_bytes" else
                                    "length" if gen.stop_reason == "max_bytes" else "stop")  # fmt: skip
        for t in got:
            jsonschema.validate(json.loads(t["arguments"]), PARAMETERS[t["name"]])
        chunks = list(c.chat.completions.create(stream=True, **ask))
        assert "".join(x.choices[0].delta.content or "" for x in chunks) == content
        streamed = streamed_calls([t for x in chunks for t in x.choices[0].delta.tool_calls or []])
        assert streamed[: len(got)] == got and chunks[-1].choices[0].finish_reason == ch.finish_reason
        assert len(streamed) == len(got) + (ch.finish_reason == "length" and len(streamed) > len(got))
        seen.add((bool(content), bool(calls)))
    assert (False, True) in seen and (True, True) in seen  # a call at once, and text before one


# ---------------------------------------------------------------------------- custom tools
CALL_GRAMMAR = 'start: NAME "(" [NAME (", " NAME)*] ")"\nNAME: /[a-z_]+/'
CUSTOM = {"type": "custom", "custom": {"name": "run", "description": "a call, in Python", "format": {
    "type": "grammar", "grammar": {"syntax": "lark", "definition": CALL_GRAMMAR}}}}  # fmt: skip
RUN = {"type": "custom", "custom": {"name": "run"}}


def test_a_named_custom_tool_holds_the_answer_to_its_grammar_and_is_listed_for_the_template():
    comp = parse(tools=[*TOOLS, CUSTOM], tool_choice=RUN)
    assert comp.options["grammar"] == CALL_GRAMMAR and "schema" not in comp.options and "pattern" not in comp.options
    assert comp.prompts == ["# tools: get_weather, get_time, run\n>>> the weather in Paris, in celsius\n"]
    regex = {"type": "custom", "custom": {"name": "run", "format": {"type": "grammar", "grammar": {
        "syntax": "regex", "definition": "[a-z]+\\(\\)"}}}}  # fmt: skip
    assert parse(tools=[regex], tool_choice=RUN).options["pattern"] == "[a-z]+\\(\\)"
    free = parse(tools=[{"type": "custom", "custom": {"name": "run"}}], tool_choice=RUN)  # text: no grammar on it
    assert not {"grammar", "pattern", "format"} & set(free.options) and type(free.shape).__name__ == "CustomShape"
    assert parse(tools=[*TOOLS, CUSTOM], tool_choice={"type": "function", "function": {"name": "get_time"}}).options[
        "schema"]  # a function may still be named beside a custom tool  # fmt: skip
    call = {"id": "call_1", "type": "custom", "custom": {"name": "run", "input": "main()"}}
    messages = [*MESSAGES, {"role": "assistant", "tool_calls": [call]}, {"role": "tool", "tool_call_id": "call_1",
                                                                         "content": "0"}]  # fmt: skip
    (prompt,) = parse(tools=[CUSTOM], messages=messages, tool_choice="none").prompts
    assert prompt.endswith('{"tool_calls": [{"name": "run", "arguments": "main()"}]}\n# call_1 -> 0\n')


@pytest.mark.parametrize(
    "fields, param, says",
    [
        ({"tools": [CUSTOM]}, "tool_choice", "custom tool 'run' takes a Lark grammar"),
        ({"tools": [*TOOLS, CUSTOM], "tool_choice": "auto"}, "tool_choice", "only when tool_choice names its tool"),
        ({"tools": [CUSTOM], "tool_choice": {"type": "custom", "custom": {"name": "nope"}}}, "tool_choice",
         "not one of the tools"),
        ({"tools": [CUSTOM], "tool_choice": {"type": "custom", "name": "run"}}, "tool_choice", "expected"),
        ({"tools": [TOOLS[1]], "tool_choice": RUN}, "tool_choice", "none is custom"),
        ({"tools": [{"type": "custom", "custom": {"name": "run", "format": {"type": "lark"}}}], "tool_choice": RUN},
         "tools", "tools[0].custom.format: expected"),
        ({"tools": [{"type": "custom", "custom": {"name": "run", "format": {"type": "grammar", "grammar": {
            "syntax": "ebnf", "definition": "x"}}}}], "tool_choice": RUN}, "tools", "syntax"),
        ({"tools": [{"type": "custom", "custom": {"name": "run", "format": {"type": "grammar", "grammar": {
            "syntax": "lark", "definition": "start: x"}}}}], "tool_choice": RUN}, "tools",
         "tools[0].custom.format.grammar.definition: rule x is used but not defined"),
        ({"tools": [{"type": "custom", "custom": {"name": "run", "inputs": {}}}], "tool_choice": RUN}, "tools",
         "tools[0].custom: expected an object of description, format, name"),
        ({"tools": [CUSTOM, {"type": "function", "function": {"name": "run"}}], "tool_choice": RUN}, "tools",
         "named twice"),
        ({"tools": [CUSTOM], "tool_choice": RUN, "response_format": {"type": "json_object"}}, "response_format",
         "tool calls"),
        ({"messages": [{"role": "assistant", "tool_calls": [{"type": "custom", "custom": {"name": "run"}}]}]},
         "messages[0].tool_calls", '"input": str'),
    ],
)  # fmt: skip
def test_custom_tools_and_their_choices_are_checked_by_field(fields, param, says):
    with pytest.raises(ApiError) as e:
        parse(**fields)
    assert e.value.status == 400 and e.value.param == param and says in e.value.message, e.value.message


def test_a_named_custom_tool_is_called_with_the_generators_text_under_its_grammar(server, reference):
    """The call's input is the Generator's answer under the tool's grammar, streamed or not (its
    first delta names the call, the rest add to its input); finish_reason "stop", a named choice's."""
    c, messages = client(server), [{"role": "user", "content": "call main with args and kwargs"}]
    want = reference.generate(TEMPLATE.render(messages, [CUSTOM | {"function": {"name": "run"}}]), mode="blt-s",
                              max_bytes=60, temperature=0.0, grammar=CALL_GRAMMAR, stop=[CHAT_STOP])  # fmt: skip
    assert want.stop_reason == "eos" and re.fullmatch(r"[a-z_]+\(([a-z_]+(, [a-z_]+)*)?\)", want.text)
    opts = dict(model=MODEL, messages=messages, tools=[CUSTOM], tool_choice=RUN, max_tokens=60, temperature=0)
    r = c.chat.completions.create(**opts)
    (call,) = r.choices[0].message.tool_calls
    assert (call.type, call.custom.name, call.custom.input) == ("custom", "run", want.text)
    assert r.choices[0].finish_reason == "stop"
    entries = [t.model_dump() for x in c.chat.completions.create(stream=True, **opts)
               for t in x.choices[0].delta.tool_calls or ()]  # fmt: skip
    assert entries[0]["id"].startswith("call_") and entries[0]["type"] == "custom"
    assert entries[0]["custom"]["name"] == "run" and {t["index"] for t in entries} == {0}
    assert "".join(t["custom"]["input"] for t in entries) == want.text


ANSWER = {"type": "custom", "custom": {"name": "answer", "format": {"type": "grammar", "grammar": {
    "syntax": "regex", "definition": "(yes|no), \\d{1,3}%"}}}}  # fmt: skip
NOTE = {"type": "custom", "custom": {"name": "note"}}  # any text


def test_required_calls_may_call_custom_tools_whose_input_is_a_json_string_held_to_their_regex():
    """Beside functions, a custom tool of text or a regex is called in the calls' JSON text: its
    input a string (a regex's matched whole), read back as a custom call with the string's text."""
    comp = parse(tools=[*TOOLS, ANSWER, NOTE])
    schema = json.loads(comp.options["schema"])
    assert comp.shape.customs == {"answer", "note"}
    good = '{"tool_calls": [{"name": "answer", "arguments": "no, 5%"}, {"name": "note", "arguments": "a\\"b\\u00e9"}]}'
    assert accepts(schema, good) and accepts(schema, '{"tool_calls": [{"name": "get_time", "arguments": {}}]}')
    for bad in ('{"tool_calls": [{"name": "answer", "arguments": "maybe"}]}',
                '{"tool_calls": [{"name": "answer", "arguments": "no, 5% "}]}',
                '{"tool_calls": [{"name": "note", "arguments": {}}]}'):  # fmt: skip
        assert not accepts(schema, bad), bad
    calls = read_calls(good, frozenset({"answer", "note"}))
    assert [c["type"] for c in calls] == ["custom", "custom"]
    assert [c["custom"] for c in calls] == [{"name": "answer", "input": "no, 5%"}, {"name": "note", "input": 'a"bé'}]
    reader, got = CallReader(customs=frozenset({"note"})), []
    for ch in good.replace("answer", "get_time").replace('"no, 5%"', "{}"):  # a function's call, then a custom one
        got += reader.feed(ch)
    first = [e for e in got if e["index"] == 1]
    assert first[0]["type"] == "custom" and first[0]["custom"]["name"] == "note"
    assert "".join(e["custom"]["input"] for e in first) == 'a"bé' and all("function" not in e for e in first)
    assert all("custom" not in e for e in got if e["index"] == 0)
    with pytest.raises(ApiError, match="'run' takes a Lark grammar"):
        parse(tools=[ANSWER, CUSTOM])


def test_required_calls_of_custom_tools_equal_the_generators_answer_read_back(server, reference):
    c = client(server)
    tools = [TOOLS[1], ANSWER]
    messages = [{"role": "user", "content": "is os.path.join pure? call answer"}]
    parsed = parse(messages=messages, tools=tools)
    opts = dict(mode="blt-s", max_bytes=120, temperature=0.0)
    gen = reference.generate(parsed.prompts[0], format="json", schema=parsed.options["schema"], stop=[CHAT_STOP],
                             **opts)  # fmt: skip
    want = read_calls(gen.text, frozenset({"answer"}))
    assert any(call["type"] == "custom" for call in want)
    body = dict(model=MODEL, messages=messages, tools=tools, tool_choice="required", max_tokens=120, temperature=0)
    r = c.chat.completions.create(**body)
    got = [t.model_dump(exclude_none=True) for t in r.choices[0].message.tool_calls or ()]
    assert [{k: v for k, v in t.items() if k != "id"} for t in got] == [{k: v for k, v in t.items() if k != "id"}
                                                                          for t in want] and want  # fmt: skip
    entries = [t.model_dump(exclude_none=True) for x in c.chat.completions.create(stream=True, **body)
               for t in x.choices[0].delta.tool_calls or ()]  # fmt: skip
    for j, call in enumerate(want):
        mine = [e for e in entries if e["index"] == j]
        kind = call["type"]
        said = "".join(e[kind]["input" if kind == "custom" else "arguments"] for e in mine)
        assert said == call[kind]["input" if kind == "custom" else "arguments"]


def test_with_call_tags_auto_may_call_a_custom_tool_whose_input_is_a_json_string():
    body = {"model": MODEL, "messages": MESSAGES, "tools": [*TOOLS, ANSWER], "stream": True}
    comp = parse_chat_body(json.dumps(body).encode(), MODEL, "blt-s", TAGGED)
    root = grammar.tagged(comp.options["calls"])
    text = 'so >{"name": "answer", "arguments": "yes, 7%"}</call> done'
    assert grammar.advance(grammar.begin(root), [b + 4 for b in text.encode()]) is not None
    bad = b'so >{"name": "answer", "arguments": "perhaps"}'
    assert grammar.advance(grammar.begin(root), [b + 4 for b in bad]) is None
    assert comp.shape.choice(text, "stop", 0, None)["message"]["tool_calls"][0]["custom"] == {
        "name": "answer", "input": "yes, 7%"}  # fmt: skip
    deltas = [comp.shape.delta(ch, None, 0, None, i == 0)["delta"] for i, ch in enumerate(text)]
    entries = [t for d in deltas for t in d.get("tool_calls", ())]
    assert entries[0]["type"] == "custom" and "".join(t["custom"]["input"] for t in entries) == "yes, 7%"
    none = {"model": MODEL, "messages": MESSAGES, "tools": [CUSTOM], "tool_choice": "none"}  # custom tools alone
    assert json.loads(parse_chat_body(json.dumps(none).encode(), MODEL, "blt-s", TAGGED).options["calls"])["most"] == 0
