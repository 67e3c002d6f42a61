"""Background responses on a server of many replicas, without Ray: two apps in this process over
one engine, sharing their stores and a relay (replay.Published behind the replay.Relay protocol,
as ray_kept.RayRelay reaches it in the store actor). A background response that one replica runs
is polled, streamed from any event on, cancelled and deleted through the other; a cancel or a
delete there has the last word over what the running one keeps after it."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import random
import time

import httpx
import pytest
from conftest import CHAT_STOP, CHAT_TEMPLATE

from fastblt.runtime.async_engine import AsyncEngine
from fastblt.serve import app as serve_app
from fastblt.serve import replay
from fastblt.serve.app import ServeSettings, create_app
from fastblt.serve.chat import ChatTemplate
from fastblt.serve.kept import MemoryKept
from fastblt.serve.replay import Published, Replays
from fastblt.serve.responses import RUNNING, ResponsesRequest, ResponseStore

MODEL = "fastblt-default"
ASK = "def add(a, b):"


class Relay:
    """replay.Relay over a Published in this process (what RayRelay does through the actor)."""

    def __init__(self, budget: int):
        self.now = 0.0  # the store's clock: a test moves it on
        self.published = Published(budget, clock=lambda: self.now)
        self.reads = 0

    def publish(self, rid: str, first: int, events: list[bytes], ended: bool) -> None:
        self.published.add(rid, first, events, ended)

    async def read(self, rid: str, after: int) -> tuple[list[bytes], bool] | None:
        self.reads += 1
        return self.published.read(rid, after)

    async def drop(self, rid: str) -> None:
        self.published.drop(rid)

    async def cancel(self, rid: str) -> None:
        self.published.cancel(rid)

    async def cancelled(self, rids: list[str]) -> list[str]:
        return self.published.cancelled(rids)

    async def lost(self, rid: str, running_for: float) -> bool:
        return self.published.lost(rid, running_for)


@pytest.fixture(scope="module")
def engine():
    eng = AsyncEngine("default", max_batch=4, lanes=1, processes=False)
    yield eng
    eng.close()


class Shared:
    """What the replicas share: their stores' tables, and the relay (None: two servers over one store)."""

    def __init__(self, relay: Relay | None):
        self.relay, self.tables = relay, {}

    def kept(self, table: str, budget: int) -> MemoryKept:
        return self.tables.setdefault(table, MemoryKept(budget))


@contextlib.asynccontextmanager
async def replicas(engine: AsyncEngine, many: bool = True, grace: float = 0.0, shared: Shared | None = None):
    """Two apps' clients (a, b) and what they share: replicas of one server (`many`: a relay
    between them), or two servers one after the other over one store."""
    shared = shared or Shared(Relay(1 << 20) if many else None)
    template = ChatTemplate(CHAT_TEMPLATE, stops=(CHAT_STOP,))
    settings = ServeSettings(chat_template=template, response_store=8 << 20, relay=shared.relay, kept=shared.kept,
                             background_grace=grace)  # fmt: skip
    apps = [create_app(engine, settings), create_app(engine, settings)]
    async with contextlib.AsyncExitStack() as stack:
        clients = []
        for app in apps:
            await stack.enter_async_context(app.router.lifespan_context(app))
            transport = httpx.ASGITransport(app=app)
            clients.append(await stack.enter_async_context(httpx.AsyncClient(transport=transport, base_url="http://r")))
        yield *clients, shared


def events(body: bytes) -> list[dict]:
    return [json.loads(line[6:]) for line in body.decode().splitlines() if line.startswith("data: ")]


async def until(check, seconds: float = 60.0) -> None:
    async with asyncio.timeout(seconds):
        while not await check():
            await asyncio.sleep(0.05)


