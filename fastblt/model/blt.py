"""The BLT / BLT-D reference model in plain PyTorch.

Module and parameter names are Meta's (`local_encoder.layers.0.attention.wq.weight`, ...), so a
Meta state dict loads as is and the Hugging Face layout is a rename (checkpoint.py). The full
forward here and the incremental steps in steps.py share every layer; tests prove they agree.

Data flow (reference/blt_architecture.md section 1.6):
    tokens -> hash + byte embeddings -> encoder layers -> byte states h       (B, N, d_local)
    h, patches -> max-pool -> k slots -> cross-attn (2q + attn) -> global     (B, P, d_global)
    latents -> k decoder slots; each byte reads the last closed patch's slots -> decoder -> logits
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from fastblt.errors import CapabilityError, InputError
from fastblt.model.config import BltConfig, StackConfig
from fastblt.model.hashing import hash_ids_torch
from fastblt.model.layers import (
    NEG,
    CrossAttention,
    Embedding,
    KVCache,
    RMSNorm,
    TransformerBlock,
    rope_angles,
    self_attention_bias,
)
from fastblt.model.patching import decoder_patch_ids, entropy, patch_ids_from_lengths, patch_lengths_from_entropies


def make_layers(cfg: StackConfig) -> nn.ModuleList:
    return nn.ModuleList(TransformerBlock(cfg.dim, cfg.n_heads, cfg.ffn_dim, cfg.norm_eps) for _ in range(cfg.n_layers))


def run_layers(
    layers: nn.ModuleList,
    cfg: StackConfig,
    x: Tensor,
    positions: Tensor,
    bias: Tensor,
    caches: Sequence[KVCache] | None = None,
) -> Tensor:
    """Run a stack of blocks over x (B, S, d) at integer positions (B, S); one cache per layer or none."""
    cos, sin = rope_angles(positions, cfg.head_dim, cfg.rope_theta)
    for i, layer in enumerate(layers):
        x = layer(x, cos, sin, bias, None if caches is None else caches[i])
    return x


def full_causal_bias(positions: Tensor, window: int | None) -> Tensor:
    """Causal (windowed) bias for whole sequences with no cache: positions (B, N), every row 0..N-1,
    -> (1, 1, N, N), broadcast over the batch (one row's mask, not B copies of it)."""
    row = positions[:1]
    return self_attention_bias(row, row, torch.ones_like(row, dtype=torch.bool), window)


class EntropyModel(nn.Module):
    """The patcher: a small byte LM whose next-byte entropies decide patch boundaries."""

    def __init__(self, cfg: StackConfig, vocab_size: int):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = Embedding(vocab_size, cfg.dim)
        self.layers = make_layers(cfg)
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, vocab_size, bias=False)

    def forward(self, tokens: Tensor) -> Tensor:
        """(B, N) -> next-byte logits (B, N, V) fp32."""
        B, N = tokens.shape
        pos = torch.arange(N, device=tokens.device).expand(B, N)
        x = run_layers(self.layers, self.cfg, self.tok_embeddings(tokens), pos, full_causal_bias(pos, self.cfg.window))
        return self.output(self.norm(x)).float()


class LocalEncoder(nn.Module):
    def __init__(self, config: BltConfig):
        super().__init__()
        cfg = config.encoder
        self.tok_embeddings = Embedding(config.vocab_size, cfg.dim)
        self.layers = make_layers(cfg)
        self.patch_embedding_projection = nn.Linear(cfg.dim, cfg.dim * config.cross_attn_k, bias=False)
        self.cross_attn_layers = nn.ModuleList([CrossAttention(cfg.dim, config.cross_attn_heads_encoder, cfg.norm_eps)])


class GlobalTransformer(nn.Module):
    def __init__(self, config: BltConfig):
        super().__init__()
        self.layers = make_layers(config.global_model)
        if config.has_global_projection:
            self.token_embedding_projection = nn.Linear(config.global_input_dim, config.global_model.dim, bias=False)
        else:
            self.token_embedding_projection = None


class LocalDecoder(nn.Module):
    def __init__(self, config: BltConfig):
        super().__init__()
        cfg = config.decoder
        self.input_norm = RMSNorm(cfg.dim, cfg.norm_eps) if config.decoder_input_norm else None
        self.layers = make_layers(cfg)
        self.cross_attn_layers = nn.ModuleList(
            CrossAttention(cfg.dim, config.cross_attn_heads_decoder, cfg.norm_eps)
            for _ in range(config.decoder_cross_layers)
        )
        self.patch_embedding_projection = nn.Linear(config.global_model.dim, cfg.dim * config.cross_attn_k, bias=False)
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, config.vocab_size, bias=False)
        # BLT-D: the byte/[MASK]/[PAD] embedding of diffusion-block positions (clean positions
        # take the encoder's byte states, as in BLT).
        if config.blt_d is not None:
            self.diffusion_embeddings = Embedding(config.blt_d.embedding_rows, cfg.dim)
        else:
            self.diffusion_embeddings = None


