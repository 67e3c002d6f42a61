"""`fastblt serve`'s ASGI app: an OpenAI-compatible completions API over an AsyncEngine.

    POST /v1/completions   completions (streamed as server-sent events with "stream": true)
    POST /v1/chat/completions  chat completions, with a chat template (chat.py; else 404)
    POST /v1/responses     OpenAI's Responses API, answered as chat (responses.py)
    GET  /v1/models        the one model served (/v1/models/{id}: that model, or 404)
    GET  /health           200 once the engine is ready (503 while loading, or while no lane runs)
    GET  /metrics          Prometheus text (metrics.py)

Every error is OpenAI's error object with a 4xx (the request's fault: a field named in `param`)
or 5xx; the engine keeps serving. A full queue is 429 with Retry-After. A streamed request's first
event is awaited before the response starts, so a request that fails in its prefill (a prompt past
the model's limit) still gets its 400; once bytes flow, a failure is an error event, then [DONE].
A client that goes away cancels its request (waiting for a row or decoding): its row or its place
in the queue is free before the batch's next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import hashlib
import hmac
import logging
import math
import os
import re
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import Match

from fastblt.errors import (
    Cancelled,
    CapabilityError,
    EngineBusy,
    EngineClosed,
    FastBltError,
    InputError,
    LaneLost,
    PositionLimit,
)
from fastblt.export.cache import source_hash
from fastblt.runtime.async_engine import AsyncEngine, TextStream
from fastblt.runtime.generator import Generation
from fastblt.runtime.stream import Scores
from fastblt.serve.api import (
    BYTES_PER_PATCH,
    ApiError,
    Completion,
    check_fields,
    finish_reason,
    get_field,
    get_metadata,
    load_json,
    parse_body,
    sse,
    usage,
)
from fastblt.serve.chat import ChatTemplate
from fastblt.serve.chat_store import TABLE as CHAT_TABLE
from fastblt.serve.chat_store import ChatStore, StoredChat
from fastblt.serve.conversations import ConversationStore
from fastblt.serve.kept import Kept, Scoped, hold_store, open_kept
from fastblt.serve.metrics import CONTENT_TYPE, KeptCollector, Metrics
from fastblt.serve.replay import POLL_S, Relay, Replays, remote_follow
from fastblt.serve.request_log import HEADER as REQUEST_ID_HEADER
from fastblt.serve.request_log import LOGGER, RequestRecord, request_id, trace_id
from fastblt.serve.responses import (
    RUNNING,
    ResponsesRequest,
    ResponseStore,
    Stored,
    check_new_ids,
    conversation_items,
    input_items_page,
    ordered_page,
)
from fastblt.version import __version__

REPLICA_HEADER = "x-fastblt-replica"
REQUEST_ID = "fastblt.request_id"  # the request's id in its ASGI scope (_Headers puts it there)
# ids an engine behind the server holds beyond --max-context bytes: BOS, and the byte a scoring
# request (max_tokens 0) decodes and drops
SERVE_EXTRA_IDS = 2
MAX_REFITS = 2  # times a request is shortened again after its text reached the position limit
NO_CACHE = {"Cache-Control": "no-cache"}  # a stream's headers
PROJECT = "fastblt.project"  # the ASGI scope's key of a batch request's project (call_app)
REPLAY_SHARE = 4  # background streams' events are kept within this fraction of --response-store-mb
CANCEL_POLL_S = 0.25  # how often a replica asks for the cancels of its background responses asked elsewhere
# how long a replica waits for a background stream another one runs to publish its first events
PUBLISHED_WAIT_S = 2.0
T = TypeVar("T")
logger = logging.getLogger("fastblt.serve")


@dataclass(frozen=True)
class ServeSettings:
    """What a server answers with and accepts (the CLI's options)."""

    model_id: str = "fastblt-default"
    default_mode: str = "blt-s"  # lossless: greedy output is ar's
    api_keys: tuple[str, ...] = ()  # one of them required as "Authorization: Bearer <key>" on /v1/*, if any
    # (project, key) pairs: a request with that key is the project's, and reaches only what the
    # project kept (responses, conversations, chat completions, files, batches); --api-key's keys
    # are the default project's (""). Keys are then required as with api_keys.
    projects: tuple[tuple[str, str], ...] = ()
    max_body: int = 1 << 20  # bytes of a request body
    retry_after: int = 1  # seconds, in a 429's Retry-After
    replica: str | None = None  # the x-fastblt-replica header (None: host:pid)
    chat_template: ChatTemplate | None = None  # renders chat completions' messages (None: no chat endpoint)
    # whether responses carry x-request-id (Ray Serve's proxy adds it itself, with the id it forwards)
    echo_request_id: bool = True
    request_logger: str = LOGGER  # the logger of the request log (request_log.py)
    log_format: str = "text"  # "json": the request log's fields go on its records, for a JSON formatter
    allowed_origins: tuple[str, ...] = ()  # web pages (scheme://host[:port], or "*") whose scripts may call the API
    response_store: int = 0  # bytes of Responses kept for previous_response_id (0: none kept, store answered false)
    # and as many of conversations; in a SQLite file there (kept.py) that outlives the server, else in memory
    response_store_dir: Path | None = None
    # how the app opens a store (a table of that many bytes): None, in memory or the dir's file
    kept: Callable[[str, int], Kept] | None = None
    # what the replicas of one server publish for each other (background streams' events, cancels
    # passed on, leases): ray_kept.RayRelay; None: one server, which runs every background response
    # it has (so `kept` opens a store no other server shares: one it finds running and does not
    # run, a killed server left behind, and it reads failed)
    relay: Relay | None = None
    # seconds a stopping app lets its background responses finish when its server set no deadline
    # (app.state.finish_by: `fastblt serve` sets it to the end of --graceful-timeout); 0: cancelled at once
    background_grace: float = 0.0
    # seconds between a stream's events: the text made meanwhile goes out in one (fewer events for
    # the server and its clients to write and parse when many streams run); 0: each as it is made
    stream_interval: float = 0.0


_PROJECT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def project_keys(given: Iterable[str], api_keys: Iterable[str] = ()) -> tuple[tuple[str, str], ...]:
    """`--project NAME=KEY` values as (project, key) pairs; a ValueError says which one is wrong:
    a name of other than 1-64 letters, digits, `_`, `.` or `-`, a key empty or with spaces at its
    ends (no bearer token), or a key that another project (or --api-key) has too."""
    pairs, owner = [], {key: "--api-key" for key in api_keys}
    for value in given:
        name, eq, key = value.partition("=")
        if not eq or not _PROJECT_NAME.fullmatch(name):
            raise ValueError(f"{value.partition('=')[0]!r:.80}=...: expected NAME=KEY, NAME 1-64 letters, digits, "
                             "'_', '.' or '-' (starting with a letter or digit)")  # fmt: skip
        if not key or key != key.strip():
            raise ValueError(f"{name}=...: the key is empty, or has spaces at its ends")
        if owner.get(key, name) != name:
            raise ValueError(f"{name}=...: its key is {owner[key]}'s too; a key names one project")
        owner[key] = name
        pairs.append((name, key))
    return tuple(pairs)


_ORIGIN = re.compile(r"https?://[A-Za-z0-9.-]+(:\d{1,5})?|https?://\[[0-9A-Fa-f:.]+\](:\d{1,5})?")


def origin_error(origin: str) -> str | None:
    """Why `origin` is no origin a browser sends (scheme://host[:port], no path), or None; "*" is any."""
    if origin == "*" or _ORIGIN.fullmatch(origin):
        return None
    return f"{origin!r}: expected scheme://host[:port] as a browser sends it (no path, no trailing /), or *"


def _metrics(engine: AsyncEngine) -> Metrics:
    return Metrics(
        lambda: engine.stats, engine.max_batch, len(engine.lanes), lambda: (engine.lanes_alive, engine.lane_restarts)
    )


def fingerprint(engine: AsyncEngine) -> str:
    """OpenAI's `system_fingerprint`: what decides the bytes besides the request (the weights, the
    backend, fastblt's version). Two servers answering with the same one compute the same model."""
    g = engine.generator
    key = f"{__version__}\0{g.backend_name}\0{source_hash(g.model, g.checkpoint_path)}"
    return "fp_" + hashlib.sha256(key.encode()).hexdigest()[:16]


def create_app(engine: AsyncEngine | Callable[[], AsyncEngine], settings: ServeSettings | None = None) -> FastAPI:
    """The app over `engine`, or over the engine `engine()` builds at startup (closed at shutdown)."""
    settings = settings or ServeSettings()
    replica = settings.replica or f"{socket.gethostname()}:{os.getpid()}"
    state: dict = {"engine": engine if isinstance(engine, AsyncEngine) else None, "metrics": Metrics(),
                   "fingerprint": None}  # fmt: skip
    running: dict[str, ResponsesRequest] = {}  # background responses not yet answered, by id
    tables: dict[str, Kept] = {}
    replays, relay = None, settings.relay
    if settings.response_store:
        if settings.kept is None and settings.response_store_dir is not None:
            hold_store(settings.response_store_dir)  # the one server that keeps its file there
        opened = settings.kept or functools.partial(open_kept, settings.response_store_dir)
        tables = {table: opened(table, settings.response_store) for table in ("responses", "conversations", CHAT_TABLE)}
        replays = Replays(settings.response_store // REPLAY_SHARE)
    keys = [(key.encode(), "") for key in settings.api_keys] + [(k.encode(), p) for p, k in settings.projects]

    def stores(project: str) -> tuple[ResponseStore | None, ConversationStore | None, ChatStore | None]:
        """The project's share of each store (None: the server keeps nothing)."""
        if not tables:
            return None, None, None
        scoped = {table: Scoped(kept, project) for table, kept in tables.items()}
        return (ResponseStore(scoped["responses"]), ConversationStore(scoped["conversations"]),
                ChatStore(scoped[CHAT_TABLE]))  # fmt: skip

    if state["engine"] is not None:
        state["metrics"] = _metrics(state["engine"])

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        built = None
        if state["engine"] is None:
            built = await asyncio.to_thread(engine)
            state["engine"], state["metrics"] = built, _metrics(built)
        state["fingerprint"] = await asyncio.to_thread(fingerprint, state["engine"])
        if tables:
            state["metrics"].registry.register(KeptCollector(lambda: len(running), {**tables, "events": replays}))
        try:
            async with contextlib.AsyncExitStack() as stack:
                for extra in app.state.lifespans:  # what was added to the app (batches.py's runner)
                    await stack.enter_async_context(extra(app))
                if relay is not None:
                    stack.enter_context(_running_task(take_cancels(), "fastblt cancels"))
                yield
                # background responses finish within what is left of the server's grace period (if
                # it set one: `finish_by`, the loop's time), then those still running are cancelled
                tasks = [job.task for job in running.values() if job.task is not None]
                now = asyncio.get_running_loop().time()
                finish_by = app.state.finish_by if app.state.finish_by is not None else now + settings.background_grace
                if tasks and finish_by > now:
                    await asyncio.wait(tasks, timeout=finish_by - now)
                for job in list(running.values()):
                    await job.cancel()
        finally:
            if built is not None:
                await built.aclose()

    app = FastAPI(title="fastblt", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(_Headers, replica=replica, echo_id=settings.echo_request_id)
    if settings.allowed_origins:  # outermost: a browser's preflight is answered before any key is asked for
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.allowed_origins), allow_headers=["*"],
                           allow_methods=["GET", "POST", "DELETE"], max_age=600,
                           expose_headers=[REQUEST_ID_HEADER, REPLICA_HEADER, "retry-after"])  # fmt: skip
    inflight = _InFlight()
    app.state.stop_requests = inflight.stop  # the server calls it when its grace period runs out
    app.state.finish_by = None  # ... and sets this to its end as it begins (background responses finish by then)
    # for routes added to the app elsewhere (batches.py): their lifespans, entered once the engine is
    # ready, and the checks every route makes (app.state.authorize, app.state.ready, below)
    app.state.lifespans = []

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), e.status, headers=e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        error = ApiError(e.status_code, f"{request.method} {request.url.path}: {e.detail}", None, code)
        headers = dict(e.headers or {})
        if e.status_code == 405:  # the router names the methods of the first route of this path only
            headers["Allow"] = ", ".join(allowed_methods(request))
        return JSONResponse(error.body(), e.status_code, headers=headers)

    @app.exception_handler(Exception)
    async def server_error(request: Request, e: Exception) -> JSONResponse:
        return JSONResponse(ApiError(500, f"internal error: {type(e).__name__}", kind="server_error").body(), 500)

    def ready() -> AsyncEngine:
        if state["engine"] is None:
            raise ApiError(503, "engine: loading", kind="server_error", headers={"Retry-After": "1"})
        return state["engine"]

    def project_of(request: Request) -> str | None:
        """The project of the request's key ("": the default one, and every request's without
        keys), or None when it sends no key of this server. A batch's requests, sent in this
        process, carry their batch's project in the ASGI scope, where no client can put one."""
        if (project := request.scope.get(PROJECT)) is not None:
            return project
        if not keys:
            return ""
        scheme, _, given = request.headers.get("authorization", "").strip().partition(" ")
        sent = given.strip().encode()
        # every key compared, so the time taken does not say which key came close
        matches = [project for key, project in keys if hmac.compare_digest(sent, key)]
        return matches[0] if scheme.lower() == "bearer" and matches else None

    def authorize(request: Request) -> str:
        """The request's project, or a 401."""
        project = project_of(request)
        if project is None:
            raise ApiError(401, "authorization: missing or wrong API key (Authorization: Bearer <key>)", None,
                           "invalid_api_key")  # fmt: skip
        return project

    app.state.authorize, app.state.ready = authorize, ready
    app.state.metrics = lambda: state["metrics"]  # the registry /metrics renders, final once the engine is ready

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health() -> JSONResponse:
        if ready().lanes_alive == 0:  # every worker lane died: no request could run until one is back
            raise ApiError(503, "engine: no batch lane is running", kind="server_error",
                           headers={"Retry-After": str(settings.retry_after)})  # fmt: skip
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        # off the event loop: a worker lane asked for its counters may take seconds to answer
        return Response(await asyncio.to_thread(state["metrics"].render), media_type=CONTENT_TYPE)

    model = {"id": settings.model_id, "object": "model", "created": 0, "owned_by": "fastblt"}

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        authorize(request)
        ready()
        return JSONResponse({"object": "list", "data": [model]})

    @app.get("/v1/models/{model_id:path}")
    async def one_model(request: Request, model_id: str) -> JSONResponse:
        authorize(request)
        ready()
        if model_id != settings.model_id:
            raise ApiError(404, f"model {model_id!r}: not served here; GET /v1/models lists {settings.model_id!r}",
                           "model", "model_not_found")  # fmt: skip
        return JSONResponse(model)

    async def complete(request: Request, parse: Callable[[bytes], Completion], endpoint: str,
                       reshape: Callable[[dict], dict] | None = None,
                       frame: Callable[[dict | str], bytes] = sse,
                       refit: Callable[[PositionLimit], Completion | None] | None = None,
                       later: Callable[[Coroutine[Any, Any, Any]], Awaitable[dict | AsyncIterator[bytes]]] | None = None
                       ) -> Response:  # fmt: skip
        """Answer a completions-shaped request; `reshape` turns a whole answer, and `frame` each
        streamed body (or "[DONE]"), into another API's (responses.py), sse by default. `refit`:
        the request again, shorter, when its text reached the model's position limit before its
        answer began (None: refused as it is). `later`: for a request to be answered in the
        background, takes the work that answers it (its errors ApiErrors) and gives the answer
        to send now (a streamed one: the reader of its events)."""
        arrived = time.perf_counter()
        m: Metrics = state["metrics"]
        mode = "unknown"
        record = RequestRecord(request.scope.get(REQUEST_ID) or request_id(None), endpoint, arrived,
                               settings.request_logger, trace_id(request.headers.get("traceparent")),
                               structured=settings.log_format == "json")  # fmt: skip

        def refused(e: ApiError) -> ApiError:
            m.request(e.status, mode, endpoint)
            record.end(e.status, error=e.message, param=e.param)
            return e

        try:
            if project := authorize(request):  # (the default project's are not named)
                record.fields["project"] = project
            if settings.projects:  # counted by project as the line is logged
                record.counted = functools.partial(m.project, project)
            eng = ready()
            comp = await asyncio.to_thread(parse, await _read_body(request, settings.max_body))
            mode = comp.options["mode"]
            record.parsed(mode, comp.stream, comp.n * len(comp.prompts), sum(len(p.encode()) for p in comp.prompts),
                          comp.user, comp.options.get("priority", 0))  # fmt: skip
            if comp.background and later is not None:
                # its jobs made here, so that what a request can be refused for is a 4xx now
                jobs = await asyncio.to_thread(_jobs, eng, comp)
                if comp.stream:  # counted as its stream ends, or fails to begin
                    events = await later(_drained(eng, comp, jobs, refit, frame, m, record, endpoint))
                    return StreamingResponse(events, media_type="text/event-stream", headers=NO_CACHE)
                used = functools.partial(m.project_usage, project) if settings.projects else None
                response = JSONResponse(await later(_answered(eng, comp, jobs, refit, reshape, m, arrived, used)))
                m.request(response.status_code, mode, endpoint)
                record.end(response.status_code)  # queued: its usage is counted as it ends
                return response

            async def attempt(comp: Completion) -> tuple[list[_Job], Any]:
                # off the event loop: a request's schema or tools compile into automata (up to ~1 s
                # for a fine multipleOf beside wide bounds), which the streams in flight must not wait for
                jobs = await asyncio.to_thread(_jobs, eng, comp)
                if comp.stream:  # counted as it ends
                    return jobs, await _stream(eng, comp, jobs, request, inflight, settings, m, record,
                                               state["fingerprint"], endpoint, frame)  # fmt: skip
                return jobs, await _unless_gone(_together(eng.generate(job.req) for job in jobs), request, inflight)

            comp, (jobs, gens) = await _fitted(comp, refit, attempt)
            if comp.stream:
                return gens
            for gen in gens:
                m.generation(gen, arrived)
                record.byte_times(gen.times)
            answer = _answer(comp, jobs, gens, settings.model_id, state["fingerprint"])
            m.tool_calls(mode, sum(len(c.get("message", {}).get("tool_calls") or ()) for c in answer["choices"]))
            # off the event loop: a reshape may keep the answer (a kept Response: a file's write)
            response = JSONResponse(answer if reshape is None else await asyncio.to_thread(reshape, answer))
        except ApiError as e:
            raise refused(e) from None
        except EngineBusy as e:
            raise refused(ApiError(429, str(e), None, "queue_full", "rate_limit_error",
                                   {"Retry-After": str(settings.retry_after)})) from None  # fmt: skip
        except LaneLost as e:
            raise refused(_lane_lost(e, settings.retry_after)) from None
        except EngineClosed as e:
            raise refused(ApiError(503, str(e), None, "shutting_down", "server_error")) from None
        except FastBltError as e:
            raise refused(_field_error(e, comp)) from None
        except Exception as e:
            m.request(500, mode, endpoint)
            record.end(500, error=f"internal error: {e!r}")
            raise
        m.request(response.status_code, mode, endpoint)
        record.end(response.status_code, answer["usage"], [c["finish_reason"] for c in answer["choices"]])
        return response

    async def _answered(eng: AsyncEngine, comp: Completion, jobs: list[_Job],
                        refit: Callable[[PositionLimit], Completion | None] | None,
                        reshape: Callable[[dict], dict] | None, m: Metrics, arrived: float,
                        used: Callable[[dict], None] | None = None) -> dict:  # fmt: skip
        """The whole answer to `comp` (its `jobs`), no client watching (a background request's);
        engine errors as the ApiErrors a client would have been answered with. `used`: told the
        answer's usage."""
        first = comp

        async def attempt(comp: Completion) -> tuple[list[_Job], list[Generation]]:
            tried = jobs if comp is first else await asyncio.to_thread(_jobs, eng, comp)
            return tried, await _together(eng.generate(job.req) for job in tried)

        with _as_api_errors(comp):
            comp, (jobs, gens) = await _fitted(comp, refit, attempt)
        for gen in gens:
            m.generation(gen, arrived)
        answer = _answer(comp, jobs, gens, settings.model_id, state["fingerprint"])
        if used is not None:
            used(answer["usage"])
        return answer if reshape is None else await asyncio.to_thread(reshape, answer)

    async def _drained(eng: AsyncEngine, comp: Completion, jobs: list[_Job],
                       refit: Callable[[PositionLimit], Completion | None] | None,
                       frame: Callable[[dict | str], bytes], m: Metrics, record: RequestRecord, endpoint: str
                       ) -> None:  # fmt: skip
        """A background request's streamed answer (`comp`, its `jobs`), no client watching: its
        frames are made (each kept in the request's event log as it is made, where clients read
        it) and dropped here. A failure before the stream began is counted here and raised as the
        ApiError a client would have been answered with; once it began, the stream counts it and
        says it as events."""
        first = comp

        async def attempt(comp: Completion) -> StreamingResponse:
            tried = jobs if comp is first else await asyncio.to_thread(_jobs, eng, comp)
            return await _stream(eng, comp, tried, None, inflight, settings, m, record, state["fingerprint"], endpoint,
                                 frame)  # fmt: skip

        try:
            with _as_api_errors(comp):
                _, streaming = await _fitted(comp, refit, attempt)
        except ApiError as e:
            m.request(e.status, comp.options["mode"], endpoint)
            record.end(e.status, error=e.message, param=e.param)
            raise
        async for _ in streaming.body_iterator:
            pass

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await complete(request, lambda raw: parse_body(raw, settings.model_id, settings.default_mode),
                              "completions")  # fmt: skip

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        chats = stores(project_of(request) or "")[2]  # (complete() answers a wrong key)
        asked = StoredChat(settings.model_id, settings.default_mode, settings.chat_template, chats)
        return await complete(request, asked.parse, "chat", asked.answer, asked.frame)

    def chat_store(request: Request) -> ChatStore:
        return kept_here(stores(authorize(request))[2], "chat completions")

    # stored chat completions (store: true); their reads and writes off the event loop, as the other stores'
    @app.get("/v1/chat/completions")
    async def list_chat_completions(request: Request) -> JSONResponse:
        return JSONResponse(await asyncio.to_thread(chat_store(request).listed, request.query_params))

    @app.get("/v1/chat/completions/{completion_id}")
    async def get_chat_completion(request: Request, completion_id: str) -> JSONResponse:
        return JSONResponse(await asyncio.to_thread(chat_store(request).get, completion_id))

    @app.post("/v1/chat/completions/{completion_id}")
    async def update_chat_completion(request: Request, completion_id: str) -> JSONResponse:
        metadata = await metadata_of(request)
        return JSONResponse(await asyncio.to_thread(chat_store(request).set_metadata, completion_id, metadata))

    @app.delete("/v1/chat/completions/{completion_id}")
    async def delete_chat_completion(request: Request, completion_id: str) -> JSONResponse:
        return JSONResponse(await asyncio.to_thread(chat_store(request).delete, completion_id))

    @app.get("/v1/chat/completions/{completion_id}/messages")
    async def chat_completion_messages(request: Request, completion_id: str) -> JSONResponse:
        return JSONResponse(await asyncio.to_thread(chat_store(request).messages, completion_id, request.query_params))

    @app.post("/v1/responses")
    async def responses(request: Request) -> Response:
        kept, talks, _ = stores(project_of(request) or "")  # (complete() answers a wrong key)
        asked = ResponsesRequest(settings.model_id, settings.default_mode, settings.chat_template, kept, talks)
        publish = None if relay is None else lambda rid: functools.partial(relay.publish, rid)
        return await complete(request, lambda raw: asked.parse(raw, byte_limit(ready())), "responses", asked.answer,
                              asked.frame, asked.refit,
                              lambda work: asked.start(work, running, replays, publish))  # fmt: skip

    @app.post("/v1/responses/input_tokens")
    async def count_input_tokens(request: Request) -> JSONResponse:
        kept, talks, _ = stores(authorize(request))
        asked = ResponsesRequest(settings.model_id, settings.default_mode, settings.chat_template, kept, talks)
        raw = await _read_body(request, settings.max_body)
        # off the event loop: a conversation is read from the store, and the template renders it
        return JSONResponse(await asyncio.to_thread(asked.count, raw, byte_limit(ready())))

    async def take_cancels() -> None:
        """Stop the background responses a cancel was asked for on another replica (a round trip
        to the relay every CANCEL_POLL_S while any runs here)."""
        assert relay is not None
        failing = False  # said once per run of failures, not four times a second
        while True:
            await asyncio.sleep(CANCEL_POLL_S)
            if not running:
                continue
            try:
                asked = await relay.cancelled(list(running))
            except Exception as e:  # noqa: BLE001 (the store actor restarting: asked again next time)
                if not failing:
                    logger.warning("fastblt: cancels of background responses not read (asked again until they "
                                   "are): %r", e)  # fmt: skip
                failing = True
                continue
            failing = False
            for rid in asked:
                if (job := running.get(rid)) is not None:
                    await job.cancel()

    @app.post("/v1/responses/{response_id}/cancel")
    async def cancel_response(request: Request, response_id: str) -> JSONResponse:
        found, kept = await stored(request, response_id)
        found = found.response
        if not found.get("background"):
            raise ApiError(400, f"response {response_id!r:.80}: only a background response can be cancelled", None,
                           "not_cancellable")  # fmt: skip
        if (job := running.get(response_id)) is not None:
            await job.cancel()
        elif relay is not None and found["status"] in RUNNING:  # another replica runs it
            await relay.cancel(response_id)
            found = await asyncio.to_thread(kept.cancel, response_id) or found
            return JSONResponse(found)
        return JSONResponse((await stored(request, response_id))[0].response)

    # the stores' reads and writes off the event loop: in a file, a long conversation is megabytes of JSON
    async def stored(request: Request, response_id: str) -> tuple[Stored, ResponseStore]:
        """The kept response of the request's project, and that project's store; else a 404."""
        kept = stores(authorize(request))[0]
        found = None if kept is None else await asyncio.to_thread(kept.get, response_id)
        if found is None:
            raise ApiError(404, f"response {response_id!r:.80}: not kept here", None, "response_not_found")
        assert kept is not None
        if found.response["status"] in RUNNING and response_id not in running and await lost(found.response):
            error = {"code": "server_error", "message": f"response {response_id}: the server that ran it stopped "
                     "before it ended; send it again"}  # fmt: skip
            failed = found.response | {"status": "failed", "error": error}
            await asyncio.to_thread(kept.settle, failed, found.items, found.own, found.previous, found.streamed)
            found = await asyncio.to_thread(kept.get, response_id) or found
        return found, kept

    async def lost(response: dict) -> bool:
        """Whether a background response that runs on no replica here runs anywhere: a server alone
        runs every one it has (one kept running is left from a server that stopped without
        ending it: killed); a replica of many asks the relay whether its replica holds its lease."""
        if relay is None:
            return True
        return await relay.lost(response["id"], time.time() - response["created_at"])

    @app.get("/v1/responses/{response_id}")
    async def get_response(request: Request, response_id: str) -> Response:
        """The kept Response; with stream=true, a background stream's events (after `starting_after`)."""
        query = request.query_params
        stream = query.get("stream", "false").lower()
        if stream not in ("true", "false"):
            raise ApiError(400, f"stream: expected true or false, got {stream!r:.20}", "stream")
        after = query.get("starting_after")
        if after is not None and (not after.isdigit() or stream == "false"):
            raise ApiError(400, f"starting_after: expected a sequence number (an integer >= 0) with stream=true, "
                           f"got {after!r:.20}", "starting_after")  # fmt: skip
        found, _ = await stored(request, response_id)
        if stream == "false":
            return JSONResponse(found.response)
        log, start = None if replays is None else replays.get(response_id), int(after or -1)
        if log is not None:
            events = log.follow(start)
        elif found.streamed and (published := await read_published(response_id, start, found.response)) is not None:
            events = remote_follow(relay, response_id, start, *published)  # type: ignore[arg-type]
        else:
            raise ApiError(400, f"response {response_id!r:.80}: its events are not kept: only a response created "
                           "with background and stream is streamed again, while it runs and for a while after it "
                           "ended; GET it without stream=true", "stream")  # fmt: skip
        return StreamingResponse(events, media_type="text/event-stream", headers=NO_CACHE)

    async def read_published(response_id: str, after: int, response: dict) -> tuple[list[bytes], bool] | None:
        """The first events after `after` of a background stream another replica runs (None: not
        published): its replica may not have published its first (or last) events yet."""
        if relay is None:
            return None
        deadline = time.monotonic() + PUBLISHED_WAIT_S
        while (got := await relay.read(response_id, after)) is None and response.get("background"):
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(POLL_S)
        return got

    @app.delete("/v1/responses/{response_id}")
    async def delete_response(request: Request, response_id: str) -> JSONResponse:
        found, kept = await stored(request, response_id)
        assert replays is not None
        if (job := running.get(response_id)) is not None:  # stopped first: its end would keep it again
            await job.cancel()
        elif relay is not None and found.response["status"] in RUNNING:  # another replica runs it (its
            await relay.cancel(response_id)  # end does not keep a deleted one): its rows freed
        await asyncio.to_thread(kept.delete, response_id)
        replays.drop(response_id)
        if relay is not None:
            await relay.drop(response_id)
        return JSONResponse({"id": response_id, "object": "response", "deleted": True})

    async def body_of(request: Request) -> dict:
        """A conversation request's checked JSON object (an empty body: {})."""
        authorize(request)
        raw = await _read_body(request, settings.max_body)
        return load_json(raw) if raw.strip() else {}

    async def metadata_of(request: Request) -> dict[str, str]:
        """An update's new labels: its body is {"metadata": {...}} (required, and its only field)."""
        body = await body_of(request)
        check_fields(body, {"metadata"}, {})
        if "metadata" not in body:
            raise ApiError(400, "metadata: required", "metadata")
        return get_metadata(body) or {}

    def conversation(conversation_id: str, found: T | None) -> T:
        if found is None:
            raise ApiError(404, f"conversation {conversation_id!r:.80}: not kept here", None, "conversation_not_found")
        return found

    def conversations(request: Request) -> ConversationStore:
        return kept_here(stores(authorize(request))[1], "conversations")

    @app.post("/v1/conversations")
    async def create_conversation(request: Request) -> JSONResponse:
        body = await body_of(request)
        check_fields(body, {"items", "metadata", "safety_identifier"}, {})
        items = await asyncio.to_thread(conversation_items, body.get("items"))
        return JSONResponse(await asyncio.to_thread(conversations(request).create, items, get_metadata(body) or {}))

    @app.get("/v1/conversations/{conversation_id}")
    async def get_conversation(request: Request, conversation_id: str) -> JSONResponse:
        return JSONResponse(
            conversation(conversation_id, await asyncio.to_thread(conversations(request).public, conversation_id))
        )

    @app.post("/v1/conversations/{conversation_id}")
    async def update_conversation(request: Request, conversation_id: str) -> JSONResponse:
        metadata = await metadata_of(request)
        found = await asyncio.to_thread(conversations(request).set_metadata, conversation_id, metadata)
        return JSONResponse(conversation(conversation_id, found))

    @app.delete("/v1/conversations/{conversation_id}")
    async def delete_conversation(request: Request, conversation_id: str) -> JSONResponse:
        conversation(conversation_id, await asyncio.to_thread(conversations(request).delete, conversation_id) or None)
        return JSONResponse({"id": conversation_id, "object": "conversation.deleted", "deleted": True})

    @app.post("/v1/conversations/{conversation_id}/items")
    async def add_items(request: Request, conversation_id: str) -> JSONResponse:
        body = await body_of(request)
        check_fields(body, {"items"}, {})
        items = await asyncio.to_thread(conversation_items, get_field(body, "items", list, required=True))
        store = conversations(request)
        check_new_ids(items, conversation(conversation_id, await asyncio.to_thread(store.items, conversation_id)))
        conversation(conversation_id, await asyncio.to_thread(store.add, conversation_id, items) or None)
        return JSONResponse({"object": "list", "data": items, "first_id": items[0]["id"] if items else None,
                             "last_id": items[-1]["id"] if items else None, "has_more": False})  # fmt: skip

    @app.get("/v1/conversations/{conversation_id}/items")
    async def list_items(request: Request, conversation_id: str) -> JSONResponse:
        items = conversation(conversation_id, await asyncio.to_thread(conversations(request).items, conversation_id))
        return JSONResponse(ordered_page(items, dict(request.query_params)))

    @app.get("/v1/conversations/{conversation_id}/items/{item_id}")
    async def get_item(request: Request, conversation_id: str, item_id: str) -> JSONResponse:
        items = conversation(conversation_id, await asyncio.to_thread(conversations(request).items, conversation_id))
        item = next((i for i in items if i.get("id") == item_id), None)
        if item is None:
            raise ApiError(404, f"item {item_id!r:.80}: not in conversation {conversation_id}", None, "item_not_found")
        return JSONResponse(item)

    @app.delete("/v1/conversations/{conversation_id}/items/{item_id}")
    async def delete_item(request: Request, conversation_id: str, item_id: str) -> JSONResponse:
        dropped = conversation(
            conversation_id, await asyncio.to_thread(conversations(request).delete_item, conversation_id, item_id)
        )
        if not dropped:
            raise ApiError(404, f"item {item_id!r:.80}: not in conversation {conversation_id}", None, "item_not_found")
        return JSONResponse(await asyncio.to_thread(conversations(request).public, conversation_id))

    @app.get("/v1/responses/{response_id}/input_items")
    async def input_items(request: Request, response_id: str) -> JSONResponse:
        found, _ = await stored(request, response_id)
        return JSONResponse(input_items_page(found, dict(request.query_params)))

    return app


