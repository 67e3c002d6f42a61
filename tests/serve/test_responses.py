"""POST /v1/responses: OpenAI's Responses API answered as chat. Input items and instructions
render as the chat messages they stand for; answers (text, structured, calls, logprobs) equal
chat's for the same request, streamed as Responses events the real openai client reads back into
the same Response; every field fastblt cannot serve is a 400 naming it."""

from __future__ import annotations

import asyncio
import json
import re
import time

import httpx
import openai
import pydantic
import pytest
from conftest import CHAT_STOP, CHAT_TEMPLATE, KEY

from fastblt.errors import PositionLimit
from fastblt.serve.api import ApiError
from fastblt.serve.chat import ChatTemplate, parse_chat_body
from fastblt.serve.responses import ResponsesRequest, ResponseStore

MODEL = "fastblt-default"
TEMPLATE = ChatTemplate(CHAT_TEMPLATE, stops=(CHAT_STOP,))
INSTRUCTIONS, ASK = "path helpers", "import os\n\n\ndef main("
MESSAGES = [{"role": "system", "content": INSTRUCTIONS}, {"role": "user", "content": ASK}]
WEATHER = {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
           "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}}}  # fmt: skip
TOOL = {"type": "function", "name": "get_weather", "description": "now, in a city", "parameters": WEATHER,
        "strict": True}  # fmt: skip
CHAT_TOOL = {"type": "function", "function": {k: v for k, v in TOOL.items() if k != "type"}}


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=120)


def parse(**fields):
    body = {"model": MODEL, "input": ASK, "instructions": INSTRUCTIONS, **fields}
    return ResponsesRequest(MODEL, "blt-s", TEMPLATE).parse(json.dumps(body).encode())


def chat(**fields):
    return parse_chat_body(json.dumps({"model": MODEL, "messages": MESSAGES, **fields}).encode(), MODEL, "blt-s",
                           TEMPLATE)  # fmt: skip


# ---------------------------------------------------------------------------- no server
def test_a_responses_body_is_the_chat_body_it_stands_for():
    comp = parse(max_output_tokens=40, temperature=0.5, top_p=0.9, seed=3, mode="ar")
    want = chat(max_completion_tokens=40, temperature=0.5, top_p=0.9, seed=3, mode="ar")
    assert comp.prompts == want.prompts == [TEMPLATE.render(MESSAGES)]
    assert (comp.max_tokens, comp.options) == (want.max_tokens, want.options)
    assert (comp.prompt_field, comp.tokens_field, comp.format_field) == ("input", "max_output_tokens", "text.format")
    schema = {"type": "json_schema", "name": "w", "schema": WEATHER, "strict": True}
    assert parse(text={"format": schema}).options == chat(response_format={
        "type": "json_schema", "json_schema": {"name": "w", "schema": WEATHER, "strict": True}}).options  # fmt: skip
    called = parse(tools=[TOOL], tool_choice={"type": "function", "name": "get_weather"})
    assert called.options == chat(tools=[CHAT_TOOL], tool_choice={"type": "function", "function": {
        "name": "get_weather"}}).options and called.format_field == "tool_choice"  # fmt: skip
    assert called.prompts == chat(tools=[CHAT_TOOL], tool_choice="required").prompts  # tools listed as chat's
    scored = parse(include=["message.output_text.logprobs"], top_logprobs=2)
    assert scored.logprobs == 2 and parse(top_logprobs=2).logprobs is None  # logprobs only when included
    assert parse(stream=True).include_usage  # response.completed carries the usage
    chosen = parse(structured_outputs={"choice": ["yes", "no"]})  # vLLM's, as chat takes it
    assert chosen.options == chat(structured_outputs={"choice": ["yes", "no"]}).options
    assert chosen.options["pattern"] == "yes|no" and chosen.format_field == "structured_outputs"
    assert parse(reasoning={"effort": None, "summary": None}, store=True).options == parse().options  # none asked
    flex = ResponsesRequest(MODEL, "blt-s", TEMPLATE)
    comp = flex.parse(json.dumps({"model": MODEL, "input": ASK, "service_tier": "flex"}).encode())
    assert comp.options["priority"] == 1 and flex.echo["service_tier"] == "flex"


