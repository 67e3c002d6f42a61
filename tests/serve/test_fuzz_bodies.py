"""Request bodies drawn at random, each field valid, wrong or missing, for both endpoints: parsing
either gives a request or a 4xx naming a field, and the engine's checks of what parsing passed
raise fastblt's own errors (which the server turns into 400s naming the field), never anything
else: no body reaches the server's 500 path. No server: the app's own parsing and checking."""

from __future__ import annotations

import json

from conftest import CHAT_STOP, CHAT_TEMPLATE
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastblt.errors import FastBltError
from fastblt.formats.checkpoint import load_config, resolve_checkpoint_path
from fastblt.runtime.options import make_request
from fastblt.serve.api import ApiError, parse_body
from fastblt.serve.chat import ChatTemplate
from fastblt.serve.chat_store import ChatStore, StoredChat
from fastblt.serve.conversations import ConversationStore
from fastblt.serve.kept import MemoryKept
from fastblt.serve.tools import CallTags

MODEL = "fastblt-default"
TEMPLATES = (ChatTemplate(CHAT_TEMPLATE, stops=(CHAT_STOP,)),  # and one that serves tool_choice "auto"
             ChatTemplate(CHAT_TEMPLATE, stops=(CHAT_STOP,), tags=CallTags("<call>", "</call>")))  # fmt: skip
CONFIG = load_config(resolve_checkpoint_path("default"))
TALKS = ConversationStore(1 << 20)
CHATS = ChatStore(MemoryKept(1 << 20))
for _i in range(3):
    CHATS.put({"id": f"chatcmpl-{_i}", "model": MODEL if _i else "other"}, [], {"k": str(_i)})
CONVERSATION = TALKS.create([], {})["id"]

anything = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
held = st.fixed_dictionaries(  # a property held to a pattern, a format, bounds, multiples or lengths, right or wrong
    {"type": st.sampled_from(["string", "integer", "number", ["string", "null"]]) | anything},
    optional={"pattern": st.text("ab()[]{}|*+?^$.-\\dsu0", max_size=6) | anything,
              "format": st.sampled_from(["date", "uuid", "ipv6", "uri"]) | anything,
              "minimum": st.integers(-3, 3) | anything, "exclusiveMaximum": st.floats(-3, 3) | anything,
              "minLength": st.integers(-1, 3) | anything, "maxLength": st.integers(0, 3) | anything,
              "multipleOf": st.sampled_from([0, -1, 2, 0.25, 1e-300, 1e300, 997.5]) | anything},
)  # fmt: skip
schemas = st.fixed_dictionaries(
    {"type": st.sampled_from(["object", "string", ["object", "null"], "array"])},
    optional={"properties": st.dictionaries(st.text(max_size=3), st.just({"type": "integer"}) | held | anything,
                                            max_size=3),
              "required": st.lists(st.text(max_size=3), max_size=3), "additionalProperties": held | anything,
              "propertyNames": held | anything, "minProperties": st.integers(-1, 2) | anything,
              "maxProperties": st.integers(-1, 2) | anything, "prefixItems": st.lists(held, max_size=2) | anything,
              "items": held | anything, "pattern": st.text(max_size=3),
              "$ref": st.sampled_from(["#", "#/$defs/a"]) | st.text(max_size=8)},
)  # fmt: skip
response_formats = st.one_of(
    anything,
    st.fixed_dictionaries({"type": st.sampled_from(["text", "json_object", "json_schema", "xml"])}),
    st.fixed_dictionaries({"type": st.just("json_schema"), "json_schema": st.fixed_dictionaries(
        {"name": st.text(max_size=4) | anything}, optional={"schema": schemas | anything, "strict": anything})}),
)  # fmt: skip
function = st.fixed_dictionaries(
    {"name": st.sampled_from(["f", "g", "a b"]) | anything},
    optional={"parameters": schemas | anything, "description": anything, "strict": anything},
)
definitions = st.text('ab()[]{}|*+?^$.-\\dsu0é"/: ', max_size=8) | st.sampled_from(['start: "a"', "(yes|no)"])
grammar_format = st.fixed_dictionaries(
    {"type": st.just("grammar") | anything},
    optional={"syntax": st.sampled_from(["lark", "regex", "ebnf"]) | anything, "definition": definitions | anything},
)
custom = st.fixed_dictionaries(
    {"name": st.sampled_from(["c", "f"]) | anything},
    optional={"description": anything, "format": st.just({"type": "text"}) | st.fixed_dictionaries(
        {"type": st.just("grammar"), "grammar": grammar_format}) | anything},
)  # fmt: skip
tools = (st.fixed_dictionaries({"type": st.sampled_from(["function", "x"]), "function": function})
         | st.fixed_dictionaries({"type": st.just("custom"), "custom": custom}) | anything)  # fmt: skip
