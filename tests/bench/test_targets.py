"""`evaluate_targets` on hand-made bench results: each target met or missed for the right reason."""

from __future__ import annotations

import pytest

from fastblt.bench.runtime import TARGETS, evaluate_targets


def _row(name: str, bytes_per_s: float, backend: str = "ort", **fields) -> dict:
    """A measured row with only the fields `evaluate_targets` reads (see fastblt/bench/saved.py)."""
    per_prompt = [{"bytes": 100, "decode_s": 100 / bytes_per_s}]
    return {"name": name, "mode": name, "backend": backend, "bytes_per_s": bytes_per_s, "host_fraction": 0.1,
            "per_prompt": per_prompt, **fields}  # fmt: skip


def _targets(rows: list[dict], hf: dict | None = None) -> dict[str, dict]:
    return {t["target"]: t for t in evaluate_targets({"meta": {}, "rows": rows, "hf": hf})}


@pytest.mark.parametrize("identical", [True, False])
def test_a_fast_lossless_mode_that_changed_the_output_misses_its_target(identical):
    """blt-s 10x faster than ar but with different bytes is a wrong decoder, not a speed-up: the
    target is missed however fast it ran (and met when the bytes are the same)."""
    rows = [_row("ar", 100.0), _row("blt-s", 1000.0, identical_to_ar=identical)]
    t = _targets(rows)["blt-s vs ar on ort (bytes/s)"]
    assert t["value"] == pytest.approx(10.0) and t["lossless"] is identical
    assert t["met"] is identical


@pytest.mark.parametrize(("fraction", "met"), [(0.9, False), (TARGETS["host_fraction"], True), (0.1, True)])
def test_host_fraction_is_an_upper_bound(fraction, met):
    """A run that spends 90% of its wall time on the host misses the <= 0.25 target (the bound is
    a ceiling, not a floor)."""
    t = _targets([_row("ar", 100.0, host_fraction=fraction)])["host share of wall time, ar on ort"]
    assert t["value"] == fraction and t["bound"] == "<= 0.25"
    assert t["met"] is met


def test_the_hf_ratio_uses_only_the_prompts_the_peer_ran():
    """HF ran the first prompt only: ar's bytes/s must come from that same prompt, not from every
    prompt (here the others are 100x slower, which would hide a met target)."""
    ar = _row("ar", 100.0)
    ar["per_prompt"] = [{"bytes": 100, "decode_s": 1.0}, {"bytes": 100, "decode_s": 100.0}]
    hf = {"prompts": [{"prompt": "a"}], "bytes_per_s": 1.0, "identical_to_ar": {"ort": True}}
    t = _targets([ar], hf)["ar on ort vs HF peer (bytes/s)"]
    assert t["value"] == pytest.approx(100.0)  # all prompts: 200 bytes / 101 s, ratio 1.98
    assert t["met"] is True