def test_input_items_are_the_conversation_chat_would_render():
    """Messages with text parts, an answer's output message and calls sent back, and the calls'
    outputs render as the chat messages they stand for."""
    call = {"type": "function_call", "call_id": "call_1", "name": "get_weather",
            "arguments": '{"city": "Paris", "unit": "c"}', "id": "fc_1", "status": "completed"}  # fmt: skip
    items = [
        {"role": "developer", "content": [{"type": "input_text", "text": "be brief"}]},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "weather?"},
                                                         {"type": "input_text", "text": "in Paris"}]},
        {"type": "message", "id": "msg_1", "status": "completed", "role": "assistant",
         "content": [{"type": "output_text", "text": "checking", "annotations": []}]},
        call, {**call, "call_id": "call_2"},
        {"type": "function_call_output", "call_id": "call_1", "output": "21"},
        {"type": "function_call_output", "call_id": "call_2", "output": [{"type": "input_text", "text": "22"}]},
    ]  # fmt: skip
    calls = [{"id": i, "type": "function", "function": {"name": "get_weather", "arguments": call["arguments"]}}
             for i in ("call_1", "call_2")]  # fmt: skip
    messages = [{"role": "developer", "content": "be brief"}, {"role": "user", "content": "weather?\nin Paris"},
                {"role": "assistant", "content": "checking", "tool_calls": calls},
                {"role": "tool", "tool_call_id": "call_1", "content": "21"},
                {"role": "tool", "tool_call_id": "call_2", "content": "22"}]  # fmt: skip
    got = ResponsesRequest(MODEL, "blt-s", TEMPLATE).parse(json.dumps({"model": MODEL, "input": items}).encode())
    want = parse_chat_body(json.dumps({"model": MODEL, "messages": messages}).encode(), MODEL, "blt-s", TEMPLATE)
    assert got.prompts == want.prompts and '"city": "Paris"' in got.prompts[0]
    alone = ResponsesRequest(MODEL, "blt-s", TEMPLATE).parse(json.dumps({"model": MODEL, "input": [call]}).encode())
    assert '{"tool_calls": [{"name": "get_weather"' in alone.prompts[0]  # an assistant message of its own


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"input": []}, "input"),
        ({"input": 3}, "input"),
        ({"input": [{"type": "reasoning", "summary": []}]}, "input[0].type"),
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input[0].content[0]"),
        ({"input": [{"role": "tool", "content": "x"}]}, "input[0].role"),
        ({"input": [{"role": "user", "content": "x", "name": "n"}]}, "input[0].name"),
        ({"input": [{"type": "function_call", "call_id": "c", "name": "f"}]}, "input[0].arguments"),
        ({"input": "\ud800"}, "input"),
        ({"input": [{"role": "user", "content": "x"}, {"role": "system", "content": "late"}]}, "input"),
        ({"instructions": 3}, "instructions"),
        ({"previous_response_id": "resp_1"}, "previous_response_id"),
        ({"background": True}, "background"),  # no store here
        ({"background": "yes"}, "background"),
        ({"reasoning": {"effort": "high"}}, "reasoning"),
        ({"truncation": "middle"}, "truncation"),
        ({"max_tool_calls": 0}, "max_tool_calls"),
        ({"max_tool_calls": "2"}, "max_tool_calls"),
        ({"max_output_tokens": 0}, "max_output_tokens"),
        ({"max_output_tokens": "8"}, "max_output_tokens"),
        ({"text": {"format": {"type": "xml"}}}, "text.format"),
        ({"text": {"verbosity": "low"}}, "text"),
        ({"tools": [{"type": "web_search"}]}, "tools[0]"),
        ({"tools": [{**TOOL, "parameters": {"type": "nope"}}], "tool_choice": "required"}, "tools"),
        ({"tools": [TOOL], "tool_choice": {"type": "file_search"}}, "tool_choice"),
        ({"tools": [TOOL], "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice"),
        ({"tools": [TOOL]}, "tool_choice"),  # "auto" needs the template's call tags
        ({"include": ["file_search_call.results"]}, "include"),
        ({"include": 0}, "include"),
        ({"include": ""}, "include"),
        ({"include": {}}, "include"),
        ({"include": ["message.output_text.logprobs"], "top_logprobs": 50}, "top_logprobs"),
        ({"stream_options": {"include_obfuscation": False}}, "stream_options"),
        ({"metadata": {"k": 1}}, "metadata"),
        ({"store": "yes"}, "store"),
        ({"temperature": 3}, "temperature"),
        ({"mode": "fast"}, "mode"),
        ({"n": 2}, "n"),
    ],
)
def test_what_cannot_be_served_is_a_400_naming_the_responses_field(fields, param):
    with pytest.raises(ApiError) as e:
        parse(**fields)
    assert e.value.status == 400 and e.value.param == param, e.value.message
    assert e.value.message.startswith(param), e.value.message
    assert not re.search(r"messages|max_completion_tokens|response_format|\"function\": \{", e.value.message)


def test_the_store_keeps_the_most_recently_used_within_its_budget():
    def response(rid: str, text: str) -> dict:
        return {"id": rid, "output": [{"type": "message", "content": [{"type": "output_text", "text": text}]}]}

    store = ResponseStore(900)
    for rid in ("a", "b", "c"):
        assert store.put(response(rid, "x" * 100), [], 0)
    assert store.get("a") is not None  # used: now the newest
    assert store.put(response("d", "x" * 300), [], 0) and store.get("b") is None and store.get("a") is not None
    assert store.used <= 900 and not store.put(response("e", "x" * 1000), [], 0) and store.get("e") is None
    assert store.delete("a") and not store.delete("a") and store.get("a") is None


def test_a_chain_of_responses_keeps_each_item_once_and_breaks_where_a_link_went():
    store = ResponseStore(1 << 20)
    answer = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "x" * 500}, "logprobs": None,
                           "finish_reason": "stop"}],
              "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2,
                        "prompt_tokens_details": {"cached_tokens": 0}}}  # fmt: skip
    ids, sizes = [], []
    for turn in range(6):
        asked = ResponsesRequest(MODEL, "blt-s", TEMPLATE, store)
        body = {"model": MODEL, "input": f"turn {turn}: " + "u" * 500}
        if ids:
            body["previous_response_id"] = ids[-1]
        asked.parse(json.dumps(body).encode())
        assert len(asked.items) == 2 * turn + 1  # every turn before it, and its own input
        before = store.used
        ids.append(asked.answer(answer)["id"])
        sizes.append(store.used - before)
    assert max(sizes) < 1.2 * min(sizes)  # each response holds its own turn, not the turns before again
    texts = [i["content"][0]["text"][:6] for i in store.chain(ids[-1])]
    assert texts == [t for turn in range(6) for t in (f"turn {turn}", "x" * 6)]
    assert store.delete(ids[2]) and store.chain(ids[-1]) is None and store.chain(ids[1]) is not None
    with pytest.raises(ApiError) as e:
        ResponsesRequest(MODEL, "blt-s", TEMPLATE, store).parse(json.dumps({
            "model": MODEL, "input": "x", "previous_response_id": ids[-1]}).encode())  # fmt: skip
    assert e.value.param == "previous_response_id" and "or one it continued" in e.value.message


