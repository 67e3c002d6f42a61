"""`fastblt serve`'s ASGI app: an OpenAI-compatible completions API over an AsyncEngine.

    POST /v1/completions   completions (streamed as server-sent events with "stream": true)
    GET  /v1/models        the one model served
    GET  /health           200 once the engine is ready (503 while loading, or while no lane runs)
    GET  /metrics          Prometheus text (metrics.py)

Every error is OpenAI's error object with a 4xx (the request's fault: a field named in `param`)
or 5xx; the engine keeps serving. A full queue is 429 with Retry-After. A streamed request's first
event is awaited before the response starts, so a request that fails in its prefill (a prompt past
the model's limit) still gets its 400; once bytes flow, a failure is an error event, then [DONE].
A client that goes away cancels its request: its batch row is free before the next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import os
import re
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from fastblt.errors import CapabilityError, EngineBusy, EngineClosed, FastBltError, InputError
from fastblt.runtime.async_engine import AsyncEngine
from fastblt.runtime.generator import Generation
from fastblt.serve.api import (
    ApiError,
    Completion,
    completion_body,
    completion_id,
    finish_reason,
    parse_body,
    sse,
    usage,
)
from fastblt.serve.metrics import CONTENT_TYPE, Metrics

REPLICA_HEADER = "x-fastblt-replica"


@dataclass(frozen=True)
class ServeSettings:
    """What a server answers with and accepts (the CLI's options)."""

    model_id: str = "fastblt-default"
    default_mode: str = "blt-s"  # lossless: greedy output is ar's
    api_key: str | None = None  # required as "Authorization: Bearer <key>" on /v1/* when set
    max_body: int = 1 << 20  # bytes of a request body
    retry_after: int = 1  # seconds, in a 429's Retry-After
    replica: str | None = None  # the x-fastblt-replica header (None: host:pid)


def _metrics(engine: AsyncEngine) -> Metrics:
    return Metrics(
        lambda: engine.stats, engine.max_batch, len(engine.lanes), lambda: (engine.lanes_alive, engine.lane_restarts)
    )


def create_app(engine: AsyncEngine | Callable[[], AsyncEngine], settings: ServeSettings | None = None) -> FastAPI:
    """The app over `engine`, or over the engine `engine()` builds at startup (closed at shutdown)."""
    settings = settings or ServeSettings()
    replica = settings.replica or f"{socket.gethostname()}:{os.getpid()}"
    state: dict = {"engine": engine if isinstance(engine, AsyncEngine) else None, "metrics": Metrics()}
    if state["engine"] is not None:
        state["metrics"] = _metrics(state["engine"])

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        built = None
        if state["engine"] is None:
            built = await asyncio.to_thread(engine)
            state["engine"], state["metrics"] = built, _metrics(built)
        try:
            yield
        finally:
            if built is not None:
                await built.aclose()

    app = FastAPI(title="fastblt", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(_ReplicaHeader, value=replica)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), e.status, headers=e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(ApiError(e.status_code, f"{request.method} {request.url.path}: {e.detail}").body(),
                            e.status_code)  # fmt: skip

    @app.exception_handler(Exception)
    async def server_error(request: Request, e: Exception) -> JSONResponse:
        return JSONResponse(ApiError(500, f"internal error: {type(e).__name__}", kind="server_error").body(), 500)

    def ready() -> AsyncEngine:
        if state["engine"] is None:
            raise ApiError(503, "engine: loading", kind="server_error", headers={"Retry-After": "1"})
        return state["engine"]

    def authorize(request: Request) -> None:
        if settings.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {settings.api_key}".encode()):
            raise ApiError(401, "authorization: missing or wrong API key (Authorization: Bearer <key>)", None,
                           "invalid_api_key")  # fmt: skip

    @app.get("/health")
    async def health() -> JSONResponse:
        if ready().lanes_alive == 0:  # every worker lane died: no request could run
            raise ApiError(503, "engine: no batch lane is running", kind="server_error")
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state["metrics"].render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        authorize(request)
        ready()
        model = {"id": settings.model_id, "object": "model", "created": 0, "owned_by": "fastblt"}
        return JSONResponse({"object": "list", "data": [model]})

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        arrived = time.perf_counter()
        m: Metrics = state["metrics"]
        mode = "unknown"
        try:
            authorize(request)
            eng = ready()
            comp = parse_body(await _read_body(request, settings.max_body), settings.model_id, settings.default_mode)
            mode = comp.options["mode"]
            req = _request(eng, comp)
            if comp.stream:
                response = await _stream(eng, comp, req, settings, m, arrived)
            else:
                gen = await _generate(eng, req, request)
                m.generation(gen, arrived)
                body = completion_body(completion_id(), settings.model_id, gen.text, finish_reason(gen.stop_reason),
                                       usage(len(req.ids) - 1, len(gen.ids)))  # fmt: skip
                response = JSONResponse(body)
        except ApiError as e:
            m.request(e.status, mode)
            raise
        except EngineBusy as e:
            m.request(429, mode)
            raise ApiError(429, str(e), None, "queue_full", "rate_limit_error",
                           {"Retry-After": str(settings.retry_after)}) from None  # fmt: skip
        except EngineClosed as e:
            m.request(503, mode)
            raise ApiError(503, str(e), None, "shutting_down", "server_error") from None
        except FastBltError as e:
            m.request(400, mode)
            raise ApiError(400, str(e), _param(e)) from None
        m.request(response.status_code, mode)
        return response

    return app


# ---------------------------------------------------------------------------- helpers
async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 past `limit` bytes (by Content-Length, or while it arrives)."""
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > limit):
        raise ApiError(413, f"body: {length} bytes exceed the limit of {limit}", None, "body_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"body: more than the limit of {limit} bytes", None, "body_too_large")
    return bytes(body)


def _request(eng: AsyncEngine, comp: Completion):
    """The engine's checked Request; a refused option is a 400 naming the field."""
    try:
        return eng.request(comp.prompt, max_bytes=comp.max_tokens, **comp.options)
    except (InputError, CapabilityError) as e:
        raise ApiError(400, str(e), _param(e)) from None


_OPTION = re.compile(r"^options? (\w+)")


def _param(e: Exception) -> str | None:
    """The request field an engine error is about (its messages start with what they name)."""
    text = str(e)
    if (m := _OPTION.match(text)) is not None:
        return {"max_bytes": "max_tokens"}.get(m.group(1), m.group(1))
    if text.startswith(("prompt + max_bytes", "sequence:")):
        return "max_tokens" if "max_bytes" in text else "prompt"
    if text.startswith("mode") or isinstance(e, CapabilityError):
        return "mode"
    return None


async def _generate(eng: AsyncEngine, req, request: Request) -> Generation:
    """Generate, cancelling the request if the client goes away first."""
    task = asyncio.ensure_future(eng.generate(req))
    watch = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, FastBltError):
            await task
        raise ApiError(499, "client closed the request", None, "client_closed")
    return task.result()


