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


# Training path: oneDNN products in forward and backward (an autograd.Function), F.linear's results.


@pytest.fixture
def any_size(monkeypatch):
    """Send every training product, however small, through the oneDNN Function."""
    import evolm.nn.linear as linear

    monkeypatch.setattr(linear, "_TRAIN_MIN_MACS", 0)


def _grads(lin: nn.Module, x: torch.Tensor, gy: torch.Tensor, amp: bool) -> tuple[torch.Tensor, ...]:
    """Output and gradients of x, weight and bias for upstream gradient ``gy``."""
    x = x.detach().requires_grad_()
    for p in lin.parameters():
        p.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        y = lin(x)
    y.backward(gy.to(y.dtype))
    return y, x.grad, lin.weight.grad, lin.bias.grad if lin.bias is not None else None


def _reference(lin: Linear) -> nn.Linear:
    ref = nn.Linear(lin.in_features, lin.out_features, bias=lin.bias is not None)
    ref.load_state_dict(lin.state_dict())
    return ref


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(5, 64), (2, 7, 64), (2, 3, 4, 64)])
def test_training_path_gradients_equal_f_linear_fp32(shape, bias, any_size):
    torch.manual_seed(0)
    lin = Linear(64, 96, bias=bias)
    x, gy = torch.randn(shape), torch.randn(*shape[:-1], 96)
    y, gx, gw, gb = _grads(lin, x, gy, amp=False)
    assert type(y.grad_fn).__name__ == "_OneDNNLinearBackward"  # the oneDNN path ran
    ry, rgx, rgw, rgb = _grads(_reference(lin), x, gy, amp=False)
    assert y.shape == ry.shape and gx.shape == x.shape and gw.shape == (96, 64)
    for got, ref in [(y, ry), (gx, rgx), (gw, rgw)] + ([(gb, rgb)] if bias else []):
        assert got.dtype == torch.float32 and _rel(got, ref) < 1e-5


@pytest.mark.parametrize("onednn_bf16", [False, True])
def test_training_path_under_bf16_autocast(monkeypatch, onednn_bf16, any_size):
    """Products in bf16 as autocast's F.linear; gradients reach the float32 master weights in float32.

    bf16 training products use F.linear by default (measured as fast); ``onednn_bf16`` forces the
    oneDNN Function so that path stays correct too."""
    import evolm.nn.linear as linear

    if onednn_bf16:
        monkeypatch.setattr(linear, "_TRAIN_DTYPES", (torch.float32, torch.bfloat16))
    torch.manual_seed(0)
    lin = Linear(64, 96)
    x, gy = torch.randn(2, 7, 64), torch.randn(2, 7, 96)
    y, gx, gw, gb = _grads(lin, x, gy, amp=True)
    assert (type(y.grad_fn).__name__ == "_OneDNNLinearBackward") == onednn_bf16
    ry, rgx, rgw, rgb = _grads(_reference(lin), x, gy, amp=True)
    assert y.dtype == ry.dtype == torch.bfloat16
    assert gx.dtype == torch.float32 and gw.dtype == gb.dtype == lin.weight.dtype == torch.float32
    for got, ref in [(y, ry), (gx, rgx), (gw, rgw), (gb, rgb)]:
        assert _rel(got, ref) < 2e-2
    _, _, gw32, _ = _grads(_reference(lin), x, gy, amp=False)
    assert _rel(gw, gw32) < 2e-2  # and near the float32 gradient: the bf16 rounding only


def test_training_path_strided_and_empty_inputs(any_size):
    torch.manual_seed(0)
    lin = Linear(64, 32)
    ref = _reference(lin)
    x = torch.randn(3, 6, 64)[:, ::2]  # (3, 3, 64), not contiguous
    gy = torch.randn(3, 3, 32)
    y, gx, gw, gb = _grads(lin, x, gy, amp=False)
    assert type(y.grad_fn).__name__ == "_OneDNNLinearBackward"
    for got, want in zip((y, gx, gw, gb), _grads(ref, x, gy, amp=False), strict=True):
        assert _rel(got, want) < 1e-5
    y, gx, gw, gb = _grads(lin, torch.randn(0, 64), torch.randn(0, 32), amp=False)  # an empty batch
    assert y.shape == (0, 32) and gx.shape == (0, 64) and not gw.any() and not gb.any()