def test_a_response_continues_a_kept_one_without_its_instructions():
    store = ResponseStore(1 << 20)
    first = ResponsesRequest(MODEL, "blt-s", TEMPLATE, store)
    first.parse(json.dumps({"model": MODEL, "input": ASK, "instructions": INSTRUCTIONS}).encode())
    answer = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "path):"}, "logprobs": None,
                           "finish_reason": "stop"}],
              "usage": {"prompt_tokens": 1, "completion_tokens": 6, "total_tokens": 7,
                        "prompt_tokens_details": {"cached_tokens": 0}}}  # fmt: skip
    kept = first.answer(answer)
    assert kept["store"] is True and store.get(kept["id"]).response == kept
    second = ResponsesRequest(MODEL, "blt-s", TEMPLATE, store)
    comp = second.parse(json.dumps({"model": MODEL, "input": "more", "previous_response_id": kept["id"]}).encode())
    conversation = [{"role": "user", "content": ASK}, {"role": "assistant", "content": "path):"},
                    {"role": "user", "content": "more"}]  # fmt: skip
    assert comp.prompts == [TEMPLATE.render(conversation)] and second.echo["previous_response_id"] == kept["id"]
    with pytest.raises(ApiError) as e:
        second.parse(json.dumps({"model": MODEL, "input": [{"role": "user", "content": 3}],
                                 "previous_response_id": kept["id"]}).encode())  # fmt: skip
    assert e.value.param == "input[0].content"  # the request's own item, by its place in the request
    unkept = ResponsesRequest(MODEL, "blt-s", TEMPLATE, store)
    unkept.parse(json.dumps({"model": MODEL, "input": "x", "store": False}).encode())
    assert unkept.answer(answer)["store"] is False and store.get(unkept.id) is None


def _turns(n: int, size: int, text: str = "u") -> list[dict]:
    """n user/assistant turns of `size` bytes of `text` each (repeated), then a last user message."""
    body, items = (text * (size // len(text) + 1))[:size], []
    for t in range(n):
        items.append({"role": "user", "content": f"turn {t}: " + body})
        items.append({"type": "message", "role": "assistant", "content": [{"type": "output_text",
                                                                           "text": body[::-1]}]})  # fmt: skip
    return items + [{"role": "user", "content": "last"}]


def test_truncation_auto_drops_the_oldest_turns_that_do_not_fit_and_keeps_the_system_messages():
    items = [{"role": "developer", "content": "be brief"}, *_turns(6, 300)]
    body = {"model": MODEL, "input": items, "instructions": INSTRUCTIONS, "max_output_tokens": 100}

    def parsed(limit: int | None, **fields) -> tuple[ResponsesRequest, object]:
        asked = ResponsesRequest(MODEL, "blt-s", TEMPLATE)
        return asked, asked.parse(json.dumps({**body, **fields}).encode(), limit)

    whole = parsed(None, truncation="auto")[1].prompts[0]
    assert parsed(len(whole) + 100, truncation="auto")[1].prompts == [whole]  # it fits: nothing dropped
    asked, comp = parsed(2000, truncation="auto")
    (prompt,) = comp.prompts
    assert len(prompt.encode()) + 100 <= 2000 and asked.echo["truncation"] == "auto"
    assert prompt.startswith(f"# {INSTRUCTIONS}\n# be brief\n") and prompt.rstrip().endswith(">>> last")
    kept = [t for t in range(6) if f"turn {t}:" in prompt]
    assert kept and kept == list(range(kept[0], 6)) and kept[0] > 0  # whole turns, the newest, from a user message
    one_more = [{"role": "system", "content": INSTRUCTIONS}, {"role": "developer", "content": "be brief"}]
    one_more += _messages_of(items[1:])[2 * (kept[0] - 1) :]
    assert len(TEMPLATE.render(one_more).encode()) + 100 > 2000  # the fewest turns dropped
    assert len(asked.items) == len(items)  # the kept response holds the whole conversation
    assert parsed(2000)[1].prompts == [whole]  # truncation disabled: the server's size check refuses it
    with pytest.raises(ApiError) as e:  # instructions, "be brief" and ">>> last" leave less than 100 bytes
        parsed(120, truncation="auto")
    assert e.value.param == "input" and e.value.code == "context_length_exceeded" and "last turn" in e.value.message


def _messages_of(items: list[dict]) -> list[dict]:
    """Chat messages of `_turns` items."""
    return [{"role": i["role"], "content": i["content"] if isinstance(i["content"], str) else i["content"][0]["text"]}
            for i in items]  # fmt: skip


def test_max_tool_calls_is_echoed_and_changes_nothing():
    asked = ResponsesRequest(MODEL, "blt-s", TEMPLATE)
    comp = asked.parse(json.dumps({"model": MODEL, "input": ASK, "instructions": INSTRUCTIONS,
                                   "max_tool_calls": 2}).encode())  # fmt: skip
    assert asked.echo["max_tool_calls"] == 2 and comp.options == parse().options  # limits hosted tools: none here


def test_a_server_without_a_template_has_no_responses():
    with pytest.raises(ApiError) as e:
        ResponsesRequest(MODEL, "blt-s", None).parse(b'{"model": "fastblt-default", "input": "x"}')
    assert e.value.status == 404 and "--chat-template" in e.value.message


DONE = "[DONE]"  # the last body of chat's stream


def _chunk(delta: dict, reason: str | None = None, usage: dict | None = None) -> dict:
    choices = [] if usage else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}]
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "choices": choices, "usage": usage}


def _events(bodies: list[dict | str]) -> list[dict]:
    """The Responses events a streamed request sends for chat's stream `bodies`."""
    asked = ResponsesRequest(MODEL, "blt-s", TEMPLATE)
    asked.parse(json.dumps({"model": MODEL, "input": "x"}).encode())
    out = []
    for raw in b"".join(asked.frame(b) for b in bodies).decode().split("\n\n")[:-1]:
        event, data = raw.split("\n")
        body = json.loads(data.removeprefix("data: "))
        assert event == f"event: {body['type']}"
        out.append(body)
    return out


