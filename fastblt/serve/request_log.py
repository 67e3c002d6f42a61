"""Request ids and the request log: one line per completion request, under an id the client has.

A service's operators read its logs per request (what was asked, what came back, how long it
took, why it failed), and its clients quote an id when something went wrong. Every response of
the server carries `x-request-id` (the openai client reads it into `completion._request_id`): the
client's own, when it sent a plain token (a load balancer's or a tracer's), else a new
`req_<24 hex>`. Each completions request, answered or refused, then logs one line in logfmt
(key=value, values with spaces quoted) on the logger `fastblt.requests`, at INFO (ERROR for a
5xx), e.g.

    request_id=req_5f0c... endpoint=completions status=200 mode=blt-s stream=false choices=1
    prompt_bytes=9 cached_bytes=0 completion_bytes=64 finish=length ttfb_ms=11.8 ms=52.3

A refused one names the field as its error body does (`status=400 param=temperature error="..."`);
a request with a W3C `traceparent` header (an OpenTelemetry caller's) also logs its `trace_id`.
Nothing else of the prompt or the text reaches the log.

For log pipelines that read JSON, `JsonFormatter` writes every record as one JSON object per
line: a request's fields typed (numbers as numbers) at its top level, uvicorn's access lines as
client, method, path and status.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime

HEADER = "x-request-id"
LOGGER = "fastblt.requests"
# a client's id kept as given: printable ASCII without spaces, quotes or backslashes, so it goes
# into a header and a log line as it came
_PLAIN = re.compile(r"[!#-\[\]-~]{1,128}")
_BARE = re.compile(r"[A-Za-z0-9_.:/@+,-]+")  # a logfmt value written without quotes
MAX_VALUE = 256  # characters of a value the request chose (user, error) kept in its line: no log floods
# W3C Trace Context's traceparent: version-trace_id-parent_id-flags (https://www.w3.org/TR/trace-context/)
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}(-.*)?")


def request_id(given: str | None) -> str:
    """The client's id when it is a plain token of at most 128 characters, else a new one."""
    if given is not None and _PLAIN.fullmatch(given):
        return given
    return "req_" + secrets.token_hex(12)


def trace_id(traceparent: str | None) -> str | None:
    """The trace id of a W3C `traceparent` header (a caller's OpenTelemetry span), if it is one:
    logged beside the request's id, it finds the request from the caller's trace."""
    m = _TRACEPARENT.fullmatch(traceparent.strip()) if traceparent else None
    if m is None or m[1] == "ff" or (m[1] == "00" and m[4]) or set(m[2]) == {"0"} or set(m[3]) == {"0"}:
        return None
    return m[2]


def logfmt(fields: dict[str, object]) -> str:
    """`key=value ...`; values with anything but plain characters quoted, with quotes, backslashes
    and control characters escaped, so a value cannot end its line or forge another field."""
    parts = []
    for key, value in fields.items():
        text = ("true" if value else "false") if isinstance(value, bool) else str(value)
        if not _BARE.fullmatch(text):
            text = '"' + "".join(_escaped(c) for c in text) + '"'
        parts.append(f"{key}={text}")
    return " ".join(parts)


def _cut(text: str) -> str:
    return text if len(text) <= MAX_VALUE else text[: MAX_VALUE - 1] + "…"


def _escaped(c: str) -> str:
    if c in '"\\':
        return "\\" + c
    return c if c.isprintable() else c.encode("unicode_escape").decode("ascii")


