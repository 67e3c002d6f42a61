"""`fastblt serve --ray`: the same server as Ray Serve replicas.

Fast (no cluster): --print-config is a valid Serve config that deploys what the options say; the
--ray options are checked together. On a local two-node cluster (127.0.0.1 only, one CPU per node
so each replica has a node of its own): completions through Ray Serve's proxy equal
Generator.generate, both replicas answer, a session's requests stick to one replica (whose prompt
snapshots its next turn loads), kept responses, conversations and background responses are read,
continued, streamed and cancelled through either replica, a batch of the Batch API runs in one
actor for both, each replica's metrics reach Ray's
exporter, and a replica killed under load costs only clean, retryable failures of the requests it
held, then comes back.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import tempfile
import time
from pathlib import Path

import httpx
import openai
import pytest
from conftest import CHAT_STOP, CHAT_TEMPLATE

from tiny import run_cli

ray = pytest.importorskip("ray", reason="Ray Serve is the fastblt[ray] extra")
import yaml  # noqa: E402 (comes with ray)
from ray import serve  # noqa: E402
from ray.serve.schema import ServeDeploySchema  # noqa: E402

from fastblt.errors import ConfigError  # noqa: E402
from fastblt.serve import ray_batches, ray_kept, ray_serve  # noqa: E402
from fastblt.serve.app import REPLICA_HEADER  # noqa: E402
from fastblt.serve.chat import ChatTemplate  # noqa: E402
from fastblt.serve.process import ServerProcess  # noqa: E402
from fastblt.serve.ray_route import SESSION_HEADER  # noqa: E402
from fastblt.serve.ray_serve import DeploymentOptions, RayServer, ServerOptions  # noqa: E402

MODEL = "fastblt-default"
MODES = ("ar", "blt-s", "blt-d", "blt-dv")


# ---------------------------------------------------------------------------- no cluster
def print_config(args: list[str], monkeypatch, capsys) -> dict:
    code, out, err = run_cli(["serve", "--ray", *args, "--print-config"], monkeypatch, capsys)
    assert code == 0, err
    return yaml.safe_load(out)


def test_a_replica_sizes_its_lanes_by_the_cpus_ray_assigned_it(monkeypatch):
    from fastblt.runtime import async_engine as ae

    assert [ray_serve.replica_cores(cpus) for cpus in (0.0, 0.5, 1.0, 2.0, 4.0)] == [1, 1, 1, 2, 4]
    monkeypatch.setattr(ae, "cpu_cores", lambda: 64)  # the node's cores, which replicas share
    assert [ae.default_lanes("ort", ray_serve.replica_cores(c)) for c in (1.0, 2.0, 4.0)] == [1, 2, 4]


def test_print_config_is_a_serve_config_for_the_options(monkeypatch, capsys):
    config = print_config(["--replicas", "3", "--max-batch", "8", "--mode", "ar", "--num-cpus", "2", "--num-gpus",
                           "0.5", "--host", "0.0.0.0", "--port", "9000"], monkeypatch, capsys)  # fmt: skip
    ServeDeploySchema.model_validate(config)  # what `serve deploy` reads
    assert config["http_options"] == {"host": "0.0.0.0", "port": 9000}
    (app,) = config["applications"]
    assert app["import_path"] == "fastblt.serve.ray_serve:build" and app["route_prefix"] == "/"
    assert app["args"] == {"max_batch": 8, "mode": "ar", "max_context": 16384}
    (dep,) = app["deployments"]
    assert dep["name"] == "FastBlt" and dep["num_replicas"] == 3 and "autoscaling_config" not in dep
    assert dep["ray_actor_options"] == {"num_cpus": 2.0, "num_gpus": 0.5}
    assert dep["max_ongoing_requests"] == 16 and dep["max_queued_requests"] == 256

    module, attr = app["import_path"].split(":")
    built = getattr(__import__(module, fromlist=[attr]), attr)(app["args"])
    assert isinstance(built, serve.Application)
    with pytest.raises(ConfigError, match="unknown option.*max_batc\\b"):
        ray_serve.build({"max_batc": 8})


def test_print_config_passes_the_lanes_prompt_sharing(monkeypatch, capsys):
    (app,) = print_config(["--no-share-prompts"], monkeypatch, capsys)["applications"]
    assert app["args"]["share_prompts"] is False
    assert ray_serve.ServerOptions.from_args(app["args"]).share_prompts is False
    (app,) = print_config([], monkeypatch, capsys)["applications"]
    assert "share_prompts" not in app["args"]  # the default


def test_replicas_keep_responses_in_one_store_as_the_command_says(monkeypatch, capsys):
    (app,) = print_config(["--response-store-mb", "0"], monkeypatch, capsys)["applications"]
    assert app["args"]["response_store_mb"] == 0 and ServerOptions.from_args(app["args"]).response_store_mb == 0
    (app,) = print_config([], monkeypatch, capsys)["applications"]
    assert "response_store_mb" not in app["args"] and ServerOptions().response_store_mb == 64  # the command's default
    for bad in (-1, 1.5, True, "64"):
        with pytest.raises(ConfigError, match="response_store_mb"):
            ServerOptions(response_store_mb=bad)
    (app,) = print_config(["--graceful-timeout", "20"], monkeypatch, capsys)["applications"]
    assert app["args"]["background_grace_s"] == 10.0  # half: the rest for Serve to drain the requests first
    assert "stream_interval_s" not in app["args"]  # the default: each chunk as it is made
    (app,) = print_config(["--stream-interval", "0.05"], monkeypatch, capsys)["applications"]
    assert ServerOptions.from_args(app["args"]).stream_interval_s == 0.05
    (app,) = print_config(["--response-store-dir", "kept"], monkeypatch, capsys)["applications"]
    assert app["args"]["response_store_dir"] == str(Path("kept").resolve())  # the store actor's node's path
    for bad, message in ((dict(response_store_dir="kept"), "absolute path"),
                         (dict(response_store_dir="/kept", response_store_mb=0), "nothing would be kept"),
                         (dict(background_grace_s=-1), "background_grace_s"),
                         (dict(background_grace_s=float("inf")), "background_grace_s"),
                         (dict(stream_interval_s=2), "stream_interval_s"),
                         (dict(stream_interval_s=float("nan")), "stream_interval_s")):  # fmt: skip
        with pytest.raises(ConfigError, match=message):
            ServerOptions(**bad)


def test_print_config_passes_the_batch_dir_by_its_full_path(monkeypatch, capsys):
    (app,) = print_config(["--batch-dir", "batches"], monkeypatch, capsys)["applications"]
    assert app["args"]["batch_dir"] == str(Path("batches").resolve())  # the batch actor's node's path
    assert ServerOptions(max_batch=16).batch_concurrency == 12 and ServerOptions(max_batch=1).batch_concurrency == 1
    with pytest.raises(ConfigError, match="batch_dir: expected an absolute path"):
        ServerOptions(batch_dir="batches")


def test_a_replica_lets_batch_requests_go_as_one_server_does():
    """Idle: up to `concurrency` in flight; with live requests running, `trickle`; with any waiting
    for a row, none: the others are a 429 the batch actor sends again."""

    class Engine:
        held, waiting = 0, 0

    rows, engine = ray_batches.Admission(concurrency=3, trickle=1), Engine()
    for _ in range(3):
        assert rows.held_back(engine) is None
        engine.held += 1
    status, headers, body = rows.held_back(engine)  # three in flight: the fourth goes back
    assert status == 429 and float(headers["retry-after"]) > 0
    assert json.loads(body)["error"]["code"] == "batch_held_back"  # sent again by the actor (batch_file.answer)
    engine.held += 1  # a live request: only the trickle while it runs
    rows.done(), rows.done()
    engine.held -= 2
    assert rows.inflight == 1 and rows.held_back(engine)[0] == 429
    rows.done()
    engine.held -= 1
    assert rows.held_back(engine) is None and rows.inflight == 1  # the trickle's one
    engine.waiting = 1
    engine.held += 1
    rows.done()
    engine.held -= 1
    assert rows.held_back(engine)[0] == 429  # a request waits for a row: none


def test_the_batch_actor_keeps_a_replica_s_share_in_flight_for_each_replica_running(tmp_path):
    counted = [3]

    def replicas(app_name: str, deployment: str) -> int:
        if counted[0] is None:
            raise RuntimeError("controller restarting")
        return counted[0]

    actor = ray_batches._BatchActor(str(tmp_path), 12, "app", "dep", replicas=replicas)
    actor.follow_replicas()
    assert actor.batches.runner.concurrency == 36
    counted[0] = 0  # none running (all restarting): one replica's share, sent back until one takes it
    actor.follow_replicas()
    assert actor.batches.runner.concurrency == 12
    counted[0] = None  # not counted: as it was
    actor.follow_replicas()
    assert actor.batches.runner.concurrency == 12


def test_a_batch_request_whose_replica_died_is_sent_again(monkeypatch):
    """The batch actor's way to the replicas: a request that fails on the way is a 503 with
    Retry-After (batch_file.answer sends it again), never an error that fails the batch."""
    from fastblt.serve.app import call_app

    class Call:
        def remote(self, *args):
            async def died():
                raise ray.exceptions.ActorDiedError()

            return died()

    deployment = ray_batches._Deployment("fastblt", "FastBlt")
    deployment.handle = type("Handle", (), {"answer_batch_request": Call()})()
    status, headers, body = asyncio.run(call_app(deployment, "POST", "/v1/completions", b"{}"))
    assert status == 503 and headers["retry-after"] == "1"
    assert json.loads(body)["error"]["code"] == "replica_unavailable"


def test_replicas_take_a_key_or_a_list_of_keys():
    assert ray_serve.ServerOptions(api_key="a").api_keys == ("a",)
    assert ray_serve.ServerOptions(api_key=["a", "b"]).api_keys == ("a", "b")
    assert ray_serve.ServerOptions().api_keys == ()
    for bad in ("", " a", ["a", ""], [1], {"a": "b"}):
        with pytest.raises(ConfigError, match="api_key: expected a key, or a list of keys"):
            ray_serve.ServerOptions(api_key=bad)


def test_print_config_passes_allowed_origins_and_replicas_check_them(monkeypatch, capsys):
    (app,) = print_config(["--allowed-origin", "https://app.example"], monkeypatch, capsys)["applications"]
    assert app["args"]["allowed_origins"] == ["https://app.example"]
    assert ray_serve.ServerOptions.from_args(app["args"]).allowed_origins == ["https://app.example"]
    for bad, message in (("https://a.example", "expected a list of origins"), (["https://a.example/"], "no path")):
        with pytest.raises(ConfigError, match=f"allowed_origins: .*{message}"):
            ray_serve.ServerOptions(allowed_origins=bad)


def test_print_config_writes_json_logs_with_the_request_logs_fields(monkeypatch, capsys):
    (app,) = print_config(["--log-format", "json"], monkeypatch, capsys)["applications"]
    assert app["logging_config"] == {"encoding": "JSON"} and app["args"]["log_format"] == "json"
    assert ray_serve.ServerOptions.from_args(app["args"]).log_format == "json"
    (app,) = print_config([], monkeypatch, capsys)["applications"]
    assert "logging_config" not in app and "log_format" not in app["args"]  # text: Serve's default
    with pytest.raises(ConfigError, match="log_format: expected 'text' or 'json', got 'xml'"):
        ray_serve.ServerOptions.from_args({"log_format": "xml"})


def test_print_config_passes_the_chat_template_by_its_full_path(chat_template, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(chat_template.parent)
    (app,) = print_config(["--chat-template", chat_template.name, "--chat-stop", CHAT_STOP], monkeypatch,
                          capsys)["applications"]  # fmt: skip
    assert app["args"]["chat_template"] == str(chat_template.resolve())  # the same path on every node
    assert app["args"]["chat_stop"] == [CHAT_STOP] and ServerOptions.from_args(app["args"]).chat_stop == [CHAT_STOP]
    code, _, err = run_cli(["serve", "--chat-stop", "x", "--ray", "--print-config"], monkeypatch, capsys)
    assert code == 2 and "--chat-stop and --tool-call-start apply only with --chat-template" in err
    template = ["--chat-template", chat_template.name]
    tags = ["--tool-call-start", "<c>", "--tool-call-end", "</c>"]
    (app,) = print_config([*template, *tags], monkeypatch, capsys)["applications"]
    options = ServerOptions.from_args(app["args"])
    assert (options.tool_call_start, options.tool_call_end) == ("<c>", "</c>")
    for args, says in (
        (tags[:2], "apply only with --chat-template"),
        ([*template, *tags[2:]], "only with --tool-call-start"),
        ([*template, "--tool-call-start", ""], "'--tool-call-start': empty"),
    ):
        code, _, err = run_cli(["serve", *args, "--ray", "--print-config"], monkeypatch, capsys)
        assert code == 2 and says in err, err
    code, _, err = run_cli(["serve", "--ray", "--chat-template", str(tmp_path / "none.jinja"), "--print-config"],
                           monkeypatch, capsys)  # fmt: skip
    assert code == 2 and "none.jinja: no such file" in err and "Traceback" not in err


def test_print_config_serves_https_and_keeps_the_keys_password_out(monkeypatch, capsys):
    tls = Path(__file__).parent / "tls"
    args = ["--ssl-certfile", str(tls / "cert.pem"), "--ssl-keyfile", str(tls / "key_encrypted.pem")]
    config = print_config([*args, "--ssl-keyfile-password", "test-password"], monkeypatch, capsys)
    ServeDeploySchema.model_validate(config)
    assert config["http_options"] == {"host": "127.0.0.1", "port": 8000, "ssl_certfile": str(tls / "cert.pem"),
                                      "ssl_keyfile": str(tls / "key_encrypted.pem")}  # fmt: skip
    assert "test-password" not in yaml.safe_dump(config)


def test_print_config_autoscales_and_keeps_the_key_out(monkeypatch, capsys):
    config = print_config(["--min-replicas", "0", "--max-replicas", "4", "--max-batch", "6", "--api-key", "secret",
                           "--api-key", "next"], monkeypatch, capsys)  # fmt: skip
    ServeDeploySchema.model_validate(config)
    (app,) = config["applications"]
    (dep,) = app["deployments"]
    assert dep["autoscaling_config"] == {"min_replicas": 0, "max_replicas": 4, "target_ongoing_requests": 6}
    assert "num_replicas" not in dep and "api_key" not in app["args"]
    assert "secret" not in yaml.safe_dump(config) and "next" not in yaml.safe_dump(config)
    config = print_config(["--max-replicas", "2", "--target-ongoing-requests", "3"], monkeypatch, capsys)
    dep = config["applications"][0]["deployments"][0]
    assert dep["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 3.0}


@pytest.mark.parametrize(
    "args, message",
    [
        (["--replicas", "2"], "--replicas applies only with --ray"),
        (["--print-config"], "--print-config applies only with --ray"),
        (["--ray", "--replicas", "2", "--min-replicas", "1"], "not both"),
        (["--ray", "--replicas", "2", "--max-replicas", "3"], "not both"),
        (["--ray", "--min-replicas", "2"], "--min-replicas needs --max-replicas"),
        (["--ray", "--min-replicas", "3", "--max-replicas", "2"], "more than --max-replicas"),
        (["--ray", "--target-ongoing-requests", "4"], "only with --min-replicas/--max-replicas"),
        (["--ray", "--ray-address", "10.0.0.1:6379", "--print-config"], "starts nothing"),
        (["--ray", "--replicas", "0"], "--replicas"),
        (["--ray", "--num-cpus", "-1"], "--num-cpus"),
        (["--ray", "--num-gpus", "nan"], "--num-gpus"),  # click's FloatRange lets NaN through
        (["--graceful-timeout", "nan"], "--graceful-timeout"),  # uvicorn fails with a traceback once it serves
        (["--graceful-timeout", "-1"], "--graceful-timeout"),
        (["--prompt-cache-mb", "inf"], "--prompt-cache-mb"),
        (["--stream-interval", "nan"], "--stream-interval"),
        (["--stream-interval", "1.5"], "--stream-interval"),
    ],
)
def test_ray_options_are_checked_together(args, message, monkeypatch, capsys):
    code, out, err = run_cli(["serve", *args], monkeypatch, capsys)
    assert code == 2 and message in err and "Traceback" not in err, err
    assert out == ""


def test_deployment_options_refuse_what_serve_would_not_run():
    for bad in ({"replicas": 2, "max_replicas": 3}, {"replicas": None}, {"replicas": None, "min_replicas": 3,
                "max_replicas": 2}, {"target_ongoing_requests": 2.0}, {"num_cpus": -1.0}):  # fmt: skip
        with pytest.raises(ConfigError):
            DeploymentOptions(**bad)


@pytest.mark.timeout(240)
def test_the_command_serves_on_a_local_cluster_and_stops_cleanly(reference, tmp_path):
    """`fastblt serve --ray` as a user runs it; stopped as ServerProcess stops anything (SIGTERM to its group)."""
    args = ["--ray", "--replicas", "1", "--max-batch", "2", "--threads", "1", "--log-level", "info",
            "--batch-dir", str(tmp_path)]  # fmt: skip
    with ServerProcess(args, ready_timeout=180) as srv:
        want = reference.generate("def main(", mode="blt-s", max_bytes=24, temperature=0.0).text
        c = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="-", max_retries=0, timeout=60)
        r = c.completions.with_raw_response.create(model=MODEL, prompt="def main(", max_tokens=24, temperature=0,
                                                   extra_headers={"x-request-id": "trace-ray-1"})  # fmt: skip
        assert r.parse().choices[0].text == want
        assert r.headers[REPLICA_HEADER].startswith("fastblt#FastBlt#")
        assert r.headers.get_list("x-request-id") == ["trace-ray-1"]  # Serve's proxy answers with it, once
        # the batch actor the command started on its node holds the directory
        f = c.files.create(file=("in.jsonl", b'{"custom_id": "a"}\n'), purpose="batch")
        assert (tmp_path / "files" / f"{f.id}.jsonl").exists() and (tmp_path / "batches.lock").exists()
        # the request log goes to the replica's log in Ray's session directory (Serve's logger)
        logs = Path(tempfile.gettempdir()) / "ray" / "session_latest" / "logs" / "serve"
        deadline = time.monotonic() + 20
        while not any("request_id=trace-ray-1 endpoint=completions status=200" in p.read_text()
                      for p in logs.glob("replica_fastblt_*.log")):  # fmt: skip
            assert time.monotonic() < deadline, [p.read_text()[-2000:] for p in logs.glob("replica_*.log")]
            time.sleep(0.2)
        deadline = time.monotonic() + 20  # /health answers a moment before the command says so
        while "replica(s) ready" not in srv.output() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "replica(s) ready" in srv.output()
        t0 = time.monotonic()
        assert srv.stop() == 0 and time.monotonic() - t0 < 30


# ---------------------------------------------------------------------------- a two-node cluster
@pytest.fixture(scope="module")
def ray_server(chat_template, tmp_path_factory):
    batch_dir = str(tmp_path_factory.mktemp("batches"))
    # "-": the key every test sends, the default project's; key-p: project p's (test_projects.py)
    options = ServerOptions(max_batch=4, threads=1, chat_template=str(chat_template), chat_stop=[CHAT_STOP],
                            batch_dir=batch_dir, api_key="-", projects=["p=key-p"])  # fmt: skip
    with RayServer(options, DeploymentOptions(replicas=2), nodes=2, cpus_per_node=1, ready_timeout=240) as srv:
        yield srv


def sessions(c: openai.OpenAI) -> list[dict[str, str]]:
    """A header each that routes a request to one replica and not the other (ray_route's sessions)."""
    keys: dict[str, str] = {}  # replica -> a session key that reaches it
    for key in (f"kept-{i}" for i in range(64)):
        r = c.completions.with_raw_response.create(model=MODEL, prompt="x", max_tokens=1,
                                                   extra_headers={SESSION_HEADER: key})  # fmt: skip
        keys.setdefault(r.headers[REPLICA_HEADER], key)
        if len(keys) == 2:
            break
    assert len(keys) == 2
    return [{SESSION_HEADER: key} for key in keys.values()]


async def complete(c: openai.AsyncOpenAI, prompt: str, mode: str, max_bytes: int, stream: bool) -> tuple[str, str]:
    """(text, replica) of one greedy completion, streamed or not."""
    kw = dict(model=MODEL, prompt=prompt, max_tokens=max_bytes, temperature=0, extra_body={"mode": mode})
    r = await c.completions.with_raw_response.create(stream=stream, **kw)
    if not stream:
        return r.parse().choices[0].text, r.headers[REPLICA_HEADER]
    chunks = [ch async for ch in r.parse()]
    assert chunks[-1].choices[0].finish_reason is not None  # a stream that ends, ends complete
    return "".join(ch.choices[0].text for ch in chunks), r.headers[REPLICA_HEADER]


def jobs(n: int, max_bytes: int, reference) -> list[tuple[str, str, bool, str]]:
    """n distinct (prompt, mode, stream, expected text): a wrong answer can only be someone else's."""
    out = []
    for i in range(n):
        prompt, mode = f"def job_{i}(x, y):\n    return", MODES[i % 4]
        want = reference.generate(prompt, mode=mode, max_bytes=max_bytes, temperature=0.0).text
        out.append((prompt, mode, i % 3 == 0, want))
    return out


def answer_as_generate(srv: RayServer, reference) -> None:
    """16 concurrent requests (4 a batch, 8 a replica at most) equal Generator's; both replicas answer."""
    todo = jobs(16, 48, reference)

    async def main():
        async with openai.AsyncOpenAI(base_url=f"{srv.url}/v1", api_key="-", max_retries=0, timeout=120) as c:
            return await asyncio.gather(*[complete(c, p, m, 48, s) for p, m, s, _ in todo])

    got = asyncio.run(main())
    assert [text for text, _ in got] == [want for *_, want in todo]
    assert len(srv.replicas()) == 2
    assert {replica for _, replica in got} == set(srv.replicas())  # both, by their Ray names


@pytest.mark.timeout(300)
def test_replicas_answer_as_generate_and_share_the_load(ray_server, reference):
    answer_as_generate(ray_server, reference)
    messages = [{"role": "user", "content": "def job(x, y):"}]  # each replica reads the chat template file
    prompt = ChatTemplate(CHAT_TEMPLATE).render(messages)
    want = reference.generate(prompt, mode="blt-s", max_bytes=24, temperature=0.0, stop=[CHAT_STOP]).text
    c = openai.OpenAI(base_url=f"{ray_server.url}/v1", api_key="-", max_retries=0, timeout=120)
    r = c.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, temperature=0)
    assert r.choices[0].message.content == want and r.object == "chat.completion"
    kept = c.responses.create(model=MODEL, input=messages[0]["content"], max_output_tokens=24, temperature=0)
    assert kept.output_text == want and kept.store is True  # in the store every replica shares
    with pytest.raises(openai.BadRequestError, match="previous_response_id"):
        c.responses.create(model=MODEL, input="x", previous_response_id="resp_none")


