"""Request ids and the request log: every response carries x-request-id (the openai client's
`_request_id`), and every completions request logs one logfmt line that reads back as it was meant."""

from __future__ import annotations

import json
import logging
import logging.config
import re
import sys
import time

import httpx
import openai
import pytest
from conftest import KEY

from fastblt.serve.process import ServerProcess
from fastblt.serve.request_log import JsonFormatter, RequestRecord, logfmt, request_id, trace_id, uvicorn_log_config

MODEL = "fastblt-default"
GENERATED = re.compile(r"req_[0-9a-f]{24}")
_PAIR = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)')


def parse(line: str) -> dict[str, str]:
    """A logfmt line's fields (quoted values unescaped); every character of the line is in a pair."""
    fields, end = {}, 0
    for m in _PAIR.finditer(line):
        assert line[end : m.start()].strip() == "", f"stray text {line[end : m.start()]!r} in {line!r}"
        key, value = m.groups()
        if value.startswith('"'):
            value = value[1:-1].encode("latin-1", "backslashreplace").decode("unicode_escape")
        assert key not in fields, f"{key} twice in {line!r}"
        fields[key], end = value, m.end()
    assert line[end:].strip() == ""
    return fields


def logged(server, rid: str, timeout: float = 10.0) -> dict[str, str]:
    """The server's request-log line of request `rid` (it is written as the response ends)."""
    deadline = time.monotonic() + timeout
    while True:
        lines = [ln for ln in server.output().splitlines() if f"request_id={rid} " in ln]
        if lines or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert len(lines) == 1, f"{len(lines)} log lines for {rid}"
    assert lines[0].startswith("INFO: fastblt.requests ") or lines[0].startswith("ERROR: fastblt.requests ")
    return parse(lines[0].split(" ", 2)[2])


def client(server, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=120, **kw)


# ---------------------------------------------------------------------------- pure parts
@pytest.mark.parametrize("given", ["trace-1", "a" * 128, "0af7651916cd43dd8448eb211c80319c", "x:y/z=1+2@h.io"])
def test_a_plain_client_id_is_kept(given):
    assert request_id(given) == given


@pytest.mark.parametrize("given", [None, "", "a b", "a" * 129, 'q"uote', "back\\slash", "new\nline", "ünï"])
def test_any_other_id_is_replaced_by_a_new_one(given):
    got = request_id(given)
    assert GENERATED.fullmatch(got) and got != request_id(given)  # new each time


@pytest.mark.parametrize("value", ["plain", "two words", 'say "hi"', "back\\slash", "line\nbreak x=1",
                                   "tab\there", "\x00\x1b[31m", "ünï ☃", "", "a=b"])  # fmt: skip
def test_logfmt_values_read_back_and_stay_on_their_line(value):
    line = logfmt({"request_id": "r1", "user": value, "status": 200})
    assert "\n" not in line and "\r" not in line
    assert parse(line) == {"request_id": "r1", "user": value, "status": "200"}


def test_a_record_logs_once_with_what_it_was_given(caplog):
    record = RequestRecord("r1", "completions", time.perf_counter() - 0.5)
    record.parsed("blt-s", True, 2, 9, None)
    record.byte_times([record.arrived + 0.2, record.arrived + 0.3])
    record.byte_times([record.arrived + 0.1])
    usage = {"prompt_tokens": 9, "completion_tokens": 7, "prompt_tokens_details": {"cached_tokens": 4}}
    with caplog.at_level(logging.INFO, logger="fastblt.requests"):
        record.end(200, usage, ["stop", "length", "stop"])
        record.end(500, error="late")  # ended already: no second line
    assert len(caplog.records) == 1 and caplog.records[0].levelno == logging.INFO
    f = parse(caplog.records[0].getMessage())
    assert f["ttfb_ms"] == "100.0" and float(f["ms"]) >= 500
    del f["ms"]
    assert f == {"request_id": "r1", "endpoint": "completions", "status": "200", "mode": "blt-s", "stream": "true",
                 "choices": "2", "prompt_bytes": "9", "cached_bytes": "4", "completion_bytes": "7",
                 "finish": "length,stop", "ttfb_ms": "100.0"}  # fmt: skip


def test_a_server_error_logs_at_error_level(caplog):
    with caplog.at_level(logging.INFO, logger="fastblt.requests"):
        RequestRecord("r2", "chat", time.perf_counter()).end(503, error="engine: closing", param=None)
    assert caplog.records[0].levelno == logging.ERROR
    assert parse(caplog.records[0].getMessage())["error"] == "engine: closing"


