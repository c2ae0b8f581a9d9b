"""Rotary position embedding (Su et al., 2021): frequencies vs transformers, rotation vs closed forms."""

from __future__ import annotations

import math

import pytest
import torch
import transformers as T
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

from evolm.errors import ConfigError
from evolm.nn.rope import RopeConfig, RopeScaling, apply_rope, inverse_frequencies, rope_cos_sin


def _llama(head_dim: int, rope_parameters: dict, max_pos: int = 64) -> T.LlamaConfig:
    return T.LlamaConfig(
        hidden_size=4 * head_dim,
        num_attention_heads=4,
        head_dim=head_dim,
        max_position_embeddings=max_pos,
        rope_parameters=rope_parameters,
    )


def _phi3(head_dim: int, rope_parameters: dict, partial: float = 1.0, max_pos: int = 64, orig: int = 16):
    return T.Phi3Config(
        hidden_size=4 * head_dim,
        num_attention_heads=4,
        max_position_embeddings=max_pos,
        original_max_position_embeddings=orig,
        partial_rotary_factor=partial,
        rope_parameters=rope_parameters,
    )


SHORT = tuple(1.0 + 0.25 * i for i in range(8))  # longrope factors for rotary_dim 16
LONG = tuple(2.0 + 1.5 * i for i in range(8))

