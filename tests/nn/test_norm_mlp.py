"""Norms (Ba et al., 2016; Zhang & Sennrich, 2019) and feed-forward blocks (Vaswani et al., 2017;
Shazeer, 2020) against closed forms, PyTorch and transformers."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from evolm.errors import ConfigError
from evolm.nn.mlp import MLP, GatedMLP, MLPConfig, make_mlp
from evolm.nn.norm import LayerNorm, NormConfig, RMSNorm, make_norm


def _x(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 3 + 0.5


def _perturb(module: torch.nn.Module, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.5)


def test_rmsnorm_closed_form():
    """y = x / sqrt(mean(x^2) + eps) * w."""
    norm = RMSNorm(16, eps=1e-5)
    _perturb(norm)
    x = _x(2, 5, 16)
    xd, w = x.double(), norm.weight.double()
    ref = xd / torch.sqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-5) * w
    torch.testing.assert_close(norm(x).double(), ref, rtol=1e-5, atol=1e-6)


def test_rmsnorm_matches_transformers_llama_and_gemma():
    x = _x(3, 4, 32)
    ours, ref = RMSNorm(32, eps=1e-6), LlamaRMSNorm(32, eps=1e-6)
    _perturb(ours)
    ref.load_state_dict(ours.state_dict())
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-6, atol=1e-6)

    ours, ref = RMSNorm(32, eps=1e-6, unit_offset=True), GemmaRMSNorm(32, eps=1e-6)
    _perturb(ours)
    ref.load_state_dict(ours.state_dict())
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-6, atol=1e-6)


def test_rmsnorm_unit_offset():
    """Gemma scales by (1 + w): with its zero initial weight it is plain normalisation."""
    norm = RMSNorm(8, eps=1e-6, unit_offset=True)
    assert torch.equal(norm.weight, torch.zeros(8))
    x = _x(4, 8)
    xd = x.double()
    plain = xd / torch.sqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(norm(x).double(), plain, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        norm.weight.fill_(0.5)
    torch.testing.assert_close(norm(x).double(), plain * 1.5, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("unit_offset", [False, True])
def test_rmsnorm_bf16_uses_float32_statistics(unit_offset):
    norm = RMSNorm(64, unit_offset=unit_offset).bfloat16()
    x = _x(2, 64).bfloat16() * 50
    out = norm(x)
    assert out.dtype == torch.bfloat16
    ref = x.double() / torch.sqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(out.double(), ref, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize(
    ("cfg", "has_weight", "has_bias"),
    [
        (NormConfig(kind="layernorm", eps=1e-5), True, True),
        (NormConfig(kind="layernorm", eps=1e-5, bias=False), True, False),
        (NormConfig(kind="layernorm", eps=1e-5, affine=False), False, False),
    ],
    ids=["affine", "no-bias", "no-affine"],
)
def test_layernorm_matches_torch(cfg, has_weight, has_bias):
    norm = make_norm(cfg, 24)
    assert isinstance(norm, LayerNorm)
    assert (norm.weight is not None) == has_weight and (norm.bias is not None) == has_bias
    _perturb(norm)
    x = _x(2, 3, 24)
    ref = F.layer_norm(x.double(), (24,), *(p.double() if p is not None else None for p in (norm.weight, norm.bias)))
    torch.testing.assert_close(norm(x).double(), ref, rtol=1e-5, atol=1e-5)
    # and the closed form: (x - mean) / sqrt(var + eps) * w + b
    xd = x.double()
    closed = (xd - xd.mean(-1, keepdim=True)) / torch.sqrt(xd.var(-1, unbiased=False, keepdim=True) + 1e-5)
    if has_weight:
        closed = closed * norm.weight.double()
    if has_bias:
        closed = closed + norm.bias.double()
    torch.testing.assert_close(norm(x).double(), closed, rtol=1e-5, atol=1e-5)
    assert norm(x.bfloat16()).dtype == torch.bfloat16


def test_make_norm_rmsnorm():
    norm = make_norm(NormConfig(kind="rmsnorm", eps=1e-5, unit_offset=True), 12)
    assert isinstance(norm, RMSNorm) and norm.eps == 1e-5 and norm.unit_offset
    assert norm.weight.shape == (12,)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [(dict(kind="batchnorm"), "norm.kind='batchnorm'"), (dict(eps=0.0), "norm.eps=0.0"), (dict(eps=-1e-6), "norm.eps")],
)
def test_norm_config_validation(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        NormConfig(**kwargs)


_ACT = {
    "silu": lambda z: z / (1 + torch.exp(-z)),
    "gelu": lambda z: 0.5 * z * (1 + torch.erf(z / math.sqrt(2))),
    "gelu_tanh": lambda z: 0.5 * z * (1 + torch.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z**3))),
    "relu": lambda z: torch.where(z > 0, z, torch.zeros_like(z)),
}


def test_activations_are_distinct():
    """The exact and tanh-approximated GELU differ by more than the tolerance used above."""
    z = torch.linspace(-4, 4, 101, dtype=torch.float64)
    assert (_ACT["gelu"](z) - _ACT["gelu_tanh"](z)).abs().max() > 1e-5


def _linear(layer: torch.nn.Linear, z: torch.Tensor) -> torch.Tensor:
    out = z @ layer.weight.double().T
    return out + layer.bias.double() if layer.bias is not None else out


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("activation", sorted(_ACT))
def test_mlp_hand_written(activation, bias):
    cfg = MLPConfig(hidden_size=40, gated=False, activation=activation, bias=bias)
    mlp = make_mlp(cfg, 16)
    assert isinstance(mlp, MLP) and not hasattr(mlp, "gate_proj")
    assert (mlp.up_proj.bias is not None) == bias and (mlp.down_proj.bias is not None) == bias
    _perturb(mlp)
    x = _x(2, 3, 16)
    ref = _linear(mlp.down_proj, _ACT[activation](_linear(mlp.up_proj, x.double())))
    torch.testing.assert_close(mlp.double()(x.double()), ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("activation", sorted(_ACT))
def test_gated_mlp_hand_written(activation, bias):
    cfg = MLPConfig(hidden_size=40, gated=True, activation=activation, bias=bias)
    mlp = make_mlp(cfg, 16)
    assert isinstance(mlp, GatedMLP)
    assert mlp.gate_proj.weight.shape == mlp.up_proj.weight.shape == (40, 16) and mlp.down_proj.weight.shape == (16, 40)
    _perturb(mlp)
    x = _x(2, 3, 16)
    xd = x.double()
    ref = _linear(mlp.down_proj, _ACT[activation](_linear(mlp.gate_proj, xd)) * _linear(mlp.up_proj, xd))
    torch.testing.assert_close(mlp.double()(xd), ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(hidden_size=0), "mlp.hidden_size=0"),
        (dict(hidden_size=-4), "mlp.hidden_size=-4"),
        (dict(hidden_size=8, activation="swish"), "mlp.activation='swish'"),
    ],
)
def test_mlp_config_validation(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        MLPConfig(**kwargs)