def test_a_structured_record_formats_as_one_json_line_with_typed_fields(caplog):
    record = RequestRecord("r3", "completions", time.perf_counter() - 0.25, structured=True)
    record.parsed("ar", False, 1, 12, 'eve"\n{"forged": 1}\u2028')
    record.byte_times([record.arrived + 0.05])
    with caplog.at_level(logging.INFO, logger="fastblt.requests"):
        record.end(200, {"prompt_tokens": 12, "completion_tokens": 5}, ["length"])
    (rec,) = caplog.records
    line = JsonFormatter().format(rec)
    assert "\n" not in line and "\u2028" not in line  # escaped ASCII: one line whatever a value holds
    got = json.loads(line)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", got.pop("time"))
    assert got.pop("ms") >= 250
    assert got == {"level": "INFO", "logger": "fastblt.requests", "message": "completions 200", "request_id": "r3",
                   "endpoint": "completions", "status": 200, "mode": "ar", "stream": False, "choices": 1,
                   "prompt_bytes": 12, "user": 'eve"\n{"forged": 1}\u2028', "cached_bytes": 0,
                   "completion_bytes": 5, "finish": "length", "ttfb_ms": 50.0}  # fmt: skip


def test_the_json_formatter_reads_uvicorns_access_lines_and_keeps_tracebacks():
    access = logging.LogRecord("uvicorn.access", logging.INFO, "", 0, '%s - "%s %s HTTP/%s" %d', None, None)
    access.args = ("127.0.0.1:5000", "POST", "/v1/completions?x=1", "1.1", 429)
    got = json.loads(JsonFormatter().format(access))
    assert {k: got[k] for k in ("client", "method", "path", "http_version", "status", "message")} == {
        "client": "127.0.0.1:5000", "method": "POST", "path": "/v1/completions?x=1", "http_version": "1.1",
        "status": 429, "message": "POST /v1/completions?x=1 429"}  # fmt: skip
    try:
        raise ValueError("boom")
    except ValueError:
        failed = logging.LogRecord("uvicorn.error", logging.ERROR, "", 0, "Exception in %s", ("app",), sys.exc_info())
    got = json.loads(JsonFormatter().format(failed))
    assert got["message"] == "Exception in app" and "ValueError: boom" in got["exc_info"]
    assert uvicorn_log_config("text") is None
    loggers = [logging.getLogger(name) for name in ("uvicorn", "uvicorn.access")]
    before = [(lg.handlers[:], lg.level, lg.propagate) for lg in loggers]
    try:
        logging.config.dictConfig(uvicorn_log_config("json"))  # a config logging accepts, as uvicorn gives it
        (handler,) = logging.getLogger("uvicorn.access").handlers
        assert isinstance(handler.formatter, JsonFormatter)
    finally:
        for lg, (handlers, level, propagate) in zip(loggers, before, strict=True):
            lg.handlers[:], lg.level, lg.propagate = handlers, level, propagate


TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


@pytest.mark.parametrize(
    "header, want",
    [
        (f"00-{TRACE}-00f067aa0ba902b7-01", TRACE),
        (f" 00-{TRACE}-00f067aa0ba902b7-00 ", TRACE),
        (f"cc-{TRACE}-00f067aa0ba902b7-01-more-from-a-later-version", TRACE),
        (f"00-{TRACE}-00f067aa0ba902b7-01-extra", None),  # version 00 has exactly four parts
        (f"ff-{TRACE}-00f067aa0ba902b7-01", None),  # an invalid version
        (f"00-{TRACE.upper()}-00f067aa0ba902b7-01", None),
        (f"00-{'0' * 32}-00f067aa0ba902b7-01", None),  # all-zero ids are invalid
        (f"00-{TRACE}-{'0' * 16}-01", None),
        (f"00-{TRACE[:-1]}-00f067aa0ba902b7-01", None),
        ("", None),
        (None, None),
    ],
)
def test_a_traceparents_trace_id_is_read_as_w3c_trace_context_says(header, want):
    assert trace_id(header) == want


# ---------------------------------------------------------------------------- the server
def test_responses_carry_an_id_that_names_their_log_line(server):
    c = client(server)
    prompt = "def main("
    r = c.completions.with_raw_response.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0,
                                               user="alice", extra_body={"mode": "ar", "priority": 3})  # fmt: skip
    done = r.parse()
    rid = r.headers["x-request-id"]
    assert GENERATED.fullmatch(rid) and done._request_id == rid and r.headers.get_list("x-request-id") == [rid]
    f = logged(server, rid)
    assert f["status"] == "200" and f["endpoint"] == "completions" and f["mode"] == "ar" and f["stream"] == "false"
    assert f["user"] == "alice" and f["choices"] == "1" and f["priority"] == "3"
    assert int(f["prompt_bytes"]) == done.usage.prompt_tokens == len(prompt.encode())
    assert int(f["completion_bytes"]) == done.usage.completion_tokens
    assert f["finish"] == done.choices[0].finish_reason
    assert 0 < float(f["ttfb_ms"]) <= float(f["ms"])
    assert "trace_id" not in f
    traced = {"traceparent": f"00-{TRACE}-00f067aa0ba902b7-01"}
    other = c.completions.with_raw_response.create(model=MODEL, prompt=prompt, max_tokens=1, extra_headers=traced)
    assert other.headers["x-request-id"] != rid  # one per request
    assert logged(server, other.headers["x-request-id"])["trace_id"] == TRACE
    assert "priority" not in logged(server, other.headers["x-request-id"])  # the default is not written


