"""Every bad input to the model layer is one clear line of a fastblt exception type."""

from __future__ import annotations

import pytest
import torch

import fastblt
from fastblt.errors import ConfigError, InputError
from fastblt.model.config import BltConfig, StackConfig, tiny_config
from fastblt.model.tokenizer import ids_to_bytes

from tiny import make_model, random_tokens


@pytest.fixture(scope="module")
def model():
    return make_model()


def one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def test_token_outside_vocabulary(model):
    tokens = random_tokens(8)
    tokens[0, 3] = 260
    with pytest.raises(InputError) as e:
        model(tokens)
    assert "260" in one_line(e) and "vocabulary" in one_line(e)


def test_negative_token(model):
    with pytest.raises(InputError, match="-1"):
        model(torch.tensor([[1, -1, 5]]))


def test_empty_sequence_and_prompt(model):
    with pytest.raises(InputError, match="empty"):
        model(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(InputError, match="empty"):
        fastblt.encode("")


def test_float_tokens_and_wrong_rank(model):
    with pytest.raises(InputError, match="integer"):
        model(torch.ones(1, 4))
    with pytest.raises(InputError, match=r"\(batch, length\)"):
        model(torch.ones(4, dtype=torch.long))


def test_patch_lengths_that_do_not_cover_the_sequence(model):
    with pytest.raises(InputError, match="sum to N=8"):
        model(random_tokens(8), torch.tensor([[1, 2, 2]]))
    with pytest.raises(InputError, match="BOS"):
        model(random_tokens(8), torch.tensor([[2, 6]]))


@pytest.mark.parametrize(
    "change, field",
    [
        (dict(n_layers=-1), "n_layers"),
        (dict(n_heads=3), "dim"),
        (dict(window=0), "window"),
        (dict(norm_eps=2.0), "norm_eps"),
    ],
)
def test_stack_field_out_of_range(change, field):
    base = dict(dim=16, n_layers=1, n_heads=2, ffn_dim=32)
    with pytest.raises(ConfigError, match=field):
        StackConfig(**{**base, **change})


def test_model_config_fields_out_of_range():
    cfg = tiny_config()
    with pytest.raises(ConfigError, match="cross_attn_k"):
        cfg.replace(cross_attn_k=0)
    with pytest.raises(ConfigError, match="hash_vocab"):
        cfg.replace(hash_vocab=0)
    with pytest.raises(ConfigError, match="unknown field"):
        BltConfig.from_dict({**cfg.to_dict(), "bogus": 1})
    with pytest.raises(ConfigError, match="decoder_input_norm"):
        BltConfig.from_dict({**cfg.to_dict(), "decoder_input_norm": "yes"})
    assert BltConfig.from_dict(cfg.replace(decoder_input_norm=True).to_dict()).decoder_input_norm is True


def test_encode_decode_round_trip():
    ids = fastblt.encode("héllo")
    assert ids[0] == 1 and ids[1] == ord("h") + 4 and len(ids) == 1 + len("héllo".encode())
    assert fastblt.decode(ids) == "héllo"
    assert fastblt.encode(b"\xff\x00") == [1, 259, 4]
    with pytest.raises(InputError, match="300"):
        fastblt.decode([300])


def test_the_first_id_past_the_vocabulary_is_refused():
    """Id 260 is one past the last byte id (259): decoding it must name it, not fail inside
    bytearray (or turn it into a byte that no model produced)."""
    assert ids_to_bytes([259]) == b"\xff"
    with pytest.raises(InputError) as e:
        ids_to_bytes([5, 260])
    assert one_line(e) == "token id 260: outside the vocabulary [0, 260)"