named = st.fixed_dictionaries(
    {"type": st.just("function"), "function": st.fixed_dictionaries({"name": st.sampled_from(["f", "g"])})}
) | st.fixed_dictionaries({"type": st.just("custom"), "custom": st.fixed_dictionaries({"name": st.sampled_from(
    ["c", "f"])})})  # fmt: skip
called = st.fixed_dictionaries({"name": st.text(max_size=3), "arguments": st.text(max_size=10)})
calls = st.fixed_dictionaries({"id": st.text(max_size=3), "type": st.just("function"), "function": called}) | (
    st.fixed_dictionaries({"id": st.text(max_size=3), "type": st.just("custom"), "custom": st.fixed_dictionaries(
        {"name": st.text(max_size=3)}, optional={"input": st.text(max_size=5) | anything})}))  # fmt: skip
structured = st.one_of(  # vLLM's structured_outputs
    st.fixed_dictionaries({"regex": st.text("ab()[]{}|*+?^$.-\\dsu0é", max_size=6) | anything}),
    st.fixed_dictionaries({"choice": st.lists(st.text(max_size=4), max_size=3) | anything}),
    st.fixed_dictionaries({"json": schemas | anything}),
    st.fixed_dictionaries(
        {
            "grammar": st.lists(
                st.sampled_from(
                    [
                        "start",
                        ":",
                        "::=",
                        "root",
                        '"a"',
                        '""',
                        "b",
                        "|",
                        "(",
                        ")",
                        "[",
                        "]",
                        "?",
                        "*",
                        "+",
                        "~",
                        "2",
                        "..",
                        "/x+/",
                        "/(?<=a)/",
                        "%ignore",
                        "\n",
                        "[a-z]",
                        "// c",
                    ]
                ),
                max_size=12,
            ).map(" ".join)
            | anything
        }
    ),
    st.dictionaries(st.sampled_from(["regex", "choice", "json", "grammar", "x"]), anything, max_size=2),
    anything,
)
FIELDS = {  # a plausible value, or anything at all
    "max_tokens": st.integers(-3, 40),
    "temperature": st.floats(-1, 3),
    "top_p": st.floats(-0.5, 1.5),
    "top_k": st.integers(-2, 300),
    "priority": st.integers(-(2**33), 2**33) | st.booleans(),
    "seed": st.integers(-5, 2**64),
    "stop": st.text(max_size=4) | st.lists(st.text(max_size=4), max_size=6),
    "n": st.integers(-1, 20),
    "logprobs": st.integers(-1, 25) | st.booleans(),
    "top_logprobs": st.integers(-1, 25),
    "logit_bias": st.dictionaries(st.sampled_from(["0", "10", "255", "256", "a", "-1"]), st.floats(-200, 200)),
    "presence_penalty": st.floats(-3, 3),
    "frequency_penalty": st.floats(-3, 3),
    "response_format": response_formats,
    "mode": st.sampled_from(["ar", "blt-s", "blt-d", "blt-dv", "fast"]),
    "k": st.integers(-1, 200),
    "lookup": st.integers(-1, 40),
    "alpha": st.floats(-1, 2),
    "gamma": st.floats(-1, 5),
    "unmask": st.sampled_from(["one-step", "confidence", "entropy", "x"]),
    "block_start": st.sampled_from(["force", "patch", "x"]),
    "stream": st.booleans(),
    "echo": st.booleans(),
    "best_of": st.integers(0, 25),
    "user": st.text(max_size=4),
    "tools": st.lists(tools, max_size=3),
    "tool_choice": st.sampled_from(["none", "auto", "required", "x"]) | named,
    "parallel_tool_calls": st.booleans(),
    "continue_final_message": st.booleans(),
    "add_generation_prompt": st.booleans(),
    "structured_outputs": structured,
    "store": st.booleans(),
    "metadata": st.dictionaries(st.text(max_size=3), st.text(max_size=3), max_size=2),
}
messages = st.lists(
    st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant", "tool"]) | anything},
                          optional={"content": st.text(max_size=20) | anything, "name": anything,
                                    "tool_call_id": st.text(max_size=3) | anything,
                                    "tool_calls": st.lists(calls | anything, max_size=2) | anything}),
    max_size=3,
) | anything  # fmt: skip