def test_a_streamed_request_logs_what_it_sent_and_the_clients_id_is_kept(server):
    c = client(server, default_headers={"x-request-id": "trace-7f3a.1"})
    with c.completions.with_streaming_response.create(model=MODEL, prompt="x = ", max_tokens=12, temperature=0,
                                                      stream=True, n=2, stop=["\n"],
                                                      stream_options={"include_usage": True}) as r:  # fmt: skip
        assert r.headers.get_list("x-request-id") == ["trace-7f3a.1"]
        chunks = list(r.parse())
    f = logged(server, "trace-7f3a.1")
    assert f["status"] == "200" and f["stream"] == "true" and f["choices"] == "2"
    assert int(f["completion_bytes"]) == chunks[-1].usage.completion_tokens > 0  # the stop string's bytes too
    reasons = {c.finish_reason for ch in chunks for c in ch.choices if c.finish_reason}
    assert f["finish"] == ",".join(sorted(reasons))


def test_refused_requests_carry_an_id_and_log_the_field(server):
    url, auth = f"{server.url}/v1/completions", {"Authorization": f"Bearer {KEY}"}
    bad = httpx.post(url, json={"model": MODEL, "prompt": "x", "temperature": -1}, headers=auth)
    assert bad.status_code == 400
    f = logged(server, bad.headers["x-request-id"])
    assert f["status"] == "400" and f["param"] == "temperature" and f["error"] == bad.json()["error"]["message"]
    unauthorized = httpx.post(url, json={"model": MODEL, "prompt": "x"}, headers={"x-request-id": "a b"})
    assert unauthorized.status_code == 401 and GENERATED.fullmatch(unauthorized.headers["x-request-id"])
    assert logged(server, unauthorized.headers["x-request-id"])["status"] == "401"
    forged = 'eve"\nINFO: fastblt.requests request_id=forged'
    hostile = httpx.post(url, headers=auth, json={"model": MODEL, "prompt": "x", "max_tokens": 1, "user": forged})
    assert hostile.status_code == 200
    assert logged(server, hostile.headers["x-request-id"])["user"].startswith('eve"\nINFO')
    flood = httpx.post(url, headers=auth, json={"model": MODEL, "prompt": "x", "max_tokens": 1, "user": "u" * 100_000})
    assert flood.status_code == 200 and logged(server, flood.headers["x-request-id"])["user"] == "u" * 255 + "…"
    assert "request_id=forged" not in [ln.split(" ", 3)[2] for ln in server.output().splitlines() if " " in ln]
    missing = httpx.get(f"{server.url}/v1/nothing", headers=auth)
    assert missing.status_code == 404 and missing.headers["x-request-id"]  # every response, not only completions


@pytest.mark.timeout(300)
def test_a_server_with_json_logs_writes_only_json_lines(reference):
    args = ["--max-batch", "2", "--log-level", "info", "--log-format", "json"]
    with ServerProcess(args) as srv:
        ok = httpx.post(f"{srv.url}/v1/completions", json={"model": MODEL, "prompt": "def f(", "max_tokens": 6,
                                                            "temperature": 0, "mode": "ar"})  # fmt: skip
        bad = httpx.post(f"{srv.url}/v1/completions", json={"model": MODEL, "prompt": "x", "top_p": "high"})
        assert ok.status_code == 200 and bad.status_code == 400
        want = reference.generate("def f(", mode="ar", max_bytes=6, temperature=0.0).text
        assert ok.json()["choices"][0]["text"] == want
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and srv.output().count('"logger": "fastblt.requests"') < 2:
            time.sleep(0.05)
        lines = [json.loads(ln) for ln in srv.output().splitlines()]  # every line, from start-up on
    by_id = {ln.get("request_id"): ln for ln in lines if ln["logger"] == "fastblt.requests"}
    first, refused = by_id[ok.headers["x-request-id"]], by_id[bad.headers["x-request-id"]]
    assert (first["status"], first["mode"], first["prompt_bytes"], first["completion_bytes"]) == (200, "ar", 6, 6)
    assert (refused["status"], refused["param"], refused["level"]) == (400, "top_p", "INFO")
    assert any(ln["logger"] == "uvicorn.access" and ln["path"] == "/v1/completions" for ln in lines)
    assert any(ln["logger"] == "fastblt.serve" and "loading default" in ln["message"] for ln in lines)
