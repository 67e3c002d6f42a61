"""What the CLI prints while a first-use export runs: one line, then a bar that knows its total."""

from __future__ import annotations

from pathlib import Path

from fastblt.cli.progress import first_use_notice


def test_first_use_notice_names_the_directory_and_counts_the_graphs(capsys):
    progress = first_use_notice(Path("/cache/abc/float32-step32"))
    steps = ("entropy", "encoder", "global", "decoder", "decoder_block")
    for i, step in enumerate(steps):
        progress("start", step, i, len(steps), None)
        progress("exported", step, i, len(steps), None)
        progress("done", step, i, len(steps), {})
    err = capsys.readouterr().err
    first, bar = err.split("\n", 1)
    assert first.startswith("fastblt: first use of this checkpoint") and "/cache/abc/float32-step32" in first
    assert "0/5" in bar and "decoder_block" in bar
    assert "export: 0graph [" not in bar  # no total-less bar drawn before the total is known
