"""The asyncio face of the batch engine, for services that embed fastblt rather than call HTTP.

    engine = fastblt.AsyncEngine("default", backend="ort", max_batch=16)
    out = await engine.generate("def main(", mode="blt-s", max_bytes=128)
    stream = engine.stream("def main(", mode="ar", max_bytes=64)
    async for text in stream:
        ...
    stream.generation  # the finished Generation

Requests from any number of tasks share one BatchEngine (batch.py), whose loop runs on its own
thread: awaiting never blocks the event loop on a step call. Cancelling the awaiting task (or
leaving `async for` early and closing the stream) cancels the request; its row is free before the
batch's next step. Bad requests raise `FastBltError` when they are made, before they are queued;
a full queue raises `EngineBusy`.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

from fastblt.engines.base import Backend
from fastblt.errors import InputError
from fastblt.model.blt import BltModel
from fastblt.runtime.batch import BatchEngine, BatchStats, Ticket
from fastblt.runtime.engine import Engine
from fastblt.runtime.generator import Generation, Generator
from fastblt.runtime.options import Request


class AsyncEngine:
    """Batched generation over one backend, awaited from asyncio.

    Args:
        checkpoint_or_model, backend: as for `Generator`.
        max_batch: sequences decoding at once (None: 16, or fewer if the trt engines take fewer).
        max_queue: requests waiting for a row beyond which new ones raise EngineBusy.
        max_context: optional limit on ids (prompt + output) per request.
        load: Generator's other keyword arguments (artifacts, threads, cache_dir, device,
            cuda_graphs, on_export); loading happens here, once.
    """

    def __init__(
        self,
        checkpoint_or_model: str | Path | BltModel = "default",
        backend: str | Backend | Engine = "ort",
        max_batch: int | None = None,
        max_queue: int = 256,
        max_context: int | None = None,
        **load: Any,
    ):
        self.generator = Generator(checkpoint_or_model, backend, max_context=max_context, **load)
        g = self.generator
        self.config, self.model = g.config, g.model
        self.batch = BatchEngine(g.engine, max_batch, max_queue, max_context, g.backend_name, g.params)

    @property
    def stats(self) -> BatchStats:
        """The batch's counters and what it holds now (active rows, queue depth)."""
        return self.batch.stats

    @property
    def max_batch(self) -> int:
        return self.batch.max_batch

    def request(self, prompt: str | bytes, mode: str = "blt-d", max_bytes: int = 256, **options: Any) -> Request:
        """The checked Request `generate` would run (options as for Generator.generate)."""
        return self.generator.request(prompt, mode, max_bytes, **options)

    def _request(self, prompt: str | bytes | Request, mode: str, max_bytes: int, options: dict) -> Request:
        if isinstance(prompt, Request):
            if options or (mode, max_bytes) != ("blt-d", 256):
                raise InputError("generate: a Request carries its own mode, max_bytes and options; give it alone")
            return prompt
        return self.request(prompt, mode, max_bytes, **options)

    async def generate(
        self, prompt: str | bytes | Request, mode: str = "blt-d", max_bytes: int = 256, **options: Any
    ) -> Generation:
        """Generate as Generator.generate does, batched with every other request in flight."""
        req = self._request(prompt, mode, max_bytes, options)
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        def finished(ticket: Ticket) -> None:
            loop.call_soon_threadsafe(_settle, done)

        ticket = self.batch.submit(req, on_done=finished)
        try:
            await done
        except asyncio.CancelledError:
            ticket.cancel()
            raise
        return ticket.result(0)

    def stream(
        self, prompt: str | bytes | Request, mode: str = "blt-d", max_bytes: int = 256, **options: Any
    ) -> TextStream:
        """An async iterator of text chunks as they are verified (UTF-8-safe, stop strings held
        back, as Generator.stream); `.generation` once it is exhausted. Call it inside a running
        event loop: the request is queued at once (and refused at once when it is bad)."""
        return TextStream(self.batch, self._request(prompt, mode, max_bytes, options))

    def close(self, timeout: float | None = None) -> None:
        """Finish the requests in flight, then stop the batch loop and release the backend."""
        self.batch.close(timeout)
        self.generator.close()

    async def aclose(self) -> None:
        await asyncio.to_thread(self.close)


def _settle(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


class TextStream:
    """One streamed request: `async for text in stream`; `cancel()` or `aclose()` to stop it.

    Text the batch verifies while the consumer is busy is joined into one chunk: the batch thread
    wakes the event loop once per burst, not once per round, so many streams do not flood it.
    """

    def __init__(self, batch: BatchEngine, request: Request):
        self._loop = asyncio.get_running_loop()
        self._lock = threading.Lock()
        self._texts: list[str] = []
        self._finished = False
        self._wake: asyncio.Event = asyncio.Event()
        self._waking = False
        self.generation: Generation | None = None
        self.ticket = batch.submit(request, on_text=self._on_text, on_done=self._on_done)

    def _on_text(self, text: str) -> None:  # the batch's thread
        with self._lock:
            self._texts.append(text)
            self._signal()

    def _on_done(self, ticket: Ticket) -> None:  # the batch's thread
        with self._lock:
            self._finished = True
            self._signal()

    def _signal(self) -> None:
        if not self._waking:
            self._waking = True
            self._loop.call_soon_threadsafe(self._wake.set)

    def __aiter__(self) -> TextStream:
        return self

    async def __anext__(self) -> str:
        while True:
            with self._lock:
                texts, self._texts = self._texts, []
                finished, self._waking = self._finished, False
                self._wake.clear()
            if texts:
                return "".join(texts)
            if finished or self.ticket.cancelled:
                if self.generation is None and finished:
                    self.generation = self.ticket.result(0)  # raises the request's error
                raise StopAsyncIteration
            try:
                await self._wake.wait()
            except asyncio.CancelledError:
                self.ticket.cancel()
                raise

    def cancel(self) -> None:
        """Stop the request (its row is freed before the batch's next step)."""
        self.ticket.cancel()

    async def aclose(self) -> None:
        if not self.ticket.done:
            self.ticket.cancel()