# ---------------------------------------------------------------------------- helpers
def allowed_methods(request: Request) -> list[str]:
    """Every method some route of the request's path answers (a 405's Allow)."""
    routes = request.app.router.routes
    found = {m for r in routes if getattr(r, "methods", None) and r.matches(request.scope)[0] != Match.NONE
             for m in r.methods}  # fmt: skip
    return sorted(found)


def kept_here(store: T | None, what: str) -> T:
    """A store of the server's, or the 404 of a server that keeps none (--response-store-mb 0)."""
    if store is None:
        raise ApiError(404, f"{what}: none are kept on this server (--response-store-mb 0)", None, "not_found")
    return store


@dataclasses.dataclass(frozen=True)
class _Job:
    """One request to the engine and the choices its generation answers: a prompt's choice each
    when sampling, all of a prompt's n choices when greedy (their bytes are the same); with
    best_of > n, a candidate, whose choice (if any) is known once all have ended (`_pick_best`)."""

    req: Any
    prompt: str
    indices: list[int]
    prompt_index: int = 0


def _jobs(eng: AsyncEngine, comp: Completion) -> list[_Job]:
    """The engine's requests for every prompt's n choices, or best_of candidates (candidate i of a
    prompt with seed + i when a seed is given; candidates score their bytes, to be ranked). Choice
    indices run prompt by prompt, as OpenAI's do."""
    jobs, ranked = [], comp.candidates > comp.n
    for p, prompt in enumerate(comp.prompts):
        req, first = _request(eng, comp, prompt, p), p * comp.n
        if comp.candidates == 1 or req.opts.temperature == 0 or not comp.sends_bytes:  # one answer for all
            jobs.append(_Job(req, prompt, list(range(first, first + comp.n)), p))
            continue
        for i in range(comp.candidates):
            opts = dataclasses.replace(req.opts, seed=None if req.opts.seed is None else (req.opts.seed + i) % 2**63)
            if ranked and opts.logprobs is None:
                opts = dataclasses.replace(opts, logprobs=0)
            jobs.append(_Job(dataclasses.replace(req, opts=opts), prompt, [] if ranked else [first + i], p))
    if len(jobs) > eng.capacity:  # more than ever fit at once: a 429 would not pass on retry
        field = "best_of" if ranked else "n" if comp.n > 1 else "prompt"
        each = f"best_of {comp.candidates}" if ranked else f"n {comp.n}"
        raise ApiError(400, f"{field}: {len(comp.prompts)} prompts x {each} need {len(jobs)} requests; this "
                       f"server holds at most {eng.capacity} (--max-batch rows + --max-queue)", field)  # fmt: skip
    return jobs


