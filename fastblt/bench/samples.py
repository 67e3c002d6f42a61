"""Greedy samples of every mode through the runtime: what the training report and
benchmarks/default_samples.py show a reader of the default model."""

from __future__ import annotations

from fastblt.model.blt import BltModel
from fastblt.runtime.generator import Generator
from fastblt.train.report import SAMPLE_MODES


def samples_per_mode(model: BltModel, prompts: list[bytes], max_bytes: int, backend: str = "torch") -> list[dict]:
    """Greedy continuations of each prompt in every mode the checkpoint has, through the runtime.

    ar, blt-s and blt-dv are lossless, so for greedy decoding they must agree (`lossless_agree`);
    blt-d may differ. A BLT (no BLT-D rows) gets ar and blt-s only.
    """
    gen = Generator(model, backend=backend, max_context=max(len(p) for p in prompts) + max_bytes + 64)
    modes = [m for m in SAMPLE_MODES if model.config.blt_d is not None or m in ("ar", "blt-s")]
    rows = []
    for prompt in prompts:
        outs = {m: gen.generate(prompt, mode=m, max_bytes=max_bytes, stop_on_eos=False) for m in modes}
        rows.append(
            {
                "prompt_tail": prompt.decode("utf-8", "replace").splitlines()[-1],
                "lossless_agree": len({outs[m].bytes for m in modes if m != "blt-d"}) == 1,
                **{m: {"text": o.text, "acceptance_rate": o.stats.acceptance_rate} for m, o in outs.items()},
            }
        )
    return rows
