"""Bad and hostile requests: each gets a 4xx in OpenAI's error shape (or, for a client that goes
away, a clean end), the server stays up, and its batch is empty again afterwards."""

from __future__ import annotations

import functools
import json
import signal
import socket
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
RAW = b'{"model": "fastblt-default", "prompt": "x", '  # a body to finish by hand
HOSTILE: list[tuple[str, bytes | None, int]] = [  # what, body, expected status (0: any 4xx)
    ("invalid JSON", b"{", 400),
    ("empty body", b"", 400),
    ("a JSON array", b"[1, 2]", 400),
    ("a JSON string", b'"prompt"', 400),
    ("JSON null", b"null", 400),
    ("invalid UTF-8", b'{"model": "\xff\xfe", "prompt": "x"}', 400),
    ("NaN temperature", b'{"model": "fastblt-default", "prompt": "x", "temperature": NaN}', 400),
    ("a lone surrogate in the prompt", b'{"model": "fastblt-default", "prompt": "\\ud800"}', 400),
    ("a lone surrogate in a stop string", RAW + b'"stop": "\\ud800"}', 400),
    ("prompt is a number", body(prompt=3), 400),
    ("an empty list of prompts", body(prompt=[]), 400),
    ("a list of prompts with a number", body(prompt=["a", 3]), 400),
    ("token ids as the prompt", body(prompt=[1, 2, 3]), 400),
    (
        "an integer of 5,000 digits",
        b'{"model": "fastblt-default", "prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}",
        400,
    ),
    (
        "JSON nested 100,000 deep",
        b'{"model": "fastblt-default", "prompt": "x", "user": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        400,
    ),
    ("stream_options without stream", body(stream_options={"include_usage": True}), 400),
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
    ("n 17", body(n=17), 400),
    ("n 0", body(n=0), 400),
    ("best_of less than n", body(n=3, best_of=2), 400),
    ("best_of 21", body(best_of=21, temperature=1), 400),
    ("best_of streamed", body(best_of=3, temperature=1, stream=True), 400),
    ("best_of of blt-d", body(best_of=3, temperature=1, mode="blt-d"), 400),
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
    ("logprobs 21", body(logprobs=21), 400),
    ("logprobs of blt-d", body(mode="blt-d", logprobs=1), 400),
    ("echo a string", body(echo="yes"), 400),
    ("max_tokens 0 streamed", body(max_tokens=0, echo=True, stream=True), 400),
    ("stream a string", body(stream="yes"), 400),
    ("logit_bias a list", body(logit_bias=[10, -100]), 400),
    ("logit_bias keyed by a word", body(logit_bias={"a": 5}), 400),
    ("logit_bias past a byte", body(logit_bias={"256": -100}), 400),
    ("logit_bias of 200", body(logit_bias={"10": 200}), 400),
    ("logit_bias a string value", body(logit_bias={"10": "-100"}), 400),
    ("logit_bias one byte twice", body(logit_bias={"10": 1, "010": 2}), 400),
    ("presence_penalty 3", body(presence_penalty=3), 400),
    ("frequency_penalty a string", body(frequency_penalty="high"), 400),
    ("suffix", body(suffix="}"), 400),
    ("a 10 MB body", b'{"prompt": "' + b"a" * (10 << 20) + b'"}', 413),
    ("a prompt past the model's limit", body(prompt="x = 1\n" * 6000, max_tokens=1), 400),
    ("a regex nested 2,000 groups deep", body(structured_outputs={"regex": "(" * 2000 + "a" + ")" * 2000}), 400),
    (
        "a grammar nested 2,000 groups deep",
        body(structured_outputs={"grammar": "start: " + "(" * 2000 + '"a"' + ")" * 2000}),
        400,
    ),  # fmt: skip
]


def chat(**changes) -> bytes:
    b = {"model": MODEL, "messages": [{"role": "user", "content": "def main("}], "max_tokens": 8, **changes}
    return json.dumps(b).encode()


def schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}