def _pick_best(comp: Completion, jobs: list[_Job], gens: list[Generation]) -> list[_Job]:
    """best_of > n: each prompt's n candidates with the highest mean log-probability per generated
    byte (OpenAI's rule) become its choices, best first; the others are sent nowhere."""
    out, order = list(jobs), {}
    for k, (job, gen) in enumerate(zip(jobs, gens, strict=True)):
        if not job.indices:
            score = sum(gen.logprobs) / len(gen.logprobs) if gen.logprobs else -math.inf
            order.setdefault(job.prompt_index, []).append((-score, k))
    for p, ranked in order.items():
        for rank, (_, k) in enumerate(sorted(ranked)[: comp.n]):
            out[k] = dataclasses.replace(jobs[k], indices=[p * comp.n + rank])
    return out


def _answer(comp: Completion, jobs: list[_Job], gens: list[Generation], model_id: str, fp: str | None) -> dict:
    """A non-streamed completion: every job's generation is the choices it serves. With echo, a
    choice's text (and logprobs) start with its prompt's; with max_tokens 0 the byte the engine
    decoded is not part of the answer."""
    sent, choices, generated = comp.sends_bytes, [], 0
    jobs = _pick_best(comp, jobs, gens) if comp.candidates > comp.n else jobs
    for job, gen in zip(jobs, gens, strict=True):
        text = (job.prompt if comp.echo else "") + (gen.text if sent else "")
        reason = finish_reason(gen.stop_reason) if sent else "length"
        logprobs = None if comp.logprobs is None else _logprobs(comp, job, gen, sent)
        choices += [comp.shape.choice(text, reason, i, logprobs) for i in job.indices]
        generated += len(gen.ids) * max(len(job.indices), 1) if sent else 0  # a candidate not sent counts too
    choices.sort(key=lambda c: c["index"])
    used = _usage(comp, jobs, gens, generated)
    return comp.shape.body(comp.shape.new_id(), model_id, choices, used, fingerprint=fp)


