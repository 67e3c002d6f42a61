"""OpenAI's Responses API (POST /v1/responses), answered by the chat path.

A Responses body becomes a chat completions body (`input` items -> messages, `instructions` -> a
system message first, `text.format` -> response_format, function and custom tools -> chat
tools), chat.py and the engine answer it as they answer chat, and the answer becomes a Response:
an output `message` of `output_text`, then a `function_call` item per call (or one
`custom_tool_call`, for a custom tool tool_choice names). Streamed, the chat chunks
become Responses events (response.created, output items and their text deltas, call arguments,
response.completed), numbered by `sequence_number`. Errors name the Responses field.

Answered responses are kept (`store`, OpenAI's default, unless the request says false) in a
ResponseStore (kept.py: in memory or in a file), the least recently used dropped past its budget. A request may then
continue one (`previous_response_id`: its input items and output come before the new input; its
instructions do not, as OpenAI's), and GET / DELETE /v1/responses/{id} read and drop them. Or it
may name a kept conversation (`conversation`, conversations.py): its items come before the new
input, and the request's input items and the response's output are added to it once answered. A
background response (`background`) is kept queued at once and answered by a task of its own,
which POST /v1/responses/{id}/cancel stops; streamed, its events go into an event log (replay.py)
that clients read from any event on, as they come. Once queued, what is kept of a background
response changes only while it runs (ResponseStore.settle): on a server of many replicas a
cancel or a delete that another replica was asked for has the last word.

With `truncation: "auto"`, a conversation past the server's byte limit drops items from its middle:
the leading system and developer messages stay, and the newest turns from a user message on, as
many as fit with room for max_output_tokens; the kept response still holds every item, so a later
turn truncates again from the whole conversation.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from fastblt.errors import PositionLimit
from fastblt.serve.api import (
    FASTBLT_FIELDS,
    ApiError,
    Completion,
    check_fields,
    cursor_page,
    get_field,
    get_metadata,
    json_kind,
    load_json,
)
from fastblt.serve.chat import ChatTemplate, message_text, parse_chat
from fastblt.serve.conversations import MAX_NEW_ITEMS, ConversationStore
from fastblt.serve.kept import Kept, MemoryKept
from fastblt.serve.replay import EventLog, Publish, Replays

FIELDS = {"model", "input", "instructions", "max_output_tokens", "temperature", "top_p", "stream", "stream_options",
          "user", "safety_identifier", "metadata", "store", "text", "tools", "tool_choice", "parallel_tool_calls",
          "include", "top_logprobs", "prompt_cache_key", "prompt_cache_retention", "service_tier",
          "previous_response_id", "truncation", "max_tool_calls", "conversation", "background"}  # fmt: skip
# chat's sampling fields that Responses lacks, taken as fastblt's own (the openai client's extra_body)
EXTRA = FASTBLT_FIELDS | {"seed", "stop", "presence_penalty", "frequency_penalty", "logit_bias"}
# fields fastblt accepts only as "not asked for": a model without reasoning, hosted tools or background runs
NEUTRAL = {"reasoning": (None, {}), "prompt": (None,),
           "access_programs": (None,), "background_options": (None,), "context_management": (None,),
           "image": (None,), "moderation": (None,), "prompt_cache_options": (None,)}  # fmt: skip
# POST /v1/responses/input_tokens: the fields that decide a request's input (`personality` as not asked for)
COUNTED = {"model", "input", "instructions", "previous_response_id", "conversation", "text", "tools", "tool_choice",
           "parallel_tool_calls", "truncation", "reasoning"}  # fmt: skip
LOGPROBS = "message.output_text.logprobs"
# what `include` may name: logprobs, and reasoning's encrypted content (there is none to include)
INCLUDE = (LOGPROBS, "reasoning.encrypted_content")
ROLES = ("user", "system", "developer", "assistant")
TOOL_FIELDS = {"function": {"type", "name", "description", "parameters", "strict"},
               "custom": {"type", "name", "description", "format"}}  # fmt: skip
LEADING = ("system", "developer")  # roles of the messages truncation keeps at the start
TRUNCATION = ("disabled", "auto")
RUNNING = ("queued", "in_progress")  # a background response's statuses before its last word
ENDING_S = 2.0  # how long a cancel waits for a background answer that claimed its last word to end
ITEM_FIELDS = {"message": {"type", "role", "content", "id", "status"},
               "function_call": {"type", "call_id", "name", "arguments", "id", "status"},
               "function_call_output": {"type", "call_id", "output", "id", "status"},
               "custom_tool_call": {"type", "call_id", "name", "input", "id", "status"},
               "custom_tool_call_output": {"type", "call_id", "output", "id", "status"}}  # fmt: skip
ITEM_IDS = {"message": "msg", "function_call": "fc", "function_call_output": "fco", "custom_tool_call": "ctc",
            "custom_tool_call_output": "ctco"}  # fmt: skip


@dataclass(frozen=True)
class Stored:
    """A kept Response and the input items it answered after those of the response it continued
    (`previous`; kept on its own): its request's own last (`own`: how many), a conversation's
    before them."""

    response: dict
    items: list[dict]
    own: int
    previous: str | None = None
    streamed: bool = False  # asked with stream: a background one's events are kept while it runs


class ResponseStore:
    """Responses kept for previous_response_id and GET/DELETE /v1/responses/{id}: a Kept map (in
    memory, or in --response-store-dir's file) of `budget` bytes, the least recently used dropped
    past it. A response keeps the id of the one it continued, not that one's items again, so a
    conversation's responses hold each item once; `chain` reads them back, and reading a chain
    uses every response in it (evicted together, or not at all)."""

    def __init__(self, kept: Kept | int):
        self.kept = MemoryKept(kept) if isinstance(kept, int) else kept

    @property
    def used(self) -> int:
        return self.kept.used

    def put(self, response: dict, items: list[dict], own: int, previous: str | None = None,
            streamed: bool = False) -> bool:  # fmt: skip
        """Keep `response`; False when it alone exceeds the budget (it is not kept)."""
        return self.kept.put(response["id"], _value(response, items, own, previous, streamed))

    def get(self, rid: str) -> Stored | None:
        found = self.kept.get(rid)
        if found is None:
            return None
        return Stored(found["response"], found["items"], found["own"], found.get("previous"),
                      found.get("streamed", False))  # fmt: skip

    def chain(self, rid: str) -> list[dict] | None:
        """The items of the conversation `rid` ended, oldest first: each response's input items
        and output, from the first it continues; None when it, or one before it, is not kept."""
        parts, seen = [], set()
        while rid is not None and rid not in seen:
            seen.add(rid)
            found = self.get(rid)
            if found is None:
                return None
            parts.append([*found.items, *found.response["output"]])
            rid = found.previous
        return [item for part in reversed(parts) for item in part]

    def delete(self, rid: str) -> bool:
        return self.kept.delete(rid)

    def settle(self, response: dict, items: list[dict], own: int, previous: str | None = None,
               streamed: bool = False) -> bool:  # fmt: skip
        """Keep a background response's next state if the kept one still runs (not cancelled or
        deleted meanwhile, from another replica); whether it was kept."""
        value = _value(response, items, own, previous, streamed)
        kept = self.kept.update(response["id"], lambda old: value if old["response"]["status"] in RUNNING else old)
        return kept is not None and kept["response"]["status"] == response["status"]

    def cancel(self, rid: str) -> dict | None:
        """The kept response `rid` as cancelled, if it still runs (a cancel asked of a replica that
        does not run it; that one stops its work when it takes the cancel); None if not kept."""

        def cancelled(old: dict) -> dict:
            if old["response"]["status"] in RUNNING:
                old["response"] |= {"status": "cancelled", "output": [], "usage": None}
            return old

        kept = self.kept.update(rid, cancelled)
        return None if kept is None else kept["response"]


def _value(response: dict, items: list[dict], own: int, previous: str | None, streamed: bool) -> dict:
    return {"response": response, "items": items, "own": own, "previous": previous, "streamed": streamed}


class ResponsesRequest:
    """One request to POST /v1/responses: `parse` checks its body and gives chat's Completion,
    keeping what the Response echoes; `answer` and `events` turn chat's answer into a Response
    (kept in `store` unless the request says store: false)."""

    def __init__(self, model_id: str, default_mode: str, template: ChatTemplate | None,
                 store: ResponseStore | None = None, conversations: ConversationStore | None = None):  # fmt: skip
        self.model_id, self.default_mode, self.template, self.store = model_id, default_mode, template, store
        self.conversations = conversations
        self.conversation: str | None = None  # the kept conversation it continues and adds to
        self.echo: dict[str, Any] = {}
        self.items: list[dict] = []  # the input items answered (those of the responses continued first)
        self.own = 0  # how many of them the request gave
        self.inherited = 0  # how many came from the response it continued (kept there)
        self.keep = False
        self._events: _Events | None = None  # a streamed answer's, from its first body on
        self.streamed = False
        self.task: asyncio.Task | None = None  # a background response's work
        self.log: EventLog | None = None  # a background stream's events, as they are made
        self._ended: str | None = None  # the status that had the last word (claim)
        self.overruled = False  # its answer came after a cancel or delete through another replica had the last word
        self._begun = False  # its background task began (one cancelled before it began runs none of its code)
        self._ending = threading.Lock()
        self._whole: tuple[dict, Completion] | None = None  # chat's body and Completion, untruncated
        self._limit: int | None = None  # the bytes the prompt and answer were fitted under
        self.id, self.created = f"resp_{uuid.uuid4().hex}", int(time.time())

    def parse(self, raw: bytes, limit: int | None = None) -> Completion:
        """Chat's Completion for the body `raw`; `limit`: the server's bytes per request (prompt and
        answer), which `truncation: "auto"` fits the conversation under."""
        if self.template is None:
            raise ApiError(404, "POST /v1/responses: this server has no chat template (start it with "
                           "--chat-template FILE); POST /v1/completions takes a prompt", None, "not_found")  # fmt: skip
        body = load_json(raw)
        chat = self._chat_body(body)
        try:
            comp = parse_chat(chat, self.model_id, self.default_mode, self.template)
        except ApiError as e:
            raise _renamed(e) from None
        self._whole, self._limit = (chat, comp), limit
        if self.echo["truncation"] == "auto" and limit is not None:
            comp = self._truncated(chat, comp, limit)
        comp.background = self.echo["background"]
        return _named(comp)

    def count(self, raw: bytes, limit: int | None = None) -> dict:
        """POST /v1/responses/input_tokens: the input tokens (bytes: the prompt's, as `usage` counts
        them) that POST /v1/responses would count for a request of the same fields (`model`
        optional); nothing is kept or added to a conversation."""
        body = load_json(raw)
        check_fields(body, COUNTED, {"personality": (None,)})
        asked = {k: v for k, v in body.items() if k != "personality"}
        comp = self.parse(json.dumps(asked | {"model": body.get("model") or self.model_id, "store": False}).encode(),
                          limit)  # fmt: skip
        return {"object": "response.input_tokens", "input_tokens": sum(len(p.encode()) for p in comp.prompts)}

    def refit(self, e: PositionLimit) -> Completion | None:
        """With truncation auto, the conversation truncated again for a text that reached the
        model's position limit (in patches, which the byte limit only estimates) after
        `e.bytes_read` ids: to the bytes read before that patch, less the BOS id; else None."""
        if self.echo.get("truncation") != "auto" or self._whole is None:
            return None
        limit = e.bytes_read - 2
        if self._limit is not None and limit >= self._limit:
            return None
        self._limit = limit
        return _named(self._truncated(*self._whole, limit))

    def _chat_body(self, body: dict) -> dict:
        """The chat completions body `body` asks for, and self.echo (what the Response repeats)."""
        reasoning = body.get("reasoning")
        if isinstance(reasoning, dict) and all(v is None for v in reasoning.values()):  # no effort asked for
            body = {k: v for k, v in body.items() if k != "reasoning"}
        check_fields(body, FIELDS | EXTRA, NEUTRAL)
        self.keep = get_field(body, "store", bool, default=True) and self.store is not None
        self.items = _items(body.get("input"))
        self.own = len(self.items)
        previous, conversation = get_field(body, "previous_response_id", str), body.get("conversation")
        if previous is not None and conversation is not None:
            raise ApiError(400, "conversation: cannot be combined with previous_response_id (each says what came "
                           "before)", "conversation")  # fmt: skip
        if previous is not None:
            head = None if self.store is None else self.store.get(previous)
            if head is not None and head.response["status"] in RUNNING:  # its output is not there yet
                raise ApiError(400, f"previous_response_id: response {previous!r:.80} is still "
                               f"{head.response['status']}; continue it once it has ended (GET it until then)",
                               "previous_response_id", "previous_response_in_progress")  # fmt: skip
            before = None if self.store is None else self.store.chain(previous)
            if before is None:
                raise ApiError(400, f"previous_response_id: no response {previous!r:.80} is kept here, or one it "
                               "continued is not (responses are kept within --response-store-mb, the least recently "
                               "used dropped first)", "previous_response_id",
                               "previous_response_not_found")  # fmt: skip
            self.items, self.inherited = [*before, *self.items], len(before)
        if conversation is not None:
            self.items = [*self._conversation(conversation), *self.items]
        copied = ("model", "temperature", "top_p", "parallel_tool_calls", "service_tier", *EXTRA)
        chat = {k: body[k] for k in copied if k in body}
        messages = _messages(self.items, len(self.items) - self.own)
        instructions = get_field(body, "instructions", str)
        if instructions:
            messages.insert(0, {"role": "system", "content": _text(instructions, "instructions")})
        chat["messages"] = messages
        if (max_output := body.get("max_output_tokens")) is not None:
            chat["max_completion_tokens"] = max_output
        if stream := get_field(body, "stream", bool, default=False):
            chat["stream"], chat["stream_options"] = True, {"include_usage": True}  # response.completed's usage
        options = body.get("stream_options")
        if options is not None and (not stream or not isinstance(options, dict) or set(options) - {
                "include_obfuscation"} or not all(isinstance(v, bool) for v in options.values())):  # fmt: skip
            raise ApiError(400, 'stream_options: expected {"include_obfuscation": bool}, with stream: true',
                           "stream_options")  # fmt: skip
        user = get_field(body, "user", str)
        identifier = get_field(body, "safety_identifier", str)
        if user or identifier:
            chat["user"] = user or identifier
        for name in ("prompt_cache_key", "prompt_cache_retention"):  # hints: fastblt reuses prompts by their bytes
            get_field(body, name, str)
        text = body.get("text")
        if text is not None:
            if not isinstance(text, dict) or set(text) - {"format", "verbosity"} or text.get("verbosity") is not None:
                raise ApiError(400, 'text: expected {"format": {...}}', "text")
            if (fmt := text.get("format")) is not None:
                chat["response_format"] = _format(fmt)
        if (tools := body.get("tools")) not in (None, []):
            chat["tools"] = _tools(tools)
        if (choice := body.get("tool_choice")) is not None:
            chat["tool_choice"] = _tool_choice(choice)
        include = [] if body.get("include") is None else body["include"]  # (0, "", {}: a 400 as any other)
        if not isinstance(include, list) or any(i not in INCLUDE for i in include):
            raise ApiError(400, f"include: expected a list of {', '.join(map(repr, INCLUDE))}, got "
                           f"{json.dumps(include)[:80]}", "include")  # fmt: skip
        top = get_field(body, "top_logprobs", int)
        if LOGPROBS in include:
            chat["logprobs"], chat["top_logprobs"] = True, 0 if top is None else top
        elif top is not None and not 0 <= top <= 20:
            raise ApiError(400, f"top_logprobs: expected an integer in [0, 20], got {top}", "top_logprobs")
        metadata = get_metadata(body)
        background = get_field(body, "background", bool, default=False)
        if background and not self.keep:
            raise ApiError(400, "background: its answer is read from the kept response: store true, on a server "
                           "that keeps responses", "background")  # fmt: skip
        self.streamed = stream
        truncation = get_field(body, "truncation", str, default="disabled")
        if truncation not in TRUNCATION:
            raise ApiError(400, f'truncation: expected "auto" or "disabled", got {truncation!r:.40}', "truncation")
        max_tool_calls = get_field(body, "max_tool_calls", int)  # of hosted tools: there are none to call
        if max_tool_calls is not None and max_tool_calls < 1:
            raise ApiError(400, f"max_tool_calls: expected an integer >= 1, got {max_tool_calls}", "max_tool_calls")
        self.echo = {
            "instructions": instructions, "max_output_tokens": max_output, "metadata": metadata or {},
            "parallel_tool_calls": body.get("parallel_tool_calls", True), "temperature": body.get("temperature"),
            "top_p": body.get("top_p"), "text": {"format": (text or {}).get("format") or {"type": "text"}},
            "tool_choice": choice if choice is not None else "auto" if "tools" in chat else "none",
            "tools": tools or [], "top_logprobs": top, "user": user, "safety_identifier": identifier,
            "service_tier": "default" if body.get("service_tier") in (None, "auto") else body["service_tier"],
            "previous_response_id": previous, "store": self.keep, "truncation": truncation,
            "conversation": None if self.conversation is None else {"id": self.conversation},
            "max_tool_calls": max_tool_calls, "background": background,
        }  # fmt: skip
        return chat

    def _conversation(self, given: Any) -> list[dict]:
        """The items of the kept conversation `given` names (its id, or {"id": ...})."""
        cid = given.get("id") if isinstance(given, dict) and set(given) == {"id"} else given
        if not isinstance(cid, str):
            raise ApiError(400, f'conversation: expected a conversation id or {{"id": ...}}, got {json_kind(given)}',
                           "conversation")  # fmt: skip
        items = None if self.conversations is None else self.conversations.items(cid)
        if items is None:
            raise ApiError(404, f"conversation: no conversation {cid!r:.80} is kept here (POST /v1/conversations "
                           "makes one; kept within --response-store-mb, the least recently used dropped first)",
                           "conversation", "conversation_not_found")  # fmt: skip
        self.conversation = cid
        return items

    def _truncated(self, chat: dict, comp: Completion, limit: int) -> Completion:
        """`comp` with the conversation's middle dropped until it fits `limit` bytes with room for
        its answer (max_output_tokens, else one byte): the fewest whole turns (a turn begins at a
        user message, so no call loses its output) after the leading system and developer messages."""
        room = max(comp.max_tokens or 1, 1)
        if _size(comp) + room <= limit:
            return comp
        messages = chat["messages"]
        head = next((i for i, m in enumerate(messages) if m["role"] not in LEADING), len(messages))
        starts = [i for i in range(head + 1, len(messages)) if messages[i]["role"] == "user"]

        def kept(start: int) -> Completion:
            return parse_chat({**chat, "messages": messages[:head] + messages[start:]}, self.model_id,
                              self.default_mode, self.template)  # fmt: skip

        lo, hi, best = 0, len(starts) - 1, None  # the earliest start that fits: sizes fall as turns go
        while lo <= hi:
            mid = (lo + hi) // 2
            shorter = kept(starts[mid])
            if _size(shorter) + room <= limit:
                best, hi = shorter, mid - 1
            else:
                lo = mid + 1
        if best is None:
            last = kept(starts[-1]) if starts else comp
            raise ApiError(400, f"input: with truncation auto, the last turn alone is {_size(last)} bytes (its user "
                           f"message on, after the system and developer messages) + {room} for the answer, past the "
                           f"{limit} bytes that fit (this server's limit per request, or the model's in patches); "
                           "shorten it", "input",
                           "context_length_exceeded")  # fmt: skip
        return best

    def response(self, status: str, output: list[dict], usage: dict | None, reason: str | None = None,
                 error: dict | None = None) -> dict:  # fmt: skip
        """The Response object: `status` queued, in_progress, completed, incomplete (`reason`),
        failed (`error`) or cancelled."""
        return {"id": self.id, "object": "response", "created_at": self.created, "status": status,
                "completed_at": int(time.time()) if status == "completed" else None,
                "error": error, "incomplete_details": None if reason is None else {"reason": reason},
                "model": self.model_id, "output": output, "reasoning": None,
                "usage": None if usage is None else _usage(usage), **self.echo}  # fmt: skip

    def answer(self, chat: dict) -> dict:
        """The Response for chat's whole answer."""
        (choice,) = chat["choices"]
        message, output = choice["message"], []
        # an item cut by max_output_tokens is incomplete, as the streamed answer's items say
        status, reason = _status(choice["finish_reason"])
        if message["content"] or not message.get("tool_calls"):
            logprobs = (choice.get("logprobs") or {}).get("content")
            output.append(_message(message["content"] or "", status, logprobs))
        for call in message.get("tool_calls") or ():
            if call["type"] == "custom":
                output.append(_custom_call(call["id"], call["custom"]["name"], call["custom"]["input"]))
            else:
                output.append(_call(call["id"], call["function"]["name"], call["function"]["arguments"], status))
        response = self.response(status, output, chat["usage"], reason)
        return self.kept(response) if self.claim(status) else response

    def claim(self, status: str) -> bool:
        """Whether `status` is the response's last word: true for the first of its answer, a
        failure and a cancel to claim it (a background response's cancel may land while its
        answer's last frame is written on another thread: one of them wins, never both)."""
        with self._ending:
            if self._ended is not None:
                return False
            self._ended = status
            return True

    def kept(self, response: dict) -> dict:
        """`response`, kept in the store when the request asked for it (and it fits); its input
        items and output added to the conversation it continues."""
        if self.keep and self.store is not None:
            if self.echo.get("background"):  # kept as it ran: unless it was cancelled or deleted meanwhile
                if not self._put(self.store, response, settle=True):
                    self.overruled = True
                    return response
            elif not self._put(self.store, response):
                response["store"] = False
        if self.conversation is not None and self.conversations is not None:
            own = [stored_item(i) for i in self.items[len(self.items) - self.own :]]
            self.conversations.add(self.conversation, [*own, *response["output"]])
        return response

    async def start(self, work: Coroutine[Any, Any, Any], running: dict[str, ResponsesRequest],
              replays: Replays | None = None, publish: Callable[[str], Publish] | None = None
              ) -> dict | AsyncIterator[bytes]:  # fmt: skip
        """Answer in the background: `work` (which keeps the answer, through `answer`, or through
        the last frame of a stream) runs as a task of its own, listed in `running` until it ends;
        the Response is kept at once, queued, then in_progress, and failed or cancelled should the
        work end so. Returns the queued Response, or for a streamed one (its events kept in
        `replays`, from response.created on, and given to `publish(id)` if any) the reader of its events."""
        store = self.store
        assert store is not None  # parse refuses background without one

        def keep(status: str, error: dict | None = None) -> dict:
            response = self.response(status, [], None, error=error)
            self._put(store, response, settle=status != "queued")
            return response

        def fail(error: dict) -> None:
            if self.log is None:
                if self.claim("failed"):
                    keep("failed", error)
            else:  # as a stream fails: an error event, then response.failed (which keeps the failed Response)
                self.frame({"error": error})
                self.frame("[DONE]")

        # the store's calls off the event loop: a file's write, or a round trip to Ray's store actor
        async def settle() -> None:
            self._begun = True
            try:
                await asyncio.to_thread(keep, "in_progress")
                await work
            except asyncio.CancelledError:  # cancel() claimed the last word first (or the loop is closing)
                work.close()  # (cancelled before it began: never to run)
                if self._ended == "cancelled" or self.claim("cancelled"):
                    await asyncio.to_thread(keep, "cancelled")
                    if self._events is not None:
                        self._events.cancelled()
            except ApiError as e:
                await asyncio.to_thread(fail, {"code": e.code or "server_error", "message": e.message,
                                               "param": e.param})  # fmt: skip
            except Exception as e:  # noqa: BLE001 (a bug: said in the response, as a 500 would say it)
                await asyncio.to_thread(fail, {"code": "server_error", "message": f"internal error: {e!r}"})
            finally:
                running.pop(self.id, None)
                if replays is not None:
                    replays.close(self.id)

        # listed first: a response kept running that no server here runs reads failed (app.stored)
        running[self.id] = self
        try:
            queued = await asyncio.to_thread(keep, "queued")
        except BaseException:
            running.pop(self.id, None)
            work.close()
            raise
        if self.streamed and replays is not None:
            self.log = replays.open(self.id, None if publish is None else publish(self.id))
            self._events = _Events(self)
            for kind in ("response.created", "response.queued"):
                self._events.event(kind, response=queued)
        # in a context of its own, not the request's: the request ends long before the work, and on
        # Ray Serve the calls the work makes to the store actor would otherwise count as the
        # request's, cancelled with it (its client leaving a stream cancels the request)
        self.task = asyncio.get_running_loop().create_task(settle(), name=f"fastblt {self.id}",
                                                           context=contextvars.Context())  # fmt: skip
        return queued if self.log is None else self.log.follow()

    def settled(self, response: dict) -> None:
        """Keep a background response that failed while it streamed (a stream keeps only answers)."""
        if self.echo.get("background") and self.store is not None:
            self._put(self.store, response, settle=True)

    def _put(self, store: ResponseStore, response: dict, settle: bool = False) -> bool:
        """Keep `response` with the items it answered but those of the response it continued
        (`settle`: only while the kept one runs)."""
        put = store.settle if settle else store.put
        return put(response, self.items[self.inherited :], self.own, self.echo["previous_response_id"], self.streamed)

    async def cancel(self) -> None:
        """Stop a background response's work (its rows freed at once); kept as cancelled. Unless its
        answer (or failure) claimed the last word already, as its last frame is written in a thread:
        then that ends the response, and this waits for it to end (ENDING_S at most)."""
        if self.task is None or self.task.done():
            return
        while not self._begun and not self.task.done():  # into its try first: it says how it ended
            await asyncio.sleep(0)
        if not self.claim("cancelled"):  # what is left after the last word is short: waited for a while
            await asyncio.wait([self.task], timeout=ENDING_S)
        self.task.cancel()
        await asyncio.wait([self.task])

    def frame(self, body: dict | str) -> bytes:
        """The Responses events for one body of chat's stream (a chunk, an error, or "[DONE]"), in
        place of its server-sent event: app.py's streams take it as their `frame`."""
        out = []
        if self._events is None:  # the stream's first body: the Response begins
            self._events = _Events(self)
            out.append(self._events.event("response.created", response=self.response("in_progress", [], None)))
        if not self._events.begun:  # (a background one was created queued, before its work began)
            self._events.begun = True
            out.append(self._events.event("response.in_progress", response=self.response("in_progress", [], None)))
        out += self._events.end() if body == "[DONE]" else self._events.feed(body)  # type: ignore[arg-type]
        return b"".join(out)


