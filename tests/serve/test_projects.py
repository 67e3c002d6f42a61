"""`fastblt serve --project NAME=KEY`: a request with a project's key reaches only what that project
kept (responses, conversations, chat completions, files, batches); --api-key's keys are the
default project's. Another project's object is not found (404), never shown in a list."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re

import httpx
import pytest
import yaml
from conftest import CHAT_STOP, CHAT_TEMPLATE

from fastblt.errors import ConfigError
from fastblt.runtime.async_engine import AsyncEngine
from fastblt.serve.app import ServeSettings, create_app, project_keys
from fastblt.serve.batches import add_batch_api
from fastblt.serve.chat import ChatTemplate
from fastblt.serve.kept import MemoryKept, Scoped
from fastblt.serve.ray_serve import ServerOptions

from tiny import run_cli

MODEL = "fastblt-default"
KEYS = {"": "default-key", "a": "key-a", "b": "key-b"}


@pytest.fixture(scope="module")
def engine(engine_here):
    return engine_here


@contextlib.asynccontextmanager
async def clients(engine: AsyncEngine, batch_dir=None):
    """A client per project (by name; "" the default project's) of one app with projects a and b."""
    settings = ServeSettings(api_keys=(KEYS[""],), projects=(("a", KEYS["a"]), ("b", KEYS["b"])),
                             chat_template=ChatTemplate(CHAT_TEMPLATE, stops=(CHAT_STOP,)),
                             response_store=8 << 20)  # fmt: skip
    app = create_app(engine, settings)
    if batch_dir is not None:
        add_batch_api(app, batch_dir, 4)
    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(app.router.lifespan_context(app))
        transport = httpx.ASGITransport(app=app)
        out = {}
        for name, key in KEYS.items():
            headers = {"Authorization": f"Bearer {key}"}
            out[name] = await stack.enter_async_context(
                httpx.AsyncClient(transport=transport, base_url="http://s", headers=headers, timeout=60)
            )
        yield out


def print_config(args: list[str], monkeypatch, capsys) -> dict:
    code, out, err = run_cli(["serve", "--ray", *args, "--print-config"], monkeypatch, capsys)
    assert code == 0, err
    return yaml.safe_load(out)


def chat(**fields) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": "def add(a, b):"}], "max_tokens": 8,
            "temperature": 0, **fields}  # fmt: skip