def _usage(comp: Completion, jobs: list[_Job], gens: list[Generation], generated: int) -> dict:
    """Usage in bytes; each prompt's cached bytes (loaded from a snapshot, BOS not counted) once,
    as its bytes are, however many of its choices loaded it."""
    cached: dict[int, int] = {}
    for job, gen in zip(jobs, gens, strict=True):
        p = job.prompt_index
        cached[p] = max(cached.get(p, 0), gen.stats.prompt_cached - 1, 0)
    return usage(sum(len(p.encode()) for p in comp.prompts), generated, sum(cached.values()))


def _logprobs(comp: Completion, job: _Job, gen: Generation, sent: bool) -> dict:
    ids, data, lps, tops = [], b"", [], []
    if comp.echo:
        ids, data, lps, tops = list(job.req.ids[1:]), job.prompt.encode(), gen.prompt_logprobs, gen.prompt_top_logprobs
    if sent:
        ids, data, lps, tops = ids + gen.ids, data + gen.bytes, lps + gen.logprobs, tops + gen.top_logprobs
    return comp.shape.scores().add(ids, lps, tops, len(data))


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 past `limit` bytes (by Content-Length, or while it arrives)."""
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > limit):
        raise ApiError(413, f"body: {length} bytes exceed the limit of {limit}", None, "body_too_large")
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise ApiError(413, f"body: more than the limit of {limit} bytes", None, "body_too_large")
    except ClientDisconnect:
        raise ApiError(499, "client closed the request while sending it", None, "client_closed") from None
    return bytes(body)


async def _fitted(comp: Completion, refit: Callable[[PositionLimit], Completion | None] | None,
                  attempt: Callable[[Completion], Coroutine[Any, Any, T]]) -> tuple[Completion, T]:  # fmt: skip
    """`attempt(comp)`, and again on the request shortened by `refit` (off the event loop) while
    its text reaches the model's position limit before its answer begins, MAX_REFITS times at
    most; the request attempted last and what it gave. Past that, or with no refit, the 400 that
    names the field to shorten, for the request attempted last."""
    refits = 0
    while True:
        try:
            return comp, await attempt(comp)
        except PositionLimit as e:
            shorter = None if refit is None or refits == MAX_REFITS else await asyncio.to_thread(refit, e)
            if shorter is None:
                raise _field_error(e, comp) from None
            comp, refits = shorter, refits + 1


@contextlib.contextmanager
def _running_task(work: Coroutine[Any, Any, None], name: str) -> Iterator[asyncio.Task]:
    """`work` as a task while the block runs, cancelled after it."""
    task = asyncio.get_running_loop().create_task(work, name=name)
    try:
        yield task
    finally:
        task.cancel()


@contextlib.contextmanager
def _as_api_errors(comp: Completion) -> Iterator[None]:
    """The engine's errors as the ApiErrors a client would be answered with (a background request's)."""
    try:
        yield
    except EngineBusy as e:
        raise ApiError(429, str(e), None, "queue_full", "rate_limit_error") from None
    except LaneLost as e:
        raise _lane_lost(e) from None
    except EngineClosed as e:
        raise ApiError(503, str(e), None, "shutting_down", "server_error") from None
    except FastBltError as e:
        raise _field_error(e, comp) from None


def byte_limit(eng: AsyncEngine) -> int:
    """Bytes a request's prompt and answer may take together: `serve --max-context` (the engine's
    max_context less the BOS id and the byte a scoring request decodes and drops), else the serve
    CLI's default limit (4 bytes per patch of the global model's position limit)."""
    g = eng.generator
    if g.max_context is not None:
        return g.max_context - SERVE_EXTRA_IDS
    return BYTES_PER_PATCH * g.config.global_model.max_positions


def _request(eng: AsyncEngine, comp: Completion, prompt: str, p: int = 0):
    """The engine's checked Request for `prompt` (the p-th); a refused option is a 400 naming the
    field. The size limit (`serve --max-context`: the engine's max_context less the BOS id and the
    byte a scoring request decodes and drops) is checked here, in the request's terms."""
    g = eng.generator
    limit = None if g.max_context is None else g.max_context - SERVE_EXTRA_IDS
    size = len(prompt.encode())
    which = f"{comp.prompt_field}[{p}]" if len(comp.prompts) > 1 else comp.prompt_field
    max_tokens = comp.max_tokens
    if max_tokens is None:  # as much as fits: up to the limit, else the serve CLI's default limit
        cap = byte_limit(eng)
        room = cap - size
        if room < 1:
            raise ApiError(400, f"{which}: {size} bytes leave no room under this server's limit of {cap} bytes "
                           f"per request; shorten the {comp.prompt_field}", comp.prompt_field,
                           "context_length_exceeded")  # fmt: skip
        max_tokens = room
    elif limit is not None and size + max_tokens > limit:
        field = comp.tokens_field
        fix = f"shorten the {comp.prompt_field}" if size >= limit else f"lower {field} to at most {limit - size}"
        raise ApiError(400, f"{which} + {field}: {size} + {max_tokens} bytes exceed this server's limit "
                       f"of {limit} bytes per request; {fix}", comp.prompt_field if size >= limit else field,
                       "context_length_exceeded")  # fmt: skip
    try:
        return eng.request(prompt, max_bytes=max(max_tokens, 1), **comp.options)  # max_tokens 0 decodes one
    except (InputError, CapabilityError) as e:
        raise _field_error(e, comp) from None


