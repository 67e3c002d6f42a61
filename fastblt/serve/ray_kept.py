"""One store of kept responses and conversations for every replica of `fastblt serve --ray`.

A client's next turn (`previous_response_id`, `conversation`) may reach any replica, so replicas
do not keep what clients come back for in their own memory: they keep it in one Ray actor
(KEPT_ACTOR, detached, no CPU reserved), a MemoryKept per table or, with a directory, a FileKept
table in its SQLite file (read again by the actor Ray starts should this one die, and by the next
deployment that names the directory), and each replica's app reads it
through a RayKept (the Kept protocol, each call a round trip off the event loop, as the app
already makes store calls). Background responses run on the replica that was asked for them; the
events of a streamed one are published to the actor as they are made (replay.Published), and a
cancel asked of another replica waits there until the one that runs it takes it (RayRelay), so
that any replica streams, cancels and deletes any of them. The actor lives until `fastblt serve
--ray` undeploys (or the cluster stops): replicas that come and go, and a redeploy of the app,
keep the conversations.
Docs: docs/scale-out.md.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from fastblt.serve.kept import Kept, hold_store, open_kept
from fastblt.serve.replay import Published

KEPT_ACTOR = "fastblt-kept"
NAMESPACE = "fastblt"  # fastblt's actors' (this one, ray_batches')


class _KeptActor:
    """The tables of kept values, each of its own budget (the first caller's): in memory, or in
    `directory`'s file."""

    def __init__(self, directory: str | None = None) -> None:
        self.directory = None if directory is None else Path(directory)
        if self.directory is not None:
            hold_store(self.directory)  # the one store that keeps its file there
        self.tables: dict[str, Kept] = {}
        self.published: Published | None = None  # background streams' events, and cancels passed on

    def _table(self, table: str, budget: int) -> Kept:
        if table not in self.tables:
            self.tables[table] = open_kept(self.directory, table, budget)
        return self.tables[table]

    def get(self, table: str, budget: int, key: str) -> Any | None:
        return self._table(table, budget).get(key)

    def put(self, table: str, budget: int, key: str, value: Any) -> bool:
        return self._table(table, budget).put(key, value)

    def delete(self, table: str, budget: int, key: str) -> bool:
        return self._table(table, budget).delete(key)

    def update(self, table: str, budget: int, key: str, change: Callable[[Any], Any]) -> Any | None:
        return self._table(table, budget).update(key, change)  # one call at a time here: one step

    def scan(self, table: str, budget: int, pick: Callable[[str, Any], Any]) -> list[Any]:
        return self._table(table, budget).scan(pick)

    def used(self, table: str, budget: int) -> int:
        return self._table(table, budget).used

    def _published(self, budget: int) -> Published:
        if self.published is None:
            self.published = Published(budget)
        return self.published

    def log_add(self, budget: int, rid: str, first: int, events: list[bytes], ended: bool) -> None:
        self._published(budget).add(rid, first, events, ended)

    def log_read(self, budget: int, rid: str, after: int) -> tuple[list[bytes], bool] | None:
        return self._published(budget).read(rid, after)

    def log_drop(self, budget: int, rid: str) -> None:
        self._published(budget).drop(rid)

    def cancel(self, budget: int, rid: str) -> None:
        self._published(budget).cancel(rid)

    def cancelled(self, budget: int, rids: list[str]) -> list[str]:
        return self._published(budget).cancelled(rids)

    def lost(self, budget: int, rid: str, running_for: float) -> bool:
        return self._published(budget).lost(rid, running_for)


def kept_actor(directory: str | None = None, here: bool = False, name: str = KEPT_ACTOR) -> ray.actor.ActorHandle:
    """The cluster's store actor (keeping its tables in `directory`'s file, if any), started by the
    first caller: `fastblt serve --ray` starts it on its own node (`here`), whose disk holds the
    directory; from a Serve config, the first replica does, on its node."""
    # should its process die, Ray starts it again (in memory: empty, the replicas go on; in a file:
    # with what it kept) and sends the calls it was given once more
    # and runs each call as it arrives: no caller needs its calls in order (each awaits its answer,
    # and published events carry their sequence numbers), and an ordered actor would hold every
    # later call of a replica for 30 s should one of its calls be lost on the way (as under load)
    actor = ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=1, allow_out_of_order_execution=True)(_KeptActor)
    return one_actor(actor, name, here, directory)


def one_actor(actor: Any, name: str, here: bool, *args: Any) -> ray.actor.ActorHandle:
    """The cluster's one actor `name` of class `actor` (a ray.remote one), detached, started with
    `args` by the first caller: on the caller's node if `here`, else where Ray puts it."""
    where = {}
    if here:
        where["scheduling_strategy"] = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), False)
    return actor.options(name=name, namespace=NAMESPACE, lifetime="detached", get_if_exists=True,
                         **where).remote(*args)  # fmt: skip


def stop_actor(name: str) -> None:
    """End the actor `name`, if there is one."""
    with contextlib.suppress(ValueError):  # none was started
        ray.kill(ray.get_actor(name, namespace=NAMESPACE))


def stop_kept_actor() -> None:
    """End the store actor, if there is one (what it kept is gone)."""
    stop_actor(KEPT_ACTOR)


class RayKept:
    """Table `table` of the store actor, as the Kept protocol reads it (a value comes back as a
    copy, as from a file)."""

    def __init__(self, actor: ray.actor.ActorHandle, table: str, budget: int):
        self.actor, self.table, self.budget = actor, table, budget

    @property
    def used(self) -> int:
        return ray.get(self.actor.used.remote(self.table, self.budget))

    def get(self, key: str) -> Any | None:
        return ray.get(self.actor.get.remote(self.table, self.budget, key))

    def put(self, key: str, value: Any) -> bool:
        return ray.get(self.actor.put.remote(self.table, self.budget, key, value))

    def delete(self, key: str) -> bool:
        return ray.get(self.actor.delete.remote(self.table, self.budget, key))

    def update(self, key: str, change: Callable[[Any], Any]) -> Any | None:
        """`change` runs in the actor (sent there by value): it must not call the store."""
        return ray.get(self.actor.update.remote(self.table, self.budget, key, change))

    def scan(self, pick: Callable[[str, Any], Any]) -> list[Any]:
        """`pick` runs in the actor (sent there by value), so only what it picks comes back."""
        return ray.get(self.actor.scan.remote(self.table, self.budget, pick))


class RayRelay:
    """The store actor's Published, as replay.Relay reads it: `budget` bytes of ended logs (the
    first replica's)."""

    def __init__(self, actor: ray.actor.ActorHandle, budget: int):
        self.actor, self.budget = actor, budget

    def publish(self, rid: str, first: int, events: list[bytes], ended: bool) -> None:
        self.actor.log_add.remote(self.budget, rid, first, events, ended)  # not waited for: ordered by `first`

    async def read(self, rid: str, after: int) -> tuple[list[bytes], bool] | None:
        return await self.actor.log_read.remote(self.budget, rid, after)

    async def drop(self, rid: str) -> None:
        await self.actor.log_drop.remote(self.budget, rid)

    async def cancel(self, rid: str) -> None:
        await self.actor.cancel.remote(self.budget, rid)

    async def cancelled(self, rids: list[str]) -> list[str]:
        return await self.actor.cancelled.remote(self.budget, rids)

    async def lost(self, rid: str, running_for: float) -> bool:
        return await self.actor.lost.remote(self.budget, rid, running_for)
