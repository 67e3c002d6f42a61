"""POST /v1/chat/completions: the messages rendered by the server's chat template, answered as
a completion of that prompt (equal to Generator.generate of it) in OpenAI's chat shapes, with the
real openai client; bodies checked field by field; JSON mode and structured outputs through
response_format (chat and completions), down to the client's parse into a Pydantic model."""

from __future__ import annotations

import json
import re
from typing import Literal

import httpx
import jsonschema
import openai
import pydantic
import pytest
from conftest import CHAT_STOP, CHAT_TEMPLATE, KEY
from openai.lib._pydantic import to_strict_json_schema  # what the client sends for a Pydantic model

from fastblt.errors import InputError
from fastblt.runtime import grammar
from fastblt.serve.api import ApiError
from fastblt.serve.chat import ChatTemplate, parse_chat_body

MODEL = "fastblt-default"
TEMPLATE = ChatTemplate(CHAT_TEMPLATE, stops=(CHAT_STOP,))  # as the test server has it
MESSAGES = [{"role": "system", "content": "path helpers"}, {"role": "user", "content": "import os\n\n\ndef main("}]


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=120)


def parse(**fields):
    body = {"model": MODEL, "messages": MESSAGES, **fields}
    return parse_chat_body(json.dumps({k: v for k, v in body.items() if v is not DROP}).encode(), MODEL, "blt-s",
                           TEMPLATE)  # fmt: skip


DROP = object()


# ---------------------------------------------------------------------------- no server
def test_a_template_renders_as_hugging_face_renders_one():
    """trim_blocks and lstrip_blocks, the generation prompt asked for, special ids as "", and a
    tojson that leaves HTML alone (Jinja's own escapes it)."""
    source = """{{ bos_token }}
    {% for m in messages %}
        <|{{ m.role }}|>{{ m.content }}{{ eos_token }}
    {% endfor %}
    {% if add_generation_prompt %}<|assistant|>{% endif %}{{ {"a": "<b> & é"} | tojson }}"""
    rendered = ChatTemplate(source).render([{"role": "user", "content": "hi"}])
    assert rendered == '\n        <|user|>hi\n<|assistant|>{"a": "<b> & é"}'  # text keeps its spaces, tags do not


def test_a_template_file_that_cannot_be_used_is_one_error_naming_it(tmp_path):
    with pytest.raises(InputError, match=r"chat template .*nothing\.jinja: no such file"):
        ChatTemplate.load(tmp_path / "nothing.jinja")
    bad = tmp_path / "bad.jinja"
    bad.write_text("{% for m in messages %}\n{{ m.content }}\n")
    with pytest.raises(InputError, match=r"bad\.jinja: line 2: Unexpected end of template.*endfor"):
        ChatTemplate.load(bad)
    bad.write_bytes(b"\xff{{ messages }}")
    with pytest.raises(InputError, match="not UTF-8"):
        ChatTemplate.load(bad)


def test_a_template_refusing_the_messages_is_a_400_and_one_failing_a_500():
    with pytest.raises(ApiError) as e:
        TEMPLATE.render([*MESSAGES, {"role": "system", "content": "late"}])
    assert e.value.status == 400 and e.value.param == "messages" and "a system message comes first" in e.value.message
    with pytest.raises(ApiError) as e:
        ChatTemplate("{{ messages[0].content.upper(1, 2) }}").render(MESSAGES)
    assert e.value.status == 500 and e.value.kind == "server_error"
    with pytest.raises(ApiError) as e:  # the sandbox: no way out to Python's internals
        ChatTemplate("{{ messages.__class__.__mro__ }}").render(MESSAGES)
    assert e.value.status == 500


