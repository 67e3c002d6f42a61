"""OpenAI's chat completions over a byte model: the conversation rendered to one prompt by the
operator's chat template, then generated as a completion of it.

A byte model has no chat format of its own (the embedded default is a code model, and none of
BLT's released checkpoints defines one), so the server answers POST /v1/chat/completions only when
started with a template: Jinja source as Hugging Face tokenizers keep them (`messages`,
`add_generation_prompt`, `raise_exception`, `tojson`), rendered in Jinja's immutable sandbox.
Special ids are not text, so `bos_token` and `eos_token` render as "" (the engine starts every
prompt with BOS; a turn ends where the model draws EOS, or at a `stop` string: the request's, or
one the operator names as the template's turn end, `--chat-stop`). What is generated
after the rendered prompt is the assistant's message; `usage.prompt_tokens` counts the rendered
prompt's bytes.
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

from fastblt.errors import InputError
from fastblt.formats.files import read_text
from fastblt.model.config import BYTE_OFFSET
from fastblt.serve.api import (
    FASTBLT_FIELDS,
    ApiError,
    Completion,
    TextShape,
    check_fields,
    check_model,
    choices_per_prompt,
    completion_body,
    decode_options,
    format_field_of,
    get_field,
    in_text,
    json_kind,
    load_json,
    stream_fields,
    token,
)
from fastblt.serve.tools import CallReader, CallTags, call_message, parse_tools, read_calls, read_tagged

MAX_TOP_LOGPROBS = 20  # OpenAI's limit
ROLES = ("system", "developer", "user", "assistant", "tool")  # "function" (OpenAI's deprecated tool role) is refused
# continue_final_message and add_generation_prompt are vLLM's: an answer that continues the final
# (assistant's) message; service_tier orders the queue (api.SERVICE_TIERS)
FIELDS = {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "stop", "seed", "stream",
          "stream_options", "user", "logprobs", "top_logprobs", "n", "logit_bias", "presence_penalty",
          "frequency_penalty", "response_format", "tools", "tool_choice", "parallel_tool_calls",
          "continue_final_message", "add_generation_prompt", "service_tier"}  # fmt: skip
# OpenAI fields fastblt accepts only as "not asked for" (text only; functions are the deprecated tools)
NEUTRAL = {"functions": (None, []), "function_call": (None, "none"), "store": (None, False), "metadata": (None, {}),
           "modalities": (None, ["text"]), "reasoning_effort": (None,),
           "prediction": (None,), "audio": (None,), "web_search_options": (None,)}  # fmt: skip
MESSAGE_FIELDS = {"role", "content", "name", "tool_calls", "tool_call_id"}
# what a client sends back when it returns an answer's message object as it got it
MESSAGE_NEUTRAL = {"function_call": (None,), "refusal": (None,), "audio": (None,), "annotations": (None, [])}


class ChatTemplate:
    """A chat template: Jinja source rendered as Hugging Face renders a tokenizer's chat template
    (trim_blocks, lstrip_blocks, loop controls, an immutable sandbox), and the strings that end an
    assistant's turn in its format (`stops`: a base model writes the next turn's marker where a
    chat-tuned one would draw EOS), added to every request's own."""

    def __init__(self, source: str, origin: str = "chat template", stops: tuple[str, ...] = (),
                 tags: CallTags | None = None):  # fmt: skip
        if not all(isinstance(x, str) and x for x in stops):
            raise InputError(f"{origin}: stop strings must be non-empty, got {stops!r}")
        if tags is not None and not tags.start:
            raise InputError(f"{origin}: the text that starts a tool call must not be empty")
        from jinja2 import TemplateError, TemplateSyntaxError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        self.source, self.origin, self.stops, self.tags = source, origin, tuple(stops), tags
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])  # fmt: skip
        env.filters["tojson"] = _tojson  # Jinja's own escapes HTML, which no prompt wants
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            self._template = env.from_string(source)
        except TemplateSyntaxError as e:
            raise InputError(f"{origin}: line {e.lineno}: {e.message}") from None
        except TemplateError as e:
            raise InputError(f"{origin}: {e}") from None

    @classmethod
    def load(cls, path: str | Path, stops: tuple[str, ...] = (), tags: CallTags | None = None) -> ChatTemplate:
        """The template in file `path`; InputError naming the file when it cannot be read or parsed."""
        origin = f"chat template {path}"
        return cls(read_text(Path(path), origin, "a Jinja file"), origin, stops, tags)

    def render(self, messages: list[dict[str, Any]], tools: list[dict] | None = None, generation_prompt: bool = True,
               continue_final: bool = False) -> str:  # fmt: skip
        """The prompt for `messages` (and the request's `tools`, OpenAI's list, as Hugging Face
        passes them), ending where the assistant's next message starts (`generation_prompt`,
        the template's add_generation_prompt), or, with `continue_final`, right after the final
        message's content, which the answer continues (cut there as Hugging Face's
        continue_final_message cuts it). A template that refuses them (raise_exception) is a 400
        naming `messages`; one that fails otherwise is the server's fault (500)."""
        try:
            text = self._template.render(messages=messages, add_generation_prompt=generation_prompt, bos_token="",
                                         eos_token="", tools=tools, documents=None)  # fmt: skip
        except _Refused as e:
            raise ApiError(400, f"messages: the chat template refuses them: {e}", "messages") from None
        except Exception as e:  # noqa: BLE001 (the operator's template: any error it makes is ours, a 500)
            raise ApiError(500, f"{self.origin}: rendering failed: {type(e).__name__}: {e}",
                           kind="server_error") from None  # fmt: skip
        if not continue_final:
            return text
        final = messages[-1]["content"]
        for content in (final, final.strip()):  # some templates strip what they render
            if content and (at := text.rfind(content)) >= 0:
                return text[: at + len(content)]
        raise ApiError(400, "continue_final_message: the chat template does not render the final message's content "
                       "(nothing to continue)", "continue_final_message")  # fmt: skip