@pytest.mark.timeout(300)
def test_each_replica_has_its_metrics(ray_server, reference):
    r = httpx.get(f"{ray_server.url}/metrics", timeout=30)
    assert r.status_code == 200 and r.headers[REPLICA_HEADER] in ray_server.replicas()
    assert re.search(r'^fastblt_requests_total\{endpoint="completions",mode="\S+",status="200"\} \d', r.text, re.M)
    ids = {name.rsplit("#", 1)[1] for name in ray_server.replicas()}  # Ray's `replica` label
    ports = [(n["NodeManagerAddress"], n["MetricsExportPort"]) for n in ray.nodes() if n["Alive"]]
    seen: set[str] = set()
    deadline = time.monotonic() + 90  # a replica mirrors every 5 s, Ray exports every 10 s
    while not ids <= seen and time.monotonic() < deadline:
        for host, port in ports:
            text = httpx.get(f"http://{host}:{port}/metrics", timeout=10).text
            seen |= set(re.findall(r'^ray_fastblt_batch_rows\{[^}]*\breplica="(\w+)"', text, re.M))
        time.sleep(2)
    assert ids <= seen, f"replicas {ids - seen} not in Ray's metrics"


@pytest.mark.timeout(300)
def test_a_sessions_requests_go_to_one_replica_whose_snapshots_its_next_turn_loads(ray_server):
    """x-session-id: every request of a session goes to one replica, sessions spread over
    both (rendezvous hashing on Ray's replica ids), so a conversation's second turn loads the
    snapshot its first kept there (cached_tokens); requests without it still reach both (the
    load test above)."""
    c = openai.OpenAI(base_url=f"{ray_server.url}/v1", api_key="-", max_retries=0, timeout=120)
    where: dict[str, set[str]] = {}
    for key in [f"session-{i}" for i in range(16)]:
        for _ in range(2):
            r = c.completions.with_raw_response.create(model=MODEL, prompt="x = ", max_tokens=2, temperature=0,
                                                       extra_headers={SESSION_HEADER: key})  # fmt: skip
            where.setdefault(key, set()).add(r.headers[REPLICA_HEADER])
    assert all(len(replicas) == 1 for replicas in where.values()), where
    assert set().union(*where.values()) == set(ray_server.replicas())
    session = {SESSION_HEADER: "conversation"}
    messages = [{"role": "user", "content": "def total(rows):\n" + "    s = s + rows[0] * rows[1]\n" * 24}]
    first = c.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0,
                                      extra_headers=session)  # fmt: skip
    messages += [first.choices[0].message.model_dump(exclude_none=True), {"role": "user", "content": "and then"}]
    second = c.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, temperature=0,
                                       extra_headers=session)  # fmt: skip
    assert second.usage.prompt_tokens_details.cached_tokens > 256


