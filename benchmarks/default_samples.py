"""Greedy samples of the embedded default in every decoding mode, on held-out function headers.

Reproduce:  python benchmarks/default_samples.py [--checkpoint default] [--backend torch] [--n 10]
Writes benchmarks/results/default_samples.md (and .json) and prints the Markdown. The prompts are
the ones of the training report (fastblt/assets/default/REPORT.md): 300 bytes of a held-out
stdlib file ending with a `def ...:` line. For greedy decoding, ar, blt-s and blt-dv must print
the same bytes (they are checked and the result is in the table); blt-d may differ.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click


@click.command()
@click.option("--checkpoint", default="default", show_default=True)
@click.option("--backend", default="torch", show_default=True)
@click.option("--n", "n_samples", default=10, show_default=True)
@click.option("--max-bytes", default=96, show_default=True)
@click.option("--out", default="benchmarks/results/default_samples", show_default=True)
def main(checkpoint: str, backend: str, n_samples: int, max_bytes: int, out: str) -> None:
    import torch

    import fastblt
    from fastblt.bench.samples import samples_per_mode
    from fastblt.train.corpus import Corpus
    from fastblt.train.report import function_header_prompts, sample_lines

    torch.manual_seed(0)
    model = fastblt.load(checkpoint)
    prompts = function_header_prompts(Corpus.load(limit_bytes=1), n_samples)
    rows = samples_per_mode(model, prompts, max_bytes, backend=backend)
    lines = [f"# Default-model samples ({backend} backend, greedy, {max_bytes} bytes)", "", *sample_lines(rows)]
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out + ".md").write_text("\n".join(lines))
    Path(out + ".json").write_text(json.dumps(rows, indent=2))
    click.echo("\n".join(lines))
    sys.exit(0 if all(r["lossless_agree"] for r in rows) else 1)


if __name__ == "__main__":
    main()
