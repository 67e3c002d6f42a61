"""Helpers shared by the validate tests (conftest.py builds the fixtures)."""

from __future__ import annotations

import ast
import shutil
from collections.abc import Callable
from pathlib import Path

import onnx

from fastblt.export.manifest import read_manifest, sha256_file, write_manifest

from tiny import run_cli  # noqa: F401  (re-exported for the tests here)

MAX_STEP = 16  # positions per step of the test exports (rings of window + 16 slots)
SCOPES = "pkg.torch.onnx.name_scopes"


def broken_copy(src: Path, dst: Path, step: str, edit: Callable[[onnx.ModelProto], str]) -> tuple[Path, str]:
    """Copy an export, apply `edit` to one graph and re-sync that graph's sha256 in the manifest
    (so the artifacts look intact to every file check). Returns the copy and edit's description."""
    shutil.copytree(src, dst)
    manifest = read_manifest(dst)
    path = dst / manifest["graphs"][step]["file"]
    proto = onnx.load(str(path))
    what = edit(proto)
    onnx.save(proto, str(path))
    manifest["graphs"][step]["sha256"][path.name] = sha256_file(path)
    write_manifest(dst, manifest)
    return dst, what


def scopes(node: onnx.NodeProto) -> list[str]:
    raw = next((p.value for p in node.metadata_props if p.key == SCOPES), "[]")
    return ast.literal_eval(raw)
