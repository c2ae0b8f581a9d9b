"""evolm.nn.Linear: oneDNN at CPU inference, F.linear otherwise; same parameters and results."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from evolm.nn.linear import Linear, use_onednn


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("shape", [(1, 64), (3, 1, 64), (2, 7, 64)])
def test_inference_path_matches_f_linear(dtype, tol, shape):
    torch.manual_seed(0)
    lin = Linear(64, 96, bias=True).to(dtype)
    x = torch.randn(shape).to(dtype)
    with torch.no_grad():
        ref = F.linear(x.float(), lin.weight.float(), lin.bias.float())
        out = lin(x)
    assert out.dtype == dtype and out.shape == (*shape[:-1], 96)
    assert ((out.float() - ref).abs().max() / ref.abs().max()).item() < tol


def test_packed_weight_follows_in_place_updates():
    torch.manual_seed(0)
    lin = Linear(32, 48, bias=False).to(torch.bfloat16)
    x = torch.randn(1, 32).to(torch.bfloat16)
    with torch.no_grad():
        first = lin(x)
        lin.weight.mul_(2)
        second = lin(x)
    torch.testing.assert_close(second.float(), 2 * first.float(), rtol=2e-2, atol=1e-2)


def test_training_path_has_gradients_and_names_are_unchanged():
    lin = Linear(8, 4)
    assert isinstance(lin, nn.Linear)
    x = torch.randn(2, 8, requires_grad=True)
    lin(x).sum().backward()
    assert x.grad is not None and lin.weight.grad is not None
    with torch.no_grad():
        lin(x)  # builds nothing persistent
    assert set(lin.state_dict()) == {"weight", "bias"}


def test_switch_gives_the_same_numbers():
    torch.manual_seed(1)
    lin = Linear(64, 64)
    x = torch.randn(4, 64)
    with torch.no_grad():
        fast = lin(x)
        previous = use_onednn(False)
        try:
            slow = lin(x)
        finally:
            use_onednn(previous)
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
