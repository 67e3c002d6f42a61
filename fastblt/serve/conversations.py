"""OpenAI's Conversations API (/v1/conversations): conversations kept in memory, whose items a
response reads before its own input (POST /v1/responses with `conversation`) and then gets that
input and its output added to.

A conversation holds its items in the order they came (each with its id, as the API lists them).
The store is bounded by bytes (its items' JSON), like the kept responses: past its budget the least
recently used conversations go, and a conversation that alone outgrows it keeps its newest items.
Items are checked and given their stored shape by responses.py, which reads and writes them here.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field

MAX_NEW_ITEMS = 20  # items per create or add call, as OpenAI's


@dataclass
class Conversation:
    id: str
    created_at: int
    metadata: dict[str, str]
    items: list[dict] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)  # each item's bytes (its JSON's)

    @property
    def size(self) -> int:
        return sum(self.sizes) + len(json.dumps(self.metadata))

    def public(self) -> dict:
        """The Conversation object the API answers with."""
        return {"id": self.id, "object": "conversation", "created_at": self.created_at, "metadata": self.metadata}


class ConversationStore:
    """Conversations by id, the least recently used dropped past `budget` bytes. Thread-safe:
    requests are parsed off the event loop."""

    def __init__(self, budget: int):
        self.budget, self.used = budget, 0
        self._kept: OrderedDict[str, Conversation] = OrderedDict()
        self._lock = threading.Lock()

    def create(self, items: list[dict], metadata: dict[str, str]) -> dict:
        conv = Conversation(f"conv_{uuid.uuid4().hex}", int(time.time()), metadata)
        with self._lock:
            self._kept[conv.id] = conv
            self.used += conv.size
            self._append(conv, items)
            return conv.public()

    def public(self, cid: str) -> dict | None:
        with self._lock:
            conv = self._use(cid)
            return None if conv is None else conv.public()

    def items(self, cid: str) -> list[dict] | None:
        """The conversation's items, oldest first (a copy of the list), or None."""
        with self._lock:
            conv = self._use(cid)
            return None if conv is None else list(conv.items)

    def add(self, cid: str, items: list[dict]) -> bool:
        """Append `items`; False when no such conversation is kept."""
        with self._lock:
            conv = self._use(cid)
            if conv is not None:
                self._append(conv, items)
            return conv is not None

    def set_metadata(self, cid: str, metadata: dict[str, str]) -> dict | None:
        with self._lock:
            conv = self._use(cid)
            if conv is None:
                return None
            self.used -= conv.size
            conv.metadata = metadata
            self.used += conv.size
            self._shrink(conv)
            return conv.public()

    def delete(self, cid: str) -> bool:
        with self._lock:
            conv = self._kept.pop(cid, None)
            if conv is not None:
                self.used -= conv.size
            return conv is not None

    def delete_item(self, cid: str, item_id: str) -> bool | None:
        """Drop one item: True, False when the conversation has none of that id, None when no
        such conversation is kept."""
        with self._lock:
            conv = self._use(cid)
            if conv is None:
                return None
            at = next((i for i, item in enumerate(conv.items) if item.get("id") == item_id), None)
            if at is None:
                return False
            del conv.items[at]
            self.used -= conv.sizes.pop(at)
            return True

    def _use(self, cid: str) -> Conversation | None:
        conv = self._kept.get(cid)
        if conv is not None:
            self._kept.move_to_end(cid)
        return conv

    def _append(self, conv: Conversation, items: list[dict]) -> None:
        for item in items:
            size = len(json.dumps(item))
            conv.items.append(item)
            conv.sizes.append(size)
            self.used += size
        self._shrink(conv)

    def _shrink(self, conv: Conversation) -> None:
        """Back within the budget: the least recently used other conversations go first, then
        `conv`'s oldest items (one longer than the whole budget keeps its newest)."""
        while self.used > self.budget and len(self._kept) > 1:
            oldest = next(iter(self._kept))
            if oldest == conv.id:
                self._kept.move_to_end(oldest)
                continue
            self.used -= self._kept.pop(oldest).size
        while self.used > self.budget and conv.items:
            del conv.items[0]
            self.used -= conv.sizes.pop(0)
