"""`--reference hf`: our torch reference vs Hugging Face transformers' `BltForCausalLM` on the same weights.

The HF side is built independently where it can be: an HF-format checkpoint is loaded by
transformers' own `from_pretrained`; other formats (fastblt, Meta) are converted with keymap.py.
Both run in fp32 with use_cache=False (the path the HF port validates). A model with fastblt's own
`decoder_input_norm` gets that one norm attached to the HF decoder (`_attach_decoder_input_norm`),
and every case label says so; the rest is transformers' code.

Checks, per prompt:
- `hf/logits`, case "our patches": logits with the patch lengths of our entropy patcher passed to
  both models (isolates the model from the patcher); gate: fp32 max abs <= 1e-4.
- `hf/logits`, case "hf patcher": each model patches for itself (HF's patcher vs ours). Skipped
  when max_patch_length is set: transformers drops the 0-length trailing patch after splitting,
  a documented difference (tests/model/test_parity_hf.py), not a bug of ours.
- `hf/greedy`: greedy continuations byte for byte: HF's `generate` against our full-recompute
  greedy loop (HF patches itself), or, with max_patch_length, both greedy loops on our patches.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch

from fastblt.errors import CheckpointError, InputError
from fastblt.model.blt import BltModel
from fastblt.model.config import BltConfig
from fastblt.model.tokenizer import encode
from fastblt.validate.metrics import FP32, SequenceResult, Tolerance, compare, logits_margin
from fastblt.validate.report import Report

PAIR = ("hf", "torch")
GREEDY_BYTES = 32
# Named wherever an HF result comes from a model with our norm attached (not from stock transformers).
ATTACHED_NORM = "fastblt's decoder input norm"


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers without its warnings and progress bars, for the length of the block."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # from_pretrained's "Loading weights" bar is not a log line
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def hf_model(model: BltModel, checkpoint: str | Path | None = None):
    """`BltForCausalLM` (eval, fp32) with `model`'s weights: from_pretrained for an HF checkpoint
    directory, else converted from `model` with keymap.py."""
    try:
        import transformers
    except ImportError as e:
        raise InputError(f"--reference hf: transformers is not installed ({e})") from None
    from fastblt.formats.checkpoint import detect_format
    from fastblt.formats.keymap import HF_BLT_D_KEY, config_to_hf, to_hf_state_dict

    with quiet_transformers():
        if checkpoint is not None and detect_format(checkpoint) == "hf":
            hf = transformers.BltForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32)
            return hf.eval()
        hf = transformers.BltForCausalLM(transformers.BltConfig(**config_to_hf(model.config))).eval()
    if model.config.decoder_input_norm:
        _attach_decoder_input_norm(hf, model.config)
    state = to_hf_state_dict({k: v.float() for k, v in model.state_dict().items()}, model.config)
    missing, unexpected = hf.load_state_dict(state, strict=False)
    unexpected = [k for k in unexpected if k != HF_BLT_D_KEY]
    if missing or unexpected:
        raise CheckpointError(
            f"--reference hf: the converted weights do not fit BltForCausalLM: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    return hf


def _attach_decoder_input_norm(hf, config: BltConfig) -> None:
    """Give BltForCausalLM fastblt's `decoder_input_norm`, which the released layout lacks: transformers'
    own RMSNorm as `local_decoder.input_norm` (so our weight loads under the same key), applied to the
    decoder's `inputs_embeds` by a forward pre-hook, exactly where `BltModel.decoder_layers` applies it."""
    from transformers.models.blt.modeling_blt import BltRMSNorm

    decoder = hf.model.local_decoder
    decoder.input_norm = BltRMSNorm(config.decoder.dim, eps=config.decoder.norm_eps)

    def normalise_input(module, args, kwargs):
        kwargs["inputs_embeds"] = module.input_norm(kwargs["inputs_embeds"])
        return args, kwargs

    decoder.register_forward_pre_hook(normalise_input, with_kwargs=True)