def test_a_chat_stream_becomes_responses_events_in_order():
    usage = {"prompt_tokens": 5, "completion_tokens": 9, "total_tokens": 14, "prompt_tokens_details": {
        "cached_tokens": 0}}  # fmt: skip
    chunks = [_chunk({"role": "assistant", "content": "it "}), _chunk({"content": "is"}),
              _chunk({"tool_calls": [{"index": 0, "id": "call_a", "type": "function",
                                      "function": {"name": "f", "arguments": "{"}}]}),
              _chunk({"tool_calls": [{"index": 0, "function": {"arguments": "}"}}]}),
              _chunk({"tool_calls": [{"index": 1, "id": "call_b", "type": "function",
                                      "function": {"name": "g", "arguments": "{}"}}]}),
              _chunk({}, "tool_calls"), _chunk({}, usage=usage), DONE]  # fmt: skip
    events = _events(chunks)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert [e["type"].removeprefix("response.") for e in events] == [
        "created", "in_progress", "output_item.added", "content_part.added", "output_text.delta",
        "output_text.delta", "output_text.done", "content_part.done", "output_item.done", "output_item.added",
        "function_call_arguments.delta", "function_call_arguments.delta", "function_call_arguments.done",
        "output_item.done", "output_item.added", "function_call_arguments.delta", "function_call_arguments.done",
        "output_item.done", "completed"]  # fmt: skip
    final = events[-1]["response"]
    assert final["status"] == "completed" and final["usage"]["output_tokens"] == 9
    assert [(o["type"], o.get("arguments")) for o in final["output"]] == [
        ("message", None), ("function_call", "{}"), ("function_call", "{}")]  # fmt: skip
    assert final["output"][0]["content"][0]["text"] == "it is" and final["output"][1]["call_id"] == "call_a"
    openai.types.responses.Response.model_validate({**final, "usage": None})  # what the client reads it as

    cut = _events([_chunk({"content": "a"}), _chunk({}, "length"), _chunk({}, usage=usage), DONE])
    assert cut[-1]["type"] == "response.incomplete"
    assert cut[-1]["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    error = {"error": {"message": "lane died", "type": "server_error", "param": None, "code": None}}
    failed = _events([_chunk({"content": "a"}), error, DONE])
    assert [e["type"] for e in failed[-2:]] == ["error", "response.failed"]
    assert failed[-1]["response"]["error"]["message"] == "lane died"
    empty = _events([_chunk({"role": "assistant", "content": ""}), _chunk({}, "stop"), _chunk({}, usage=usage), DONE])
    assert "response.output_text.delta" not in [e["type"] for e in empty]
    assert [o["content"][0]["text"] for o in empty[-1]["response"]["output"]] == [""]  # as the whole answer has it
    left = _events([_chunk({"content": "a"})])  # chat's stream cut (its client left): no verdict
    assert left[-1]["type"] == "response.output_text.delta"


# ---------------------------------------------------------------------------- the server
@pytest.mark.parametrize("mode", ("ar", "blt-d"))
def test_responses_equal_generate_of_the_rendered_prompt_streamed_or_not(server, reference, mode):
    c, prompt = client(server), TEMPLATE.render(MESSAGES)
    want = reference.generate(prompt, mode=mode, max_bytes=32, temperature=0.0, stop=[CHAT_STOP])
    ask = dict(model=MODEL, input=ASK, instructions=INSTRUCTIONS, max_output_tokens=32, temperature=0,
               extra_body={"mode": mode}, metadata={"job": "t"})  # fmt: skip
    r = c.responses.create(**ask)
    assert r.object == "response" and r.id.startswith("resp_") and r.model == MODEL and r.store is True
    assert r.output_text == want.text and r.metadata == {"job": "t"} and r.instructions == INSTRUCTIONS
    assert r.status == ("incomplete" if want.stop_reason == "max_bytes" else "completed")
    assert r.usage.input_tokens == len(prompt.encode()) and r.usage.output_tokens == len(want.bytes)
    with c.responses.stream(**ask) as stream:
        events = list(stream)
    assert events[-1].type == f"response.{r.status}"  # the client's get_final_response waits for "completed" only
    final = events[-1].response
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == want.text
    # it came as it was written (text verified while the server wrote the last chunk joins the next
    # one, so how many there are depends on timing: blt-d's 32 bytes are a few blocks)
    assert len([e for e in events if e.type == "response.output_text.delta"]) > 1
    assert final.output_text == want.text and final.status == r.status and final.usage == r.usage
    # the message item's status too (incomplete when max_output_tokens cut it), streamed or not
    assert [o.status for o in final.output] == [o.status for o in r.output] == [r.status]


class Point(pydantic.BaseModel):
    x: int
    y: int


def test_structured_outputs_parse_into_the_clients_model(server, reference):
    c = client(server)
    parsed = 0
    for seed in range(3):
        try:
            r = c.responses.parse(model=MODEL, input="a point as json", text_format=Point, max_output_tokens=200,
                                  temperature=0.8, extra_body={"seed": seed})  # fmt: skip
        except openai.LengthFinishReasonError:
            continue
        if r.status == "completed":
            assert r.output_parsed == Point.model_validate_json(r.output_text)
            parsed += 1
    assert parsed >= 1


def test_calls_and_their_outputs_go_back_and_forth_as_items(server):
    c = client(server)
    ask = dict(model=MODEL, input="the weather in Paris, in celsius", tools=[TOOL], tool_choice="required",
               max_output_tokens=300, temperature=0)  # fmt: skip
    r = c.responses.create(**ask)
    messages = [{"role": "user", "content": ask["input"]}]
    same = c.chat.completions.create(model=MODEL, messages=messages, tools=[CHAT_TOOL], tool_choice="required",
                                     max_tokens=300, temperature=0)  # fmt: skip
    want = [(t.function.name, t.function.arguments) for t in same.choices[0].message.tool_calls]
    calls = [o for o in r.output if o.type == "function_call"]
    assert [(o.name, o.arguments) for o in calls] == want and want and r.output_text == ""
    assert all(o.call_id.startswith("call_") and o.id.startswith("fc_") for o in calls)
    with c.responses.stream(**ask) as stream:
        events = list(stream)
    pieces = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]
    final = events[-1].response
    assert [(o.name, o.arguments) for o in final.output if o.type == "function_call"] == want
    assert len(pieces) > 2 and "".join(pieces) == "".join(a for _, a in want)
    back = [*r.output, *({"type": "function_call_output", "call_id": o.call_id, "output": "21 C"} for o in calls)]
    then = c.responses.create(model=MODEL, input=[{"role": "user", "content": ask["input"]}, *back],
                              max_output_tokens=16, temperature=0)  # fmt: skip
    assert then.status in ("completed", "incomplete") and then.usage.input_tokens > r.usage.input_tokens


