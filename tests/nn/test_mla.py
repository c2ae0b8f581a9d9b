"""Multi-head latent attention: absorbed decode equals the naive form, the latent cache, DeepSeek's
interleaved RoPE and YaRN softmax scale against closed forms, and cache bytes per token."""

from __future__ import annotations

import math

import pytest
import torch

from evolm.errors import ConfigError
from evolm.nn.attention import AttentionMask
from evolm.nn.latent_cache import LatentCache
from evolm.nn.mla import MLAConfig, MultiHeadLatentAttention, apply_rope_interleaved, make_attention
from evolm.nn.rope import RopeConfig, RopeScaling, rope_cos_sin
from evolm.nn.self_attention import AttentionConfig, SelfAttention

C = 32


def _cfg(**changes) -> MLAConfig:
    fields = dict(
        n_heads=4,
        kv_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=4,
        v_head_dim=6,
        rope=RopeConfig(rotary_dim=4),
        q_lora_rank=12,
    )
    fields.update(changes)
    return MLAConfig(**fields)


CONFIGS = {
    "q-lora-interleaved": _cfg(),
    "direct-q-bias-rotate-half": _cfg(q_lora_rank=None, bias=True, rope_interleave=False),
    "yarn": _cfg(
        rope=RopeConfig(
            rotary_dim=4,
            scaling=RopeScaling("yarn", factor=4.0, original_max_position=4, mscale=0.7, mscale_all_dim=1.0),
        )
    ),
}


def _layer(cfg: MLAConfig, seed: int = 0) -> MultiHeadLatentAttention:
    torch.manual_seed(seed)
    layer = MultiHeadLatentAttention(C, cfg)
    with torch.no_grad():
        for p in layer.parameters():  # norms and biases away from their identity values
            p.add_(torch.randn_like(p) * 0.1)
    return layer.eval()


def _run(
    layer: MultiHeadLatentAttention, x: torch.Tensor, prefix: int, absorb: str
) -> tuple[torch.Tensor, LatentCache]:
    """Prefill ``prefix`` tokens, then decode the rest one token at a time; outputs concatenated."""
    layer.absorb = absorb
    b, t, _ = x.shape
    cfg = layer.cfg
    cache = LatentCache(b, t, cfg.kv_lora_rank, cfg.qk_rope_head_dim)
    pos = torch.arange(t)[None].expand(b, t)
    outs = []
    for lo, hi in [(0, prefix)] + [(i, i + 1) for i in range(prefix, t)]:
        q_index = torch.arange(lo, hi)
        mask = AttentionMask(q_index=q_index, k_index=cache.key_index(hi - lo))
        outs.append(layer(x[:, lo:hi], mask, rope_cos_sin(cfg.rope, pos[:, lo:hi]), cache))
    return torch.cat(outs, dim=1), cache


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_absorbed_decode_equals_naive_and_uncached(name):
    cfg = CONFIGS[name]
    layer = _layer(cfg)
    x = torch.randn(2, 9, C)
    t = x.shape[1]
    with torch.no_grad():
        layer.absorb = "never"
        full = layer(
            x,
            AttentionMask(q_index=torch.arange(t), k_index=torch.arange(t)),
            rope_cos_sin(cfg.rope, torch.arange(t)[None].expand(2, t)),
        )
        naive, _ = _run(layer, x, prefix=4, absorb="never")
        absorbed, cache = _run(layer, x, prefix=4, absorb="always")  # prefill absorbed too
        auto, _ = _run(layer, x, prefix=4, absorb="auto")  # naive prefill, absorbed decode
    scale = full.abs().max()
    for got in (naive, absorbed, auto):
        assert ((got - full).abs().max() / scale).item() < 1e-5
    assert cache.length == t and cache.c_kv.shape == (2, t, cfg.kv_lora_rank) and cache.k_rope.shape == (2, t, 4)