class _Events:
    """Builds the events of one streamed Response from chat's chunks: an output item opens with its
    first text or call, its deltas follow, and it closes when the next item opens or the answer ends."""

    def __init__(self, request: ResponsesRequest):
        self.request, self.seq = request, 0
        self.begun = False  # response.in_progress said
        self.output: list[dict] = []  # the items, as far as written
        self.text: int | None = None  # the open message item's place in output
        self.calls: dict[int, int] = {}  # chat's call index -> its item's place in output
        self.open_call: int | None = None
        self.reason: str | None = None
        self.usage: dict | None = None
        self.error: dict | None = None

    def event(self, kind: str, **fields: Any) -> bytes:
        payload = json.dumps({"type": kind, "sequence_number": self.seq, **fields}, ensure_ascii=False)
        self.seq += 1
        data = f"event: {kind}\ndata: {payload}\n\n".encode()
        if self.request.log is not None:  # a background stream: its readers follow the log
            self.request.log.add(data)
        return data

    def feed(self, chunk: dict) -> list[bytes]:
        if "error" in chunk:  # the answer failed after it began: said as an event, then failed
            self.error = chunk["error"]
            return [self.event("error", code=self.error.get("code"), message=self.error["message"],
                               param=self.error.get("param"))]  # fmt: skip
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        out: list[bytes] = []
        for choice in chunk["choices"]:
            delta = choice["delta"]
            if text := delta.get("content"):
                logprobs = (choice.get("logprobs") or {}).get("content") or []
                out += self._text(text, logprobs)
            for entry in delta.get("tool_calls") or ():
                out += self._call(entry)
            if choice["finish_reason"] is not None:
                self.reason = choice["finish_reason"]
                out += self._close_text() + self._close_call()
        return out

    def _text(self, text: str, logprobs: list[dict]) -> list[bytes]:
        out = []
        if self.text is None:
            out += self._close_call()
            self.text = len(self.output)
            item = _message("", "in_progress", None)
            self.output.append(item)
            out.append(self.event("response.output_item.added", output_index=self.text, item=_without_text(item)))
            out.append(self.event("response.content_part.added", item_id=item["id"], output_index=self.text,
                                  content_index=0, part={"type": "output_text", "text": "", "annotations": [],
                                                         "logprobs": []}))  # fmt: skip
        item = self.output[self.text]
        part = item["content"][0]
        part["text"] += text
        part["logprobs"] += logprobs
        if text:
            out.append(self.event("response.output_text.delta", item_id=item["id"], output_index=self.text,
                                  content_index=0, delta=text, logprobs=logprobs))  # fmt: skip
        return out

    def _close_text(self) -> list[bytes]:
        if self.text is None:
            return []
        at, item = self.text, self.output[self.text]
        self.text, part = None, item["content"][0]
        item["status"] = "incomplete" if self.reason == "length" else "completed"
        return [self.event("response.output_text.done", item_id=item["id"], output_index=at, content_index=0,
                           text=part["text"], logprobs=part["logprobs"]),
                self.event("response.content_part.done", item_id=item["id"], output_index=at, content_index=0,
                           part=part),
                self.event("response.output_item.done", output_index=at, item=item)]  # fmt: skip

    def _call(self, entry: dict) -> list[bytes]:
        """A chat `tool_calls` entry: a function's (its arguments grow) or a custom tool's (its input)."""
        out, custom = [], "custom" in entry
        spec, said = (entry["custom"], "input") if custom else (entry["function"], "arguments")
        if entry["index"] not in self.calls:  # a call's first entry: its id and name
            out += self._close_text() + self._close_call()
            self.open_call = self.calls[entry["index"]] = len(self.output)
            item = _custom_call(entry["id"], spec["name"], "") if custom else _call(entry["id"], spec["name"], "",
                                                                                    "in_progress")  # fmt: skip
            self.output.append(item)
            out.append(self.event("response.output_item.added", output_index=self.open_call, item=dict(item)))
        at = self.calls[entry["index"]]
        if piece := spec.get(said):
            item = self.output[at]
            item[said] += piece
            kind = "response.custom_tool_call_input.delta" if custom else "response.function_call_arguments.delta"
            out.append(self.event(kind, item_id=item["id"], output_index=at, delta=piece))
        return out

    def _close_call(self) -> list[bytes]:
        if self.open_call is None:
            return []
        at, item = self.open_call, self.output[self.open_call]
        self.open_call = None
        if item["type"] == "custom_tool_call":  # (OpenAI's custom calls have no status)
            done = self.event("response.custom_tool_call_input.done", item_id=item["id"], output_index=at,
                              input=item["input"])  # fmt: skip
        else:
            item["status"] = "incomplete" if self.reason == "length" else "completed"
            done = self.event("response.function_call_arguments.done", item_id=item["id"], output_index=at,
                              name=item["name"], arguments=item["arguments"])  # fmt: skip
        return [done, self.event("response.output_item.done", output_index=at, item=item)]

    def end(self) -> list[bytes]:
        if self.error is not None:
            if not self.request.claim("failed"):
                return []
            error = {"code": self.error.get("code") or "server_error", "message": self.error["message"]}
            failed = self.request.response("failed", self.output, None, error=error)
            self.request.settled(failed)
            return [self.event("response.failed", response=failed)]
        status, reason = _status(self.reason or "stop")
        # chat's stream ended without its end (the client left), or a cancel had the last word
        if self.reason is None or not self.request.claim(status):
            return []
        out = self._text("", []) if not self.output else []  # an empty answer is an empty message, as whole
        out += self._close_text() + self._close_call()
        final = self.request.kept(self.request.response(status, self.output, self.usage, reason))
        if self.request.overruled:  # a cancel through another replica had the last word: the stream says so
            return [*out, self.cancelled()]
        return [*out, self.event(f"response.{status}", response=final)]

    def cancelled(self) -> bytes:
        rid = self.request.id
        return self.event("error", code="response_cancelled", param=None,
                          message=f"response {rid}: cancelled (POST /v1/responses/{rid}/cancel, or the server "
                          "stopped)")  # fmt: skip


