"""The events of background streamed responses, kept so that a client may read them again.

A Response created with `background` and `stream` is answered by a task of its own, not by the
connection that asked for it: its server-sent events go into an EventLog as they are made, and any
number of readers follow the log from any event on (the POST that created it from the first, GET
/v1/responses/{id}?stream=true&starting_after=n from the one after event n). A client that loses
its connection reconnects and reads on where it stopped; the answer never waited for it. Logs are
kept while their response runs and, once it ended, the most recently ended within a byte budget.

A server of many replicas (`fastblt serve --ray`) also publishes each log through a Relay (one
store every replica reads: ray_kept.py's actor holds a Published), so that a reader whom another
replica answers follows it too (remote_follow), a cancel that reaches another replica is passed
on to the one that runs the response, and a response whose replica stopped is known as lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from typing import Protocol

POLL_S = 0.05  # how often remote_follow asks for events while none are new
PUBLISH_S = 0.05  # a running log publishes what it gained at most this often (one call each), its end at once
STALE_S = 3600.0  # a published log not added to (or a cancel not taken) this long is dropped: its replica died
# a background response whose replica has not asked for its cancels this long is lost (that replica
# stopped; while it runs any, it asks every app.CANCEL_POLL_S)
LEASE_S = 30.0

Publish = Callable[[int, list[bytes], bool], None]  # (sequence number of the first, events, ended)


class EventLog:
    """One response's events in order (event i is its sequence_number i), and whether it ended.
    `add` may be called from any thread (a stream's last frame is written off the event loop);
    readers run on the loop the log was made on."""

    def __init__(self, publish: Publish | None = None) -> None:
        self.events: list[bytes] = []
        self.nbytes = 0
        self.ended = False
        self._loop = asyncio.get_running_loop()
        self._grew = asyncio.Event()
        self._publish, self._sent = publish, 0  # events published so far
        self._due = False  # a publish is set to go

    def add(self, event: bytes) -> None:
        self.events.append(event)
        self.nbytes += len(event)
        self._wake()

    def end(self) -> None:
        self.ended = True
        self._wake()

    def _wake(self) -> None:
        with contextlib.suppress(RuntimeError):  # the loop closed: no reader is left to wake
            self._loop.call_soon_threadsafe(self._grown)

    def _grown(self) -> None:
        """On the loop: wake the readers, and publish what is new: the end at once, events within
        PUBLISH_S (those added meanwhile go in the same call)."""
        self._grew.set()
        if self.ended:
            self._send()
        elif self._publish is not None and not self._due:
            self._due = True
            self._loop.call_later(PUBLISH_S, self._send)

    def _send(self) -> None:
        self._due = False
        if self._publish is not None and (self._sent < len(self.events) or self.ended):
            first, self._sent = self._sent, len(self.events)
            self._publish(first, self.events[first : self._sent], self.ended)
            if self.ended:
                self._publish = None  # said once

    async def follow(self, after: int = -1) -> AsyncIterator[bytes]:
        """The events after sequence number `after`, as they come, until the response ended.
        Checking for events and waiting for more run with no await between them, so no event
        added meanwhile is missed."""
        at = after + 1
        while True:
            while at < len(self.events):
                yield self.events[at]
                at += 1
            if self.ended:
                return
            self._grew.clear()
            await self._grew.wait()


class Replays:
    """The event logs of a server's background streams: every running one, and of those that
    ended the most recently ended ones within `budget` bytes."""

    def __init__(self, budget: int):
        self.budget = budget
        self.running: dict[str, EventLog] = {}
        self.ended: OrderedDict[str, EventLog] = OrderedDict()
        self.nbytes = 0  # of the ended logs kept

    @property
    def used(self) -> int:
        """Bytes of the events kept: the running logs' and the ended ones'."""
        return self.nbytes + sum(log.nbytes for log in list(self.running.values()))

    def open(self, rid: str, publish: Publish | None = None) -> EventLog:
        log = self.running[rid] = EventLog(publish)
        return log

    def close(self, rid: str) -> None:
        """The response `rid` ended: its log ends, kept for readers while the budget allows."""
        log = self.running.pop(rid, None)
        if log is None:
            return
        log.end()
        if log.nbytes > self.budget:
            return
        self.ended[rid] = log
        self.nbytes += log.nbytes
        while self.nbytes > self.budget:
            _, dropped = self.ended.popitem(last=False)
            self.nbytes -= dropped.nbytes

    def get(self, rid: str) -> EventLog | None:
        log = self.running.get(rid)
        if log is None and (log := self.ended.get(rid)) is not None:
            self.ended.move_to_end(rid)
        return log

    def drop(self, rid: str) -> None:
        """Forget an ended log (its response was deleted)."""
        if (log := self.ended.pop(rid, None)) is not None:
            self.nbytes -= log.nbytes


class Published:
    """The logs replicas publish, as one store keeps them for all (in ray_kept.py's actor): events
    may arrive out of order (each batch says the sequence number of its first), and a reader gets
    those in order up to the first missing. Running logs are kept; ended ones, the most recently
    read within `budget` bytes; a log not added to for STALE_S (its replica died) is dropped. Also
    the cancels asked on one replica for a response another runs, until the one that runs it takes
    them, and when the one that runs it last asked (its lease: a response no replica asks for is lost)."""

    def __init__(self, budget: int, clock: Callable[[], float] = time.monotonic):
        self.budget, self.clock = budget, clock
        self.logs: OrderedDict[str, _Parts] = OrderedDict()
        self.nbytes = 0  # of the ended logs kept
        self.cancels: dict[str, float] = {}  # response id -> when asked
        self.seen: dict[str, float] = {}  # response id -> when the replica that runs it last asked for cancels
        self.began = self._swept = self.clock()

    def add(self, rid: str, first: int, events: list[bytes], ended: bool) -> None:
        log = self.logs.get(rid)
        if log is None:
            if first > 0:  # the rest of a log that was dropped (its response deleted): not kept again
                return
            log = self.logs[rid] = _Parts(self.clock())
        was, nbytes = log.done, log.nbytes
        log.put(first, events, ended, self.clock())
        if log.done:  # counted in the budget from its end on (a batch sent again adds nothing)
            self.nbytes += log.nbytes - (nbytes if was else 0)
            self.logs.move_to_end(rid)
        self._trim()

    def read(self, rid: str, after: int) -> tuple[list[bytes], bool] | None:
        """The events after sequence number `after` that follow it without a gap, and whether the
        log ended with them; None for a log not kept."""
        log = self.logs.get(rid)
        if log is None:
            return None
        if log.done:
            self.logs.move_to_end(rid)
        events = log.events[after + 1 : log.ready]
        # the log of a lost response ends here: no more will come
        ended = (log.done or self.lost(rid, self.clock() - log.began)) and after + 1 + len(events) == log.ready
        return events, ended

    def drop(self, rid: str) -> None:
        if (log := self.logs.pop(rid, None)) is not None and log.done:
            self.nbytes -= log.nbytes

    def cancel(self, rid: str) -> None:
        self.cancels[rid] = self.clock()
        self._trim()

    def cancelled(self, rids: list[str]) -> list[str]:
        """Those of `rids` (which the caller runs: their leases renewed) a cancel was asked for
        (taken: asked once, answered once)."""
        now = self.clock()
        self.seen.update((rid, now) for rid in rids)
        return [rid for rid in rids if self.cancels.pop(rid, None) is not None]

    def lost(self, rid: str, running_for: float) -> bool:
        """Whether the background response `rid`, made `running_for` seconds ago, has no replica
        running it: its lease ran out, or (never renewed) it is older than a lease and so is this
        store (one Ray started again has seen no replica yet)."""
        now = self.clock()
        if rid in self.seen:
            return now - self.seen[rid] > LEASE_S
        return running_for > LEASE_S and now - self.began > LEASE_S

    def _trim(self) -> None:
        now = self.clock()
        if now - self._swept > STALE_S / 60:  # the stale ones looked for now and then, not at every add
            self._swept = now
            for rid in [r for r, log in self.logs.items() if now - log.touched > STALE_S and not log.done]:
                del self.logs[rid]
            for rid in [r for r, asked in self.cancels.items() if now - asked > STALE_S]:
                del self.cancels[rid]
            for rid in [r for r, seen in self.seen.items() if now - seen > STALE_S]:
                del self.seen[rid]
        if self.nbytes > self.budget:
            ended = [r for r, log in self.logs.items() if log.done]  # least recently read first
            while self.nbytes > self.budget and ended:
                self.nbytes -= self.logs.pop(ended.pop(0)).nbytes


class _Parts:
    """One published log: its events by sequence number, ready up to the first missing one."""

    def __init__(self, now: float) -> None:
        self.events: list[bytes | None] = []
        self.ready = 0  # events[:ready] are all there
        self.total: int | None = None  # the count, once the batch that ended the log arrived
        self.nbytes = 0
        self.began = self.touched = now

    @property
    def done(self) -> bool:
        return self.total is not None and self.ready == self.total

    def put(self, first: int, events: list[bytes], ended: bool, now: float) -> None:
        self.touched = now
        if len(self.events) < first + len(events):
            self.events += [None] * (first + len(events) - len(self.events))
        for i, event in enumerate(events, first):
            if self.events[i] is None:
                self.events[i] = event
                self.nbytes += len(event)
        if ended:
            self.total = first + len(events)
        while self.ready < len(self.events) and self.events[self.ready] is not None:
            self.ready += 1


class Relay(Protocol):
    """How a replica reaches what the others publish (ray_kept.RayRelay: a Published in an actor).
    `publish` must not wait (it is called on the event loop); the others are awaited."""

    def publish(self, rid: str, first: int, events: list[bytes], ended: bool) -> None: ...

    async def read(self, rid: str, after: int) -> tuple[list[bytes], bool] | None: ...

    async def drop(self, rid: str) -> None: ...

    async def cancel(self, rid: str) -> None: ...

    async def cancelled(self, rids: list[str]) -> list[str]: ...

    async def lost(self, rid: str, running_for: float) -> bool: ...


async def remote_follow(relay: Relay, rid: str, after: int, first: list[bytes], ended: bool) -> AsyncIterator[bytes]:
    """A log another replica publishes, followed from the event after `after`: `first` read
    already (so a log that is not kept was answered before the stream began), then what comes
    next, asked for every POLL_S while nothing is new, until the log ends or is dropped."""
    at = after
    while True:
        for event in first:
            yield event
        at += len(first)
        if ended:
            return
        if not first:
            await asyncio.sleep(POLL_S)
        got = await relay.read(rid, at)
        if got is None:
            return
        first, ended = got
