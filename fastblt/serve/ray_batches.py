"""OpenAI's Batch API for every replica of `fastblt serve --ray --batch-dir DIR`.

A batch runs for hours and its files live in one directory, while Ray Serve sends each request to
any replica (and replicas come and go), so the Batch API's work is not a replica's: one Ray actor
(BATCH_ACTOR, detached, no CPU reserved, on the node of the command that started it, whose disk
holds DIR) keeps the files and batches and runs them (batches.Batches), and each replica's routes
pass a request's work to it (RayBatches; an upload's bytes and a file's content go through Ray's
object store). The actor sends each batch request to the deployment through a Serve handle, as
the proxies send a client's (any replica, the less loaded first), where it queues behind live
requests (priority 1) as it does on one server, and a replica admits the batch requests one
server would let go (Admission) and sends the others back, to be sent again a moment later; the
actor keeps as many in flight as the replicas running would take when idle. Its
batch gauges go to Ray's metrics (`ray_fastblt_batches`), as replicas mirror theirs. Should the
actor's process die, Ray starts it again, and it resumes the batches it was running from DIR at
once, as a restarted server does.
Docs: docs/scale-out.md.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import json
import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import RayActorError, RayTaskError
from ray.util.metrics import Gauge

from fastblt.serve.api import ApiError
from fastblt.serve.app import PROJECT
from fastblt.serve.batches import BatchCollector, Batches, admits, hold_batches
from fastblt.serve.ray_kept import NAMESPACE, one_actor, stop_actor

BATCH_ACTOR, BATCH_NAMESPACE = "fastblt-batches", NAMESPACE


class _Deployment:
    """The Serve deployment as an ASGI app (what batch_file.answer sends requests to): each request
    goes to a replica through a handle, answered there by its app as a client's; one that fails on
    the way (its replica died) is a 503, which the batch sends again a second later."""

    def __init__(self, app_name: str, deployment: str):
        self.app_name, self.deployment, self.handle = app_name, deployment, None

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        from ray import serve

        body = (await receive())["body"]  # (call_app gives the whole body at once)
        try:
            if self.handle is None:
                self.handle = serve.get_deployment_handle(self.deployment, app_name=self.app_name)
            answer = self.handle.answer_batch_request.remote(scope["method"], scope["path"], body, scope.get(PROJECT))
            status, headers, content = await answer
        except Exception as e:  # noqa: BLE001 (a replica that died under it: sent again, not a failed batch)
            error = {"message": f"batch request not answered: {type(e).__name__}", "type": "server_error",
                     "param": None, "code": "replica_unavailable"}  # fmt: skip
            status, headers = 503, {"retry-after": "1", "content-type": "application/json"}
            content = json.dumps({"error": error}).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]})  # fmt: skip
        await send({"type": "http.response.body", "body": content})


MIRROR_EVERY_S = 5.0  # how often the actor copies its batch gauges into Ray's metrics (as replicas do theirs)


def set_gauges(families: Iterable[Any], gauges: dict[str, Any], gauge: type = Gauge) -> None:
    """Set Ray gauges (of class `gauge`, made as needed, kept in `gauges` by name) to the samples
    of prometheus metric families: Ray exports them on each node's metrics endpoint, prefixed ray_
    (a replica's, of ray.serve.metrics.Gauge, tagged with the replica)."""
    for family in families:
        for sample in family.samples:
            if sample.name not in gauges:
                gauges[sample.name] = gauge(sample.name, family.documentation, tag_keys=tuple(sorted(sample.labels)))
            gauges[sample.name].set(sample.value, tags=dict(sample.labels))


HELD_BACK_S = 0.1  # a replica's Retry-After for a batch request it holds back


class Admission:
    """Which of the batch actor's requests a replica answers now: those one server would let go
    (batches.admits: none while any of its requests waits for a row, `trickle` in flight while
    live ones run, `concurrency` when idle); the others it sends back, a 429 the actor sends again
    after HELD_BACK_S (maybe to another replica)."""

    def __init__(self, concurrency: int, trickle: int):
        self.concurrency, self.trickle, self.inflight = concurrency, trickle, 0

    def held_back(self, engine: Any) -> tuple[int, dict[str, str], bytes] | None:
        """The 429 for a batch request now, or None: answer it (counted in flight until `done`)."""
        if admits(engine.held, engine.waiting, self.inflight, self.concurrency, self.trickle):
            self.inflight += 1
            return None
        error = {"message": "batch request held back: live requests come first", "type": "rate_limit_error",
                 "param": None, "code": "batch_held_back"}  # fmt: skip
        headers = {"retry-after": str(HELD_BACK_S), "content-type": "application/json"}
        return 429, headers, json.dumps({"error": error}).encode()

    def done(self) -> None:
        self.inflight -= 1


def running_replicas(app_name: str, deployment: str) -> int:
    """The deployment's replicas running now (Serve's controller says)."""
    from ray import serve

    app = serve.status().applications.get(app_name)
    dep = None if app is None else app.deployments.get(deployment)
    if dep is None:
        return 0
    return sum(n for state, n in dep.replica_states.items() if str(getattr(state, "value", state)) == "RUNNING")


class _BatchActor:
    """The Batches of `directory`, run on this actor's event loop; `call` runs one of its methods.
    Its batches keep `concurrency` requests (what one idle server sends) in flight per replica
    running, counted every MIRROR_EVERY_S: each replica admits its share as one server does."""

    def __init__(self, directory: str, concurrency: int, app_name: str, deployment: str,
                 replicas: Callable[[str, str], int] = running_replicas) -> None:  # fmt: skip
        hold_batches(Path(directory))  # the one that runs the batches there
        self.per_replica, self.replicas = concurrency, functools.partial(replicas, app_name, deployment)
        self.batches = Batches(Path(directory), _Deployment(app_name, deployment), concurrency, {})
        self.batches.scratch = None  # uploads come as bytes, from replicas on any node
        # resume what it ran before at once (Ray starts it again should its process die): an async
        # actor's constructor runs on its event loop; should it not, at the first call
        try:
            loop = asyncio.get_running_loop()
            self.opening: asyncio.Task | None = loop.create_task(self.batches.open())
            self.mirror = loop.create_task(self._mirror())
        except RuntimeError:
            self.opening = None

    async def _mirror(self) -> None:
        """Follow the replicas running (the batches' requests in flight), and copy the batch gauges
        a server has on /metrics (batches.BatchCollector) into Ray's metrics."""
        gauges: dict[str, Any] = {}
        while True:
            self.follow_replicas()
            try:
                set_gauges(BatchCollector(self.batches.runner).collect(), gauges)
            except Exception as e:  # noqa: BLE001 (an export problem must never stop the batches)
                logging.getLogger("ray").warning("fastblt batches: metrics not mirrored to Ray: %r", e)
            await asyncio.sleep(MIRROR_EVERY_S)

    def follow_replicas(self) -> None:
        """Requests in flight: `per_replica` for each replica running (one while none is, or while
        Serve cannot be asked: the replicas send back what they cannot take)."""
        try:
            replicas = self.replicas()
        except Exception as e:  # noqa: BLE001 (the controller restarting: asked again next time)
            logging.getLogger("ray").warning("fastblt batches: replicas not counted: %r", e)
            return
        self.batches.runner.concurrency = self.per_replica * max(1, replicas)

    async def call(self, method: str, *args: Any) -> Any:
        if self.opening is None:
            self.opening = asyncio.get_running_loop().create_task(self.batches.open())
            self.mirror = asyncio.get_running_loop().create_task(self._mirror())
        await self.opening
        # a copy as it is now: Ray sends the answer after this returns, and the loop may run a
        # batch's task in between (a cancel's returns the batch its task then finalizes)
        return copy.deepcopy(await getattr(self.batches, method)(*args))


def batch_actor(directory: str, concurrency: int, app_name: str, deployment: str,
                here: bool = False) -> ray.actor.ActorHandle:  # fmt: skip
    """The cluster's batch actor for `directory`, started by the first caller (`here`: on this
    node, whose disk holds the directory: `fastblt serve --ray` starts it; from a Serve config, the
    first replica does, on its node)."""
    # not sent again should its process die: a call may have created a batch
    actor = ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=0)(_BatchActor)
    return one_actor(actor, BATCH_ACTOR, here, directory, concurrency, app_name, deployment)


