"""`fastblt build`: one TensorRT engine per step graph of an export, with its engine manifest.

Exit codes (fastblt/cli.py): 0 built / up to date, 2 bad input or a TensorRT build error,
3 TensorRT or a CUDA device is missing here (the message says which).
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from fastblt.cli.common import Positive
from fastblt.engines.trt.build import DEFAULT_WORKSPACE_GB


def _progress(event: str, step: str, i: int, total: int, rec) -> None:
    head = f"[{i + 1}/{total}] {step:<13}"
    if event == "start":
        click.echo(f"{head} building ...", err=True)
    elif event == "skip":
        click.echo(f"{head} up to date (key {rec.cache_key[:12]}), skipped", err=True)
    else:
        profiles = ", ".join(p["name"] for p in rec.profiles)
        click.echo(
            f"{head} built in {rec.seconds:.1f} s, {rec.plan_bytes / 2**20:.1f} MiB, profiles: {profiles}", err=True
        )


@click.command("build")
@click.option(
    "--artifacts", type=click.Path(path_type=Path, file_okay=False), required=True, help="An export directory."
)
@click.option("--engines", type=click.Path(path_type=Path, file_okay=False), help="[default: ARTIFACTS/engines]")
@click.option("--profile", "profile_text", default=None, help="Phase sizes: prefill=512,decode=1,verify=17,block=8.")
@click.option("--max-batch", type=int, default=1, show_default=True, help="Largest batch the engines take.")
@click.option("--workspace", type=Positive(), default=DEFAULT_WORKSPACE_GB, show_default=True,
              help="Builder workspace, GB.")  # fmt: skip
@click.option("--timing-cache", type=click.Path(path_type=Path, dir_okay=False), help="[default: ENGINES/timing.cache]")
@click.option("--opt-level", type=int, default=None, help="Builder optimization level 0-5 [default: TensorRT's, 3].")
@click.option("--force", is_flag=True, help="Rebuild engines whose cache key matches.")
@click.option("--dry-run", is_flag=True, help="Only print the optimization profiles (needs no GPU or TensorRT).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
def build(
    artifacts, engines, profile_text, max_batch, workspace, timing_cache, opt_level, force, dry_run, as_json
) -> None:
    """Build TensorRT engines (strongly typed: precision comes from the graphs) from an export.

    \b
    Profiles per graph, from the export manifest: decode (1 new position), verify (k+1),
    block (the diffusion block B) and prefill (the prompt chunk); every phase gets the global
    cache's live-length range; the rings of the local stacks are static.
    An engine whose key (ONNX sha256, TensorRT version, GPU, profiles, flags) matches is skipped.

    \b
    Examples:
      fastblt build --artifacts artifacts/
      fastblt build --artifacts artifacts/ --profile prefill=256,verify=9 --json
      fastblt build --artifacts artifacts/ --dry-run
    """
    from fastblt.engines.trt.build import build_engines
    from fastblt.engines.trt.profiles import manifest_profiles, parse_profile_option
    from fastblt.errors import InputError
    from fastblt.export.manifest import read_manifest

    requested = parse_profile_option(profile_text)
    if workspace <= 0:
        raise InputError(f"--workspace {workspace}: expected a positive number of GB")
    if dry_run:
        profiles = manifest_profiles(read_manifest(artifacts), requested, max_batch)
        result = {step: [p.to_dict() for p in ps] for step, ps in profiles.items()}
        if as_json:
            click.echo(json.dumps({"artifacts": str(artifacts), "profiles": result}, indent=2))
            return
        for step, ps in result.items():
            for p in ps:
                dims = "  ".join(f"{d}={lo}/{opt}/{hi}" for d, (lo, opt, hi) in p["dims"].items())
                click.echo(f"{step:<13} {p['name']:<13} {dims}")
        return
    records = build_engines(
        artifacts,
        engines,
        requested,
        max_batch=max_batch,
        workspace_gb=workspace,
        timing_cache=timing_cache,
        force=force,
        progress=_progress,
        opt_level=opt_level,
    )
    if as_json:
        click.echo(json.dumps({"artifacts": str(artifacts), "engines": [r.to_dict() for r in records]}, indent=2))
    else:
        built = sum(r.status == "built" for r in records)
        click.echo(f"{built} built, {len(records) - built} up to date", err=True)