def test_each_project_reaches_its_own_responses_conversations_and_chat_completions(engine, caplog):
    caplog.set_level(logging.INFO, logger="fastblt.requests")

    async def run() -> None:
        async with clients(engine) as c:
            a, b, default = c["a"], c["b"], c[""]
            r = await a.post("/v1/responses", json={"model": MODEL, "input": "def add(a, b):", "max_output_tokens": 8})
            assert r.status_code == 200, r.text
            rid = r.json()["id"]
            assert (await a.get(f"/v1/responses/{rid}")).status_code == 200
            for other in (b, default):  # not found, whatever it asks of it
                assert (await other.get(f"/v1/responses/{rid}")).json()["error"]["code"] == "response_not_found"
                assert (await other.get(f"/v1/responses/{rid}/input_items")).status_code == 404
                assert (await other.post(f"/v1/responses/{rid}/cancel")).status_code == 404
                assert (await other.delete(f"/v1/responses/{rid}")).status_code == 404
                r = await other.post("/v1/responses", json={"model": MODEL, "input": "x", "previous_response_id": rid})
                assert r.status_code == 400 and r.json()["error"]["code"] == "previous_response_not_found", r.text
            # the id with the project's prefix, as the store keeps it, is no way in either
            assert (await default.get(f"/v1/responses/a%2F{rid}")).status_code == 404
            r = await default.post("/v1/responses", json={"model": MODEL, "input": "x",
                                                          "previous_response_id": f"a/{rid}"})  # fmt: skip
            assert r.json()["error"]["code"] == "previous_response_not_found", r.text
            r = await a.post("/v1/responses", json={"model": MODEL, "input": "x", "previous_response_id": rid,
                                                    "max_output_tokens": 4})  # fmt: skip
            assert r.status_code == 200, r.text

            conv = (await a.post("/v1/conversations", json={"metadata": {"k": "v"}})).json()["id"]
            assert (await a.get(f"/v1/conversations/{conv}")).status_code == 200
            item = {"type": "message", "role": "user", "content": "hi"}
            for other in (b, default):
                assert (await other.get(f"/v1/conversations/{conv}")).status_code == 404
                assert (await other.post(f"/v1/conversations/{conv}/items", json={"items": [item]})).status_code == 404
                assert (await other.get(f"/v1/conversations/{conv}/items")).status_code == 404
                assert (await other.post(f"/v1/conversations/{conv}", json={"metadata": {}})).status_code == 404
                assert (await other.delete(f"/v1/conversations/{conv}")).status_code == 404
                r = await other.post("/v1/responses", json={"model": MODEL, "input": "x", "conversation": conv})
                assert r.status_code in (400, 404) and r.json()["error"]["code"] == "conversation_not_found", r.text
            assert (await a.get(f"/v1/conversations/{conv}")).json()["metadata"] == {"k": "v"}

            kept = {}
            for name in ("a", "b", ""):
                r = await c[name].post("/v1/chat/completions", json=chat(store=True, metadata={"who": name or "-"}))
                assert r.status_code == 200, r.text
                kept[name] = r.json()["id"]
            for name in ("a", "b", ""):
                listed = (await c[name].get("/v1/chat/completions")).json()
                assert [x["id"] for x in listed["data"]] == [kept[name]], (name, listed)
                for other in {"a", "b", ""} - {name}:
                    cid = kept[other]
                    assert (await c[name].get(f"/v1/chat/completions/{cid}")).status_code == 404
                    assert (await c[name].get(f"/v1/chat/completions/{cid}/messages")).status_code == 404
                    r = await c[name].post(f"/v1/chat/completions/{cid}", json={"metadata": {}})
                    assert r.status_code == 404
                    assert (await c[name].delete(f"/v1/chat/completions/{cid}")).status_code == 404
            assert (await a.delete(f"/v1/chat/completions/{kept['a']}")).status_code == 200
            assert (await b.get(f"/v1/chat/completions/{kept['b']}")).status_code == 200

            r = await a.get("/v1/chat/completions", headers={"Authorization": "Bearer key-c"})
            assert r.status_code == 401
            # a background response's bytes count when it ends
            r = await b.post("/v1/responses", json={"model": MODEL, "input": "x", "background": True,
                                                    "max_output_tokens": 6})  # fmt: skip
            async with asyncio.timeout(60):
                while (got := (await b.get(f"/v1/responses/{r.json()['id']}")).json())["status"] != "incomplete":
                    assert got["status"] in ("queued", "in_progress"), got
                    await asyncio.sleep(0.05)
            # what each project asked of the model, counted by project (a: 2 responses, 1 chat; b: 1
            # chat of 8 bytes, 1 background response)
            text = (await a.get("/metrics")).text
            assert 'fastblt_project_requests_total{project="a",status="200"} 3.0' in text
            assert 'fastblt_project_requests_total{project="b",status="200"} 2.0' in text
            b_done = re.search(r'^fastblt_project_bytes_total\{kind="completion",project="b"\} (\S+)$', text, re.M)
            assert float(b_done.group(1)) == 8 + got["usage"]["output_tokens"], text
            assert 'fastblt_project_requests_total{project="b",status="400"} 1.0' in text  # previous_response_id
            assert 'fastblt_project_requests_total{project="b",status="404"} 1.0' in text  # conversation
            done = re.search(r'^fastblt_project_bytes_total\{kind="completion",project="a"\} (\S+)$', text, re.M)
            assert done is not None and float(done.group(1)) > 0, text

    asyncio.run(run())
    lines = [r.getMessage() for r in caplog.records if r.name == "fastblt.requests"]
    chats = [line for line in lines if "endpoint=chat " in line]
    assert len(chats) == 3 and sum("project=a " in x for x in chats) == sum("project=b " in x for x in chats) == 1
    assert sum("project=" in x for x in chats) == 2  # the default project's is not named