def test_responses_and_conversations_are_kept_for_every_replica(ray_server):
    """Replicas keep what clients come back for in one actor: a chain of previous_response_id and a
    conversation go on whichever replica each turn reaches (sessions pin turns to one or the
    other here), and so do background responses."""
    c = openai.OpenAI(base_url=f"{ray_server.url}/v1", api_key="-", max_retries=0, timeout=120)
    on = sessions(c)
    answered, previous = set(), None
    for turn in range(4):
        r = c.responses.with_raw_response.create(model=MODEL, input=f"turn {turn}", max_output_tokens=4,
                                                 previous_response_id=previous, extra_headers=on[turn % 2])  # fmt: skip
        answered.add(r.headers[REPLICA_HEADER])
        previous = r.parse().id
    assert len(answered) == 2  # each turn continued the one the other replica answered
    items = c.responses.input_items.list(previous, extra_headers=on[0])
    assert [i.content[0].text for i in items.data] == ["turn 3"]
    conv = c.conversations.create(items=[{"role": "user", "content": "import os"}], extra_headers=on[0])
    r = c.responses.create(model=MODEL, conversation=conv.id, input="def main(", max_output_tokens=4,
                           extra_headers=on[1])  # fmt: skip
    listed = c.conversations.items.list(conv.id, order="asc", extra_headers=on[0]).data
    assert [i.type for i in listed] == ["message"] * 3 and listed[2].content[0].text == r.output_text
    text = httpx.get(f"{ray_server.url}/metrics", headers=on[1]).text
    assert float(re.search(r'^fastblt_kept_bytes\{store="responses"\} (\S+)$', text, re.M).group(1)) > 0
    # stored chat completions: kept by one, listed (the store actor scans its table), relabelled
    # and deleted through the other
    chat = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "import os"}], max_tokens=4,
                                     store=True, metadata={"on": "ray"}, extra_headers=on[0])  # fmt: skip
    assert [x.id for x in c.chat.completions.list(metadata={"on": "ray"}, extra_headers=on[1])] == [chat.id]
    assert c.chat.completions.update(chat.id, metadata={"on": "b"}, extra_headers=on[1]).metadata == {"on": "b"}
    assert c.chat.completions.delete(chat.id, extra_headers=on[0]).deleted
    assert [x.id for x in c.chat.completions.list(metadata={"on": "b"}, extra_headers=on[1])] == []
    # a project's, listed through the other replica for that project only (the actor scans its keys)
    mine = c.with_options(api_key="key-p").chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "import os"}], max_tokens=4, store=True,
        metadata={"on": "p"}, extra_headers=on[0])  # fmt: skip
    listed = c.with_options(api_key="key-p").chat.completions.list(metadata={"on": "p"}, extra_headers=on[1])
    assert [x.id for x in listed] == [mine.id]
    assert [x.id for x in c.chat.completions.list(metadata={"on": "p"}, extra_headers=on[1])] == []
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.retrieve(mine.id, extra_headers=on[1])
    background_responses_are_read_and_cancelled_through_any_replica(c, on, ray_server.url)


