"""Session fixtures: one tiny checkpoint, exported once per dtype for the whole session.

The model covers the less common paths at once: 2 decoder layers (cross-attention at each, so
cross.1.* and past.1.*), k=4 slots with the global input projection (4*16 != 48), a 24-byte
sliding window (shorter than the chain test's context), max_patch_length 6 and fastblt's decoder
input norm (tests/validate exports a model without it), with the patching threshold at an entropy
quantile so patches of several lengths occur.
"""

from __future__ import annotations

import contextlib
import copy
import io
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from fastblt.export.exporter import export_model
from fastblt.export.options import ExportOptions
from fastblt.formats.checkpoint import checkpoint_hash, load_checkpoint, save_checkpoint
from fastblt.model.blt import BltModel

from export_helpers import MAX_STEP, MODEL, MODEL_KW
from tiny import make_model


@pytest.fixture(scope="session")
def ckpt_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_checkpoint(make_model(MODEL, **MODEL_KW), path)
    return path


@pytest.fixture(scope="session")
def ref_model(ckpt_dir) -> BltModel:
    return load_checkpoint(ckpt_dir).eval()


@dataclass(frozen=True)
class CliRun:
    out: Path  # the export directory
    stdout: str
    stderr: str


@pytest.fixture(scope="session")
def fp32_run(ckpt_dir, tmp_path_factory) -> CliRun:
    """The fp32 export, written by the CLI itself (its output is checked in test_cli.py)."""
    from fastblt.cli import main

    out = tmp_path_factory.mktemp("export") / "fp32"
    args = ["export", "--checkpoint", str(ckpt_dir), "--out", str(out), "--max-step", str(MAX_STEP)]
    stdout, stderr = io.StringIO(), io.StringIO()
    mp = pytest.MonkeyPatch()
    mp.setattr(sys, "argv", ["fastblt", *args, "--json"])
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            main()
    except SystemExit as e:
        assert e.code in (0, None), f"fastblt export exited {e.code}: {stderr.getvalue()[-2000:]}"
    finally:
        mp.undo()
    return CliRun(out, stdout.getvalue(), stderr.getvalue())


@pytest.fixture(scope="session")
def fp32_export(fp32_run) -> Path:
    return fp32_run.out


def _api_export(ckpt_dir: Path, ref: BltModel, root: Path, dtype: torch.dtype, name: str, **kw) -> Path:
    out = root / name
    model = copy.deepcopy(ref).to(dtype)
    options = ExportOptions(dtype=name, max_step=MAX_STEP, **kw)
    export_model(model, out, options, checkpoint_hash=checkpoint_hash(ckpt_dir), checkpoint_source=str(ckpt_dir))
    return out


@pytest.fixture(scope="session")
def fp16_export(ckpt_dir, ref_model, tmp_path_factory) -> Path:
    # external_data_bytes=0: every graph keeps its weights in <graph>.onnx.data (the big-model path)
    return _api_export(ckpt_dir, ref_model, tmp_path_factory.mktemp("export"), torch.float16, "fp16",
                       external_data_bytes=0)  # fmt: skip


@pytest.fixture(scope="session")
def bf16_export(ckpt_dir, ref_model, tmp_path_factory) -> Path:
    return _api_export(ckpt_dir, ref_model, tmp_path_factory.mktemp("export"), torch.bfloat16, "bf16")
