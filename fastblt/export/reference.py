"""The reference step functions called by the names of the step contract.

`run_named_step(model, step, feeds)` maps spec-named feeds (`tokens`, `start`, `past.{i}.k`, ...)
onto model/steps.py and returns spec-named outputs. The exporter traces it and the torch backend
runs it, so both compute exactly what the contract in spec.py declares.
"""

from __future__ import annotations

import torch

from fastblt.export.spec import CROSS, PAST, PRESENT, kv_from, named_kv
from fastblt.model import steps
from fastblt.model.blt import BltModel


def run_named_step(model: BltModel, step: str, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Call the reference step function `step` with feeds named as in export/spec.py."""
    c = model.config
    if step == "entropy":
        past = kv_from(feeds, PAST, c.entropy.n_layers)
        ent, present = steps.entropy_step(model.entropy_model, feeds["tokens"], feeds["start"], past)
        return {"entropies": ent, **named_kv(PRESENT, present)}
    if step == "encoder":
        past = kv_from(feeds, PAST, c.encoder.n_layers)
        h, present = steps.encoder_step(model, feeds["tokens"], feeds["hash_ids"], feeds["start"], past)
        return {"h": h, **named_kv(PRESENT, present)}
    if step == "global":
        past = kv_from(feeds, PAST, c.global_model.n_layers)
        latents, cross, present = steps.global_step(
            model, feeds["patch_bytes"], feeds["patch_lens"], feeds["start"], past
        )
        return {"latents": latents, **named_kv(CROSS, cross), **named_kv(PRESENT, present)}
    past, cross = kv_from(feeds, PAST, c.decoder.n_layers), kv_from(feeds, CROSS, c.decoder_cross_layers)
    if step == "decoder":
        logits, present = steps.decoder_step(model, feeds["h"], feeds["read_patch"], feeds["start"], past, cross)
        return {"logits": logits, **named_kv(PRESENT, present)}
    if step == "decoder_block":
        logits = steps.decoder_block_step(model, feeds["block_ids"], feeds["start"], feeds["read_patch"], past, cross)
        return {"logits": logits}
    raise KeyError(step)