def background_responses_are_read_and_cancelled_through_any_replica(c: openai.OpenAI, on: list[dict], url: str
                                                                     ) -> None:  # fmt: skip
    """A background response runs on the replica asked for it; the other polls it, streams its
    events (published to the store actor) from any event on, and cancels it."""
    ask = dict(model=MODEL, input="def main(", max_output_tokens=24, temperature=0, background=True)
    polled = c.responses.create(**ask, extra_headers=on[0])
    deadline = time.monotonic() + 60
    while (got := c.responses.retrieve(polled.id, extra_headers=on[1])).status in ("queued", "in_progress"):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert got.status == "incomplete" and got.output_text  # (max_output_tokens)
    with c.responses.create(**ask, stream=True, extra_headers=on[0]) as stream:
        own = [e.model_dump() for e in stream]
    rid = own[0]["response"]["id"]
    with c.responses.retrieve(rid, stream=True, starting_after=2, extra_headers=on[1]) as stream:
        assert [e.model_dump() for e in stream] == own[3:]
    assert own[-1]["response"]["output"][0]["content"][0]["text"] == got.output_text
    long = c.responses.create(**ask | {"max_output_tokens": 16000}, extra_headers=on[0])
    assert c.responses.cancel(long.id, extra_headers=on[1]).status == "cancelled"
    deadline = time.monotonic() + 30  # the replica that runs it takes the cancel and frees its rows
    while not re.search(r"^fastblt_background_responses 0\.0$", httpx.get(f"{url}/metrics", headers=on[0]).text, re.M):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert c.responses.retrieve(long.id, extra_headers=on[0]).status == "cancelled"


