"""`--stream-interval`: a stream's text goes out at most that often, the text made meanwhile in one
event, and the joined events say what the unjoined ones said."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time

import httpx
import pytest
from conftest import CHAT_STOP, CHAT_TEMPLATE

from fastblt.runtime.async_engine import AsyncEngine
from fastblt.serve.app import ServeSettings, create_app
from fastblt.serve.chat import ChatTemplate

MODEL = "fastblt-default"
PROMPT = "import os\n\n\ndef walk(top):\n"


@pytest.fixture(scope="module")
def engine(engine_here):
    return engine_here


@contextlib.asynccontextmanager
async def client(engine: AsyncEngine, interval: float):
    template = ChatTemplate(CHAT_TEMPLATE, stops=(CHAT_STOP,))
    app = create_app(engine, ServeSettings(chat_template=template, stream_interval=interval))
    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://s", timeout=60) as c,
    ):
        yield c


async def streamed(c: httpx.AsyncClient, path: str, body: dict) -> tuple[list[dict], float]:
    """The stream's JSON events (before [DONE]) and its seconds from request to end."""
    t0 = time.perf_counter()
    r = await c.post(path, json={**body, "stream": True})
    assert r.status_code == 200, r.text
    lines = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]], time.perf_counter() - t0


def test_a_stream_sends_at_most_an_event_per_interval_and_the_same_text(engine, reference):
    """256 greedy bytes in a fraction of a second: with a 0.5 s interval the text comes in a few
    events (a chunk at once, then one per interval, then the end), and it is the text alone."""
    want = reference.generate(PROMPT, mode="ar", max_bytes=256, temperature=0.0).text
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 256, "temperature": 0, "mode": "ar"}

    async def run() -> tuple[list[dict], float]:
        async with client(engine, 0.5) as c:
            return await streamed(c, "/v1/completions", body)

    events, seconds = asyncio.run(run())
    texts = [e["choices"][0]["text"] for e in events if e["choices"][0]["text"]]
    assert "".join(texts) == want
    assert len(texts) <= 2 + seconds / 0.5, (len(texts), seconds)
    assert events[-1]["choices"][0]["finish_reason"] == "length"


def test_the_end_of_a_stream_is_not_held_for_its_interval(engine):
    """16 bytes with a 1 s interval end when the request ends, not a second later: the wait for
    the next event stops at the request's end."""
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 16, "temperature": 0, "mode": "ar"}

    async def run() -> tuple[float, float]:
        async with client(engine, 0.0) as c:
            await streamed(c, "/v1/completions", body)  # warm
            _, plain = await streamed(c, "/v1/completions", body)
        async with client(engine, 1.0) as c:
            _, paced = await streamed(c, "/v1/completions", body)
        return plain, paced

    plain, paced = asyncio.run(run())
    assert paced < plain + 0.5, (plain, paced)


def test_joined_events_carry_the_logprobs_and_choices_of_the_events_they_join(engine):
    """n = 2 sampled choices with logprobs, streamed with an interval and without: each choice's
    text, its per-byte logprobs and its end are the same (a seed makes the two runs one)."""
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 96, "temperature": 0.8, "seed": 7, "n": 2,
            "logprobs": 2, "mode": "blt-s"}  # fmt: skip

    def per_choice(events: list[dict]) -> dict[int, tuple[str, list, list, str | None]]:
        out: dict[int, tuple[str, list, list, str | None]] = {}
        for e in events:
            for ch in e["choices"]:
                text, tokens, values, end = out.get(ch["index"], ("", [], [], None))
                lp = ch.get("logprobs") or {"tokens": [], "token_logprobs": []}
                out[ch["index"]] = (text + ch["text"], tokens + lp["tokens"], values + lp["token_logprobs"],
                                    ch["finish_reason"] or end)  # fmt: skip
        return out

    async def run() -> tuple[list[dict], list[dict], float]:
        async with client(engine, 0.0) as c:
            plain, _ = await streamed(c, "/v1/completions", body)
        async with client(engine, 0.25) as c:
            joined, seconds = await streamed(c, "/v1/completions", body)
        return plain, joined, seconds

    plain, joined, seconds = asyncio.run(run())
    assert set(per_choice(joined)) == {0, 1} and per_choice(joined) == per_choice(plain)
    for text, tokens, values, end in per_choice(joined).values():
        assert "".join(tokens) == text and len(values) == len(tokens) and end in ("stop", "length")
    for i in (0, 1):  # a choice's text events: at once, then at most one per interval, then its end's
        texts = [ch for e in joined for ch in e["choices"] if ch["index"] == i and ch["text"]]
        assert len(texts) <= 2 + seconds / 0.25, (len(texts), seconds)


def test_a_chat_stream_with_an_interval_is_the_chat_stream_without_one(engine):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "def walk(top):"}], "max_tokens": 64,
            "temperature": 0}  # fmt: skip

    def message(events: list[dict]) -> tuple[str, str | None, str | None]:
        deltas = [e["choices"][0] for e in events if e["choices"]]
        role = deltas[0]["delta"].get("role")
        return role, "".join(d["delta"].get("content") or "" for d in deltas), deltas[-1]["finish_reason"]

    async def run() -> tuple[tuple, tuple]:
        async with client(engine, 0.0) as c:
            plain, _ = await streamed(c, "/v1/chat/completions", body)
        async with client(engine, 0.3) as c:
            joined, _ = await streamed(c, "/v1/chat/completions", body)
        return message(plain), message(joined)

    plain, joined = asyncio.run(run())
    assert joined == plain and plain[0] == "assistant" and plain[1]