def test_a_chat_body_is_the_rendered_prompt_with_its_options():
    comp = parse(max_completion_tokens=12, temperature=0, n=2, stop="\n", logprobs=True, top_logprobs=2, mode="ar")
    assert comp.prompts == [TEMPLATE.render(MESSAGES)] == ["# path helpers\n>>> import os\n\n\ndef main(\n"]
    assert (comp.max_tokens, comp.tokens_field, comp.n, comp.logprobs) == (12, "max_completion_tokens", 2, 2)
    assert comp.options == {"mode": "ar", "temperature": 0.0, "stop": ["\n", CHAT_STOP], "logprobs": 2}
    assert parse().options["stop"] == [CHAT_STOP] == parse(stop=[CHAT_STOP]).options["stop"]  # the turn's end, once
    assert parse().max_tokens is None and parse().options["mode"] == "blt-s"  # as much as fits, the server's mode
    assert parse(max_tokens=7).max_tokens == 7 == parse(max_tokens=7, max_completion_tokens=7).max_tokens
    assert "logprobs" not in parse(logprobs=False).options
    parts = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
              "name": "ann"}]  # fmt: skip
    assert parse(messages=parts).prompts == [">>> a\nb\n"]
    # what clients send when nothing is asked for, and a message passed back as the client got it
    back = {"role": "assistant", "content": "x", "refusal": None, "tool_calls": None, "function_call": None,
            "audio": None, "annotations": None}  # fmt: skip
    neutral = dict(tools=[], tool_choice="none", response_format={"type": "text"}, store=False,
                   parallel_tool_calls=True, metadata=None, service_tier="auto", user="u")  # fmt: skip
    assert parse(messages=[*MESSAGES, back], **neutral).prompts == [TEMPLATE.render(MESSAGES) + "x\n"]
    assert "priority" not in parse(**neutral).options  # "auto" and "default" keep the queue's order
    tiers = [parse(service_tier=t).options["priority"] for t in ("flex", "priority")]
    assert tiers == [1, -1] and parse(service_tier="flex", priority=5).options["priority"] == 5
    with pytest.raises(ApiError) as e:
        parse(service_tier="scale")
    assert e.value.param == "service_tier" and "flex" in e.value.message


