"""Stored chat completions (OpenAI's `store: true`): kept with their messages, listed by model and
metadata in the order they were kept, relabelled, paged and deleted; a streamed answer is kept as
the same request answers unstreamed; the openai client drives the routes of a real server."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest
from conftest import CHAT_STOP, CHAT_TEMPLATE, KEY

from fastblt.serve.api import ApiError
from fastblt.serve.chat import CHAT, ChatTemplate, CustomShape, TaggedShape, ToolShape
from fastblt.serve.chat_store import TABLE, ChatStore, Merged, StoredChat
from fastblt.serve.kept import FileKept, MemoryKept
from fastblt.serve.tools import CallTags

MODEL = "fastblt-default"
TEMPLATE = ChatTemplate(CHAT_TEMPLATE, stops=(CHAT_STOP,))
PARTS = [{"type": "text", "text": "import os"}, {"type": "text", "text": "def"}]
MESSAGES = [{"role": "system", "content": "path helpers"}, {"role": "user", "content": PARTS}]


def _completion(cid: str, model: str = MODEL, text: str = "x") -> dict:
    return CHAT.body(cid, model, [CHAT.choice(text, "stop", 0, None)], {"prompt_tokens": 1, "completion_tokens": 1,
                                                                        "total_tokens": 2})  # fmt: skip


def _ids(page: dict) -> list[str]:
    return [c["id"] for c in page["data"]]


@pytest.fixture(params=["memory", "file"])
def store(request, tmp_path):
    kept = MemoryKept(1 << 20) if request.param == "memory" else FileKept(tmp_path / "kept.sqlite3", TABLE, 1 << 20)
    return ChatStore(kept)


def test_kept_completions_are_listed_in_the_order_kept_filtered_and_paged(store):
    for i, (model, tag) in enumerate([(MODEL, "a"), ("other", "a"), (MODEL, "b"), (MODEL, "a")]):
        assert store.put(_completion(f"c{i}", model), [{"role": "user", "content": "hi"}], {"tag": tag, "n": str(i)})
    assert _ids(store.listed({})) == ["c0", "c1", "c2", "c3"]  # asc: OpenAI's default here
    assert _ids(store.listed({"order": "desc"})) == ["c3", "c2", "c1", "c0"]
    assert _ids(store.listed({"model": MODEL})) == ["c0", "c2", "c3"]
    assert _ids(store.listed({"metadata[tag]": "a"})) == ["c0", "c1", "c3"]
    assert _ids(store.listed({"metadata[tag]": "a", "model": MODEL, "metadata[n]": "3"})) == ["c3"]
    assert _ids(store.listed({"metadata[nope]": "a"})) == []
    first = store.listed({"limit": "2"})
    assert (_ids(first), first["first_id"], first["last_id"], first["has_more"]) == (["c0", "c1"], "c0", "c1", True)
    rest = store.listed({"limit": "2", "after": first["last_id"]})
    assert (_ids(rest), rest["has_more"]) == (["c2", "c3"], False)
    got = store.get("c2")
    assert got["metadata"] == {"tag": "b", "n": "2"} and got["choices"][0]["message"]["content"] == "x"
    assert store.set_metadata("c2", {"tag": "a"})["metadata"] == {"tag": "a"} == store.get("c2")["metadata"]
    assert _ids(store.listed({"metadata[tag]": "a", "model": MODEL})) == ["c0", "c2", "c3"]
    assert store.delete("c2") == {"id": "c2", "object": "chat.completion.deleted", "deleted": True}
    assert _ids(store.listed({})) == ["c0", "c1", "c3"]
    for call in (lambda: store.get("c2"), lambda: store.delete("c2"), lambda: store.set_metadata("c2", {}),
                 lambda: store.messages("c2", {})):  # fmt: skip
        with pytest.raises(ApiError) as e:
            call()
        assert e.value.status == 404 and "'c2'" in e.value.message


@pytest.mark.parametrize(
    "query, param",
    [({"order": "up"}, "order"), ({"limit": "0"}, "limit"), ({"limit": "101"}, "limit"), ({"limit": "x"}, "limit"),
     ({"after": "nope"}, "after"), ({"before": "c0"}, "before"), ({"metadata": "a"}, "metadata")],
)  # fmt: skip
def test_a_list_query_is_checked_by_parameter(store, query, param):
    store.put(_completion("c0"), [], {})
    with pytest.raises(ApiError) as e:
        store.listed(query)
    assert e.value.status == 400 and e.value.param == param, e.value.message


def test_messages_keep_their_ids_and_parts_and_page_oldest_first():
    store = ChatStore(MemoryKept(1 << 20))
    asked = StoredChat(MODEL, "blt-s", TEMPLATE, store)
    asked.parse(json.dumps({"model": MODEL, "messages": MESSAGES, "store": True}).encode())
    asked.answer(_completion("c0"))
    page = store.messages("c0", {})
    assert _ids(page) == ["c0-0", "c0-1"] and not page["has_more"]
    system, user = page["data"]
    assert (system["content"], system["content_parts"]) == ("path helpers", None)
    assert (user["role"], user["content"], user["content_parts"]) == ("user", "import os\ndef", PARTS)
    assert _ids(store.messages("c0", {"order": "desc", "limit": "1"})) == ["c0-1"]
    assert _ids(store.messages("c0", {"after": "c0-0"})) == ["c0-1"]


def test_the_least_recently_used_go_and_a_list_uses_only_those_on_its_page():
    one = len(json.dumps({"completion": _completion("c0") | {"metadata": {}}, "messages": [], "at": time.time()}))
    store = ChatStore(MemoryKept(3 * one + 10))
    for i in range(3):
        store.put(_completion(f"c{i}"), [], {})
    store.get("c0")  # c1 is now the least recently used
    assert _ids(store.listed({"metadata[k]": "v"})) == []  # a list that finds none reads none
    assert _ids(store.listed({"model": "other"})) == []
    store.put(_completion("c3"), [], {})
    assert _ids(store.listed({"limit": "1"})) == ["c0"]  # read: c2 is now the least recently used
    store.put(_completion("c4"), [], {})
    assert _ids(store.listed({})) == ["c0", "c3", "c4"]


def test_a_file_keeps_them_for_the_next_server(tmp_path):
    path = tmp_path / "kept.sqlite3"
    ChatStore(FileKept(path, TABLE, 1 << 20)).put(_completion("c0"), [{"role": "user", "content": "hi"}], {"k": "v"})
    again = ChatStore(FileKept(path, TABLE, 1 << 20))
    assert again.get("c0")["metadata"] == {"k": "v"} and _ids(again.listed({"metadata[k]": "v"})) == ["c0"]


def test_store_and_metadata_are_checked_and_a_server_without_a_store_refuses_store_true():
    def parse(chats, **fields):
        return StoredChat(MODEL, "blt-s", TEMPLATE, chats).parse(json.dumps({"model": MODEL, "messages": MESSAGES,
                                                                              **fields}).encode())  # fmt: skip

    kept = ChatStore(MemoryKept(1 << 20))
    for fields, param in [({"store": "yes"}, "store"), ({"store": True, "metadata": {"k": 1}}, "metadata"),
                          ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata")]:  # fmt: skip
        with pytest.raises(ApiError) as e:
            parse(kept, **fields)
        assert e.value.status == 400 and e.value.param == param, e.value.message
    with pytest.raises(ApiError) as e:
        parse(None, store=True)
    assert e.value.status == 400 and e.value.param == "store" and "--response-store-mb 0" in e.value.message
    parse(None, store=False, metadata={"k": "v"})  # nothing to keep: metadata only labels a kept one
    assert parse(kept, store=True, stream=True).include_usage  # a kept stream counts its usage ...
    assert not parse(kept, stream=True).include_usage


# ---------------------------------------------------------------------------- a stream merged
TAGS = CallTags(">", "</call>")
CALLS = '{"name": "get_time", "arguments": {}}'


@pytest.mark.parametrize(
    "make, text",
    [
        (lambda: CHAT, "def main():\n    pass"),
        (lambda: CHAT, ""),
        (lambda: ToolShape(False), f'[{CALLS}, {{"name": "f", "arguments": {{"a": [1, 2]}}}}]'),
        (lambda: ToolShape(False), '[{"name": "get_ti'),  # cut by max_tokens: no call closed
        (lambda: ToolShape(True), CALLS),
        (lambda: CustomShape("run"), "main(1, 2)"),
        (lambda: TaggedShape(TAGS), f"so I ask > {CALLS}</call> and >{CALLS}</call>"),
        (lambda: TaggedShape(TAGS), "no call here"),
    ],
)
@pytest.mark.parametrize("size", [1, 3, 1000])
def test_a_streamed_answer_merges_into_the_unstreamed_one(make, text, size):
    """Chunks of every size, as chat's shapes stream them, merge into the message, calls and
    logprobs that the same shape gives for the whole text (call ids aside: each answer draws its own)."""
    reason = "length" if text[-6:] == "get_ti" else "stop"
    scores = [{"token": c, "logprob": -0.5, "bytes": [ord(c)], "top_logprobs": []} for c in text]
    whole = make().choice(text, reason, 0, {"content": scores, "refusal": None})
    merged, shape = Merged(), make()
    pieces = [text[i : i + size] for i in range(0, len(text), size)] + [""]
    for i, piece in enumerate(pieces):
        at = sum(map(len, pieces[:i]))
        logprobs = {"content": scores[at : at + len(piece)], "refusal": None}
        delta = shape.delta(piece, reason if i == len(pieces) - 1 else None, 0, logprobs, i == 0)
        merged.add(shape.body("c0", MODEL, [delta], created=1, chunk=True) | {"usage": None})
    merged.add(shape.body("c0", MODEL, [], {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3},
                          created=1, chunk=True))  # fmt: skip
    got = merged.completion()
    assert got["object"] == "chat.completion" and got["usage"]["total_tokens"] == 3
    (choice,) = got["choices"]
    for c in (choice, whole):
        for call in c["message"].get("tool_calls") or ():
            call["id"] = "call"
    assert choice == whole


def test_a_stream_that_failed_is_not_kept():
    store = ChatStore(MemoryKept(1 << 20))
    asked = StoredChat(MODEL, "blt-s", TEMPLATE, store)
    asked.parse(json.dumps({"model": MODEL, "messages": MESSAGES, "store": True, "stream": True}).encode())
    asked.frame(CHAT.body("c0", MODEL, [CHAT.delta("x", None, 0, None, True)], created=1, chunk=True))
    assert asked.frame({"error": {"message": "m", "type": "t", "param": None, "code": None}}).startswith(b"data: ")
    asked.frame("[DONE]")
    assert store.listed({})["data"] == []


# ---------------------------------------------------------------------------- a server
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=120)


def test_the_openai_client_stores_lists_updates_pages_and_deletes(server):
    c = client(server)
    tag = f"t{time.time_ns()}"  # this test's own: the session's server keeps others'
    asked = dict(model=MODEL, messages=MESSAGES, max_completion_tokens=24, temperature=0)
    plain = c.chat.completions.create(**asked)
    kept = [c.chat.completions.create(**asked, store=True, metadata={"tag": tag, "i": str(i)}) for i in range(3)]
    assert plain.choices[0].message.content == kept[0].choices[0].message.content  # store changes no byte
    got = c.chat.completions.retrieve(kept[1].id)
    assert got.model_dump(exclude={"metadata"}) == kept[1].model_dump(exclude={"metadata"})
    assert got.metadata == {"tag": tag, "i": "1"}
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.retrieve(plain.id)  # store false: not kept
    listed = c.chat.completions.list(metadata={"tag": tag})
    assert [x.id for x in listed] == [k.id for k in kept]
    desc = c.chat.completions.list(metadata={"tag": tag}, order="desc", limit=2)
    assert [x.id for x in desc.data] == [kept[2].id, kept[1].id] and desc.has_more
    pages = [[x.id for x in page.data] for page in desc.iter_pages()]  # the client pages on by `after`
    assert pages == [[kept[2].id, kept[1].id], [kept[0].id]]
    everything = [x.id for x in c.chat.completions.list(metadata={"tag": tag}, order="desc", limit=1)]  # auto-paged
    assert everything == [k.id for k in reversed(kept)]
    assert [x.id for x in c.chat.completions.list(metadata={"tag": tag}, model="other")] == []
    updated = c.chat.completions.update(kept[0].id, metadata={"tag": tag + "x"})
    assert updated.metadata == {"tag": tag + "x"}
    assert [x.id for x in c.chat.completions.list(metadata={"tag": tag})] == [k.id for k in kept[1:]]
    messages = list(c.chat.completions.messages.list(kept[0].id))
    assert [m.id for m in messages] == [f"{kept[0].id}-0", f"{kept[0].id}-1"]
    assert (
        messages[1].content == "import os\ndef"
        and [p.model_dump(exclude_none=True) for p in messages[1].content_parts] == PARTS
    )
    deleted = c.chat.completions.delete(kept[0].id)
    assert deleted.deleted and deleted.id == kept[0].id and deleted.object == "chat.completion.deleted"
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.delete(kept[0].id)
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.update(kept[1].id, metadata={"k": "v" * 513})
    assert e.value.body["param"] == "metadata"


@pytest.mark.parametrize(
    "fields",
    [
        dict(temperature=0, logprobs=True, top_logprobs=2),
        dict(temperature=1, seed=7, n=2),
        dict(temperature=0, tools=[{"type": "function", "function": {"name": "get_time"}}], tool_choice="required"),
    ],
    ids=["greedy-logprobs", "sampled-n2", "tools"],
)
def test_a_streamed_answer_is_kept_as_the_unstreamed_one(server, fields):
    c = client(server)
    asked = dict(model=MODEL, messages=MESSAGES, max_completion_tokens=40, store=True, **fields)
    whole = c.chat.completions.create(**asked)
    chunks = list(c.chat.completions.create(**asked, stream=True))
    assert all(ch.usage is None for ch in chunks)  # the usage it counted for the store is not sent
    kept = [c.chat.completions.retrieve(x).model_dump() for x in (whole.id, chunks[0].id)]
    for k in kept:
        del k["id"], k["created"]
        for choice in k["choices"]:
            for call in choice["message"]["tool_calls"] or ():
                call["id"] = "call"
    assert kept[0] == kept[1]
    with_usage = list(c.chat.completions.create(**asked, stream=True, stream_options={"include_usage": True}))
    assert with_usage[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_a_stream_without_usage_sends_no_usage_field(server):
    """Raw chunks: a kept stream the client asked no usage of carries no `usage` key at all, as an
    unkept one does not."""
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 8, "temperature": 0, "stream": True}
    lines = {}
    for store in (False, True):
        with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body | {"store": store},
                          headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as r:  # fmt: skip
            assert r.status_code == 200
            lines[store] = [json.loads(x[6:]) for x in r.iter_lines() if x.startswith("data: {")]
    # (how many chunks a stream makes depends on timing: the text made between reads goes together)
    shapes = {store: {frozenset(x) for x in lines[store]} for store in (False, True)}
    assert shapes[True] == shapes[False] and not any("usage" in x for x in lines[True])


def test_bad_requests_to_the_stored_routes_are_4xx_naming_what_is_wrong(server):
    auth = {"Authorization": f"Bearer {KEY}"}
    cid = client(server).chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2, store=True).id
    url = f"{server.url}/v1/chat/completions"
    for method, path, body, status, param in [
        ("GET", "?limit=0", None, 400, "limit"),
        ("GET", "?order=sideways", None, 400, "order"),
        ("GET", "?metadata=x", None, 400, "metadata"),
        ("GET", f"/{cid}/messages?after=nope", None, 400, "after"),
        ("POST", f"/{cid}", {}, 400, "metadata"),
        ("POST", f"/{cid}", {"metadata": {}, "store": True}, 400, "store"),
        ("POST", f"/{cid}", {"metadata": ["k"]}, 400, "metadata"),
        ("POST", "/chatcmpl-none", {"metadata": {}}, 404, None),
        ("GET", "/chatcmpl-none/messages", None, 404, None),
    ]:  # fmt: skip
        r = httpx.request(method, url + path, json=body, headers=auth, timeout=60)
        assert (r.status_code, r.json()["error"]["param"]) == (status, param), (method, path, r.text)
    assert httpx.get(url, timeout=60).status_code == 401  # the server's key, as for every route
    assert httpx.get(f"{url}/{cid}", headers=auth, timeout=60).json()["id"] == cid  # and it still serves
