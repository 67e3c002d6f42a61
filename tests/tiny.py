"""A registry of tiny random-weight models for tests (each config paired with what it covers).

Random weights give entropies near ln(260), i.e. byte patching; `make_model` sets the threshold
at an entropy quantile of a probe sequence so patches of several lengths occur.
"""

from __future__ import annotations

import dataclasses
import sys

import torch

from fastblt.model.blt import BltModel
from fastblt.model.config import BltConfig, tiny_config

TINY_CONFIGS: dict[str, dict] = {
    "hf-test-sizes": dict(),  # transformers' BltModelTester: hidden 16, 2 heads, 1 layer each
    "k4-global-projection": dict(k=4, d_global=48),  # 4*16 != 48: the 7B-style input projection
    "deep-local": dict(n_enc=2, n_dec=3, n_glob=2),  # several encoder/decoder/global layers
    "small-window": dict(window=8, max_patch_length=3),  # sliding windows and forced patch splits
}


def make_model(
    name: str = "hf-test-sizes", seed: int = 0, std: float = 0.3, quantile: float = 0.7, **overrides
) -> BltModel:
    kw = {**TINY_CONFIGS[name], **overrides}
    torch.manual_seed(seed)
    model = BltModel(tiny_config(**kw)).eval()
    with torch.no_grad():
        for p in model.parameters():
            torch.nn.init.normal_(p, std=std)
        probe = torch.randint(4, 260, (1, 64), generator=torch.Generator().manual_seed(seed + 1))
        probe[:, 0] = 1
        threshold = float(model.entropies(probe)[0, 1:].quantile(quantile))
    cfg: BltConfig = model.config
    model.config = dataclasses.replace(cfg, patching=dataclasses.replace(cfg.patching, threshold=threshold))
    return model


def random_tokens(n: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
    t = torch.randint(4, 260, (batch, n), generator=torch.Generator().manual_seed(seed))
    t[:, 0] = 1
    return t


def run_cli(args: list[str], monkeypatch, capsys) -> tuple[int, str, str]:
    """Run `fastblt ARGS` in-process through fastblt.cli.main: (exit code, stdout, stderr)."""
    from fastblt.cli import main

    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", ["fastblt", *args])
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    out, err = capsys.readouterr()
    return code, out, err
