"""Multi-token prediction: the loss against a hand-computed cross-entropy, gradients through the
shared embedding and head, and logits equal to transformers' ``MtpModel``."""

from __future__ import annotations

import pytest
import torch
import transformers as T

import evolm
from evolm.models.families.deepseek import build_mtp
from evolm.nn.mtp import mtp_loss
from helpers.hf_parity import build_hf, relative_error

SMALL = dict(
    vocab_size=61,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=2,
    kv_lora_rank=8,
    q_lora_rank=12,
    qk_rope_head_dim=4,
    qk_nope_head_dim=8,
    v_head_dim=6,
    first_k_dense_replace=2,
    max_position_embeddings=32,
    num_nextn_predict_layers=2,
)


def test_mtp_loss_is_cross_entropy_of_tokens_k_plus_one_ahead():
    """Depth k, position i predicts token i + k + 1 = labels[:, i + k]; CE means per depth, weight / D."""
    torch.manual_seed(0)
    ids = torch.tensor([[3, 1, 4, 1, 5]])  # T = 5, V = 6
    labels = torch.tensor([[1, 4, 1, 5, -100]])  # next-token labels; the last token has none
    d1, d2 = torch.randn(1, 4, 6), torch.randn(1, 3, 6)  # depth 1: T-1 positions, depth 2: T-2
    logp1, logp2 = d1.log_softmax(-1), d2.log_softmax(-1)
    # depth 1: positions 0..2 predict ids[2], ids[3], ids[4]; position 3 has no target
    ce1 = -(logp1[0, 0, ids[0, 2]] + logp1[0, 1, ids[0, 3]] + logp1[0, 2, ids[0, 4]]) / 3
    # depth 2: positions 0..1 predict ids[3], ids[4]
    ce2 = -(logp2[0, 0, ids[0, 3]] + logp2[0, 1, ids[0, 4]]) / 2
    got = mtp_loss([d1, d2], labels, weight=0.3)
    torch.testing.assert_close(got, 0.3 / 2 * (ce1 + ce2))
    with pytest.raises(ValueError, match="depth 2"):
        mtp_loss([d1, d1], labels)


@pytest.fixture(scope="module")
def deepseek_v3(tmp_path_factory):
    """A tiny random DeepSeek-V3 (transformers) and the same weights loaded by evolm."""
    hf = build_hf(T.DeepseekV3Config(**SMALL))
    path = tmp_path_factory.mktemp("ds3")
    hf.save_pretrained(path)
    return hf, evolm.load_model(path)


def test_mtp_gradients_reach_every_depth_and_the_shared_weights(deepseek_v3):
    _, model = deepseek_v3
    mtp = build_mtp(model.cfg)
    assert len(mtp.depths) == 2  # num_nextn_predict_layers
    ids = torch.randint(0, 61, (2, 9))
    labels = torch.cat([ids[:, 1:], torch.full((2, 1), -100)], dim=1)
    model.zero_grad()
    hidden = model.model(ids)
    loss = mtp_loss(mtp(hidden, ids, model.model.embed_tokens, model.lm_head), labels)
    loss.backward()
    assert torch.isfinite(loss) and loss > 0
    for k, depth in enumerate(mtp.depths):
        for name, p in depth.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, f"depth {k}: {name} gets no gradient"
    for p in (model.model.embed_tokens.weight, model.lm_head.weight, model.model.layers[0].self_attn.kv_b_proj.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
    model.zero_grad()


def test_mtp_logits_equal_transformers_mtp_model(deepseek_v3):
    """Embedding-first concatenation, positions of the embedded tokens, post-norm chained to the next depth."""
    from transformers.modeling_layers import MtpModel
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MLP

    hf, model = deepseek_v3
    torch.manual_seed(1)
    ref = MtpModel(hf, 2).eval()
    ours = build_mtp(model.cfg).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    for depth in ref.layers:  # transformers builds MoE blocks here; ours are dense (dense config)
        depth.mtp_block.mlp = DeepseekV3MLP(hf.config)
    ref.layers.load_state_dict({n.replace("depths.", "", 1): t for n, t in ours.state_dict().items()})
    ids = torch.randint(0, 61, (2, 10))
    pos = torch.arange(10)[None].expand(2, 10)
    with torch.no_grad():
        got = ours(model.model(ids), ids, model.model.embed_tokens, model.lm_head)
        h = hf(ids, output_hidden_states=True).hidden_states[-1]
        for k in range(2):  # depth k+1 reads tokens and positions shifted by k+1
            h = ref.forward_layer(k, h[:, :-1], pos[:, k + 1 :], None, input_ids=ids[:, k + 1 :])
            want = ref._project_to_logits(h)
            assert got[k].shape == want.shape == (2, 9 - k, 61)
            assert relative_error(got[k], want) <= 1e-5