def stop_batch_actor() -> None:
    """End the batch actor, if there is one (its running batches resume at the next start)."""
    stop_actor(BATCH_ACTOR)


class RayBatches:
    """batches.Batches' methods, as add_batch_routes calls them, run in the batch actor: its
    ApiErrors raised here as they were raised there."""

    scratch = None  # an upload reaches the actor as bytes

    def __init__(self, actor: ray.actor.ActorHandle):
        self.actor = actor

    async def _call(self, method: str, *args: Any) -> Any:
        try:
            return await self.actor.call.remote(method, *args)
        except RayTaskError as e:
            if isinstance(e.cause, ApiError):
                raise e.cause from None
            raise
        except RayActorError as e:  # its process died: Ray starts another, which takes calls in a moment
            raise ApiError(503, f"batches: the batch actor is not running ({type(e).__name__}); Ray starts it "
                           "again: send the request again", None, "batches_unavailable", "server_error",
                           {"Retry-After": "1"}) from None  # fmt: skip

    async def upload(self, source: bytes, filename: str, keep: int, project: str = "") -> dict:
        return await self._call("upload", source, filename, keep, project)

    async def files(self, purpose: str | None = None, project: str = "") -> list[dict]:
        return await self._call("files", purpose, project)

    async def file(self, fid: str, project: str = "") -> dict:
        return await self._call("file", fid, project)

    async def content(self, fid: str, project: str = "") -> bytes:
        return await self._call("content", fid, True, project)

    async def delete_file(self, fid: str, project: str = "") -> dict:
        return await self._call("delete_file", fid, project)

    async def create(self, body: dict, project: str = "") -> dict:
        return await self._call("create", body, project)

    async def batches(self, project: str = "") -> list[dict]:
        return await self._call("batches", project)

    async def batch(self, bid: str, project: str = "") -> dict:
        return await self._call("batch", bid, project)

    async def cancel(self, bid: str, project: str = "") -> dict:
        return await self._call("cancel", bid, project)
