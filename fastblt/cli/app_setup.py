"""What `fastblt serve` and `fastblt batch` share: the options of the engine and of the app in
front of it, checked together before anything loads, and the engine they start."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from fastblt.cli.common import Positive
from fastblt.engines.registry import BACKENDS
from fastblt.runtime.options import MODES
from fastblt.runtime.prompt_cache import DEFAULT_MB

if TYPE_CHECKING:
    from fastblt.runtime.async_engine import AsyncEngine
    from fastblt.serve.chat import ChatTemplate

ENGINE_OPTIONS = [
    click.option("--checkpoint", default="default", show_default=True, help="'default' or a checkpoint directory."),
    click.option("--backend", type=click.Choice(BACKENDS), default="ort", show_default=True),
    click.option("--artifacts", default=None, help="Exported graphs (ort/trt); default: exported once into a cache."),
    click.option(
        "--max-batch",
        type=click.IntRange(1, 1024),
        default=None,
        help="Requests decoding at once (rows of every batched step call) "
        "[default: 16; trt: at most the engines' rows].",
    ),
    click.option(
        "--lanes",
        type=click.IntRange(1, 64),
        default=None,
        help="Batch loops, each with its own backend sessions and max-batch/lanes rows [default: ort: one per "
        "core this process may use (affinity, cgroup quota), at most max-batch and what half the free memory "
        "holds, 2 as threads; else 1; --ray: per replica, from --num-cpus].",
    ),
    click.option(
        "--lane-processes/--lane-threads",
        "lane_processes",
        default=None,
        help="Run each lane in a worker process of its own, or as a thread of the server [default: "
        "processes for ort on a CPU with two or more lanes: threads take turns on one GIL].",
    ),
    click.option(
        "--mode",
        type=click.Choice(MODES),
        default="blt-s",
        show_default=True,
        help="Mode of a request that names none (blt-s: greedy output is ar's).",
    ),
    click.option("--model-name", default=None, help="The model id clients send [default: fastblt-<checkpoint name>]."),
    click.option(
        "--chat-template",
        type=click.Path(dir_okay=False),
        default=None,
        help="A Jinja chat template (as Hugging Face tokenizers keep them) that renders chat messages to a "
        "prompt: chat completions and responses (POST /v1/chat/completions, /v1/responses) [default: none].",
    ),
    click.option(
        "--chat-stop",
        multiple=True,
        metavar="TEXT",
        help="With --chat-template: a string that ends the assistant's turn in the template's format "
        "(repeatable; e.g. the next user turn's marker), added to every chat request's stops.",
    ),
    click.option(
        "--tool-call-start",
        metavar="TEXT",
        default=None,
        help="With --chat-template: the text that starts a tool call in the template's format (e.g. "
        "'<tool_call>'): serves tool_choice \"auto\", where the model decides whether to call [default: "
        'only "required", a named function or "none"].',
    ),
    click.option(
        "--tool-call-end",
        metavar="TEXT",
        default="",
        help="With --tool-call-start: the text that ends a call (e.g. '</tool_call>') [default: none].",
    ),
    click.option(
        "--max-context",
        type=click.IntRange(2),
        default=None,
        help="Most bytes (prompt + max_tokens) per request; more is a 400 [default: 4 per patch of the "
        "global model's position limit, 16,384 for the default].",
    ),
    click.option(
        "--threads", type=click.IntRange(min=1), default=None, help="Intra-op threads of the backend (of each lane)."
    ),
    click.option(
        "--prompt-cache-mb",
        type=Positive(minimum=0.0),
        default=DEFAULT_MB,
        show_default=True,
        help="Memory per lane for snapshots of committed prompts: a request whose prompt begins with one "
        "seen before (the same prompt, a conversation's next turn) loads it instead of committing it "
        "again, with the same bytes (0: off).",
    ),
    click.option(
        "--share-prompts/--no-share-prompts",
        default=True,
        show_default=True,
        help="Lanes load each other's prompt snapshots: worker lanes through files in /dev/shm (where it "
        "is full, each keeps its own), thread lanes from one cache of all their budgets.",
    ),
    click.option("--device", default=None, help="torch/trt: where to compute (cpu, cuda, cuda:1)."),
]


def engine_options(command: Callable) -> Callable:
    """The engine's and the app's options, in this order, on a click command."""
    for option in reversed(ENGINE_OPTIONS):
        command = option(command)
    return command


@dataclass(frozen=True)
class AppSetup:
    """The checked options of the app: the checkpoint's path, the model id clients send, the
    longest request in bytes and the chat template (None: no chat endpoint)."""

    path: Path
    model_name: str
    max_context: int
    template: ChatTemplate | None


def app_setup(checkpoint: str, model_name: str | None, max_context: int | None, chat_template: str | None,
              chat_stop: tuple[str, ...], tool_call_start: str | None, tool_call_end: str) -> AppSetup:  # fmt: skip
    """Check the app's options together; the chat template is read and parsed now, so a bad file
    stops the command before any loading."""
    from fastblt.formats.checkpoint import load_config, resolve_checkpoint_path

    path = resolve_checkpoint_path(checkpoint)
    name = model_name or f"fastblt-{'default' if checkpoint == 'default' else path.name}"
    if max_context is None:  # a request that cannot fit is refused before it runs, not past 16 KB of work
        from fastblt.serve.api import BYTES_PER_PATCH

        max_context = BYTES_PER_PATCH * load_config(path).global_model.max_positions
    template = None
    if chat_template is not None:
        from fastblt.serve.chat import ChatTemplate
        from fastblt.serve.tools import CallTags

        if tool_call_start == "":
            raise click.BadParameter("empty: a call needs a text that starts it", param_hint="'--tool-call-start'")
        tags = None if tool_call_start is None else CallTags(tool_call_start, tool_call_end)
        template = ChatTemplate.load(chat_template, chat_stop, tags)
    elif chat_stop or tool_call_start is not None:
        raise click.UsageError("--chat-stop and --tool-call-start apply only with --chat-template")
    if tool_call_end and tool_call_start is None:
        raise click.UsageError("--tool-call-end applies only with --tool-call-start")
    return AppSetup(path, name, max_context, template)


def start_engine(command: str, setup: AppSetup, checkpoint: str, backend: str, max_queue: int,
                 say: Callable[[str], None] | None = None, **options: Any) -> AsyncEngine:  # fmt: skip
    """The AsyncEngine behind the app (`options`: the engine options' values), saying so on stderr,
    or through `say` (a logger's, for JSON logs: then a first use's export is one line, no bar)."""
    from fastblt.cli.progress import first_use_notice
    from fastblt.runtime.async_engine import AsyncEngine
    from fastblt.serve.app import SERVE_EXTRA_IDS

    notice = first_use_notice if say is None else _logged_notice(say)
    (say or to_stderr)(f"fastblt {command}: loading {checkpoint} on {backend}")
    o = options
    return AsyncEngine(
        checkpoint, backend, max_batch=o["max_batch"], max_queue=max_queue, artifacts=o["artifacts"],
        max_context=setup.max_context + SERVE_EXTRA_IDS,  # bytes, BOS and the byte scoring drops
        lanes=o["lanes"], processes=o["lane_processes"], threads=o["threads"], device=o["device"],
        on_export=notice, prompt_cache_mb=o["prompt_cache_mb"], share_prompts=o["share_prompts"],
    )  # fmt: skip


def to_stderr(line: str) -> None:
    """A command's message line, as click writes it."""
    click.echo(line, err=True)


def _logged_notice(say: Callable[[str], None]) -> Callable[[Path], Callable[..., None]]:
    """The runtime's ExportNotice as log lines: the export's start and end."""

    def notice(out: Path) -> Callable[..., None]:
        say(f"fastblt: first use of this checkpoint: exporting its step graphs to {out} (once)")

        def progress(event: str, step: str, i: int, total: int, entry: dict | None) -> None:
            if event == "done" and i + 1 == total:
                say(f"fastblt: exported {total} step graphs to {out}")

        return progress

    return notice


def describe_lanes(engine: AsyncEngine) -> str:
    """'2 lanes in processes, prompt snapshots shared in /dev/shm/...', '1 lane'."""
    n, shared = len(engine.lanes), engine.prompt_share_dir
    where = f", prompt snapshots shared in {shared}" if shared is not None else ""
    return f"{n} lane{'s' if n > 1 else ''}{' in processes' if engine.processes else ''}{where}"