@pytest.mark.timeout(240)
def test_batches_run_in_one_actor_for_every_replica(ray_server, reference):
    """The Batch API on Ray: a file uploaded through one replica, a batch created through the
    other, run by the batch actor through the deployment, polled and read through either; its
    answers are Generator's, and errors come back as the replicas' own 4xx."""
    c = openai.OpenAI(base_url=f"{ray_server.url}/v1", api_key="-", max_retries=0, timeout=120)
    on = sessions(c)
    lines = [{"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions",
              "body": {"model": MODEL, "prompt": f"def job_{i}(x):", "max_tokens": 48, "temperature": 0}}
             for i in range(24)]  # fmt: skip
    data = "".join(json.dumps(x) + "\n" for x in lines).encode()
    f = c.files.create(file=("in.jsonl", data), purpose="batch", extra_headers=on[0])
    assert c.files.content(f.id, extra_headers=on[1]).content == data
    bid = c.batches.create(input_file_id=f.id, endpoint="/v1/completions", completion_window="24h",
                           extra_headers=on[1]).id  # fmt: skip
    deadline, polls = time.monotonic() + 180, 0
    while (b := c.batches.retrieve(bid, extra_headers=on[polls % 2])).request_counts.completed < 2:
        assert time.monotonic() < deadline and b.status in ("validating", "in_progress"), b
        polls += 1
        time.sleep(0.1)
    assert b.status == "in_progress" and b.request_counts.completed < 24, b
    ray.kill(ray.get_actor(ray_batches.BATCH_ACTOR, namespace=ray_batches.BATCH_NAMESPACE), no_restart=False)
    # the actor Ray starts again resumes the batch from the directory by itself: no request asks it to
    saved = Path(ray_server.server.batch_dir) / "batches" / f"{bid}.json"
    while json.loads(saved.read_text())["status"] != "completed":
        assert time.monotonic() < deadline
        time.sleep(0.2)
    while (b := poll(c, bid, on[1])) is None:  # (the replica may not see the new actor for a moment)
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert b.status == "completed" and b.request_counts.completed == 24, b  # resumed where it stopped
    out = [json.loads(x) for x in c.files.content(b.output_file_id, extra_headers=on[0]).text.splitlines()]
    got = {x["custom_id"]: x["response"]["body"]["choices"][0]["text"] for x in out}
    assert len(out) == len(got) == 24  # each answered once
    for x in lines:
        assert got[x["custom_id"]] == reference.generate(x["body"]["prompt"], mode="blt-s", max_bytes=48,
                                                         temperature=0.0).text  # fmt: skip
    assert [x.id for x in c.batches.list(extra_headers=on[1])] == [bid]
    with pytest.raises(openai.NotFoundError, match="no such batch"):
        c.batches.retrieve("batch_none", extra_headers=on[0])
    with pytest.raises(openai.ConflictError, match="only a running batch"):
        c.batches.cancel(b.id, extra_headers=on[1])
    with pytest.raises(openai.BadRequestError) as e:
        c.batches.create(input_file_id="file-none", endpoint="/v1/completions", completion_window="24h")
    assert e.value.body["param"] == "input_file_id"
    # a batch cancelled through the other replica than made it: stopped in the actor, what it answered kept
    again = c.batches.create(input_file_id=f.id, endpoint="/v1/completions", completion_window="24h",
                             extra_headers=on[0]).id  # fmt: skip
    assert c.batches.cancel(again, extra_headers=on[1]).status == "cancelling"
    while (b := c.batches.retrieve(again, extra_headers=on[0])).status == "cancelling":
        assert time.monotonic() < deadline, b
        time.sleep(0.1)
    assert b.status == "cancelled" and b.request_counts.completed < 24, b
    assert c.files.delete(f.id, extra_headers=on[1]).deleted
    # a project's file and batch: its own through either replica, nobody else's; its requests its own
    p = c.with_options(api_key="key-p")
    small = [{"custom_id": "s", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 4,
                       "store": True, "metadata": {"batch": "p"}}}]  # fmt: skip
    pf = p.files.create(file=("p.jsonl", json.dumps(small[0]).encode() + b"\n"), purpose="batch", extra_headers=on[0])
    assert pf.id not in [x.id for x in c.files.list(extra_headers=on[1])]
    with pytest.raises(openai.NotFoundError):
        c.files.retrieve(pf.id, extra_headers=on[0])
    pb = p.batches.create(input_file_id=pf.id, endpoint="/v1/chat/completions", completion_window="24h",
                          extra_headers=on[1]).id  # fmt: skip
    while (b := p.batches.retrieve(pb, extra_headers=on[0])).status != "completed":
        assert time.monotonic() < deadline + 60 and b.status in ("validating", "in_progress"), b
        time.sleep(0.1)
    assert pb not in [x.id for x in c.batches.list(extra_headers=on[1])]
    assert len(p.chat.completions.list(metadata={"batch": "p"}, extra_headers=on[1]).data) == 1
    assert c.chat.completions.list(metadata={"batch": "p"}, extra_headers=on[0]).data == []
    # the actor's batch gauges reach Ray's metrics, as the replicas' do (mirrored every 5 s, exported every 10)
    ports = [(n["NodeManagerAddress"], n["MetricsExportPort"]) for n in ray.nodes() if n["Alive"]]
    completed, slots = 0.0, []  # (an export made before the batch ended reads 0)
    while completed < 1 or not slots:
        assert time.monotonic() < deadline + 60, "no completed batch in Ray's ray_fastblt_batches"
        for host, port in ports:
            text = httpx.get(f"http://{host}:{port}/metrics", timeout=10).text
            found = re.findall(r'^ray_fastblt_batches\{[^}]*status="completed"[^}]*\} (\S+)$', text, re.M)
            completed = max([completed, *map(float, found)])
            slots += map(float, re.findall(r"^ray_fastblt_batch_request_slots(?:\{[^}]*\})? (\S+)$", text, re.M))
        time.sleep(1)
    assert slots[-1] == 2 * ray_server.server.batch_concurrency  # the batches' requests in flight: 2 replicas'