class _Refused(Exception):
    """raise_exception() called by a template: the messages are not what it accepts."""


def _raise_exception(message: str) -> None:
    raise _Refused(message)


def _tojson(value: Any, indent: int | None = None, separators: tuple | None = None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys)


def parse_chat_body(raw: bytes, model_id: str, default_mode: str, template: ChatTemplate | None) -> Completion:
    """The body of POST /v1/chat/completions -> a Completion of the rendered prompt, or an
    ApiError naming the field (404 when the server has no template)."""
    if template is None:
        raise ApiError(404, "POST /v1/chat/completions: this server has no chat template (start it with "
                       "--chat-template FILE); POST /v1/completions takes a prompt", None, "not_found")  # fmt: skip
    return parse_chat(load_json(raw), model_id, default_mode, template)


def parse_chat(body: dict, model_id: str, default_mode: str, template: ChatTemplate) -> Completion:
    """A chat completions body, parsed from JSON (responses.py builds one from a Responses body)."""
    check_fields(body, FIELDS | FASTBLT_FIELDS, NEUTRAL)
    check_model(body, model_id)
    messages = _messages(body.get("messages"))
    tokens_field, max_tokens = _max_tokens(body)
    n = choices_per_prompt(body, 1)
    stream, include_usage = stream_fields(body)
    user = get_field(body, "user", str)
    options = decode_options(body, default_mode)
    logprobs = None
    if get_field(body, "logprobs", bool, default=False):
        logprobs = get_field(body, "top_logprobs", int, default=0)
        if not 0 <= logprobs <= MAX_TOP_LOGPROBS:
            raise ApiError(400, f"top_logprobs: expected an integer in [0, {MAX_TOP_LOGPROBS}], got {logprobs}",
                           "top_logprobs")  # fmt: skip
        options["logprobs"] = logprobs  # the mode is the engine's to check
    elif body.get("top_logprobs") is not None:
        raise ApiError(400, "top_logprobs: only allowed with logprobs: true", "top_logprobs")
    if template.stops:  # the request's own first, then the template's turn ends
        options["stop"] = list(dict.fromkeys([*options.get("stop", []), *template.stops]))
    tools, shape, format_field = parse_tools(body, template.tags), CHAT, format_field_of(body)
    formatted = "format" in options or "pattern" in options or "grammar" in options
    if tools is not None and tools.none and formatted:  # a formatted answer, and no call in it
        tools = dataclasses.replace(tools, calls=None)
    if tools is not None and (tools.schema or tools.calls or tools.custom):  # calls come: held to their format
        if formatted:
            raise ApiError(400, f"{format_field}: a format cannot be combined with tool calls (tool_choice holds the "
                           "answer to the calls' format)", format_field)  # fmt: skip
        if tools.custom is not None:
            options |= dict(tools.custom_format)
            shape = CustomShape(tools.custom)
        elif tools.calls is not None:
            options["calls"] = tools.calls
            shape = TaggedShape(template.tags, tools.named, tools.customs)  # type: ignore[arg-type]
        else:
            options |= {"format": "json", "schema": tools.schema}
            shape = ToolShape(tools.named, customs=tools.customs)
        format_field = "tool_choice"
    continued = _continued(body, messages, options)
    prompt = template.render(messages, None if tools is None else tools.listed, not continued, continued)
    return Completion([prompt], max_tokens, stream, include_usage, options, n=n, logprobs=logprobs, shape=shape,
                      prompt_field="messages", tokens_field=tokens_field, format_field=format_field,
                      user=user)  # fmt: skip


