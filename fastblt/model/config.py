"""One frozen dataclass tree for a BLT / BLT-D checkpoint.

Field names follow the BLT paper and Meta's code; `fastblt.formats.checkpoint` reads the Hugging
Face and Meta config files into this tree and writes it back out.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fastblt.errors import ConfigError

VOCAB_SIZE = 260  # 256 bytes + BOE 0, BOS 1, EOS 2, BPE-delimiter 3
BOE_ID, BOS_ID, EOS_ID = 0, 1, 2
BYTE_OFFSET = 4
HASH_PRIMES = (
    1000000007,
    5915587277,
    1500450271,
    3267000013,
    5754853343,
    4093082899,
    9576890767,
    3628273133,
    2860486313,
    5463458053,
    3367900313,
)
DECODER_INPUT_RULES = ("encoder_states",)  # clean positions: encoder states; block: embedding


def swiglu_hidden(dim: int, multiple_of: int = 256, ffn_dim_multiplier: float = 1.0) -> int:
    """Meta's FFN width: int(8d/3), scaled, rounded up to a multiple (1024 -> 2816)."""
    hidden = int(ffn_dim_multiplier * int(8 * dim / 3))
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def _need(cond: bool, what: str) -> None:
    if not cond:
        raise ConfigError(what)


@dataclass(frozen=True)
class StackConfig:
    """One pre-norm transformer stack (entropy LM, local encoder, global, local decoder)."""

    dim: int
    n_layers: int
    n_heads: int
    ffn_dim: int
    rope_theta: float = 500000.0
    norm_eps: float = 1e-5
    window: int | None = None  # sliding window over earlier positions; None = full causal
    max_positions: int = 24576  # RoPE table length (bytes for local stacks, patches for global)

    def __post_init__(self) -> None:
        for name in ("dim", "n_layers", "n_heads", "ffn_dim", "max_positions"):
            v = getattr(self, name)
            _need(_is_int(v) and v >= 1, f"config field {name}: expected an int >= 1, got {v!r}")
        _need(
            self.dim % self.n_heads == 0 and (self.dim // self.n_heads) % 2 == 0,
            f"config field dim: {self.dim} must split into {self.n_heads} heads of even size",
        )
        _need(self.rope_theta > 0, f"config field rope_theta: expected > 0, got {self.rope_theta}")
        _need(0 < self.norm_eps < 1, f"config field norm_eps: expected in (0, 1), got {self.norm_eps}")
        _need(
            self.window is None or (_is_int(self.window) and self.window >= 1),
            f"config field window: expected None or an int >= 1, got {self.window!r}",
        )

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


@dataclass(frozen=True)
class PatchingConfig:
    """Entropy patching: a patch starts at 0, at 1, and after every byte whose entropy > threshold."""

    threshold: float = 1.335442066192627
    max_patch_length: int | None = None

    def __post_init__(self) -> None:
        _need(
            isinstance(self.threshold, (int, float)) and math.isfinite(self.threshold),
            f"config field patching.threshold: expected a finite number, got {self.threshold!r}",
        )
        _need(
            self.max_patch_length is None or (isinstance(self.max_patch_length, int) and self.max_patch_length >= 1),
            f"config field patching.max_patch_length: expected None or an int >= 1, got {self.max_patch_length!r}",
        )


@dataclass(frozen=True)
class BltDConfig:
    """The BLT-D additions: only the decoder changes (a byte/[MASK] embedding for block positions)."""

    block_size: int = 8
    mask_id: int = VOCAB_SIZE  # 260
    pad_id: int = VOCAB_SIZE + 1  # 261
    decoder_input: str = "encoder_states"

    def __post_init__(self) -> None:
        _need(
            isinstance(self.block_size, int) and 1 <= self.block_size <= 256,
            f"config field blt_d.block_size: expected an int in [1, 256], got {self.block_size!r}",
        )
        _need(
            {self.mask_id, self.pad_id} == {VOCAB_SIZE, VOCAB_SIZE + 1},
            f"config field blt_d.mask_id/pad_id: expected 260 and 261, got {self.mask_id} and {self.pad_id}",
        )
        _need(
            self.decoder_input in DECODER_INPUT_RULES,
            f"config field blt_d.decoder_input: expected one of {DECODER_INPUT_RULES}, got {self.decoder_input!r}",
        )

    @property
    def embedding_rows(self) -> int:
        return VOCAB_SIZE + 2


@dataclass(frozen=True)
class BltConfig:
    """A whole BLT (optionally BLT-D) model: three byte/patch stacks plus the entropy LM."""

    encoder: StackConfig
    global_model: StackConfig
    decoder: StackConfig
    entropy: StackConfig | None
    cross_attn_k: int = 2
    cross_attn_heads_encoder: int | None = None  # None -> encoder.n_heads
    cross_attn_heads_decoder: int | None = None  # None -> decoder.n_heads
    cross_attn_all_layers_decoder: bool = True
    hash_sizes: tuple[int, ...] = (3, 4, 5, 6, 7, 8)
    hash_vocab: int = 500002
    hash_functions: int = 1
    patching: PatchingConfig = field(default_factory=PatchingConfig)
    blt_d: BltDConfig | None = None
    vocab_size: int = VOCAB_SIZE
    # Ours, not in the released models: RMSNorm the decoder's input stream (encoder states, block
    # embeddings) so the cross-attention's read of the global latent is not drowned by it.
    decoder_input_norm: bool = False

    def __post_init__(self) -> None:
        if self.cross_attn_heads_encoder is None:
            object.__setattr__(self, "cross_attn_heads_encoder", self.encoder.n_heads)
        if self.cross_attn_heads_decoder is None:
            object.__setattr__(self, "cross_attn_heads_decoder", self.decoder.n_heads)
        object.__setattr__(self, "hash_sizes", tuple(self.hash_sizes))
        _need(self.vocab_size == VOCAB_SIZE, f"config field vocab_size: expected 260, got {self.vocab_size}")
        _need(
            self.encoder.dim == self.decoder.dim,
            f"config fields encoder.dim/decoder.dim: the decoder reads encoder states, so they must match "
            f"(got {self.encoder.dim} and {self.decoder.dim})",
        )
        _need(
            _is_int(self.cross_attn_k) and self.cross_attn_k >= 1,
            f"config field cross_attn_k: expected an int >= 1, got {self.cross_attn_k!r}",
        )
        for name, d in (("cross_attn_heads_encoder", self.encoder.dim), ("cross_attn_heads_decoder", self.decoder.dim)):
            h = getattr(self, name)
            _need(_is_int(h) and h >= 1 and d % h == 0, f"config field {name}: expected an int dividing {d}, got {h!r}")
        _need(
            len(self.hash_sizes) >= 1 and all(isinstance(n, int) and 1 <= n <= 16 for n in self.hash_sizes),
            f"config field hash_sizes: expected n-gram sizes in [1, 16], got {list(self.hash_sizes)}",
        )
        _need(
            isinstance(self.hash_vocab, int) and 1 <= self.hash_vocab < 2**31,
            f"config field hash_vocab: expected an int in [1, 2^31), got {self.hash_vocab!r}",
        )
        _need(
            isinstance(self.decoder_input_norm, bool),
            f"config field decoder_input_norm: expected true or false, got {self.decoder_input_norm!r}",
        )
        _need(
            isinstance(self.hash_functions, int) and 1 <= self.hash_functions <= len(HASH_PRIMES),
            f"config field hash_functions: expected 1..{len(HASH_PRIMES)}, got {self.hash_functions!r}",
        )

    # derived sizes -------------------------------------------------------------------------
    @property
    def d_local(self) -> int:
        return self.encoder.dim

    @property
    def global_input_dim(self) -> int:
        """Width of one patch's encoder output: k slots of d_local."""
        return self.cross_attn_k * self.encoder.dim

    @property
    def has_global_projection(self) -> bool:
        """BLT-7B style Linear(k*d_local -> d_global) in front of the global model."""
        return self.global_input_dim != self.global_model.dim

    @property
    def n_hash_tables(self) -> int:
        return self.hash_functions * len(self.hash_sizes)

    @property
    def decoder_cross_layers(self) -> int:
        return self.decoder.n_layers if self.cross_attn_all_layers_decoder else 1

    @property
    def is_blt_d(self) -> bool:
        return self.blt_d is not None

    # (de)serialisation of our own format ----------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BltConfig:
        """Build from our own config.json's "model" dict; unknown or missing fields are errors."""
        if not isinstance(d, dict):
            raise ConfigError(f"config: expected a JSON object, got {type(d).__name__}")
        d = dict(d)
        try:
            for key in ("encoder", "global_model", "decoder"):
                d[key] = _build(StackConfig, d.get(key), key)
            d["entropy"] = None if d.get("entropy") is None else _build(StackConfig, d["entropy"], "entropy")
            d["patching"] = _build(PatchingConfig, d.get("patching", {}), "patching")
            d["blt_d"] = None if d.get("blt_d") is None else _build(BltDConfig, d["blt_d"], "blt_d")
            if "hash_sizes" in d:
                d["hash_sizes"] = tuple(d["hash_sizes"])
            return _build(cls, d, "model")
        except TypeError as e:  # wrong field set
            raise ConfigError(f"config: {e}") from None

    def replace(self, **changes: Any) -> BltConfig:
        return dataclasses.replace(self, **changes)


def _build(kind: type, d: Any, where: str) -> Any:
    if not isinstance(d, dict):
        raise ConfigError(f"config field {where}: expected an object, got {d!r}")
    names = {f.name for f in dataclasses.fields(kind)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ConfigError(f"config field {where}: unknown field(s) {unknown}")
    try:
        return kind(**d)
    except ConfigError as e:  # a section's own checks name its field; the path says which section
        field, text = "config field ", str(e)
        if where == "model" or not text.startswith(field) or text.startswith(f"{field}{where}."):
            raise
        raise ConfigError(f"{field}{where}.{text[len(field) :]}") from None


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)  # JSON's true is not a size


def tiny_config(
    d_local: int = 16,
    d_global: int = 32,
    k: int = 2,
    n_enc: int = 1,
    n_dec: int = 1,
    n_glob: int = 1,
    heads: int = 2,
    window: int | None = 512,
    blt_d: bool = True,
    threshold: float = 1.335442066192627,
    hash_sizes: tuple[int, ...] = (2, 3),
    hash_vocab: int = 64,
    max_patch_length: int | None = None,
    decoder_input_norm: bool = False,
) -> BltConfig:
    """The Hugging Face unit-test sizes (hidden 16, 2 heads) with knobs for the other variants."""
    local = dict(n_heads=heads, window=window, max_positions=4096)
    return BltConfig(
        encoder=StackConfig(dim=d_local, n_layers=n_enc, ffn_dim=2 * d_local, **local),
        global_model=StackConfig(
            dim=d_global, n_layers=n_glob, n_heads=heads, ffn_dim=2 * d_global, max_positions=4096
        ),
        decoder=StackConfig(dim=d_local, n_layers=n_dec, ffn_dim=2 * d_local, **local),
        entropy=StackConfig(
            dim=d_local,
            n_layers=1,
            n_heads=heads,
            ffn_dim=2 * d_local,
            rope_theta=10000.0,
            **{"window": window, "max_positions": 4096},
        ),
        cross_attn_k=k,
        hash_sizes=hash_sizes,
        hash_vocab=hash_vocab,
        patching=PatchingConfig(threshold=threshold, max_patch_length=max_patch_length),
        blt_d=BltDConfig(block_size=4) if blt_d else None,
        decoder_input_norm=decoder_input_norm,
    )


LOCAL_WINDOW = 128  # the default's local encoder/decoder window (bytes)


def default_config(threshold: float = 1.0) -> BltConfig:
    """The embedded default (`fastblt train`; threshold set by training). Parameters go to the global
    model (patches are ~4x cheaper) and to the hash n-gram tables (a lookup per byte: 8192 buckets
    per n-gram size beat 2048 in side-by-side trials, benchmarks/results/train_variants.md; stored
    in float16 to stay under 30 MB). The local encoder and decoder attend over a 128-byte window
    (faster steps and better held-out bits/byte at equal wall clock than 512 in those trials); the
    entropy model keeps 512. The decoder RMS-normalises its input: in a side-by-side trial it gained
    0.034 held-out bits per byte at the same speed and read the global latent 4x more."""
    local = dict(n_heads=4, window=LOCAL_WINDOW, max_positions=8192)
    return BltConfig(
        encoder=StackConfig(dim=128, n_layers=1, ffn_dim=384, **local),
        global_model=StackConfig(dim=256, n_layers=5, n_heads=4, ffn_dim=768, max_positions=4096),
        decoder=StackConfig(dim=128, n_layers=2, ffn_dim=384, **local),
        entropy=StackConfig(dim=96, n_layers=2, ffn_dim=256, rope_theta=10000.0, **{**local, "window": 512}),
        cross_attn_k=2,  # k * d_local = 256 = d_global: no projection
        hash_sizes=(3, 4, 5, 6, 7, 8),
        hash_vocab=8192,
        patching=PatchingConfig(threshold=threshold),
        blt_d=BltDConfig(block_size=8),
        decoder_input_norm=True,
    )


def blt_1b_config() -> BltConfig:
    """facebook/blt-1b (confirmed from the HF port's copy of its args)."""
    local = dict(dim=1024, n_heads=16, ffn_dim=2816, window=512, max_positions=24576)
    return BltConfig(
        encoder=StackConfig(n_layers=1, **local),
        global_model=StackConfig(dim=2048, n_layers=25, n_heads=16, ffn_dim=5632, max_positions=4096),
        decoder=StackConfig(n_layers=9, **local),
        entropy=StackConfig(
            dim=768, n_layers=14, n_heads=12, ffn_dim=2048, rope_theta=10000.0, window=512, max_positions=8192
        ),
        cross_attn_k=2,
        cross_attn_heads_encoder=16,
        cross_attn_heads_decoder=16,
    )


# Named presets: what `fastblt` commands and benchmarks accept as a config name.
PRESETS: dict[str, Callable[[], BltConfig]] = {
    "tiny": tiny_config,
    "default": default_config,
    "blt-1b": blt_1b_config,
}


def preset(name: str) -> BltConfig:
    """The config of a named preset; ConfigError names the known ones."""
    if name not in PRESETS:
        raise ConfigError(f"preset {name!r}: unknown; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]()