def body(data, chat: bool) -> bytes:
    chosen = data.draw(st.sets(st.sampled_from(sorted(FIELDS)), max_size=8))
    b = {name: data.draw(FIELDS[name] | anything if data.draw(st.booleans()) else FIELDS[name]) for name in chosen}
    b["model"] = MODEL
    if chat:
        b["messages"] = data.draw(messages)
    else:
        b["prompt"] = data.draw(st.text(max_size=30) | st.lists(st.text(max_size=10), max_size=3) | anything)
    return json.dumps(b, allow_nan=False).encode() if _finite(b) else b"{}"


def _finite(value) -> bool:
    try:
        json.dumps(value, allow_nan=False)
        return True
    except ValueError:
        return False


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data(), st.booleans())
def test_a_random_body_is_a_request_or_a_4xx_naming_a_field(data, chat):
    raw = body(data, chat)
    try:
        template = TEMPLATES[data.draw(st.integers(0, 1))]
        # what POST /v1/chat/completions parses with (chat's fields, and store and metadata)
        comp = StoredChat(MODEL, "blt-s", template, CHATS).parse(raw) if chat else parse_body(raw, MODEL, "blt-s")
    except ApiError as e:
        assert 400 <= e.status < 500 and e.message, e.message
        return
    for prompt in comp.prompts:  # what the app's _request does with it
        try:
            make_request(prompt, CONFIG, max_bytes=max(comp.max_tokens or 1, 1), **comp.options)
        except FastBltError as e:
            assert str(e).startswith(("option", "mode", "prompt")), str(e)


# ---------------------------------------------------------------------------- POST /v1/responses
parts = st.fixed_dictionaries({"type": st.sampled_from(["input_text", "output_text", "input_image"]) | anything},
                              optional={"text": st.text(max_size=8) | anything})  # fmt: skip
