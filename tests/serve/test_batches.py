"""OpenAI's Batch API on `fastblt serve --batch-dir`: the real openai client uploads an input file,
creates a batch, polls it and reads back answers equal to the same requests run alone; refusals name
their field; a cancelled batch keeps what it answered; a batch outlives a restart of the server."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from fastblt.serve.process import ServerProcess

from tiny import run_cli

KEY, OLD = "batch-key", "old-key"  # the server takes both (keys being rotated); batches run with the first
MODEL = "fastblt-default"
ENDED = ("completed", "failed", "cancelled", "expired")


def line(cid: str, prompt: str, max_tokens: int = 8, **body) -> dict:
    return {"custom_id": cid, "method": "POST", "url": "/v1/completions",
            "body": {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **body}}  # fmt: skip


def jsonl(lines: list[dict]) -> bytes:
    return "\n".join(json.dumps(x) for x in lines).encode() + b"\n"


def client(srv: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{srv.url}/v1", api_key=KEY, max_retries=0, timeout=60)


def wait(c: openai.OpenAI, bid: str, until=lambda b: b.status in ENDED, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while True:
        b = c.batches.retrieve(bid)
        if until(b) or time.monotonic() > deadline:
            return b
        time.sleep(0.1)


def answers(c: openai.OpenAI, file_id: str | None) -> dict[str, dict]:
    if file_id is None:
        return {}
    rows = [json.loads(x) for x in c.files.content(file_id).text.splitlines()]
    assert len({r["custom_id"] for r in rows}) == len(rows)  # each request answered once
    return {r["custom_id"]: r["response"] for r in rows}


@pytest.fixture(scope="module")
def batch_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("batches")
    with ServerProcess(["--batch-dir", str(root), "--max-batch", "4"], env={"FASTBLT_API_KEY": f"{OLD} {KEY}"}) as srv:
        srv.root = root
        yield srv


def test_a_batch_runs_to_files_whose_answers_equal_the_requests_alone(batch_server, reference):
    c = client(batch_server)
    prompts = {f"q{i}": f"def step_{i}(x):\n" for i in range(6)}
    lines = [line(cid, p) for cid, p in prompts.items()] + [line("hot", "x", temperature=-1)]
    f = c.files.create(file=("input.jsonl", jsonl(lines)), purpose="batch")
    assert (f.purpose, f.bytes, f.filename) == ("batch", len(jsonl(lines)), "input.jsonl")
    b = c.batches.create(input_file_id=f.id, endpoint="/v1/completions", completion_window="24h",
                         metadata={"job": "nightly"})  # fmt: skip
    assert b.status == "validating" and b.metadata == {"job": "nightly"}
    b = wait(c, b.id)
    assert b.status == "completed" and b.errors is None
    assert (b.request_counts.total, b.request_counts.completed, b.request_counts.failed) == (7, 6, 1)
    assert b.in_progress_at and b.finalizing_at and b.completed_at
    good, bad = answers(c, b.output_file_id), answers(c, b.error_file_id)
    assert set(good) == set(prompts) and set(bad) == {"hot"}
    for cid, prompt in prompts.items():
        want = reference.generate(prompt, mode="blt-s", max_bytes=8, temperature=0.0).text
        assert good[cid]["status_code"] == 200 and good[cid]["body"]["choices"][0]["text"] == want
    assert bad["hot"]["status_code"] == 400 and bad["hot"]["body"]["error"]["param"] == "temperature"
    assert b.model == MODEL and b.usage.input_tokens == sum(len(p.encode()) for p in prompts.values())
    assert b.usage.output_tokens == sum(r["body"]["usage"]["completion_tokens"] for r in good.values()) > 0
    assert b.usage.total_tokens == b.usage.input_tokens + b.usage.output_tokens
    assert c.files.retrieve(b.output_file_id).purpose == "batch_output"
    assert b.id in [x.id for x in c.batches.list()]
    assert {f.id, b.output_file_id, b.error_file_id} <= {x.id for x in c.files.list()}
    assert [x.id for x in c.files.list(purpose="batch_output")].count(b.output_file_id) == 1
    metrics = httpx.get(f"{batch_server.url}/metrics").text
    completed = re.search(r'^fastblt_batches\{status="completed"\} (\S+)$', metrics, re.M)
    assert completed and float(completed[1]) >= 1 and "fastblt_batch_requests_pending 0.0" in metrics


def test_an_input_the_batch_cannot_run_fails_it_naming_the_line(batch_server):
    c = client(batch_server)
    cases = {
        b'{"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": {}}\nnot json\n': (":2: not JSON", 2),
        jsonl([{**line("a", "x"), "url": "/v1/chat/completions"}]): (":1: url: /v1/chat/completions in a batch", 1),
        jsonl([line("a", "x"), line("a", "y")]): (":2: custom_id 'a' is line 1's too", 2),
        b"\n": ("no requests in it", None),
    }
    for data, (message, at) in cases.items():
        f = c.files.create(file=("in.jsonl", data), purpose="batch")
        b = wait(c, c.batches.create(input_file_id=f.id, endpoint="/v1/completions", completion_window="24h").id)
        assert b.status == "failed" and b.failed_at and b.output_file_id is None
        (error,) = b.errors.data
        assert error.code == "invalid_request" and error.message.startswith(f.id) and message in error.message
        assert error.line == at
        assert str(batch_server.root) not in error.message  # the file's id, not where the server keeps it


def test_refusals_name_their_field_and_the_server_stays_up(batch_server):
    c = client(batch_server)
    f = c.files.create(file=("in.jsonl", jsonl([line("a", "x")])), purpose="batch")
    bad_creates = [
        ({"input_file_id": "file-nope", "endpoint": "/v1/completions", "completion_window": "24h"}, "input_file_id"),
        ({"input_file_id": f.id, "endpoint": "/v1/embeddings", "completion_window": "24h"}, "endpoint"),
        ({"input_file_id": f.id, "endpoint": "/v1/completions", "completion_window": "1h"}, "completion_window"),
        ({"input_file_id": f.id, "endpoint": "/v1/completions", "completion_window": "24h", "metadata": {"k": 1}},
         "metadata"),
        ({"input_file_id": f.id, "endpoint": "/v1/completions", "completion_window": "24h", "priority": 1},
         "priority"),
    ]  # fmt: skip
    url, auth = batch_server.url, {"Authorization": f"Bearer {KEY}"}
    for body, param in bad_creates:
        r = httpx.post(f"{url}/v1/batches", json=body, headers=auth)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    r = httpx.post(f"{url}/v1/batches", content=b"{", headers=auth)
    assert r.status_code == 400 and r.json()["error"]["message"].startswith("body: invalid JSON (")
    with pytest.raises(openai.BadRequestError, match="purpose"):
        c.files.create(file=("in.jsonl", b"{}"), purpose="fine-tune")
    r = httpx.post(f"{url}/v1/files", data={"purpose": "batch"}, headers=auth)  # no file part
    assert r.status_code == 400 and r.json()["error"]["param"] == "file"
    hostile = [dict(content=b"xx", headers={**auth, "content-type": "multipart/form-data"}),  # no boundary
               dict(data={f"f{i}": "x" for i in range(9)} | {"purpose": "batch"}, files={"file": ("a", b"{}")}),
               dict(data={"purpose": "batch"}, files=[("file", ("a", b"1")), ("file", ("b", b"2"))])]  # fmt: skip
    for kw in hostile:
        r = httpx.post(f"{url}/v1/files", **({"headers": auth} | kw))
        assert r.status_code == 400 and r.json()["error"]["message"].startswith("POST /v1/files: "), r.text
    named = c.files.create(file=("../../etc/passwd", b"{}"), purpose="batch")  # a name is only a label
    assert named.filename == "passwd" and c.files.content(named.id).content == b"{}"
    for path in ("/v1/files/file-nope", "/v1/files/file-nope/content", "/v1/batches/batch_nope",
                 "/v1/files/..%2F..%2Fetc%2Fpasswd", "/v1/batches/..%2Fx"):  # fmt: skip
        assert httpx.get(f"{url}{path}", headers=auth).status_code == 404, path
    assert httpx.get(f"{url}/v1/batches?limit=0", headers=auth).status_code == 400
    assert httpx.get(f"{url}/v1/files", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.get(f"{url}/v1/files", headers={"Authorization": f"Bearer {OLD}"}).status_code == 200
    both = f"Bearer {OLD} {KEY}"  # the space-separated variable's whole value is no key
    assert httpx.get(f"{url}/v1/files", headers={"Authorization": both}).status_code == 401
    assert httpx.post(f"{url}/v1/files", files={"file": b"x"}, data={"purpose": "batch"}).status_code == 401
    done = wait(c, c.batches.create(input_file_id=f.id, endpoint="/v1/completions", completion_window="24h").id)
    with pytest.raises(openai.ConflictError):
        c.batches.cancel(done.id)  # only a running batch
    assert httpx.get(f"{url}/health").status_code == 200


def test_files_expire_as_openai_s_do(batch_server):
    c = client(batch_server)
    data, hour = jsonl([line("a", "x")]), {"anchor": "created_at", "seconds": 3600}
    plain = c.files.create(file=("a.jsonl", data), purpose="batch")
    assert plain.expires_at == plain.created_at + 30 * 24 * 3600  # OpenAI's default for purpose batch
    short = c.files.create(file=("b.jsonl", data), purpose="batch", expires_after=hour)
    assert short.expires_at == short.created_at + 3600 == c.files.retrieve(short.id).expires_at
    b = c.batches.create(input_file_id=short.id, endpoint="/v1/completions", completion_window="24h",
                         output_expires_after={"anchor": "created_at", "seconds": 7200})  # fmt: skip
    out = c.files.retrieve(wait(c, b.id).output_file_id)
    assert out.expires_at == out.created_at + 7200
    kept = wait(c, c.batches.create(input_file_id=plain.id, endpoint="/v1/completions", completion_window="24h").id)
    assert c.files.retrieve(kept.output_file_id).expires_at is None  # output files stay unless asked
    url, auth = batch_server.url, {"Authorization": f"Bearer {KEY}"}
    for fields, param in [({"anchor": "last_active_at", "seconds": "3600"}, "expires_after.anchor"),
                          ({"anchor": "created_at", "seconds": "60"}, "expires_after.seconds"),
                          ({"anchor": "created_at", "seconds": "1e4"}, "expires_after.seconds"),
                          ({"seconds": "3600"}, "expires_after.anchor")]:  # fmt: skip
        form = {"purpose": "batch"} | {f"expires_after[{k}]": v for k, v in fields.items()}
        r = httpx.post(f"{url}/v1/files", data=form, files={"file": ("a", data)}, headers=auth)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    create = {"input_file_id": plain.id, "endpoint": "/v1/completions", "completion_window": "24h"}
    for policy, param in [({"anchor": "created_at", "seconds": 10**9}, "output_expires_after.seconds"),
                          ({"anchor": "created_at", "seconds": True}, "output_expires_after.seconds"),
                          ({"anchor": "created_at", "seconds": 3600, "x": 1}, "output_expires_after"),
                          ("1h", "output_expires_after")]:  # fmt: skip
        r = httpx.post(f"{url}/v1/batches", json=create | {"output_expires_after": policy}, headers=auth)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def raw(srv: ServerProcess, head: str, body: bytes = b"") -> str:
    """The status line of what the server answers to a request written by hand."""
    with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as s:
        s.sendall(head.encode() + b"\r\n" + body)
        return s.makefile("rb").readline().decode()


def test_an_upload_past_the_limit_or_of_no_stated_length_is_refused_before_it_is_read(batch_server):
    auth = f"Authorization: Bearer {KEY}\r\nContent-Type: multipart/form-data; boundary=b\r\n"
    huge = raw(batch_server, f"POST /v1/files HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: 300000000\r\n")
    assert huge.startswith("HTTP/1.1 413")
    chunked = raw(batch_server, f"POST /v1/files HTTP/1.1\r\nHost: x\r\n{auth}Transfer-Encoding: chunked\r\n",
                  b"5\r\nhello\r\n0\r\n\r\n")  # fmt: skip
    assert chunked.startswith("HTTP/1.1 411")
    assert httpx.get(f"{batch_server.url}/health").status_code == 200


def test_lists_page_newest_first(batch_server):
    c = client(batch_server)
    made = [c.files.create(file=(f"p{i}.jsonl", jsonl([line("a", "x")])), purpose="batch").id for i in range(3)]
    page = c.files.list(limit=2)
    assert [x.id for x in page.data] == made[::-1][:2] and page.has_more
    rest = httpx.get(f"{batch_server.url}/v1/files", params={"limit": 1, "after": made[1]},
                     headers={"Authorization": f"Bearer {KEY}"}).json()  # fmt: skip
    assert rest["data"][0]["id"] == made[0]


def test_a_cancelled_batch_keeps_what_it_answered(batch_server):
    c = client(batch_server)
    lines = [line(f"c{i}", f"class C{i}:\n", max_tokens=200) for i in range(40)]
    f = c.files.create(file=("long.jsonl", jsonl(lines)), purpose="batch")
    b = c.batches.create(input_file_id=f.id, endpoint="/v1/completions", completion_window="24h")
    b = wait(c, b.id, until=lambda b: b.status == "in_progress" and b.request_counts.completed >= 1)
    with pytest.raises(openai.ConflictError):  # its input stays while the batch runs
        c.files.delete(f.id)
    metrics = httpx.get(f"{batch_server.url}/metrics").text
    running = re.search(r'^fastblt_batches\{status="in_progress"\} (\S+)$', metrics, re.M)
    pending = re.search(r"^fastblt_batch_requests_pending (\S+)$", metrics, re.M)
    assert running and float(running[1]) >= 1 and pending and 0 < float(pending[1]) < 40
    assert c.batches.cancel(b.id).status == "cancelling"
    b = wait(c, b.id)
    assert b.status == "cancelled" and b.cancelled_at and b.cancelling_at
    got = answers(c, b.output_file_id)
    assert 1 <= len(got) < 40 and b.request_counts.completed == len(got)
    assert all(r["status_code"] == 200 and r["body"]["usage"]["completion_tokens"] == 200 for r in got.values())
    assert c.files.delete(f.id).deleted and f.id not in {x.id for x in c.files.list()}


@pytest.mark.timeout(400)
def test_a_batch_outlives_a_restart_of_the_server(tmp_path, reference):
    lines = [line(f"r{i}", f"import os{i}\n", max_tokens=64) for i in range(60)]  # ~1 s of work left when stopped
    args = ["--batch-dir", str(tmp_path), "--max-batch", "2", "--api-key", KEY]
    with ServerProcess(args) as srv:
        # one server runs a directory's batches
        twice = subprocess.run([sys.executable, "-m", "fastblt.cli", "serve", "--batch-dir", str(tmp_path)],
                               capture_output=True, text=True, timeout=60)  # fmt: skip
        assert twice.returncode == 2 and f"in use by another server (pid {srv.proc.pid})" in twice.stderr
        on_ray = subprocess.run([sys.executable, "-m", "fastblt.cli", "serve", "--ray", "--batch-dir", str(tmp_path)],
                                capture_output=True, text=True, timeout=60)  # fmt: skip
        assert on_ray.returncode == 2 and f"in use by another server (pid {srv.proc.pid})" in on_ray.stderr
        c = client(srv)
        f = c.files.create(file=("in.jsonl", jsonl(lines)), purpose="batch")
        bid = c.batches.create(input_file_id=f.id, endpoint="/v1/completions", completion_window="24h").id
        first = wait(c, bid, until=lambda b: b.request_counts.completed >= 2)
        assert first.status == "in_progress"
        assert srv.stop() == 0  # SIGTERM: the batch stops where it is, still in progress on disk
    assert json.loads((tmp_path / "batches" / f"{bid}.json").read_text())["status"] == "in_progress"
    meta = json.loads((tmp_path / "files" / f"{f.id}.json").read_text())
    old = {**meta, "id": "file-old", "expires_at": int(time.time()) - 1}  # expired while the server was down
    (tmp_path / "files" / "file-old.json").write_text(json.dumps(old))
    (tmp_path / "files" / "file-old.jsonl").write_bytes(jsonl(lines))
    with ServerProcess(args) as srv:
        c = client(srv)
        with pytest.raises(openai.NotFoundError):
            c.files.retrieve("file-old")
        assert not any((tmp_path / "files").glob("file-old.*"))  # swept at start
        b = wait(c, bid)
        assert b.status == "completed" and b.request_counts.completed == 60 and b.request_counts.failed == 0
        got = answers(c, b.output_file_id)
    assert set(got) == {x["custom_id"] for x in lines}
    for x in lines:
        want = reference.generate(x["body"]["prompt"], mode="blt-s", max_bytes=64, temperature=0.0).text
        assert got[x["custom_id"]]["body"]["choices"][0]["text"] == want


@pytest.mark.parametrize(
    "args, message",
    [
        (["--ray", "--batch-dir", "FILE"], "--batch-dir"),
        (["--batch-dir", "FILE"], "--batch-dir"),
    ],
)
def test_a_batch_dir_that_cannot_serve_stops_the_command(args, message, tmp_path, monkeypatch, capsys):
    (tmp_path / "FILE").write_text("a file, not a directory")
    args = [a.replace("DIR", str(tmp_path / "d")).replace("FILE", str(tmp_path / "FILE")) for a in args]
    code, out, err = run_cli(["serve", *args], monkeypatch, capsys)
    assert code == 2 and message in err and "Traceback" not in err, err
    assert "loading" not in err and (tmp_path / "FILE").read_text() == "a file, not a directory"


def test_no_batch_dir_no_batch_api(server):
    r = httpx.get(f"{server.url}/v1/batches", headers={"Authorization": "Bearer test-key"})
    assert r.status_code == 404


def test_store_paths_stay_inside_the_directory(tmp_path):
    from fastblt.serve.batches import Store

    store = Store(tmp_path)
    for bad in ("../x", "a/b", "", "x" * 81, "file-.json"):
        assert store.file(bad) is None and store.batch(bad) is None
    assert sorted(p.name for p in Path(tmp_path).iterdir()) == ["batches", "files"]


# ---------------------------------------------------------------------------- the runner alone
def _echo_app():
    """An app that answers a completion after 50 ms with its prompt: a stand-in for the server's."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def complete(request):
        body = await request.json()
        app.state.priorities.append(body.get("priority"))
        app.state.now += 1
        app.state.most = max(app.state.most, app.state.now)  # the most requests in flight at once
        await asyncio.sleep(0.05)
        app.state.now -= 1
        return JSONResponse({"echo": body["prompt"]})

    app = Starlette(routes=[Route("/v1/completions", complete, methods=["POST"])])
    app.state.now = app.state.most = 0
    app.state.priorities = []
    return app


