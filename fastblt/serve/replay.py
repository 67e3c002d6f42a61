"""The events of background streamed responses, kept so that a client may read them again.

A Response created with `background` and `stream` is answered by a task of its own, not by the
connection that asked for it: its server-sent events go into an EventLog as they are made, and any
number of readers follow the log from any event on (the POST that created it from the first, GET
/v1/responses/{id}?stream=true&starting_after=n from the one after event n). A client that loses
its connection reconnects and reads on where it stopped; the answer never waited for it. Logs are
kept while their response runs and, once it ended, the most recently ended within a byte budget.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import OrderedDict
from collections.abc import AsyncIterator


class EventLog:
    """One response's events in order (event i is its sequence_number i), and whether it ended.
    `add` may be called from any thread (a stream's last frame is written off the event loop);
    readers run on the loop the log was made on."""

    def __init__(self) -> None:
        self.events: list[bytes] = []
        self.nbytes = 0
        self.ended = False
        self._loop = asyncio.get_running_loop()
        self._grew = asyncio.Event()

    def add(self, event: bytes) -> None:
        self.events.append(event)
        self.nbytes += len(event)
        self._wake()

    def end(self) -> None:
        self.ended = True
        self._wake()

    def _wake(self) -> None:
        with contextlib.suppress(RuntimeError):  # the loop closed: no reader is left to wake
            self._loop.call_soon_threadsafe(self._grew.set)

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

    def open(self, rid: str) -> EventLog:
        log = self.running[rid] = EventLog()
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
