"""Parity of the GPT-NeoX / Pythia family with transformers: per-head fused query_key_value,
partial rotary, parallel and sequential residuals."""

from __future__ import annotations

import json

import pytest
import torch
import transformers as T
from safetensors.torch import load_file, save_file

import evolm
from evolm.models.families.gpt_neox import fuse_qkv_per_head, split_qkv_per_head
from helpers.hf_parity import TOL, assert_cached_equals_full, assert_parity, build_hf, relative_error

SMALL = dict(
    vocab_size=97,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=64,
)

CASES = {
    "pythia-parallel": lambda: T.GPTNeoXConfig(**SMALL, rotary_pct=0.25),
    "sequential": lambda: T.GPTNeoXConfig(**SMALL, rotary_pct=0.25, use_parallel_residual=False),
    "full-rotary-base": lambda: T.GPTNeoXConfig(**SMALL, rotary_pct=1.0, rotary_emb_base=500.0),
    "tied-no-attn-bias": lambda: T.GPTNeoXConfig(
        **SMALL, rotary_pct=0.5, tie_word_embeddings=True, attention_bias=False
    ),
    "linear-rope": lambda: T.GPTNeoXConfig(
        **SMALL, rotary_pct=0.5, rope_scaling={"rope_type": "linear", "factor": 2.0}
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_parity_with_transformers(case, tmp_path):
    hf_config = CASES[case]()
    _, model, ids = assert_parity(hf_config, tmp_path, seq_len=13)
    assert_cached_equals_full(model, ids)


def test_config_fields(tmp_path):
    _, model, _ = assert_parity(CASES["pythia-parallel"](), tmp_path)
    cfg = model.cfg
    assert cfg.residual == "parallel" and not cfg.parallel_shared_norm
    assert cfg.attention.rope.rotary_dim == 4 and cfg.attention.head_dim == 16
    assert cfg.mlp.activation == "gelu" and not cfg.tie_embeddings
    saved = json.loads((tmp_path / "evolm" / "config.json").read_text())
    assert saved["rotary_pct"] == 0.25 and saved["use_parallel_residual"] is True


def test_legacy_config_and_buffers(tmp_path):
    """Pythia as published: rotary_pct / rotary_emb_base in config.json and saved
    ``attention.bias`` / ``attention.masked_bias`` / ``rotary_emb.inv_freq`` buffers."""
    hf_config = CASES["full-rotary-base"]()
    hf = build_hf(hf_config)
    hf.save_pretrained(tmp_path)
    cfg_path = tmp_path / "config.json"
    raw = json.loads(cfg_path.read_text())
    raw.pop("rope_parameters")
    raw.update(rotary_pct=1.0, rotary_emb_base=500.0)
    cfg_path.write_text(json.dumps(raw))
    path = tmp_path / "model.safetensors"
    state = load_file(path)
    for i in range(hf_config.num_hidden_layers):
        pre = f"gpt_neox.layers.{i}.attention."
        state[pre + "bias"] = torch.tril(torch.ones(64, 64, dtype=torch.bool))[None, None]
        state[pre + "masked_bias"] = torch.tensor(-1e9)
        state[pre + "rotary_emb.inv_freq"] = torch.ones(8)
    save_file(state, path, metadata={"format": "pt"})
    model = evolm.load_model(tmp_path)
    assert model.cfg.attention.rope.theta == 500.0 and model.cfg.attention.rope.rotary_dim == 16
    ids = torch.randint(0, hf_config.vocab_size, (2, 9))
    with torch.no_grad():
        assert relative_error(model(ids), hf(ids).logits) <= TOL


def test_default_rotary_pct_is_a_quarter(tmp_path):
    """A config with no rotary fraction at all gets GPT-NeoX's default 0.25, as transformers does."""
    hf = build_hf(T.GPTNeoXConfig(**SMALL))
    hf.save_pretrained(tmp_path)
    cfg_path = tmp_path / "config.json"
    raw = json.loads(cfg_path.read_text())
    raw.pop("rope_parameters")
    cfg_path.write_text(json.dumps(raw))
    assert evolm.load_model(tmp_path).cfg.attention.rope.rotary_dim == 4


def test_qkv_split_layout():
    """Rows of the fused projection are [head, (q, k, v), head_dim]."""
    h, d, c = 3, 2, 5
    w = torch.arange(3 * h * d * c, dtype=torch.float32).view(3 * h * d, c)
    q, k, v = split_qkv_per_head(w, h)
    for head in range(h):
        base = head * 3 * d
        assert torch.equal(q[head * d : (head + 1) * d], w[base : base + d])
        assert torch.equal(k[head * d : (head + 1) * d], w[base + d : base + 2 * d])
        assert torch.equal(v[head * d : (head + 1) * d], w[base + 2 * d : base + 3 * d])
    assert torch.equal(fuse_qkv_per_head(q, k, v, h), w)
    b = torch.arange(3 * h * d, dtype=torch.float32)
    assert torch.equal(fuse_qkv_per_head(*split_qkv_per_head(b, h), h), b)