def _stored(tmp_path: Path, n: int):
    from fastblt.serve.batches import Store

    store = Store(tmp_path)
    source = store.files_dir / "in.upload"
    source.write_bytes(jsonl([line(f"e{i}", f"p{i}") for i in range(n)]))
    return store, store.add_file(source, "in.jsonl", "batch")["id"]


def _files(store, batch: dict) -> tuple[list[dict], list[dict]]:
    """The lines of a batch's output and error files (none where it has no such file)."""

    def read(fid: str | None) -> list[dict]:
        return [json.loads(x) for x in store.content(fid).read_text().splitlines()] if fid else []

    return read(batch["output_file_id"]), read(batch["error_file_id"])


def test_a_batch_whose_window_ends_keeps_its_answers_and_reports_the_rest_expired(tmp_path):
    from fastblt.serve.batches import Runner, new_batch

    store, fid = _stored(tmp_path, 40)

    async def main() -> dict:
        runner = Runner(_echo_app(), store, concurrency=1, headers={})
        batch = new_batch(fid, "/v1/completions")
        batch["expires_at"] = time.time() + 1.5  # 40 requests of 50 ms one at a time take 2 s
        store.save(batch)
        runner.start(batch)
        await asyncio.wait_for(asyncio.gather(*runner.tasks.values()), 30)
        return store.batch(batch["id"])

    batch = asyncio.run(main())
    assert batch["status"] == "expired" and batch["expired_at"] and batch["completed_at"] is None
    ok, expired = _files(store, batch)
    assert 2 <= len(ok) < 40 and all(r["response"]["body"] == {"echo": f"p{r['custom_id'][1:]}"} for r in ok)
    assert all(r["response"] is None and r["error"]["code"] == "batch_expired" for r in expired)
    assert sorted(r["custom_id"] for r in ok + expired) == sorted(f"e{i}" for i in range(40))  # each once
    assert batch["request_counts"] == {"total": 40, "completed": len(ok), "failed": len(expired)}