def test_an_answer_may_continue_the_final_assistant_message():
    """vLLM's continue_final_message: the prompt ends right after the final (assistant's) message's
    content, which the answer continues; refused where there is nothing to continue or a grammar
    would read the answer from its start."""
    prefill = [*MESSAGES, {"role": "assistant", "content": "    path = os.path.join("}]
    comp = parse(messages=prefill, continue_final_message=True, add_generation_prompt=False)
    assert comp.prompts == [TEMPLATE.render(MESSAGES).rstrip("\n") + "\n    path = os.path.join("]
    assert parse(messages=prefill, continue_final_message=True).prompts == comp.prompts  # the default then: false
    stripped = ChatTemplate("{% for m in messages %}<{{ m.content | trim }}>{% endfor %}")
    body = {"model": MODEL, "messages": [{"role": "assistant", "content": " x "}], "continue_final_message": True}
    assert parse_chat_body(json.dumps(body).encode(), MODEL, "blt-s", stripped).prompts == ["<x"]
    for fields, param in (
        ({"continue_final_message": True, "add_generation_prompt": True}, "continue_final_message"),
        ({"add_generation_prompt": False}, "add_generation_prompt"),
        ({"continue_final_message": True, "messages": MESSAGES}, "continue_final_message"),
        ({"continue_final_message": True, "response_format": {"type": "json_object"}}, "continue_final_message"),
        ({"continue_final_message": "yes"}, "continue_final_message"),
    ):
        with pytest.raises(ApiError) as e:
            parse(**{"messages": prefill, **fields})
        assert e.value.status == 400 and e.value.param == param, e.value.message
    hidden = ChatTemplate("{% for m in messages %}{{ m.role }}{% endfor %}")  # renders no content
    with pytest.raises(ApiError, match="does not render the final message's content"):
        body = {"model": MODEL, "messages": prefill, "continue_final_message": True}
        parse_chat_body(json.dumps(body).encode(), MODEL, "blt-s", hidden)


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"messages": DROP}, "messages"),
        ({"messages": []}, "messages"),
        ({"messages": "import os"}, "messages"),
        ({"messages": [3]}, "messages"),
        ({"messages": [{"role": "tool", "content": "1"}]}, "messages[0].tool_call_id"),
        ({"messages": [{"role": "user"}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": None}]}, "messages[0].content"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
            "messages[0].content",
        ),  # fmt: skip
        ({"messages": [{"role": "user", "content": "\ud800"}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": "x", "tool_calls": [{"id": "1"}]}]}, "messages[0].tool_calls"),
        ({"messages": [{"role": "user", "content": "x", "name": 3}]}, "messages[0].name"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tool_choice"),
        ({"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}}, "response_format"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "format": 1}}}, "response_format"),
        ({"response_format": {"type": "xml"}}, "response_format"),
        ({"response_format": "json"}, "response_format"),
        ({"structured_outputs": {"regex": "(?<=a)b"}}, "structured_outputs.regex"),
        ({"structured_outputs": {"regex": 3}}, "structured_outputs.regex"),
        ({"structured_outputs": {"choice": []}}, "structured_outputs.choice"),
        ({"structured_outputs": {"choice": ["a", 1]}}, "structured_outputs.choice"),
        ({"structured_outputs": {"choice": ["\ud800"]}}, "structured_outputs.choice"),
        ({"structured_outputs": {"json": 3}}, "structured_outputs.json"),
        ({"structured_outputs": {"grammar": "root ::= x"}}, "structured_outputs.grammar"),
        ({"structured_outputs": {"regexp": "a"}}, "structured_outputs.regexp"),
        ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs"),
        ({"structured_outputs": "a"}, "structured_outputs"),
        ({"structured_outputs": {"regex": "a"}, "response_format": {"type": "json_object"}}, "structured_outputs"),
        (
            {
                "structured_outputs": {"regex": "a"},
                "tools": [{"type": "function", "function": {"name": "f"}}],
                "tool_choice": "required",
            },
            "structured_outputs",
        ),  # fmt: skip
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"logprobs": 2}, "logprobs"),
        ({"max_tokens": 5, "max_completion_tokens": 6}, "max_tokens"),
        ({"max_completion_tokens": 0}, "max_completion_tokens"),
        ({"echo": True}, "echo"),
        ({"best_of": 2}, "best_of"),
        ({"prompt": "x"}, "prompt"),
        ({"n": 17}, "n"),
        ({"mode": "fast"}, "mode"),
        ({"model": "gpt-4o"}, "model"),
    ],
)
def test_a_chat_body_is_checked_field_by_field(fields, param):
    with pytest.raises(ApiError) as e:
        parse(**fields)
    assert e.value.status in (400, 404) and e.value.param == param, e.value.message
    assert e.value.message.startswith(param.split("[")[0]) or "model" in param


def test_without_a_template_there_is_no_chat_endpoint():
    with pytest.raises(ApiError) as e:
        parse_chat_body(b"{}", MODEL, "blt-s", None)
    assert e.value.status == 404 and "--chat-template" in e.value.message


# ---------------------------------------------------------------------------- a server
@pytest.mark.parametrize("mode", ("ar", "blt-s", "blt-d", "blt-dv"))
def test_chat_equals_generate_of_the_rendered_prompt(server, reference, mode):
    c, prompt = client(server), TEMPLATE.render(MESSAGES)
    want = reference.generate(prompt, mode=mode, max_bytes=32, temperature=0.0, stop=[CHAT_STOP])
    opts = dict(model=MODEL, messages=MESSAGES, max_completion_tokens=32, temperature=0, extra_body={"mode": mode})
    r = c.chat.completions.create(**opts)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == MODEL
    (ch,) = r.choices
    assert ch.message.role == "assistant" and ch.message.content == want.text and ch.logprobs is None
    assert ch.finish_reason == ("length" if want.stop_reason == "max_bytes" else "stop")
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(prompt.encode()), len(want.ids))

    chunks = list(c.chat.completions.create(stream=True, stream_options={"include_usage": True}, **opts))
    *deltas, last = chunks
    assert {x.object for x in chunks} == {"chat.completion.chunk"} and len({x.id for x in chunks}) == 1
    assert [x.choices[0].delta.role for x in deltas] == ["assistant"] + [None] * (len(deltas) - 1)
    assert "".join(x.choices[0].delta.content or "" for x in deltas) == want.text
    assert [x.choices[0].finish_reason for x in deltas] == [None] * (len(deltas) - 1) + [ch.finish_reason]
    assert last.choices == [] and last.usage == r.usage


def test_a_continued_answer_is_generate_of_the_prompt_cut_after_the_prefill(server, reference):
    prefill = [*MESSAGES, {"role": "assistant", "content": "    path = os.path.join("}]
    prompt = parse(messages=prefill, continue_final_message=True).prompts[0]
    want = reference.generate(prompt, mode="blt-s", max_bytes=24, temperature=0.0, stop=[CHAT_STOP])
    r = client(server).chat.completions.create(model=MODEL, messages=prefill, max_tokens=24, temperature=0,
                                               extra_body={"continue_final_message": True})  # fmt: skip
    assert r.choices[0].message.content == want.text and r.usage.prompt_tokens == len(prompt.encode())


def requests_counted(server, endpoint: str, mode: str = "blt-s", status: int = 200) -> float:
    """fastblt_requests_total for these labels on the server's /metrics (0 before the first)."""
    series = f'fastblt_requests_total{{endpoint="{endpoint}",mode="{mode}",status="{status}"}}'
    m = re.search(rf"^{re.escape(series)} (\S+)$", httpx.get(f"{server.url}/metrics").text, re.M)
    return 0.0 if m is None else float(m.group(1))


def test_requests_are_counted_by_their_endpoint(server):
    before = {e: requests_counted(server, e) for e in ("chat", "completions")}
    client(server).chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        client(server).chat.completions.create(model=MODEL, messages=[], max_tokens=2)
    after = {e: requests_counted(server, e) for e in ("chat", "completions")}
    assert after == {"chat": before["chat"] + 1, "completions": before["completions"]}
    assert requests_counted(server, "chat", "unknown", 400) >= 1  # refused before its mode was read


def test_chat_logprobs_are_the_engines_per_byte_up_to_a_stop(server, reference):
    c, prompt = client(server), TEMPLATE.render(MESSAGES)
    want = reference.generate(prompt, mode="blt-s", max_bytes=24, temperature=0.0, logprobs=3, stop=[CHAT_STOP])
    stop = want.bytes[10:12]
    cut = want.bytes.find(stop)
    opts = dict(model=MODEL, messages=MESSAGES, max_tokens=24, temperature=0, logprobs=True, top_logprobs=3,
                stop=stop.decode())  # fmt: skip
    r = c.chat.completions.create(**opts)
    content = r.choices[0].logprobs.content
    assert r.choices[0].message.content == want.bytes[:cut].decode() and len(content) == cut
    for j, e in enumerate(content):
        assert e.bytes == [want.bytes[j]] and abs(e.logprob - want.logprobs[j]) < 1e-4
        assert e.token == (chr(want.bytes[j]) if want.bytes[j] < 0x80 else f"bytes:\\x{want.bytes[j]:02x}")
        top = {t.bytes[0]: t.logprob for t in e.top_logprobs}
        assert len(top) == 3 and max(top, key=top.get) == want.bytes[j]  # greedy: the chosen byte is the likeliest
    chunks = list(c.chat.completions.create(stream=True, **opts))
    streamed = [e for x in chunks if x.choices[0].logprobs is not None for e in x.choices[0].logprobs.content]
    assert streamed == content


def test_sampled_chat_choices_are_seeded_requests(server, reference):
    c, prompt = client(server), TEMPLATE.render(MESSAGES)
    r = c.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=24, temperature=1.0, seed=7, n=2)
    want = [reference.generate(prompt, mode="blt-s", max_bytes=24, temperature=1.0, seed=7 + i, stop=[CHAT_STOP]).text
            for i in (0, 1)]  # fmt: skip
    assert [ch.message.content for ch in sorted(r.choices, key=lambda ch: ch.index)] == want
    assert want[0] != want[1]


def test_the_templates_turn_end_stops_the_answer(server, reference):
    """--chat-stop: where the model writes the next user turn's marker, the assistant's turn ends."""
    c, prompt = client(server), TEMPLATE.render(MESSAGES)
    free = reference.generate(prompt, mode="blt-s", max_bytes=200, temperature=1.0, seed=3)
    assert CHAT_STOP in free.text  # without the stop it runs on into a user turn
    r = c.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=200, temperature=1.0, seed=3)
    assert r.choices[0].message.content == free.text[: free.text.index(CHAT_STOP)]
    assert r.choices[0].finish_reason == "stop"


def test_a_conversation_passes_answers_back_and_loads_its_last_prompt(server, reference):
    """The next turn's prompt starts with the last one, so it loads a snapshot of it (cached bytes)."""
    c = client(server)
    system = {"role": "system", "content": "".join(f"def f{i}(x):\n    return x + {i}\n" for i in range(16))}
    turn = [system, {"role": "user", "content": "def g("}]
    first = c.chat.completions.create(model=MODEL, messages=turn, max_tokens=24, temperature=0)
    turn += [first.choices[0].message.model_dump(), {"role": "user", "content": "def h("}]
    second = c.chat.completions.create(model=MODEL, messages=turn, max_tokens=24, temperature=0)
    prompt = TEMPLATE.render([{k: m[k] for k in ("role", "content")} for m in turn])
    assert (
        second.choices[0].message.content
        == reference.generate(prompt, mode="blt-s", max_bytes=24, temperature=0.0, stop=[CHAT_STOP]).text
    )
    assert second.usage.prompt_tokens == len(prompt.encode()) > 400
    assert first.usage.prompt_tokens_details.cached_tokens == 0 < second.usage.prompt_tokens_details.cached_tokens


def test_json_mode_answers_are_json_objects(server, reference):
    """response_format json_object: greedy and sampled, chat and completions, streamed or not, the
    answer is the Generator's in JSON mode, the grammar accepts every byte of it, and one that
    ended (finish_reason stop) is a JSON object."""
    c, json_object = client(server), {"type": "json_object"}
    closed = 0
    for content, mode, sampling in [("DEFAULTS = dict(", "blt-s", {"temperature": 0.8, "seed": 2}),
                                    ("the user record as json", "blt-dv", {"temperature": 1.0, "seed": 3}),
                                    ("the user record as json", "ar", {"temperature": 0.0})]:  # fmt: skip
        messages = [{"role": "user", "content": content}]
        want = reference.generate(TEMPLATE.render(messages), mode=mode, max_bytes=200, format="json", stop=[CHAT_STOP],
                                  **sampling)  # fmt: skip
        opts = dict(model=MODEL, messages=messages, max_tokens=200, response_format=json_object,
                    extra_body={"mode": mode}, **sampling)  # fmt: skip
        r = c.chat.completions.create(**opts)
        text = r.choices[0].message.content
        streamed = "".join(x.choices[0].delta.content or "" for x in c.chat.completions.create(stream=True, **opts))
        assert text == want.text == streamed and text.startswith("{")
        assert grammar.advance(grammar.BEGIN, [b + 4 for b in text.encode()]) is not None
        if r.choices[0].finish_reason == "stop":
            closed += 1
            assert isinstance(json.loads(text), dict)
    assert closed >= 2
    r = c.completions.create(model=MODEL, prompt="settings = ", max_tokens=32, temperature=0,
                             extra_body={"response_format": json_object})  # fmt: skip
    assert r.choices[0].text == reference.generate("settings = ", mode="blt-s", max_bytes=32, format="json").text


def test_vllms_structured_outputs_hold_the_text_to_a_regex_a_choice_or_a_schema(server, reference):
    """structured_outputs (vLLM's extra field): regex and choice hold the whole answer (chat and
    completions, streamed or not) as Generator's `pattern` does, grammar as its `grammar` does;
    json is response_format's json_schema; an engine's refusal (blt-d reads no grammar) names the
    field."""
    c = client(server)
    messages = [{"role": "user", "content": "is os.path.join pure? answer yes or no"}]
    prompt = TEMPLATE.render(messages)
    for spec, source in [({"choice": ["yes", "no", "it depends"]}, "yes|no|it\\ depends"),
                         ({"regex": r"(True|False), \d{1,3}%"}, r"(True|False), \d{1,3}%")]:  # fmt: skip
        for sampling in ({"temperature": 0.0}, {"temperature": 1.0, "seed": 4}):
            want = reference.generate(prompt, mode="blt-s", max_bytes=40, pattern=source, stop=[CHAT_STOP], **sampling)
            assert want.stop_reason == "eos" and re.fullmatch(source, want.text)
            opts = dict(model=MODEL, messages=messages, max_tokens=40, extra_body={"structured_outputs": spec},
                        **sampling)  # fmt: skip
            r = c.chat.completions.create(**opts)
            streamed = "".join(x.choices[0].delta.content or "" for x in c.chat.completions.create(stream=True, **opts))
            assert r.choices[0].message.content == want.text == streamed and r.choices[0].finish_reason == "stop"
    calls = 'start: NAME "(" [NAME (", " NAME)*] ")"\nNAME: /[a-z_]+/'
    r = c.completions.create(model=MODEL, prompt="x = ", max_tokens=40, temperature=0, extra_body={
        "structured_outputs": {"grammar": calls}})  # fmt: skip
    want = reference.generate("x = ", mode="blt-s", max_bytes=40, grammar=calls)
    assert r.choices[0].text == want.text and re.fullmatch(r"[a-z_]+\(([a-z_]+(, [a-z_]+)*)?\)", want.text)
    r = c.completions.create(model=MODEL, prompt="x = ", max_tokens=16, temperature=0, extra_body={
        "structured_outputs": {"choice": ["1", "None", "[]"]}})  # fmt: skip
    assert r.choices[0].text == reference.generate("x = ", mode="blt-s", max_bytes=16, pattern="1|None|\\[\\]").text
    r = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "person = "}], max_tokens=120,
                                  temperature=0, extra_body={"structured_outputs": {"json": PERSON}})  # fmt: skip
    want = reference.generate(TEMPLATE.render([{"role": "user", "content": "person = "}]), mode="blt-s",
                              max_bytes=120, schema=PERSON, stop=[CHAT_STOP])  # fmt: skip
    assert r.choices[0].message.content == want.text and want.text[1:].lstrip().startswith('"name"')
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model=MODEL, prompt="x", max_tokens=4, extra_body={
            "structured_outputs": {"regex": "a+"}, "mode": "blt-d"})  # fmt: skip
    assert e.value.body["param"] == "structured_outputs" and "diffusion head" in e.value.body["message"]


PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "languages"],
          "properties": {"name": {"type": "string", "description": "who"}, "age": {"type": "integer"},
                         "languages": {"type": "array", "items": {"enum": ["python", "c", "rust"]}}}}  # fmt: skip


def test_structured_outputs_follow_the_schema(server, reference):
    """response_format json_schema: the answer is the Generator's under the schema, its keys come
    in the schema's order, and one that closed validates against it; a schema fastblt cannot hold
    a text to is a 400 naming response_format."""
    c = client(server)
    messages = [{"role": "user", "content": "person = "}]
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    closed = 0
    for seed in (1, 2, 3):
        r = c.chat.completions.create(model=MODEL, messages=messages, max_tokens=200, temperature=0.9, seed=seed,
                                      response_format=fmt)  # fmt: skip
        text = r.choices[0].message.content
        want = reference.generate(TEMPLATE.render(messages), mode="blt-s", max_bytes=200, temperature=0.9, seed=seed,
                                  schema=PERSON, stop=[CHAT_STOP])  # fmt: skip
        assert text == want.text and text.startswith("{")
        if r.choices[0].finish_reason == "stop":
            closed += 1
            value = json.loads(text)
            jsonschema.validate(value, PERSON)
            assert list(value) == ["name", "age", "languages"]
    assert closed >= 2
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {**PERSON, "patternProperties": {}}}}
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, response_format=bad)
    assert e.value.body["param"] == "response_format" and "patternProperties: not supported" in e.value.body["message"]


