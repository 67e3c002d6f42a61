"""The reference step functions called by the names of the step contract.

`run_named_step(model, step, feeds)` maps spec-named feeds (`tokens`, `start`, `past.{i}.k`, ...)
onto model/steps.py and returns spec-named outputs. Caches are updated in place, so an aliased
output (`present.{i}.k`) is the very tensor fed as its input (`past.{i}.k`), as in every backend.
"""

from __future__ import annotations

import torch

from fastblt.export.spec import CROSS, CROSS_PRESENT, PAST, PRESENT, kv_from, named_kv
from fastblt.model import steps
from fastblt.model.blt import BltModel


def run_named_step(model: BltModel, step: str, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Call the reference step function `step` with feeds named as in export/spec.py."""
    c = model.config
    if step == "entropy":
        past = kv_from(feeds, PAST, c.entropy.n_layers)
        ent = steps.entropy_step(model.entropy_model, feeds["tokens"], feeds["start"], past)
        return {"entropies": ent, **named_kv(PRESENT, past)}
    if step == "encoder":
        past = kv_from(feeds, PAST, c.encoder.n_layers)
        h = steps.encoder_step(model, feeds["tokens"], feeds["hash_ids"], feeds["start"], past)
        return {"h": h, **named_kv(PRESENT, past)}
    cross = kv_from(feeds, CROSS, c.decoder_cross_layers)
    if step == "global":
        past = kv_from(feeds, PAST, c.global_model.n_layers)
        patches = feeds["patch_bytes"], feeds["patch_lens"]
        latents = steps.global_step(model, *patches, feeds["start"], past, cross)
        return {"latents": latents, **named_kv(PRESENT, past), **named_kv(CROSS_PRESENT, cross)}
    past = kv_from(feeds, PAST, c.decoder.n_layers)
    if step == "decoder":
        logits = steps.decoder_step(model, feeds["h"], feeds["read_patch"], feeds["start"], past, cross)
        return {"logits": logits, **named_kv(PRESENT, past)}
    if step == "decoder_block":
        logits = steps.decoder_block_step(model, feeds["block_ids"], feeds["start"], feeds["read_patch"], past, cross)
        return {"logits": logits}
    raise KeyError(step)