def test_a_batch_past_its_window_at_start_up_expires_keeping_what_it_answered(tmp_path):
    from fastblt.serve.batches import Runner, new_batch

    store, fid = _stored(tmp_path, 10)
    batch = new_batch(fid, "/v1/completions")
    batch["expires_at"] = time.time() - 1  # the server was down when its window ended
    batch |= {"status": "in_progress", "in_progress_at": batch["created_at"]}
    batch["request_counts"]["total"] = 10
    store.save(batch)
    answers = [{"id": "r", "custom_id": f"e{i}", "response": {"status_code": 200, "body": {}}, "error": None}
               for i in (3, 7)]  # fmt: skip
    store.results(batch["id"]).write_bytes(jsonl(answers) + b'{"id": "half-writ')  # and one cut off

    async def main() -> dict:
        runner = Runner(_echo_app(), store, concurrency=1, headers={})
        runner.start(store.batch(batch["id"]))
        await asyncio.wait_for(asyncio.gather(*runner.tasks.values()), 30)
        return store.batch(batch["id"])

    done = asyncio.run(main())
    assert done["status"] == "expired"
    ok, expired = _files(store, done)
    assert [r["custom_id"] for r in ok] == ["e3", "e7"]
    assert sorted(r["custom_id"] for r in expired) == sorted(f"e{i}" for i in range(10) if i not in (3, 7))
    assert not store.results(batch["id"]).exists()