def test_a_background_response_run_by_one_replica_is_polled_and_streamed_through_the_other(engine):
    async def main() -> None:
        async with replicas(engine) as (a, b, shared):
            body = {"model": MODEL, "input": ASK, "max_output_tokens": 24, "temperature": 0}
            want = (await a.post("/v1/responses", json=body)).json()
            polled = (await a.post("/v1/responses", json=body | {"background": True})).json()
            assert polled["status"] == "queued"

            async def answered() -> bool:
                return (await b.get(f"/v1/responses/{polled['id']}")).json()["status"] not in ("queued", "in_progress")

            await until(answered)
            got = (await b.get(f"/v1/responses/{polled['id']}")).json()
            assert got["status"] == want["status"] == "incomplete"
            assert got["output"][0]["content"][0]["text"] == want["output"][0]["content"][0]["text"]

            streamed = await a.post("/v1/responses", json=body | {"background": True, "stream": True})
            own = events(streamed.content)  # the POST reads the log of the replica that runs it
            rid = own[0]["response"]["id"]
            assert own[-1]["type"] == "response.incomplete"  # (max_output_tokens)
            reads = shared.relay.reads
            other = events((await b.get(f"/v1/responses/{rid}", params={"stream": "true"})).content)
            assert other == own and shared.relay.reads > reads  # read through the relay, every event in order
            later = await b.get(f"/v1/responses/{rid}", params={"stream": "true", "starting_after": "5"})
            assert events(later.content) == own[6:]
            assert (await a.get(f"/v1/responses/{rid}", params={"stream": "true"})).content == streamed.content
            t0 = time.monotonic()
            gone = await b.get(f"/v1/responses/{polled['id']}", params={"stream": "true"})
            assert gone.status_code == 400 and gone.json()["error"]["param"] == "stream"  # polled: no events
            # ... known from the kept response: no wait for events its replica could still publish
            assert time.monotonic() - t0 < serve_app.PUBLISHED_WAIT_S / 2

    asyncio.run(main())


def test_a_cancel_or_a_delete_through_the_other_replica_stops_the_one_that_runs_it(engine):
    async def main() -> None:
        async with replicas(engine) as (a, b, shared):
            body = {"model": MODEL, "input": ASK, "max_output_tokens": 16000, "temperature": 0, "background": True}
            # (ASGITransport gives a body once it ended: these streams are read when the cancel ended them)
            owner = asyncio.ensure_future(a.post("/v1/responses", json=body | {"stream": True}))
            await until(lambda: asyncio.sleep(0, bool(shared.relay.published.logs)))
            (rid,) = shared.relay.published.logs
            follower = asyncio.ensure_future(b.get(f"/v1/responses/{rid}", params={"stream": "true"}))
            await until(lambda: running(a, 1))
            cancelled = await b.post(f"/v1/responses/{rid}/cancel")  # b does not run it
            assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
            own = events((await owner).content)
            assert own[-1]["type"] == "error" and own[-1]["code"] == "response_cancelled"
            assert events((await follower).content) == own
            await until(lambda: running(a, 0))  # its rows freed
            kept = (await a.get(f"/v1/responses/{rid}")).json()
            assert kept["status"] == "cancelled" and kept["output"] == []

            polled = (await a.post("/v1/responses", json=body)).json()
            await until(lambda: running(a, 1))
            deleted = await b.delete(f"/v1/responses/{polled['id']}")
            assert deleted.status_code == 200 and deleted.json()["deleted"] is True
            await until(lambda: running(a, 0))
            await asyncio.sleep(0.1)
            assert (await a.get(f"/v1/responses/{polled['id']}")).status_code == 404  # its end kept nothing

    asyncio.run(main())


async def running(client: httpx.AsyncClient, n: int) -> bool:
    """Whether the replica runs `n` background responses (its metrics say)."""
    text = (await client.get("/metrics")).text
    return f"fastblt_background_responses {float(n)}" in text


def test_what_a_background_response_keeps_once_queued_depends_on_the_kept_one_still_running():
    store = ResponseStore(1 << 20)

    def response(status: str) -> dict:
        return {"id": "resp_1", "status": status, "output": [{"type": "message"}] if status == "completed" else []}

    store.put(response("queued"), [], 0)
    assert store.settle(response("in_progress"), [], 0)
    assert store.cancel("resp_1")["status"] == "cancelled"  # another replica's cancel: the last word
    assert not store.settle(response("completed"), [], 0)
    assert store.get("resp_1").response["status"] == "cancelled"
    store.put(response("queued"), [], 0)
    assert store.settle(response("completed"), [], 0)
    assert store.cancel("resp_1")["status"] == "completed"  # too late: it ended
    store.delete("resp_1")
    assert not store.settle(response("completed"), [], 0) and store.get("resp_1") is None  # deleted stays deleted
    assert store.cancel("resp_1") is None