def hf_parity(
    model: BltModel,
    hf,
    prompts: list[str],
    greedy_bytes: int = GREEDY_BYTES,
    tolerance: Tolerance = FP32,
    report: Report | None = None,
) -> Report:
    """Compare `model` (ours, fp32) with `hf` (BltForCausalLM) on `prompts`; entries under PAIR."""
    report = report if report is not None else Report()
    model = model.float().eval()
    if model.config.entropy is None:
        report.skip("hf", "the checkpoint has no entropy model: no patch lengths to compare with")
        return report
    split = model.config.patching.max_patch_length is not None
    attached = f", HF + {ATTACHED_NORM}" if model.config.decoder_input_norm else ""
    for i, prompt in enumerate(prompts):
        tokens = torch.tensor([encode(prompt)], dtype=torch.int64)
        label = f"prompt {i} ({tokens.shape[1]} ids)" + attached
        with torch.no_grad():
            lengths = model.patch(tokens)
            ours = model(tokens, lengths)
            theirs = hf(tokens, patch_lengths=lengths, use_cache=False).logits
            report.add(PAIR, "hf/logits", "logits", f"{label}, our patches", compare("logits", theirs, ours, tolerance))
            if not split:
                ours_own, theirs_own = model(tokens), hf(tokens, use_cache=False).logits
                entry = compare("logits", theirs_own, ours_own, tolerance)
                report.add(PAIR, "hf/logits", "logits", f"{label}, each model's own patcher", entry)
        report.add(PAIR, "hf/greedy", "bytes", label, _greedy(model, hf, tokens, greedy_bytes, split))
    if split:
        report.skip(
            "hf patcher",
            "max_patch_length is set: transformers drops the 0-length trailing patch after splitting "
            "(a known difference), so HF's own patcher is not compared; our patch lengths are",
        )
    return report


def greedy_ours(model: BltModel, tokens: torch.Tensor, n: int) -> list[int]:
    """Greedy continuation by full recompute of the reference model (no caches involved)."""
    for _ in range(n):
        with torch.no_grad():
            nxt = model(tokens)[:, -1].argmax(-1, keepdim=True)
        tokens = torch.cat([tokens, nxt], dim=1)
    return tokens[0].tolist()


def _greedy_hf_our_patches(model: BltModel, hf, tokens: torch.Tensor, n: int) -> list[int]:
    for _ in range(n):
        with torch.no_grad():
            nxt = hf(tokens, patch_lengths=model.patch(tokens), use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        tokens = torch.cat([tokens, nxt], dim=1)
    return tokens[0].tolist()


def _greedy(model: BltModel, hf, tokens: torch.Tensor, n: int, split: bool) -> SequenceResult:
    P = tokens.shape[1]
    ours = greedy_ours(model, tokens, n)
    if split:
        theirs = _greedy_hf_our_patches(model, hf, tokens, n)
        note = "both greedy loops on our patch lengths (max_patch_length is set)"
    else:
        with torch.no_grad(), quiet_transformers():
            out = hf.generate(
                tokens, max_new_tokens=n, do_sample=False, use_cache=False, eos_token_id=None, pad_token_id=0
            )
        theirs = out[0].tolist()
        note = ""
    res = SequenceResult.of(theirs[P:], ours[P:])
    res.note = note
    j = res.first_diff
    if j is not None and j < res.compared:
        prefix = torch.tensor([theirs[: P + j]], dtype=torch.int64)
        with torch.no_grad():
            lengths = model.patch(prefix)
            row = hf(prefix, patch_lengths=lengths, use_cache=False).logits[0, -1]
        top1, _, margin = logits_margin(row)
        res.margin, res.ref_choice, res.cand_choice = margin, theirs[P + j], ours[P + j]
        detail = f"hf top-1 {top1}"
        res.step = {"index": j, "step": "full forward", "start": P + j, "output": "logits", "detail": detail}
    return res
