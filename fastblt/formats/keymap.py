"""Names and configs across formats: our (Meta-named) state dict <-> Hugging Face `BltForCausalLM`.

The mapping is the one of transformers' convert_blt_weights_to_hf.py: pure renames, the hash
tables concatenated into one embedding, the decoder head moved to `lm_head`, the entropy model
under `model.patcher.`. No tensor is transposed or permuted (both use interleaved RoPE).
"""

from __future__ import annotations

from typing import Any

import torch

from fastblt.errors import ConfigError
from fastblt.model.config import BltConfig, BltDConfig, PatchingConfig, StackConfig

_RENAMES = [
    (".attention.", ".self_attn."),
    (".feed_forward.", ".mlp."),
    (".attention_norm.", ".input_layernorm."),
    (".ffn_norm.", ".post_attention_layernorm."),
    (".tok_embeddings.", ".embed_tokens."),
    (".cross_attn_norm_q.", ".q_norm."),
    (".cross_attn_norm_kv.", ".k_norm."),
    (".w1.", ".gate_proj."),
    (".w2.", ".down_proj."),
    (".w3.", ".up_proj."),
    (".wq.", ".q_proj."),
    (".wk.", ".k_proj."),
    (".wv.", ".v_proj."),
    (".wo.", ".o_proj."),
]
HF_BLT_D_KEY = "model.local_decoder.diffusion_embeddings.weight"  # our extension; HF ignores it


def _rename(key: str, forward: bool) -> str:
    key = "." + key
    for a, b in _RENAMES if forward else [(b, a) for a, b in _RENAMES]:
        key = key.replace(a, b)
    return key[1:]


def to_hf_state_dict(sd: dict[str, torch.Tensor], config: BltConfig) -> dict[str, torch.Tensor]:
    """Our state dict -> BltForCausalLM's."""
    out: dict[str, torch.Tensor] = {}
    tables = [sd[f"encoder_hash_tok_embedding.{t}.weight"] for t in range(config.n_hash_tables)]
    out["model.encoder_hash_tok_embedding.weight"] = torch.cat(tables, dim=0)
    for key, value in sd.items():
        if key.startswith("encoder_hash_tok_embedding."):
            continue
        if key == "local_decoder.output.weight":
            out["lm_head.weight"] = value
        elif key == "local_decoder.diffusion_embeddings.weight":
            out[HF_BLT_D_KEY] = value
        elif key.startswith("entropy_model."):
            hf = _rename(key[len("entropy_model.") :], True).replace("output.", "lm_head.")
            out["model.patcher." + hf] = value
        else:
            out["model." + _rename(key, True)] = value
    return out


def from_hf_state_dict(sd: dict[str, torch.Tensor], config: BltConfig) -> dict[str, torch.Tensor]:
    """BltForCausalLM's state dict -> ours (the fused hash table split back per n-gram size)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if key == "model.encoder_hash_tok_embedding.weight":
            for t, chunk in enumerate(value.split(config.hash_vocab, dim=0)):
                out[f"encoder_hash_tok_embedding.{t}.weight"] = chunk
        elif key == "lm_head.weight":
            out["local_decoder.output.weight"] = value
        elif key == HF_BLT_D_KEY:
            out["local_decoder.diffusion_embeddings.weight"] = value
        elif key.startswith("model.patcher."):
            ours = _rename(key[len("model.patcher.") :], False).replace("lm_head.", "output.")
            out["entropy_model." + ours] = value
        elif key.startswith("model."):
            out[_rename(key[len("model.") :], False)] = value
        else:
            out[key] = value  # left for the loader to report as unexpected
    return out


# ---------------------------------------------------------------------------------- configs
def _theta(sub: dict[str, Any], default: float) -> float:
    rp = sub.get("rope_parameters") or {}
    return float(rp.get("rope_theta", sub.get("rope_theta", default)))


def _hf_stack(sub: dict[str, Any], window: int | None, theta: float) -> StackConfig:
    heads = sub["num_attention_heads"]
    kv = sub.get("num_key_value_heads") or heads
    if kv != heads:
        raise ConfigError(f"config field num_key_value_heads: grouped-query attention ({kv} != {heads}) is not BLT")
    return StackConfig(
        dim=sub["hidden_size"],
        n_layers=sub["num_hidden_layers"],
        n_heads=heads,
        ffn_dim=sub.get("intermediate_size") or int(8 * sub["hidden_size"] / 3),
        rope_theta=_theta(sub, theta),
        norm_eps=float(sub.get("rms_norm_eps", 1e-5)),
        window=window,
        max_positions=sub.get("max_position_embeddings", 24576),
    )


def config_from_hf(d: dict[str, Any]) -> BltConfig:
    """transformers' BltConfig JSON (4.57 / 5.x field names) -> BltConfig."""
    try:
        window = d.get("local_attention_window_len", 512)
        enc, dec = d["encoder_config"], d["decoder_config"]
        patcher = d.get("patcher_config")
        if enc.get("cross_attn_all_layers", False):
            raise ConfigError("config field encoder_config.cross_attn_all_layers: true is not supported")
        if d.get("patching_mode", "entropy") != "entropy":
            raise ConfigError(f"config field patching_mode: only 'entropy' is supported, got {d['patching_mode']!r}")
        blt_d = d.get("fastblt_blt_d")
        return BltConfig(
            encoder=_hf_stack(enc, window, 500000.0),
            global_model=_hf_stack(d["global_config"], None, 500000.0),
            decoder=_hf_stack(dec, window, 500000.0),
            entropy=None if patcher is None else _hf_stack(patcher, patcher.get("sliding_window", 512), 10000.0),
            cross_attn_k=d.get("cross_attn_k", 2),
            cross_attn_heads_encoder=enc["num_attention_heads"],
            cross_attn_heads_decoder=dec["num_attention_heads"],
            cross_attn_all_layers_decoder=dec.get("cross_attn_all_layers", True),
            hash_sizes=tuple(d.get("encoder_hash_byte_group_size") or (3, 4, 5, 6, 7, 8)),
            hash_vocab=d.get("encoder_hash_byte_group_vocab", 500002),
            hash_functions=d.get("encoder_hash_byte_group_nb_functions", 1),
            patching=PatchingConfig(
                threshold=d.get("patching_threshold", 1.335442066192627), max_patch_length=d.get("max_patch_length")
            ),
            blt_d=None if blt_d is None else BltDConfig(**blt_d),
        )
    except KeyError as e:
        raise ConfigError(f"config field {e.args[0]}: missing from the Hugging Face config") from None


