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

import functools
import time
import uuid

from fastblt.serve.kept import Kept, MemoryKept, size_of

MAX_NEW_ITEMS = 20  # items per create or add call, as OpenAI's


def public(conv: dict) -> dict:
    """The Conversation object the API answers with, of a kept conversation."""
    return {"id": conv["id"], "object": "conversation", "created_at": conv["created_at"], "metadata": conv["metadata"]}


class ConversationStore:
    """Conversations by id in a Kept map (in memory, in --response-store-dir's file, or in the
    actor Ray replicas share), the least recently used dropped past its budget. A conversation is
    kept whole ({id, created_at, metadata, items}) and changed through the map's `update` (read,
    changed and put as one step), so that two responses adding to it at once both land, from one
    server or from two replicas."""

    def __init__(self, kept: Kept | int):
        self.kept = MemoryKept(kept) if isinstance(kept, int) else kept

    @property
    def budget(self) -> int:
        return self.kept.budget

    @property
    def used(self) -> int:
        return self.kept.used

    def create(self, items: list[dict], metadata: dict[str, str]) -> dict:
        conv = {"id": f"conv_{uuid.uuid4().hex}", "created_at": int(time.time()), "metadata": metadata, "items": []}
        self.kept.put(conv["id"], grown(conv, items, self.budget))
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
        return self.kept.update(cid, functools.partial(grown, new=items, budget=self.budget)) is not None

    def set_metadata(self, cid: str, metadata: dict[str, str]) -> dict | None:
        conv = self.kept.update(cid, functools.partial(_with_metadata, metadata=metadata, budget=self.budget))
        return None if conv is None else public(conv)

    def delete(self, cid: str) -> bool:
        return self.kept.delete(cid)

    def delete_item(self, cid: str, item_id: str) -> bool | None:
        """Drop one item: True, False when the conversation has none of that id, None when no
        such conversation is kept."""
        items = self.items(cid)
        if items is None:
            return None
        if not any(item.get("id") == item_id for item in items):
            return False
        return self.kept.update(cid, functools.partial(_without_item, item_id=item_id)) is not None


def grown(conv: dict, new: list[dict], budget: int) -> dict:
    """`conv` with `new` items after its own; one that alone outgrows `budget` keeps its newest
    items (the least recently used others go first, as at any put). A change of the value alone:
    it runs where the map is (a Ray actor, for replicas)."""
    items = conv["items"] = [*conv["items"], *new]
    over, drop = size_of(conv) - budget, 0
    while over > 0 and drop < len(items):  # an estimate: an item and the ", " after it
        over -= size_of(items[drop]) + 2
        drop += 1
    conv["items"] = items[drop:]
    while size_of(conv) > budget and conv["items"]:
        del conv["items"][0]
    return conv


def _with_metadata(conv: dict, metadata: dict[str, str], budget: int) -> dict:
    """New labels; a conversation they take past `budget` keeps its newest items, as `grown`."""
    return grown({**conv, "metadata": metadata}, [], budget)


def _without_item(conv: dict, item_id: str) -> dict:
    return {**conv, "items": [item for item in conv["items"] if item.get("id") != item_id]}