class BltModel(nn.Module):
    """BLT (and BLT-D when config.blt_d is set). Call: model(tokens, patch_lengths=None) -> logits."""

    def __init__(self, config: BltConfig):
        super().__init__()
        self.config = config
        self.encoder_hash_tok_embedding = nn.ModuleList(
            Embedding(config.hash_vocab, config.encoder.dim) for _ in range(config.n_hash_tables)
        )
        self.local_encoder = LocalEncoder(config)
        self.global_transformer = GlobalTransformer(config)
        self.local_decoder = LocalDecoder(config)
        self.entropy_model = EntropyModel(config.entropy, config.vocab_size) if config.entropy is not None else None

    # ---------------------------------------------------------------- public entry points
    def forward(self, tokens: Tensor, patch_lengths: Tensor | None = None) -> Tensor:
        """tokens (B, N) int -> next-byte logits (B, N, 260) fp32; row i predicts token i+1.

        patch_lengths (B, P) int; None runs the model's own entropy patcher.
        """
        tokens = self.check_tokens(tokens)
        if patch_lengths is None:
            patch_lengths = self.patch(tokens)
        patch_lengths = self.check_patch_lengths(patch_lengths, tokens)
        h = self.encode(tokens)
        latents = self.global_latents(h, patch_lengths)
        return self.decode(h, latents, decoder_patch_ids(patch_lengths, tokens.shape[1]))

    def entropies(self, tokens: Tensor) -> Tensor:
        """Next-byte entropies (B, N) fp32 from the entropy model."""
        if self.entropy_model is None:
            raise CapabilityError("this checkpoint has no entropy model: pass patch_lengths explicitly")
        return entropy(self.entropy_model(tokens))

    def patch(self, tokens: Tensor) -> Tensor:
        """The model's own entropy patching: (B, N) -> (B, P) lengths."""
        return patch_lengths_from_entropies(self.entropies(tokens), self.config.patching)

    # ---------------------------------------------------------------- the three stages
    def embed(
        self, tokens: Tensor, hash_ids: Tensor, hash_dropout: float = 0.0, gen: torch.Generator | None = None
    ) -> Tensor:
        """Byte embedding + one hash n-gram embedding per table: (B, S), (B, S, T) -> (B, S, d).

        hash_dropout (training only): each table's row is dropped per byte with this probability
        (inverted dropout), so long n-gram rows cannot carry memorised text on their own.
        """
        x = self.local_encoder.tok_embeddings(tokens)
        for t, table in enumerate(self.encoder_hash_tok_embedding):
            e = table(hash_ids[..., t])  # (B, S, d)
            if hash_dropout > 0.0:
                keep = torch.rand(e.shape[:-1], generator=gen, device=e.device) >= hash_dropout  # (B, S)
                e = e * keep.unsqueeze(-1).to(e.dtype) / (1.0 - hash_dropout)
            x = x + e
        return x

    def encode(self, tokens: Tensor, hash_dropout: float = 0.0, gen: torch.Generator | None = None) -> Tensor:
        """Encoder byte states for a whole sequence: (B, N) -> (B, N, d_local); hash_dropout as embed."""
        B, N = tokens.shape
        pos = torch.arange(N, device=tokens.device).expand(B, N)
        x = self.embed(tokens, hash_ids_torch(tokens, self.config), hash_dropout, gen)
        return run_layers(
            self.local_encoder.layers, self.config.encoder, x, pos, full_causal_bias(pos, self.config.encoder.window)
        )

    def patch_slots(self, h: Tensor, patch_lengths: Tensor) -> Tensor:
        """Encoder output per patch: max-pool, project to k slots, cross-attend over the patch's
        bytes with the doubled residual. (B, N, d), (B, P) -> (B, P, k*d)."""
        B, N, D = h.shape
        P, k = patch_lengths.shape[1], self.config.cross_attn_k
        pid = patch_ids_from_lengths(patch_lengths, N)  # (B, N)
        pooled = torch.zeros(B, P, D, dtype=h.dtype, device=h.device)
        pooled = pooled.scatter_reduce(1, pid.unsqueeze(-1).expand(B, N, D), h, reduce="amax", include_self=False)
        q = self.local_encoder.patch_embedding_projection(pooled).view(B, P * k, D)  # (B, P*k, d)
        slot_patch = torch.arange(P * k, device=h.device) // k
        bias = torch.where(slot_patch.view(1, -1, 1) == pid.unsqueeze(1), 0.0, NEG).unsqueeze(1)  # (B, 1, P*k, N)
        xattn = self.local_encoder.cross_attn_layers[0]
        keys, values = xattn.keys_values(h)
        return (q + xattn(q, keys, values, bias)).view(B, P, k * D)

    def global_latents(self, h: Tensor, patch_lengths: Tensor) -> Tensor:
        """Global transformer over patches: (B, N, d), (B, P) -> latents (B, P, d_global)."""
        x = self.patch_slots(h, patch_lengths)
        g = self.global_transformer
        if g.token_embedding_projection is not None:
            x = g.token_embedding_projection(x)
        B, P, _ = x.shape
        pos = torch.arange(P, device=x.device).expand(B, P)
        return run_layers(g.layers, self.config.global_model, x, pos, full_causal_bias(pos, None))

    def decoder_cross_kv(self, latents: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Per decoder cross-attention layer, the keys/values of every patch's k slots (B, P, k, d)."""
        B, P, _ = latents.shape
        slots = self.local_decoder.patch_embedding_projection(latents).view(B, P, self.config.cross_attn_k, -1)
        return [xattn.keys_values(slots) for xattn in self.local_decoder.cross_attn_layers]

    def decoder_layers(
        self,
        x: Tensor,
        positions: Tensor,
        read_patch: Tensor,
        cross_kv: list[tuple[Tensor, Tensor]],
        bias: Tensor,
        caches: Sequence[KVCache] | None = None,
    ) -> Tensor:
        """Decoder body: the input norm (decoder_input_norm only), then per layer, cross-attend to the
        read patch's k slots (2x + attn), then a block. x (B, S, d), read_patch (B, S) into cross_kv's
        patch axis; one self-attention cache per layer or none. Returns logits (B, S, V) fp32."""
        dec, cfg = self.local_decoder, self.config.decoder
        if dec.input_norm is not None:
            x = dec.input_norm(x)
        B, S, D = x.shape
        cos, sin = rope_angles(positions, cfg.head_dim, cfg.rope_theta)
        idx = read_patch.to(torch.int64).view(B, S, 1, 1)
        for i, layer in enumerate(dec.layers):
            if i < len(dec.cross_attn_layers):
                keys, values = cross_kv[i]  # (B, P, k, d)
                gather_idx = idx.expand(B, S, keys.shape[2], keys.shape[3])
                ks, vs = torch.gather(keys, 1, gather_idx), torch.gather(values, 1, gather_idx)  # (B, S, k, d)
                x = x + dec.cross_attn_layers[i].forward_slots(x, ks, vs)
            x = layer(x, cos, sin, bias, None if caches is None else caches[i])
        return dec.output(dec.norm(x)).float()

    def decode(self, h: Tensor, latents: Tensor, read_patch: Tensor) -> Tensor:
        """Causal decoder over a whole sequence: (B, N, d), (B, P, dg), (B, N) -> (B, N, V)."""
        B, N, _ = h.shape
        pos = torch.arange(N, device=h.device).expand(B, N)
        bias = full_causal_bias(pos, self.config.decoder.window)
        return self.decoder_layers(h, pos, read_patch, self.decoder_cross_kv(latents), bias)

    def decode_with_blocks(
        self,
        h: Tensor,
        latents: Tensor,
        read_patch: Tensor,
        block_ids: Tensor,
        block_starts: Tensor,
        block_read: Tensor,
    ) -> tuple[Tensor, Tensor]:
        """BLT-D training layout: the clean sequence and M corrupted blocks in one decoder pass.

        h (B, N, d) clean encoder states; read_patch (B, N); block_ids (B, M, Bk) bytes/[MASK]/[PAD];
        block_starts (B, M) first position of each block; block_read (B, M) the latent each block
        reads (the patch ending right before its start). Masks (docs/architecture.md): clean rows are causal
        over clean rows only; a block row sees its own block (bidirectionally) and the clean rows
        strictly before its start, nothing else (no other block: the "label leak").
        Returns clean logits (B, N, V) and block logits (B, M, Bk, V).
        """
        B, N, _ = h.shape
        _, M, Bk = block_ids.shape
        dev = h.device
        clean_pos = torch.arange(N, device=dev).expand(B, N)
        block_pos = (block_starts.unsqueeze(-1) + torch.arange(Bk, device=dev)).view(B, M * Bk)
        pos = torch.cat([clean_pos, block_pos], dim=1)  # (B, T)
        horizon = torch.cat([clean_pos + 1, block_starts.repeat_interleave(Bk, dim=1)], dim=1)  # clean keys < horizon
        # clean keys (j < N): visible below the query's horizon and inside its window
        clean_key = torch.arange(N, device=dev)
        ok = clean_key < horizon.unsqueeze(-1)  # (B, T, N)
        if self.config.decoder.window is not None:
            ok = ok & (clean_key > (pos - self.config.decoder.window).unsqueeze(-1))
        # block keys: visible to their own block's rows only
        block_of = torch.cat([torch.full((N,), -1, device=dev), torch.arange(M, device=dev).repeat_interleave(Bk)])
        same_block = (block_of.view(-1, 1) == block_of[N:].view(1, -1)) & (block_of.view(-1, 1) >= 0)  # (T, M*Bk)
        ok = torch.cat([ok, same_block.expand(B, -1, -1)], dim=-1)  # (B, T, T)
        bias = torch.where(ok, 0.0, NEG).unsqueeze(1).to(torch.float32)  # (B, 1, T, T)
        x = torch.cat([h, self.embed_block(block_ids.view(B, M * Bk))], dim=1)
        read = torch.cat([read_patch, block_read.repeat_interleave(Bk, dim=1)], dim=1)
        logits = self.decoder_layers(x, pos, read, self.decoder_cross_kv(latents), bias)
        return logits[:, :N], logits[:, N:].view(B, M, Bk, -1)

    def embed_block(self, block_ids: Tensor) -> Tensor:
        """BLT-D block positions (bytes, [MASK], [PAD]) -> decoder inputs (B, S, d)."""
        if self.local_decoder.diffusion_embeddings is None:
            raise CapabilityError(
                "this checkpoint has no BLT-D rows (local_decoder.diffusion_embeddings): "
                "blt-d and blt-dv need a BLT-D checkpoint; ar and blt-s work on any BLT checkpoint"
            )
        return self.local_decoder.diffusion_embeddings(block_ids)

    # ---------------------------------------------------------------- input checks
    def check_tokens(self, tokens: Tensor) -> Tensor:
        if not isinstance(tokens, Tensor) or tokens.dim() != 2:
            shape = tuple(tokens.shape) if isinstance(tokens, Tensor) else type(tokens).__name__
            raise InputError(f"tokens: expected a (batch, length) integer tensor, got {shape}")
        if tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
            raise InputError(f"tokens: expected an integer tensor, got {tokens.dtype}")
        if tokens.shape[1] == 0:
            raise InputError("tokens: the sequence is empty (need at least BOS)")
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi >= self.config.vocab_size:
            bad = lo if lo < 0 else hi
            raise InputError(f"tokens: id {bad} is outside the vocabulary [0, {self.config.vocab_size})")
        return tokens.to(torch.int64)

    def check_patch_lengths(self, patch_lengths: Tensor, tokens: Tensor) -> Tensor:
        B, N = tokens.shape
        if not isinstance(patch_lengths, Tensor) or patch_lengths.dim() != 2 or patch_lengths.shape[0] != B:
            shape = tuple(patch_lengths.shape) if isinstance(patch_lengths, Tensor) else type(patch_lengths).__name__
            raise InputError(f"patch_lengths: expected shape ({B}, P), got {shape}")
        patch_lengths = patch_lengths.to(torch.int64)
        if int(patch_lengths.min()) < 0:
            raise InputError("patch_lengths: lengths must be >= 0")
        sums = patch_lengths.sum(-1)
        if bool(((sums != N) & (sums != N + 1)).any()):
            raise InputError(f"patch_lengths: each row must sum to N={N} (or N+1), got {sums.tolist()}")
        if bool((patch_lengths[:, 0] != 1).any()):
            raise InputError("patch_lengths: the first patch must be exactly 1 byte (BOS)")
        return patch_lengths

    def num_params(self) -> dict[str, int]:
        """Parameter counts per module (what Eq. 8 multiplies by passes)."""
        count = lambda m: sum(p.numel() for p in m.parameters()) if m is not None else 0  # noqa: E731
        return {
            "entropy": count(self.entropy_model),
            "encoder": count(self.local_encoder),  # as the paper counts it: without the hash tables
            "hash_embeddings": count(self.encoder_hash_tok_embedding),  # only n_tables rows read per byte
            "global": count(self.global_transformer),
            "decoder": count(self.local_decoder),
        }
