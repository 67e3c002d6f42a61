"""`fastblt serve`: the OpenAI-compatible server (fastblt/serve/app.py) under uvicorn."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import click

from fastblt.cli.app_setup import app_setup, describe_lanes, engine_options, start_engine, to_stderr
from fastblt.cli.common import Positive
from fastblt.errors import InputError


@click.command("serve")
@engine_options
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (0.0.0.0: every interface).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--max-queue", type=click.IntRange(0), default=256, show_default=True,
              help="Requests waiting for a row (--ray: in each proxy); past it, 429 with Retry-After.")  # fmt: skip
@click.option("--api-key", multiple=True, envvar="FASTBLT_API_KEY", metavar="KEY",
              help="Require 'Authorization: Bearer KEY' on /v1/*; repeat to accept several while keys are rotated "
              "[env: FASTBLT_API_KEY, keys separated by spaces].")  # fmt: skip
@click.option("--project", "projects", multiple=True, envvar="FASTBLT_PROJECTS", metavar="NAME=KEY",
              help="A project's key: a request with it reaches only what its project kept (responses, "
              "conversations, chat completions, files, batches); --api-key's keys are the default project's. "
              "Repeat for more projects, or keys of one [env: FASTBLT_PROJECTS, separated by spaces].")  # fmt: skip
@click.option("--ssl-certfile", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Serve HTTPS with this certificate (PEM; a chain starts with the server's own) ...")  # fmt: skip
@click.option("--ssl-keyfile", type=click.Path(exists=True, dir_okay=False), default=None,
              help="... and its private key (PEM).")  # fmt: skip
@click.option("--ssl-keyfile-password", default=None, envvar="FASTBLT_SSL_KEYFILE_PASSWORD",
              help="The private key's password, if it is encrypted [env: FASTBLT_SSL_KEYFILE_PASSWORD].")  # fmt: skip
@click.option("--ssl-ca-certs", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Mutual TLS: answer only clients whose certificate these authorities signed (PEM).")  # fmt: skip
@click.option("--allowed-origin", "allowed_origins", multiple=True, metavar="ORIGIN",
              help="CORS: pages from this origin (https://host[:port], or *) may call the API; repeat.")  # fmt: skip
@click.option("--batch-dir", type=click.Path(file_okay=False, writable=True), default=None,
              help="Serve OpenAI's Batch API (/v1/files, /v1/batches), keeping files and batches here "
              "(one server per directory). With --ray, run by one actor for every replica, on this "
              "command's node.")  # fmt: skip
@click.option(
    "--response-store-mb",
    type=click.IntRange(0),
    default=64,
    show_default=True,
    help="Memory for answered Responses (previous_response_id, GET /v1/responses/{id}), and as much "
    "each for conversations (/v1/conversations) and stored chat completions (store: true); 0 keeps none. "
    "With --ray, in one actor all replicas share.",
)
@click.option("--response-store-dir", type=click.Path(file_okay=False, writable=True), default=None,
              help="Keep the responses, conversations and chat completions of --response-store-mb in a SQLite "
              "file here (kept.sqlite3), which a restarted server reads again [default: in memory, gone at a "
              "restart]; one server per directory. With --ray, the store actor's, on this command's node.")  # fmt: skip
@click.option("--max-body", type=click.IntRange(1024), default=1 << 20, show_default=True,
              help="Largest request body in bytes (413 past it).")  # fmt: skip
@click.option("--stream-interval", type=Positive(minimum=0.0, maximum=1.0), default=0.0, show_default=True,
              metavar="SECONDS", help="Send each stream's text at most this often, what is made meanwhile in one "
              "event: fewer events for the server and many streaming clients to handle, at up to SECONDS more "
              "between bytes (neither the first byte nor the end is held). 0: as soon as it is made.")  # fmt: skip
@click.option("--graceful-timeout", type=Positive(minimum=0.0), default=60.0, show_default=True,
              help="On SIGTERM/SIGINT: seconds to let requests in flight finish.")  # fmt: skip
@click.option("--log-level", type=click.Choice(["critical", "error", "warning", "info", "debug"]), default="info",
              show_default=True, help="info: uvicorn's access lines, and a line per completions request "
              "(logger fastblt.requests: id, status, mode, bytes, finish reason, time to first byte).")  # fmt: skip
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text", show_default=True,
              help="json: each log line a JSON object (the request log's fields typed, uvicorn's too).")  # fmt: skip
@click.option("--ray", "use_ray", is_flag=True, help="Serve as replicas of a Ray Serve deployment (docs/scale-out.md).")
@click.option("--ray-address", default=None, help="--ray: a running cluster's address [default: start a local one].")
@click.option("--replicas", type=click.IntRange(1), default=None, help="--ray: this many replicas [default: 1].")
@click.option("--min-replicas", type=click.IntRange(0), default=None,
              help="--ray: autoscale from this many replicas [default: 1] ...")  # fmt: skip
@click.option("--max-replicas", type=click.IntRange(1), default=None, help="--ray: ... up to this many.")
@click.option("--target-ongoing-requests", type=Positive(), default=None,
              help="--ray, autoscaling: requests per replica to scale to [default: --max-batch].")  # fmt: skip
@click.option("--num-cpus", type=Positive(minimum=0.0), default=None, help="--ray: CPUs per replica [default: 1].")
@click.option("--num-gpus", type=Positive(minimum=0.0), default=None, help="--ray: GPUs per replica [default: 0].")
@click.option("--print-config", is_flag=True,
              help="--ray: write the equivalent Serve config (YAML, for `serve deploy`) and exit.")  # fmt: skip
def serve(
    checkpoint, backend, artifacts, host, port, max_batch, lanes, lane_processes, max_queue, mode, api_key, projects,
    ssl_certfile, ssl_keyfile, ssl_keyfile_password, ssl_ca_certs, model_name, chat_template, chat_stop,
    tool_call_start, tool_call_end, allowed_origins, batch_dir, response_store_mb, response_store_dir, max_body,
    max_context, threads,
    prompt_cache_mb, share_prompts, device, stream_interval,
    graceful_timeout, log_level, log_format, use_ray,
    ray_address, replicas,
    min_replicas, max_replicas, target_ongoing_requests, num_cpus, num_gpus, print_config,
):  # fmt: skip
    """Serve completions over HTTP, OpenAI-compatible, with continuous batching.

    \b
    Endpoints: POST /v1/completions (stream: true for server-sent events),
    POST /v1/chat/completions and POST /v1/responses (with --chat-template;
    tools too; /v1/conversations), GET /v1/models, GET /health, GET /metrics
    (Prometheus).
    max_tokens counts bytes, logit_bias is keyed by byte values ("10": -100),
    response_format takes json_object and json_schema (OpenAI's strict subset),
    vLLM's structured_outputs a regex, a choice, a grammar or a schema; fastblt's own
    fields (mode, k, lookup, alpha, gamma, unmask, top_k, block_start,
    priority) go in the body (the openai client's extra_body).

    \b
    Examples:
      fastblt serve --port 8000
      curl -s localhost:8000/v1/completions -H 'Content-Type: application/json' \\
           -d '{"model": "fastblt-default", "prompt": "def main(", "max_tokens": 64, "temperature": 0}'

    SIGTERM stops taking requests, lets those in flight finish, then exits 0.

    \b
    With --ray, the same server runs as replicas of a Ray Serve deployment behind
    Ray Serve's HTTP proxy on --host/--port (docs/scale-out.md):
      fastblt serve --ray --replicas 2 --max-batch 16
      fastblt serve --ray --ray-address HEAD_IP:6379 --min-replicas 1 --max-replicas 8 --host 0.0.0.0
      fastblt serve --ray --replicas 4 --print-config > fastblt.yaml   # then: serve deploy fastblt.yaml
    """
    ray_opts = {"--ray-address": ray_address, "--replicas": replicas, "--min-replicas": min_replicas,
                "--max-replicas": max_replicas, "--target-ongoing-requests": target_ongoing_requests,
                "--num-cpus": num_cpus, "--num-gpus": num_gpus, "--print-config": print_config or None}  # fmt: skip
    if not use_ray and (given := [flag for flag, v in ray_opts.items() if v is not None]):
        raise click.UsageError(f"{given[0]} applies only with --ray")
    scaling = _scaling(replicas, min_replicas, max_replicas, target_ongoing_requests, num_cpus, num_gpus,
                       graceful_timeout) if use_ray else None  # fmt: skip
    if print_config and ray_address is not None:
        raise click.UsageError("--print-config starts nothing: give the address to `serve deploy --address` instead")

    setup = app_setup(checkpoint, model_name, max_context, chat_template, chat_stop, tool_call_start, tool_call_end)
    path, name, max_context = setup.path, setup.model_name, setup.max_context
    api_keys = tuple(api_key)
    if any(not key or key != key.strip() for key in api_keys):
        raise click.BadParameter("empty, or spaces at its ends: clients could not send it as a bearer token",
                                 param_hint="'--api-key'")  # fmt: skip
    from fastblt.serve.app import origin_error, project_keys

    try:
        projects = project_keys(projects, api_keys)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="'--project'") from None

    if why := next(filter(None, map(origin_error, allowed_origins)), None):
        raise click.BadParameter(why, param_hint="'--allowed-origin'")
    tls = _tls(ssl_certfile, ssl_keyfile, ssl_keyfile_password, ssl_ca_certs)
    scheme = "https" if tls else "http"
    if batch_dir is not None and not use_ray:
        from fastblt.serve.batches import hold_batches

        try:  # before the model loads: a directory that cannot be made, or is another server's, is the first line
            hold_batches(Path(batch_dir))
        except OSError as e:
            raise click.BadParameter(f"{batch_dir}: {e.strerror}", param_hint="'--batch-dir'") from None
        except InputError as e:
            raise click.BadParameter(str(e), param_hint="'--batch-dir'") from None
    if response_store_dir is not None and not (use_ray and print_config):
        if not response_store_mb:
            raise click.UsageError("--response-store-dir with --response-store-mb 0: nothing would be kept there")
        from fastblt.serve.kept import check_dir, hold_store

        if why := check_dir(Path(response_store_dir)):  # the same: before the model loads
            raise click.BadParameter(why, param_hint="'--response-store-dir'")
        if not use_ray:  # (with --ray, the store actor holds it)
            try:
                hold_store(Path(response_store_dir))
            except InputError as e:
                raise click.BadParameter(str(e), param_hint="'--response-store-dir'") from None
    if use_ray:
        if ssl_ca_certs is not None:  # Serve passes ssl_ca_certs to uvicorn, but never ssl_cert_reqs
            raise click.UsageError("--ssl-ca-certs with --ray: Ray Serve's proxies do not require client "
                                   "certificates; check them in front of the cluster (docs/scale-out.md)")  # fmt: skip
        if batch_dir is not None and not print_config:  # the batch actor holds it, on this node
            from fastblt.serve.batches import check_batches

            try:
                Path(batch_dir).mkdir(parents=True, exist_ok=True)
                check_batches(Path(batch_dir))
            except OSError as e:
                raise click.BadParameter(f"{batch_dir}: {e.strerror}", param_hint="'--batch-dir'") from None
            except InputError as e:
                raise click.BadParameter(str(e), param_hint="'--batch-dir'") from None
        from fastblt.runtime.batch import DEFAULT_MAX_BATCH

        max_batch = max_batch or DEFAULT_MAX_BATCH
        server = {"checkpoint": checkpoint if checkpoint == "default" else str(path.resolve()), "backend": backend,
                  "artifacts": str(Path(artifacts).resolve()) if artifacts else None, "max_batch": max_batch,
                  "lanes": lanes, "lane_processes": lane_processes, "max_queue": max_queue,
                  "max_context": max_context, "threads": threads, "prompt_cache_mb": prompt_cache_mb,
                  "share_prompts": share_prompts, "device": device, "mode": mode, "model_name": name,
                  "api_key": list(api_keys) if len(api_keys) > 1 else next(iter(api_keys), None), "max_body": max_body,
                  "projects": [f"{name}={key}" for name, key in projects],
                  "chat_template": str(Path(chat_template).resolve()) if chat_template else None,
                  "chat_stop": list(chat_stop), "tool_call_start": tool_call_start,
                  "tool_call_end": tool_call_end, "log_format": log_format,
                  "allowed_origins": list(allowed_origins), "response_store_mb": response_store_mb,
                  "response_store_dir": response_store_dir and str(Path(response_store_dir).resolve()),
                  # half the grace: the rest for Serve to drain the requests first
                  "background_grace_s": graceful_timeout / 2, "stream_interval_s": stream_interval,
                  "batch_dir": batch_dir and str(Path(batch_dir).resolve())}  # fmt: skip
        say = to_stderr if print_config else _logging(log_level, log_format)
        _serve_on_ray(server, scaling, ray_address, host, port, log_level, print_config, tls, say)
        return

    import uvicorn

    _Server = _server_class()
    from fastblt.serve import request_log
    from fastblt.serve.app import ServeSettings, create_app

    say = _logging(log_level, log_format)

    engine = start_engine("serve", setup, checkpoint, backend, max_queue, say=None if log_format == "text" else say,
                          max_batch=max_batch, artifacts=artifacts, lanes=lanes, lane_processes=lane_processes,
                          threads=threads, device=device, prompt_cache_mb=prompt_cache_mb,
                          share_prompts=share_prompts)  # fmt: skip
    settings = ServeSettings(model_id=name, default_mode=mode, api_keys=api_keys, projects=projects, max_body=max_body,
                             chat_template=setup.template, log_format=log_format,
                             allowed_origins=allowed_origins, response_store=response_store_mb << 20,
                             response_store_dir=response_store_dir and Path(response_store_dir),
                             stream_interval=stream_interval)  # fmt: skip
    app = create_app(engine, settings)
    if batch_dir is not None:
        from fastblt.serve.batches import add_batch_api

        rows = max(1, engine.max_batch - engine.max_batch // 4)  # idle: a quarter kept free for live requests
        add_batch_api(app, Path(batch_dir), rows, max(1, engine.max_batch // 8), api_keys[0] if api_keys else None)
    say(f"fastblt serve: model {name!r} at {scheme}://{host}:{port}/v1 (max_batch {engine.max_batch}, "
        f"{describe_lanes(engine)})")  # fmt: skip
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=graceful_timeout,
                            log_config=request_log.uvicorn_log_config(log_format), **tls)  # fmt: skip
    try:
        _Server(config).run()
    finally:  # every request has had its answer: what a lane still holds nobody waits for
        engine.close(timeout=5.0)


def _logging(log_level: str, log_format: str) -> Callable[[str], None]:
    """Show the request log (and fastblt's other loggers) at `log_level` in `log_format`, once the
    options are known good; the command's own lines then go out as the format says."""
    from fastblt.serve import request_log

    request_log.configure(log_level, log_format=log_format)
    return to_stderr if log_format == "text" else logging.getLogger("fastblt.serve").info


def _scaling(replicas, min_replicas, max_replicas, target, num_cpus, num_gpus, graceful_timeout) -> dict:
    """DeploymentOptions' fields from --ray's options, or a usage error naming the flags."""
    autoscaling = min_replicas is not None or max_replicas is not None
    if replicas is not None and autoscaling:
        raise click.UsageError("--replicas and --min-replicas/--max-replicas: give a fixed count or a range, not both")
    if autoscaling and max_replicas is None:
        raise click.UsageError("--min-replicas needs --max-replicas (the most replicas autoscaling may start)")
    if autoscaling and min_replicas is not None and min_replicas > max_replicas:
        raise click.UsageError(f"--min-replicas {min_replicas} is more than --max-replicas {max_replicas}")
    if target is not None and not autoscaling:
        raise click.UsageError("--target-ongoing-requests applies only with --min-replicas/--max-replicas")
    return {"replicas": None if autoscaling else (replicas or 1), "min_replicas": min_replicas,
            "max_replicas": max_replicas, "target_ongoing_requests": target,
            "num_cpus": 1.0 if num_cpus is None else num_cpus, "num_gpus": 0.0 if num_gpus is None else num_gpus,
            "graceful_timeout": graceful_timeout}  # fmt: skip


def _tls(certfile: str | None, keyfile: str | None, password: str | None, ca_certs: str | None) -> dict:
    """uvicorn's (and Serve's http_options') TLS settings, loaded once now: a certificate, key,
    password or client authority that does not load stops the command with one line naming it,
    before any loading."""
    if certfile is None and keyfile is None:
        if password is not None:
            raise click.UsageError("--ssl-keyfile-password applies only with --ssl-keyfile")
        if ca_certs is not None:
            raise click.UsageError("--ssl-ca-certs needs --ssl-certfile and --ssl-keyfile (mutual TLS is over HTTPS)")
        return {}
    if certfile is None or keyfile is None:
        raise click.UsageError("--ssl-certfile and --ssl-keyfile go together: a certificate and its private key")
    import ssl

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_verify_locations(cafile=certfile)
    except ssl.SSLError:
        raise click.BadParameter(f"{certfile}: not a PEM certificate", param_hint="'--ssl-certfile'") from None
    try:  # a callable, so that an encrypted key without a password fails here instead of prompting
        context.load_cert_chain(certfile, keyfile, lambda: password or "")
    except ssl.SSLError as e:
        if e.reason == "KEY_VALUES_MISMATCH":
            why = f"not the private key of {certfile}"
        elif password is None and b"ENCRYPTED" in Path(keyfile).read_bytes()[:4096]:
            why = "encrypted: give its password (--ssl-keyfile-password or FASTBLT_SSL_KEYFILE_PASSWORD)"
        else:
            why = "not a PEM private key" + (", or not this password's" if password is not None else "")
        raise click.BadParameter(f"{keyfile}: {why}", param_hint="'--ssl-keyfile'") from None
    tls: dict = {"ssl_certfile": str(Path(certfile).resolve()), "ssl_keyfile": str(Path(keyfile).resolve())}
    if password is not None:
        tls["ssl_keyfile_password"] = password
    if ca_certs is not None:
        authorities = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:  # a file with no certificate in it loads without complaint: counted below
            authorities.load_verify_locations(cafile=ca_certs)
        except ssl.SSLError:
            authorities = None
        if authorities is None or not authorities.cert_store_stats()["x509"]:
            raise click.BadParameter(f"{ca_certs}: no PEM certificate in it", param_hint="'--ssl-ca-certs'")
        tls |= {"ssl_ca_certs": str(Path(ca_certs).resolve()), "ssl_cert_reqs": int(ssl.CERT_REQUIRED)}
    return tls


def _serve_on_ray(server: dict, scaling: dict, address: str | None, host: str, port: int, log_level: str,
                  print_config: bool, tls: dict, say: Callable[[str], None]) -> None:  # fmt: skip
    """Deploy on Ray Serve and block until SIGTERM/SIGINT (or, with print_config, print its config)."""
    from fastblt.errors import BackendUnavailable

    try:
        from fastblt.serve import ray_serve
    except ImportError as e:
        raise BackendUnavailable(f"--ray needs Ray Serve ({e}); install it: pip install 'fastblt[ray]'") from None
    opts, deploy = ray_serve.ServerOptions(**server), ray_serve.DeploymentOptions(**scaling)
    if print_config:
        import yaml

        if opts.api_keys or opts.projects:
            click.echo("note: API keys (--api-key, --project) are not written to the config; add them to the args "
                       "of your copy", err=True)  # fmt: skip
        if "ssl_keyfile_password" in tls:
            click.echo("note: the key's password is not written to the config; add it to http_options of your copy",
                       err=True)  # fmt: skip
        config = ray_serve.serve_config(opts, deploy, host, port, tls=tls)
        click.echo("# fastblt serve --ray as a Ray Serve config: serve deploy this-file.yaml (docs/scale-out.md)")
        click.echo(yaml.safe_dump(config, sort_keys=False), nl=False)
        return
    where = address or "a local cluster (127.0.0.1)"
    say(f"fastblt serve: deploying {server['model_name']!r} on Ray at {where}")
    # a local cluster offers what the replicas reserve, even past this machine's cores: the user asked for them
    cpus = max(os.cpu_count() or 1, deploy.most_replicas * deploy.num_cpus)
    cluster = ray_serve.connect(address, cpus_per_node=cpus)
    # after connecting: ray.init installs its own SIGTERM handler, which aborts the process
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        t0 = time.monotonic()
        ray_serve.deploy(opts, deploy, host, port, log_level=log_level, tls=tls)
        url = f"{'https' if tls else 'http'}://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
        while not stop.is_set():
            try:
                ray_serve.wait_ready(url, deploy.initial_replicas, timeout=60.0, stop=stop)
            except TimeoutError:  # replicas that cannot be placed wait for resources, and say so
                say(f"fastblt serve: still waiting for replicas: {ray_serve.status()}")
                continue
            if not stop.is_set():
                ready = f"{deploy.initial_replicas} replica(s) ready in {time.monotonic() - t0:.1f} s"
                where = f"model {server['model_name']!r} at {url.split(':')[0]}://{host}:{port}/v1 (Ray Serve)"
                say(f"fastblt serve: {ready}; {where}")
            break
        stop.wait()
        say("fastblt serve: stopping (requests in flight finish first)")
    finally:
        ray_serve.undeploy(cluster)
        for sig, handler in previous.items():
            if handler is not None:  # None: a handler installed from C, which Python cannot reinstall
                signal.signal(sig, handler)


def _server_class():
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, except that a SIGTERM / SIGINT ends in a normal exit (0) once the
        requests in flight (and the background responses running) have finished, instead of
        re-raising the signal afterwards, and that requests still running when the grace period is
        nearly out are ended with an answer (the app's `stop_requests`) before uvicorn cancels
        them mid-body."""

        async def shutdown(self, sockets=None) -> None:
            state = getattr(self.config.app, "state", None)
            stop = getattr(state, "stop_requests", None)
            grace = self.config.timeout_graceful_shutdown
            timer = None
            if state is not None and grace is not None:  # background responses finish within it too
                state.finish_by = asyncio.get_running_loop().time() + grace
            if stop is not None and grace is not None:
                lead = min(1.0, grace / 4)  # for the last events to go out
                timer = asyncio.get_running_loop().call_later(max(grace - lead, 0.0), stop)
            try:
                await super().shutdown(sockets)
            finally:
                if timer is not None:
                    timer.cancel()

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