def test_a_background_response_no_server_runs_any_more_reads_failed(engine, monkeypatch):
    """A response kept running by a server that was killed (a server alone runs every one it has),
    or whose replica stopped renewing its lease, reads failed; one that runs does not."""
    monkeypatch.setattr(serve_app, "CANCEL_POLL_S", 0.05)

    async def main() -> None:
        async with replicas(engine) as (a, b, shared), replicas(engine, many=False) as (alone, _, one):
            for client, tables in ((b, shared.tables), (alone, one.tables)):
                left = {"id": "resp_left", "object": "response", "status": "in_progress", "background": True,
                        "created_at": int(time.time()) - 60, "output": [], "error": None}  # fmt: skip
                ResponseStore(tables["responses"]).put(left, [], 0)
                if client is b:  # (a store younger than a lease has not seen every replica yet)
                    assert (await client.get("/v1/responses/resp_left")).json()["status"] == "in_progress"
                    shared.relay.now += replay.LEASE_S + 1
                got = (await client.get("/v1/responses/resp_left")).json()
                assert got["status"] == "failed" and "stopped before it ended" in got["error"]["message"]
            body = {"model": MODEL, "input": ASK, "max_output_tokens": 16000, "temperature": 0, "background": True}
            live = (await a.post("/v1/responses", json=body)).json()
            await asyncio.sleep(0.2)
            shared.relay.now += replay.LEASE_S + 1
            await asyncio.sleep(0.2)  # a renews its lease every 0.05 s
            assert (await b.get(f"/v1/responses/{live['id']}")).json()["status"] == "in_progress"
            assert (await b.post(f"/v1/responses/{live['id']}/cancel")).json()["status"] == "cancelled"
            await until(lambda: running(a, 0))

    asyncio.run(main())


def test_a_random_walk_of_background_responses_over_two_replicas_keeps_every_answer(engine):
    """Background responses made on either replica, streamed or polled, read, cancelled and deleted
    through either, in a random order: each one that ended on its own says what the same request
    says in the foreground (through the other replica too, and in every stream read again); each
    one cancelled reads cancelled; a deleted one is gone from both; nothing runs at the end."""
    rng = random.Random(7)
    prompts = ["def add(a, b):", "import os\n", "class Point:", "for i in range("]

    async def main() -> None:
        async with replicas(engine) as (a, b, shared):
            want: dict[tuple[str, int], str] = {}
            made: list[tuple[str, dict, bool]] = []  # (id, body, streamed)
            streams: dict[str, asyncio.Future] = {}
            for _ in range(40):
                owner, other = rng.sample([a, b], 2)
                act = rng.random()
                if act < 0.5 or not made:
                    body = {"model": MODEL, "input": rng.choice(prompts), "temperature": 0, "background": True,
                            "max_output_tokens": rng.choice([8, 24, 16000])}  # fmt: skip
                    streamed = rng.random() < 0.5
                    if streamed:  # (read whole once it ended: ASGITransport)
                        logs = shared.relay.published.logs
                        known = set(logs)
                        posted = asyncio.ensure_future(owner.post("/v1/responses", json=body | {"stream": True}))
                        await until(lambda: asyncio.sleep(0, bool(set(logs) - known)))  # noqa: B023
                        (rid,) = set(logs) - known
                        streams[rid] = posted
                    else:
                        rid = (await owner.post("/v1/responses", json=body)).json()["id"]
                    made.append((rid, body, streamed))
                    continue
                rid, body, streamed = rng.choice(made)
                if act < 0.7:
                    await other.post(f"/v1/responses/{rid}/cancel")
                elif act < 0.8:
                    await other.delete(f"/v1/responses/{rid}")
                else:
                    await asyncio.sleep(0.05)
            for rid, body, _ in made:  # the long ones that nobody cancelled: cancelled now
                got = await b.get(f"/v1/responses/{rid}")
                if got.status_code == 200 and got.json()["status"] in RUNNING and body["max_output_tokens"] == 16000:
                    await a.post(f"/v1/responses/{rid}/cancel")
            await asyncio.gather(*streams.values())
            await until(lambda: running(a, 0))
            await until(lambda: running(b, 0))
            seen = collections.Counter()
            for rid, body, streamed in made:
                for client in (a, b):
                    got = await client.get(f"/v1/responses/{rid}")
                    seen[got.status_code if got.status_code == 404 else got.json()["status"]] += 1
                    if got.status_code == 404:
                        continue
                    response = got.json()
                    assert response["status"] in ("completed", "incomplete", "cancelled"), response
                    if response["status"] == "cancelled":
                        continue
                    key = (body["input"], body["max_output_tokens"])
                    if key not in want:
                        fore = {k: v for k, v in body.items() if k != "background"}
                        want[key] = (await a.post("/v1/responses", json=fore)).json()["output"][0]["content"][0]["text"]
                    assert response["output"][0]["content"][0]["text"] == want[key]
                    if streamed:
                        n = rng.randrange(4)
                        later = await client.get(f"/v1/responses/{rid}", params={"stream": "true", "starting_after": n})
                        if later.status_code == 200:
                            last = events(later.content)[-1]
                            assert last["sequence_number"] > n and last["response"]["output"] == response["output"]
            assert seen[404] and seen["cancelled"] and seen["incomplete"] + seen["completed"] >= 6, seen

    asyncio.run(main())