_OPTION = re.compile(r"^(?:options?|prompt) ?([\w/]*)")


def _lane_lost(e: LaneLost, retry_after: int = 1) -> ApiError:
    """A 503 the client may send again after Retry-After: the lane that ran (or was to run) the
    request lost its worker process, and another is starting."""
    return ApiError(503, f"{e}; send the request again", None, "lane_lost", "server_error",
                    {"Retry-After": str(retry_after)})  # fmt: skip


def _field_error(e: FastBltError, comp: Completion) -> ApiError:
    """A 400 for an engine error, naming the request field it is about (engine messages start with
    what they name). A sequence past the global model's position limit is the prompt's fault when
    the prompt alone reaches it, else max_tokens'. A lost lane (mid-stream): its 503."""
    if isinstance(e, LaneLost):
        return _lane_lost(e)
    if isinstance(e, PositionLimit):
        prompt = max(len(p.encode()) for p in comp.prompts)  # the longest: the likeliest to have reached it
        if e.bytes_read <= prompt + 1:  # + 1: the BOS id
            param = comp.prompt_field
            fix = f"shorten the {param}"
        else:
            param = comp.tokens_field
            fix = f"lower {param} below {e.bytes_read - prompt - 1}"
        return ApiError(400, f"{param}: the text reaches the model's limit of {e.limit} patches after "
                        f"{e.bytes_read - 1} bytes ({prompt} in the prompt); {fix}", param,
                        "context_length_exceeded")  # fmt: skip
    text, param = str(e), None
    if (m := _OPTION.match(text)) is not None:
        names = {"max_bytes": comp.tokens_field, "": comp.prompt_field, "prompt_logprobs": "logprobs",
                 "format": comp.format_field, "schema": comp.format_field, "pattern": comp.format_field,
                 "grammar": comp.format_field,
                 }.get(m.group(1), m.group(1))  # fmt: skip
        names = names.split("/")
        param = next((n for n in names if n in comp.options), names[0])  # the one the request gave
    elif text.startswith("mode") or isinstance(e, CapabilityError):
        param = "mode"
    return ApiError(400, text, param)