def test_an_expired_file_leaves_the_api_at_once_and_dir_at_a_sweep_once_no_running_batch_reads_it(tmp_path):
    from fastblt.serve.batches import Runner, new_batch

    store, fid = _stored(tmp_path, 20)
    source = store.files_dir / "other.upload"
    source.write_bytes(b"{}")
    other = store.add_file(source, "other.jsonl", "batch", ttl=3600)["id"]
    assert store.file(other) and store.expired_files() == []
    for f in (fid, other):
        store.file(f)["expires_at"] = int(time.time()) - 1

    async def main() -> tuple[list[str], list[str], dict]:
        runner = Runner(_echo_app(), store, concurrency=1, headers={})
        batch = new_batch(fid, "/v1/completions")
        store.save(batch)
        runner.start(batch)
        running = await runner.sweep()  # its input stays on disk while it runs
        assert store.content(fid).exists() and not store.content(other).exists()
        await asyncio.wait_for(asyncio.gather(*runner.tasks.values()), 30)
        return running, await runner.sweep(), store.batch(batch["id"])

    running, ended, batch = asyncio.run(main())
    assert (running, ended) == ([other], [fid]) and batch["request_counts"]["completed"] == 20
    assert store.file(fid) is None and fid not in {f["id"] for f in store.files()}
    assert sorted(p.name for p in store.files_dir.iterdir() if p.name.startswith(fid)) == []


