"""Constants and helpers shared by the export tests (conftest.py builds the fixtures from them)."""

from __future__ import annotations

import sys

CAPACITY = 96  # bytes; prefill 30 + 50 decode steps fit, and so do the parity tests' chunks
PATCH_CAPACITY = 64
MODEL = "hf-test-sizes"  # tests/tiny.py registry entry, with MODEL_KW on top
MODEL_KW = dict(n_dec=2, k=4, d_global=48, window=24, max_patch_length=6)


def run_cli(args: list[str], monkeypatch, capsys) -> tuple[int, str, str]:
    """Run `fastblt ARGS` in-process through fastblt.cli.main; returns (exit code, stdout, stderr)."""
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
