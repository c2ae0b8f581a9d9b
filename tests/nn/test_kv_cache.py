"""KVCache and SelfAttention: prefill plus token-by-token decoding equals the uncached forward."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from evolm.errors import ConfigError
from evolm.nn.attention import AttentionMask
from evolm.nn.kv_cache import KVCache
from evolm.nn.rope import RopeConfig, RopeScaling, rope_cos_sin
from evolm.nn.self_attention import AttentionConfig, SelfAttention

C = 32  # model width

CONFIGS = {
    "rope-gqa-qknorm-head": AttentionConfig(
        n_heads=4, n_kv_heads=2, head_dim=8, qk_norm="head", rope=RopeConfig(theta=10000.0, rotary_dim=8)
    ),
    "rope-partial-mqa-bias": AttentionConfig(
        n_heads=4, n_kv_heads=1, head_dim=16, qkv_bias=True, out_bias=True, rope=RopeConfig(rotary_dim=4)
    ),
    "rope-yarn-qknorm-full-clip": AttentionConfig(
        n_heads=4,
        n_kv_heads=4,
        head_dim=8,
        qk_norm="full",
        clip_qkv=0.5,
        rope=RopeConfig(rotary_dim=8, scaling=RopeScaling("yarn", factor=4.0, original_max_position=4)),
    ),
    "rope-softcap-scale": AttentionConfig(
        n_heads=4, n_kv_heads=2, head_dim=8, softcap=3.0, scale=0.5, rope=RopeConfig(rotary_dim=8)
    ),
    "alibi": AttentionConfig(n_heads=6, n_kv_heads=6, head_dim=8, position="alibi"),
    "none": AttentionConfig(n_heads=4, n_kv_heads=2, head_dim=8, position="none"),
}


def _layer(cfg: AttentionConfig, seed: int = 0) -> SelfAttention:
    torch.manual_seed(seed)
    layer = SelfAttention(C, cfg).eval()
    with torch.no_grad():
        for p in layer.parameters():  # non-trivial norm weights and biases
            p.add_(torch.randn_like(p) * 0.3)
    return layer


def _rope(cfg: AttentionConfig, positions: torch.Tensor):
    return rope_cos_sin(cfg.rope, positions) if cfg.position == "rope" else None


def _run_cached(layer, x, mask_kw, positions, key_valid=None, prefill=5, max_len=None):
    """Prefill ``prefill`` tokens, then feed the rest one at a time; returns (B, T, C)."""
    b, t, _ = x.shape
    cfg = layer.cfg
    cache = KVCache(b, cfg.n_kv_heads, max_len or t, cfg.head_dim)
    outs, start = [], 0
    for stop in [prefill, *range(prefill + 1, t + 1)]:
        q_index = torch.arange(start, stop)
        mask = AttentionMask(
            q_index=q_index,
            k_index=q_index,  # replaced by the cache's slot indices
            key_valid=None if key_valid is None else key_valid[:, :stop],
            **mask_kw,
        )
        outs.append(layer(x[:, start:stop], mask, _rope(cfg, positions[:, start:stop]), cache=cache))
        assert cache.length == stop
        start = stop
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_cached_decoding_equals_full_forward(name, window):
    cfg = CONFIGS[name]
    layer = _layer(cfg)
    b, t = 2, 11
    x = torch.randn(b, t, C, generator=torch.Generator().manual_seed(1))
    positions = torch.arange(t).expand(b, t)
    with torch.no_grad():
        full = layer(
            x, AttentionMask(q_index=torch.arange(t), k_index=torch.arange(t), window=window), _rope(cfg, positions)
        )
        inc = _run_cached(layer, x, {"window": window}, positions)
    assert full.shape == inc.shape == (b, t, C)
    torch.testing.assert_close(inc, full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["rope-gqa-qknorm-head", "alibi"])
def test_cached_decoding_with_left_padding(name):
    """Row 1 is left-padded by 3; its positions start at 0 on its first real token."""
    cfg = CONFIGS[name]
    layer = _layer(cfg)
    b, t, pad = 2, 10, 3
    x = torch.randn(b, t, C, generator=torch.Generator().manual_seed(2))
    valid = torch.ones(b, t, dtype=torch.bool)
    valid[1, :pad] = False
    positions = (valid.long().cumsum(-1) - 1).clamp_min(0)  # (B, T)
    with torch.no_grad():
        full = layer(
            x,
            AttentionMask(q_index=torch.arange(t), k_index=torch.arange(t), key_valid=valid),
            _rope(cfg, positions),
        )
        inc = _run_cached(layer, x, {}, positions, key_valid=valid, prefill=pad + 2, max_len=t + 4)
        # The real tokens of the padded row equal the same tokens run alone without padding.
        alone = layer(
            x[1:, pad:],
            AttentionMask(q_index=torch.arange(t - pad), k_index=torch.arange(t - pad)),
            _rope(cfg, torch.arange(t - pad)[None]),
        )
    # Padding queries see nothing; their (finite, never read) output may differ between the two layouts.
    torch.testing.assert_close(inc[valid], full[valid], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(full[1:, pad:], alone, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(full).all() and torch.isfinite(inc).all()


def test_bf16_layer_accepts_float32_rope_tables():
    """Tables built in float32 (the default of rope_cos_sin) on a bf16 layer keep q, k, v in bf16."""
    cfg = CONFIGS["rope-gqa-qknorm-head"]
    layer = _layer(cfg)
    x = torch.randn(2, 6, C, generator=torch.Generator().manual_seed(3))
    mask = AttentionMask(q_index=torch.arange(6), k_index=torch.arange(6))
    positions = torch.arange(6).expand(2, 6)
    with torch.no_grad():
        ref = layer(x, mask, _rope(cfg, positions))
        out = layer.bfloat16()(x.bfloat16(), mask, _rope(cfg, positions))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=5e-2, atol=5e-2)


def test_kv_cache_update_returns_everything_so_far():
    cache = KVCache(2, 3, 6, 4, v_head_dim=5)
    assert cache.max_len == 6 and cache.length == 0
    k1, v1 = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 5)
    keys, values, idx = cache.update(k1, v1)
    assert torch.equal(keys, k1) and torch.equal(values, v1) and torch.equal(idx, torch.arange(4))
    k2, v2 = torch.randn(2, 3, 2, 4), torch.randn(2, 3, 2, 5)
    keys, values, idx = cache.update(k2, v2)
    assert keys.shape == (2, 3, 6, 4) and values.shape == (2, 3, 6, 5)
    assert torch.equal(keys, torch.cat((k1, k2), 2)) and torch.equal(values, torch.cat((v1, v2), 2))
    assert torch.equal(idx, torch.arange(6)) and cache.length == 6


def test_kv_cache_dtype():
    cache = KVCache(1, 2, 4, 8, dtype=torch.bfloat16)
    keys, values, _ = cache.update(torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8))
    assert keys.dtype == values.dtype == torch.bfloat16


def test_kv_cache_overflow_is_a_clear_error():
    cache = KVCache(1, 2, 4, 8)
    cache.update(torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8))
    with pytest.raises(ValueError, match=r"KV cache overflow: 3 cached \+ 2 new tokens > max_len=4"):
        cache.update(torch.randn(1, 2, 2, 8), torch.randn(1, 2, 2, 8))
    assert cache.length == 3  # a failed update leaves the cache as it was
    cache.update(torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8))
    assert cache.length == 4


@pytest.mark.parametrize(
    ("k_shape", "v_shape"),
    [
        ((1, 2, 1, 8), (1, 2, 1, 8)),
        ((2, 1, 1, 8), (2, 1, 1, 8)),
        ((2, 2, 1, 4), (2, 2, 1, 8)),
        ((2, 2, 1, 8), (2, 2, 2, 8)),
    ],
    ids=["batch", "kv-heads", "head-dim", "values-length"],
)
def test_kv_cache_rejects_mismatched_shapes(k_shape, v_shape):
    """A batch-1 update must not broadcast silently into a batch-2 cache (or any other mismatch)."""
    cache = KVCache(2, 2, 4, 8)
    with pytest.raises(ValueError, match="do not fit a cache"):
        cache.update(torch.randn(k_shape), torch.randn(v_shape))
    assert cache.length == 0


def test_self_attention_overflow_through_the_layer():
    cfg = CONFIGS["rope-gqa-qknorm-head"]
    layer = _layer(cfg)
    cache = KVCache(1, cfg.n_kv_heads, 3, cfg.head_dim)
    x = torch.randn(1, 4, C)
    mask = AttentionMask(q_index=torch.arange(4), k_index=torch.arange(4))
    with pytest.raises(ValueError, match="allocate the cache with a larger max_len"):
        layer(x, mask, _rope(cfg, torch.arange(4)[None]), cache=cache)


def test_projection_names_and_shapes():
    layer = SelfAttention(C, CONFIGS["rope-gqa-qknorm-head"])
    shapes = {name: tuple(p.shape) for name, p in layer.named_parameters()}
    assert shapes == {
        "q_proj.weight": (32, C),
        "k_proj.weight": (16, C),
        "v_proj.weight": (16, C),
        "o_proj.weight": (C, 32),
        "q_norm.weight": (8,),
        "k_norm.weight": (8,),
    }
    full = SelfAttention(C, CONFIGS["rope-yarn-qknorm-full-clip"])
    assert full.q_norm.weight.shape == (32,) and full.k_norm.weight.shape == (32,)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(n_heads=0, n_kv_heads=1, head_dim=8, position="none"), "n_heads=0"),
        (dict(n_heads=4, n_kv_heads=0, head_dim=8, position="none"), "n_kv_heads=0"),
        (dict(n_heads=4, n_kv_heads=2, head_dim=-1, position="none"), "head_dim=-1"),
        (dict(n_heads=6, n_kv_heads=4, head_dim=8, position="none"), "n_heads=6 is not a multiple of n_kv_heads=4"),
        (dict(n_heads=4, n_kv_heads=4, head_dim=8, position="learned"), "attention.position='learned'"),
        (dict(n_heads=4, n_kv_heads=4, head_dim=8), "needs attention.rope"),
        (dict(n_heads=4, n_kv_heads=4, head_dim=8, rope=RopeConfig(rotary_dim=16)), "rotary_dim=16 exceeds head_dim=8"),
        (dict(n_heads=4, n_kv_heads=4, head_dim=8, position="none", qk_norm="layer"), "qk_norm='layer'"),
    ],
)
def test_attention_config_validation(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        AttentionConfig(**kwargs)


def test_config_is_frozen():
    cfg = CONFIGS["alibi"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.n_heads = 2  # type: ignore[misc]


@pytest.mark.parametrize("window", [1, 3, 6])
@pytest.mark.parametrize("chunks", [[9], [2, 1, 1, 5], [7, 2], [1] * 9])
def test_rolling_cache_equals_full_attention_with_window(window, chunks):
    """A ring of `window` slots gives the same outputs as attending over the whole history."""
    from evolm.nn.kv_cache import RollingKVCache

    cfg = CONFIGS["rope-gqa-qknorm-head"]
    layer = _layer(cfg)
    t = sum(chunks)
    x = torch.randn(2, t, C)
    positions = torch.arange(t)[None].expand(2, t)
    full_mask = AttentionMask(q_index=torch.arange(t), k_index=torch.arange(t), window=window)
    with torch.no_grad():
        full = layer(x, full_mask, _rope(cfg, positions))
        cache = RollingKVCache(2, cfg.n_kv_heads, window, cfg.head_dim)
        outs, start = [], 0
        for n in chunks:
            q_index = torch.arange(start, start + n)
            mask = AttentionMask(q_index=q_index, k_index=cache.key_index(n), window=window)
            outs.append(layer(x[:, start : start + n], mask, _rope(cfg, positions[:, start : start + n]), cache=cache))
            start += n
    assert cache.k.shape[2] == window  # memory is O(window)
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-5, rtol=1e-5)


def test_model_caches_are_rolling_for_sliding_layers_only():
    from evolm.models.config import DecoderConfig
    from evolm.models.decoder import CausalLM
    from evolm.nn.kv_cache import KVCache, RollingKVCache
    from evolm.nn.mlp import MLPConfig
    from evolm.nn.rope import RopeConfig

    cfg = DecoderConfig(
        family="gemma2",
        vocab_size=50,
        hidden_size=32,
        n_layers=4,
        max_seq_len=64,
        attention=AttentionConfig(n_heads=4, n_kv_heads=2, head_dim=8, rope=RopeConfig(rotary_dim=8)),
        mlp=MLPConfig(hidden_size=48),
        sliding_window=4,
        layer_types=("sliding", "full", "sliding", "full"),
    )
    model = CausalLM(cfg).eval()
    caches = model.new_cache(1, 32)
    assert [type(c) for c in caches] == [RollingKVCache, KVCache, RollingKVCache, KVCache]
    assert caches[0].k.shape[2] == 4 and caches[1].k.shape[2] == 32
    ids = torch.randint(0, 50, (1, 20))
    with torch.no_grad():
        full = model(ids)
        steps = [model(ids[:, :6], cache=caches)] + [model(ids[:, i : i + 1], cache=caches) for i in range(6, 20)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)
    assert [type(c) for c in model.new_cache(1, 4)] == [KVCache] * 4  # window >= max_len: nothing to roll
