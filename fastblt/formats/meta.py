"""Meta's BLT config files (`facebookresearch/blt`) <-> BltConfig.

Meta describes a BLT with a flat `ByteLatentTransformerArgs` dict (`dim_local_encoder`,
`n_layers_global`, ...), the entropy model with an `LMTransformerArgs` dict and the patching rule
with `data.patcher_args` (reference/blt_architecture.md 4.2). Those args cannot say everything a
BltConfig can: one `multiple_of`/`ffn_dim_multiplier`, RoPE theta, norm eps and local window are
shared by the three BLT stacks, one `cross_attn_nheads` by both cross-attentions. What they cannot
say is written under `fastblt_overrides` (and BLT-D under `fastblt_blt_d`), so writing then
reading gives the same BltConfig; a config Meta can express gets neither key.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from fastblt.errors import ConfigError, InternalError
from fastblt.model.config import BltConfig, BltDConfig, PatchingConfig, StackConfig, swiglu_hidden

BLT_D_KEY = "fastblt_blt_d"
OVERRIDES_KEY = "fastblt_overrides"
_STACKS = ("encoder", "global_model", "decoder", "entropy")
_TOP_OVERRIDES = ("cross_attn_heads_encoder", "cross_attn_heads_decoder")
_FFN_MULTIPLES = (256, 128, 64, 32, 16, 8, 4, 2, 1)
# Meta options this model implements only at the released value: (key, value).
_FIXED = (
    ("n_kv_heads", None),
    ("n_kv_heads_global", None),
    ("cross_attn_encoder", True),
    ("cross_attn_decoder", True),
    ("cross_attn_init_by_pooling", True),
    ("cross_attn_all_layers_encoder", False),
    ("cross_attn_window_encoder", None),
    ("cross_attn_window_decoder", None),
    ("use_local_encoder_transformer", True),
    ("share_encoder_decoder_emb", True),
    ("downsampling_by_pooling", "max"),
    ("dim_token", None),
    ("weight_tying", False),
    ("tie_local_encoder_decoder", False),
    ("encoder_enable_byte_ngrams", False),
    ("non_linearity", "swiglu"),
    ("norm_type", "rmsnorm"),
    ("pm_size", 0),
)


@dataclass(frozen=True)
class MetaArgs:
    """The parts of a Meta checkpoint's config files (plain JSON dicts)."""

    model: dict[str, Any]  # ByteLatentTransformerArgs
    entropy: dict[str, Any] | None  # LMTransformerArgs; None: no entropy model
    patcher: dict[str, Any]  # data.patcher_args
    extras: dict[str, Any]  # fastblt_blt_d / fastblt_overrides, only when needed


# ------------------------------------------------------------------------------ reading
def config_from_meta(args: MetaArgs) -> BltConfig:
    """Meta args -> BltConfig. Raises ConfigError naming the Meta field that is missing or unsupported."""
    m, p = args.model, args.patcher
    try:
        for key, value in _FIXED:
            if m.get(key, value) != value:
                raise ConfigError(f"config field {key}: only {value!r} is supported, got {m[key]!r}")
        mode = p.get("patching_mode", m.get("patching_mode", "entropy"))
        if mode != "entropy":
            raise ConfigError(f"config field patching_mode: only 'entropy' is supported, got {mode!r}")
        hash_sizes = m.get("encoder_hash_byte_group_size")
        if isinstance(hash_sizes, str):  # Meta also accepts "3,4,5"
            hash_sizes = [int(x) for x in hash_sizes.split(",") if x]
        if not hash_sizes:
            raise ConfigError("config field encoder_hash_byte_group_size: a BLT needs hash n-gram embeddings")
        local_positions = m.get("max_encoder_seq_length") or m.get("max_seqlen", 1024)
        heads_x = m.get("cross_attn_nheads")
        config = BltConfig(
            encoder=_blt_stack(m, "local_encoder", m.get("local_attention_window_len"), local_positions),
            global_model=_blt_stack(m, "global", None, m.get("max_seqlen", 1024)),
            decoder=_blt_stack(m, "local_decoder", m.get("local_attention_window_len"), local_positions),
            entropy=None if args.entropy is None else _entropy_stack(args.entropy),
            cross_attn_k=m["cross_attn_k"],
            cross_attn_heads_encoder=heads_x,
            cross_attn_heads_decoder=heads_x,
            cross_attn_all_layers_decoder=m.get("cross_attn_all_layers_decoder", False),
            hash_sizes=tuple(hash_sizes),
            hash_vocab=m.get("encoder_hash_byte_group_vocab", 30000),
            hash_functions=m.get("encoder_hash_byte_group_nb_functions", 3),
            patching=PatchingConfig(
                threshold=p.get("threshold", m.get("patching_threshold", PatchingConfig.threshold)),
                max_patch_length=p.get("max_patch_length", m.get("max_patch_length")),
            ),
            blt_d=_blt_d(args.extras.get(BLT_D_KEY)),
            vocab_size=m["vocab_size"],
        )
        return _apply_overrides(config, args.extras.get(OVERRIDES_KEY) or {})
    except KeyError as e:
        raise ConfigError(f"config field {e.args[0]}: missing from the Meta args") from None