async def _disconnected(request: Request, every: float = 0.1) -> None:
    while not await request.is_disconnected():
        await asyncio.sleep(every)


async def _stream(eng: AsyncEngine, comp: Completion, req, settings: ServeSettings, m: Metrics,
                  arrived: float) -> StreamingResponse:  # fmt: skip
    """Start the stream and wait for its first event (so a failing prefill is still a 4xx)."""
    stream = eng.stream(req)
    try:
        first = await stream.__anext__()
    except StopAsyncIteration:
        first = None
    except BaseException:
        stream.cancel()
        raise
    cid, created = completion_id(), int(time.time())

    async def events() -> AsyncIterator[bytes]:
        try:
            if first is not None:
                yield sse(completion_body(cid, settings.model_id, first, None, created=created))
                async for text in stream:
                    yield sse(completion_body(cid, settings.model_id, text, None, created=created))
            gen = stream.generation
            m.generation(gen, arrived)
            yield sse(completion_body(cid, settings.model_id, "", finish_reason(gen.stop_reason), created=created))
            if comp.include_usage:
                body = completion_body(cid, settings.model_id, "", None, usage(len(req.ids) - 1, len(gen.ids)), created)
                body["choices"] = []
                yield sse(body)
            yield sse("[DONE]")
        except FastBltError as e:  # bytes already went out: the failure is an event
            yield sse(ApiError(400, str(e), _param(e)).body())
            yield sse("[DONE]")
        finally:
            stream.cancel()  # a no-op once it finished; frees the row when the client went away

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


class _ReplicaHeader:
    """ASGI middleware: every HTTP response names the replica that served it."""

    def __init__(self, app, value: str):
        self.app, self.header = app, (REPLICA_HEADER.encode(), value.encode())

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_header(message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        await self.app(scope, receive, send_with_header)