def poll(c: openai.OpenAI, bid: str, headers: dict[str, str]):
    """The batch, or None while its actor is being started again (a 503 to send again)."""
    try:
        return c.batches.retrieve(bid, extra_headers=headers)
    except openai.InternalServerError as e:
        assert e.status_code == 503 and e.body["code"] == "batches_unavailable", e
        return None


@pytest.mark.timeout(120)
def test_a_store_actor_in_a_file_keeps_what_it_kept_when_ray_starts_it_again(ray_server, tmp_path):
    """Should the store actor's process die, Ray starts it again: in memory, empty; with a
    directory, with everything it kept (its SQLite file read again)."""
    for directory, survives in ((str(tmp_path), True), (None, False)):
        name = f"fastblt-kept-test-{survives}"
        actor = ray_kept.kept_actor(directory, here=True, name=name)
        table = ray_kept.RayKept(actor, "conversations", 1 << 20)
        assert table.put("conv_1", {"items": ["import os"]})
        assert table.update("conv_1", lambda v: v | {"items": [*v["items"], "def main("]}) is not None
        ray.get(actor.log_add.remote(1 << 20, "resp_marker", 0, [b"event"], False))  # events: in memory only
        ray.kill(actor, no_restart=False)
        deadline = time.monotonic() + 60
        while True:  # until a new process answers (the calls fail while there is none)
            with contextlib.suppress(ray.exceptions.RayActorError):
                if ray.get(actor.log_read.remote(1 << 20, "resp_marker", -1)) is None:
                    break
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert table.get("conv_1") == ({"items": ["import os", "def main("]} if survives else None)
        ray.kill(actor, no_restart=True)