items = st.one_of(
    st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "developer", "assistant", "tool"]) | anything},
                          optional={"type": st.just("message") | anything,
                                    "content": st.text(max_size=12) | st.lists(parts, max_size=2) | anything,
                                    "id": anything, "status": anything}),
    st.fixed_dictionaries({"type": st.just("function_call")},
                          optional={"call_id": st.text(max_size=3) | anything, "name": st.sampled_from(["f", "g"]),
                                    "arguments": st.sampled_from(["{}", '{"a": 1}', "x"]) | anything}),
    st.fixed_dictionaries({"type": st.sampled_from(["function_call_output", "custom_tool_call_output"])},
                          optional={"call_id": st.text(max_size=3) | anything,
                                    "output": st.text(max_size=5) | st.lists(parts, max_size=2) | anything}),
    st.fixed_dictionaries({"type": st.just("custom_tool_call")},
                          optional={"call_id": st.text(max_size=3) | anything, "name": st.sampled_from(["c", "f"]),
                                    "input": st.text(max_size=5) | anything}),
    anything,
)  # fmt: skip
function_tools = st.fixed_dictionaries(
    {"type": st.sampled_from(["function", "web_search"]) | anything, "name": st.sampled_from(["f", "g"]) | anything},
    optional={"parameters": schemas | anything, "strict": anything, "description": anything},
) | st.fixed_dictionaries(
    {"type": st.just("custom"), "name": st.sampled_from(["c", "f"]) | anything},
    optional={"format": st.just({"type": "text"}) | grammar_format | anything, "description": anything},
)  # fmt: skip
flat_schema = st.fixed_dictionaries({"type": st.just("json_schema"), "name": st.just("n"), "schema": schemas})
named_function = st.fixed_dictionaries({"type": st.sampled_from(["function", "custom"]), "name": st.sampled_from(
    ["f", "g", "c"])})  # fmt: skip
RESPONSES_FIELDS = {
    "input": st.text(max_size=20) | st.lists(items, max_size=4) | anything,
    "instructions": st.text(max_size=10) | anything,
    "max_output_tokens": st.integers(-3, 40),
    "temperature": st.floats(-1, 3),
    "top_p": st.floats(-0.5, 1.5),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_obfuscation": anything}) | anything,
    "store": st.booleans(),
    "metadata": st.dictionaries(st.text(max_size=3), st.text(max_size=3), max_size=2) | anything,
    "text": st.fixed_dictionaries({"format": response_formats | flat_schema}) | anything,
    "tools": st.lists(function_tools, max_size=2) | anything,
    "tool_choice": st.sampled_from(["none", "auto", "required"]) | named_function | anything,
    "include": st.lists(st.sampled_from(["message.output_text.logprobs", "x"]), max_size=2) | anything,
    "top_logprobs": st.integers(-1, 25),
    "previous_response_id": st.text(max_size=4) | anything,
    "service_tier": st.sampled_from(["auto", "flex", "priority", "x"]) | anything,
    "reasoning": st.just({"effort": None}) | anything,
    "truncation": st.sampled_from(["disabled", "auto"]) | anything,
    "max_tool_calls": st.integers(-1, 3) | anything,
    "conversation": st.sampled_from([CONVERSATION, "conv_x"]) | st.just({"id": CONVERSATION}) | anything,
    "structured_outputs": structured,
    "mode": st.sampled_from(["ar", "blt-s", "blt-d", "blt-dv", "fast"]),
    "seed": st.integers(-5, 2**64),
    "priority": st.integers(-(2**33), 2**33),
}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_a_random_responses_body_is_a_request_or_a_4xx_naming_a_field(data):
    from fastblt.serve.responses import ResponsesRequest, ResponseStore

    chosen = data.draw(st.sets(st.sampled_from(sorted(RESPONSES_FIELDS)), max_size=8))
    b = {name: data.draw(RESPONSES_FIELDS[name]) for name in chosen | {"input"}} | {"model": MODEL}
    raw = json.dumps(b, allow_nan=False).encode() if _finite(b) else b"{}"
    asked = ResponsesRequest(MODEL, "blt-s", TEMPLATES[data.draw(st.integers(0, 1))], ResponseStore(1 << 16),
                             TALKS)  # fmt: skip
    try:
        comp = asked.parse(raw, data.draw(st.sampled_from([None, 60, 16384])))
    except ApiError as e:
        assert 400 <= e.status < 500 and e.message, e.message
        return
    try:
        make_request(comp.prompts[0], CONFIG, max_bytes=max(comp.max_tokens or 1, 1), **comp.options)
    except FastBltError as e:
        assert str(e).startswith(("option", "mode", "prompt")), str(e)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_a_random_input_tokens_body_is_counted_or_a_4xx_naming_a_field(data):
    """POST /v1/responses/input_tokens: what it counts (a Responses body's input fields, mostly;
    `model` left out at times, `personality`) is a count of the bytes the same body renders, or a 4xx."""
    from fastblt.serve.responses import COUNTED, ResponsesRequest, ResponseStore

    pool = sorted(set(RESPONSES_FIELDS) & COUNTED) * 3 + sorted(set(RESPONSES_FIELDS) - COUNTED) + ["personality"]
    chosen = data.draw(st.sets(st.sampled_from(pool), max_size=5))
    fields = RESPONSES_FIELDS | {"personality": st.sampled_from([None, "friendly"])}
    b = {name: data.draw(fields[name]) for name in chosen | {"input"}}
    if data.draw(st.booleans()):
        b["model"] = MODEL
    raw = json.dumps(b, allow_nan=False).encode() if _finite(b) else b"{}"
    limit = data.draw(st.sampled_from([None, 60, 16384]))
    asked = ResponsesRequest(MODEL, "blt-s", TEMPLATES[1], ResponseStore(1 << 16), TALKS)
    try:
        counted = asked.count(raw, limit)
    except ApiError as e:
        assert 400 <= e.status < 500 and e.message, e.message
        return
    assert set(b) <= COUNTED | {"personality"} and b.get("personality") is None
    same = {k: v for k, v in b.items() if k != "personality"} | {"model": MODEL, "store": False}
    comp = ResponsesRequest(MODEL, "blt-s", TEMPLATES[1], ResponseStore(1 << 16), TALKS).parse(
        json.dumps(same).encode(), limit)  # fmt: skip
    assert counted == {"object": "response.input_tokens", "input_tokens": sum(len(p.encode()) for p in comp.prompts)}


