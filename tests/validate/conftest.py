"""Session fixtures for the validate tests: one tiny checkpoint (2 decoder layers, BLT-D), exported
once to ONNX, and helpers to break a copy of that export in a known way.

Every test here runs torch and onnxruntime on one intra-op thread: the machine is shared, and
oversubscribed threads make tiny models a hundred times slower.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from validate_helpers import MAX_STEP

from fastblt.export.exporter import export_model
from fastblt.export.options import ExportOptions
from fastblt.formats.checkpoint import checkpoint_hash, load_checkpoint, save_checkpoint

from tiny import make_model


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("validate") / "ckpt"
    save_checkpoint(make_model("hf-test-sizes", n_dec=2), path)
    return path


@pytest.fixture(scope="session")
def model(ckpt):
    return load_checkpoint(ckpt).eval()


@pytest.fixture(scope="session")
def artifacts(ckpt, model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("validate") / "fp32"
    options = ExportOptions(max_step=MAX_STEP)
    export_model(model, out, options, checkpoint_hash=checkpoint_hash(ckpt), checkpoint_source=str(ckpt))
    return out
