"""`fastblt convert`: move a checkpoint between the Hugging Face, Meta and fastblt layouts."""

from __future__ import annotations

import json

import click

from fastblt.export.spec import FLOAT_DTYPES, TORCH_DTYPES

TARGETS = {"hf": "hf", "meta": "meta-hub", "meta-hub": "meta-hub", "meta-dump": "meta-dump", "fastblt": "fastblt"}


@click.command()
@click.argument("src")
@click.option("--to", "target", type=click.Choice(sorted(TARGETS)), required=True, help="Output layout.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), required=True, help="Output directory.")
@click.option(
    "--dtype", type=click.Choice(sorted(FLOAT_DTYPES)), default=None, help="Cast floating weights (default: keep)."
)
@click.option("--force", is_flag=True, help="Replace an output directory that holds other files.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def convert(src: str, target: str, out_dir: str, dtype: str | None, force: bool, as_json: bool) -> None:
    """Convert checkpoint SRC (a directory, or "default") to another layout.

    \b
    Layouts (the input's is detected):
      hf         config.json + model.safetensors as BltForCausalLM.save_pretrained writes them
      meta       the facebook/blt-1b Hub layout: config.json {"args": ...} + model.safetensors
                 + entropy_model/{params.json, consolidated.pth}   (alias: meta-hub)
      meta-dump  Meta's training dump: params.json + consolidated.pth (+ entropy_model/)
      fastblt    our own: config.json {"format": "fastblt", ...} + model.safetensors
    The entropy model travels with the checkpoint in every layout; BLT-D rows are kept.

    \b
    Examples:
      fastblt convert /data/blt-1b --to fastblt --out /tmp/blt-1b   # a facebook/blt-1b download
      fastblt convert default --to fastblt --dtype bf16 --out /tmp/blt-bf16
    The embedded default has fastblt's decoder input norm, which the released layouts cannot
    hold, so it converts only to fastblt.
    """
    from fastblt.errors import CheckpointError
    from fastblt.formats.checkpoint import OutputInUse, checkpoint_hash, detect_format, resolve_checkpoint_path
    from fastblt.formats.checkpoint import convert as run_convert

    source = resolve_checkpoint_path(src)
    torch_dtype = TORCH_DTYPES[FLOAT_DTYPES[dtype]] if dtype else None
    try:
        out = run_convert(source, TARGETS[target], out_dir, dtype=torch_dtype, overwrite=force)
    except OutputInUse as e:  # the API's message names overwrite=True; here it is --force
        raise CheckpointError(f"{e.out}: {e.what}; pass --force to replace it") from None
    result = {
        "source": str(source),
        "source_format": detect_format(source),
        "format": TARGETS[target],
        "out": str(out),
        "sha256": checkpoint_hash(out),
    }
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        click.echo(f"wrote {result['format']} checkpoint to {out} (from {result['source_format']} {source})")
