"""DeepSeek-V2/V3 (multi-head latent attention, DeepSeekMoE) against transformers: logits both ways,
cached decoding (absorbed) equal to the full forward, generation through ``evolm.infer``, the latent
cache's size and the checkpoint's multi-token prediction layers."""

from __future__ import annotations

import pytest
import torch
import transformers as T
from safetensors.torch import load_file, save_file

import evolm
from evolm.infer.generate import generate
from evolm.models.families.deepseek import build_mtp, mtp_state_from_hf
from evolm.nn.latent_cache import LatentCache
from evolm.nn.mla import MultiHeadLatentAttention
from evolm.nn.moe import MoE
from helpers import hf_parity
from helpers.hf_parity import assert_cached_equals_full, assert_parity

SMALL = dict(
    vocab_size=97,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    kv_lora_rank=16,
    q_lora_rank=24,
    qk_rope_head_dim=8,
    qk_nope_head_dim=16,
    v_head_dim=12,
    first_k_dense_replace=2,  # every layer dense
    max_position_embeddings=64,
)
YARN = {
    "rope_type": "yarn",
    "rope_theta": 10000.0,
    "factor": 4.0,
    "original_max_position_embeddings": 16,
    "mscale": 0.707,
    "mscale_all_dim": 1.0,
    "beta_fast": 32,
    "beta_slow": 1,
}

# Layer 0 dense, layers 1-2 DeepSeekMoE: 8 fine-grained experts in 4 groups, 2 per token, shared experts.
MOE = dict(
    SMALL,
    num_hidden_layers=3,
    first_k_dense_replace=1,
    moe_intermediate_size=32,
    n_routed_experts=8,
    num_experts_per_tok=2,
    n_shared_experts=1,
    n_group=4,
    topk_group=2,
)

CASES = {
    "v2-direct-q-bias": lambda: T.DeepseekV2Config(**{**SMALL, "q_lora_rank": None}, attention_bias=True),
    "v2-moe-greedy": lambda: T.DeepseekV2Config(**{**MOE, "n_shared_experts": 2}, routed_scaling_factor=1.5),
    "v2-moe-group-limited": lambda: T.DeepseekV2Config(**MOE, topk_method="group_limited_greedy"),
    "v3-moe": lambda: T.DeepseekV3Config(**MOE),
    "v3-moe-unnormalised-rotate-half-yarn": lambda: T.DeepseekV3Config(
        **{**MOE, "n_group": 2, "topk_group": 1}, norm_topk_prob=False, rope_interleave=False, rope_parameters=YARN
    ),
}


def build_hf(hf_config, seed: int = 0):
    """``hf_parity.build_hf`` plus a random DeepSeek-V3 balancing bias (a buffer, left at zero there),
    so the choice of experts depends on it."""
    model = _build_hf(hf_config, seed)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(torch.rand(buf.shape, generator=torch.Generator().manual_seed(seed)) * 0.5)
    return model


_build_hf = hf_parity.build_hf


@pytest.mark.parametrize("case", sorted(CASES))
def test_parity_with_transformers(case, tmp_path, monkeypatch):
    monkeypatch.setattr(hf_parity, "build_hf", build_hf)
    _, model, ids = assert_parity(CASES[case](), tmp_path, seq_len=13)
    assert all(isinstance(layer.self_attn, MultiHeadLatentAttention) for layer in model.model.layers)
    if "moe" in case:
        assert [isinstance(layer.mlp, MoE) for layer in model.model.layers] == [False, True, True]
    assert_cached_equals_full(model, ids)  # naive prefill, then absorbed single-token steps


def test_generate_matches_transformers_greedy_with_left_padding(tmp_path):
    hf = build_hf(T.DeepseekV3Config(**MOE, rope_parameters=YARN, bos_token_id=None, eos_token_id=None))
    hf.save_pretrained(tmp_path)
    model = evolm.load_model(tmp_path)
    ids = torch.randint(1, 97, (2, 7), generator=torch.Generator().manual_seed(3))
    ids[1, :3] = 0
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    ref = hf.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert torch.equal(generate(model, ids, 10, attention_mask=mask), ref)
    # cached generation equals recomputing the whole sequence for every token
    row = ids[:1]
    with torch.no_grad():
        for _ in range(10):
            row = torch.cat([row, model(row)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(generate(model, ids[:1], 10), row)


def test_latent_cache_is_smaller_than_a_key_value_cache(tmp_path):
    hf = build_hf(T.DeepseekV2Config(**SMALL))
    hf.save_pretrained(tmp_path)
    model = evolm.load_model(tmp_path)
    cache = model.new_cache(1, 32, dtype=torch.bfloat16)
    assert all(isinstance(c, LatentCache) for c in cache)
    per_token = sum(c.bytes_per_token() for c in cache)
    assert per_token == 2 * (16 + 8) * 2  # layers * (kv_lora_rank + qk_rope_head_dim) * bf16
    mha = 2 * 4 * (16 + 8 + 12) * 2  # the same heads as expanded keys and values
    assert per_token * 6 == mha


def test_checkpoint_mtp_layers_are_dropped_and_map_onto_the_mtp_module(tmp_path):
    cfg = T.DeepseekV3Config(**MOE, num_nextn_predict_layers=1)
    build_hf(cfg).save_pretrained(tmp_path)
    model = evolm.load_model(tmp_path)
    mtp = build_mtp(model.cfg)
    assert isinstance(mtp.depths[0].mtp_block.mlp, MoE)  # like the MoE layers before it
    state = load_file(tmp_path / "model.safetensors")
    # A checkpoint as DeepSeek ships it: layer n_layers is the MTP layer, with its own embedding/head copies.
    extra = {n.replace("layers.2.", "layers.3.", 1): t.clone() for n, t in state.items() if ".layers.2." in n}
    for name, module in (("enorm", mtp.depths[0].enorm), ("hnorm", mtp.depths[0].hnorm)):
        extra[f"model.layers.3.{name}.weight"] = torch.rand_like(module.weight)
    extra["model.layers.3.eh_proj.weight"] = torch.randn_like(mtp.depths[0].eh_proj.weight)
    extra["model.layers.3.shared_head.norm.weight"] = torch.rand(64)
    extra["model.layers.3.shared_head.head.weight"] = model.lm_head.weight.detach().clone()
    extra["model.layers.3.embed_tokens.weight"] = model.model.embed_tokens.weight.detach().clone()
    save_file({**state, **extra}, tmp_path / "model.safetensors", metadata={"format": "pt"})
    again = evolm.load_model(tmp_path)  # MTP tensors are not part of the causal LM
    ids = torch.randint(0, 97, (1, 6))
    with torch.no_grad():
        assert torch.equal(again(ids), model(ids))
    mtp.load_state_dict(mtp_state_from_hf({**state, **extra}, model.cfg), strict=True)
    assert torch.equal(mtp.depths[0].post_norm.weight, extra["model.layers.3.shared_head.norm.weight"])
    block = mtp.depths[0].mtp_block
    assert torch.equal(block.self_attn.kv_b_proj.weight, extra["model.layers.3.self_attn.kv_b_proj.weight"])
    assert torch.equal(block.mlp.experts.down_proj[5], extra["model.layers.3.mlp.experts.5.down_proj.weight"])
    assert evolm.save_model(again, tmp_path / "out")  # and the saved config keeps the MTP count
    assert '"num_nextn_predict_layers": 1' in (tmp_path / "out" / "config.json").read_text()