def _continued(body: dict, messages: list[dict[str, Any]], options: dict) -> bool:
    """vLLM's `continue_final_message` (the answer continues the final message, an assistant's:
    a prefill of the answer) and `add_generation_prompt` (true unless continuing), checked."""
    continued = get_field(body, "continue_final_message", bool, default=False)
    generation_prompt = get_field(body, "add_generation_prompt", bool, default=not continued)
    if continued and generation_prompt:
        raise ApiError(400, "continue_final_message: cannot be combined with add_generation_prompt: true (a new "
                       "message, or the final one continued)", "continue_final_message")  # fmt: skip
    if not continued and not generation_prompt:
        raise ApiError(400, "add_generation_prompt: false only with continue_final_message: true (the answer "
                       "would start inside the template's markup)", "add_generation_prompt")  # fmt: skip
    if continued and messages[-1]["role"] != "assistant":
        raise ApiError(400, f"continue_final_message: the final message is the {messages[-1]['role']}'s; only an "
                       "assistant's is continued", "continue_final_message")  # fmt: skip
    if continued and ("format" in options or "pattern" in options or "grammar" in options or "calls" in options
                      or messages[-1].get("tool_calls")):  # fmt: skip
        raise ApiError(400, "continue_final_message: cannot be combined with a format, tool calls or a "
                       "final message of calls (their grammar reads an answer from its start)",
                       "continue_final_message")  # fmt: skip
    return continued


