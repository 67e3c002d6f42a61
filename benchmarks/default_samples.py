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

MODES = ("ar", "blt-d", "blt-s", "blt-dv")


@click.command()
@click.option("--checkpoint", default="default", show_default=True)
@click.option("--backend", default="torch", show_default=True)
@click.option("--n", "n_samples", default=10, show_default=True)
@click.option("--max-bytes", default=96, show_default=True)
@click.option("--out", default="benchmarks/results/default_samples", show_default=True)
def main(checkpoint: str, backend: str, n_samples: int, max_bytes: int, out: str) -> None:
    import torch

    import fastblt
    from fastblt.model.corpus import Corpus
    from fastblt.model.train_report import function_header_prompts

    torch.manual_seed(0)
    gen = fastblt.Generator(checkpoint, backend=backend)
    prompts = function_header_prompts(Corpus.load(limit_bytes=1), n_samples)
    rows, lines = [], [f"# Default-model samples ({backend} backend, greedy, {max_bytes} bytes)", ""]
    for i, prompt in enumerate(prompts):
        outs = {m: gen.generate(prompt, mode=m, max_bytes=max_bytes) for m in MODES}
        same = len({outs[m].bytes for m in ("ar", "blt-s", "blt-dv")}) == 1
        rows.append({"prompt_tail": prompt.decode("utf-8", "replace").splitlines()[-1], "ar_equal_s_dv": same})
        lines += [f"## Sample {i + 1} (ar == blt-s == blt-dv: {same})", ""]
        for m in MODES:
            o = outs[m]
            rows[-1][m] = {"text": o.text, "acceptance_rate": o.stats.acceptance_rate}
            acc = "" if o.stats.acceptance_rate is None else f", acceptance {o.stats.acceptance_rate:.2f}"
            lines += [f"`{m}`{acc}:", "```python", rows[-1]["prompt_tail"], o.text, "```", ""]
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out + ".md").write_text("\n".join(lines))
    Path(out + ".json").write_text(json.dumps(rows, indent=2))
    click.echo("\n".join(lines))
    sys.exit(0 if all(r["ar_equal_s_dv"] for r in rows) else 1)


if __name__ == "__main__":
    main()