def input_items_page(kept: Stored, query: dict[str, str]) -> dict:
    """GET /v1/responses/{id}/input_items: the items its request gave, as `ordered_page`."""
    return ordered_page(kept.items[len(kept.items) - kept.own :], query)


def ordered_page(items: list[dict], query: dict[str, str]) -> dict:
    """`items` (oldest first) as a cursor page, newest first unless `order` is asc (input items,
    a conversation's items)."""
    order = query.get("order", "desc")
    if order not in ("asc", "desc"):
        raise ApiError(400, f'order: expected "asc" or "desc", got {order!r:.20}', "order")
    return cursor_page(items[::-1] if order == "desc" else items, query)


def _named(comp: Completion) -> Completion:
    """`comp` with its errors naming the Responses fields."""
    comp.prompt_field, comp.tokens_field = "input", "max_output_tokens"
    if comp.format_field == "response_format":
        comp.format_field = "text.format"
    return comp


def _size(comp: Completion) -> int:
    return len(comp.prompts[0].encode())


def _status(finish_reason: str) -> tuple[str, str | None]:
    """A Response's status (and incomplete_details.reason) for chat's finish_reason."""
    return ("incomplete", "max_output_tokens") if finish_reason == "length" else ("completed", None)


def _message(text: str, status: str, logprobs: list[dict] | None) -> dict:
    part = {"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs or []}
    return {"type": "message", "id": f"msg_{uuid.uuid4().hex}", "status": status, "role": "assistant",
            "content": [part]}  # fmt: skip


def _without_text(item: dict) -> dict:
    return {**item, "content": []}  # an item as added: its part follows in its own event


def _call(call_id: str, name: str, arguments: str, status: str) -> dict:
    return {"type": "function_call", "id": f"fc_{uuid.uuid4().hex}", "call_id": call_id, "name": name,
            "arguments": arguments, "status": status}  # fmt: skip


def _custom_call(call_id: str, name: str, text: str) -> dict:
    return {"type": "custom_tool_call", "id": f"ctc_{uuid.uuid4().hex}", "call_id": call_id, "name": name,
            "input": text}  # fmt: skip


def _usage(chat: dict) -> dict:
    """Chat's usage (bytes) as a Response's."""
    return {"input_tokens": chat["prompt_tokens"],
            "input_tokens_details": {"cached_tokens": chat["prompt_tokens_details"]["cached_tokens"]},
            "output_tokens": chat["completion_tokens"], "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": chat["total_tokens"]}  # fmt: skip


def _text(value: Any, where: str) -> str:
    """A string field (UTF-8 encodable, as chat holds a message's text)."""
    if not isinstance(value, str):
        raise ApiError(400, f"{where}: expected a string, got {json_kind(value)}", where)
    return message_text(value, where)


def _content(content: Any, where: str, kinds: tuple[str, ...]) -> str:
    """A message's content: a string, or text parts (`kinds`: input_text, or an answer's
    output_text sent back) joined as chat joins its text parts."""
    if isinstance(content, list):
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") not in kinds:
                kind = part.get("type") if isinstance(part, dict) else json_kind(part)
                at = f"{where}[{j}]"
                raise ApiError(400, f"{at}: fastblt reads text parts only ({' or '.join(kinds)}), got {kind!r:.40}", at)
        content = [{"type": "text", "text": part.get("text")} for part in content]
    return message_text(content, where)


def _items(given: Any) -> list[dict]:
    """`input` as a list of items (a string: the user's message), each with an id, as a stored
    response lists its input items."""
    if isinstance(given, str):
        text = _text(given, "input")
        given = [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}]
    if not isinstance(given, list) or not given:
        got = "an empty list" if given == [] else json_kind(given)
        raise ApiError(400, f"input: expected a string or a non-empty list of items, got {got}", "input")
    out = []
    for item in given:
        if isinstance(item, dict) and "id" not in item:
            kind = item.get("type", "message")
            known = isinstance(kind, str) and kind in ITEM_FIELDS
            item = {"id": f"{ITEM_IDS[kind] if known else 'item'}_{uuid.uuid4().hex}", **item}
        out.append(item)
    return out


