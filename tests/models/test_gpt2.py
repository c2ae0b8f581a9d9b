"""Parity of the GPT-2 family with transformers: Conv1D transposes, fused c_attn, learned positions."""

from __future__ import annotations

import json

import pytest
import torch
import transformers as T
from safetensors.torch import load_file, save_file

import evolm
from evolm.errors import ConfigError
from helpers.hf_parity import TOL, assert_cached_equals_full, assert_parity, build_hf, relative_error

SMALL = dict(vocab_size=97, n_embd=64, n_layer=2, n_head=4, n_positions=32, bos_token_id=0, eos_token_id=1)

CASES = {
    "gpt2": lambda: T.GPT2Config(**SMALL),
    "gpt2-n_inner": lambda: T.GPT2Config(**SMALL, n_inner=80),
    "gpt2-untied-relu": lambda: T.GPT2Config(**SMALL, tie_word_embeddings=False, activation_function="relu"),
    "gpt2-unscaled-attn": lambda: T.GPT2Config(**SMALL, scale_attn_weights=False),
    "gpt2-reorder-upcast": lambda: T.GPT2Config(**SMALL, reorder_and_upcast_attn=True),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_parity_with_transformers(case, tmp_path):
    hf_config = CASES[case]()
    _, model, ids = assert_parity(hf_config, tmp_path, seq_len=13)
    assert_cached_equals_full(model, ids)


def test_config_fields(tmp_path):
    _, model, _ = assert_parity(CASES["gpt2-n_inner"](), tmp_path)
    cfg = model.cfg
    assert cfg.mlp.hidden_size == 80 and not cfg.mlp.gated and cfg.mlp.activation == "gelu_tanh"
    assert cfg.absolute_positions == "learned" and cfg.max_seq_len == 32
    assert cfg.tie_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    saved = json.loads((tmp_path / "evolm" / "config.json").read_text())
    assert saved["n_inner"] == 80 and saved["activation_function"] == "gelu_new"


def test_reorder_and_upcast_round_trips(tmp_path):
    assert_parity(CASES["gpt2-reorder-upcast"](), tmp_path)
    assert json.loads((tmp_path / "evolm" / "config.json").read_text())["reorder_and_upcast_attn"] is True


def test_legacy_checkpoint_without_prefix_and_with_mask_buffers(tmp_path):
    """The OpenAI conversions were saved from GPT2Model: no ``transformer.`` prefix, plus the causal
    mask buffers ``attn.bias`` / ``attn.masked_bias``, which carry no weights."""
    hf_config = CASES["gpt2"]()
    hf = build_hf(hf_config)
    hf.save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    state = {k.removeprefix("transformer."): v for k, v in load_file(path).items()}
    for i in range(hf_config.n_layer):
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(32, 32, dtype=torch.uint8))[None, None]
        state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    save_file(state, path, metadata={"format": "pt"})
    model = evolm.load_model(tmp_path)
    ids = torch.randint(0, hf_config.vocab_size, (2, 9))
    with torch.no_grad():
        assert relative_error(model(ids), hf(ids).logits) <= TOL


@pytest.mark.parametrize(("field", "value"), [("scale_attn_by_inverse_layer_idx", True), ("add_cross_attention", True)])
def test_unsupported_options_raise(field, value, tmp_path):
    build_hf(T.GPT2Config(**SMALL)).save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), field: value}))
    with pytest.raises(ConfigError, match=f"{field}=True"):
        evolm.load_model(tmp_path)
