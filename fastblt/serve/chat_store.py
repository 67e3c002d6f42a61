"""Stored chat completions (OpenAI's `store: true` on POST /v1/chat/completions): the answer and
its input messages kept, for GET /v1/chat/completions to list (by model and metadata),
GET/POST/DELETE /v1/chat/completions/{id} to read, relabel (metadata) and drop, and
GET .../messages to page through.

They are kept beside responses and conversations (kept.py: a table of their own within the same
budget, in memory, in --response-store-dir's file, or in Ray's store actor), the least recently
used dropped first. A streamed answer is kept as the same request unstreamed would be answered:
its chunks merged (`Merged`).
Docs: docs/serving.md.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from fastblt.serve.api import ApiError, Completion, cursor_page, get_field, get_metadata, load_json, sse
from fastblt.serve.chat import ChatTemplate, message_text, parse_chat, parse_chat_body
from fastblt.serve.kept import Kept

TABLE = "chat_completions"
LIST_FIELDS = {"after", "limit", "order", "model"}  # and metadata[KEY]=VALUE, any number


class ChatStore:
    """The kept chat completions, by id: each {"completion", "messages", "at"}: the answer as it
    was sent (plus its `metadata`), the request's messages with their ids, and when it was kept
    (the list's order, finer than `created`'s seconds)."""

    def __init__(self, kept: Kept):
        self.kept = kept

    def put(self, completion: dict, messages: list[dict], metadata: dict[str, str]) -> bool:
        """Keep `completion` (False: it alone exceeds the store's budget)."""
        cid = completion["id"]
        stored = [{"id": f"{cid}-{i}", **m} for i, m in enumerate(messages)]
        return self.kept.put(cid, {"completion": completion | {"metadata": metadata}, "messages": stored,
                                   "at": time.time()})  # fmt: skip

    def get(self, cid: str) -> dict:
        return self._found(cid, self.kept.get(cid))["completion"]

    def messages(self, cid: str, query: Mapping[str, str]) -> dict:
        """A page of the request's messages, oldest first unless `order` is desc (OpenAI's default
        is asc here, unlike a response's input items)."""
        return cursor_page(_ordered(self._found(cid, self.kept.get(cid))["messages"], query), query)

    def set_metadata(self, cid: str, metadata: dict[str, str]) -> dict:
        """The completion with its metadata replaced (OpenAI's update: metadata only)."""

        def relabel(value: dict) -> dict:
            value["completion"]["metadata"] = metadata
            return value

        return self._found(cid, self.kept.update(cid, relabel))["completion"]

    def delete(self, cid: str) -> dict:
        if not self.kept.delete(cid):
            self._found(cid, None)
        return {"id": cid, "object": "chat.completion.deleted", "deleted": True}

    def listed(self, query: Mapping[str, str]) -> dict:
        """A page of the kept completions of `model` and every `metadata[KEY]=VALUE` the query names,
        oldest first unless `order` is desc; `limit` (1-100, default 20) after the id `after`."""
        unknown = sorted(k for k in query if k not in LIST_FIELDS and not _metadata_key(k))
        if unknown:
            raise ApiError(400, f"{unknown[0]}: not a query parameter of this list (after, limit, order, model, "
                           "metadata[KEY])", unknown[0])  # fmt: skip
        model = query.get("model")
        wanted = {_metadata_key(k): v for k, v in query.items() if _metadata_key(k)}
        found = self.kept.scan(lambda key, value: _matching(key, value, model, wanted))
        page = cursor_page(_ordered([{"id": cid} for _, cid in sorted(found)], query), query)
        # read one by one: a completion dropped since the scan is left out of its page
        page["data"] = [v["completion"] for item in page["data"] if (v := self.kept.get(item["id"])) is not None]
        return page

    @staticmethod
    def _found(cid: str, value: Any) -> Any:
        if value is None:
            raise ApiError(404, f"chat completion {cid!r:.80}: not kept here (only one created with store: true is, "
                           "within --response-store-mb, the least recently used dropped first)", None,
                           "not_found")  # fmt: skip
        return value


def _metadata_key(name: str) -> str | None:
    return name[len("metadata[") : -1] if name.startswith("metadata[") and name.endswith("]") else None


def _matching(key: str, value: dict, model: str | None, metadata: dict[str, str]) -> tuple[float, str] | None:
    """(when it was kept, its id) if the kept completion is of `model` with every `metadata`
    item; runs where the values are (Ray's store actor: sent there by value)."""
    completion = value["completion"]
    if model is not None and completion.get("model") != model:
        return None
    if any(completion.get("metadata", {}).get(k) != v for k, v in metadata.items()):
        return None
    return value["at"], key


def _ordered(items: list[dict], query: Mapping[str, str]) -> list[dict]:
    order = query.get("order", "asc")
    if order not in ("asc", "desc"):
        raise ApiError(400, f'order: expected "asc" or "desc", got {order!r:.20}', "order")
    return items[::-1] if order == "desc" else items


class StoredChat:
    """One POST /v1/chat/completions: parsed as chat.py parses it, plus OpenAI's `store` and
    `metadata`; with store true, its answer is kept (`answer` for a whole one, `frame` for a
    streamed one, as app.py's `reshape` and `frame`)."""

    def __init__(self, model_id: str, default_mode: str, template: ChatTemplate | None, store: ChatStore | None):
        self.model_id, self.default_mode, self.template, self.store = model_id, default_mode, template, store
        self.keep = False
        self.metadata: dict[str, str] = {}
        self.messages: list[dict] = []
        self.usage_asked = False  # the client's stream_options.include_usage (a kept stream always counts)
        self.merged: Merged | None = None

    def parse(self, raw: bytes) -> Completion:
        if self.template is None:
            return parse_chat_body(raw, self.model_id, self.default_mode, None)  # its 404
        body = load_json(raw)
        asked = {k: v for k, v in body.items() if k not in ("store", "metadata")}
        self.keep = get_field(body, "store", bool, default=False)
        self.metadata = get_metadata(body) or {}
        comp = parse_chat(asked, self.model_id, self.default_mode, self.template)
        if self.keep and self.store is None:
            raise ApiError(400, "store: this server keeps no chat completions (started with --response-store-mb 0)",
                           "store")  # fmt: skip
        if self.keep:
            self.messages = [_message(m) for m in body["messages"]]  # checked by parse_chat
            if comp.stream:
                self.usage_asked, comp.include_usage = comp.include_usage, True
                self.merged = Merged()
        return comp

    def answer(self, chat: dict) -> dict:
        """The whole answer, kept when asked to be (and it fits)."""
        if self.keep and self.store is not None:
            self.store.put(chat, self.messages, self.metadata)
        return chat

    def frame(self, body: dict | str) -> bytes:
        """A streamed body's server-sent event, merged into the answer to keep (kept at its end,
        unless the stream failed); the usage the client did not ask for is left out."""
        if self.merged is None:
            return sse(body)
        if body == "[DONE]":
            if not self.merged.failed and self.store is not None:
                self.store.put(self.merged.completion(), self.messages, self.metadata)
            return sse(body)
        self.merged.add(body)  # type: ignore[arg-type]
        if self.usage_asked or "error" in body:
            return sse(body)
        if not body["choices"]:  # the usage chunk
            return b""
        return sse({k: v for k, v in body.items() if k != "usage"})  # type: ignore[union-attr]


def _message(m: dict) -> dict:
    """A request message as OpenAI lists a stored one: its content as a string (text parts joined)
    and, when given as parts, `content_parts` too."""
    content = m.get("content")
    text = None if content is None else message_text(content, "messages")
    parts = content if isinstance(content, list) else None
    out = {"role": m["role"], "content": text, "name": m.get("name"), "content_parts": parts}
    for key in ("tool_calls", "tool_call_id"):
        if m.get(key) is not None:
            out[key] = m[key]
    return out


class Merged:
    """A streamed chat answer's chunks merged into the `chat.completion` the same request answers
    unstreamed: each choice's content, tool calls (by their index) and logprobs put together."""

    def __init__(self) -> None:
        self.head: dict | None = None
        self.choices: dict[int, dict] = {}
        self.calls: dict[int, dict[int, dict]] = {}  # choice -> call index -> call
        self.usage: dict | None = None
        self.failed = False

    def add(self, chunk: dict) -> None:
        if "error" in chunk:
            self.failed = True
            return
        if self.head is None:
            self.head = chunk
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        for c in chunk["choices"]:
            message = {"role": "assistant", "content": None, "refusal": None}
            choice = self.choices.setdefault(c["index"], {"index": c["index"], "message": message, "logprobs": None,
                                                          "finish_reason": None})  # fmt: skip
            message, delta = choice["message"], c["delta"]
            if "content" in delta:
                if delta["content"] is not None:
                    message["content"] = (message["content"] or "") + delta["content"]
                elif "tool_calls" not in message:  # a call's shape: the key stays, as unstreamed
                    message["tool_calls"] = []
            for call in delta.get("tool_calls") or ():
                self._call(c["index"], message, call)
            if c.get("logprobs") is not None:
                if choice["logprobs"] is None:
                    choice["logprobs"] = {"content": [], "refusal": None}
                choice["logprobs"]["content"] += c["logprobs"].get("content") or []
            if c.get("finish_reason") is not None:
                choice["finish_reason"] = c["finish_reason"]

    def _call(self, index: int, message: dict, delta: dict) -> None:
        calls = self.calls.setdefault(index, {})
        call = calls.get(delta["index"])
        if call is None:
            call = calls[delta["index"]] = {"id": delta["id"], "type": delta["type"]}
            call[delta["type"]] = {}
            message.setdefault("tool_calls", []).append(call)
        for key, text in delta.get(call["type"], {}).items():
            part = call[call["type"]]
            part[key] = part.get(key, "") + text if key in ("arguments", "input") else text

    def completion(self) -> dict:
        assert self.head is not None
        head = {k: v for k, v in self.head.items() if k not in ("choices", "usage")}
        choices = [self.choices[i] for i in sorted(self.choices)]
        return head | {"object": "chat.completion", "choices": choices, "usage": self.usage}
