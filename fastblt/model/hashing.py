"""Hash n-gram ids, bit-exact with the released BLT (int64 wrap-around, then floor-mod).

The hash of the n-gram ending at byte i is sum_j w[j] * p^j over the window w = t[i-n+1..i]
(left-padded with 0 = BOE), computed in int64 with wrap-around, then `% vocab` (non-negative).
Ids are always computed on the host and fed to graphs as int32 (docs/architecture.md): never in a graph.
"""

from __future__ import annotations

import numpy as np
import torch

from fastblt.model.config import HASH_PRIMES, BltConfig


def _prime_powers(n: int, prime: int) -> np.ndarray:
    """p^0..p^(n-1) with int64 wrap-around, as torch computes `prime_tensor ** arange(n)`."""
    out = np.ones(n, dtype=np.int64)
    with np.errstate(over="ignore"):
        for j in range(1, n):
            out[j] = out[j - 1] * np.int64(prime)
    return out


def hash_ids_numpy(tokens: np.ndarray, config: BltConfig, history: np.ndarray | None = None) -> np.ndarray:
    """Hash ids for every table, (B, S) tokens -> (B, S, n_tables) int32.

    `history` (B, >= max_n - 1) holds the tokens just before `tokens` (for incremental steps);
    missing history is the BOE padding (0) of the released code.
    """
    tokens = np.asarray(tokens, dtype=np.int64)
    B, S = tokens.shape
    pad = max(config.hash_sizes) - 1
    if history is None:
        history = np.zeros((B, 0), dtype=np.int64)
    history = np.asarray(history, dtype=np.int64)[:, -pad:] if pad else np.zeros((B, 0), dtype=np.int64)
    left = np.zeros((B, pad - history.shape[1]), dtype=np.int64)
    full = np.concatenate([left, history, tokens], axis=1)  # (B, pad + S)
    out = np.empty((B, S, config.n_hash_tables), dtype=np.int32)
    t = 0
    with np.errstate(over="ignore"):
        for f in range(config.hash_functions):
            prime = HASH_PRIMES[f % len(HASH_PRIMES)]
            for n in config.hash_sizes:
                powers = _prime_powers(n, prime)
                h = np.zeros((B, S), dtype=np.int64)
                for j in range(n):  # w[j] is the byte n-1-j places before i
                    h = h + full[:, pad - (n - 1) + j : pad - (n - 1) + j + S] * powers[j]
                out[:, :, t] = np.mod(h, np.int64(config.hash_vocab)).astype(np.int32)
                t += 1
    return out


def hash_ids_torch(tokens: torch.Tensor, config: BltConfig) -> torch.Tensor:
    """The released torch formulation, (B, N) -> (B, N, n_tables) int64 (for the full forward)."""
    tokens = tokens.to(torch.int64)
    B, _ = tokens.shape
    ids = []
    for f in range(config.hash_functions):
        prime = torch.tensor(HASH_PRIMES[f % len(HASH_PRIMES)], dtype=torch.int64)
        for n in config.hash_sizes:
            padded = torch.cat([torch.zeros(B, n - 1, dtype=torch.int64, device=tokens.device), tokens], dim=1)
            windows = padded.unfold(1, n, 1)  # (B, N, n)
            powers = prime ** torch.arange(n, device=tokens.device)
            ids.append(torch.sum(windows * powers, dim=-1) % config.hash_vocab)
    return torch.stack(ids, dim=-1)