def _hf_sub(s: StackConfig) -> dict[str, Any]:
    return {
        "hidden_size": s.dim,
        "num_attention_heads": s.n_heads,
        "num_key_value_heads": s.n_heads,
        "num_hidden_layers": s.n_layers,
        "intermediate_size": s.ffn_dim,
        "rms_norm_eps": s.norm_eps,
        "max_position_embeddings": s.max_positions,
        "rope_parameters": {"rope_theta": s.rope_theta, "rope_type": "default"},
    }


def config_to_hf(config: BltConfig) -> dict[str, Any]:
    """BltConfig -> a dict that transformers' BltConfig(**d) accepts (>= 5.24 field names)."""
    if config.encoder.window != config.decoder.window:
        raise ConfigError("config: the HF format has one local window for encoder and decoder")
    if (
        config.cross_attn_heads_encoder != config.encoder.n_heads
        or config.cross_attn_heads_decoder != config.decoder.n_heads
    ):
        raise ConfigError("config: the HF format uses the local head count for cross-attention")
    enc = _hf_sub(config.encoder) | {
        "cross_attn_all_layers": False,
        "cross_attn_k": config.cross_attn_k,
        "hidden_size_global": config.global_model.dim,
    }
    dec = _hf_sub(config.decoder) | {
        "cross_attn_all_layers": config.cross_attn_all_layers_decoder,
        "cross_attn_k": config.cross_attn_k,
        "hidden_size_global": config.global_model.dim,
    }
    d: dict[str, Any] = {
        "model_type": "blt",
        "architectures": ["BltForCausalLM"],
        "vocab_size": config.vocab_size,
        "patch_in_forward": config.entropy is not None,
        "patch_size": 4,
        "patching_mode": "entropy",
        "patching_threshold": config.patching.threshold,
        "max_patch_length": config.patching.max_patch_length,
        "local_attention_window_len": config.encoder.window,
        "cross_attn_k": config.cross_attn_k,
        "encoder_hash_byte_group_size": list(config.hash_sizes),
        "encoder_hash_byte_group_vocab": config.hash_vocab,
        "encoder_hash_byte_group_nb_functions": config.hash_functions,
        "encoder_config": enc,
        "decoder_config": dec,
        "global_config": _hf_sub(config.global_model),
        "tie_word_embeddings": False,
    }
    if config.entropy is not None:
        d["patcher_config"] = _hf_sub(config.entropy) | {"sliding_window": config.entropy.window}
    if config.blt_d is not None:
        d["fastblt_blt_d"] = {
            "block_size": config.blt_d.block_size,
            "mask_id": config.blt_d.mask_id,
            "pad_id": config.blt_d.pad_id,
            "decoder_input": config.blt_d.decoder_input,
        }
    return d
