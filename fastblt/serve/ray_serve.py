"""`fastblt serve --ray`: the same server as replicas of a Ray Serve deployment.

Each replica builds one AsyncEngine (loaded once, when the replica starts; the export cache on disk
is shared where the nodes share a filesystem) and serves `create_app`'s FastAPI app unchanged
through `@serve.ingress`: every endpoint, error and stream is `fastblt serve`'s. Ray Serve's HTTP
proxy routes each request to a replica; `x-fastblt-replica` names the one that answered
("app#deployment#id", Ray's full replica id less its prefix), and `/metrics` answers with that
replica's registry. Each replica also copies its registry into Ray's metrics every few seconds, so
Ray's per-node Prometheus endpoint has every replica's series (`ray_fastblt_*{replica=...}`).

    ServerOptions      what each replica runs (a Serve config's `args`)
    DeploymentOptions  how many replicas, what each reserves (the config's deployment entry)
    build(args)        the config's import_path, fastblt.serve.ray_serve:build
    serve_config(...)  the config `fastblt serve --ray --print-config` writes
    connect / deploy / wait_ready / undeploy   what `fastblt serve --ray` does, in order
    RayServer          a local cluster with the app deployed on 127.0.0.1, for tests and benchmarks

Docs: docs/scale-out.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import math
import os
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families
from ray import serve
from ray.serve.metrics import Gauge

from fastblt.errors import ConfigError, FastBltError
from fastblt.runtime.async_engine import AsyncEngine
from fastblt.runtime.prompt_cache import DEFAULT_MB
from fastblt.serve.app import (
    REPLAY_SHARE,
    SERVE_EXTRA_IDS,
    ServeSettings,
    call_app,
    create_app,
    origin_error,
    project_keys,
)
from fastblt.serve.batches import add_batch_routes
from fastblt.serve.chat import ChatTemplate
from fastblt.serve.process import free_port, probe_context
from fastblt.serve.ray_batches import Admission, RayBatches, batch_actor, set_gauges, stop_batch_actor
from fastblt.serve.ray_kept import RayKept, RayRelay, kept_actor, stop_kept_actor
from fastblt.serve.ray_route import ROUTER_PATH
from fastblt.serve.tools import CallTags

APP = "fastblt"
DEPLOYMENT = "FastBlt"
IMPORT_PATH = "fastblt.serve.ray_serve:build"
ACTOR_PREFIX = "SERVE_REPLICA::"  # a replica's actor is named this + its full id, in namespace "serve"
LOOPBACK = "127.0.0.1"
MIRROR_EVERY_S = 5.0  # how often a replica copies its registry into Ray's metrics (Ray exports every 10 s)
# Serve notices a dead replica at its next health check (Ray's default: every 10 s) and only then
# starts another; a check is one small RPC.
HEALTH_CHECK_S = 2.0

log = logging.getLogger("ray.serve")
# the request log (request_log.py) under Serve's logger: a replica's log files and console, with
# the request id Serve keeps in each record
REQUEST_LOGGER = "ray.serve.fastblt.requests"


@dataclass(frozen=True)
class ServerOptions:
    """What each replica serves: `fastblt serve`'s options for one engine and its app."""

    checkpoint: str = "default"  # "default" or a directory at the same path on every node
    backend: str = "ort"
    artifacts: str | None = None
    max_batch: int = 16
    lanes: int | None = None  # batch loops per replica (None: AsyncEngine's default for the CPUs it reserves)
    lane_processes: bool | None = None  # lanes in worker processes (None: AsyncEngine's default)
    max_queue: int = 256  # requests waiting in each proxy's router for a replica (then 429)
    max_context: int | None = None  # bytes (prompt + max_tokens) per request
    threads: int | None = None
    prompt_cache_mb: float = DEFAULT_MB  # per lane
    share_prompts: bool = True  # a replica's worker lanes load each other's prompt snapshots
    device: str | None = None
    mode: str = "blt-s"
    model_name: str = "fastblt-default"
    api_key: str | list[str] | None = None  # a key, or several accepted alike (while keys are rotated)
    projects: list[str] = dataclasses.field(default_factory=list)  # "NAME=KEY": `fastblt serve --project`
    max_body: int = 1 << 20
    retry_after: int = 1  # seconds, in a 429's Retry-After
    chat_template: str | None = None  # a chat template file at the same path on every node (chat.py)
    chat_stop: list[str] = dataclasses.field(default_factory=list)  # strings that end an assistant's turn
    tool_call_start: str | None = None  # the text that starts a tool call in the template's format (tools.py)
    tool_call_end: str = ""  # ... and ends it
    log_format: str = "text"  # "json": the request log's fields as attributes Serve's JSON logs write out
    allowed_origins: list[str] = dataclasses.field(default_factory=list)  # CORS: origins whose pages may call
    response_store_mb: int = 64  # kept responses, and as much of conversations, in one actor for all replicas
    # ... in the SQLite file of this directory (on the store actor's node: docs/scale-out.md), not its memory
    response_store_dir: str | None = None
    # seconds a stopping replica (scaled down, redeployed) lets its background responses finish,
    # after Serve drained its requests and within the deployment's graceful timeout
    background_grace_s: float = 30.0
    # OpenAI's Batch API over this directory (on the batch actor's node: docs/scale-out.md)
    batch_dir: str | None = None
    stream_interval_s: float = 0.0  # seconds between a stream's events (`fastblt serve --stream-interval`)

    @property
    def batch_concurrency(self) -> int:
        """Batch requests the batch actor keeps in flight: what one idle server sends (three
        quarters of a batch; the actor does not see the replicas' live load)."""
        return max(1, self.max_batch - self.max_batch // 4)

    @property
    def api_keys(self) -> tuple[str, ...]:
        return (self.api_key,) if isinstance(self.api_key, str) else tuple(self.api_key or ())

    def __post_init__(self) -> None:
        keys = [self.api_key] if isinstance(self.api_key, str) else self.api_key or []
        if not isinstance(keys, list) or not all(isinstance(k, str) and k and k == k.strip() for k in keys):
            raise ConfigError("api_key: expected a key, or a list of keys (non-empty, no spaces at their ends)")
        if not isinstance(self.projects, list) or not all(isinstance(p, str) for p in self.projects):
            raise ConfigError("projects: expected a list of NAME=KEY strings")
        try:
            project_keys(self.projects, keys)
        except ValueError as e:
            raise ConfigError(f"projects: {e}") from None
        if not isinstance(self.allowed_origins, list) or not all(isinstance(o, str) for o in self.allowed_origins):
            raise ConfigError(f"allowed_origins: expected a list of origins, got {self.allowed_origins!r:.80}")
        if why := next(filter(None, map(origin_error, self.allowed_origins)), None):
            raise ConfigError(f"allowed_origins: {why}")
        if self.log_format not in ("text", "json"):
            raise ConfigError(f"log_format: expected 'text' or 'json', got {self.log_format!r}")
        if isinstance(self.response_store_mb, bool) or not isinstance(self.response_store_mb, int) or (
                self.response_store_mb < 0):  # fmt: skip
            raise ConfigError(f"response_store_mb: expected an integer >= 0, got {self.response_store_mb!r:.40}")
        if self.response_store_dir is not None and not (
                isinstance(self.response_store_dir, str) and Path(self.response_store_dir).is_absolute()):  # fmt: skip
            raise ConfigError(f"response_store_dir: expected an absolute path, got {self.response_store_dir!r:.80}")
        grace = self.background_grace_s
        if isinstance(grace, bool) or not isinstance(grace, int | float) or not 0 <= grace < math.inf:
            raise ConfigError(f"background_grace_s: expected seconds >= 0, got {grace!r:.40}")
        if self.batch_dir is not None and not (isinstance(self.batch_dir, str) and Path(self.batch_dir).is_absolute()):
            raise ConfigError(f"batch_dir: expected an absolute path, got {self.batch_dir!r:.80}")
        if self.response_store_dir is not None and not self.response_store_mb:
            raise ConfigError("response_store_dir with response_store_mb 0: nothing would be kept there")
        every = self.stream_interval_s
        if isinstance(every, bool) or not isinstance(every, int | float) or not 0 <= every <= 1:
            raise ConfigError(f"stream_interval_s: expected seconds from 0 to 1, got {every!r:.40}")

    @classmethod
    def from_args(cls, args: dict[str, Any] | None) -> ServerOptions:
        """From a Serve config's `args` (an unknown key is a ConfigError naming it)."""
        args = dict(args or {})
        known = {f.name for f in dataclasses.fields(cls)}
        if unknown := sorted(set(args) - known):
            expected = ", ".join(sorted(known))
            raise ConfigError(f"args: unknown option(s) {', '.join(unknown)}; expected some of {expected}")
        return cls(**args)

    def to_args(self) -> dict[str, Any]:
        """The options that differ from the defaults, as a Serve config's `args`."""
        default = ServerOptions()
        return {k: v for k, v in dataclasses.asdict(self).items() if v != getattr(default, k)}


@dataclass(frozen=True)
class DeploymentOptions:
    """How many replicas there are and what each reserves on its node.

    A fixed count (`replicas`), or autoscaling between `min_replicas` and `max_replicas` on the
    requests each replica holds (`target_ongoing_requests`; default: one full batch).
    """

    replicas: int | None = 1
    min_replicas: int | None = None
    max_replicas: int | None = None
    target_ongoing_requests: float | None = None
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    graceful_timeout: float = 60.0  # seconds a stopping replica lets its requests finish

    def __post_init__(self) -> None:
        lo, hi = self.min_replicas, self.max_replicas
        if self.replicas is not None and (lo is not None or hi is not None):
            raise ConfigError("replicas: give a fixed count or min/max replicas (autoscaling), not both")
        if self.replicas is None and hi is None:
            raise ConfigError("max_replicas: autoscaling needs an upper bound")
        if self.replicas is not None and self.replicas < 1:
            raise ConfigError(f"replicas: expected >= 1, got {self.replicas}")
        if hi is not None and not (hi >= 1 and 0 <= (lo or 0) <= hi):
            raise ConfigError(f"min_replicas, max_replicas: expected 0 <= min <= max and max >= 1, got {lo}, {hi}")
        if self.target_ongoing_requests is not None and self.replicas is not None:
            raise ConfigError("target_ongoing_requests: applies only to autoscaling (min/max replicas)")
        if self.target_ongoing_requests is not None and self.target_ongoing_requests <= 0:
            raise ConfigError(f"target_ongoing_requests: expected > 0, got {self.target_ongoing_requests}")
        if self.num_cpus < 0 or self.num_gpus < 0:
            raise ConfigError(f"num_cpus, num_gpus: expected >= 0, got {self.num_cpus}, {self.num_gpus}")

    @property
    def initial_replicas(self) -> int:
        """Replicas running once the deployment is up."""
        return self.replicas if self.replicas is not None else (1 if self.min_replicas is None else self.min_replicas)

    @property
    def most_replicas(self) -> int:
        return self.replicas if self.replicas is not None else self.max_replicas

    def entry(self, server: ServerOptions) -> dict[str, Any]:
        """The deployment's entry in a Serve config (less `name`, its `.options()` here)."""
        entry: dict[str, Any] = {"name": DEPLOYMENT}
        if self.replicas is None:
            entry["autoscaling_config"] = {
                "min_replicas": 1 if self.min_replicas is None else self.min_replicas,
                "max_replicas": self.max_replicas,
                "target_ongoing_requests": self.target_ongoing_requests or server.max_batch,
            }
        else:
            entry["num_replicas"] = self.replicas
        # A replica holds one batch decoding and one waiting, so a freed row refills without a trip
        # through the router; the rest wait in the router of the proxy they came to (max_queue,
        # then 429), which hands each to the first replica with room, on any node.
        entry["max_ongoing_requests"] = 2 * server.max_batch
        entry["max_queued_requests"] = server.max_queue
        entry["backpressure_config"] = {"status_code": 429, "retry_after_s": server.retry_after}
        entry["graceful_shutdown_timeout_s"] = self.graceful_timeout
        entry["health_check_period_s"] = HEALTH_CHECK_S
        entry["ray_actor_options"] = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}
        # a conversation's turns to the replica that keeps its prompt snapshots (ray_route.py)
        entry["request_router_config"] = {"request_router_class": ROUTER_PATH}
        return entry


