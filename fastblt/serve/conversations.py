"""OpenAI's Conversations API (/v1/conversations): conversations kept by the server, whose items a
response reads before its own input (POST /v1/responses with `conversation`) and then gets that
input and its output added to.

A conversation holds its items in the order they came (each with its id, as the API lists them).
The store is bounded by bytes (its conversations' JSON), like the kept responses, and kept the same
way (kept.py: in memory, or in a file a restarted server reads again): past its budget the least
recently used conversations go, and a conversation that alone outgrows it keeps its newest items.
Items are checked and given their stored shape by responses.py, which reads and writes them here.
"""

from __future__ import annotations

import threading
import time
import uuid

from fastblt.serve.kept import Kept, MemoryKept, size_of

MAX_NEW_ITEMS = 20  # items per create or add call, as OpenAI's


def public(conv: dict) -> dict:
    """The Conversation object the API answers with, of a kept conversation."""
    return {"id": conv["id"], "object": "conversation", "created_at": conv["created_at"], "metadata": conv["metadata"]}


class ConversationStore:
    """Conversations by id in a Kept map (in memory, or in --response-store-dir's file), the least
    recently used dropped past its budget. A conversation is kept whole ({id, created_at,
    metadata, items}) and read, changed and put again under one lock, so that two responses
    adding to it at once both land."""

    def __init__(self, kept: Kept | int):
        self.kept = MemoryKept(kept) if isinstance(kept, int) else kept
        self._lock = threading.Lock()

    @property
    def budget(self) -> int:
        return self.kept.budget

    @property
    def used(self) -> int:
        return self.kept.used

    def create(self, items: list[dict], metadata: dict[str, str]) -> dict:
        conv = {"id": f"conv_{uuid.uuid4().hex}", "created_at": int(time.time()), "metadata": metadata, "items": []}
        with self._lock:
            self._put(conv, items)
        return public(conv)

    def public(self, cid: str) -> dict | None:
        conv = self.kept.get(cid)
        return None if conv is None else public(conv)

    def items(self, cid: str) -> list[dict] | None:
        """The conversation's items, oldest first (a list of its own), or None."""
        conv = self.kept.get(cid)
        return None if conv is None else list(conv["items"])

    def add(self, cid: str, items: list[dict]) -> bool:
        """Append `items`; False when no such conversation is kept."""
        with self._lock:
            conv = self.kept.get(cid)
            if conv is not None:
                self._put(conv, items)
            return conv is not None

    def set_metadata(self, cid: str, metadata: dict[str, str]) -> dict | None:
        with self._lock:
            conv = self.kept.get(cid)
            if conv is None:
                return None
            conv["metadata"] = metadata
            self._put(conv, [])
            return public(conv)

    def delete(self, cid: str) -> bool:
        with self._lock:
            return self.kept.delete(cid)

    def delete_item(self, cid: str, item_id: str) -> bool | None:
        """Drop one item: True, False when the conversation has none of that id, None when no
        such conversation is kept."""
        with self._lock:
            conv = self.kept.get(cid)
            if conv is None:
                return None
            at = next((i for i, item in enumerate(conv["items"]) if item.get("id") == item_id), None)
            if at is not None:
                del conv["items"][at]
                self._put(conv, [])
            return at is not None

    def _put(self, conv: dict, new: list[dict]) -> None:
        """Keep `conv` with `new` items after its own; one that alone outgrows the budget keeps its
        newest items (the least recently used others go first, as any put)."""
        items = conv["items"] = [*conv["items"], *new]
        over, drop = size_of(conv) - self.kept.budget, 0
        while over > 0 and drop < len(items):  # an estimate: an item and the ", " after it
            over -= size_of(items[drop]) + 2
            drop += 1
        conv["items"] = items[drop:]
        while size_of(conv) > self.kept.budget and conv["items"]:
            del conv["items"][0]
        self.kept.put(conv["id"], conv)
