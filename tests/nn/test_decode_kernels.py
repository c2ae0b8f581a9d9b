"""The AVX-512 decode kernels (evolm.nn.decode_kernels) against plain PyTorch products."""

import pytest
import torch

from evolm.nn import decode_kernels

pytestmark = pytest.mark.skipif(
    not decode_kernels.available(), reason="needs an x86-64 CPU with AVX-512 BF16 and a C++ compiler"
)

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("in_features", [1, 37, 129, 768, 3072])
@pytest.mark.parametrize("lead", [(1,), (1, 1), (3, 1), (2, 2)])
def test_gemv_matches_linear(dtype, in_features, lead):
    torch.manual_seed(0)
    x = torch.randn(*lead, in_features).to(dtype)
    w = torch.randn(300, in_features).to(dtype)
    b = torch.randn(300).to(dtype)
    for bias in (None, b):
        ref = x.float() @ w.float().t() + (bias.float() if bias is not None else 0)
        y = decode_kernels.gemv(x, w, bias)
        assert y.dtype == dtype and y.shape == (*lead, 300)
        err = ((y.float() - ref).abs().max() / ref.abs().max()).item()
        assert err < TOL[dtype], err


def test_gemv_strided_weight_and_bad_input():
    w = torch.randn(64, 48)
    x = torch.randn(1, 48)
    torch.testing.assert_close(decode_kernels.gemv(x, w.t().contiguous().t()), x @ w.t(), rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="in-features"):
        decode_kernels.gemv(torch.randn(1, 47), w)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        decode_kernels.gemv(x.double(), w.double())


def _reference(q, k, v, allowed, scale):
    g = q.shape[1] // k.shape[1]
    kk, vv = k.float().repeat_interleave(g, 1), v.float().repeat_interleave(g, 1)
    scores = (q.float() @ kk.transpose(-1, -2)) * scale
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    return scores.softmax(-1) @ vv


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "shape",  # B, H, K, S, D, Dv: GQA, MHA, MQA, head widths with tails, more than 8 heads per group
    [
        (1, 12, 4, 512, 64, 64),
        (2, 8, 8, 37, 80, 80),
        (3, 32, 4, 100, 128, 128),
        (1, 4, 1, 5, 16, 16),
        (2, 6, 2, 33, 20, 24),
        (1, 40, 4, 64, 64, 64),
        (1, 2, 1, 3, 256, 256),
    ],
)
def test_decode_attention_matches_softmax_attention(dtype, shape):
    b, h, n_kv, s, d, dv = shape
    torch.manual_seed(0)
    q = (torch.randn(b, h, 1, d) * 3).to(dtype)
    k, v = torch.randn(b, n_kv, s, d).to(dtype), torch.randn(b, n_kv, s, dv).to(dtype)
    allowed = torch.rand(b, 1, 1, s) < 0.7
    allowed[..., 0] = True
    for mask in (None, allowed, allowed[:1]):
        out = decode_kernels.decode_attention(q, k, v, mask, d**-0.5)
        assert out.dtype == dtype and out.shape == (b, h, 1, dv)
        err = (out.float() - _reference(q, k, v, mask, d**-0.5)).abs().max().item()
        assert err < TOL[dtype] * 2, err


def test_decode_attention_bad_input():
    q, k = torch.randn(1, 6, 1, 16), torch.randn(1, 4, 8, 16)
    with pytest.raises(RuntimeError, match="do not divide"):
        decode_kernels.decode_attention(q, k, k, None, 0.25)
    with pytest.raises(RuntimeError, match="bool mask"):
        decode_kernels.decode_attention(q[:, :4], k, k, torch.ones(1, 1, 1, 8), 0.25)