def test_live_traffic_first_a_batch_waits_for_the_queue_and_trickles_beside_live_requests(tmp_path):
    from fastblt.serve.batches import Runner, new_batch

    store, fid = _stored(tmp_path, 24)
    live = {"running": 0, "waiting": 2}  # live requests the engine holds, and how many of them wait for a row
    app = _echo_app()

    async def main() -> list[tuple[int, int]]:
        def pressure() -> tuple[int, int]:
            return runner.inflight + live["running"] + live["waiting"], live["waiting"]

        runner = Runner(app, store, concurrency=4, headers={}, trickle=1, pressure=pressure)
        batch = new_batch(fid, "/v1/completions")
        store.save(batch)
        runner.start(batch)
        seen = []  # (answered, batch requests in flight) as the phases go
        await asyncio.sleep(0.4)  # a queue: nothing is sent
        seen.append((runner.batch(batch["id"])["request_counts"]["completed"], app.state.most))
        live.update(running=3, waiting=0)  # live requests have rows: the batch trickles, one at a time
        await asyncio.sleep(0.5)
        seen.append((runner.batch(batch["id"])["request_counts"]["completed"], app.state.most))
        live.update(running=0)
        app.state.most = 0  # idle: up to concurrency at once
        await asyncio.wait_for(asyncio.gather(*runner.tasks.values()), 30)
        seen.append((store.batch(batch["id"])["request_counts"]["completed"], app.state.most))
        return seen

    (queued, trickled, idle) = asyncio.run(main())
    assert queued == (0, 0)
    assert 2 <= trickled[0] <= 12 and trickled[1] == 1
    assert idle == (24, 4)