def conversation_items(given: Any, name: str = "items") -> list[dict]:
    """Items given to a conversation (POST /v1/conversations and its /items), checked as a
    response's input items are, in their stored shape; at most MAX_NEW_ITEMS."""
    if given is None:
        return []
    if not isinstance(given, list) or len(given) > MAX_NEW_ITEMS:
        got = f"{len(given)} items" if isinstance(given, list) else json_kind(given)
        raise ApiError(400, f"{name}: expected a list of at most {MAX_NEW_ITEMS} items, got {got}", name)
    items = _items(given) if given else []
    _messages(items, name=name)
    stored = [stored_item(item) for item in items]
    check_new_ids(stored, [], name)
    return stored


def check_new_ids(new: list[dict], kept: list[dict], name: str = "items") -> None:
    """A 400 for an item id given twice, or given to an item the conversation holds already: an id
    names one item (to read, delete or page after)."""
    seen = {item.get("id") for item in kept}
    for i, item in enumerate(new):
        if (iid := item.get("id")) in seen and iid is not None:
            raise ApiError(400, f"{name}[{i}].id: {iid!r:.80} names an item of this conversation already",
                           f"{name}[{i}].id")  # fmt: skip
        seen.add(iid)


def stored_item(item: dict) -> dict:
    """An input item as a conversation lists it: a message's content as parts (input_text, an
    assistant's output_text), a status on every item."""
    if item.get("type", "message") != "message":
        return {**item, "status": item.get("status") or "completed"}
    content, kind = item["content"], "output_text" if item["role"] == "assistant" else "input_text"
    parts = [{"type": kind, "text": content}] if isinstance(content, str) else content
    parts = [{"annotations": [], **p} if p["type"] == "output_text" else p for p in parts]
    return {"type": "message", "id": item["id"], "status": item.get("status") or "completed", "role": item["role"],
            "content": parts}  # fmt: skip