# ---------------------------------------------------------------------------- the replica
def replica_name(replica_id: Any) -> str:
    """'app#deployment#id' of a Serve ReplicaID; its actor is named ACTOR_PREFIX + this."""
    return replica_id.to_full_id_str().removeprefix(ACTOR_PREFIX)


@serve.deployment(name=DEPLOYMENT)
@serve.ingress()
class FastBltReplica:
    """One replica: one AsyncEngine behind `create_app`'s app, named by its Serve replica id."""

    def __init__(self, options: ServerOptions):
        self.options = options
        self.name = replica_name(serve.get_replica_context().replica_id)

    async def __serve_build_asgi_app__(self) -> FastAPI:
        o, t0 = self.options, time.perf_counter()
        # Loaded here rather than in the app's lifespan: an error here reaches the deployment's
        # status with its message (a failed lifespan is only "ASGI lifespan startup failed").
        cores = replica_cores(ray.get_runtime_context().get_assigned_resources().get("CPU", 0.0))
        engine = await asyncio.to_thread(
            AsyncEngine, o.checkpoint, o.backend, max_batch=o.max_batch, lanes=o.lanes, processes=o.lane_processes,
            cores=cores, max_queue=o.max_queue,
            max_context=None if o.max_context is None else o.max_context + SERVE_EXTRA_IDS,  # BOS, dropped byte
            artifacts=o.artifacts, threads=o.threads, device=o.device, prompt_cache_mb=o.prompt_cache_mb,
            share_prompts=o.share_prompts,
        )  # fmt: skip
        log.info("fastblt replica %s: engine loaded in %.1f s", self.name, time.perf_counter() - t0)
        tags = None if o.tool_call_start is None else CallTags(o.tool_call_start, o.tool_call_end)
        template = None if o.chat_template is None else ChatTemplate.load(o.chat_template, tuple(o.chat_stop), tags)
        # what clients come back for, in one actor: their next turn may reach any replica
        actor = kept_actor(o.response_store_dir) if o.response_store_mb else None
        settings = ServeSettings(model_id=o.model_name, default_mode=o.mode, api_keys=o.api_keys,
                                 projects=project_keys(o.projects), max_body=o.max_body,
                                 retry_after=o.retry_after, replica=self.name, chat_template=template,
                                 echo_request_id=False, request_logger=REQUEST_LOGGER,
                                 log_format=o.log_format, allowed_origins=tuple(o.allowed_origins),
                                 response_store=o.response_store_mb << 20,
                                 kept=None if actor is None else functools.partial(RayKept, actor),
                                 relay=None if actor is None else RayRelay(actor, (o.response_store_mb << 20)
                                                                           // REPLAY_SHARE),
                                 background_grace=o.background_grace_s,
                                 stream_interval=o.stream_interval_s)  # fmt: skip
        app = create_app(lambda: engine, settings)  # built by a factory, the app closes it at shutdown
        if o.batch_dir is not None:  # the Batch API's work in one actor: a batch outlives any replica
            add_batch_routes(app, RayBatches(batch_actor(o.batch_dir, o.batch_concurrency, APP, DEPLOYMENT)))
        self._app = app  # (`app` is Serve ingress's own property)
        # the batch actor's requests, let go as one server lets its batches' go (its trickle: an eighth)
        self._batch_rows = Admission(o.batch_concurrency, max(1, o.max_batch // 8))
        self._mirror = asyncio.get_running_loop().create_task(mirror_metrics(app))
        return app

    async def answer_batch_request(self, method: str, path: str, body: bytes,
                                   project: str | None = None) -> tuple[int, dict[str, str], bytes]:  # fmt: skip
        """A request of a batch (the batch actor's: ray_batches.py), answered by this replica's app as
        a client's with the server's key, as its batch's `project`'s: (status, headers, body)."""
        if (busy := self._batch_rows.held_back(self._app.state.ready())) is not None:
            return busy
        keys = self.options.api_keys
        try:
            return await call_app(self._app, method, path, body,
                                  {"authorization": f"Bearer {keys[0]}"} if keys else None, project)  # fmt: skip
        finally:
            self._batch_rows.done()


def replica_cores(cpus: float) -> int:
    """The cores a replica sizes its lanes and threads by: the CPUs Ray assigned it (at least one),
    not the node's, which it shares with other replicas (Ray reserves CPUs but pins none)."""
    return max(1, int(cpus))


async def mirror_metrics(app: FastAPI, every: float = MIRROR_EVERY_S) -> None:
    """Copy the app's /metrics into Ray's metrics (as gauges tagged with this replica) forever."""
    gauges: dict[str, Gauge] = {}
    while True:
        await asyncio.sleep(every)
        try:
            text = (await call_app(app, "GET", "/metrics"))[2].decode()
            set_gauges(text_string_to_metric_families(text), gauges, Gauge)
        except Exception as e:  # an export problem must never stop the replica serving
            log.warning("fastblt replica: metrics not mirrored to Ray: %r", e)


# ---------------------------------------------------------------------------- deploying
def deployment(server: ServerOptions, deploy: DeploymentOptions | None = None) -> serve.Application:
    """The bound application: `server` on every replica, scaled as `deploy` says."""
    entry = (deploy or DeploymentOptions()).entry(server)
    del entry["name"]
    return FastBltReplica.options(**entry).bind(server)


def build(args: dict[str, Any]) -> serve.Application:
    """The Serve config's application builder (import_path fastblt.serve.ray_serve:build).

    `args` are ServerOptions' fields; the config's `deployments` entry sets replicas and resources.
    """
    return deployment(ServerOptions.from_args(args))


def _encoding(server: ServerOptions) -> dict[str, str]:
    """Serve's logging_config for the replicas' log lines: JSON with log_format json."""
    return {"encoding": "JSON"} if server.log_format == "json" else {}


def serve_config(server: ServerOptions, deploy: DeploymentOptions, host: str = LOOPBACK, port: int = 8000,
                 proxy_location: str = "EveryNode", tls: dict[str, str] | None = None) -> dict[str, Any]:  # fmt: skip
    """The Serve config (`serve deploy FILE`) that deploys what `fastblt serve --ray` would.

    The API key and a TLS key's password are not written (a config file tends to be shared); give
    them (the builder's `api_key` arg, http_options' `ssl_keyfile_password`) in a copy you keep to
    yourself.
    """
    args = {k: v for k, v in server.to_args().items() if k not in ("api_key", "projects")}
    app = {"name": APP, "route_prefix": "/", "import_path": IMPORT_PATH, "args": args,
           "deployments": [deploy.entry(server)]}  # fmt: skip
    if encoding := _encoding(server):
        app["logging_config"] = encoding
    http = {"host": host, "port": port} | {k: v for k, v in (tls or {}).items() if k != "ssl_keyfile_password"}
    return {"proxy_location": proxy_location, "http_options": http, "applications": [app]}


@contextlib.contextmanager
def loopback_driver() -> Iterator[None]:
    """Let `ray.init(address="127.0.0.1:port")` reach a cluster that listens on loopback only.

    ray.init replaces a loopback address by the machine's IP, where such a cluster does not
    listen, unless Ray's multi-machine mode is off (as RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 sets it
    when ray is imported); it is off only while this driver connects.
    """
    from ray._private import ray_constants

    if not hasattr(ray_constants, "ENABLE_RAY_CLUSTER"):  # else ray.init would wait for the cluster forever
        raise FastBltError(f"ray {ray.__version__}: no way to keep a local cluster on 127.0.0.1; use --ray-address")
    before = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = before


def connect(address: str | None = None, nodes: int = 1, cpus_per_node: float | None = None,
            gpus: int | None = None) -> Any:  # fmt: skip
    """Connect this process to the Ray cluster at `address`, or start a local one and connect.

    A local cluster listens on 127.0.0.1 only (no other machine can join it) and has `nodes`
    raylets of `cpus_per_node` logical CPUs each (default: this machine's CPUs); the head offers
    `gpus` GPUs (default: those torch sees), the others none. Returns the local cluster (give it
    to `undeploy`), or None for a cluster at `address`.
    """
    if address is not None:
        check_reachable(address)
        ray.init(address=address, log_to_driver=False)
        return None
    import torch
    from ray.cluster_utils import Cluster

    cpus = os.cpu_count() if cpus_per_node is None else cpus_per_node
    gpus = torch.cuda.device_count() if gpus is None else gpus
    node = {"num_cpus": cpus, "num_gpus": gpus, "node_ip_address": LOOPBACK, "include_dashboard": False}
    cluster = Cluster(initialize_head=True, head_node_args=node)
    try:
        for _ in range(nodes - 1):
            cluster.add_node(num_cpus=cpus, num_gpus=0, node_ip_address=LOOPBACK)
        with loopback_driver():
            ray.init(address=cluster.address, log_to_driver=False)
    except BaseException:
        cluster.shutdown()
        raise
    return cluster


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """A FastBltError unless something listens at a "host:port" address (ray.init would wait for
    an absent cluster for minutes); "auto", "ray://..." and other forms are left to Ray."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or "/" in host:
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        raise FastBltError(
            f"ray address {address}: nothing answers there ({e}); is `ray start --head` running?"
        ) from None


def deploy(server: ServerOptions, options: DeploymentOptions, host: str = LOOPBACK, port: int = 8000,
           proxy_location: str = "EveryNode", log_level: str = "INFO",
           tls: dict[str, str] | None = None) -> None:  # fmt: skip
    """Start Serve's proxies on host:port (HTTPS with `tls`: ssl_certfile, ssl_keyfile and
    ssl_keyfile_password, as uvicorn takes them) unless Serve already runs, and deploy, without
    waiting."""
    serve.start(http_options={"host": host, "port": port, **(tls or {})}, proxy_location=proxy_location)
    if server.response_store_mb:  # on this node, whose disk the command checked the directory on
        kept_actor(server.response_store_dir, here=True)
    if server.batch_dir is not None:  # the same
        batch_actor(server.batch_dir, server.batch_concurrency, APP, DEPLOYMENT, here=True)
    target = serve.RunTarget(deployment(server, options), name=APP, route_prefix="/",
                             logging_config={"log_level": log_level.upper()} | _encoding(server))  # fmt: skip
    serve.run_many([target], wait_for_applications_running=False)


def status() -> dict[str, Any]:
    """The app's Serve status: {"status": "RUNNING", "message": ..., "replicas": {"RUNNING": 2, ...}}."""
    app = serve.status().applications.get(APP)
    if app is None:
        return {"status": "NOT_DEPLOYED", "message": "", "replicas": {}}
    dep = app.deployments.get(DEPLOYMENT)
    replicas = {_value(k): v for k, v in dep.replica_states.items()} if dep is not None else {}
    message = (dep.message if dep is not None else "") or app.message  # the deployment's has the replica's error
    return {"status": _value(app.status), "message": message, "replicas": replicas}


def _value(e: Any) -> str:
    return str(getattr(e, "value", e))


def wait_ready(url: str, replicas: int, timeout: float, stop: threading.Event | None = None) -> float:
    """Wait until `replicas` replicas run and `url`/health answers 200 (or `stop` is set); the
    seconds it took.

    Raises FastBltError when the deployment fails (naming the replica's error), TimeoutError past
    `timeout`.
    """
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout and not (stop is not None and stop.is_set()):
        st = status()
        if st["status"] == "DEPLOY_FAILED":
            last = next((line for line in reversed(st["message"].splitlines()) if line.strip()), "no message")
            raise FastBltError(f"ray serve: deployment failed: {last.strip()}")  # a traceback's last line: the error
        # with no replica yet (autoscaling from 0), /health would wait for the first one to start
        if (
            st["status"] == "RUNNING"
            and st["replicas"].get("RUNNING", 0) >= replicas
            and (replicas == 0 or _healthy(url))
        ):
            return time.monotonic() - t0
        time.sleep(0.25)
    if stop is not None and stop.is_set():
        return time.monotonic() - t0
    raise TimeoutError(f"ray serve: not ready after {timeout:.0f} s: {status()}")


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2, context=probe_context(url)) as r:
            return r.status == 200
    except OSError:
        return False


def undeploy(cluster: Any = None) -> None:
    """Delete the app (letting requests in flight finish); with a local `cluster`, stop Serve,
    disconnect and stop its nodes. Safe after a failed start."""
    try:
        if ray.is_initialized():
            if cluster is None:
                serve.delete(APP)
                stop_kept_actor()
                stop_batch_actor()
            elif _still_alive(cluster):
                serve.shutdown()
    finally:
        ray.shutdown()
        if cluster is not None:
            cluster.shutdown()


def _still_alive(cluster: Any, within: float = 1.0) -> bool:
    """Whether a local cluster's head processes stay alive for `within` s: a signal sent to this
    process's group reaches them too, and then Serve cannot be shut down (it would wait 30 s)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if not cluster.head_node.remaining_processes_alive():
            return False
        time.sleep(0.1)
    return True


def replicas() -> list[str]:
    """The names (as x-fastblt-replica gives them) of the replica actors alive now."""
    prefix = f"{ACTOR_PREFIX}{APP}#{DEPLOYMENT}#"
    return sorted(a["name"].removeprefix(ACTOR_PREFIX) for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["namespace"] == "serve" and a["name"].startswith(prefix))  # fmt: skip


def replica_actor(name: str) -> ray.actor.ActorHandle:
    """The actor of the replica `x-fastblt-replica: name` came from (to inspect or kill it)."""
    return ray.get_actor(ACTOR_PREFIX + name, namespace="serve")


class RayServer:
    """A local Ray cluster with the app deployed behind 127.0.0.1:<free port>.

        with RayServer(ServerOptions(max_batch=16), DeploymentOptions(replicas=2), nodes=2) as srv:
            srv.url  # Ray Serve's proxy, on the head node; srv.replicas(), srv.startup_seconds

    Args:
        server: what each replica serves.
        deploy: replicas and what each reserves (default: one replica, one CPU).
        nodes: Ray nodes on this machine (raylets of their own; the first is the head).
        cpus_per_node: logical CPUs per node (default: enough for the most replicas, spread evenly).
            One CPU per replica and per node puts each replica on a node of its own.
        ready_timeout: seconds for every replica to run and /health to answer.
    """

    def __init__(self, server: ServerOptions | None = None, deploy: DeploymentOptions | None = None, nodes: int = 1,
                 cpus_per_node: float | None = None, ready_timeout: float = 300.0):  # fmt: skip
        self.server, self.deploy = server or ServerOptions(), deploy or DeploymentOptions()
        need = self.deploy.most_replicas * self.deploy.num_cpus
        self.nodes, self.cpus_per_node = nodes, cpus_per_node or max(1, math.ceil(need / nodes))
        self.ready_timeout = ready_timeout
        self.port = free_port()
        self.url = f"http://{LOOPBACK}:{self.port}"
        self.cluster: Any = None
        self.startup_seconds: float | None = None  # cluster start, deploy, every replica ready

    def start(self) -> RayServer:
        t0 = time.perf_counter()
        self.cluster = connect(None, self.nodes, self.cpus_per_node)
        try:
            deploy(self.server, self.deploy, LOOPBACK, self.port, proxy_location="HeadOnly", log_level="WARNING")
            wait_ready(self.url, self.deploy.initial_replicas, self.ready_timeout)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.perf_counter() - t0
        return self

    def replicas(self) -> list[str]:
        return replicas()

    def stop(self) -> None:
        """Stop Serve, disconnect and stop every node (safe twice, and after a failed start)."""
        if self.cluster is not None:
            cluster, self.cluster = self.cluster, None
            undeploy(cluster)

    def __enter__(self) -> RayServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
