"""Parity of the BLOOM family with transformers: ALiBi, embedding LayerNorm, per-head fused q/k/v."""

from __future__ import annotations

import json

import pytest
import torch
import transformers as T
from safetensors.torch import load_file, save_file

import evolm
from evolm.errors import ConfigError
from helpers.hf_parity import TOL, assert_cached_equals_full, assert_parity, build_hf, relative_error

SMALL = dict(vocab_size=97, hidden_size=64, n_layer=2, n_head=4)

CASES = {
    "bloom": lambda: T.BloomConfig(**SMALL),
    "bloom-6-heads": lambda: T.BloomConfig(**{**SMALL, "hidden_size": 96, "n_head": 6}),  # non-power-of-2 slopes
    "bloom-untied": lambda: T.BloomConfig(**SMALL, tie_word_embeddings=False),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_parity_with_transformers(case, tmp_path):
    hf_config = CASES[case]()
    _, model, ids = assert_parity(hf_config, tmp_path, seq_len=13)
    assert_cached_equals_full(model, ids)


def test_config_fields(tmp_path):
    _, model, _ = assert_parity(CASES["bloom-6-heads"](), tmp_path)
    cfg = model.cfg
    assert cfg.attention.position == "alibi" and cfg.attention.rope is None
    assert cfg.embedding_norm and cfg.absolute_positions == "none"
    assert cfg.mlp.hidden_size == 4 * 96 and cfg.mlp.activation == "gelu_tanh"
    assert cfg.tie_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    assert cfg.max_seq_len == 2048


def test_left_padded_batch_matches_transformers(tmp_path):
    """HF measures ALiBi distances over real tokens only (cumsum of the mask); evolm uses slot indices.
    Per query the two differ by a constant over visible keys, so real tokens' logits agree."""
    hf_config = CASES["bloom-6-heads"]()
    hf = build_hf(hf_config)
    hf.save_pretrained(tmp_path)
    model = evolm.load_model(tmp_path)
    ids = torch.randint(0, hf_config.vocab_size, (3, 11), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    mask[2, :1] = 0
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask).logits
        out = model(ids, attention_mask=mask)
        alone = model(ids[0:1, 4:])  # row 0 without its padding
    real = mask.bool()
    assert relative_error(out[real], ref[real]) <= TOL
    assert relative_error(out[0, 4:], alone[0]) <= TOL


def test_legacy_checkpoint_without_prefix(tmp_path):
    """The BigScience checkpoints were saved from BloomModel: tensor names lack ``transformer.``."""
    hf_config = CASES["bloom"]()
    hf = build_hf(hf_config)
    hf.save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    save_file({k.removeprefix("transformer."): v for k, v in load_file(path).items()}, path, metadata={"format": "pt"})
    model = evolm.load_model(tmp_path)
    ids = torch.randint(0, hf_config.vocab_size, (2, 9))
    with torch.no_grad():
        assert relative_error(model(ids), hf(ids).logits) <= TOL


def test_post_layernorm_residual_raises(tmp_path):
    build_hf(T.BloomConfig(**SMALL)).save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "apply_residual_connection_post_layernorm": True}))
    with pytest.raises(ConfigError, match="apply_residual_connection_post_layernorm=True"):
        evolm.load_model(tmp_path)