def _messages(messages: Any) -> list[dict[str, Any]]:
    """`messages` checked, as the template reads them: role, content (a string; text parts joined
    with newlines; "" for an assistant's calls without text), name, an assistant's tool_calls and
    a tool's tool_call_id when given."""
    if not isinstance(messages, list) or not messages:
        got = "an empty list" if messages == [] else json_kind(messages)
        raise ApiError(400, f"messages: expected a non-empty list of messages, got {got}", "messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise ApiError(400, f"{where}: expected an object, got {json_kind(m)}", "messages")
        check_fields(m, MESSAGE_FIELDS, MESSAGE_NEUTRAL, f"{where}.")
        role = get_field(m, "role", str, required=True, label=f"{where}.role")
        if role not in ROLES:
            raise ApiError(400, f"{where}.role: {role!r} is not one of {', '.join(ROLES)}", f"{where}.role")
        calls = m.get("tool_calls") not in (None, [])
        if calls and role != "assistant":
            raise ApiError(400, f"{where}.tool_calls: only an assistant's message has calls", f"{where}.tool_calls")
        call_id = get_field(m, "tool_call_id", str, required=role == "tool", label=f"{where}.tool_call_id")
        if call_id is not None and role != "tool":
            raise ApiError(400, f"{where}.tool_call_id: only a tool's message answers a call", f"{where}.tool_call_id")
        content = m.get("content")
        message = {
            "role": role,
            "content": "" if calls and content is None else message_text(content, f"{where}.content"),
        }
        if (name := get_field(m, "name", str, label=f"{where}.name")) is not None:
            message["name"] = name
        if calls:
            message["tool_calls"] = call_message(m, where)
        if call_id is not None:
            message["tool_call_id"] = call_id
        out.append(message)
    return out


def message_text(content: Any, where: str) -> str:
    """A message's content as its text: a string, or text parts joined with newlines."""
    parts = content if isinstance(content, list) else [content]
    texts = []
    for j, part in enumerate(parts):
        at = f"{where}[{j}]" if isinstance(content, list) else where
        if isinstance(part, dict) and part.get("type") == "text" and set(part) == {"type", "text"}:
            part = part["text"]
        elif isinstance(part, dict):
            raise ApiError(400, f"{at}: fastblt reads text parts only ({{\"type\": \"text\", \"text\": ...}}), got "
                           f"type {part.get('type')!r}", where)  # fmt: skip
        if not isinstance(part, str):
            raise ApiError(400, f"{at}: expected a string or a list of text parts, got {json_kind(part)}", where)
        try:
            part.encode("utf-8")
        except UnicodeEncodeError:
            raise ApiError(400, f"{at}: not encodable as UTF-8 (a lone surrogate)", where) from None
        texts.append(part)
    return "\n".join(texts)


def _max_tokens(body: dict) -> tuple[str, int | None]:
    """(the field that sets the length, bytes or None: up to the server's limit, OpenAI's default).
    `max_completion_tokens` is OpenAI's current name, `max_tokens` the deprecated one."""
    given = {f: get_field(body, f, int) for f in ("max_completion_tokens", "max_tokens")}
    given = {f: v for f, v in given.items() if v is not None}
    if len(set(given.values())) > 1:
        raise ApiError(400, f"max_tokens: {given['max_tokens']} and max_completion_tokens "
                       f"{given['max_completion_tokens']} differ; give one", "max_tokens")  # fmt: skip
    field, value = next(iter(given.items()), ("max_tokens", None))
    if value is not None and value < 1:
        raise ApiError(400, f"{field}: expected an integer >= 1, got {value}", field)
    return field, value


class ChatShape(TextShape):
    """How chat answers look: `chat.completion` objects whose choices carry the assistant's
    `message`, streamed as `chat.completion.chunk` deltas (the role in each choice's first), and
    `logprobs.content` entries, a byte per token (ChatScores)."""

    def new_id(self) -> str:
        return "chatcmpl-" + super().new_id().removeprefix("cmpl-")

    def body(self, cid: str, model_id: str, choices: list[dict], usage_: dict | None = None,
             created: int | None = None, fingerprint: str | None = None, chunk: bool = False) -> dict:  # fmt: skip
        kind = "chat.completion.chunk" if chunk else "chat.completion"
        return completion_body(cid, model_id, choices, usage_, created, fingerprint, kind)

    def choice(self, text: str, reason: str | None, index: int, logprobs: dict | None) -> dict:
        message = {"role": "assistant", "content": text, "refusal": None}
        return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": reason}

    def delta(self, text: str, reason: str | None, index: int, logprobs: dict | None, first: bool) -> dict:
        delta = {"role": "assistant", "content": text} if first else {"content": text} if text else {}
        return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}

    def scores(self) -> ChatScores:
        return ChatScores()


class ChatScores:
    """OpenAI's chat `logprobs` object, built chunk by chunk (or at once): `content`, an entry per
    generated id: `token` (named as completions name it), `logprob`, `bytes` (the byte; null for
    a special id) and `top_logprobs`, the most likely ids."""

    def add(self, ids: list[int], logprobs: list[float], top: list[dict[int, float]],
            n_bytes: int | None = None) -> dict:  # fmt: skip
        """The entries of `ids`, up to `n_bytes` byte ids (`in_text`)."""
        content = []
        for i, lp, best in in_text(ids, logprobs, top, n_bytes):
            entry = _entry(i, lp)
            entry["top_logprobs"] = [_entry(j, v) for j, v in best.items()]
            content.append(entry)
        return {"content": content, "refusal": None}


def _entry(i: int, logprob: float) -> dict:
    return {"token": token(i), "logprob": logprob, "bytes": [i - BYTE_OFFSET] if i >= BYTE_OFFSET else None}


CHAT = ChatShape()


