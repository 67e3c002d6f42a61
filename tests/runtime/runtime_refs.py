"""Shared helpers for the runtime tests: tiny models, a full-recompute oracle, generators."""

from __future__ import annotations

import dataclasses
import functools

import torch

from fastblt.model.config import BYTE_OFFSET, EOS_ID, VOCAB_SIZE, BltDConfig
from fastblt.model.tokenizer import encode
from fastblt.runtime.generator import Generator

from tiny import make_model

PROMPTS = [
    "def main(",
    "hello world",
    b"\xff\xfe raw bytes \x00",
    "import os\nimport sys\n",
    "x",
    "The quick brown fox jumps over the lazy dog. " * 2,
]


@functools.cache
def tiny_model(name: str = "hf-test-sizes", block_size: int = 4, seed: int = 0):
    """A tiny random BLT-D (threshold at an entropy quantile so patches vary)."""
    model = make_model(name, seed=seed)
    model.config = dataclasses.replace(model.config, blt_d=BltDConfig(block_size=block_size))
    return model


@functools.cache
def torch_generator(
    name: str = "hf-test-sizes", block_size: int = 4, seed: int = 0, max_context: int = 256, prompt_cache_mb: float = 0
):
    """A shared Generator; without prompt snapshots unless asked, so that the outputs tests compare
    (batched against alone, one mode against another) each commit their prompt themselves."""
    return Generator(tiny_model(name, block_size, seed), backend="torch", max_context=max_context,
                     prompt_cache_mb=prompt_cache_mb)  # fmt: skip


def full_recompute_greedy(model, prompt, max_bytes: int, stop_on_eos: bool = True,
                          bias: dict[int, float] | None = None, presence: float = 0.0,
                          frequency: float = 0.0) -> list[int]:  # fmt: skip
    """The released generator's semantics: the whole model on every prefix, argmax of the last row
    (with `bias` {byte: bias} added to those bytes' logits first, as OpenAI's logit_bias, and
    OpenAI's presence and frequency penalties on the ids generated before)."""
    ids = encode(prompt)
    out: list[int] = []
    add = torch.zeros(VOCAB_SIZE)
    for byte, b in (bias or {}).items():
        add[byte + BYTE_OFFSET] = b
    with torch.no_grad():
        for _ in range(max_bytes):
            seen = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=VOCAB_SIZE).float()
            penalty = frequency * seen + presence * (seen > 0).float()
            c = int((model(torch.tensor([ids]))[0, -1] + add - penalty).argmax())
            if c == EOS_ID and stop_on_eos:
                break
            out.append(c)
            ids.append(c)
    return out
