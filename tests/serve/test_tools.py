"""Tool calling in chat completions: `tools` rendered by the chat template, calls asked for with
tool_choice "required" or a named function held by the grammar to the calls' schema and read
back into `tool_calls` (equal to the Generator's text under that schema), conversations passing
calls and their results back; every malformed tool, choice and message a 400 naming its field."""

from __future__ import annotations

import json

import jsonschema
import openai
import pydantic
import pytest
from conftest import CHAT_STOP, CHAT_TEMPLATE, KEY

from fastblt.model.config import EOS_ID
from fastblt.runtime import grammar
from fastblt.serve.api import ApiError
from fastblt.serve.chat import ChatTemplate, parse_chat_body
from fastblt.serve.tools import calls_schema, read_calls

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
    schema = calls_schema({"temp": unit, "wind": speed}, True)
    assert sorted(schema["$defs"]) == ["temp.Unit", "wind.Unit"]
    assert accepts(
        schema, '{"tool_calls":[{"name":"temp","arguments":{"u":"c"}},{"name":"wind","arguments":{"u":"mph"}}]}'
    )
    assert not accepts(schema, '{"tool_calls":[{"name":"temp","arguments":{"u":"mph"}}]}')
    assert not accepts(schema, '{"tool_calls":[{"name":"wind","arguments":{"u":"c"}}]}')


def test_calls_are_read_back_as_openais_and_a_cut_answer_gives_those_that_closed():
    text = '{"tool_calls": [ {"name": "get_weather", "arguments": {"city": "Paris",  "unit": "c"}},\n {"name": "get_t'
    (call,) = read_calls(text)
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"] == {"name": "get_weather", "arguments": '{"city":"Paris","unit":"c"}'}
    calls = read_calls('{"tool_calls":[{"name":"get_time","arguments":{}},{"name":"get_time","arguments":{}}]}')
    assert [c["function"]["name"] for c in calls] == ["get_time"] * 2 and calls[0]["id"] != calls[1]["id"]
    assert read_calls('{"tool_ca') == [] == read_calls('{"tool_calls": [{"name": "get_weather", "argu')


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
            "type": "object", "properties": {"a": {"type": "string", "format": "date"}}}}}]}, "tools",
         "tools[0].function.parameters.properties.a.format: not supported"),
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

        chunks = list(c.chat.completions.create(stream=True, **ask))
        deltas = [x.choices[0].delta for x in chunks]
        assert deltas[0].role == "assistant" and not any(d.content for d in deltas)
        streamed = [t for d in deltas for t in d.tool_calls or []]
        assert [{"name": t.function.name, "arguments": t.function.arguments} for t in streamed] == want
        assert [t.index for t in streamed] == list(range(len(want)))
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
    assert parsed >= 1


def test_a_conversation_with_a_calls_result_is_answered(server):
    c = client(server)
    r = c.chat.completions.create(model=MODEL, messages=MESSAGES, tools=TOOLS, tool_choice="required", max_tokens=300,
                                  temperature=0)  # fmt: skip
    message = r.choices[0].message
    results = [{"role": "tool", "tool_call_id": t.id, "content": "21"} for t in message.tool_calls]
    messages = [*MESSAGES, message.model_dump(exclude_none=True), *results]
    r2 = c.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, tool_choice="none", max_tokens=16,
                                   temperature=0)  # fmt: skip
    assert r2.choices[0].message.content is not None and not r2.choices[0].message.tool_calls
    (want,) = parse(messages=messages, tool_choice="none").prompts  # the calls and results, as the template shows them
    assert r2.usage.prompt_tokens == len(want.encode()) and want.count(" -> 21\n") == len(results) >= 1
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model=MODEL, messages=MESSAGES, tools=TOOLS, max_tokens=8)  # "auto"
    assert e.value.body["param"] == "tool_choice"
    with pytest.raises(openai.BadRequestError) as e:  # the engine's refusal of a JSON answer in blt-d names the choice
        c.chat.completions.create(model=MODEL, messages=MESSAGES, tools=TOOLS, tool_choice="required", max_tokens=8,
                                  extra_body={"mode": "blt-d"})  # fmt: skip
    assert e.value.body["param"] == "tool_choice" and "blt-d" in e.value.body["message"]
