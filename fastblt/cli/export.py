"""`fastblt export`: every step graph to ONNX with a manifest, checked; or `--check DIR`.

Exit codes (fastblt/cli.py): 0 exported / up to date / checks passed, 1 a graph failed a check,
2 bad input (options, checkpoint, an --out holding a different export or other files, without --force).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from fastblt.cli.common import deprecated_option
from fastblt.export.options import DEFAULT_OPSET, ExportOptions
from fastblt.export.spec import DEFAULT_MAX_STEP, FLOAT_DTYPES


def _progress(total_label: str):
    def report(event: str, step: str, i: int, total: int, entry: dict | None) -> None:
        if event == "start":
            click.echo(f"[{i + 1}/{total}] {step:<13} {total_label} ...", err=True)
        if event != "done":
            return
        checks = entry.get("checks", {})
        summary = ", ".join(f"{name} {c['status']}" for name, c in checks.items())
        if "export_seconds" in entry:
            click.echo(
                f"[{i + 1}/{total}] {step:<13} {entry['export_seconds']:.1f} s, {_size(entry['bytes'])}, "
                f"{entry['nodes']} nodes; checks: {summary}",
                err=True,
            )
        else:
            click.echo(f"[{i + 1}/{total}] {step:<13} checks: {summary}", err=True)
        for name, c in checks.items():
            if c["status"] != "pass":
                click.echo(f"    {name}: {c['status']}: {c['detail']}", err=True)

    return report


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _summary(out: Path, manifest: dict, up_to_date: bool, seconds: float) -> dict:
    return {
        "out": str(out),
        "up_to_date": up_to_date,
        "seconds": round(seconds, 3),
        "checkpoint": {k: manifest["checkpoint"].get(k) for k in ("hash", "source")},
        "options": manifest["options"],
        "dims": manifest.get("dims"),
        "versions": manifest.get("versions"),
        "graphs": {
            step: {
                k: g.get(k)
                for k in ("file", "external_data", "sha256", "bytes", "nodes", "export_seconds", "checks")
                if k in g
            }
            for step, g in manifest["graphs"].items()
        },
    }


@click.command("export")
@click.option("--checkpoint", default="default", show_default=True, help='Checkpoint directory or "default".')
@click.option("--out", type=click.Path(path_type=Path), help="Output directory (written atomically).")
@click.option("--dtype", type=click.Choice(list(FLOAT_DTYPES)), default="fp32", show_default=True)
@click.option("--opset", type=int, default=DEFAULT_OPSET, show_default=True, help="ONNX opset (24: TensorScatter).")
@click.option(
    "--max-step",
    type=int,
    default=DEFAULT_MAX_STEP,
    show_default=True,
    help="Most positions per step call (prefill chunk, k+1, a block); windowed caches hold window + this.",
)
@click.option("--max-batch", type=int, default=64, show_default=True, help="Largest batch (dynamic dim bound).")
@deprecated_option("--max-context", "caches follow the context up to the model's limit")
@deprecated_option("--max-patches", "the global cache follows the context up to the model's limit")
@click.option("--force", is_flag=True, help="Replace an output directory that holds a different export or other files.")
@click.option(
    "--check", "check_dir", type=click.Path(path_type=Path), default=None, help="Only re-check an export directory."
)
@click.option("--json", "as_json", is_flag=True, help="Print the manifest summary as JSON on stdout.")
def export(checkpoint, out, dtype, opset, max_step, max_batch, force, check_dir, as_json) -> None:
    """Export the five step graphs of a checkpoint to ONNX, with manifest.json, and check them.

    \b
    Examples:
      fastblt export --checkpoint default --out artifacts/
      fastblt export --checkpoint ckpt/ --out artifacts-fp16/ --dtype fp16
      fastblt export --check artifacts/
    """
    if check_dir is not None:
        _run_check(check_dir, as_json)
        return
    if out is None:
        raise click.UsageError("--out is required (or use --check DIR)")
    _run_export(checkpoint, out, dtype, opset, max_step, max_batch, force, as_json)


def _run_export(checkpoint, out, dtype, opset, max_step, max_batch, force, as_json) -> None:
    from fastblt.export.checks import ExportCheckFailed
    from fastblt.export.exporter import export_model, mapped_weights
    from fastblt.export.options import existing_export, refusal
    from fastblt.export.spec import TORCH_DTYPES
    from fastblt.formats.checkpoint import checkpoint_hash, resolve_checkpoint_path
    from fastblt.formats.files import check_apart

    options = ExportOptions(dtype=dtype, opset=opset, max_step=max_step, max_batch=max_batch)
    source = resolve_checkpoint_path(checkpoint)
    check_apart(out, source, "checkpoint")  # --force replaces `out` whole
    ckpt_hash = checkpoint_hash(source)
    status = existing_export(out, ckpt_hash, options)
    if status == "same":
        click.echo(f"{out}: up to date (checkpoint {ckpt_hash[:12]}, same options)", err=True)
        if as_json:
            from fastblt.export.manifest import read_manifest

            click.echo(json.dumps(_summary(out, read_manifest(out), True, 0.0), indent=2))
        return
    if status is not None and not force:
        from fastblt.errors import ManifestMismatch

        raise ManifestMismatch(refusal(out, status))
    click.echo(f"mapping checkpoint {source} (weights are read and cast to {options.dtype} per graph)", err=True)
    config, weights = mapped_weights(source, TORCH_DTYPES[options.dtype])
    try:
        result = export_model(
            config,
            out,
            options,
            checkpoint_hash=ckpt_hash,
            checkpoint_source=str(checkpoint),
            force=True,  # the existing export was judged above
            progress=_progress("exporting"),
            weights=weights,
        )
    except ExportCheckFailed as e:
        click.echo(f"error: {e}", err=True)
        click.echo(f"{out}: left unchanged (nothing written)", err=True)
        sys.exit(1)
    click.echo(f"{result.out}: {len(result.manifest['graphs'])} graphs in {result.seconds:.1f} s", err=True)
    if as_json:
        click.echo(json.dumps(_summary(result.out, result.manifest, False, result.seconds), indent=2))


def _run_check(directory: Path, as_json: bool) -> None:
    from fastblt.export.checks import failures
    from fastblt.export.exporter import check_export
    from fastblt.export.manifest import read_manifest

    results = check_export(directory, progress=_progress("checking"))
    bad = {step: failures(r) for step, r in results.items() if failures(r)}
    if as_json:
        summary = _summary(directory, read_manifest(directory), True, 0.0)
        for step, rs in results.items():
            summary["graphs"][step]["checks"] = {r.check: r.to_dict() for r in rs}
        summary["passed"] = not bad
        click.echo(json.dumps(summary, indent=2))
    if bad:
        detail = "; ".join(f"{step}: {', '.join(r.check for r in rs)}" for step, rs in bad.items())
        click.echo(f"error: {directory}: failed checks ({detail})", err=True)
        sys.exit(1)
    click.echo(f"{directory}: all {len(results)} graphs pass their checks", err=True)
