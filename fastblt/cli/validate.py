"""`fastblt validate`: prove numerically that the artifacts compute the checkpoint.

Exit codes: 0 every gate passed; 1 a gate failed (the report names graph, output, case and by how
much; for a failed graph the first diverging layer; for generation the first diverging step);
2 bad input (checkpoint, artifacts from another checkpoint, an unreadable prompt file, options);
3 nothing failed but a requested backend (by default torch and ort) could not run here (reported as
skipped, with why).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from fastblt.cli.common import Positive, deprecated_option
from fastblt.errors import BackendUnavailable, FastBltError, InputError
from fastblt.export.spec import DEFAULT_MAX_STEP

EXIT_PASS, EXIT_FAIL, EXIT_BAD_INPUT, EXIT_UNAVAILABLE = 0, 1, 2, 3


def read_prompts(path: Path) -> tuple[str, ...]:
    """Prompts from a file: a JSON list of strings (*.json), or text with prompts separated by
    lines holding only `---` (without such lines, every non-empty line is one prompt)."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise InputError(f"--prompts {path}: cannot read it ({e.strerror or e})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"--prompts {path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise InputError(f"--prompts {path}: invalid JSON ({e.msg} at line {e.lineno})") from None
        if not isinstance(data, list) or not all(isinstance(p, str) for p in data):
            raise InputError(f"--prompts {path}: expected a JSON list of strings")
        prompts = [p for p in data if p]
    elif any(line.strip() == "---" for line in text.splitlines()):
        blocks, cur = [], []
        for line in text.splitlines(keepends=True):
            if line.strip() == "---":
                blocks.append("".join(cur))
                cur = []
            else:
                cur.append(line)
        blocks.append("".join(cur))
        prompts = [b.strip("\n") for b in blocks if b.strip()]
    else:
        prompts = [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise InputError(f"--prompts {path}: holds no prompt")
    return tuple(prompts)


def _csv(value: str | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    items = tuple(v.strip() for v in value.split(",") if v.strip())
    return items or None


@click.command("validate")
@click.option("--checkpoint", default="default", show_default=True, help='Checkpoint directory or "default".')
@click.option(
    "--artifacts",
    type=click.Path(path_type=Path),
    default=None,
    help="Export directory (manifest.json) for ort/trt [default: export once into the cache].",
)
@click.option("--backends", default=None, help="Comma list of torch, ort, trt [default: torch,ort].")
@click.option("--reference", type=click.Choice(["torch", "hf"]), default="torch", show_default=True)
@click.option("--dtype", type=click.Choice(["fp32", "fp16", "bf16"]), default=None, help="[default: the artifacts'].")
@click.option(
    "--prompts",
    "prompts_file",
    type=click.Path(path_type=Path),
    default=None,
    help="Prompts: a JSON list (*.json), or text split by lines of '---' (else one per line).",
)
@click.option("--graphs", default=None, help="Comma list of step graphs to compare [default: all].")
@click.option("--modes", default=None, help="Comma list of decoding modes end to end [default: all it can run].")
@click.option("--max-bytes", type=int, default=32, show_default=True, help="Bytes per end-to-end generation.")
@click.option(
    "--max-step", type=int, default=DEFAULT_MAX_STEP, show_default=True, help="Positions per step without artifacts."
)
@deprecated_option("--capacity", "caches follow the context; --max-step sets the rings' headroom")
@click.option("--atol", type=Positive(), default=None, help="fp32 max-abs gate [default: 1e-4, docs/validation.md].")
@click.option("--no-real", is_flag=True, help="Random graph inputs only (no prompt-derived ones).")
@click.option("--no-e2e", is_flag=True, help="Skip end-to-end generation.")
@click.option("--no-layers", is_flag=True, help="Do not localise failed graphs per layer.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Intra-op threads of torch and onnxruntime (small step graphs run fastest on one; raise it for big models).",
)
@click.option(
    "--device", default=None, help="Where the torch and trt candidates run (cpu, cuda, cuda:1); the reference: CPU."
)
@click.option("--save-inputs", type=click.Path(path_type=Path), default=None, help="Write feeds (polygraphy JSON).")
@click.option("--load-inputs", type=click.Path(path_type=Path), default=None, help="Replay feeds from --save-inputs.")
@click.option("--save-outputs", type=click.Path(path_type=Path), default=None, help="Write outputs (RunResults).")
@click.option("--cache-dir", type=click.Path(path_type=Path), default=None, help="Where automatic exports go.")
@click.option(
    "--report", "report_dir", type=click.Path(path_type=Path), default=None, help="Write report.md/.json/.png."
)
@click.option(
    "--force", is_flag=True, help="Replace an earlier report, and write into non-empty --save-inputs/--save-outputs."
)
@click.option("--json", "as_json", is_flag=True, help="Print the JSON report on stdout.")
def validate(
    checkpoint: str,
    artifacts: Path | None,
    backends: str | None,
    reference: str,
    dtype: str | None,
    prompts_file: Path | None,
    graphs: str | None,
    modes: str | None,
    max_bytes: int,
    max_step: int,
    atol: float | None,
    no_real: bool,
    no_e2e: bool,
    no_layers: bool,
    seed: int,
    threads: int,
    device: str | None,
    save_inputs: Path | None,
    load_inputs: Path | None,
    save_outputs: Path | None,
    cache_dir: Path | None,
    report_dir: Path | None,
    force: bool,
    as_json: bool,
) -> None:
    """Per graph, per layer, end to end, and against Hugging Face: is the deployed model the trained one?

    \b
    Gates (docs/validation.md): fp32 graphs within 1e-4 max abs of torch; fp16/bf16 by cosine >= 0.99 and
    top-1 agreement >= 0.99 where the reference margin >= 0.1; NaN/Inf checked separately;
    generation identical byte for byte. Exit 0 pass, 1 a gate failed, 2 bad input, 3 a requested
    backend is unavailable here (and nothing failed).
    """
    if reference == "hf":
        _check_reference_hf(click.get_current_context())
    try:
        code = _run(**locals())
    except BackendUnavailable as e:
        click.echo(f"error: {e}", err=True)
        code = EXIT_UNAVAILABLE
    except FastBltError as e:
        click.echo(f"error: {e}", err=True)
        code = EXIT_BAD_INPUT
    sys.exit(code)


def _run(**kw) -> int:
    from fastblt.validate.e2e import MODES
    from fastblt.validate.run import ValidateOptions, validate

    if kw["report_dir"] is not None:
        _check_report_dir(kw["report_dir"], kw["force"])
    prompts = read_prompts(kw["prompts_file"]) if kw["prompts_file"] is not None else None
    opts = ValidateOptions(
        checkpoint=kw["checkpoint"],
        artifacts=kw["artifacts"],
        backends=_csv(kw["backends"]),
        reference=kw["reference"],
        dtype=kw["dtype"],
        prompts=prompts,
        graphs=_csv(kw["graphs"]),
        modes=_csv(kw["modes"]) or MODES,
        max_bytes=kw["max_bytes"],
        hf_greedy_bytes=kw["max_bytes"],
        max_step=kw["max_step"],
        real=not kw["no_real"],
        e2e=not kw["no_e2e"],
        layers=not kw["no_layers"],
        seed=kw["seed"],
        threads=kw["threads"],
        device=kw["device"],
        atol=kw["atol"],
        save_inputs=kw["save_inputs"],
        load_inputs=kw["load_inputs"],
        save_outputs=kw["save_outputs"],
        cache_dir=kw["cache_dir"],
        force=kw["force"],
    )
    if kw["modes"] is not None:  # asked for by name: a mode the checkpoint cannot run is an error, not a skip
        _check_modes(kw["checkpoint"], opts.modes)
    report = validate(opts, log=lambda line: click.echo(line, err=True))
    paths = report.save(kw["report_dir"], overwrite=kw["force"]) if kw["report_dir"] is not None else {}
    if kw["as_json"]:
        click.echo(report.to_json())
    else:
        _print_summary(report, paths)
    unavailable = any(s.what in opts.backends for s in report.skipped)
    nothing_ran = not report.meta.get("backends_run")  # every backend asked for was skipped
    if unavailable and (nothing_ran or (report.failed == 0 and not report.errors)):
        return EXIT_UNAVAILABLE
    return EXIT_PASS if report else EXIT_FAIL


# Options only --reference torch reads whose defaults are values, so that only the command line can
# tell them given (ValidateOptions refuses the others, run.TORCH_REFERENCE_ONLY, for every caller)
VALUED_TORCH_ONLY = ("modes", "max_step", "no_real", "no_e2e", "no_layers", "seed")


def _check_reference_hf(ctx: click.Context) -> None:
    """Usage error for options --reference hf would ignore: passing without the comparison they
    ask for (--backends ort --artifacts art/) would be a false PASS."""
    from fastblt.validate.run import TORCH_REFERENCE_ONLY, hf_refusal

    torch_only = {*TORCH_REFERENCE_ONLY, *VALUED_TORCH_ONLY}
    unset = (None, click.core.ParameterSource.DEFAULT, click.core.ParameterSource.DEFAULT_MAP)
    given = [
        p.opts[0] for p in ctx.command.params if p.name in torch_only and ctx.get_parameter_source(p.name) not in unset
    ]
    if given:
        raise click.UsageError(hf_refusal(given))


def _check_report_dir(report_dir: Path, force: bool) -> None:
    """Before any work: --report must be a directory (or new) without an earlier report, unless --force."""
    from fastblt.validate.report import earlier_report
    from fastblt.validate.run import blocked_by

    blocked_by("--report", report_dir)
    held = earlier_report(report_dir)
    if held and not force:
        raise InputError(f"--report {report_dir}: already holds {', '.join(held)}; pass --force to replace them")


def _check_modes(checkpoint: str, modes: tuple[str, ...]) -> None:
    from fastblt.errors import CapabilityError
    from fastblt.formats.checkpoint import load_config, resolve_checkpoint_path

    diffusion = [m for m in modes if m in ("blt-d", "blt-dv")]
    if diffusion and load_config(resolve_checkpoint_path(checkpoint)).blt_d is None:
        raise CapabilityError(f"--modes {','.join(diffusion)}: needs a BLT-D checkpoint; {checkpoint} is a plain BLT")


def _print_summary(report, paths: dict) -> None:
    click.echo(f"validate: {report.verdict.upper()} ({report.compared} compared, {report.failed} failed)")
    for pair, graphs in report.results.items():
        for graph in graphs:
            ok = report.graph_passed(pair, graph)
            n = sum(len(c) for c in graphs[graph].values())
            click.echo(f"  {pair[0]} vs {pair[1]:<6} {graph:<16} {n:>4} checks  {'pass' if ok else 'FAIL'}")
    for line in report.failures()[:40]:
        click.echo(f"  FAIL {line}")
    for s in report.skipped:
        click.echo(f"  skipped {s.what}: {s.reason}")
    for name, p in paths.items():
        click.echo(f"  {name}: {p}")
