"""NF4 with double quantisation (QLoRA): the levels, the error bound, storage, and QLoRA == LoRA over
the dequantised weights."""

from __future__ import annotations

import torch
from torch import nn

from evolm.nn.lora import LoRAConfig, LoRALinear, apply_lora, lora_state_dict
from evolm.nn.nf4 import (
    NF4_LEVELS,
    Linear4bit,
    dequantize_nf4,
    dequantize_scales,
    nf4_levels_from_quantiles,
    quantize_linears,
    quantize_nf4,
)
from finetune.util import randomize_adapters


def test_levels_are_the_normal_quantiles_of_the_paper():
    levels = nf4_levels_from_quantiles()
    assert levels[0] == -1 and levels[-1] == 1 and (levels == 0).sum() == 1
    torch.testing.assert_close(levels.float(), torch.tensor(NF4_LEVELS), rtol=0, atol=1e-6)


def test_error_within_the_bound_and_storage():
    torch.manual_seed(0)
    w = torch.randn(384, 320) * torch.rand(384, 1)  # rows of different scales
    w[0, :64] = 0.0  # an all-zero block
    q = quantize_nf4(w)
    d = dequantize_nf4(q)
    assert d.shape == w.shape and torch.equal(d[0, :64], torch.zeros(64))
    # bound: nearest level (half the gap of the interval x falls in) x true absmax + scale error x |level|
    levels = torch.tensor(NF4_LEVELS)
    blocks = w.view(-1, 64)
    absmax = blocks.abs().amax(1)
    scale_err = (dequantize_scales(q) - absmax).abs()  # (n_blocks,)
    assert (scale_err <= q.scales_scale.repeat_interleave(256)[: absmax.numel()] / 254 + 1e-6).all()
    normed = blocks / absmax.clamp_min(1e-30)[:, None]
    i = torch.bucketize(normed, levels).clamp(1, 15)
    half_gap = (levels[i] - levels[i - 1]) / 2
    bound = half_gap * absmax[:, None] + scale_err[:, None] + 1e-6
    err = (d.view(-1, 64) - blocks).abs()
    assert (err <= bound).all()
    assert err.max() <= 0.152 * absmax.max() + scale_err.max() + 1e-6
    # 4 bits + int8 scale per 64 + float32 per 64*256 (+ the mean): 4.127 bits
    assert abs(q.nbytes / w.numel() - (0.5 + 1 / 64 + 4 / (64 * 256))) < 1e-3
    # NF4 is the better 4-bit code for normal weights: lower error than 16 evenly spaced levels
    even = torch.linspace(-1, 1, 16)
    nearest_even = even[(normed[..., None] - even).abs().argmin(-1)] * absmax[:, None]
    assert (err**2).mean() < ((nearest_even - blocks) ** 2).mean()


def test_odd_sizes_round_trip_shape():
    w = torch.randn(7, 9)
    d = dequantize_nf4(quantize_nf4(w))
    assert d.shape == (7, 9) and (d - w).abs().max() <= 0.16 * w.abs().max()


def test_qlora_equals_lora_over_dequantised_weights():
    torch.manual_seed(0)
    base = nn.Linear(128, 96, bias=True)
    q = Linear4bit.from_linear(base)
    assert abs(q.bytes_per_param - 0.5159) < 1e-3
    plain = nn.Linear(128, 96)
    with torch.no_grad():
        plain.weight.copy_(q.dequantize())
        plain.bias.copy_(base.bias)
    cfg = LoRAConfig(rank=4, alpha=8, dropout=0.0)
    a, b = LoRALinear(q, cfg), LoRALinear(plain, cfg)
    b.load_state_dict(a.state_dict(), strict=False)
    randomize_adapters(a)
    b.load_state_dict({k: v for k, v in a.state_dict().items() if "lora" in k}, strict=False)
    x = torch.randn(3, 5, 128, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    ya, yb = a(x), b(x2)
    torch.testing.assert_close(ya, yb, rtol=0, atol=1e-5)
    ya.square().sum().backward()
    yb.square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.lora_A.weight.grad, b.lora_A.weight.grad, rtol=1e-4, atol=1e-5)


def test_qlora_model_trains_adapters_only(tiny_pair):
    _, model = tiny_pair
    swapped = quantize_linears(model)
    assert len(swapped) == 14 and "lm_head" not in swapped  # 7 per layer, head kept
    packed = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, LoRAConfig(rank=4, targets=("q_proj", "v_proj")))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        model(ids).logsumexp(-1).mean().backward()
        opt.step()
        opt.zero_grad()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(lora_state_dict(model))
    after = model.state_dict()
    for k, v in packed.items():
        key = k.replace("q_proj.", "q_proj.base_layer.").replace("v_proj.", "v_proj.base_layer.")
        assert torch.equal(after[key], v), key