class ToolShape(ChatShape):
    """How an answer that was asked for calls looks: the message's `tool_calls` (tools.read_calls)
    and no content; streamed, as OpenAI streams them (tools.CallReader): a call's first delta
    once its name is written, then its arguments as they are written. finish_reason is OpenAI's:
    "tool_calls" (a named choice: "stop"), "length" when max_tokens cut the answer (the calls that
    closed before the cut are still given; streamed, the cut one's beginning has gone out too).
    One per request: it holds each streamed choice's reader."""

    def __init__(self, named: bool, tags: CallTags | None = None, customs: frozenset[str] = frozenset()):
        self.named, self.tags, self.customs, self.readers = named, tags, customs, {}

    def reason(self, reason: str | None, calls: int) -> str | None:
        return "tool_calls" if reason == "stop" and calls and not self.named else reason

    def choice(self, text: str, reason: str | None, index: int, logprobs: dict | None) -> dict:
        calls = read_calls(text, self.customs)
        message = {"role": "assistant", "content": None, "refusal": None, "tool_calls": calls}
        reason = self.reason(reason, len(calls))
        return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": reason}

    def delta(self, text: str, reason: str | None, index: int, logprobs: dict | None, first: bool) -> dict:
        delta: dict[str, Any] = {"role": "assistant", "content": None} if first else {}
        return self._calls(delta, text, reason, index, logprobs)

    def _calls(self, delta: dict, text: str, reason: str | None, index: int, logprobs: dict | None) -> dict:
        reader = self.readers.setdefault(index, CallReader(self.tags, self.customs))
        if entries := reader.feed(text):
            delta["tool_calls"] = entries
        reason = self.reason(reason, reader.closed)
        return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}

    def calls(self, index: int) -> int:
        """How many calls a streamed choice has closed so far."""
        reader = self.readers.get(index)
        return 0 if reader is None else reader.closed


class CustomShape(ChatShape):
    """How an answer that calls a custom tool looks (tool_choice named it): its whole text is the
    call's `input`, the message's one `tool_calls` entry of type "custom" (and no content);
    streamed, the entry's first delta carries its id and name, later ones more of its input.
    finish_reason "stop" (a named choice's), or "length". One per request: it holds each choice's
    call id."""

    def __init__(self, name: str):
        self.name = name
        self.ids: dict[int, str] = {}

    def _id(self, index: int) -> str:
        if index not in self.ids:
            self.ids[index] = f"call_{uuid.uuid4().hex[:24]}"
        return self.ids[index]

    def choice(self, text: str, reason: str | None, index: int, logprobs: dict | None) -> dict:
        call = {"id": self._id(index), "type": "custom", "custom": {"name": self.name, "input": text}}
        message = {"role": "assistant", "content": None, "refusal": None, "tool_calls": [call]}
        return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": reason}

    def delta(self, text: str, reason: str | None, index: int, logprobs: dict | None, first: bool) -> dict:
        delta: dict[str, Any] = {"role": "assistant", "content": None} if first else {}
        if first:
            delta["tool_calls"] = [{"index": 0, "id": self._id(index), "type": "custom",
                                    "custom": {"name": self.name, "input": text}}]  # fmt: skip
        elif text:
            delta["tool_calls"] = [{"index": 0, "custom": {"input": text}}]
        return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}

    def calls(self, index: int) -> int:
        return 1


class TaggedShape(ToolShape):
    """How an answer in the model's own call format (the template's call tags) looks: the text
    before the first call's start is the message's `content`, the calls its `tool_calls`
    (tools.read_tagged); finish_reason as ToolShape's. Streamed, the content goes out as it
    comes, less what could still be the start of a call; once a call starts, its deltas as
    ToolShape's. One per request: it holds each streamed choice's text and reader."""

    tags: CallTags  # never None here

    def __init__(self, tags: CallTags, named: bool = False, customs: frozenset[str] = frozenset()):
        super().__init__(named, tags, customs)
        self.texts: dict[int, str] = {}
        self.sent: dict[int, int] = {}
        self.calling: set[int] = set()

    def choice(self, text: str, reason: str | None, index: int, logprobs: dict | None) -> dict:
        content, calls = read_tagged(text, self.tags, self.customs)
        message = {"role": "assistant", "content": content if content or not calls else None, "refusal": None}
        if calls:
            message["tool_calls"] = calls
        reason = self.reason(reason, len(calls))
        return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": reason}

    def delta(self, text: str, reason: str | None, index: int, logprobs: dict | None, first: bool) -> dict:
        delta: dict[str, Any] = {"role": "assistant"} if first else {}
        if index not in self.calling:  # the content: nothing before `sent` starts a call
            whole = self.texts[index] = self.texts.get(index, "") + text
            sent = ready = self.sent.get(index, 0)
            start = self.tags.start
            at = whole.find(start, sent)
            if at >= 0:
                self.calling.add(index)
                ready = at
                del self.texts[index]
            else:
                held = 0 if reason is not None else next(
                    (n for n in range(len(start) - 1, 0, -1) if whole.endswith(start[:n])), 0)  # fmt: skip
                ready = max(sent, len(whole) - held)
            self.sent[index] = ready
            if ready > sent:
                delta["content"] = whole[sent:ready]
        return self._calls(delta, text, reason, index, logprobs)