@settings(max_examples=200, deadline=None)
@given(st.lists(items, max_size=4) | anything)
def test_random_conversation_items_are_kept_or_a_4xx_naming_a_field(given):
    """What POST /v1/conversations (and its /items) is sent: items it keeps, which a response
    that continues the conversation reads back, or a 4xx naming the field."""
    from fastblt.serve.responses import ResponsesRequest, conversation_items

    try:
        kept = conversation_items(given)
    except ApiError as e:
        assert 400 <= e.status < 500 and e.param is not None and e.param.startswith("items"), e.message
        return
    cid = TALKS.create(kept, {})["id"]
    asked = ResponsesRequest(MODEL, "blt-s", TEMPLATES[0], conversations=TALKS)
    try:
        asked.parse(json.dumps({"model": MODEL, "input": "x", "conversation": cid}).encode())
    except ApiError as e:  # the template's own refusal (a system message after others)
        assert e.status == 400 and e.param == "input", e.message


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(["after", "limit", "order", "model", "metadata[k]", "metadata", "x"])
                       | st.text(max_size=6), st.sampled_from(["chatcmpl-1", "1", "100", "desc", "asc", "0"])
                       | st.text(max_size=6), max_size=4))  # fmt: skip
def test_a_random_list_query_of_stored_chat_completions_is_a_page_or_a_400_naming_it(query):
    """GET /v1/chat/completions?...: a page of those that match, in order, or a 400 naming the
    query parameter that is wrong."""
    try:
        page = CHATS.listed(query)
    except ApiError as e:
        assert e.status == 400 and e.param is not None and e.param in query, e.message
        return
    ids = [c["id"] for c in page["data"]]
    assert ids == sorted(ids, reverse=query.get("order") == "desc") and len(ids) <= int(query.get("limit", 20))
    assert all(c["model"] == query.get("model", c["model"]) and c["metadata"]["k"] == query.get("metadata[k]", c[
        "metadata"]["k"]) for c in page["data"])  # fmt: skip
