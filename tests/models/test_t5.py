"""T5 (v1.0 and v1.1) against transformers: encoder and decoder logits, save round trip, cached
decoding, relative position buckets, and clear errors for bad input."""

from __future__ import annotations

import pytest
import torch
import transformers as T

import evolm
from evolm.errors import ConfigError
from evolm.nn.relative_position import relative_position_bucket
from helpers.seq2seq_parity import assert_cached_decoding_equals_full, assert_seq2seq_parity, build_hf_seq2seq

SMALL = dict(
    vocab_size=97,
    d_model=32,
    d_kv=8,
    d_ff=48,
    num_layers=2,
    num_heads=4,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=12,
    decoder_start_token_id=0,
)

CASES = {
    # v1.0: ReLU MLP, head tied to the embedding, decoder output scaled by d_model ** -0.5
    "t5-v1.0": lambda: T.T5Config(**SMALL, feed_forward_proj="relu"),
    # v1.1 / Flan: gated-GELU, no output scaling, head untied (transformers stores it tied when equal)
    "t5-v1.1": lambda: T.T5Config(**SMALL, feed_forward_proj="gated-gelu", tie_word_embeddings=False),
    "t5-deeper-decoder": lambda: T.T5Config(**{**SMALL, "num_decoder_layers": 3}, feed_forward_proj="gated-silu"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(case, tmp_path):
    _, model = assert_seq2seq_parity(T.T5ForConditionalGeneration, CASES[case](), tmp_path)
    assert model.cfg.tie_embeddings == (case != "t5-v1.1")  # a config without tie_word_embeddings ties
    assert_cached_decoding_equals_full(model)


def test_untied_head_with_its_own_weights(tmp_path):
    """A v1.1 checkpoint whose lm_head differs from the embedding (as Flan-T5's does) keeps it."""
    hf = build_hf_seq2seq(T.T5ForConditionalGeneration, CASES["t5-v1.1"]())
    hf.lm_head.weight = torch.nn.Parameter(hf.shared.weight.detach() + torch.randn_like(hf.shared.weight))
    hf.save_pretrained(tmp_path / "hf")
    model = evolm.load_model(tmp_path / "hf")
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    ids, dec = torch.randint(0, 97, (2, 7)), torch.randint(0, 97, (2, 5))
    with torch.no_grad():
        torch.testing.assert_close(model(ids, decoder_input_ids=dec), hf(input_ids=ids, decoder_input_ids=dec).logits)


def test_relative_buckets_match_transformers():
    distance = torch.arange(-300, 300)[None, :]
    for bidirectional in (True, False):
        for buckets, max_distance in ((32, 128), (8, 12)):
            ours = relative_position_bucket(
                distance, bidirectional=bidirectional, num_buckets=buckets, max_distance=max_distance
            )
            ref = T.models.t5.modeling_t5.T5Attention._relative_position_bucket(
                distance, bidirectional=bidirectional, num_buckets=buckets, max_distance=max_distance
            )
            assert torch.equal(ours, ref)


def test_bad_input_gives_clear_errors():
    model = evolm.build_model("t5-tiny", seed=0)
    ids = torch.randint(2, 600, (1, 8))
    with pytest.raises(ConfigError, match="decoder_input_ids is missing.*encoder-decoder.*seq2seq_generate"):
        model(ids)
    too_long = torch.randint(2, 600, (1, model.cfg.max_seq_len + 1))
    with pytest.raises(ValueError, match=r"input_ids has 257 tokens, more than the model's max_seq_len=256"):
        model(too_long, decoder_input_ids=ids)
    with pytest.raises(ValueError, match="decoder sequence .* has 257 tokens"):
        model(ids, decoder_input_ids=too_long)
    from evolm.infer.generate import generate

    with pytest.raises(ConfigError, match="encoder-decoder model.*seq2seq_generate.generate_seq2seq"):
        generate(model, ids, 4)