def _messages(items: list[dict], kept: int = 0, name: str = "input") -> list[dict]:
    """Input items as chat messages: messages, an answer's function calls (consecutive ones one
    assistant message, as chat writes them) and their outputs. The first `kept` items are those of
    the responses continued (checked when they were answered): errors name the request's by place
    (in field `name`)."""
    messages: list[dict] = []
    for i, item in enumerate(items):
        where = f"{name}[{i - kept}]"
        if not isinstance(item, dict):
            raise ApiError(400, f"{where}: expected an object, got {json_kind(item)}", where)
        kind = item.get("type", "message")
        if not isinstance(kind, str) or kind not in ITEM_FIELDS:
            raise ApiError(400, f"{where}.type: {kind!r:.40} is not served ({', '.join(ITEM_FIELDS)})",
                           f"{where}.type")  # fmt: skip
        check_fields(item, ITEM_FIELDS[kind], {}, f"{where}.")
        if kind == "message":
            role = get_field(item, "role", str, required=True, label=f"{where}.role")
            if role not in ROLES:
                raise ApiError(400, f"{where}.role: {role!r:.40} is not one of {', '.join(ROLES)}", f"{where}.role")
            kinds = ("output_text", "refusal") if role == "assistant" else ("input_text",)
            text = _content(item.get("content"), f"{where}.content", kinds)
            messages.append({"role": role, "content": text})
        elif kind in ("function_call", "custom_tool_call"):
            chat_kind, said = ("function", "arguments") if kind == "function_call" else ("custom", "input")
            names = {f: _text(item.get(f), f"{where}.{f}") for f in ("call_id", "name", said)}
            call = {"id": names["call_id"], "type": chat_kind, chat_kind: {"name": names["name"], said: names[said]}}
            if messages and messages[-1]["role"] == "assistant":  # the answer's text, or its calls so far
                messages[-1].setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
        else:
            output = item.get("output")
            text = _content(output, f"{where}.output", ("input_text",))
            messages.append({"role": "tool", "tool_call_id": _text(item.get("call_id"), f"{where}.call_id"),
                             "content": text})  # fmt: skip
    return messages


