"""How much does context beyond W bytes help a byte LM here? The ceiling on what BLT's global model
can add to a local decoder that already attends over W bytes.

The same trained byte LM is evaluated with its attention window cut to W (RoPE is relative, so a
shorter window is the same model seeing less): bits/byte at W minus bits/byte at the trained window
is what the bytes further back are worth to it. A model trained at W would adapt and lose less, so
this is an upper bound (a loose one for small W, where a stack of layers still reaches further than
one window). The embedded default's local encoder and decoder attend over 128 bytes, so the global
latent can only bring what lies beyond that, plus compute.

    python benchmarks/context_reach.py [--byte-lm runs/default/baseline/model.safetensors]

Always measures the shipped entropy model (a 2-layer byte LM); --byte-lm adds the baseline byte
transformer that `fastblt train` saves next to the BLT-D (d=256, 4 layers, not shipped).
Writes benchmarks/results/context_reach.{json,md,png}.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import click
import torch
from safetensors.torch import load_file
from tqdm import tqdm

from fastblt.formats.checkpoint import load_checkpoint
from fastblt.model.blt import EntropyModel
from fastblt.model.config import VOCAB_SIZE
from fastblt.train.blt_d import eval_bpb
from fastblt.train.corpus import Corpus
from fastblt.train.loop import default_plan

RESULTS = Path(__file__).resolve().parent / "results"
WINDOWS = (512, 256, 128, 64, 32, 16)


def with_window(model: EntropyModel, window: int) -> EntropyModel:
    """The same weights, attending over at most `window` bytes."""
    cut = EntropyModel(dataclasses.replace(model.cfg, window=window), VOCAB_SIZE)
    cut.load_state_dict(model.state_dict())
    return cut.eval()


def reach(name: str, model: EntropyModel, sets: dict[str, torch.Tensor], progress: tqdm) -> list[dict]:
    rows = []
    for w in WINDOWS:
        if model.cfg.window is not None and w > model.cfg.window:
            continue
        cut = with_window(model, w)
        with torch.no_grad():
            row = {"model": name, "window": w} | {k: eval_bpb(cut, x)["bpb"] for k, x in sets.items()}
        rows.append(row)
        progress.update(1)
    for r in rows:  # what the bytes beyond the window are worth: bits/byte lost against the widest window
        r |= {f"{k}_lost": r[k] - rows[0][k] for k in sets}
    return rows


def render(rows: list[dict], prose: float) -> str:
    lines = [
        "# Context reach: what bytes beyond the attention window are worth",
        "",
        "`python benchmarks/context_reach.py`: a trained byte LM evaluated with its attention window cut to W "
        f"(same weights). Held-out = the report's 128 headline windows of 1024 bytes ({prose:.0%} English prose from "
        "`pydoc_data/topics.py`); code = up to 8 windows of every other held-out file. Lost = bits/byte added "
        "against the widest window: the most that a BLT global model could add to a local decoder attending "
        "over W bytes by bringing the older context (the embedded default's local window is 128). The model "
        "was trained with the widest window, so for small W this overstates it: a model trained at W adapts "
        "(a BLT-D trained with 16-byte local windows is 0.09 bits/byte behind the 128-byte default, "
        "`train_variants.md`).",
        "",
        "| model | window | held-out bits/byte | lost | code bits/byte | lost |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['window']} | {r['heldout']:.3f} | {r['heldout_lost']:+.3f} | "
            f"{r['code']:.3f} | {r['code_lost']:+.3f} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == name]
        for key, style in (("heldout", "o-"), ("code", "s--")):
            ax.plot([r["window"] for r in mine], [r[key] for r in mine], style, label=f"{name}: {key}")
    ax.set_xscale("log", base=2)
    ax.axvline(128, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("attention window (bytes)")
    ax.set_ylabel("held-out bits / byte")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


@click.command()
@click.option(
    "--byte-lm",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="The baseline byte transformer's model.safetensors from a `fastblt train` run (runs/NAME/baseline/).",
)
@click.option("--out", type=click.Path(path_type=Path), default=RESULTS / "context_reach", show_default=True)
@click.option("--threads", default=1, show_default=True, help="Torch threads (1 leaves a core to a training run).")
def main(byte_lm: Path | None, out: Path, threads: int) -> None:
    torch.set_num_threads(threads)
    models = {"entropy model (shipped, 2 x d=96)": load_checkpoint("default").entropy_model.eval()}
    if byte_lm is not None:
        cfg = default_plan(145, 10, 145).baseline
        lm = EntropyModel(cfg, VOCAB_SIZE)
        try:
            lm.load_state_dict(load_file(str(byte_lm)))
        except (RuntimeError, OSError) as e:
            raise click.UsageError(f"--byte-lm {byte_lm}: not the baseline byte LM's weights ({str(e)[:120]})") from e
        models[f"byte LM baseline ({cfg.n_layers} x d={cfg.dim})"] = lm.eval()
    corpus = Corpus.load()
    sets = {"heldout": corpus.heldout_windows(1024, 128), "code": corpus.code_windows()}
    index = corpus.heldout_window_index(1024, 128)
    prose = sum(corpus.heldout_files[f] == "pydoc_data/topics.py" for f, _ in index) / len(index)
    total = sum(sum(1 for w in WINDOWS if m.cfg.window is None or w <= m.cfg.window) for m in models.values())
    rows: list[dict] = []
    with tqdm(total=total, desc="context reach", unit="eval") as progress:
        for name, model in models.items():
            rows += reach(name, model, sets, progress)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(rows, indent=2))
    out.with_suffix(".md").write_text(render(rows, prose))
    plot(rows, out.with_suffix(".png"))
    click.echo(render(rows, prose))


if __name__ == "__main__":
    main()
