"""The `fastblt` command.

Subcommands live next to the code they drive and are imported only when called, so
`fastblt --help` answers without loading torch. Exit codes: 0 success, 1 a check or gate failed
(validate, export --check) or a request got an error (batch), 2 bad input or a fastblt error (one
line on stderr), 3 a backend is unavailable here.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import sys
from collections.abc import Iterator

import click

# name -> (module, attribute, one-line help); keep in pipeline order
COMMANDS: dict[str, tuple[str, str, str]] = {
    "train": ("fastblt.cli.train", "train", "Train the entropy model and a BLT-D (the embedded default)."),
    "convert": ("fastblt.cli.convert", "convert", "Convert a checkpoint between hf, meta and fastblt formats."),
    "export": ("fastblt.cli.export", "export", "Export every step graph to ONNX with a manifest, and check it."),
    "build": ("fastblt.cli.build", "build", "Build TensorRT engines from an export (needs a GPU)."),
    "generate": ("fastblt.cli.generate", "generate", "Generate bytes with ar, blt-d, blt-s or blt-dv."),
    "serve": ("fastblt.cli.serve", "serve", "Serve completions over HTTP (OpenAI-compatible, batched)."),
    "batch": ("fastblt.cli.batch", "batch", "Answer an OpenAI batch file (JSON Lines) offline, batched."),
    "bench": ("fastblt.cli.bench", "bench", "Benchmark every mode x backend on fixed prompts."),
    "validate": ("fastblt.cli.validate", "validate", "Prove numerically that the artifacts compute the checkpoint."),
    "info": ("fastblt.cli.info", "info", "Show a checkpoint's config, sizes and which backends can run here."),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return [name for name, (mod, _, _) in COMMANDS.items() if importlib.util.find_spec(mod) is not None]

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        mod, attr, _ = COMMANDS[name]
        if importlib.util.find_spec(mod) is None:
            return None
        return _with_envvars(name, getattr(importlib.import_module(mod), attr))

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, COMMANDS[name][2]) for name in self.list_commands(ctx)]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


def _with_envvars(name: str, command: click.Command) -> click.Command:
    """Let every option of `command` come from FASTBLT_<COMMAND>_<OPTION> too, named after its long
    flag (FASTBLT_SERVE_MAX_BATCH=8, FASTBLT_SERVE_ALLOWED_ORIGIN="https://a https://b"), as
    containers are configured; an option that names its own variable (FASTBLT_API_KEY) keeps it."""
    for param in command.params:
        longs = [o for o in getattr(param, "opts", ()) if o.startswith("--")]
        if isinstance(param, click.Option) and param.envvar is None and longs:
            param.envvar = f"FASTBLT_{name}_{longs[0][2:]}".upper().replace("-", "_")
    return command


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="fastblt")
def cli() -> None:
    """fastblt: Byte Latent Transformer checkpoints to ONNX / TensorRT, with an exact runtime.

    \b
    Typical flow (every command defaults to the embedded checkpoint):
      fastblt generate --prompt "def main(" --mode blt-s      # run it
      fastblt export --checkpoint default --out artifacts/    # ONNX + manifest
      fastblt validate --artifacts artifacts/                 # prove parity
      fastblt bench --json                                    # speed table

    Any option may also be set in the environment as FASTBLT_<COMMAND>_<OPTION>,
    e.g. FASTBLT_SERVE_MAX_BATCH=8 (several values separated by spaces).
    """


class _Stdout(io.TextIOWrapper):
    """sys.stdout, whose failed writes name it (`> /dev/full`: "error: stdout: No space left on
    device", where the OSError of a write names no file). A reader that left (BrokenPipeError) is
    passed on as it is: commands end quietly then."""

    def write(self, s: str) -> int:
        with _naming_stdout():
            return super().write(s)

    def flush(self) -> None:
        with _naming_stdout():
            super().flush()


@contextlib.contextmanager
def _naming_stdout() -> Iterator[None]:
    try:
        yield
    except BrokenPipeError:
        raise
    except OSError as e:
        raise OSError(e.errno, e.strerror, "stdout") from None


def _named_stdout() -> None:
    out = sys.stdout
    if type(out) is io.TextIOWrapper:  # the interpreter's own (not a test runner's capture)
        sys.stdout = _Stdout(out.detach(), encoding=out.encoding, errors=out.errors,
                             line_buffering=out.line_buffering, write_through=out.write_through)  # fmt: skip


def main() -> None:
    """Entry point: fastblt errors become one line on stderr and exit code 2 (3: backend unavailable)."""
    from fastblt.errors import BackendUnavailable, FastBltError

    _named_stdout()
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(2 if e.exit_code == 2 else e.exit_code)
    except BackendUnavailable as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(3)
    except FastBltError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except OSError as e:  # a file or directory we were pointed at cannot be read or written
        where = f"{e.filename}: " if e.filename is not None else ""
        click.echo(f"error: {where}{e.strerror or e}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