class _InFlight:
    """The requests a server is answering, for a shutdown whose grace period runs out: `stop` ends
    them with an answer (a 503, or an error event and [DONE] on a stream) rather than leaving
    uvicorn to cancel them mid-body."""

    def __init__(self) -> None:
        self.stopping = asyncio.Event()
        self.streams: set[TextStream] = set()

    def stop(self) -> None:  # on the event loop
        self.stopping.set()
        for stream in list(self.streams):
            stream.cancel()

    @staticmethod
    def error() -> ApiError:
        return ApiError(503, "server: shutting down; the request was stopped when the server's grace period "
                        "(--graceful-timeout) ran out", None, "shutting_down", "server_error")  # fmt: skip


async def _unless_gone(work: Coroutine[Any, Any, T], request: Request, inflight: _InFlight) -> T:
    """Await `work`, cancelling it (and answering 499) if the client goes away first, or (503) if
    the server stops it."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnected(request))
    stop = asyncio.ensure_future(inflight.stopping.wait())
    try:
        await asyncio.wait({task, watch, stop}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        stop.cancel()
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, FastBltError):
            await task
        if inflight.stopping.is_set():
            raise inflight.error()
        raise ApiError(499, "client closed the request", None, "client_closed")
    try:
        return task.result()
    except Cancelled:  # the server's stop reached the request before this saw the stop
        if inflight.stopping.is_set():
            raise inflight.error() from None
        raise


async def _disconnected(request: Request, every: float = 0.1) -> None:
    while not await request.is_disconnected():
        await asyncio.sleep(every)


async def _together(work: Iterable[Coroutine[Any, Any, T]]) -> list[T]:
    """Every result, or the first error with the rest cancelled (a choice that cannot run frees
    the others' rows)."""
    tasks = [asyncio.ensure_future(w) for w in work]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


async def _stream(eng: AsyncEngine, comp: Completion, jobs: list[_Job], request: Request | None, inflight: _InFlight,
                  settings: ServeSettings, m: Metrics, record: RequestRecord, fp: str | None,
                  endpoint: str, frame: Callable[[dict | str], bytes] = sse) -> StreamingResponse:  # fmt: skip
    """Start the streams (a choice each; one when greedy) and wait for each one's first event, so
    a failing prefill is still a 4xx and a client that leaves while its requests wait for rows
    frees their places (`request` None: no client to watch, a background request's). Chunks of
    all choices go out as they come, each with its index. The status is counted and logged when
    the response ends: 200, 499 when the client left first, or an error's."""
    streams: list[TextStream] = []
    try:
        for job in jobs:
            streams.append(eng.stream(job.req))
        opening = _together(_first(s) for s in streams)
        firsts = await (opening if request is None else _unless_gone(opening, request, inflight))
    except BaseException:
        for s in streams:
            s.cancel()
        raise
    shape = comp.shape
    cid, created = shape.new_id(), int(time.time())

    scored = [shape.scores() for _ in jobs]  # logprobs: each stream's offsets run on from chunk to chunk
    started = [False] * len(jobs)  # a choice's first chunk says whose message it is (chat)
    split = [_echo_scores(comp, job, s, first) for job, s, first in zip(jobs, streams, firsts, strict=True)]
    echoed, firsts = [e for e, _ in split], [f for _, f in split]

    def chunk(j: int, text: str, reason: str | None = None, scores: Scores | None = None) -> bytes:
        logprobs = None if scores is None else scored[j].add(*scores)
        choices = [shape.delta(text, reason, i, logprobs, not started[j]) for i in jobs[j].indices]
        started[j] = True
        if reason is not None:  # counted as the choice ends: the calls that closed, as a whole answer's
            m.tool_calls(comp.options["mode"], sum(shape.calls(i) for i in jobs[j].indices))
        body = shape.body(cid, settings.model_id, choices, created=created, fingerprint=fp, chunk=True)
        if comp.include_usage:
            body["usage"] = None  # only the last chunk, after the choices, carries it
        return frame(body)

    async def events() -> AsyncIterator[bytes]:
        status, error, reasons, used = 499, None, [], None  # unless it gets to its end
        inflight.streams.update(streams)
        news: asyncio.Queue = asyncio.Queue()
        pumps = [asyncio.ensure_future(_pump(j, s, first, news, settings.stream_interval))
                 for j, (s, first) in enumerate(zip(streams, firsts, strict=True))]  # fmt: skip
        try:
            if comp.echo:
                for j, job in enumerate(jobs):
                    yield chunk(j, job.prompt, scores=echoed[j])
            generated, ended = 0, 0
            while ended < len(streams):
                j, text, scores = await news.get()
                if isinstance(text, BaseException):
                    raise text
                if text is not None:
                    yield chunk(j, text, scores=scores)
                    continue
                ended, gen = ended + 1, streams[j].generation
                if gen is None:  # cancelled while the client still reads: the server stopped it
                    raise inflight.error()
                m.generation(gen, record.arrived)
                record.byte_times(gen.times)
                generated += len(gen.ids) * len(jobs[j].indices)
                reasons.append(finish_reason(gen.stop_reason))
                yield chunk(j, "", reasons[-1])
            status = 200
            used = _usage(comp, jobs, [s.generation for s in streams], generated)
            if comp.include_usage:
                body = shape.body(cid, settings.model_id, [], used, created, fp, chunk=True)
                yield frame(body)
            yield await asyncio.to_thread(frame, "[DONE]")  # the last frame may keep the answer (a file's write)
        except (FastBltError, ApiError) as e:  # bytes already went out: the failure is an event
            if isinstance(e, Cancelled) and inflight.stopping.is_set():  # it ended before the stream saw why
                e = inflight.error()
            error = e if isinstance(e, ApiError) else _field_error(e, comp)
            status = error.status
            yield frame(error.body())
            yield frame("[DONE]")
        except Exception as e:  # our own failure (a lane that died): still an event, not a cut body
            status, error = 500, ApiError(500, f"internal error: {e}", kind="server_error")
            yield frame(error.body())
            yield frame("[DONE]")
        finally:
            for pump in pumps:
                pump.cancel()
            for s in streams:
                inflight.streams.discard(s)
                s.cancel()  # a no-op once it finished; frees the row when the client went away
            m.request(status, comp.options["mode"], endpoint)
            if error is not None:
                record.end(status, error=error.message, param=error.param)
            else:  # 200, or 499
                record.end(status, used, reasons, error="client disconnected" if used is None else None)

    return StreamingResponse(events(), media_type="text/event-stream", headers=NO_CACHE)


async def _pump(j: int, stream: TextStream, first: tuple[str, Scores | None] | None, news: asyncio.Queue,
                interval: float = 0.0) -> None:  # fmt: skip
    """Stream `j`'s chunks onto `news` as (j, text, scores), then (j, None, None) at its end, or
    (j, error, None). With an `interval`, a chunk at most that often: the stream joins the text
    its batch makes while this waits (and its end does not wait)."""
    try:
        if first is not None:
            news.put_nowait((j, *first))
            while True:
                if interval:
                    await stream.pause(interval)
                try:
                    text = await stream.__anext__()
                except StopAsyncIteration:
                    break
                news.put_nowait((j, text, stream.chunk_scores))
        news.put_nowait((j, None, None))
    except Exception as e:  # noqa: BLE001 (the response turns it into an error event)
        news.put_nowait((j, e, None))


def _echo_scores(comp: Completion, job: _Job, stream: TextStream, first: tuple[str, Scores | None] | None
                 ) -> tuple[Scores | None, tuple[str, Scores | None] | None]:  # fmt: skip
    """The echo chunk's scores (None unless echo and logprobs) and the first chunk with its own:
    the batch sends the prompt's at the head of the first chunk's; a stream that ended without a
    chunk has them in its generation."""
    if not comp.echo or comp.logprobs is None:
        return None, first
    if first is None:
        gen = stream.generation
        return (list(job.req.ids[1:]), gen.prompt_logprobs, gen.prompt_top_logprobs), None
    n = len(job.req.ids) - 1
    text, (ids, logprobs, tops) = first
    return (ids[:n], logprobs[:n], tops[:n]), (text, (ids[n:], logprobs[n:], tops[n:]))


async def _first(stream: TextStream) -> tuple[str, Scores | None] | None:
    """A stream's first chunk and its scores, or None when it ends without one."""
    try:
        return await stream.__anext__(), stream.chunk_scores
    except StopAsyncIteration:
        return None


async def call_app(app: Any, method: str, path: str, body: bytes = b"", request_headers: dict[str, str] | None = None,
                   project: str | None = None) -> tuple[int, dict[str, str], bytes]:  # fmt: skip
    """A request to an ASGI app in this process (no socket): (status, headers, body). The caller
    never leaves, so the request is never cancelled as a client that left would be. `project`:
    the request is that project's (`fastblt serve --project`), whatever key it sends."""
    sent = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    sent += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (request_headers or {}).items()]
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "", "headers": sent,
             "client": ("127.0.0.1", 0), "server": ("in-process", 0)}  # fmt: skip
    if project is not None:
        scope[PROJECT] = project
    given, forever = False, asyncio.Event()
    status, headers, chunks = 500, {}, []

    async def receive() -> dict:
        nonlocal given
        if not given:
            given = True
            return {"type": "http.request", "body": body, "more_body": False}
        await forever.wait()  # no disconnect
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
            headers.update((k.decode("latin-1"), v.decode("latin-1")) for k, v in message.get("headers", []))
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    try:
        await app(scope, receive, send)
    except Exception:  # a 500: Starlette sends its response, then raises for the server to log
        if not chunks:
            raise
    return status, headers, b"".join(chunks)


class _Headers:
    """ASGI middleware: every HTTP response names the replica that served it and the request's id
    (request_log.request_id: the client's x-request-id, or a new one), which the request's scope
    holds for the request log. Behind Ray Serve's proxy (`echo_id` off) the id is the one the
    proxy forwards and answers with itself."""

    def __init__(self, app, replica: str, echo_id: bool = True):
        self.app, self.replica, self.echo_id = app, (REPLICA_HEADER.encode(), replica.encode()), echo_id

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = next((v.decode("latin-1") for k, v in scope["headers"] if k == REQUEST_ID_HEADER.encode()), None)
        rid = scope[REQUEST_ID] = request_id(given) if self.echo_id or not given else given
        headers = [self.replica] + ([(REQUEST_ID_HEADER.encode(), rid.encode())] if self.echo_id else [])

        async def send_with_headers(message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *headers]}
            await send(message)

        await self.app(scope, receive, send_with_headers)
