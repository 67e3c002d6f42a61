"""`fastblt batch`: an OpenAI batch file (JSON Lines) answered offline (fastblt/serve/batch_file.py)."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import click

from fastblt.cli.app_setup import app_setup, describe_lanes, engine_options, start_engine


@click.command("batch")
@click.argument("input_file", metavar="INPUT", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", "-o", "out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The output file (JSON Lines, a line per request as it ends). Never overwritten: with --resume, "
              "the requests it lacks are added to it. A file, not - (stdout): --resume reads it back, and stdout "
              "has the summary.")  # fmt: skip
@click.option("--resume", is_flag=True,
              help="Add to an existing --out, written for this INPUT, the answers of the requests it lacks (a "
              "stopped run's).")  # fmt: skip
@click.option("--retry-errors", is_flag=True,
              help="With --resume: answer again the requests whose line in --out is an error (a 4xx of a line since "
              "fixed, a 5xx), replacing those lines.")  # fmt: skip
@click.option("--concurrency", type=click.IntRange(1, 4096), default=None,
              help="Requests in flight at once [default: twice the engine's max-batch: every row busy, and a "
              "request ready for each row that frees].")  # fmt: skip
@engine_options
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON on stdout.")
def batch(input_file, out, resume, retry_errors, concurrency, as_json, checkpoint, backend, artifacts, max_batch, lanes,
          lane_processes, mode, model_name, chat_template, chat_stop, tool_call_start, tool_call_end, max_context,
          threads, prompt_cache_mb, share_prompts, device):  # fmt: skip
    """Answer an OpenAI batch file offline, as `fastblt serve` would answer each line.

    \b
    INPUT is JSON Lines, one request per line (OpenAI's Batch API format):
      {"custom_id": "q1", "method": "POST", "url": "/v1/completions",
       "body": {"model": "fastblt-default", "prompt": "def main(", "max_tokens": 64}}
    url is /v1/completions, or /v1/chat/completions or /v1/responses with --chat-template.

    Each body gets the server's answer (its fields, defaults and errors), written to --out as
    {"custom_id", "response": {"status_code", "request_id", "body"}} in the order requests end;
    requests share the engine's batched step calls.

    \b
    Examples:
      fastblt batch requests.jsonl --out answers.jsonl
      fastblt batch requests.jsonl --out answers.jsonl --resume    # after a stopped run
      fastblt batch requests.jsonl --out answers.jsonl --resume --retry-errors

    Exit codes: 0 every request answered 200; 1 some got an error, which their lines give;
    2 a bad input file or option (the line named).
    """
    from fastblt.errors import InputError
    from fastblt.serve.batch_file import answered, drop_errors, read_requests

    if retry_errors and not resume:
        raise click.UsageError("--retry-errors applies only with --resume (it answers again what --out holds)")

    # every check before the engine loads (minutes, the first time), so a mistake costs nothing
    if str(out) == "-":  # stdout has the summary, and --resume reads the answers back
        raise click.BadParameter("- (stdout): the answers go to a file, which --resume can read back",
                                 param_hint="'--out'")  # fmt: skip
    if out.resolve() == input_file.resolve():
        raise click.UsageError("--out is the input file: the answers go to a file of their own")
    if out.exists() and not resume:
        raise click.UsageError(f"{out} exists (never overwritten): --resume adds the requests it lacks, or give "
                               "another --out")  # fmt: skip
    if not out.parent.is_dir():
        raise click.BadParameter(f"{out}: no directory {out.parent} to write it in", param_hint="'--out'")
    requests = read_requests(input_file)
    setup = app_setup(checkpoint, model_name, max_context, chat_template, chat_stop, tool_call_start, tool_call_end)
    if setup.template is None and (chat := next((r for r in requests if r.url != "/v1/completions"), None)):
        raise InputError(f"{input_file}:{chat.line}: url: {chat.url} needs --chat-template (the template that "
                         "turns messages into a prompt)")  # fmt: skip
    done = answered(out, {r.custom_id for r in requests}) if out.exists() else set()
    if retry_errors and done and (dropped := drop_errors(out)):
        click.echo(f"fastblt batch: {dropped} error line(s) taken out of {out}, to answer again", err=True)
        done = answered(out)
    todo = [r for r in requests if r.custom_id not in done]
    if done:
        click.echo(f"fastblt batch: {len(requests) - len(todo)} of {len(requests)} requests answered in {out} "
                   "already", err=True)  # fmt: skip
    summary = _run(todo, out, concurrency, mode, setup, checkpoint, backend, max_batch=max_batch, artifacts=artifacts,
                   lanes=lanes, lane_processes=lane_processes, threads=threads, device=device,
                   prompt_cache_mb=prompt_cache_mb, share_prompts=share_prompts)  # fmt: skip
    statuses = {str(k): v for k, v in sorted(summary.statuses.items())}
    result = {"input": str(input_file), "output": str(out), "requests": len(requests), "answered": summary.requests,
              "already": len(requests) - len(todo), "statuses": statuses, "failed": summary.failed,
              "completion_bytes": summary.completion_bytes, "seconds": round(summary.seconds, 3)}  # fmt: skip
    if as_json:
        click.echo(json.dumps(result))
    else:
        counts = ", ".join(f"{n} x {status}" for status, n in statuses.items()) or "none to run"
        rate = summary.completion_bytes / summary.seconds if summary.seconds else 0.0
        click.echo(f"{summary.requests} requests answered ({counts}), {summary.completion_bytes:,} bytes in "
                   f"{summary.seconds:.1f} s ({rate:,.0f} B/s) -> {out}")  # fmt: skip
    if summary.failed:
        sys.exit(1)


def _run(todo, out: Path, concurrency: int | None, mode: str, setup, checkpoint: str, backend: str, **options):
    """Start the engine and the app, answer `todo` into `out` (appended) with a progress bar."""
    from tqdm import tqdm

    from fastblt.serve.app import ServeSettings, create_app
    from fastblt.serve.batch_file import BatchSummary, run_batch

    if not todo:
        return BatchSummary()
    max_batch = options["max_batch"]
    concurrency = concurrency or 2 * (max_batch or 16)
    engine = start_engine("batch", setup, checkpoint, backend, max_queue=concurrency, **options)
    try:
        click.echo(f"fastblt batch: {len(todo)} requests, {concurrency} at a time (max_batch {engine.max_batch}, "
                   f"{describe_lanes(engine)})", err=True)  # fmt: skip
        settings = ServeSettings(model_id=setup.model_name, default_mode=mode, max_body=1 << 62,
                                 chat_template=setup.template)  # fmt: skip
        app = create_app(engine, settings)
        with out.open("ab") as f, tqdm(total=len(todo), desc="batch", unit="req", file=sys.stderr) as bar:
            return asyncio.run(run_batch(app, todo, f, concurrency, lambda status: bar.update(1)))
    finally:
        engine.close(timeout=5.0)