@pytest.mark.timeout(420)
def test_a_killed_replica_fails_only_its_requests_cleanly_and_comes_back(ray_server, reference):
    todo = jobs(24, 160, reference)
    done: list[float] = []

    async def one(c, prompt, mode, stream):
        t0 = time.monotonic()
        try:
            return await complete(c, prompt, mode, 160, stream)
        except (openai.InternalServerError, openai.APIConnectionError) as e:  # 5xx, or the connection cut
            return e, time.monotonic() - t0
        finally:
            done.append(time.monotonic())

    async def main():
        async with openai.AsyncOpenAI(base_url=f"{ray_server.url}/v1", api_key="-", max_retries=0, timeout=120) as c:
            tasks = [asyncio.ensure_future(one(c, p, m, s)) for p, m, s, _ in todo]
            while len(done) < 4:  # under load: both replicas hold requests now
                await asyncio.sleep(0.02)
            victim = ray_server.replicas()[0]
            ray.kill(ray_serve.replica_actor(victim), no_restart=True)
            return victim, await asyncio.gather(*tasks)

    victim, got = asyncio.run(main())
    failed = [r for r in got if isinstance(r[0], Exception)]
    for (text, replica), (*_, want) in zip(got, todo, strict=True):
        if not isinstance(text, Exception):
            assert text == want, f"{replica} answered with other bytes"
    assert 1 <= len(failed) <= 2 * 4, failed  # at most what the victim held: max_ongoing_requests = 2 * max_batch
    assert not any(isinstance(e, openai.APITimeoutError) or seconds > 60 for e, seconds in failed), failed
    assert any(replica != victim for text, replica in got if not isinstance(text, Exception))

    deadline = time.monotonic() + 120  # Serve starts a replacement
    while not (back := replaced(victim)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert back, (ray_serve.status(), ray_server.replicas())
    answer_as_generate(ray_server, reference)


def replaced(victim: str) -> bool:
    """Two replicas run again, and the victim is not one of them."""
    st, names = ray_serve.status(), ray_serve.replicas()
    return st["status"] == "RUNNING" and st["replicas"].get("RUNNING") == 2 and len(names) == 2 and victim not in names