class Address(pydantic.BaseModel):
    city: str
    zip: int | None


class Resident(pydantic.BaseModel):
    name: str
    kind: Literal["owner", "tenant"]
    home: Address


def test_the_openai_clients_parse_gets_its_pydantic_model(server, reference):
    """client.chat.completions.parse(response_format=a Pydantic model): the client sends the
    model's strict schema (nested models as $defs and $refs), the server holds the answer to it,
    and the client reads it back into the model."""
    c = client(server)
    messages = [{"role": "user", "content": "resident = "}]
    schema = to_strict_json_schema(Resident)
    parsed = 0
    for seed in range(4):
        try:
            r = c.chat.completions.parse(model=MODEL, messages=messages, max_tokens=300, temperature=0.9, seed=seed,
                                         response_format=Resident)  # fmt: skip
        except openai.LengthFinishReasonError as e:  # the model did not close it within 300 bytes
            r = e.completion
        text = r.choices[0].message.content
        want = reference.generate(TEMPLATE.render(messages), mode="blt-s", max_bytes=300, temperature=0.9, seed=seed,
                                  schema=schema, stop=[CHAT_STOP])  # fmt: skip
        assert text == want.text
        if r.choices[0].finish_reason == "stop":
            parsed += 1
            assert r.choices[0].message.parsed == Resident.model_validate_json(text)
    assert parsed >= 1