def test_cache_holds_the_normalised_latent_and_rotated_rope_key():
    cfg = _cfg(rope_interleave=False)
    layer = _layer(cfg)
    x = torch.randn(1, 5, C)
    _, cache = _run(layer, x, prefix=5, absorb="auto")
    with torch.no_grad():
        c, k = layer.kv_a_proj_with_mqa(x).split([cfg.kv_lora_rank, cfg.qk_rope_head_dim], dim=-1)
        cos, sin = rope_cos_sin(cfg.rope, torch.arange(5)[None])
        k1, k2 = k.chunk(2, dim=-1)
        k_rot = k * cos + torch.cat((-k2, k1), dim=-1) * sin  # rotate-half RoPE by hand
    torch.testing.assert_close(cache.c_kv, layer.kv_a_layernorm(c).detach())
    torch.testing.assert_close(cache.k_rope, k_rot)


def test_latent_cache_interface():
    cache = LatentCache(2, 6, kv_lora_rank=4, rope_dim=2, dtype=torch.bfloat16)
    assert cache.max_len == 6 and cache.length == 0 and cache.bytes_per_token() == (4 + 2) * 2
    rows, index = cache.update(torch.ones(2, 4, 6))
    assert rows.shape == (2, 4, 6) and index.tolist() == [0, 1, 2, 3]
    assert cache.key_index(1).tolist() == [0, 1, 2, 3, 4]
    cache.truncate(2)
    rows, index = cache.update(torch.full((2, 1, 6), 2.0))
    assert cache.length == 3 and rows[:, 2].eq(2).all() and index.tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="truncate"):
        cache.truncate(4)
    with pytest.raises(ValueError, match="overflow"):
        cache.update(torch.zeros(2, 4, 6))
    with pytest.raises(ValueError, match="do not fit"):
        cache.update(torch.zeros(2, 1, 5))
    assert cache.length == 3


def test_interleaved_rope_is_complex_rotation_of_adjacent_pairs():
    """DeepSeek-V2's reference: view channel pairs (2i, 2i+1) as complex numbers, multiply by e^{i theta}."""
    x = torch.randn(2, 3, 5, 8)
    pos = torch.arange(5)[None].expand(2, 5)
    cfg = RopeConfig(theta=10000.0, rotary_dim=8)
    cos, sin = rope_cos_sin(cfg, pos)
    got = apply_rope_interleaved(x, cos, sin)
    inv = 1.0 / 10000.0 ** (torch.arange(0, 8, 2).float() / 8)
    freqs = torch.polar(torch.ones(5, 4), pos[0, :, None].float() * inv)  # (T, 4)
    ref = torch.view_as_real(torch.view_as_complex(x.reshape(2, 3, 5, 4, 2)) * freqs).flatten(3)  # interleaved
    perm = torch.cat([torch.arange(0, 8, 2), torch.arange(1, 8, 2)])  # evens then odds
    torch.testing.assert_close(got, ref[..., perm])


def test_softmax_scale_with_yarn_mscale():
    plain = _cfg()
    assert plain.softmax_scale == pytest.approx(12**-0.5)
    yarn = CONFIGS["yarn"]
    m = 0.1 * 1.0 * math.log(4.0) + 1.0
    assert yarn.softmax_scale == pytest.approx(12**-0.5 * m * m)


def test_config_validation_and_dispatch():
    with pytest.raises(ConfigError, match="rotary_dim"):
        _cfg(rope=RopeConfig(rotary_dim=8))
    with pytest.raises(ConfigError, match="kv_lora_rank"):
        _cfg(kv_lora_rank=0)
    cfg = _cfg()
    assert cfg.head_dim == 12 and cfg.n_kv_heads == 4 and cfg.cache_values_per_token == 20
    assert isinstance(make_attention(cfg, C), MultiHeadLatentAttention)
    gqa = AttentionConfig(n_heads=4, n_kv_heads=2, head_dim=8, rope=RopeConfig(rotary_dim=8))
    assert isinstance(make_attention(gqa, C), SelfAttention)
    names = {n for n, _ in make_attention(cfg, C).named_parameters()}
    assert {"q_a_proj.weight", "q_b_proj.weight", "kv_a_proj_with_mqa.weight", "kv_b_proj.weight"} <= names
