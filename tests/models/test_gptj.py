"""Parity of GPT-J and CodeGen (interleaved partial rotary, shared-norm parallel residual, CodeGen's
model-parallel fused qkv_proj) with transformers."""

from __future__ import annotations

import pytest
import torch
import transformers as T

from evolm.errors import ConfigError
from evolm.models.family import family_for
from helpers.hf_parity import assert_cached_equals_full, assert_parity, build_hf

SMALL = dict(vocab_size=97, n_embd=64, n_layer=2, n_head=4, n_positions=64, n_inner=96, bos_token_id=1, eos_token_id=2)

CASES = {
    "gptj": lambda: T.GPTJConfig(**SMALL, rotary_dim=8),
    "gptj-full-rotary-tied": lambda: T.GPTJConfig(**SMALL, rotary_dim=16, tie_word_embeddings=True),
    "codegen": lambda: T.CodeGenConfig(**SMALL, rotary_dim=8),
    "codegen-8-heads": lambda: T.CodeGenConfig(**{**SMALL, "n_head": 8}, rotary_dim=4, activation_function="gelu"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_parity_with_transformers(case, tmp_path):
    _, model, ids = assert_parity(CASES[case](), tmp_path, seq_len=13)
    assert_cached_equals_full(model, ids)


@pytest.mark.parametrize("case", ["gptj", "codegen"])
def test_state_round_trip_is_exact(case):
    hf = build_hf(CASES[case]())
    fam = family_for(hf.config.model_type)
    cfg = fam.config_from_hf(hf.config.to_dict())
    ref = {k: v for k, v in hf.state_dict().items() if not k.endswith(fam.ignored_keys)}
    back = fam.state_to_hf(fam.state_from_hf(ref, cfg), cfg)
    assert back.keys() == ref.keys()
    assert all(torch.equal(back[k], v) for k, v in ref.items())


def test_missing_rotary_dim_raises():
    hf = {**T.GPTJConfig(**SMALL).to_dict(), "rotary_dim": None}
    with pytest.raises(ConfigError, match="rotary_dim"):
        family_for("gptj").config_from_hf(hf)
