"""`fastblt serve`: the OpenAI-compatible server (fastblt/serve/app.py) under uvicorn."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

import click

from fastblt.engines.registry import BACKENDS
from fastblt.runtime.options import MODES

BYTES_PER_PATCH = 4  # the default --max-context per patch of the global model's limit (code averages ~3.8)


@click.command("serve")
@click.option("--checkpoint", default="default", show_default=True, help="'default' or a checkpoint directory.")
@click.option("--backend", type=click.Choice(BACKENDS), default="ort", show_default=True)
@click.option("--artifacts", default=None, help="Exported graphs (ort/trt); default: exported once into a cache.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (0.0.0.0: every interface).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--max-batch", type=click.IntRange(1, 1024), default=16, show_default=True,
              help="Requests decoding at once (rows of every batched step call).")  # fmt: skip
@click.option("--max-queue", type=click.IntRange(0), default=256, show_default=True,
              help="Requests waiting for a row; past it, 429 with Retry-After.")  # fmt: skip
@click.option("--mode", type=click.Choice(MODES), default="blt-s", show_default=True,
              help="Mode of a request that names none (blt-s: greedy output is ar's).")  # fmt: skip
@click.option("--api-key", default=None, envvar="FASTBLT_API_KEY",
              help="Require 'Authorization: Bearer KEY' on /v1/* [env: FASTBLT_API_KEY].")  # fmt: skip
@click.option("--model-name", default=None, help="The model id clients send [default: fastblt-<checkpoint name>].")
@click.option("--max-body", type=click.IntRange(1024), default=1 << 20, show_default=True,
              help="Largest request body in bytes (413 past it).")  # fmt: skip
@click.option("--max-context", type=click.IntRange(2), default=None,
              help="Most bytes (prompt + max_tokens) per request; more is a 400 [default: 4 per patch of the "
              "global model's position limit, 16,384 for the default].")  # fmt: skip
@click.option("--threads", type=int, default=None, help="Intra-op threads of the backend.")
@click.option("--device", default=None, help="torch/trt: where to compute (cpu, cuda, cuda:1).")
@click.option("--graceful-timeout", type=float, default=60.0, show_default=True,
              help="On SIGTERM/SIGINT: seconds to let requests in flight finish.")  # fmt: skip
@click.option("--log-level", type=click.Choice(["critical", "error", "warning", "info", "debug"]), default="info",
              show_default=True)  # fmt: skip
def serve(
    checkpoint, backend, artifacts, host, port, max_batch, max_queue, mode, api_key, model_name, max_body,
    max_context, threads, device, graceful_timeout, log_level,
):  # fmt: skip
    """Serve completions over HTTP, OpenAI-compatible, with continuous batching.

    \b
    Endpoints: POST /v1/completions (stream: true for server-sent events),
    GET /v1/models, GET /health, GET /metrics (Prometheus).
    max_tokens counts bytes; fastblt's own fields (mode, k, alpha, gamma, unmask,
    top_k, block_start) go in the body (the openai client's extra_body).

    \b
    Examples:
      fastblt serve --port 8000
      curl -s localhost:8000/v1/completions -H 'Content-Type: application/json' \\
           -d '{"model": "fastblt-default", "prompt": "def main(", "max_tokens": 64, "temperature": 0}'

    SIGTERM stops taking requests, lets those in flight finish, then exits 0.
    """
    import uvicorn

    from fastblt.cli.progress import first_use_notice

    _Server = _server_class()
    from fastblt.formats.checkpoint import load_config, resolve_checkpoint_path
    from fastblt.runtime.async_engine import AsyncEngine
    from fastblt.serve.app import ServeSettings, create_app

    path = resolve_checkpoint_path(checkpoint)
    name = model_name or f"fastblt-{'default' if checkpoint == 'default' else path.name}"
    if max_context is None:  # a request that cannot fit is refused before it runs, not past 16 KB of work
        max_context = BYTES_PER_PATCH * load_config(path).global_model.max_positions
    click.echo(f"fastblt serve: loading {checkpoint} on {backend} (max_batch {max_batch})", err=True)
    engine = AsyncEngine(
        checkpoint, backend, max_batch=max_batch, max_queue=max_queue, artifacts=artifacts, max_context=max_context,
        threads=threads, device=device, on_export=first_use_notice,
    )  # fmt: skip
    settings = ServeSettings(model_id=name, default_mode=mode, api_key=api_key, max_body=max_body)
    app = create_app(engine, settings)
    click.echo(f"fastblt serve: model {name!r} at http://{host}:{port}/v1", err=True)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=graceful_timeout)
    try:
        _Server(config).run()
    finally:
        engine.close()


def _server_class():
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, except that a SIGTERM / SIGINT ends in a normal exit (0) once the
        requests in flight have finished, instead of re-raising the signal afterwards."""

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    return Server