def test_an_answer_that_ends_after_another_replica_cancelled_it_says_cancelled():
    """Another replica's cancel marks the kept response cancelled before this one's answer ends:
    the answer is not kept over it, and the stream's readers see the cancel, not the answer."""
    store, logs = ResponseStore(1 << 20), Replays(1 << 20)
    asked = ResponsesRequest(MODEL, "blt-s", ChatTemplate(CHAT_TEMPLATE, stops=(CHAT_STOP,)), store)
    asked.parse(json.dumps({"model": MODEL, "input": ASK, "background": True, "stream": True}).encode())
    usage = {
        "prompt_tokens": 3,
        "completion_tokens": 2,
        "total_tokens": 5,
        "prompt_tokens_details": {"cached_tokens": 0},
    }

    async def main() -> None:
        async def work() -> None:
            asked.frame({"choices": [{"index": 0, "delta": {"content": "ok"}, "finish_reason": None}]})
            assert store.cancel(asked.id)["status"] == "cancelled"  # through the other replica, meanwhile
            asked.frame({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}], "usage": usage})
            await asyncio.to_thread(asked.frame, "[DONE]")

        await asked.start(work(), {}, logs)
        await asyncio.wait([asked.task])
        sent = [json.loads(e.split(b"data: ", 1)[1]) for e in logs.get(asked.id).events]
        assert sent[-1]["type"] == "error" and sent[-1]["code"] == "response_cancelled"
        assert not any(e["type"] == "response.completed" for e in sent)
        assert store.get(asked.id).response["status"] == "cancelled"

    asyncio.run(main())


def test_a_stopping_app_lets_its_background_responses_finish_within_its_grace(engine):
    """An app whose server set no deadline (a Ray replica's) waits `background_grace` seconds for
    its background responses as it stops, then cancels those still running."""

    async def main() -> None:
        body = {"model": MODEL, "input": ASK, "max_output_tokens": 3000, "temperature": 0, "background": True,
                "mode": "ar"}  # fmt: skip
        for grace, status in ((60.0, "incomplete"), (0.0, "cancelled")):
            shared = Shared(Relay(1 << 20))
            async with replicas(engine, grace=grace, shared=shared) as (a, _, _):
                rid = (await a.post("/v1/responses", json=body)).json()["id"]
            assert ResponseStore(shared.tables["responses"]).get(rid).response["status"] == status, grace

    asyncio.run(main())