def test_kept_responses_are_read_continued_listed_and_deleted(server, reference):
    c = client(server)
    first = c.responses.create(model=MODEL, input=ASK, instructions=INSTRUCTIONS, max_output_tokens=16,
                               temperature=0)  # fmt: skip
    again = c.responses.retrieve(first.id)
    assert again.output_text == first.output_text and again.usage == first.usage and again.store
    second = c.responses.create(model=MODEL, input="print(", previous_response_id=first.id, max_output_tokens=16,
                                temperature=0)  # fmt: skip
    conversation = [{"role": "user", "content": ASK}, {"role": "assistant", "content": first.output_text},
                    {"role": "user", "content": "print("}]  # fmt: skip
    want = reference.generate(TEMPLATE.render(conversation), mode="blt-s", max_bytes=16, temperature=0.0,
                              stop=[CHAT_STOP])  # fmt: skip
    assert second.output_text == want.text and second.previous_response_id == first.id
    assert second.usage.input_tokens == len(TEMPLATE.render(conversation).encode())
    (item,) = c.responses.input_items.list(second.id).data  # its own input, not the continued one's
    assert item.type == "message" and item.content[0].text == "print("
    with c.responses.stream(model=MODEL, input="x", max_output_tokens=4, temperature=0) as stream:
        streamed = list(stream)[-1].response
    assert c.responses.retrieve(streamed.id).output_text == streamed.output_text  # kept as it ended
    assert c.responses.delete(first.id) is None
    with pytest.raises(openai.NotFoundError):
        c.responses.retrieve(first.id)
    with pytest.raises(openai.BadRequestError, match="previous_response_id"):
        c.responses.create(model=MODEL, input="x", previous_response_id=first.id)
    unkept = c.responses.create(model=MODEL, input="x", max_output_tokens=4, store=False)
    assert unkept.store is False
    with pytest.raises(openai.NotFoundError):
        c.responses.retrieve(unkept.id)


def test_a_conversation_past_the_limit_is_truncated_when_asked_else_refused(server, reference):
    c, items = client(server), _turns(6, 1500, CODE)  # ~18 KB, past the server's 16,384 bytes per request
    with pytest.raises(openai.BadRequestError) as e:
        c.responses.create(model=MODEL, input=items, max_output_tokens=8)
    assert e.value.body["param"] == "input" and e.value.body["code"] == "context_length_exceeded"
    r = c.responses.create(model=MODEL, input=items, max_output_tokens=8, temperature=0, truncation="auto")
    want, prompt = _truncated_alone(reference, items)
    assert r.truncation == "auto" and r.output_text == want.text and r.usage.input_tokens == len(prompt.encode())
    assert "turn 0:" not in prompt and "turn 5:" in prompt and r.usage.input_tokens <= 16384 - 8


def test_a_truncated_conversation_that_reaches_the_patch_limit_is_truncated_again(server, reference):
    """A run of one byte patches ~1 byte at a time here, so 16 KB of it is ~4x the model's 4,096
    patches: the byte limit's truncation reaches the position limit in the prefill, and the
    conversation is truncated again to the bytes read before it."""
    items = _turns(6, 1500, "u")
    with client(server).responses.stream(model=MODEL, input=items, max_output_tokens=8, temperature=0,
                                         truncation="auto") as stream:  # fmt: skip
        final = list(stream)[-1].response
    want, prompt = _truncated_alone(reference, items)
    assert len(prompt.encode()) < 16384 // 2 and final.output_text == want.text
    assert final.usage.input_tokens == len(prompt.encode())


CODE = ASK * 200


def _truncated_alone(reference, items: list[dict]):
    """What the server answers a truncation-auto request of `items` with (8 bytes at most): the
    conversation fitted under its 16,384 bytes, then again while its text reaches the patch limit."""
    asked = ResponsesRequest(MODEL, "blt-s", TEMPLATE)
    body = {"model": MODEL, "input": items, "max_output_tokens": 8, "truncation": "auto"}
    comp = asked.parse(json.dumps(body).encode(), 16384)
    for _ in range(3):
        (prompt,) = comp.prompts
        try:
            return reference.generate(prompt, mode="blt-s", max_bytes=8, temperature=0.0, stop=[CHAT_STOP]), prompt
        except PositionLimit as e:
            comp = asked.refit(e)
    raise AssertionError("still past the patch limit")


