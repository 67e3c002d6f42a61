"""OpenAI's Conversations API: conversations kept by the server (within a budget, the least recently
used dropped), their items checked as a response's input and listed in their stored shape; a
response that names one reads its items first and adds its input and output to it, streamed or
not, so the next turn continues from there; the openai client drives all of it."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest
from conftest import CHAT_STOP, CHAT_TEMPLATE, KEY

from fastblt.serve.api import ApiError
from fastblt.serve.chat import ChatTemplate
from fastblt.serve.conversations import ConversationStore
from fastblt.serve.kept import size_of
from fastblt.serve.responses import ResponsesRequest, conversation_items

MODEL = "fastblt-default"
TEMPLATE = ChatTemplate(CHAT_TEMPLATE, stops=(CHAT_STOP,))
ASK = "import os\n\n\ndef main("


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=120)


def _item(text: str, role: str = "user") -> dict:
    return {"id": f"msg_{text}", "type": "message", "role": role, "status": "completed",
            "content": [{"type": "input_text", "text": text}]}  # fmt: skip


def test_the_store_drops_the_least_recently_used_and_a_conversation_past_the_budget_keeps_its_newest():
    # a conversation of four such items fills the store: its id, created_at and metadata, and the items
    envelope = size_of({"id": "conv_" + "0" * 32, "created_at": int(time.time()), "metadata": {}, "items": []})
    store = ConversationStore(envelope - 2 + size_of([_item(c * 100) for c in "xzwv"]))
    a = store.create([_item("x" * 100)], {})["id"]
    b = store.create([_item("y" * 100)], {"k": "v"})["id"]
    assert store.items(a)[0]["id"] == "msg_" + "x" * 100  # a used: b is now the least recently used
    assert store.add(a, [_item("z" * 100), _item("w" * 100)]) and store.public(b) is None  # b went
    assert store.add(a, [_item("v" * 100)]) and store.used <= store.budget
    assert [i["content"][0]["text"][0] for i in store.items(a)] == ["x", "z", "w", "v"]
    assert store.add(a, [_item("u" * 100)]) and [i["content"][0]["text"][0] for i in store.items(a)] == list("zwvu")
    assert store.delete_item(a, "msg_" + "w" * 100) is True and store.delete_item(a, "nope") is False
    assert store.delete_item("conv_x", "msg_1") is None and not store.add("conv_x", [])
    assert store.set_metadata(a, {"topic": "t"})["metadata"] == {"topic": "t"}
    # labels that take a full conversation past the budget are kept; its oldest items make room
    labels = {"k": "v" * 150}
    assert store.add(a, [_item("t" * 100)]) and store.set_metadata(a, labels)["metadata"] == labels
    assert store.public(a)["metadata"] == labels and store.used <= store.budget
    assert [i["content"][0]["text"][0] for i in store.items(a)] == list("vut")
    assert store.delete(a) and not store.delete(a) and store.items(a) is None and store.used == 0


def test_items_are_checked_as_input_items_and_kept_in_their_listed_shape():
    items = conversation_items([
        {"role": "user", "content": "hi"},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "yes"}]},
        {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "1"},
    ])  # fmt: skip
    assert [i["type"] for i in items] == ["message", "message", "function_call", "function_call_output"]
    assert items[0]["content"] == [{"type": "input_text", "text": "hi"}] and items[0]["id"].startswith("msg_")
    assert items[1]["content"] == [{"type": "output_text", "text": "yes", "annotations": []}]
    assert all(i["status"] == "completed" for i in items) and conversation_items(None) == []
    for given, param in [([{"role": "user", "content": 3}], "items[0].content"), ("hi", "items"),
                         ([{"type": "reasoning"}], "items[0].type"), ([_item("x")] * 21, "items"),
                         ([_item("x"), _item("y"), _item("x")], "items[2].id")]:  # fmt: skip
        with pytest.raises(ApiError) as e:
            conversation_items(given)
        assert e.value.status == 400 and e.value.param == param, e.value.message


def test_a_response_reads_the_conversation_first_and_adds_its_input_and_output():
    store = ConversationStore(1 << 20)
    cid = store.create(conversation_items([{"role": "user", "content": ASK}]), {})["id"]
    asked = ResponsesRequest(MODEL, "blt-s", TEMPLATE, conversations=store)
    comp = asked.parse(json.dumps({"model": MODEL, "input": "more", "conversation": cid}).encode())
    assert comp.prompts == [TEMPLATE.render([{"role": "user", "content": ASK}, {"role": "user", "content": "more"}])]
    assert asked.echo["conversation"] == {"id": cid}
    answer = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "path):"}, "logprobs": None,
                           "finish_reason": "stop"}],
              "usage": {"prompt_tokens": 1, "completion_tokens": 6, "total_tokens": 7,
                        "prompt_tokens_details": {"cached_tokens": 0}}}  # fmt: skip
    response = asked.answer(answer)
    texts = [i["content"][0]["text"] for i in store.items(cid)]
    assert texts == [ASK, "more", "path):"] and store.items(cid)[-1]["id"] == response["output"][0]["id"]
    for body, status, param in [({"conversation": "conv_nope"}, 404, "conversation"),
                                ({"conversation": {"id": cid}, "previous_response_id": "resp_1"}, 400, "conversation"),
                                ({"conversation": 3}, 400, "conversation")]:  # fmt: skip
        with pytest.raises(ApiError) as e:
            ResponsesRequest(MODEL, "blt-s", TEMPLATE, conversations=store).parse(
                json.dumps({"model": MODEL, "input": "x", **body}).encode())  # fmt: skip
        assert (e.value.status, e.value.param) == (status, param), e.value.message


def test_conversations_through_the_openai_client(server, reference):
    c = client(server)
    conv = c.conversations.create(items=[{"role": "user", "content": ASK}], metadata={"topic": "os"})
    held = c.conversations.items.list(conv.id).data[0].id  # an id names one item: given again, a 400
    with pytest.raises(openai.BadRequestError, match="names an item of this conversation already"):
        c.conversations.items.create(conv.id, items=[{"type": "message", "role": "user", "content": "x", "id": held}])
    assert [i.id for i in c.conversations.items.list(conv.id).data] == [held]
    assert conv.id.startswith("conv_") and conv.metadata == {"topic": "os"} and conv.object == "conversation"
    first = c.responses.create(model=MODEL, conversation=conv.id, input="print(", max_output_tokens=12, temperature=0)
    turns = [{"role": "user", "content": ASK}, {"role": "user", "content": "print("}]
    want = reference.generate(TEMPLATE.render(turns), mode="blt-s", max_bytes=12, temperature=0.0, stop=[CHAT_STOP])
    assert first.output_text == want.text and first.conversation.id == conv.id
    with c.responses.stream(model=MODEL, conversation={"id": conv.id}, input="x = ", max_output_tokens=8,
                            temperature=0) as stream:  # fmt: skip
        second = list(stream)[-1].response
    turns += [{"role": "assistant", "content": first.output_text}, {"role": "user", "content": "x = "}]
    want = reference.generate(TEMPLATE.render(turns), mode="blt-s", max_bytes=8, temperature=0.0, stop=[CHAT_STOP])
    assert second.output_text == want.text
    listed = c.conversations.items.list(conv.id, order="asc")
    assert [i.type for i in listed.data] == ["message"] * 5 and listed.has_more is False
    texts = [i.content[0].text for i in listed.data]
    assert texts == [ASK, "print(", first.output_text, "x = ", second.output_text]
    newest = c.conversations.items.list(conv.id, limit=2)
    assert [i.id for i in newest.data] == [i.id for i in listed.data[::-1][:2]] and newest.has_more
    assert [i.id for i in newest] == [i.id for i in listed.data[::-1]]  # the client pages on after the last id
    added = c.conversations.items.create(conv.id, items=[{"role": "user", "content": "again"}])
    assert added.data[0].content[0].text == "again"
    got = c.conversations.items.retrieve(added.data[0].id, conversation_id=conv.id)
    assert got.id == added.data[0].id and got.role == "user"
    assert c.conversations.items.delete(added.data[0].id, conversation_id=conv.id).id == conv.id
    assert len(c.conversations.items.list(conv.id).data) == 5
    assert c.conversations.update(conv.id, metadata={"topic": "paths"}).metadata == {"topic": "paths"}
    assert c.conversations.retrieve(conv.id).metadata == {"topic": "paths"}
    assert c.conversations.delete(conv.id).deleted is True
    with pytest.raises(openai.NotFoundError):
        c.conversations.retrieve(conv.id)
    with pytest.raises(openai.NotFoundError) as e:
        c.responses.create(model=MODEL, conversation=conv.id, input="x", max_output_tokens=4)
    assert e.value.body["param"] == "conversation"
    with pytest.raises(openai.BadRequestError) as e:
        c.conversations.create(items=[{"role": "user", "content": 3}])
    assert e.value.body["param"] == "items[0].content"
    other = c.conversations.create()
    for items in ("x", {"role": "user"}, 3):  # no list: a 400 naming the field, not a 500
        got = httpx.post(f"{server.url}/v1/conversations/{other.id}/items", json={"items": items},
                         headers={"Authorization": f"Bearer {KEY}"})  # fmt: skip
        assert got.status_code == 400 and got.json()["error"]["param"] == "items", got.text
        assert got.json()["error"]["message"].startswith("items: expected a list")


def test_responses_adding_to_one_conversation_at_once_all_land():
    """Two stores over one map (two replicas over one actor's map): adds to one conversation from
    many threads at once are each read, grown and put as one step, none lost."""
    import sys
    import threading

    from fastblt.serve.kept import MemoryKept

    shared = MemoryKept(1 << 22)
    stores = [ConversationStore(shared), ConversationStore(shared)]
    cid = stores[0].create([], {})["id"]

    def adding(k: int) -> None:
        for n in range(100):
            assert stores[k % 2].add(cid, [_item(f"{k}-{n}")])

    threads = [threading.Thread(target=adding, args=(k,)) for k in range(6)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads take turns often: a read and a put of two adds interleave
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    got = stores[1].items(cid)
    assert len(got) == 600 and len({i["content"][0]["text"] for i in got}) == 600
    assert stores[0].delete_item(cid, got[0]["id"]) is True and stores[1].delete_item(cid, got[0]["id"]) is False
    assert len(stores[1].items(cid)) == 599 and stores[0].delete_item("conv_none", "x") is None
