"""Parity of the mixture-of-experts families (mixtral, qwen2_moe, qwen3_moe) with transformers:
fp32 logits both ways (HF checkpoint -> evolm -> HF), cached == uncached decoding, generation."""

from __future__ import annotations

import json

import pytest
import torch
import transformers as T
from safetensors import safe_open

import evolm
from evolm.infer.generate import generate
from helpers.hf_parity import assert_cached_equals_full, assert_parity

SMALL = dict(
    vocab_size=97,
    hidden_size=48,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)

CASES = {
    "mixtral": lambda: T.MixtralConfig(**SMALL, num_local_experts=4, num_experts_per_tok=2),
    "mixtral-window": lambda: T.MixtralConfig(**SMALL, num_local_experts=3, num_experts_per_tok=1, sliding_window=4),
    "qwen2_moe": lambda: T.Qwen2MoeConfig(
        **SMALL,
        num_experts=6,
        num_experts_per_tok=2,
        moe_intermediate_size=24,
        shared_expert_intermediate_size=40,
        mlp_only_layers=[1],
    ),
    "qwen2_moe-norm-topk": lambda: T.Qwen2MoeConfig(
        **SMALL, num_experts=4, num_experts_per_tok=3, moe_intermediate_size=24, norm_topk_prob=True
    ),
    "qwen3_moe": lambda: T.Qwen3MoeConfig(
        **SMALL, head_dim=16, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=24, attention_bias=True
    ),
    "qwen3_moe-sparse-step": lambda: T.Qwen3MoeConfig(
        **SMALL, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24, decoder_sparse_step=2
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_parity_with_transformers(case, tmp_path):
    hf, model, ids = assert_parity(CASES[case](), tmp_path, seq_len=13)
    assert_cached_equals_full(model, ids)
    # greedy generation through the inference API: evolm's tokens are transformers' tokens
    prompt = ids[:1, :4]
    out = generate(model, prompt, 6)
    with torch.no_grad():
        ref = hf.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert out.tolist() == ref.tolist()


def test_layer_layout(tmp_path):
    """Dense and MoE layers where transformers puts them; checkpoints keep one tensor per expert."""
    _, model, _ = assert_parity(CASES["qwen2_moe"](), tmp_path)
    assert model.cfg.moe_layers == (0,) and model.cfg.is_moe(0) and not model.cfg.is_moe(1)
    names = set(model.state_dict())
    assert "model.layers.0.mlp.experts.gate_up_proj" in names
    assert "model.layers.0.mlp.shared_experts.gate_proj.weight" in names
    assert "model.layers.1.mlp.gate_proj.weight" in names
    with safe_open(str(tmp_path / "evolm" / "model.safetensors"), "pt") as f:
        saved = set(f.keys())
    assert "model.layers.0.mlp.experts.5.down_proj.weight" in saved
    assert "model.layers.0.mlp.shared_expert.up_proj.weight" in saved
    hf_cfg = json.loads((tmp_path / "evolm" / "config.json").read_text())
    assert hf_cfg["mlp_only_layers"] == [1] and hf_cfg["router_aux_loss_coef"] == pytest.approx(0.001)


def test_mixtral_checkpoint_names(tmp_path):
    _, model, _ = assert_parity(CASES["mixtral"](), tmp_path)
    assert model.cfg.moe.norm_topk and model.cfg.moe.aux_loss_coef == pytest.approx(0.002)
    with safe_open(str(tmp_path / "evolm" / "model.safetensors"), "pt") as f:
        saved = set(f.keys())
    assert {
        "model.layers.1.block_sparse_moe.experts.3.w2.weight",
        "model.layers.0.block_sparse_moe.gate.weight",
    } <= saved
    assert evolm.load_model(tmp_path / "evolm").cfg == model.cfg