def test_background_responses_are_queued_answered_later_and_may_be_cancelled(server, reference):
    """background: true answers at once with the queued Response; polling reads it in progress and
    then answered as a foreground request would have been; a cancelled one stops (its row freed)
    and reads cancelled; only background responses are cancelled."""
    c = client(server)
    r = c.responses.create(model=MODEL, input=ASK, instructions=INSTRUCTIONS, background=True, max_output_tokens=32,
                           temperature=0)  # fmt: skip
    assert r.status == "queued" and r.background is True and r.output == []
    final = _polled(c, r.id)
    want = reference.generate(TEMPLATE.render(MESSAGES), mode="blt-s", max_bytes=32, temperature=0.0, stop=[CHAT_STOP])
    assert final.output_text == want.text and final.background is True and final.status in ("completed", "incomplete")
    long = c.responses.create(model=MODEL, input=ASK, background=True, max_output_tokens=16000, temperature=0,
                              extra_body={"mode": "ar"})  # fmt: skip
    with pytest.raises(openai.BadRequestError) as e:  # its output is not there yet to continue
        c.responses.create(model=MODEL, input="and then", previous_response_id=long.id, max_output_tokens=2)
    assert e.value.body["param"] == "previous_response_id" and e.value.body["code"] == "previous_response_in_progress"
    cancelled = c.responses.cancel(long.id)
    assert cancelled.status == "cancelled"  # its 16,000 bytes of ar would take seconds
    assert c.responses.retrieve(long.id).status == cancelled.status == "cancelled"
    assert c.responses.cancel(long.id).status == "cancelled"  # again: as it is
    then = c.responses.create(model=MODEL, input="and then", previous_response_id=long.id, max_output_tokens=2)
    assert then.status in ("completed", "incomplete")  # one that ended is continued (a cancelled one: its input)
    deadline = time.monotonic() + 10
    while _occupancy(server) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _occupancy(server) == 0
    foreground = c.responses.create(model=MODEL, input="x", max_output_tokens=2)
    with pytest.raises(openai.BadRequestError, match="only a background response"):
        c.responses.cancel(foreground.id)
    with pytest.raises(openai.BadRequestError) as e:
        c.responses.create(model=MODEL, input="x", background=True, store=False)
    assert e.value.body["param"] == "background"


def test_a_background_stream_goes_on_without_its_client_and_is_read_again_from_any_event(server, reference):
    """background + stream: the events go on when the client leaves (the answer never waited for
    it), and GET ?stream=true&starting_after=n reads them on from the next one, while the response
    runs or after; the events read in two parts are one stream, numbered without a gap, whose text
    and final Response are what a foreground request gets and what is kept."""
    c = client(server)
    first = []
    with c.responses.create(model=MODEL, input=ASK, instructions=INSTRUCTIONS, background=True, stream=True,
                            max_output_tokens=48, temperature=0) as events:  # fmt: skip
        for event in events:
            first.append(event)
            if event.type == "response.output_text.delta":
                break  # the client leaves at its first text
    rid = first[0].response.id
    assert [e.type for e in first[:3]] == ["response.created", "response.queued", "response.in_progress"]
    assert first[0].response.status == "queued" and first[0].response.background is True
    kept = _polled(c, rid)  # answered with no client reading
    rest = list(c.responses.retrieve(rid, stream=True, starting_after=first[-1].sequence_number))
    every = first + rest
    assert [e.sequence_number for e in every] == list(range(len(every)))
    want = reference.generate(TEMPLATE.render(MESSAGES), mode="blt-s", max_bytes=48, temperature=0.0, stop=[CHAT_STOP])
    assert "".join(e.delta for e in every if e.type == "response.output_text.delta") == want.text
    final = every[-1]
    assert final.type == f"response.{kept.status}" and final.response.output_text == kept.output_text == want.text
    text = httpx.get(f"{server.url}/metrics").text
    kept = dict(re.findall(r'^fastblt_kept_bytes\{store="(\w+)"\} (\S+)$', text, re.M))
    assert float(kept["events"]) >= sum(len(e.model_dump_json()) for e in every) / 2 and float(kept["responses"]) > 0
    assert re.search(r"^fastblt_background_responses 0\.0$", text, re.M)  # none running now
    with c.responses.stream(response_id=rid) as again:  # the client's own helper, from the first event
        read = [e.model_dump(exclude={"snapshot", "parsed"}) for e in again]  # (what the helper adds)
    assert read == [e.model_dump() for e in every]


def test_a_background_stream_read_while_it_runs_ends_when_it_is_cancelled(server):
    """A reader following a running background stream gets its events as they are made; a cancel
    ends the stream with an error event, and the kept response reads cancelled, its rows freed."""
    c = client(server)
    with c.responses.create(model=MODEL, input=ASK, background=True, stream=True, max_output_tokens=16000,
                            temperature=0, extra_body={"mode": "ar"}) as events:  # fmt: skip
        rid = next(iter(events)).response.id
    assert re.search(r"^fastblt_background_responses 1\.0$", httpx.get(f"{server.url}/metrics").text, re.M)
    follower = c.responses.retrieve(rid, stream=True, starting_after=1)
    seen = []
    for event in follower:
        seen.append(event)
        if event.type == "response.output_text.delta" and len(seen) == 4:
            assert c.responses.cancel(rid).status == "cancelled"
    assert seen[0].sequence_number == 2 and seen[0].type == "response.in_progress"
    assert seen[-1].type == "error" and seen[-1].code == "response_cancelled"
    assert c.responses.retrieve(rid).status == "cancelled"
    with c.responses.create(model=MODEL, input=ASK, background=True, stream=True, max_output_tokens=16000,
                            temperature=0, extra_body={"mode": "ar"}) as events:  # fmt: skip
        running = next(iter(events)).response.id
    c.responses.delete(running)  # a running one stops (its rows freed), so its end does not keep it again
    deadline = time.monotonic() + 3  # its 16,000 bytes of ar would take seconds more
    while _occupancy(server) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _occupancy(server) == 0
    with pytest.raises(openai.NotFoundError):
        c.responses.retrieve(running)


def test_a_background_stream_that_fails_before_its_text_says_so_in_events_and_is_kept_failed(server):
    """A run of one byte patches ~1 byte at a time, so 8 KB of it passes the model's 4,096 patches
    in its prefill: the stream says why (an error naming the field, then response.failed) and the
    kept response reads failed. What a request is refused for up front is a 400 at once."""
    c = client(server)
    with c.responses.create(model=MODEL, input="u" * 8000, background=True, stream=True,
                            max_output_tokens=8) as events:  # fmt: skip
        got = list(events)
    assert [e.type for e in got] == ["response.created", "response.queued", "response.in_progress", "error",
                                     "response.failed"]  # fmt: skip
    assert got[3].param == "input" and got[3].code == "context_length_exceeded"
    assert got[-1].response.status == "failed" and got[-1].response.error.code == "context_length_exceeded"
    assert c.responses.retrieve(got[0].response.id).status == "failed"
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as e:
            c.responses.create(model=MODEL, input="x", background=True, stream=stream, max_output_tokens=10**6)
        assert e.value.body["param"] == "max_output_tokens"