class RequestRecord:
    """What one request's log line says, filled in as the request goes (perf_counter times).
    `structured`: the fields go on the log record as attributes (for a JSON formatter, this
    module's or Ray Serve's) under a short message, instead of into a logfmt message."""

    def __init__(self, rid: str, endpoint: str, arrived: float, logger: str = LOGGER, trace: str | None = None,
                 structured: bool = False):  # fmt: skip
        self.id, self.endpoint, self.arrived, self.logger = rid, endpoint, arrived, logger
        self.structured = structured
        self.fields: dict[str, object] = {} if trace is None else {"trace_id": trace}
        self.first: float | None = None  # when a choice's first byte was verified
        self.ended = False
        # told the status and usage as the line is logged (the server's per-project counters)
        self.counted: Callable[[int, dict | None], None] | None = None

    def parsed(self, mode: str, stream: bool, choices: int, prompt_bytes: int, user: str | None,
               priority: int = 0) -> None:  # fmt: skip
        """The checked request: what it asks for (its priority when not the default)."""
        self.fields.update(mode=mode, stream=stream, choices=choices, prompt_bytes=prompt_bytes)
        if priority:
            self.fields["priority"] = priority
        if user:
            self.fields["user"] = _cut(user)

    def byte_times(self, times: list[float]) -> None:
        """A generation's verified-byte times: the earliest of any choice is the request's first."""
        if times:
            self.first = times[0] if self.first is None else min(self.first, times[0])

    def end(self, status: int, usage: dict | None = None, finish: Iterable[str] = (),
            error: str | None = None, param: str | None = None) -> None:  # fmt: skip
        """Log the line, once: the status, what was sent (OpenAI's `usage`, in bytes) and why each
        choice ended, or the error."""
        if self.ended:
            return
        self.ended = True
        if self.counted is not None:
            self.counted(status, usage)
        line: dict[str, object] = {"request_id": self.id, "endpoint": self.endpoint, "status": status}
        line.update(self.fields)
        if usage is not None:
            cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
            line.update(cached_bytes=cached, completion_bytes=usage["completion_tokens"])
        if reasons := sorted(set(finish)):
            line["finish"] = ",".join(reasons)
        if self.first is not None:
            line["ttfb_ms"] = round((self.first - self.arrived) * 1e3, 1)
        line["ms"] = round((time.perf_counter() - self.arrived) * 1e3, 1)
        if param is not None:
            line["param"] = param
        if error is not None:
            line["error"] = _cut(error)
        level, log = logging.ERROR if status >= 500 else logging.INFO, logging.getLogger(self.logger)
        if self.structured:
            log.log(level, "%s %s", self.endpoint, status, extra=line)
        else:
            log.log(level, "%s", logfmt(line))


# the attributes every LogRecord has: what a record carries besides them came as `extra`
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "color_message"}
_ACCESS = ("client", "method", "path", "http_version", "status")  # uvicorn.access's args, in order


class JsonFormatter(logging.Formatter):
    """One JSON object per record and line: time (UTC, ISO 8601), level, logger, message, then the
    record's `extra` fields (a request's) or uvicorn's access fields, and a traceback as `exc_info`.
    Strings are escaped ASCII, so no value can break its line."""

    def format(self, record: logging.LogRecord) -> str:
        when = datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
        out: dict[str, object] = {"time": when.replace("+00:00", "Z"), "level": record.levelname,
                                  "logger": record.name}  # fmt: skip
        if record.name == "uvicorn.access" and isinstance(record.args, tuple) and len(record.args) == len(_ACCESS):
            out |= dict(zip(_ACCESS, record.args, strict=True))
            out["message"] = f"{out['method']} {out['path']} {out['status']}"
        else:
            out["message"] = record.getMessage()
        out |= {k: v for k, v in vars(record).items() if k not in _STANDARD and k not in out and k[0] != "_"}
        if record.exc_info:
            out["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def uvicorn_log_config(log_format: str) -> dict | None:
    """uvicorn's `log_config` for a log format: None (its own) for text, else its loggers on
    stderr through JsonFormatter."""
    if log_format == "text":
        return None
    handler = {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"}
    return {
        "version": 1, "disable_existing_loggers": False,
        "formatters": {"json": {"()": f"{__name__}.JsonFormatter"}},
        "handlers": {"json": handler},
        "loggers": {"uvicorn": {"handlers": ["json"], "level": "INFO", "propagate": False},
                    "uvicorn.access": {"handlers": ["json"], "level": "INFO", "propagate": False}},
    }  # fmt: skip


def configure(level: str, name: str = "fastblt", log_format: str = "text") -> None:
    """Show `name`'s records (the request log, a lane's restarts) on stderr at `level`, as uvicorn
    shows its own (`INFO: fastblt.requests request_id=...`), or as JSON lines."""
    logger = logging.getLogger(name)
    logger.setLevel(level.upper())
    handler = next((h for h in logger.handlers if getattr(h, "_fastblt", False)), None)
    if handler is None:
        handler = logging.StreamHandler()
        handler._fastblt = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
        logger.propagate = False
    text = logging.Formatter("%(levelname)s: %(name)s %(message)s")
    handler.setFormatter(text if log_format == "text" else JsonFormatter())