def test_batch_requests_queue_behind_live_ones_unless_their_body_says_otherwise(tmp_path):
    from fastblt.serve.batches import BATCH_PRIORITY, Runner, Store, new_batch

    store = Store(tmp_path)
    source = store.files_dir / "in.upload"
    source.write_bytes(jsonl([line("a", "p"), line("b", "p", priority=-2), line("c", "p", service_tier="flex")]))
    fid = store.add_file(source, "in.jsonl", "batch")["id"]
    app = _echo_app()

    async def main() -> dict:
        runner = Runner(app, store, concurrency=1, headers={})
        batch = new_batch(fid, "/v1/completions")
        store.save(batch)
        runner.start(batch)
        await asyncio.wait_for(asyncio.gather(*runner.tasks.values()), 30)
        return store.batch(batch["id"])

    assert asyncio.run(main())["request_counts"]["completed"] == 3
    assert app.state.priorities == [BATCH_PRIORITY, -2, None] and BATCH_PRIORITY > 0  # live requests' is 0
    from fastblt.serve.batch_file import BatchRequest
    from fastblt.serve.batches import _behind_live

    asked = BatchRequest(1, "r", "/v1/responses", b'{"input": "x"}')
    kept = BatchRequest(1, "r", "/v1/responses", b'{"input": "x", "store": true}')
    assert json.loads(_behind_live(asked).body)["store"] is False and json.loads(_behind_live(kept).body)["store"]