def test_only_background_streams_are_read_again_and_the_query_is_checked(server):
    url, auth = server.url, {"Authorization": f"Bearer {KEY}"}
    foreground = client(server).responses.create(model=MODEL, input="x", max_output_tokens=2)
    got = httpx.get(f"{url}/v1/responses/{foreground.id}", params={"stream": "true"}, headers=auth)
    assert got.status_code == 400 and got.json()["error"]["param"] == "stream", got.text
    for query, param in (({"stream": "yes"}, "stream"), ({"starting_after": "3"}, "starting_after"),
                         ({"stream": "true", "starting_after": "-1"}, "starting_after")):  # fmt: skip
        got = httpx.get(f"{url}/v1/responses/{foreground.id}", params=query, headers=auth)
        assert got.status_code == 400 and got.json()["error"]["param"] == param, (query, got.text)
    assert httpx.get(f"{url}/v1/responses/resp_none", params={"stream": "true"}, headers=auth).status_code == 404
    assert httpx.get(f"{url}/v1/responses/{foreground.id}", params={"stream": "false"}, headers=auth).json()[
        "id"] == foreground.id  # fmt: skip


USAGE = {"prompt_tokens": 3, "prompt_tokens_details": {"cached_tokens": 0}, "completion_tokens": 2, "total_tokens": 5}


@pytest.mark.parametrize("streamed", (False, True))
def test_a_cancel_that_lands_after_the_answer_was_kept_leaves_it_answered(streamed):
    """A cancel may land while a background answer's last frame is written (on another thread):
    the answer claimed the last word first, so it stays kept as answered, and a stream's events
    end with its response.completed, no cancel after it."""
    from fastblt.serve.replay import Replays

    async def main() -> None:
        store, replays = ResponseStore(1 << 20), Replays(1 << 20)
        asked = ResponsesRequest(MODEL, "blt-s", TEMPLATE, store)
        body = {"model": MODEL, "input": ASK, "background": True, "stream": streamed}
        asked.parse(json.dumps(body).encode())
        gate = asyncio.Event()

        async def work() -> None:
            if streamed:
                chunk = {"choices": [{"index": 0, "delta": {"content": "ok"}, "finish_reason": "stop"}],
                         "usage": USAGE}  # fmt: skip
                asked.frame(chunk)
                await asyncio.to_thread(asked.frame, "[DONE]")
            else:
                message = {"role": "assistant", "content": "ok", "tool_calls": None}
                asked.answer({"choices": [{"message": message, "finish_reason": "stop"}], "usage": USAGE})
            await gate.wait()  # the task has not ended when the cancel lands

        await asked.start(work(), {}, replays)
        while store.get(asked.id).response["status"] != "completed":
            await asyncio.sleep(0.01)
        await asked.cancel()
        assert store.get(asked.id).response["status"] == "completed"
        if streamed:
            events = [json.loads(e.split(b"data: ", 1)[1]) for e in replays.get(asked.id).events]
            assert events[-1]["type"] == "response.completed" and replays.get(asked.id).ended

    asyncio.run(main())


def _polled(c, rid: str, seconds: float = 60):
    """The kept response once it is no longer queued or in progress."""
    deadline = time.monotonic() + seconds
    while (got := c.responses.retrieve(rid)).status in ("queued", "in_progress"):
        assert time.monotonic() < deadline, got.status
        time.sleep(0.05)
    return got


def _occupancy(server) -> float:
    text = httpx.get(f"{server.url}/metrics").text
    return float(re.search(r"^fastblt_batch_occupancy (\S+)$", text, re.M).group(1))


def test_logprobs_are_chats(server):
    c = client(server)
    r = c.responses.create(model=MODEL, input=ASK, max_output_tokens=12, temperature=0, top_logprobs=2,
                           include=["message.output_text.logprobs"])  # fmt: skip
    ch = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": ASK}], max_tokens=12,
                                   temperature=0, logprobs=True, top_logprobs=2)  # fmt: skip
    got = [lp.model_dump() for lp in r.output[0].content[0].logprobs]
    assert got == [e.model_dump() for e in ch.choices[0].logprobs.content] and len(got) == 12


def test_refusals_are_4xx_counted_under_responses_and_the_server_stays_up(server):
    url, auth = server.url, {"Authorization": f"Bearer {KEY}"}

    def counted(status: str) -> float:  # over every mode
        found = re.findall(rf'^fastblt_requests_total\{{endpoint="responses",mode="[^"]*",status="{status}"\}} (\S+)$',
                           httpx.get(f"{url}/metrics").text, re.M)  # fmt: skip
        return sum(map(float, found))

    before = counted("400")
    with pytest.raises(openai.BadRequestError, match="previous_response_id"):
        client(server).responses.create(model=MODEL, input="x", previous_response_id="resp_1")
    r = httpx.post(f"{url}/v1/responses", content=b"{", headers=auth)
    assert r.status_code == 400 and r.json()["error"]["message"]
    nope = {"format": {"type": "json_schema", "name": "w", "schema": {"type": "nope"}}}  # refused as it compiles
    r = httpx.post(f"{url}/v1/responses", json={"model": MODEL, "input": "x", "text": nope}, headers=auth)
    assert r.status_code == 400 and r.json()["error"]["param"] == "text.format", r.text
    assert httpx.post(f"{url}/v1/responses", json={"model": MODEL, "input": "x"}).status_code == 401
    assert counted("400") - before == 3 and httpx.get(f"{url}/health").status_code == 200


