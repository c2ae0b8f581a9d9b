"""``attend`` against a naive float64 softmax(Q K^T * scale + bias, masked) V written out here."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from evolm.nn.attention import AttentionMask, attend
from evolm.nn.positions import alibi_slopes

# Notation: B batch, H query heads, K key/value heads, T queries, S keys, D head width.


def _visible(mask: AttentionMask, batch: int) -> torch.Tensor:
    """The visibility rules of ``AttentionMask`` evaluated one (b, t, s) at a time: (B, T, S) bool."""
    qi, ki = mask.q_index.tolist(), mask.k_index.tolist()
    valid = mask.key_valid.tolist() if mask.key_valid is not None else None
    q_doc = mask.q_doc.tolist() if mask.q_doc is not None else None
    k_doc = mask.k_doc.tolist() if mask.k_doc is not None else None
    out = [[[True] * len(ki) for _ in qi] for _ in range(batch)]
    for b in range(batch):
        for t, q in enumerate(qi):
            for s, k in enumerate(ki):
                ok = True
                if mask.causal:
                    ok &= k <= q
                if mask.window is not None:
                    ok &= q - k < mask.window
                if valid is not None:
                    ok &= valid[b][s]
                if q_doc is not None:
                    ok &= q_doc[b][t] == k_doc[b][s]
                out[b][t][s] = ok
    return torch.tensor(out, dtype=torch.bool)


def _reference(q, k, v, visible, scale=None, softcap=None, bias=None) -> torch.Tensor:
    """float64 attention; rows with no visible key come out NaN. visible: (B, T, S)."""
    q, k, v = q.double(), k.double(), v.double()
    b, h, t, d = q.shape
    g = h // k.shape[1]
    out = torch.empty(b, h, t, v.shape[-1], dtype=torch.float64)
    scale = d**-0.5 if scale is None else scale
    for bi in range(b):
        for hi in range(h):
            kv = hi // g  # query head hi reads key/value head hi // (H / K)
            scores = q[bi, hi] @ k[bi, kv].T * scale  # (T, S)
            if softcap is not None:
                scores = softcap * torch.tanh(scores / softcap)
            if bias is not None:
                scores = scores + bias.double().expand(b, h, t, k.shape[2])[bi, hi]
            scores = scores.masked_fill(~visible[bi], -math.inf)
            out[bi, hi] = torch.softmax(scores, dim=-1) @ v[bi, kv]
    return out


def _qkv(b=2, h=4, kv=4, t=7, s=None, d=16, dv=None, seed=0, amp=1.0):
    gen = torch.Generator().manual_seed(seed)
    s = t if s is None else s
    q = torch.randn(b, h, t, d, generator=gen) * amp
    k = torch.randn(b, kv, s, d, generator=gen) * amp
    v = torch.randn(b, kv, s, dv or d, generator=gen)
    return q, k, v


def _check(q, k, v, mask, **kwargs):
    out = attend(q, k, v, mask, **kwargs)
    visible = _visible(mask, q.shape[0])
    ref = _reference(q, k, v, visible, kwargs.get("scale"), kwargs.get("softcap"), kwargs.get("bias"))
    assert out.shape == ref.shape and out.dtype == q.dtype
    live = visible.any(-1)[:, None, :, None].expand_as(ref)  # rows with at least one visible key
    torch.testing.assert_close(out.double()[live], ref[live], rtol=1e-5, atol=1e-5)
    assert torch.isfinite(out).all()
    return out


def _aligned(t: int, **kwargs) -> AttentionMask:
    return AttentionMask(q_index=torch.arange(t), k_index=torch.arange(t), **kwargs)


# Each case is (H, K, softcap): MHA, GQA, MQA, each through the SDPA and the explicit soft-cap path.
HEADS = [(4, 4, None), (8, 2, None), (8, 1, None), (4, 4, 5.0), (8, 2, 5.0), (8, 1, 5.0)]
HEAD_IDS = ["mha", "gqa", "mqa", "mha-softcap", "gqa-softcap", "mqa-softcap"]


@pytest.mark.parametrize(("h", "kv", "softcap"), HEADS, ids=HEAD_IDS)
def test_causal(h, kv, softcap):
    q, k, v = _qkv(h=h, kv=kv, amp=2.0)
    mask = _aligned(7)
    assert mask.is_plain_causal()
    _check(q, k, v, mask, softcap=softcap)


@pytest.mark.parametrize(("h", "kv", "softcap"), HEADS, ids=HEAD_IDS)
def test_bidirectional(h, kv, softcap):
    q, k, v = _qkv(h=h, kv=kv, amp=2.0)
    mask = _aligned(7, causal=False)
    assert mask.dense() is None
    _check(q, k, v, mask, softcap=softcap)


@pytest.mark.parametrize("window", [1, 2, 3, 6, 7, 50])
@pytest.mark.parametrize("softcap", [None, 4.0])
def test_sliding_window(window, softcap):
    q, k, v = _qkv(h=8, kv=2, t=9, amp=2.0)
    out = _check(q, k, v, _aligned(9, window=window), softcap=softcap)
    if window >= 9:  # a window wider than the sequence is plain causal attention
        torch.testing.assert_close(out, attend(q, k, v, _aligned(9), softcap=softcap), rtol=1e-6, atol=1e-6)
    if window == 1:  # every query sees only itself
        torch.testing.assert_close(out, v.repeat_interleave(4, dim=1), rtol=1e-6, atol=1e-6)


def test_sliding_window_bidirectional():
    q, k, v = _qkv(t=8)
    _check(q, k, v, _aligned(8, causal=False, window=3))


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_packed_documents_do_not_see_each_other(softcap):
    """Two rows, each packing several documents; each document equals attending to it alone."""
    q, k, v = _qkv(h=4, kv=2, t=9, amp=2.0)
    docs = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 2, 2], [5, 5, 5, 5, 5, 5, 7, 7, 7]])
    mask = _aligned(9, q_doc=docs, k_doc=docs)
    assert not mask.is_plain_causal()
    out = _check(q, k, v, mask, softcap=softcap)
    for b in range(2):
        for doc in docs[b].unique():
            sel = (docs[b] == doc).nonzero().flatten()
            t = sel.numel()
            alone = attend(
                q[b : b + 1, :, sel], k[b : b + 1, :, sel], v[b : b + 1, :, sel], _aligned(t), softcap=softcap
            )
            torch.testing.assert_close(out[b : b + 1, :, sel], alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_key_padding(softcap):
    """Left- and right-padded rows: padded keys get no weight."""
    q, k, v = _qkv(h=8, kv=2, t=6)
    valid = torch.tensor([[False, False, True, True, True, True], [True, True, True, True, True, False]])
    out = _check(q, k, v, _aligned(6, key_valid=valid), softcap=softcap)
    # The real tokens of the left-padded row equal the unpadded computation on those tokens.
    alone = attend(q[:1, :, 2:], k[:1, :, 2:], v[:1, :, 2:], _aligned(4), softcap=softcap)
    torch.testing.assert_close(out[:1, :, 2:], alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_bidirectional_key_padding(softcap):
    q, k, v = _qkv(t=5)
    valid = torch.tensor([[True, True, True, False, False], [True] * 5])
    _check(q, k, v, _aligned(5, causal=False, key_valid=valid), softcap=softcap)


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_fully_masked_query_is_finite(softcap):
    """A left-padding query (its only causal key is padding) must not produce NaN."""
    q, k, v = _qkv(t=5)
    valid = torch.tensor([[False, False, True, True, True], [True] * 5])
    for mask in (_aligned(5, key_valid=valid), _aligned(5, key_valid=valid, window=1)):
        out = attend(q, k, v, mask, softcap=softcap)
        assert torch.isfinite(out).all()
        # The first query of row 0 sees nothing; all other rows are exact.
        _check(q, k, v, mask, softcap=softcap)


def test_softcap_changes_scores_like_tanh():
    """With large scores the cap is active: the output differs from the uncapped one and matches tanh capping."""
    q, k, v = _qkv(h=4, kv=4, amp=4.0)
    mask = _aligned(7)
    capped = _check(q, k, v, mask, softcap=2.0)
    assert (capped - attend(q, k, v, mask)).abs().max() > 1e-2


@pytest.mark.parametrize("softcap", [None, 5.0])
@pytest.mark.parametrize("causal", [True, False])
def test_alibi(softcap, causal):
    h = 6
    q, k, v = _qkv(h=h, kv=h, t=7)
    slopes = alibi_slopes(h)
    mask = _aligned(7, causal=causal)
    out = attend(q, k, v, mask, alibi_slopes=slopes, softcap=softcap)
    bias = torch.zeros(1, h, 7, 7, dtype=torch.float64)
    for hi in range(h):
        for t in range(7):
            for s in range(7):
                bias[0, hi, t, s] = slopes[hi].item() * (s - t)  # linear distance penalty (Press et al., 2021)
    ref = _reference(q, k, v, _visible(mask, 2), softcap=softcap, bias=bias)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_alibi_with_left_padding_and_cache_layout():
    """ALiBi depends on slot distance only, so left padding shifts nothing for real tokens."""
    h = 4
    q, k, v = _qkv(b=2, h=h, kv=h, t=3, s=8)
    valid = torch.tensor([[False, False, True, True, True, True, True, True], [True] * 8])
    mask = AttentionMask(q_index=torch.arange(5, 8), k_index=torch.arange(8), key_valid=valid)
    out = attend(q, k, v, mask, alibi_slopes=alibi_slopes(h))
    slopes = alibi_slopes(h).double()
    dist = (torch.arange(8)[None, :] - torch.arange(5, 8)[:, None]).double()  # (T, S)
    ref = _reference(q, k, v, _visible(mask, 2), bias=slopes[None, :, None, None] * dist)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("softcap", [None, 5.0])
@pytest.mark.parametrize("bias_batch", [1, 2])
def test_additive_bias(softcap, bias_batch):
    q, k, v = _qkv(h=8, kv=2, t=6)
    bias = torch.randn(bias_batch, 8, 6, 6, generator=torch.Generator().manual_seed(3)) * 2
    valid = torch.tensor([[True] * 6, [False, True, True, True, True, True]])
    _check(q, k, v, _aligned(6), bias=bias, softcap=softcap)
    _check(q, k, v, _aligned(6, key_valid=valid), bias=bias, softcap=softcap)
    _check(q, k, v, _aligned(6, causal=False), bias=bias, softcap=softcap)


def test_bias_and_alibi_add_up():
    h = 4
    q, k, v = _qkv(h=h, kv=h, t=5)
    bias = torch.randn(1, h, 5, 5, generator=torch.Generator().manual_seed(4))
    slopes = alibi_slopes(h)
    dist = (torch.arange(5)[None, :] - torch.arange(5)[:, None]).float()
    both = attend(q, k, v, _aligned(5), bias=bias, alibi_slopes=slopes)
    summed = attend(q, k, v, _aligned(5), bias=bias + slopes[None, :, None, None] * dist)
    torch.testing.assert_close(both, summed, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("h", "kv", "softcap"), HEADS, ids=HEAD_IDS)
@pytest.mark.parametrize("window", [None, 3])
def test_cached_layout(h, kv, softcap, window):
    """T=3 new queries at slots 5..7 over S=8 cached keys equal the last rows of the full computation."""
    q, k, v = _qkv(h=h, kv=kv, t=8, amp=2.0)
    mask = AttentionMask(q_index=torch.arange(5, 8), k_index=torch.arange(8), window=window)
    out = _check(q[:, :, 5:], k, v, mask, softcap=softcap)
    full = attend(q, k, v, _aligned(8, window=window), softcap=softcap)
    torch.testing.assert_close(out, full[:, :, 5:], rtol=1e-5, atol=1e-5)


def test_single_token_decode_step():
    q, k, v = _qkv(h=8, kv=2, t=1, s=10)
    _check(q, k, v, AttentionMask(q_index=torch.tensor([9]), k_index=torch.arange(10)))


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_custom_scale_and_value_width(softcap):
    q, k, v = _qkv(h=4, kv=2, t=6, d=8, dv=12)
    out = _check(q, k, v, _aligned(6), scale=0.3, softcap=softcap)
    assert out.shape == (2, 4, 6, 12)


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_low_precision_keeps_dtype(softcap):
    q, k, v = (x.bfloat16() for x in _qkv(h=8, kv=2, t=6))
    valid = torch.tensor([[True] * 6, [True, True, True, True, True, False]])
    out = attend(q, k, v, _aligned(6, key_valid=valid), softcap=softcap)
    assert out.dtype == torch.bfloat16
    ref = _reference(q, k, v, _visible(_aligned(6, key_valid=valid), 2), softcap=softcap)
    torch.testing.assert_close(out.double(), ref, rtol=3e-2, atol=3e-2)


def test_mask_helpers():
    mask = _aligned(4, window=2)
    assert mask.with_window(2) is mask
    assert mask.with_window(None).window is None and mask.with_window(None).is_plain_causal()
    dense = _aligned(4, window=2).dense()
    assert dense.shape == (1, 1, 4, 4)
    torch.testing.assert_close(dense[0, 0], _visible(mask, 1)[0])
    assert not AttentionMask(q_index=torch.arange(2, 4), k_index=torch.arange(4)).is_plain_causal()


def test_single_query_over_its_history_needs_no_mask():
    q, k, v = torch.randn(2, 4, 1, 8), torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8)
    mask = AttentionMask(q_index=torch.tensor([5]), k_index=torch.arange(6), keys_are_history=True)
    assert mask.dense() is None
    ref = AttentionMask(q_index=torch.tensor([5]), k_index=torch.arange(6))
    assert ref.dense() is not None and bool(ref.dense().all())
    torch.testing.assert_close(attend(q, k, v, mask), attend(q, k, v, ref))
    assert (
        AttentionMask(q_index=torch.tensor([5]), k_index=torch.arange(6), window=3, keys_are_history=True).dense()
        is not None
    )


def test_bf16_training_path_matches_sdpa_values_and_gradients():
    """bf16 causal attention with grad on CPU takes the grouped-matmul path; outputs and gradients
    agree with float32 SDPA to bf16 precision (GQA, 4 query heads per kv head)."""
    torch.manual_seed(0)
    b, h, kv, t, d = 2, 8, 2, 40, 16
    q0, k0, v0 = torch.randn(b, h, t, d), torch.randn(b, kv, t, d), torch.randn(b, kv, t, d)
    go = torch.randn(b, h, t, d)
    mask = AttentionMask(q_index=torch.arange(t), k_index=torch.arange(t), causal=True)
    q, k, v = (x.bfloat16().requires_grad_() for x in (q0, k0, v0))
    out = attend(q, k, v, mask)
    out.backward(go.bfloat16())
    qr, kr, vr = (x.clone().requires_grad_() for x in (q0, k0, v0))
    ref = F.scaled_dot_product_attention(qr, kr, vr, is_causal=True, enable_gqa=True)
    ref.backward(go)
    assert out.dtype == torch.bfloat16
    for got, want in ((out, ref), (q.grad, qr.grad), (k.grad, kr.grad), (v.grad, vr.grad)):
        torch.testing.assert_close(got.float(), want, atol=0.06, rtol=0.03)