def test_a_request_turned_away_for_now_is_sent_again_after_its_retry_after(tmp_path):
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from fastblt.serve.batch_file import answer, read_requests

    calls = []

    async def complete(request):  # busy (429, then 503) for each request's first two tries
        cid = (await request.json())["prompt"]
        calls.append((cid, time.monotonic()))
        tries = sum(c == cid for c, _ in calls)
        if tries <= 2:
            return JSONResponse({"error": {"message": "busy"}}, 429 if tries == 1 else 503, {"Retry-After": "0.2"})
        return JSONResponse({"echo": cid})

    app = Starlette(routes=[Route("/v1/completions", complete, methods=["POST"])])
    src = tmp_path / "in.jsonl"
    src.write_bytes(jsonl([line(f"r{i}", f"p{i}") for i in range(3)]))
    out = tmp_path / "out.jsonl"
    with out.open("wb") as f:
        summary = asyncio.run(answer(app, read_requests(src), f, concurrency=3, retry=True))
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert summary.statuses == {200: 3} and all(r["response"]["status_code"] == 200 for r in rows)
    for i in range(3):
        times = [t for c, t in calls if c == f"p{i}"]
        assert len(times) == 3 and all(b - a >= 0.19 for a, b in zip(times, times[1:], strict=False))
    src.write_bytes(jsonl([line(f"s{i}", f"q{i}") for i in range(3)]))  # prompts not seen yet
    with out.open("wb") as f:  # without retry (fastblt batch), a 429 is the line's answer
        summary = asyncio.run(answer(app, read_requests(src), f, concurrency=3))
    assert summary.statuses == {429: 3}