def test_a_named_custom_tool_answers_with_a_custom_tool_call_item_streamed_as_openais(server, reference):
    """A custom tool (a grammar format, Lark's or a regex) named by tool_choice: the output is one
    custom_tool_call whose input is chat's (the Generator's text under the grammar); streamed, its
    input comes in custom_tool_call_input deltas; passed back with its output, the next turn is
    answered."""
    c, ask = client(server), "is os.path.join pure? answer yes or no"
    tool = {"type": "custom", "name": "answer", "description": "yes or no, and a percentage",
            "format": {"type": "grammar", "syntax": "regex", "definition": r"(yes|no), \d{1,3}%"}}  # fmt: skip
    opts = dict(model=MODEL, input=ask, tools=[tool], tool_choice={"type": "custom", "name": "answer"},
                max_output_tokens=40, temperature=0)  # fmt: skip
    r = c.responses.create(**opts)
    listed = [{"type": "custom", "custom": {k: v for k, v in tool.items() if k != "type"},
               "function": {"name": "answer", "description": tool["description"]}}]  # fmt: skip
    want = reference.generate(TEMPLATE.render([{"role": "user", "content": ask}], listed), mode="blt-s", max_bytes=40,
                              temperature=0.0, pattern=r"(yes|no), \d{1,3}%", stop=[CHAT_STOP])  # fmt: skip
    (call,) = r.output
    assert (call.type, call.name, call.input, r.status) == ("custom_tool_call", "answer", want.text, "completed")
    assert re.fullmatch(r"(yes|no), \d{1,3}%", call.input) and call.call_id.startswith("call_")
    with c.responses.stream(**opts) as stream:
        events = list(stream)
    kinds = [e.type for e in events]
    assert kinds[2] == "response.output_item.added" and events[2].item.type == "custom_tool_call"
    assert kinds[-3:] == ["response.custom_tool_call_input.done", "response.output_item.done", "response.completed"]
    deltas = [e.delta for e in events if e.type == "response.custom_tool_call_input.delta"]
    assert "".join(deltas) == events[-3].input == events[-1].response.output[0].input == want.text
    back = [{"type": "custom_tool_call", "call_id": call.call_id, "name": "answer", "input": call.input},
            {"type": "custom_tool_call_output", "call_id": call.call_id, "output": "noted"}]  # fmt: skip
    then = c.responses.create(
        model=MODEL, previous_response_id=r.id, input=back[1:], max_output_tokens=4, temperature=0
    )
    again = c.responses.create(
        model=MODEL, input=[{"role": "user", "content": ask}, *back], max_output_tokens=4, temperature=0
    )
    assert then.status == again.status == "incomplete" and then.output_text == again.output_text
    required = dict(opts, tool_choice="required", max_output_tokens=120)  # a JSON text of calls: input a string
    whole = c.responses.create(**required)
    with c.responses.stream(**required) as stream:
        final = list(stream)[-1].response
    customs = [item for item in whole.output if item.type == "custom_tool_call"]
    assert customs and re.fullmatch(r"(yes|no), \d{1,3}%", customs[0].input)
    assert [i.model_dump(exclude={"id", "call_id"}) for i in final.output] == [
        i.model_dump(exclude={"id", "call_id"}) for i in whole.output]  # fmt: skip


def test_a_custom_tools_grammar_error_names_the_responses_field():
    tool = {"type": "custom", "name": "a", "format": {"type": "grammar", "syntax": "lark", "definition": "start: x"}}
    with pytest.raises(ApiError) as e:
        parse(tools=[tool], tool_choice={"type": "custom", "name": "a"})
    assert e.value.message == "tools[0].format.definition: rule x is used but not defined" and e.value.param == "tools"
    with pytest.raises(ApiError) as e:
        parse(tools=[{**tool, "format": {"type": "lark"}}], tool_choice={"type": "custom", "name": "a"})
    assert '{"type": "grammar", "syntax": "lark" or "regex", "definition": str}' in e.value.message
    lark = {**tool, "format": {**tool["format"], "definition": 'start: "x"'}}
    with pytest.raises(ApiError) as e:
        parse(tools=[lark], tool_choice="required")  # a Lark grammar: called only when named
    assert e.value.param == "tool_choice" and '{"type": "custom", "name": ...}' in e.value.message


def test_input_tokens_are_counted_as_the_same_request_counts_them_and_nothing_is_kept(server):
    """POST /v1/responses/input_tokens: the bytes of the prompt POST /v1/responses would render
    for the same fields (instructions, tools, a previous response, a conversation)."""
    c = client(server)
    first = c.responses.create(model=MODEL, input=ASK, instructions=INSTRUCTIONS, max_output_tokens=4, temperature=0)
    conv = c.conversations.create(items=[{"role": "user", "content": "import os"}])
    bodies = [dict(input=ASK, instructions=INSTRUCTIONS),
              dict(input="the weather in Paris, in celsius", tools=[TOOL], tool_choice="required"),
              dict(input="and then", previous_response_id=first.id),
              dict(input=[{"role": "user", "content": "def main("}], conversation=conv.id)]  # fmt: skip
    for body in bodies:
        counted = c.responses.input_tokens.count(**body)
        assert counted.object == "response.input_tokens" and counted.input_tokens > 0
        assert len(c.conversations.items.list(conv.id).data) == 1  # counting adds nothing to a conversation
        r = c.responses.create(model=MODEL, **body, max_output_tokens=1, temperature=0, store=False)
        assert counted.input_tokens == r.usage.input_tokens, body
    with pytest.raises(openai.BadRequestError) as e:
        c.responses.input_tokens.count(input=ASK, extra_body={"max_output_tokens": 4})
    assert e.value.body["param"] == "max_output_tokens"
    with pytest.raises(openai.BadRequestError) as e:
        c.responses.input_tokens.count(input="x", previous_response_id="resp_none")
    assert e.value.body["param"] == "previous_response_id"
    with pytest.raises(openai.NotFoundError):
        c.responses.input_tokens.count(model="gpt-4o", input="x")