# id -> (transformers config, HF rope type (None: the model's default), evolm RopeConfig, seq_lens to query)
CASES = {
    "default": (
        lambda: _phi3(32, {"rope_type": "default", "rope_theta": 10000.0}),
        None,
        RopeConfig(theta=10000.0, rotary_dim=32),
        (1,),
    ),
    "default-partial": (
        lambda: _phi3(32, {"rope_type": "default", "rope_theta": 500000.0}, partial=0.25),
        None,
        RopeConfig(theta=500000.0, rotary_dim=8),
        (1,),
    ),
    "linear": (
        lambda: _llama(32, {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}),
        "linear",
        RopeConfig(theta=10000.0, rotary_dim=32, scaling=RopeScaling("linear", factor=4.0)),
        (1,),
    ),
    "linear-partial": (
        lambda: _llama(32, {"rope_type": "linear", "rope_theta": 1e6, "factor": 2.5, "partial_rotary_factor": 0.5}),
        "linear",
        RopeConfig(theta=1e6, rotary_dim=16, scaling=RopeScaling("linear", factor=2.5)),
        (1,),
    ),
    "dynamic": (
        lambda: _llama(32, {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 4.0}, max_pos=16),
        "dynamic",
        RopeConfig(theta=10000.0, rotary_dim=32, scaling=RopeScaling("dynamic", factor=4.0, original_max_position=16)),
        (1, 8, 16, 17, 40, 1000),
    ),
    "dynamic-partial": (
        lambda: _llama(
            32, {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0, "partial_rotary_factor": 0.5}, max_pos=16
        ),
        "dynamic",
        RopeConfig(theta=10000.0, rotary_dim=16, scaling=RopeScaling("dynamic", factor=2.0, original_max_position=16)),
        (5, 16, 33),
    ),
    "llama3-small-context": (
        lambda: _llama(
            32,
            {
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
        ),
        "llama3",
        RopeConfig(
            theta=500000.0,
            rotary_dim=32,
            scaling=RopeScaling("llama3", factor=8.0, original_max_position=16),
        ),
        (1,),
    ),
    "llama3.1-8b": (
        lambda: _llama(
            128,
            {
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            },
            max_pos=131072,
        ),
        "llama3",
        RopeConfig(
            theta=500000.0, rotary_dim=128, scaling=RopeScaling("llama3", factor=8.0, original_max_position=8192)
        ),
        (1,),
    ),
    "llama3-partial": (
        lambda: _llama(
            32,
            {
                "rope_type": "llama3",
                "rope_theta": 10000.0,
                "factor": 4.0,
                "low_freq_factor": 2.0,
                "high_freq_factor": 8.0,
                "original_max_position_embeddings": 64,
                "partial_rotary_factor": 0.5,
            },
        ),
        "llama3",
        RopeConfig(
            theta=10000.0,
            rotary_dim=16,
            scaling=RopeScaling(
                "llama3", factor=4.0, original_max_position=64, low_freq_factor=2.0, high_freq_factor=8.0
            ),
        ),
        (1,),
    ),
    "yarn": (
        lambda: _llama(
            32, {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16}
        ),
        "yarn",
        RopeConfig(theta=10000.0, rotary_dim=32, scaling=RopeScaling("yarn", factor=4.0, original_max_position=16)),
        (1,),
    ),
    "yarn-partial-betas-no-truncate": (
        lambda: _llama(
            32,
            {
                "rope_type": "yarn",
                "rope_theta": 10000.0,
                "factor": 8.0,
                "original_max_position_embeddings": 4096,
                "beta_fast": 16.0,
                "beta_slow": 2.0,
                "truncate": False,
                "partial_rotary_factor": 0.5,
            },
            max_pos=32768,
        ),
        "yarn",
        RopeConfig(
            theta=10000.0,
            rotary_dim=16,
            scaling=RopeScaling(
                "yarn", factor=8.0, original_max_position=4096, beta_fast=16.0, beta_slow=2.0, truncate=False
            ),
        ),
        (1,),
    ),
    "yarn-mscale": (  # DeepSeek-V3 style: attention factor from mscale / mscale_all_dim
        lambda: _llama(
            64,
            {
                "rope_type": "yarn",
                "rope_theta": 10000.0,
                "factor": 40.0,
                "original_max_position_embeddings": 4096,
                "mscale": 1.0,
                "mscale_all_dim": 0.5,
            },
        ),
        "yarn",
        RopeConfig(
            theta=10000.0,
            rotary_dim=64,
            scaling=RopeScaling("yarn", factor=40.0, original_max_position=4096, mscale=1.0, mscale_all_dim=0.5),
        ),
        (1,),
    ),
    "yarn-attention-factor": (
        lambda: _llama(
            32,
            {
                "rope_type": "yarn",
                "rope_theta": 1e6,
                "factor": 4.0,
                "original_max_position_embeddings": 64,
                "attention_factor": 1.3,
            },
        ),
        "yarn",
        RopeConfig(
            theta=1e6,
            rotary_dim=32,
            scaling=RopeScaling("yarn", factor=4.0, original_max_position=64, attention_factor=1.3),
        ),
        (1,),
    ),
    "longrope-partial": (  # Phi-3 style: factor implied by max_position / original_max_position
        lambda: _phi3(
            32,
            {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": list(SHORT), "long_factor": list(LONG)},
            partial=0.5,
            max_pos=64,
            orig=16,
        ),
        "longrope",
        RopeConfig(
            theta=10000.0,
            rotary_dim=16,
            scaling=RopeScaling("longrope", factor=4.0, original_max_position=16, short_factor=SHORT, long_factor=LONG),
        ),
        (1, 16, 17, 64),
    ),
    "longrope-attention-factor": (
        lambda: _phi3(
            16,
            {
                "rope_type": "longrope",
                "rope_theta": 10000.0,
                "short_factor": list(SHORT),
                "long_factor": list(LONG),
                "attention_factor": 0.9,
            },
            orig=16,
        ),
        "longrope",
        RopeConfig(
            theta=10000.0,
            rotary_dim=16,
            scaling=RopeScaling(
                "longrope",
                factor=4.0,
                original_max_position=16,
                attention_factor=0.9,
                short_factor=SHORT,
                long_factor=LONG,
            ),
        ),
        (10, 100),
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_inverse_frequencies_match_transformers(case):
    make_hf, hf_type, cfg, seq_lens = CASES[case]
    hf_config = make_hf()
    for seq_len in seq_lens:
        if hf_type is None:
            ref_inv, ref_attn = Phi3RotaryEmbedding.compute_default_rope_parameters(hf_config)
        else:
            ref_inv, ref_attn = ROPE_INIT_FUNCTIONS[hf_type](hf_config, None, seq_len=seq_len)
        inv, attn = inverse_frequencies(cfg, seq_len)
        assert inv.dtype == torch.float32
        assert inv.shape == (cfg.rotary_dim // 2,)
        torch.testing.assert_close(inv, ref_inv.float(), rtol=1e-6, atol=0, msg=f"{case} seq_len={seq_len}")
        assert attn == pytest.approx(float(ref_attn), rel=1e-12), f"{case} seq_len={seq_len}"


def test_default_frequencies_closed_form():
    """theta_i = base^(-2i/d) (Su et al., 2021, eq. 15)."""
    inv, attn = inverse_frequencies(RopeConfig(theta=10000.0, rotary_dim=16), seq_len=1)
    ref = torch.tensor([10000.0 ** (-2 * i / 16) for i in range(8)])
    torch.testing.assert_close(inv, ref, rtol=1e-6, atol=0)
    assert attn == 1.0


def test_scaling_regimes_switch_on_length():
    """dynamic equals default up to the original context and lowers every non-zero frequency past it;
    longrope picks its short factors up to the original context and its long ones past it."""
    base = RopeConfig(theta=10000.0, rotary_dim=16)
    dyn = RopeConfig(theta=10000.0, rotary_dim=16, scaling=RopeScaling("dynamic", factor=2.0, original_max_position=8))
    torch.testing.assert_close(inverse_frequencies(dyn, 8)[0], inverse_frequencies(base, 8)[0], rtol=0, atol=0)
    grown, _ = inverse_frequencies(dyn, 9)
    assert grown[0] == 1.0 and (grown[1:] < inverse_frequencies(base, 9)[0][1:]).all()

    lr = RopeConfig(
        theta=10000.0,
        rotary_dim=16,
        scaling=RopeScaling("longrope", factor=4.0, original_max_position=16, short_factor=SHORT, long_factor=LONG),
    )
    plain = inverse_frequencies(base, 1)[0]
    torch.testing.assert_close(inverse_frequencies(lr, 16)[0], plain / torch.tensor(SHORT))
    torch.testing.assert_close(inverse_frequencies(lr, 17)[0], plain / torch.tensor(LONG))


def _complex_rope_reference(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, scale: float):
    """Naive RoPE in float64 as a complex rotation of the pairs (i, i + R/2) of each head.

    x: (B, H, T, D); positions: (B, T); inv_freq: (R/2,). Channels >= R are copied unchanged.
    """
    b, h, t, _ = x.shape
    half = inv_freq.numel()
    out = x.double().clone()
    for bi in range(b):
        for ti in range(t):
            for i in range(half):
                angle = positions[bi, ti].item() * inv_freq[i].item()
                rot = complex(math.cos(angle), math.sin(angle)) * scale
                for hi in range(h):
                    z = complex(x[bi, hi, ti, i].item(), x[bi, hi, ti, i + half].item()) * rot
                    out[bi, hi, ti, i], out[bi, hi, ti, i + half] = z.real, z.imag
    return out


@pytest.mark.parametrize(
    "cfg",
    [
        RopeConfig(theta=10000.0, rotary_dim=16),
        RopeConfig(theta=10000.0, rotary_dim=6),  # partial: 10 of 16 channels pass through
        RopeConfig(theta=500.0, rotary_dim=8, scaling=RopeScaling("yarn", factor=4.0, original_max_position=8)),
    ],
    ids=["full", "partial", "yarn-temperature"],
)
def test_apply_rope_equals_complex_rotation(cfg):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 16)
    positions = torch.tensor([[0, 1, 2, 3, 4], [7, 9, 10, 11, 30]])
    cos, sin = rope_cos_sin(cfg, positions)
    assert cos.shape == sin.shape == (2, 5, cfg.rotary_dim)
    out = apply_rope(x, cos, sin)
    assert out.shape == x.shape and out.dtype == x.dtype

    inv_freq = torch.tensor([cfg.theta ** (-2 * i / cfg.rotary_dim) for i in range(cfg.rotary_dim // 2)])
    if cfg.scaling is not None:
        inv_freq, scale = inverse_frequencies(cfg, int(positions.max()) + 1)
    else:
        scale = 1.0
    ref = _complex_rope_reference(x, positions, inv_freq.double(), scale)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(out[..., cfg.rotary_dim :], x[..., cfg.rotary_dim :])  # pass-through channels untouched


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_apply_rope_matches_transformers_and_keeps_dtype(dtype):
    """Same as transformers' rotate-half RoPE; float32 tables on bf16 activations give bf16, as there."""
    torch.manual_seed(3)
    cfg = RopeConfig(theta=10000.0, rotary_dim=16)
    q, k = torch.randn(2, 4, 5, 16).to(dtype), torch.randn(2, 2, 5, 16).to(dtype)
    cos, sin = rope_cos_sin(cfg, torch.arange(5).expand(2, 5) + 3)  # float32 tables
    ref_q, ref_k = apply_rotary_pos_emb(q, k, cos.to(dtype), sin.to(dtype))
    out_q, out_k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    assert out_q.dtype == out_k.dtype == dtype
    torch.testing.assert_close(out_q, ref_q, rtol=0, atol=0)
    torch.testing.assert_close(out_k, ref_k, rtol=0, atol=0)


def test_rotation_preserves_norm_and_position_zero_is_identity():
    torch.manual_seed(1)
    cfg = RopeConfig(theta=10000.0, rotary_dim=32)
    x = torch.randn(1, 4, 6, 32)
    positions = torch.tensor([[0, 3, 17, 100, 1000, 4095]])
    out = apply_rope(x, *rope_cos_sin(cfg, positions))
    torch.testing.assert_close(out.norm(dim=-1), x.norm(dim=-1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[:, :, 0], x[:, :, 0], rtol=0, atol=0)


def test_scores_depend_only_on_position_difference():
    """<R(m) q, R(n) k> = Re sum_i q_i conj(k_i) e^{i (m - n) theta_i} (Su et al., 2021, eq. 16)."""
    torch.manual_seed(2)
    cfg = RopeConfig(theta=10000.0, rotary_dim=16)
    q, k = torch.randn(1, 1, 1, 16, dtype=torch.float64), torch.randn(1, 1, 1, 16, dtype=torch.float64)
    inv = torch.tensor([10000.0 ** (-2 * i / 16) for i in range(8)], dtype=torch.float64)
    zq = torch.complex(q[..., :8], q[..., 8:]).flatten()
    zk = torch.complex(k[..., :8], k[..., 8:]).flatten()

    def score(m: int, n: int) -> float:
        cq, sq = rope_cos_sin(cfg, torch.tensor([[m]]), dtype=torch.float64)
        ck, sk = rope_cos_sin(cfg, torch.tensor([[n]]), dtype=torch.float64)
        return (apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum().item()

    for m, n in [(0, 0), (5, 2), (2, 5), (40, 33), (1000, 7)]:
        closed = (zq * zk.conj() * torch.exp(1j * (m - n) * inv)).sum().real.item()
        assert score(m, n) == pytest.approx(closed, abs=1e-4)
        assert score(m, n) == pytest.approx(score(m + 123, n + 123), abs=1e-4)


def test_cos_sin_carry_attention_factor_and_dtype():
    cfg = RopeConfig(theta=10000.0, rotary_dim=8, scaling=RopeScaling("yarn", factor=16.0, original_max_position=32))
    positions = torch.arange(12)[None]
    cos, sin = rope_cos_sin(cfg, positions)
    _, attn = inverse_frequencies(cfg, 12)
    assert attn > 1.0
    torch.testing.assert_close(cos**2 + sin**2, torch.full_like(cos, attn**2))
    cos16, sin16 = rope_cos_sin(cfg, positions, dtype=torch.bfloat16)
    assert cos16.dtype == sin16.dtype == torch.bfloat16
    torch.testing.assert_close(cos16.float(), cos, rtol=1e-2, atol=1e-2)


def test_dynamic_tables_follow_longest_position():
    cfg = RopeConfig(theta=10000.0, rotary_dim=8, scaling=RopeScaling("dynamic", factor=2.0, original_max_position=8))
    positions = torch.arange(20)[None]
    cos, _ = rope_cos_sin(cfg, positions)
    inv, _ = inverse_frequencies(cfg, 20)
    angles = positions[0, :, None].float() * inv
    torch.testing.assert_close(cos[0], torch.cat((angles, angles), -1).cos())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(rotary_dim=0), "rotary_dim=0"),
        (dict(rotary_dim=7), "rotary_dim=7"),
        (dict(rotary_dim=-2), "rotary_dim=-2"),
        (dict(theta=0.0), "theta=0.0"),
        (dict(theta=-1.0), "theta=-1.0"),
    ],
)
def test_rope_config_validation(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        RopeConfig(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(kind="ntk"), "kind='ntk'"),
        (dict(kind="linear", factor=0.5), "factor=0.5"),
        (dict(kind="yarn", factor=0.9, original_max_position=16), "factor=0.9"),
        (dict(kind="dynamic", factor=2.0), "original_max_position"),
        (dict(kind="llama3", factor=8.0), "original_max_position"),
        (dict(kind="yarn", factor=4.0, original_max_position=0), "original_max_position"),
        (dict(kind="longrope", short_factor=(1.0,), long_factor=(1.0,)), "original_max_position"),
    ],
)
def test_rope_scaling_validation(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        RopeScaling(**kwargs)


def test_longrope_factor_count_is_checked():
    RopeScaling("longrope", factor=0.5, original_max_position=8)  # longrope may shrink: factor < 1 is allowed
    cfg = RopeConfig(
        rotary_dim=8,
        scaling=RopeScaling("longrope", factor=2.0, original_max_position=8, short_factor=(1.0,) * 3, long_factor=()),
    )
    with pytest.raises(ConfigError, match="expected rotary_dim/2 = 4"):
        inverse_frequencies(cfg, 4)
