"""`fastblt generate`: one generation from the command line (text, a stream, or a JSON record)."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import click

from fastblt.cli.common import reader_may_leave
from fastblt.engines.registry import BACKENDS
from fastblt.export.spec import DEFAULT_K
from fastblt.runtime.grammar import FORMATS
from fastblt.runtime.lookup import LOOKUP_MATCH
from fastblt.runtime.options import BLOCK_START_RULES, MAX_LOGPROBS, MODES

UNMASK = ("confidence", "entropy", "one-step")
K_HELP = f"blt-s: bytes drafted per round [default: {DEFAULT_K}, or max_step - 1 on smaller graphs]."
LOOKUP_HELP = (
    f"blt-s/blt-dv, greedy: draft from the context when its last N bytes occurred before; 0: never, "
    f"as the paper [default: {LOOKUP_MATCH}]."
)


def read_prompt(prompt: str | None, prompt_file: str | None) -> str | bytes:
    """Exactly one of --prompt / --prompt-file; a file is read as bytes (any bytes: a byte model)."""
    if (prompt is None) == (prompt_file is None):
        raise click.UsageError("give exactly one of --prompt TEXT or --prompt-file F")
    if prompt is not None:
        return arg_bytes(prompt)
    if prompt_file == "-":
        if sys.stdin is None:
            raise click.BadParameter("-: standard input is closed", param_hint="--prompt-file")
        return sys.stdin.buffer.read()
    path = Path(prompt_file)
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise click.BadParameter(f"{path}: no such file", param_hint="--prompt-file") from None
    except OSError as e:
        raise click.BadParameter(f"{path}: {e.strerror or e}", param_hint="--prompt-file") from None


def read_file(what: str) -> Callable[[click.Context, click.Parameter, str | None], str | None]:
    """The callback of an option naming a file (--schema FILE, --grammar FILE): its text; whether
    it holds `what` it should, and one fastblt can hold a text to, is the options' to check."""

    def read(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
        from fastblt.formats.files import read_text

        return None if value is None else read_text(Path(value), f"{param.opts[0]} {value}", what)

    return read


def parse_bias(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> list[tuple[int, float]]:
    """--logit-bias BYTE=BIAS pairs (the byte and bias ranges are the options' to check)."""
    pairs = []
    for value in values:
        byte, _, bias = value.partition("=")  # no "=": bias is "", which float() refuses
        try:
            pairs.append((int(byte), float(bias)))
        except ValueError:
            raise click.BadParameter(f"{value!r}: expected BYTE=BIAS, e.g. 10=-100 (a byte value 0-255)") from None
    return pairs


def arg_bytes(text: str) -> str | bytes:
    """A command-line argument as given: Python decodes argv bytes that are not UTF-8 to lone
    surrogates, which cannot be encoded again; those come back as the original bytes."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogateescape")


@click.command("generate")
@click.option("--checkpoint", default="default", show_default=True, help="'default' or a checkpoint directory.")
@click.option("--prompt", default=None, help="Prompt text (UTF-8).")
@click.option("--prompt-file", default=None, help="Read the prompt's bytes from a file ('-': stdin).")
@click.option("--mode", type=click.Choice(MODES), default="blt-d", show_default=True)
@click.option("--backend", type=click.Choice(BACKENDS), default="ort", show_default=True)
@click.option("--artifacts", default=None, help="Exported graphs (ort/trt); default: exported once into a cache.")
@click.option("--max-bytes", type=int, default=256, show_default=True, help="Bytes to generate at most.")
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 = greedy.")
@click.option("--top-k", type=int, default=None)
@click.option("--top-p", type=float, default=None)
@click.option("--seed", type=int, default=None, help="Seed of the sampler (reproducible runs).")
@click.option("--k", "k", type=int, default=None, help=K_HELP)
@click.option("--lookup", type=int, default=None, help=LOOKUP_HELP)
@click.option("--unmask", type=click.Choice(UNMASK), default=None, help="blt-d/blt-dv unmasking rule.")
@click.option("--alpha", type=float, default=None, help="Confidence threshold (blt-d 0.7, blt-dv 0.3).")
@click.option("--gamma", type=float, default=None, help="Entropy bound (blt-d 1.0, blt-dv 1.5).")
@click.option("--block-start", type=click.Choice(BLOCK_START_RULES), default=None,
              help="Where a diffusion block starts [default: force for blt-d, the paper's Algorithm 1; patch for "
                   "blt-dv, whose drafts then verify more often].")  # fmt: skip
@click.option("--stop", multiple=True, help="Stop string (repeatable); not part of the output.")
@click.option("--ignore-eos", is_flag=True, help="Do not stop at EOS.")
@click.option("--logit-bias", "logit_bias", multiple=True, callback=parse_bias, metavar="BYTE=BIAS",
              help="Add BIAS (-100 to 100) to byte BYTE's logit (0-255) wherever a byte is chosen (repeatable; "
                   "-100 bans it: --logit-bias 10=-100 writes no newline).")  # fmt: skip
@click.option("--presence-penalty", type=float, default=0.0, show_default=True,
              help="-2 to 2: taken off the logit of every byte generated before (OpenAI's).")  # fmt: skip
@click.option("--frequency-penalty", type=float, default=0.0, show_default=True,
              help="-2 to 2: taken off a byte's logit once per time it was generated before (OpenAI's; "
                   "against repetition).")  # fmt: skip
@click.option("--format", "format_", type=click.Choice(FORMATS), default=None,
              help="The output's format: json is one JSON object (bytes that would break it are never chosen; "
                   "ar, blt-s, blt-dv).")  # fmt: skip
@click.option(
    "--schema",
    type=click.Path(dir_okay=False),
    callback=read_file("a JSON schema file"),
    default=None,
    help="A JSON schema file (OpenAI's strict subset) the JSON object follows; implies --format json.",
)
@click.option(
    "--grammar",
    type=click.Path(dir_okay=False),
    callback=read_file("a grammar file"),
    default=None,
    help="A grammar file (Lark's notation, start: ...; or GBNF, root ::= ...) the whole output is derived by. "
    "ar, blt-s, blt-dv.",
)  # fmt: skip
@click.option("--regex", "pattern", default=None, metavar="REGEX",
              help="Hold the whole output to this regular expression (matched whole, as re.fullmatch does; JSON "
                   "Schema's pattern subset and ECMA-262 dialect): e.g. --regex '(yes|no)'. "
                   "ar, blt-s, blt-dv.")  # fmt: skip
@click.option(
    "--max-context",
    type=int,
    default=None,
    help="Most ids (prompt + output) a call may hold [default: no limit but the model's].",
)
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Intra-op threads of the backend.")
@click.option("--device", default=None, help="torch/trt: where to compute and keep the caches (cpu, cuda, cuda:1).")
@click.option("--cuda-graphs/--no-cuda-graphs", default=None, help="torch on CUDA: CUDA graphs [default: on].")
@click.option("--stream", is_flag=True, help="Print text as it is verified.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON record: text, stop reason, statistics.")
@click.option("--logprobs", type=click.IntRange(0, MAX_LOGPROBS), default=None,
              help="With --json (ar, blt-s, blt-dv): each generated id's log-probability under the model "
                   "and the N most likely ids' (0: the generated id's only).")  # fmt: skip
@click.option("--quiet", "-q", is_flag=True, help="Nothing on stderr but errors (no first-use export notice).")
def generate(
    checkpoint, prompt, prompt_file, mode, backend, artifacts, max_bytes, temperature, top_k, top_p, seed, k,
    lookup, unmask, alpha, gamma, block_start, stop, ignore_eos, logit_bias, presence_penalty, frequency_penalty,
    format_, schema, grammar, pattern, max_context, threads, device, cuda_graphs, stream, as_json, logprobs, quiet,
):  # fmt: skip
    """Generate bytes after a prompt with ar, blt-d, blt-s or blt-dv."""
    from fastblt.cli.progress import first_use_notice
    from fastblt.formats.checkpoint import load_config, resolve_checkpoint_path
    from fastblt.runtime.generator import Generator
    from fastblt.runtime.options import make_request

    data = read_prompt(prompt, prompt_file)
    for name, value in (("--top-k", top_k), ("--top-p", top_p)):
        if value is not None and temperature == 0:  # greedy would ignore it: say so rather than not sample
            raise click.BadParameter("shapes sampling; with --temperature 0 (the default) decoding is greedy: "
                                     "set --temperature > 0", param_hint=name)  # fmt: skip
    if logprobs is not None and not as_json:
        raise click.BadParameter("goes into the JSON record: add --json", param_hint="--logprobs")
    if stream and as_json:  # one record, written once the text is whole: nothing to stream
        raise click.UsageError("--stream prints text as it comes, --json one record at the end: give one of them")
    options = dict(
        temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, k=k, lookup=lookup, unmask=unmask, alpha=alpha,
        gamma=gamma, block_start=block_start, stop=[arg_bytes(x) for x in stop], stop_on_eos=not ignore_eos,
        logprobs=logprobs, logit_bias=logit_bias, presence_penalty=presence_penalty,
        frequency_penalty=frequency_penalty, format=format_, schema=schema, pattern=pattern, grammar=grammar,
    )  # fmt: skip
    # checked once, against the checkpoint's config, before anything is loaded or exported
    request = make_request(data, load_config(resolve_checkpoint_path(checkpoint)), mode, max_bytes, **options)
    g = Generator(
        checkpoint, backend=backend, artifacts=artifacts, max_context=max_context, threads=threads, device=device,
        cuda_graphs=cuda_graphs, on_export=None if quiet or as_json else first_use_notice,
    )  # fmt: skip
    if stream:
        it = g.stream(request)
        with reader_may_leave():
            while True:
                try:
                    click.echo(next(it), nl=False)
                    sys.stdout.flush()
                except StopIteration:
                    break
            click.echo()
        return
    out = g.generate(request)
    if as_json:
        record = {
            "text": out.text,
            "bytes_hex": out.bytes.hex(),
            "stop_reason": out.stop_reason,
            "checkpoint": str(g.checkpoint_path) if g.checkpoint_path else checkpoint,
            "stats": out.stats.to_dict(),
        }
        if out.logprobs is not None:  # per generated id (a stop string's included, EOS not), as stats count
            record |= {"ids": out.ids, "logprobs": out.logprobs,
                       "top_logprobs": [{str(i): v for i, v in top.items()} for top in out.top_logprobs]}  # fmt: skip
        click.echo(json.dumps(record, indent=2))
    else:
        click.echo(out.text)
