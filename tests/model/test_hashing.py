"""Hash n-gram ids are bit-exact with the released int64 hash (transformers' copy of it)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastblt.model.config import tiny_config
from fastblt.model.hashing import hash_ids_numpy, hash_ids_torch

blt = pytest.importorskip("transformers.models.blt.modeling_blt")

CONFIG = tiny_config(hash_sizes=(3, 4, 5, 6, 7, 8), hash_vocab=500002).replace(hash_functions=3)


def reference(tokens: torch.Tensor) -> torch.Tensor:
    ids = []
    primes = [1000000007, 5915587277, 1500450271]
    for f in range(3):
        for n in CONFIG.hash_sizes:
            ids.append(blt.byte_group_hash_function(tokens, n, primes[f], CONFIG.hash_vocab))
    return torch.stack(ids, dim=-1)


def test_torch_and_numpy_match_the_released_hash():
    tokens = torch.randint(0, 260, (3, 300), generator=torch.Generator().manual_seed(0))
    ref = reference(tokens)
    assert torch.equal(hash_ids_torch(tokens, CONFIG), ref)
    assert np.array_equal(hash_ids_numpy(tokens.numpy(), CONFIG), ref.numpy().astype(np.int32))
    # the 8-gram with prime 9.6e9-class powers overflows int64: make sure we did hit the wrap
    assert (ref >= 0).all() and (ref < CONFIG.hash_vocab).all()


def test_incremental_hash_with_history_equals_whole_sequence():
    tokens = torch.randint(0, 260, (1, 50), generator=torch.Generator().manual_seed(1)).numpy()
    whole = hash_ids_numpy(tokens, CONFIG)
    for cut in (1, 5, 7, 8, 30):
        part = hash_ids_numpy(tokens[:, cut:], CONFIG, history=tokens[:, :cut])
        assert np.array_equal(part, whole[:, cut:])