def _ffn(args: dict[str, Any], dim: int) -> int:
    return swiglu_hidden(dim, args.get("multiple_of", 256), args.get("ffn_dim_multiplier") or 1.0)


def _check_head_dim(args: dict[str, Any], dim: int, heads: int) -> None:
    head_dim = args.get("head_dim")
    if head_dim is not None and head_dim * heads != dim:
        raise ConfigError(f"config field head_dim: {head_dim} x {heads} heads != dim {dim}")


def _blt_stack(m: dict[str, Any], part: str, window: int | None, positions: int) -> StackConfig:
    dim, heads = m[f"dim_{part}"], m[f"n_heads_{part}"]
    _check_head_dim(m, dim, heads)
    return StackConfig(
        dim=dim,
        n_layers=m[f"n_layers_{part}"],
        n_heads=heads,
        ffn_dim=_ffn(m, dim),
        rope_theta=float(m.get("rope_theta", 10000.0)),
        norm_eps=float(m.get("norm_eps", 1e-5)),
        window=window,
        max_positions=positions,
    )


def _entropy_stack(e: dict[str, Any]) -> StackConfig:
    if e.get("n_kv_heads") not in (None, e["n_heads"]):
        raise ConfigError("config field entropy_model.n_kv_heads: grouped-query attention is not supported")
    _check_head_dim(e, e["dim"], e["n_heads"])
    return StackConfig(
        dim=e["dim"],
        n_layers=e["n_layers"],
        n_heads=e["n_heads"],
        ffn_dim=_ffn(e, e["dim"]),
        rope_theta=float(e.get("rope_theta", 10000.0)),
        norm_eps=float(e.get("norm_eps", 1e-5)),
        window=e.get("sliding_window", 512),  # Meta's loader hard-codes 512 when the key is absent
        max_positions=e.get("max_seqlen", 1024),
    )


def _blt_d(d: Any) -> BltDConfig | None:
    if d is None:
        return None
    if not isinstance(d, dict):
        raise ConfigError(f"config field {BLT_D_KEY}: expected an object, got {d!r}")
    try:
        return BltDConfig(**d)
    except TypeError as e:
        raise ConfigError(f"config field {BLT_D_KEY}: {e}") from None


def _apply_overrides(config: BltConfig, overrides: dict[str, Any]) -> BltConfig:
    if not isinstance(overrides, dict):
        raise ConfigError(f"config field {OVERRIDES_KEY}: expected an object, got {overrides!r}")
    changes: dict[str, Any] = {}
    for key, value in overrides.items():
        if key in _TOP_OVERRIDES:
            changes[key] = value
        elif key in _STACKS and isinstance(value, dict) and getattr(config, key) is not None:
            fields = {f.name for f in dataclasses.fields(StackConfig)}
            if not set(value) <= fields:
                raise ConfigError(f"config field {OVERRIDES_KEY}.{key}: unknown field(s) {sorted(set(value) - fields)}")
            changes[key] = dataclasses.replace(getattr(config, key), **value)
        else:
            raise ConfigError(f"config field {OVERRIDES_KEY}.{key}: not something fastblt can override")
    return config.replace(**changes) if changes else config


# ------------------------------------------------------------------------------ writing
def config_to_meta(config: BltConfig) -> MetaArgs:
    """BltConfig -> Meta args whose reading back (config_from_meta) gives the same BltConfig."""
    model = _model_args(config)
    entropy = None if config.entropy is None else _entropy_args(config.entropy, config.vocab_size)
    patcher = {
        "patching_mode": "entropy",
        "threshold": config.patching.threshold,
        "max_patch_length": config.patching.max_patch_length,
        "realtime_patching": config.entropy is not None,
        "entropy_model_checkpoint_dir": "entropy_model" if config.entropy is not None else None,
        "patch_size": 4.5,
        "monotonicity": False,
        "patching_device": "cuda",
    }
    extras: dict[str, Any] = {}
    if config.blt_d is not None:
        extras[BLT_D_KEY] = dataclasses.asdict(config.blt_d)
    plain = config_from_meta(MetaArgs(model, entropy, patcher, extras))
    overrides = _diff(plain, config)
    if overrides:
        extras[OVERRIDES_KEY] = overrides
    args = MetaArgs(model, entropy, patcher, extras)
    if config_from_meta(args) != config:
        raise InternalError("meta: written Meta args do not read back to the same config")
    return args


