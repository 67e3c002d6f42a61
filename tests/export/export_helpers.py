"""Constants and helpers shared by the export tests (conftest.py builds the fixtures from them)."""

from __future__ import annotations

from tiny import run_cli  # noqa: F401  (re-exported for the tests here)

MAX_STEP = 16  # positions per step: the local rings hold window 24 + 16 = 40 slots, so 80 positions wrap
MODEL = "hf-test-sizes"  # tests/tiny.py registry entry, with MODEL_KW on top
MODEL_KW = dict(n_dec=2, k=4, d_global=48, window=24, max_patch_length=6, decoder_input_norm=True)
