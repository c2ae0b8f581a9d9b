"""BART against transformers: encoder and decoder logits (learned positions offset by 2, post-LN,
embedding LayerNorm, final_logits_bias), save round trip, cached decoding and too-long input."""

from __future__ import annotations

import pytest
import torch
import transformers as T

import evolm
from helpers.seq2seq_parity import assert_cached_decoding_equals_full, assert_seq2seq_parity

SMALL = dict(
    vocab_size=99,
    d_model=32,
    encoder_layers=2,
    decoder_layers=2,
    encoder_attention_heads=4,
    decoder_attention_heads=4,
    encoder_ffn_dim=48,
    decoder_ffn_dim=48,
    max_position_embeddings=24,
)

CASES = {
    "bart": lambda: T.BartConfig(**SMALL),
    "bart-scaled-relu-deeper-decoder": lambda: T.BartConfig(
        **{**SMALL, "decoder_layers": 3}, scale_embedding=True, activation_function="relu"
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(case, tmp_path):
    _, model = assert_seq2seq_parity(T.BartForConditionalGeneration, CASES[case](), tmp_path)
    assert model.cfg.position_offset == 2 and model.model.encoder.embed_positions.weight.shape[0] == 24 + 2
    assert_cached_decoding_equals_full(model)


def test_longer_than_the_position_table_is_a_clear_error():
    model = evolm.build_model("bart-tiny", seed=0)
    n = model.cfg.max_seq_len
    ok = torch.randint(3, 600, (1, n))
    model(ok, decoder_input_ids=ok[:, :4])  # exactly max_seq_len fits
    with pytest.raises(ValueError, match=rf"input_ids has {n + 1} tokens, more than the model's max_seq_len={n}"):
        model(torch.randint(3, 600, (1, n + 1)), decoder_input_ids=ok[:, :4])
    cache = model.new_decoder_cache(model.encode(ok[:, :5]), max_len=n + 8)
    model(decoder_input_ids=ok[:, :n], cache=cache)
    with pytest.raises(ValueError, match=rf"cached \+ decoder_input_ids\) has {n + 1} tokens"):
        model(decoder_input_ids=ok[:, :1], cache=cache)


def test_unequal_encoder_and_decoder_shapes_are_refused():
    hf = {**T.BartConfig(**SMALL).to_dict(), "decoder_ffn_dim": 64}
    with pytest.raises(evolm.ConfigError, match="ffn dims 48/64"):
        evolm.models.families.bart.FAMILIES["bart"].config_from_hf(hf)
