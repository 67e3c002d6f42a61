"""`fastblt info`: what a checkpoint is and what can run it here."""

from __future__ import annotations

import json

import click


@click.command()
@click.option("--checkpoint", default="default", show_default=True, help='Checkpoint directory or "default".')
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def info(checkpoint: str, as_json: bool) -> None:
    """Show a checkpoint's format, sizes, parameter counts, capabilities and the backends available."""
    from fastblt.engines.registry import available
    from fastblt.formats.checkpoint import detect_format, load_checkpoint, resolve_checkpoint_path

    path = resolve_checkpoint_path(checkpoint)
    model = load_checkpoint(path)
    cfg = model.config
    result = {
        "checkpoint": str(path),
        "format": detect_format(path),
        "modes": ["ar", "blt-s"] + (["blt-d", "blt-dv"] if cfg.is_blt_d else []),
        "block_size": cfg.blt_d.block_size if cfg.blt_d else None,
        "params": model.num_params(),
        "patching_threshold": cfg.patching.threshold,
        "config": cfg.to_dict(),
        "backends": {n: {"available": a.available, "reason": a.reason} for n, a in available().items()},
    }
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    click.echo(f"checkpoint  {result['checkpoint']} ({result['format']})")
    click.echo(f"modes       {', '.join(result['modes'])}")
    for name, count in result["params"].items():
        click.echo(f"  {name:<16} {count:>12,d} params")
    for name, a in result["backends"].items():
        click.echo(f"backend {name:<6} {'yes' if a['available'] else 'no '}  {a['reason']}")