def test_training_path_frozen_weight_and_input_without_grad(any_size):
    torch.manual_seed(0)
    lin = Linear(32, 16)
    lin.weight.requires_grad_(False)  # e.g. a frozen base layer under an adapter
    x = torch.randn(3, 32, requires_grad=True)
    lin(x).square().sum().backward()
    ref = _reference(lin).requires_grad_(False)
    xr = x.detach().requires_grad_()
    ref(xr).square().sum().backward()
    assert lin.weight.grad is None and lin.bias.grad is not None
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-5, atol=1e-6)
    lin.weight.requires_grad_(True)
    lin.bias.grad = None
    lin(x.detach()).square().sum().backward()  # only the parameters need gradients
    assert lin.weight.grad is not None and lin.bias.grad is not None


@pytest.mark.parametrize("reentrant", [False, True])
def test_training_path_under_activation_checkpointing(reentrant, any_size):
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    block = nn.Sequential(Linear(32, 64), nn.SiLU(), Linear(64, 32))
    x = torch.randn(4, 5, 32, requires_grad=True)
    block(x).square().sum().backward()
    plain = [p.grad.clone() for p in block.parameters()] + [x.grad.clone()]
    block.zero_grad(set_to_none=True)
    x.grad = None
    checkpoint(block, x, use_reentrant=reentrant).square().sum().backward()
    for got, ref in zip([p.grad for p in block.parameters()] + [x.grad], plain, strict=True):
        torch.testing.assert_close(got, ref, rtol=0, atol=0)


def test_training_path_under_ddp(tmp_path, any_size):
    """DistributedDataParallel's gradient hooks see the Function's weight gradients (one rank, gloo)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(0)
    lin = Linear(32, 16)
    ref = _reference(lin)
    x = torch.randn(6, 32)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ddp = DDP(lin)
        ddp(x).square().sum().backward()
    finally:
        dist.destroy_process_group()
    ref(x).square().sum().backward()
    for got, want in [(lin.weight.grad, ref.weight.grad), (lin.bias.grad, ref.bias.grad)]:
        assert _rel(got, want) < 1e-5


def test_training_path_compiles(any_size):
    """torch.compile sees oneDNN as an opaque custom op (Inductor's own lowering wants frozen weights)."""
    torch.manual_seed(0)
    lin = Linear(64, 96)
    ref = _reference(lin)
    x = torch.randn(2, 7, 64)
    compiled = torch.compile(lambda m, x: F.gelu(m(x)).square().mean())
    compiled(lin, x).backward()
    F.gelu(ref(x)).square().mean().backward()
    assert _rel(lin.weight.grad, ref.weight.grad) < 1e-5 and _rel(lin.bias.grad, ref.bias.grad) < 1e-5
    with torch.no_grad():
        assert _rel(compiled(lin, x), F.gelu(ref(x)).square().mean()) < 1e-5  # the inference path too


def test_inference_under_autocast_runs_in_the_autocast_dtype():
    """No-grad forward of a float32 layer under bf16 autocast computes in bf16, as F.linear does."""
    torch.manual_seed(0)
    lin = Linear(64, 96)
    x = torch.randn(3, 64)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out, ref = lin(x), F.linear(x, lin.weight, lin.bias)
    assert out.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert lin._packed is None  # the float32 module keeps no bf16 copy


def test_small_training_products_keep_f_linear():
    """Below the size where oneDNN pays off, training products go through F.linear; above it, oneDNN."""
    small, large = Linear(64, 64), Linear(1024, 1024, bias=False)
    y_small = small(torch.randn(8, 64, requires_grad=True))
    y_large = large(torch.randn(16, 1024))  # 16 x 1024 x 1024 = 2^24 multiply-adds
    assert type(y_small.grad_fn).__name__ != "_OneDNNLinearBackward"
    assert type(y_large.grad_fn).__name__ == "_OneDNNLinearBackward"
