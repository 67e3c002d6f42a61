"""Bad and hostile requests: each gets a 4xx in OpenAI's error shape (or, for a client that goes
away, a clean end), the server stays up, and its batch is empty again afterwards."""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import pytest
from conftest import KEY

from fastblt.serve.process import ServerProcess

MODEL = "fastblt-default"
AUTH = {"Authorization": f"Bearer {KEY}"}
OK = {"model": MODEL, "prompt": "def main(", "max_tokens": 8, "temperature": 0}


def body(**changes) -> bytes:
    b = {**OK, **changes}
    return json.dumps({k: v for k, v in b.items() if v is not DROP}).encode()


DROP = object()
HOSTILE: list[tuple[str, bytes | None, int]] = [  # what, body, expected status (0: any 4xx)
    ("invalid JSON", b"{", 400),
    ("empty body", b"", 400),
    ("a JSON array", b"[1, 2]", 400),
    ("a JSON string", b'"prompt"', 400),
    ("JSON null", b"null", 400),
    ("invalid UTF-8", b'{"model": "\xff\xfe", "prompt": "x"}', 400),
    ("NaN temperature", b'{"model": "fastblt-default", "prompt": "x", "temperature": NaN}', 400),
    ("a lone surrogate in the prompt", b'{"model": "fastblt-default", "prompt": "\\ud800"}', 400),
    ("prompt is a number", body(prompt=3), 400),
    ("two prompts", body(prompt=["a", "b"]), 400),
    ("prompt null", body(prompt=None), 400),
    ("no prompt", body(prompt=DROP), 400),
    ("no model", body(model=DROP), 400),
    ("another model", body(model="gpt-4"), 404),
    ("negative max_tokens", body(max_tokens=-5), 400),
    ("zero max_tokens", body(max_tokens=0), 400),
    ("max_tokens a string", body(max_tokens="10"), 400),
    ("max_tokens 1e30", body(max_tokens=10**30), 400),
    ("max_tokens past the model's limit", body(max_tokens=10**9), 400),
    ("max_tokens a float", body(max_tokens=1.5), 400),
    ("negative temperature", body(temperature=-1), 400),
    ("temperature a string", body(temperature="hot"), 400),
    ("top_p 0", body(top_p=0), 400),
    ("top_p 2", body(top_p=2), 400),
    ("n 2", body(n=2), 400),
    ("five stop strings", body(stop=["a", "b", "c", "d", "e"]), 400),
    ("stop a number", body(stop=7), 400),
    ("negative seed", body(seed=-5), 400),
    ("seed a string", body(seed="x"), 400),
    ("unknown mode", body(mode="fast"), 400),
    ("k 0", body(k=0), 400),
    ("k 1000", body(k=1000), 400),
    ("alpha 5", body(mode="blt-d", alpha=5.0), 400),
    ("alpha a bool", body(alpha=True), 400),
    ("an unknown field", body(foo=1), 400),
    ("logprobs", body(logprobs=5), 400),
    ("echo", body(echo=True), 400),
    ("stream a string", body(stream="yes"), 400),
    ("a 10 MB body", b'{"prompt": "' + b"a" * (10 << 20) + b'"}', 413),
    ("a prompt past the model's limit", body(prompt="x = 1\n" * 6000, max_tokens=1), 400),
]


def test_hostile_requests_get_4xx_and_the_server_stays_up(server):
    assert len(HOSTILE) >= 30
    url = f"{server.url}/v1/completions"
    with httpx.Client(timeout=120) as c:
        for what, raw, status in HOSTILE:
            r = c.post(url, content=raw, headers={**AUTH, "Content-Type": "application/json"})
            assert r.status_code == status, (what, r.status_code, r.text[:200])
            err = r.json()["error"]
            assert err["message"] and err["type"], what
        assert c.get(url, headers=AUTH).status_code == 405
        assert c.post(f"{server.url}/v2/nothing", content=body(), headers=AUTH).status_code == 404
        r = c.post(url, content=body(), headers=AUTH)
        assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"
    assert _occupancy_back_to_zero(server)


def test_field_errors_name_the_field(server):
    for field, raw in [("max_tokens", body(max_tokens=-1)), ("temperature", body(temperature="x")),
                       ("mode", body(mode="fast")), ("k", body(k=1000)), ("foo", body(foo=1)),
                       ("max_tokens", body(max_tokens=10**9)), ("prompt", body(prompt=3)),
                       ("lookup", body(lookup="8")),
                       ("lookup", body(mode="blt-s", lookup=8, temperature=1.0))]:  # fmt: skip
        r = httpx.post(f"{server.url}/v1/completions", content=raw, headers=AUTH, timeout=60)
        assert r.json()["error"]["param"] == field, (field, r.json())


def test_a_client_leaving_mid_stream_frees_its_row(server):
    req = {**OK, "max_tokens": 5000, "stream": True, "mode": "ar"}
    with httpx.Client(timeout=60) as c, c.stream("POST", f"{server.url}/v1/completions", json=req, headers=AUTH) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
    assert _occupancy_back_to_zero(server)


def test_a_full_queue_is_429_with_retry_after():
    with ServerProcess(["--max-batch", "1", "--max-queue", "0"]) as srv:
        hold = {**OK, "max_tokens": 5000, "stream": True, "mode": "ar"}
        with httpx.Client(timeout=60) as c, c.stream("POST", f"{srv.url}/v1/completions", json=hold) as held:
            assert held.status_code == 200
            r = c.post(f"{srv.url}/v1/completions", json=OK)
            assert r.status_code == 429 and r.headers["Retry-After"] == "1"
            assert r.json()["error"]["type"] == "rate_limit_error"
        assert _occupancy_back_to_zero(srv)
        assert httpx.post(f"{srv.url}/v1/completions", json=OK, timeout=60).status_code == 200


def test_sigterm_finishes_requests_in_flight_then_exits_0():
    srv = ServerProcess(["--max-batch", "2"]).start()
    events: list[str] = []

    def consume():
        req = {**OK, "max_tokens": 300, "stream": True, "mode": "ar"}
        with httpx.stream("POST", f"{srv.url}/v1/completions", json=req, timeout=120) as r:
            events.extend(line for line in r.iter_lines() if line)

    t = threading.Thread(target=consume)
    t.start()
    deadline = time.time() + 60
    while len(events) < 2 and time.time() < deadline:
        time.sleep(0.01)
    srv.signal(signal.SIGTERM)
    t.join(120)
    assert srv.proc.wait(60) == 0
    assert events[-1] == "data: [DONE]"
    text = "".join(json.loads(e[6:])["choices"][0]["text"] for e in events[:-1])
    assert len(text.encode()) > 0 and json.loads(events[-2][6:])["choices"][0]["finish_reason"] == "length"
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{srv.url}/health", timeout=5)
    srv.stop()


def _occupancy_back_to_zero(server, timeout: float = 10.0) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        text = httpx.get(f"{server.url}/metrics", timeout=10).text
        line = next(ln for ln in text.splitlines() if ln.startswith("fastblt_batch_occupancy "))
        if float(line.split()[1]) == 0:
            return True
        time.sleep(0.05)
    return False