def _model_args(config: BltConfig) -> dict[str, Any]:
    """ByteLatentTransformerArgs with the released values for every option fastblt does not vary."""
    enc, glob = config.encoder, config.global_model
    multiple_of, mult = _ffn_params([enc, glob, config.decoder])
    return {
        "seed": 42,
        "vocab_size": config.vocab_size,
        "dim": glob.dim,
        "n_layers": glob.n_layers,
        "n_heads": glob.n_heads,
        "weight_tying": False,
        "patch_in_forward": config.entropy is not None,
        "dim_token": None,
        "dim_global": glob.dim,
        "dim_local_decoder": config.decoder.dim,
        "dim_local_encoder": enc.dim,
        "n_layers_global": glob.n_layers,
        "n_layers_local_decoder": config.decoder.n_layers,
        "n_layers_local_encoder": enc.n_layers,
        "n_heads_global": glob.n_heads,
        "n_heads_local_decoder": config.decoder.n_heads,
        "n_heads_local_encoder": enc.n_heads,
        "n_kv_heads": None,
        "n_kv_heads_global": None,
        "head_dim": None,
        "patch_size": 4.5,
        "patching_mode": "entropy",
        "patching_threshold": config.patching.threshold,
        "max_patch_length": config.patching.max_patch_length,
        "use_local_encoder_transformer": True,
        "max_encoder_seq_length": enc.max_positions,
        "max_seqlen": glob.max_positions,
        "cross_attn_encoder": True,
        "cross_attn_decoder": True,
        "cross_attn_window_encoder": None,
        "cross_attn_window_decoder": None,
        "cross_attn_k": config.cross_attn_k,
        "cross_attn_nheads": config.cross_attn_heads_encoder,
        "cross_attn_all_layers_decoder": config.cross_attn_all_layers_decoder,
        "cross_attn_all_layers_encoder": False,
        "cross_attn_init_by_pooling": True,
        "encoder_hash_byte_group_size": list(config.hash_sizes),
        "encoder_hash_byte_group_vocab": config.hash_vocab,
        "encoder_hash_byte_group_nb_functions": config.hash_functions,
        "non_linearity": "swiglu",
        "use_rope": True,
        "rope_theta": enc.rope_theta,
        "rope_use_fp32_in_outer_product": True,
        "norm_eps": enc.norm_eps,
        "norm_type": "rmsnorm",
        "multiple_of": multiple_of,
        "ffn_dim_multiplier": mult,
        "dropout": 0.0,
        "share_encoder_decoder_emb": True,
        "downsampling_by_pooling": "max",
        "local_attention_window_len": enc.window,
        "attn_impl": "xformers",
        "attn_bias_type": "block_causal",
        "eos_id": 2,
    }


def train_args(args: MetaArgs, model_dtype: str) -> dict[str, Any]:
    """A `params.json` (Meta's TrainArgs subset): model, entropy_model, data.patcher_args, dtype."""
    return {
        "name": "fastblt-export",
        "seed": 42,
        "model": args.model,
        "entropy_model": args.entropy,
        "data": {"patcher_args": args.patcher, "tokenizer_args": {"name": "blt"}},
        "distributed": {"model_dtype": model_dtype},
        **args.extras,
    }


def _entropy_args(s: StackConfig, vocab_size: int) -> dict[str, Any]:
    multiple_of, mult = _ffn_params([s])
    return {
        "dim": s.dim,
        "n_layers": s.n_layers,
        "n_heads": s.n_heads,
        "n_kv_heads": None,
        "head_dim": None,
        "vocab_size": vocab_size,
        "multiple_of": multiple_of,
        "ffn_dim_multiplier": mult,
        "norm_eps": s.norm_eps,
        "rope_theta": s.rope_theta,
        "max_seqlen": s.max_positions,
        "sliding_window": s.window,
        "attn_impl": "xformers",
        "attn_bias_type": "local_block_causal",
        "weight_tying": False,
    }


def _ffn_params(stacks: list[StackConfig]) -> tuple[int, float]:
    """The (multiple_of, ffn_dim_multiplier) giving the most stacks their ffn_dim (Meta's (256, 1.0) first);
    the stacks it misses go to fastblt_overrides."""
    mults = [1.0] + [s.ffn_dim / int(8 * s.dim / 3) for s in stacks if int(8 * s.dim / 3) > 0]
    candidates = [(multiple_of, mult) for mult in mults for multiple_of in _FFN_MULTIPLES]
    return max(candidates, key=lambda c: sum(swiglu_hidden(s.dim, *c) == s.ffn_dim for s in stacks))


def _diff(plain: BltConfig, config: BltConfig) -> dict[str, Any]:
    """The fields of `config` that Meta's args could not carry (what `plain` got wrong)."""
    out: dict[str, Any] = {}
    for name in _STACKS:
        a, b = getattr(plain, name), getattr(config, name)
        if a is not None and b is not None:
            fields = [f.name for f in dataclasses.fields(b)]
            changed = {f: getattr(b, f) for f in fields if getattr(a, f) != getattr(b, f)}
            if changed:
                out[name] = changed
    for name in _TOP_OVERRIDES:
        if getattr(plain, name) != getattr(config, name):
            out[name] = getattr(config, name)
    return out