def test_each_project_reaches_its_own_files_and_batches_and_a_batch_keeps_in_its_project(engine, tmp_path):
    lines = [{"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
              "body": chat(store=True, metadata={"batch": "yes"}, max_tokens=4 + i)} for i in range(3)]  # fmt: skip
    data = "".join(json.dumps(line) + "\n" for line in lines).encode()

    async def run() -> None:
        async with clients(engine, tmp_path) as c:
            a, b = c["a"], c["b"]
            f = (await a.post("/v1/files", files={"file": ("in.jsonl", data)}, data={"purpose": "batch"})).json()
            assert [x["id"] for x in (await a.get("/v1/files")).json()["data"]] == [f["id"]]
            for other in (b, c[""]):
                assert (await other.get("/v1/files")).json()["data"] == []
                assert (await other.get(f"/v1/files/{f['id']}")).json()["error"]["code"] == "file_not_found"
                assert (await other.get(f"/v1/files/{f['id']}/content")).status_code == 404
                assert (await other.delete(f"/v1/files/{f['id']}")).status_code == 404
                body = {"input_file_id": f["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"}
                r = await other.post("/v1/batches", json=body)
                assert r.status_code == 400 and r.json()["error"]["param"] == "input_file_id", r.text
            body = {"input_file_id": f["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"}
            batch = (await a.post("/v1/batches", json=body)).json()
            for other in (b, c[""]):
                assert (await other.get("/v1/batches")).json()["data"] == []
                assert (await other.get(f"/v1/batches/{batch['id']}")).status_code == 404
                assert (await other.post(f"/v1/batches/{batch['id']}/cancel")).status_code == 404
            async with asyncio.timeout(120):
                while (batch := (await a.get(f"/v1/batches/{batch['id']}")).json())["status"] != "completed":
                    await asyncio.sleep(0.1)
            assert batch["request_counts"] == {"total": 3, "completed": 3, "failed": 0}
            out = (await a.get(f"/v1/files/{batch['output_file_id']}/content")).text
            ids = {json.loads(line)["response"]["body"]["id"] for line in out.splitlines()}
            # the batch's stored chat completions are its project's
            listed = (await a.get("/v1/chat/completions", params={"metadata[batch]": "yes"})).json()["data"]
            assert {x["id"] for x in listed} == ids
            for other in (b, c[""]):
                assert (await other.get("/v1/chat/completions")).json()["data"] == []
                assert (await other.get(f"/v1/files/{batch['output_file_id']}")).status_code == 404

    asyncio.run(run())


def test_a_project_s_share_of_a_table_never_reaches_another_s_keys():
    table = MemoryKept(1 << 20)
    a, default = Scoped(table, "a"), Scoped(table, "")
    a.put("x", {"v": 1})
    default.put("x", {"v": 0})
    assert table.get("a/x") == {"v": 1} and table.get("x") == {"v": 0}
    assert a.get("x") == {"v": 1} and default.get("x") == {"v": 0}
    assert default.get("a/x") is None and not default.delete("a/x") and default.update("a/x", dict) is None
    assert a.get("a/x") is None and Scoped(table, "b").get("x") is None
    assert a.scan(lambda k, v: (k, v["v"])) == [("x", 1)] and default.scan(lambda k, v: (k, v["v"])) == [("x", 0)]
    with pytest.raises(ValueError, match="has a '/'"):
        default.put("a/y", {})


@pytest.mark.parametrize(
    "given, message",
    [
        (["a"], "expected NAME=KEY"),
        (["=k"], "expected NAME=KEY"),
        (["a b=k"], "expected NAME=KEY"),
        (["a/b=k"], "expected NAME=KEY"),
        (["a="], "the key is empty"),
        (["a= k"], "spaces at its ends"),
        (["a=k", "b=k"], "its key is a's too"),
        (["a=admin"], "its key is --api-key's too"),
    ],
)
def test_project_keys_name_what_is_wrong(given, message, monkeypatch, capsys):
    with pytest.raises(ValueError, match=message):
        project_keys(given, ["admin"])
    args = ["serve", "--api-key", "admin", *(x for value in given for x in ("--project", value))]
    code, out, err = run_cli(args, monkeypatch, capsys)
    assert code == 2 and "--project" in err and message in err and "Traceback" not in err, err
    with pytest.raises(ConfigError, match="projects: "):
        ServerOptions(api_key="admin", projects=given)


def test_project_keys_stay_out_of_the_printed_ray_config(monkeypatch, capsys):
    assert project_keys(["a=k1", "a=k2", "b.c-d_e=k3"]) == (("a", "k1"), ("a", "k2"), ("b.c-d_e", "k3"))
    (app,) = print_config(["--project", "a=k1"], monkeypatch, capsys)["applications"]
    assert "projects" not in app["args"] and "k1" not in json.dumps(app)
    assert ServerOptions(projects=["a=k1"]).projects == ["a=k1"]


def test_projects_come_from_the_environment_too(monkeypatch, capsys):
    """FASTBLT_PROJECTS (keys out of the process list), checked as the option is."""
    monkeypatch.setenv("FASTBLT_PROJECTS", "a=k1 b")
    code, _, err = run_cli(["serve"], monkeypatch, capsys)
    assert code == 2 and "--project" in err and "'b'=...: expected NAME=KEY" in err, err
    monkeypatch.setenv("FASTBLT_PROJECTS", "a=k1 b=k2")
    code, _, err = run_cli(["serve", "--ray", "--print-config"], monkeypatch, capsys)
    assert code == 0 and "API keys (--api-key, --project) are not written" in err, err