def _format(fmt: Any) -> dict:
    """text.format as chat's response_format."""
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind in ("text", "json_object") and set(fmt) == {"type"}:
        return {"type": kind}
    if kind == "json_schema" and set(fmt) - {"type", "name", "schema", "strict", "description"} == set():
        return {"type": "json_schema", "json_schema": {k: v for k, v in fmt.items() if k != "type"}}
    raise ApiError(400, 'text.format: expected {"type": "text"}, {"type": "json_object"} or {"type": "json_schema", '
                   '"name": ..., "schema": {...}}', "text.format")  # fmt: skip


def _tools(tools: Any) -> list[dict]:
    """Function and custom tools as chat lists them ({"type": "function", "function": {...}},
    {"type": "custom", "custom": {...}}: a grammar format's syntax and definition in its `grammar`)."""
    if not isinstance(tools, list):
        raise ApiError(400, f"tools: expected a list of tools, got {json_kind(tools)}", "tools")
    out = []
    for i, tool in enumerate(tools):
        kind = tool.get("type") if isinstance(tool, dict) else json_kind(tool)
        if not isinstance(kind, str) or kind not in TOOL_FIELDS:
            raise ApiError(400, f"tools[{i}].type: only function and custom tools are served, got {kind!r:.40}",
                           f"tools[{i}]")  # fmt: skip
        check_fields(tool, TOOL_FIELDS[kind], {}, f"tools[{i}].")
        spec = {k: v for k, v in tool.items() if k != "type"}
        fmt = spec.get("format")
        if kind == "custom" and isinstance(fmt, dict) and fmt.get("type") == "grammar":
            spec["format"] = {"type": "grammar", "grammar": {k: v for k, v in fmt.items() if k != "type"}}
        out.append({"type": kind, kind: spec})
    return out