def test_eager_one_row_linear_and_one_query_attend_run_the_kernels(monkeypatch):
    from evolm.nn.attention import AttentionMask, attend
    from evolm.nn.linear import Linear

    calls = []
    for name in ("gemv", "decode_attention"):
        real = getattr(decode_kernels, name)
        monkeypatch.setattr(decode_kernels, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    torch.manual_seed(0)
    lin = Linear(64, 48).eval()
    x = torch.randn(1, 1, 64)
    with torch.no_grad():
        assert torch.allclose(lin(x), torch.nn.functional.linear(x, lin.weight, lin.bias), atol=1e-5)
    q, k, v = torch.randn(1, 4, 1, 16), torch.randn(1, 2, 9, 16), torch.randn(1, 2, 9, 16)
    mask = AttentionMask(q_index=torch.tensor([8]), k_index=torch.arange(9))
    ref = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1))
    assert torch.allclose(attend(q, k, v, mask), ref, atol=1e-5)
    assert calls == ["gemv", "decode_attention"]

    q.requires_grad_(True)  # the kernel has no backward: a query that needs gradients keeps SDPA
    attend(q, k, v, mask).sum().backward()
    assert calls == ["gemv", "decode_attention"] and q.grad is not None and q.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lead", [(1,), (1, 1), (2, 1)])
def test_gemv_group_matches_each_product(dtype, lead):
    """q/k/v-like weights of different heights, biases on some, one input: each output as its own product."""
    torch.manual_seed(0)
    x = torch.randn(*lead, 96).to(dtype)
    ws = [torch.randn(n, 96).to(dtype) for n in (300, 7, 1000, 1)]
    bs = [torch.randn(300).to(dtype), None, torch.randn(1000).to(dtype), None]
    ys = decode_kernels.gemv_group(x, ws, bs)
    assert len(ys) == 4
    for y, w, b in zip(ys, ws, bs, strict=True):
        ref = x.float() @ w.float().t() + (b.float() if b is not None else 0)
        assert y.dtype == dtype and y.shape == (*lead, w.shape[0])
        assert ((y.float() - ref).abs().max() / ref.abs().max()).item() < TOL[dtype]


def test_gemv_group_bad_input():
    x = torch.randn(1, 48)
    with pytest.raises(RuntimeError, match="in-features"):
        decode_kernels.gemv_group(x, [torch.randn(8, 48), torch.randn(8, 47)], [None, None])
    with pytest.raises(RuntimeError, match="biases"):
        decode_kernels.gemv_group(x, [torch.randn(8, 48)], [None, None])
    with pytest.raises(RuntimeError, match="bias has 7 values for 8 outputs"):
        decode_kernels.gemv_group(x, [torch.randn(8, 48)], [torch.randn(7)])
    with pytest.raises(RuntimeError, match="is BFloat16"):
        decode_kernels.gemv_group(x, [torch.randn(8, 48).bfloat16()], [None])


def test_linear_group_runs_one_call_for_plain_layers_only(monkeypatch):
    """Plain Linear layers at one row: one grouped call, same numbers as each layer; hooked, adapted,
    multi-row or gradient-needing products call the layers one by one."""
    from evolm.nn.linear import Linear, linear_group

    calls = []
    real = decode_kernels.gemv_group
    monkeypatch.setattr(decode_kernels, "gemv_group", lambda *a: calls.append(len(a[1])) or real(*a))
    torch.manual_seed(0)
    layers = [Linear(64, 48), Linear(64, 16, bias=False), Linear(64, 16)]
    x = torch.randn(1, 1, 64)
    with torch.no_grad():
        want = [torch.nn.functional.linear(x, m.weight, m.bias) for m in layers]
        for got, ref in zip(linear_group(x, layers), want, strict=True):
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        assert calls == [3]
        linear_group(torch.randn(1, 2, 64), layers)  # two rows: a prefill, not a decode step
        assert calls == [3]
        seen = []
        handle = layers[1].register_forward_hook(lambda m, i, o: seen.append(o.shape))
        linear_group(x, layers)  # a hook must see its layer's output
        assert calls == [3] and seen == [(1, 1, 16)]
        handle.remove()
        linear_group(x, [layers[0], torch.nn.Linear(64, 8)])  # not an evolm Linear (e.g. an adapter)
        assert calls == [3]
    out = linear_group(x, layers)  # gradients wanted: the layers' own (training) path
    out[0].sum().backward()
    assert calls == [3] and layers[0].weight.grad is not None