CHAT_HOSTILE: list[tuple[str, bytes, int]] = [  # /v1/chat/completions (the server has a chat template)
    ("invalid JSON", b'{"messages": [', 400),
    ("messages a string", chat(messages="hi"), 400),
    ("messages a list of strings", chat(messages=["hi"]), 400),
    ("a message without content", chat(messages=[{"role": "user"}]), 400),
    ("a tool message answering no call", chat(messages=[{"role": "tool", "content": "1"}]), 400),
    ("an image part", chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]), 400),
    ("tools left to choose (auto)", chat(tools=[{"type": "function", "function": {"name": "f"}}]), 400),
    (
        "a call of no tool",
        chat(
            tools=[{"type": "function", "function": {"name": "f"}}],
            tool_choice={"type": "function", "function": {"name": "g"}},
        ),
        400,
    ),
    (
        "tools of 129 functions",
        chat(tools=[{"type": "function", "function": {"name": f"f{i}"}} for i in range(129)], tool_choice="required"),
        400,
    ),
    (
        "a JSON schema with a lookbehind in a pattern",
        chat(
            response_format=schema_format(
                {"type": "object", "properties": {"a": {"type": "string", "pattern": "^(?<=a)"}}, "required": ["a"]}
            )
        ),
        400,
    ),
    ("a JSON schema of a string", chat(response_format=schema_format({"type": "string"})), 400),
    ("a JSON schema without a name", chat(response_format={"type": "json_schema", "json_schema": {"schema": {}}}), 400),
    (
        "a JSON schema nested 200 deep",
        chat(
            response_format=schema_format(
                {
                    "type": "object",
                    "required": ["a"],
                    "properties": {
                        "a": functools.reduce(lambda inner, _: {"type": "array", "items": inner}, range(200), {})
                    },
                }
            )
        ),
        400,
    ),
    (
        "a JSON schema of 5,000 enum values",
        chat(
            response_format=schema_format(
                {"type": "object", "required": ["a"], "properties": {"a": {"enum": list(range(5000))}}}
            )
        ),
        400,
    ),
    ("JSON mode in blt-d", chat(response_format={"type": "json_object"}, mode="blt-d"), 400),
    ("top_logprobs without logprobs", chat(top_logprobs=3), 400),
    ("max_tokens 0", chat(max_tokens=0), 400),
    ("echo", chat(echo=True), 400),
    (
        "a system message the template refuses",
        chat(messages=[{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]),
        400,
    ),  # fmt: skip
    ("messages past the limit", chat(messages=[{"role": "user", "content": "x = 1\n" * 3000}]), 400),
    ("another model", chat(model="gpt-4o"), 404),
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
        r = c.get(url, headers=AUTH)
        assert r.status_code == 405 and r.headers["Allow"] == "POST"
        # a path several routes share: every method any of them answers
        r = c.put(f"{server.url}/v1/conversations/conv_x", headers=AUTH)
        assert r.status_code == 405 and set(r.headers["Allow"].split(", ")) >= {"GET", "POST", "DELETE"}
        r = c.put(f"{server.url}/v1/chat/completions", headers=AUTH)
        assert r.status_code == 405 and set(r.headers["Allow"].split(", ")) >= {"GET", "POST"}
        assert c.post(f"{server.url}/v2/nothing", content=body(), headers=AUTH).status_code == 404
        nulls = dict.fromkeys(("n", "best_of", "echo", "presence_penalty", "frequency_penalty", "logprobs",
                               "logit_bias"))  # fmt: skip
        r = c.post(url, content=body(**nulls), headers=AUTH)  # null is "not asked for", as clients send it
        assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"
    chat = f"{server.url}/v1/chat/completions"
    with httpx.Client(timeout=120) as c:
        for what, raw, status in CHAT_HOSTILE:
            r = c.post(chat, content=raw, headers={**AUTH, "Content-Type": "application/json"})
            assert r.status_code == status, (what, r.status_code, r.text[:200])
            assert r.json()["error"]["message"], what
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:  # leaves while sending its body
        head = (
            f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nContent-Length: 1000\r\n\r\n"
        )
        s.sendall(head.encode() + b'{"model": ')
    assert _occupancy_back_to_zero(server)
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
    assert "Traceback" not in server.output()  # every one of them was answered, none failed inside


def test_a_chunked_body_past_the_limit_is_413(server):
    """A body sent without Content-Length (chunked, as from a generator) is counted as it arrives:
    a client that streams a huge upload cannot make the server buffer it all."""
    chunk = b" " * (64 << 10)

    def upload():
        yield b'{"model": "fastblt-default", "prompt": "x", "user": "'
        for _ in range(17):  # 1.06 MiB, past the default limit of 1 MiB
            yield chunk
        yield b'"}'

    r = httpx.post(f"{server.url}/v1/completions", content=upload(), headers=AUTH, timeout=60)
    assert "content-length" not in {k.lower() for k in r.request.headers}  # chunked, as meant
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large", r.text[:200]
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200


def test_a_body_of_exactly_the_limit_is_accepted(server):
    """The limit is the largest body allowed, not the smallest refused: a valid request padded
    with JSON whitespace to exactly 1 MiB (the default --max-body) is answered."""
    raw = body()
    raw = raw[:-1] + b" " * ((1 << 20) - len(raw)) + b"}"
    assert len(raw) == 1 << 20
    r = httpx.post(f"{server.url}/v1/completions", content=raw, headers=AUTH, timeout=60)
    assert r.status_code == 200, r.text[:200]
    assert r.json()["choices"][0]["finish_reason"] == "length"


def test_the_position_limit_blames_the_prompt_when_the_prompt_alone_reaches_it():
    """A prompt whose ids (BOS + its bytes) are exactly what reached the patch limit is the
    prompt's fault: telling the client to lower max_tokens would never fix it."""
    from fastblt.errors import PositionLimit
    from fastblt.serve.api import Completion
    from fastblt.serve.app import _field_error

    comp = Completion(prompts=["abcd"], max_tokens=8, stream=False, include_usage=False)
    for bytes_read, param in ((4, "prompt"), (5, "prompt"), (6, "max_tokens")):  # 5: BOS + the 4 prompt bytes
        e = _field_error(PositionLimit("position limit", limit=4096, bytes_read=bytes_read), comp)
        assert e.param == param, (bytes_read, e.param)


# 6,000 bytes that patch into more than the default's 4,096 patches: high entropy, short patches
NOISE = "".join(chr(33 + (i * 7919) % 90) for i in range(6000))


def test_field_errors_name_the_field(server):
    """`param` names the field the request gave: the size limit is the prompt's fault when the
    prompt alone reaches it, else max_tokens'; of unmask/alpha/gamma, the one that was sent."""
    for field, raw in [("max_tokens", body(max_tokens=-1)), ("temperature", body(temperature="x")),
                       ("mode", body(mode="fast")), ("k", body(k=1000)), ("foo", body(foo=1)),
                       ("max_tokens", body(max_tokens=10**9)), ("prompt", body(prompt=3)),
                       ("lookup", body(lookup="8")), ("prompt", body(prompt="")),
                       ("lookup", body(mode="blt-s", lookup=8, temperature=1.0)),
                       ("alpha", body(mode="ar", alpha=0.5)), ("gamma", body(mode="ar", gamma=0.5)),
                       ("logprobs", body(logprobs=21)), ("logprobs", body(mode="blt-d", logprobs=1)),
                       ("logprobs", body(max_tokens=0, echo=True, logprobs=21)), ("logprobs", body(logprobs=1.5)),
                       ("prompt", body(prompt="x" * 16_500, max_tokens=1)),
                       ("max_tokens", body(prompt="x" * 100, max_tokens=16_300)),
                       ("prompt", body(prompt=NOISE, max_tokens=1)),
                       ("prompt", body(prompt=NOISE, max_tokens=1, stream=True)),
                       ("logit_bias", body(logit_bias={"300": 1})), ("logit_bias", body(logit_bias={"7": -101})),
                       ("logit_bias", body(logit_bias={" 7": 1})), ("logit_bias", body(logit_bias=5)),
                       ("presence_penalty", body(presence_penalty=-2.5)),
                       ("frequency_penalty", body(frequency_penalty=True)),
                       ("best_of", body(best_of=3, stream=True)), ("best_of", body(best_of=2, n=3)),
                       ("priority", body(priority="high")), ("priority", body(priority=2**40))]:  # fmt: skip
        r = httpx.post(f"{server.url}/v1/completions", content=raw, headers=AUTH, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == field, (field, r.json())
        assert "max_bytes" not in r.json()["error"]["message"]  # the request's own names
    r = httpx.post(f"{server.url}/v1/completions", content=body(prompt=NOISE, max_tokens=1), headers=AUTH, timeout=60)
    assert r.json()["error"]["code"] == "context_length_exceeded" and "4096 patches" in r.json()["error"]["message"]
    r = httpx.post(f"{server.url}/v1/completions", content=body(prompt="x" * 16_383, max_tokens=1), headers=AUTH,
                   timeout=60)  # fmt: skip
    assert r.status_code == 200  # --max-context counts bytes: 16,384 fit


def test_a_client_leaving_mid_stream_frees_its_row(server):
    left = 'fastblt_requests_total{endpoint="completions",mode="ar",status="499"}'
    work = "fastblt_engine_generated_ids_total"
    before, done_before = _metric(server, left), _metric(server, work)
    req = {**OK, "max_tokens": 5000, "stream": True, "mode": "ar"}
    with httpx.Client(timeout=60) as c, c.stream("POST", f"{server.url}/v1/completions", json=req, headers=AUTH) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
    assert _occupancy_back_to_zero(server)
    deadline = time.time() + 10
    while (_metric(server, left) == before or _metric(server, work) == done_before) and time.time() < deadline:
        time.sleep(0.05)  # counted when the stream ends, and when the batch lets the request go
    assert _metric(server, left) == before + 1
    assert _metric(server, work) > done_before  # the bytes it got before it left count as work done


def test_a_client_leaving_while_queued_frees_its_place():
    """Requests (plain and streamed) whose clients give up while every row is busy leave the queue
    at once: the next request waits for a row instead of getting 429."""
    with ServerProcess(["--max-batch", "1", "--max-queue", "1", "--lanes", "1"]) as srv:
        url = f"{srv.url}/v1/completions"
        hold = {**OK, "max_tokens": 16_000, "stream": True, "mode": "ar", "temperature": 1}
        with httpx.Client(timeout=60) as c, c.stream("POST", url, json=hold) as held:
            assert held.status_code == 200
            for stream in (False, True):
                with pytest.raises(httpx.TimeoutException):  # queued: no answer (streams: no headers) yet
                    httpx.post(url, json={**OK, "stream": stream}, timeout=0.5)
                deadline = time.time() + 10
                while _metric(srv, "fastblt_queue_depth") and time.time() < deadline:
                    time.sleep(0.05)
                assert _metric(srv, "fastblt_queue_depth") == 0
            waiting: list[httpx.Response] = []
            t = threading.Thread(target=lambda: waiting.append(httpx.post(url, json=OK, timeout=120)))
            t.start()
            deadline = time.time() + 10
            while not _metric(srv, "fastblt_queue_depth") and time.time() < deadline and t.is_alive():
                time.sleep(0.05)
            assert t.is_alive()  # queued, not refused
        t.join(120)
        assert waiting[0].status_code == 200
        assert _metric(srv, 'fastblt_requests_total{endpoint="completions",mode="blt-s",status="499"}') == 2


def test_a_full_queue_is_429_with_retry_after():
    with ServerProcess(["--max-batch", "1", "--max-queue", "0"]) as srv:
        hold = {**OK, "max_tokens": 5000, "stream": True, "mode": "ar"}
        with httpx.Client(timeout=60) as c, c.stream("POST", f"{srv.url}/v1/completions", json=hold) as held:
            assert held.status_code == 200
            r = c.post(f"{srv.url}/v1/completions", json=OK)
            assert r.status_code == 429 and r.headers["Retry-After"] == "1"
            assert r.json()["error"]["type"] == "rate_limit_error"
            r = c.post(f"{srv.url}/v1/chat/completions", json={"model": MODEL, "messages": []})  # no template
            assert r.status_code == 404 and "--chat-template" in r.json()["error"]["message"]
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


def test_requests_still_running_when_the_grace_period_ends_get_an_answer():
    """SIGTERM with --graceful-timeout 2 and two long requests in flight: the stream ends with a
    shutting_down error event and [DONE], the plain request gets a 503, the server exits 0."""
    srv = ServerProcess(["--max-batch", "2", "--graceful-timeout", "2"]).start()
    long = {**OK, "prompt": "x = [", "max_tokens": 16_000, "mode": "ar", "temperature": 1}
    events: list[str] = []
    plain: list[httpx.Response] = []

    def consume():
        with httpx.stream("POST", f"{srv.url}/v1/completions", json={**long, "stream": True}, timeout=120) as r:
            events.extend(line for line in r.iter_lines() if line)

    threads = [threading.Thread(target=consume),
               threading.Thread(target=lambda: plain.append(httpx.post(f"{srv.url}/v1/completions", json=long,
                                                                       timeout=120)))]  # fmt: skip
    for t in threads:
        t.start()
    deadline = time.time() + 60  # both requests decoding (a request still in the socket would be refused)
    while (len(events) < 2 or _metric(srv, "fastblt_batch_occupancy") < 2) and time.time() < deadline:
        time.sleep(0.01)
    srv.signal(signal.SIGTERM)
    for t in threads:
        t.join(120)
    assert srv.proc.wait(60) == 0
    assert events[-1] == "data: [DONE]" and json.loads(events[-2][6:])["error"]["code"] == "shutting_down"
    assert plain[0].status_code == 503 and plain[0].json()["error"]["code"] == "shutting_down"
    assert "Traceback" not in srv.output()
    srv.stop()


def test_an_api_key_clients_cannot_send_is_refused_at_start():
    from click.testing import CliRunner

    from fastblt.cli import cli

    for key in ("", " key"):
        r = CliRunner().invoke(cli, ["serve", "--api-key", key])
        assert r.exit_code == 2 and "--api-key" in r.output


def _metric(server, series: str) -> float:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    line = next((ln for ln in text.splitlines() if ln.startswith(series + " ")), None)
    return 0.0 if line is None else float(line.split()[1])


def _occupancy_back_to_zero(server, timeout: float = 10.0) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        text = httpx.get(f"{server.url}/metrics", timeout=10).text
        line = next(ln for ln in text.splitlines() if ln.startswith("fastblt_batch_occupancy "))
        if float(line.split()[1]) == 0:
            return True
        time.sleep(0.05)
    return False


def test_a_schema_that_takes_long_to_compile_holds_up_no_other_request(server):
    """A request's schema is compiled off the event loop: while one whose number automata take a
    while to build (multiples of five primes near 1,000 beside bounds of ±10^18, which no other
    test sends: ~1.5 s) is compiled, /health keeps answering, each within a third of that compile
    time as this process measures it (on the loop, the first would wait for nearly all of it)."""
    from fastblt.runtime.grammar import compile_schema

    primes = (971, 977, 983, 991, 997)
    schema = {"type": "object", "required": [], "properties": {f"n{p}": {
        "type": "integer", "minimum": -(10**18), "maximum": 10**18, "multipleOf": p} for p in primes}}  # fmt: skip
    t0 = time.perf_counter()
    compile_schema(schema)
    compile_s = time.perf_counter() - t0
    costly = body(max_tokens=1, response_format={"type": "json_schema", "json_schema": {"name": "n", "schema": schema}})
    answer: dict = {}

    def send() -> None:
        r = httpx.post(f"{server.url}/v1/completions", content=costly, headers=AUTH, timeout=60)
        answer["status"], answer["at"] = r.status_code, time.perf_counter()

    sender = threading.Thread(target=send)
    sender.start()
    time.sleep(compile_s / 10)  # the request is in, its schema compiling
    waits = []
    while sender.is_alive() and len(waits) < 200:
        t = time.perf_counter()
        assert httpx.get(f"{server.url}/health", timeout=60).status_code == 200
        waits.append((time.perf_counter() - t, time.perf_counter()))
    sender.join()
    assert answer["status"] == 200
    before = [w for w, at in waits if at < answer["at"]]
    assert len(before) >= 3 and max(before) < compile_s / 3, (compile_s, before)