def _tool_choice(choice: Any) -> Any:
    if isinstance(choice, dict) and choice.get("type") in ("function", "custom") and set(choice) == {"type", "name"}:
        return {"type": choice["type"], choice["type"]: {"name": choice["name"]}}
    if choice in ("auto", "none", "required"):
        return choice
    raise ApiError(400, 'tool_choice: expected "auto", "none", "required", {"type": "function", "name": ...} or '
                   '{"type": "custom", "name": ...}', "tool_choice")  # fmt: skip


_CHAT_NAMES = ((re.compile(r"messages(\[\d+\])?(\.[\w.\[\]]+)?"), "input"),
               (re.compile(r"max_completion_tokens|max_tokens"), "max_output_tokens"),
               (re.compile(r"response_format(\.json_schema)?"), "text.format"),
               (re.compile(r"(tools\[\d+\])\.custom\.format\.grammar"), r"\1.format"),
               (re.compile(r"(tools\[\d+\])\.(function|custom)"), r"\1"),
               (re.compile(r"logprobs"), "include"))  # fmt: skip
# chat's shapes (named tool_choices, a custom tool's format), as its errors write them, and as a
# Responses body writes them
_CHAT_SHAPES = (('{"type": "function", "function": {"name": ...}}', '{"type": "function", "name": ...}'),
                ('{"type": "custom", "custom": {"name": ...}}', '{"type": "custom", "name": ...}'),
                ('{"type": "grammar", "grammar": {"syntax": "lark" or "regex", "definition": str}}',
                 '{"type": "grammar", "syntax": "lark" or "regex", "definition": str}'))  # fmt: skip


def _responses_name(path: str) -> str:
    """The Responses field a chat field (or a path in one) comes from."""
    for pattern, name in _CHAT_NAMES:
        if (m := pattern.match(path)) is not None:
            return m.expand(name) + ("" if name == "input" else path[m.end() :])
    return path


def _renamed(e: ApiError) -> ApiError:
    """An error of chat's parsing, naming the Responses field chat's came from."""
    head, sep, rest = e.message.partition(": ")
    message = (_responses_name(head) + sep + rest) if sep and " " not in head else e.message
    e.param = None if e.param is None else _responses_name(e.param)
    for chat, own in _CHAT_SHAPES:
        message = message.replace(chat, own)
    e.message = message
    return e
