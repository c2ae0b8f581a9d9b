"""Mixture-of-experts layer and routers against closed forms and the transformers blocks."""

from __future__ import annotations

import pytest
import torch
import transformers as T
from torch.nn import functional as F

from evolm.errors import ConfigError
from evolm.nn.moe import MoE, MoEConfig, fuse_expert_weights, split_expert_weights, update_router_biases
from evolm.nn.router import Router

C = 16


def perturbed(module: torch.nn.Module, seed: int = 0, std: float = 0.3) -> torch.nn.Module:
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, std)
    return module


def dense_expert(moe: MoE, e: int, x: torch.Tensor) -> torch.Tensor:
    """Expert e applied to every token with plain F.linear (the reference for the grouped path)."""
    gate, up = F.linear(x, moe.experts.gate_up_proj[e]).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, moe.experts.down_proj[e])


def test_top_k_of_all_experts_with_equal_weights_is_the_dense_mixture():
    """K = E and a zero router (all probabilities 1/E): the layer is the mean of the experts,
    values and gradients."""
    moe = perturbed(MoE(C, MoEConfig(n_experts=4, top_k=4, expert_hidden=8, norm_topk=True)))
    with torch.no_grad():
        moe.gate.weight.zero_()
    x = torch.randn(3, 5, C, requires_grad=True)
    out = moe(x)
    ref = sum(dense_expert(moe, e, x) for e in range(4)) / 4
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, [x, moe.experts.gate_up_proj, moe.experts.down_proj], g)
    refs = torch.autograd.grad(ref, [x, moe.experts.gate_up_proj, moe.experts.down_proj], g)
    for a, b in zip(grads, refs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_matches_transformers_mixtral_block_forward_and_backward():
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    hf_cfg = T.MixtralConfig(hidden_size=C, intermediate_size=24, num_local_experts=8, num_experts_per_tok=2)
    hf_cfg._experts_implementation = "eager"
    hf = perturbed(MixtralSparseMoeBlock(hf_cfg))
    moe = MoE(C, MoEConfig(n_experts=8, top_k=2, expert_hidden=24, norm_topk=True))
    moe.load_state_dict(hf.state_dict())
    x = torch.randn(2, 33, C)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, ref = moe(xa), hf(xb)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(out)
    out.backward(g)
    ref.backward(g)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-5, atol=1e-6)
    hf_params = dict(hf.named_parameters())
    for name, p in moe.named_parameters():
        torch.testing.assert_close(p.grad, hf_params[name].grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("version", ["v2", "v3"])
def test_group_limited_routers_match_deepseek(version):
    """DeepSeek-V2 group-limited softmax and DeepSeek-V3 sigmoid + correction bias + group-limited routing."""
    n_experts, k = 8, 3
    if version == "v2":
        from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter

        hf_cfg = T.DeepseekV2Config(
            hidden_size=C,
            num_attention_heads=2,
            n_routed_experts=n_experts,
            num_experts_per_tok=k,
            n_group=4,
            topk_group=2,
            topk_method="group_limited_greedy",
            routed_scaling_factor=1.5,
        )
        hf = DeepseekV2TopkRouter(hf_cfg)
        cfg = MoEConfig(n_experts, k, 8, n_group=4, topk_group=2, routed_scale=1.5)
    else:
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

        hf_cfg = T.DeepseekV3Config(
            hidden_size=C,
            num_attention_heads=2,
            n_routed_experts=n_experts,
            num_experts_per_tok=k,
            n_group=4,
            topk_group=2,
            norm_topk_prob=True,
            routed_scaling_factor=2.5,
        )
        hf = DeepseekV3TopkRouter(hf_cfg)
        cfg = MoEConfig(
            n_experts,
            k,
            8,
            router="sigmoid",
            norm_topk=True,
            routed_scale=2.5,
            n_group=4,
            topk_group=2,
            correction_bias=True,
        )
    perturbed(hf)
    if version == "v3":
        hf.e_score_correction_bias.normal_(0.0, 0.3)
    router = Router(C, cfg).eval()
    router.load_state_dict(hf.state_dict())
    x = torch.randn(50, C)
    routing = router(x)
    _, ref_w, ref_i = hf(x)
    order, ref_order = routing.experts.argsort(-1), ref_i.argsort(-1)
    assert torch.equal(routing.experts.gather(1, order), ref_i.gather(1, ref_order))
    torch.testing.assert_close(routing.weights.gather(1, order), ref_w.gather(1, ref_order))
    groups = routing.experts // 2  # (N, K): experts of at most topk_group=2 groups per token
    assert max(len(set(row)) for row in groups.tolist()) <= 2


def test_capacity_dropped_tokens_pass_through_the_residual_unchanged():
    """Switch routing (top-1, capacity factor): over-capacity tokens get a zero expert output, so
    ``x + moe(x)`` leaves them as they were; kept tokens are the earliest per expert."""
    cfg = MoEConfig(n_experts=4, top_k=1, expert_hidden=8, capacity_factor=1.0, aux_loss_coef=0.01)
    moe = perturbed(MoE(C, cfg)).train()
    with torch.no_grad():  # route most tokens to expert 0
        moe.gate.weight[0] += 2.0 * torch.ones(C)
    x = torch.randn(1, 40, C).abs()
    out = moe(x) + x
    chosen = moe.gate(x.view(-1, C)).experts[:, 0]
    capacity = 10  # ceil(1.0 * 40 / 4)
    dropped = torch.zeros(40, dtype=torch.bool)
    for e in range(4):
        idx = (chosen == e).nonzero().flatten()
        dropped[idx[capacity:]] = True
    assert 0 < int(dropped.sum()) < 40
    assert torch.equal(out[0, dropped], x[0, dropped])
    assert not torch.isclose(out[0, ~dropped], x[0, ~dropped]).all(-1).any()
    loss, metrics = moe.aux_loss()
    assert metrics["dropped"] == pytest.approx(int(dropped.sum()) / 40)
    assert loss is not None and loss.requires_grad
    with torch.no_grad():  # inference drops nothing
        moe.eval()
        assert not torch.equal(moe(x)[0, dropped], torch.zeros(int(dropped.sum()), C))


def test_switch_loss_and_z_loss_closed_forms():
    cfg = MoEConfig(n_experts=4, top_k=1, expert_hidden=8, aux_loss_coef=1.0, z_loss_coef=1.0)
    router = Router(C, cfg).train()
    with torch.no_grad():
        router.weight.zero_()  # uniform probabilities: balance loss E * sum f_i / E = 1 whatever f is
    r = router(torch.randn(32, C), losses=True)
    assert float(r.balance.detach()) == pytest.approx(1.0)
    assert float(r.z_loss.detach()) == pytest.approx(torch.log(torch.tensor(4.0)).item() ** 2)
    perturbed(router)
    x = torch.randn(64, C)
    r = router(x, losses=True)
    probs = torch.softmax(x @ router.weight.detach().T, -1)
    f = torch.bincount(probs.argmax(-1), minlength=4).float() / 64
    assert float(r.balance.detach()) == pytest.approx(float(4 * (f * probs.mean(0)).sum()), rel=1e-5)
    assert float(r.z_loss.detach()) == pytest.approx(
        float(torch.logsumexp(x @ router.weight.detach().T, -1).square().mean()), rel=1e-5
    )


def test_noisy_top_k_gating():
    """Shazeer et al. (2017): without noise (eval) it is a softmax over the top-k logits; training
    adds noise and the importance + load loss, which trains the noise weights too."""
    cfg = MoEConfig(n_experts=6, top_k=2, expert_hidden=8, router="noisy", norm_topk=True, aux_loss_coef=0.1)
    router = perturbed(Router(C, cfg))
    x = torch.randn(40, C)
    r = router.eval()(x)
    logits = x @ router.weight.T
    top = logits.topk(2, -1)
    assert torch.equal(r.experts, top.indices)
    torch.testing.assert_close(r.weights, torch.softmax(top.values, -1))
    torch.manual_seed(1)
    r = router.train()(x, losses=True)
    assert not torch.equal(r.experts, top.indices)  # the noise changed some choices
    r.balance.backward()
    assert router.noise_weight.grad.abs().sum() > 0 and router.weight.grad.abs().sum() > 0


def test_aux_loss_records_only_in_training():
    cfg = MoEConfig(n_experts=4, top_k=2, expert_hidden=8, aux_loss_coef=0.5, z_loss_coef=0.01)
    moe = perturbed(MoE(C, cfg))
    x = torch.randn(2, 9, C)
    moe.train()(x)
    loss, metrics = moe.aux_loss()
    assert loss.requires_grad and set(metrics) == {"load_max", "load_min"}
    assert metrics["load_min"] <= 1.0 <= metrics["load_max"] <= 2.0  # E / K = 2 is full collapse
    moe.eval()(x)
    assert moe.aux_loss() == (None, {})


def test_bias_update_moves_against_the_load():
    cfg = MoEConfig(
        n_experts=4, top_k=1, expert_hidden=8, router="sigmoid", correction_bias=True, bias_update_rate=0.01
    )
    moe = perturbed(MoE(C, cfg)).train()
    x = torch.randn(2, 16, C)
    counts = torch.zeros(4)
    for _ in range(2):  # two micro-batches of one step
        moe(x)
        counts += moe.gate(x.view(-1, C)).counts
    assert update_router_biases(torch.nn.Sequential(moe)) == 1
    expected = 0.01 * torch.sign(counts.mean() - counts)
    torch.testing.assert_close(moe.gate.e_score_correction_bias, expected)
    assert update_router_biases(moe) == 0  # nothing routed since the last update
    moe.eval()(x)
    assert update_router_biases(moe) == 0  # inference accumulates no load


def test_fuse_and_split_expert_weights_roundtrip():
    state = {f"m.experts.{e}.{n}.weight": torch.randn(6, 4) for e in range(3) for n in ("w1", "w3")}
    state |= {f"m.experts.{e}.w2.weight": torch.randn(4, 6) for e in range(3)} | {"m.gate.weight": torch.randn(3, 4)}
    fused = fuse_expert_weights(state, ("w1", "w3", "w2"))
    assert fused["m.experts.gate_up_proj"].shape == (3, 12, 4) and fused["m.experts.down_proj"].shape == (3, 4, 6)
    assert torch.equal(fused["m.experts.gate_up_proj"][1, 6:], state["m.experts.1.w3.weight"])
    back = split_expert_weights(fused, ("w1", "w3", "w2"))
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)


def test_bf16_autocast_runs_the_experts_in_bf16():
    moe = perturbed(MoE(C, MoEConfig(n_experts=4, top_k=2, expert_hidden=8))).train()
    x = torch.randn(2, 7, C, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = moe(x)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert moe.experts.gate_up_proj.grad.dtype == torch.float32
    torch.testing.assert_close(out.float(), moe(x), rtol=0.05, atol=0.02)


@pytest.mark.parametrize(
    "fields",
    [
        {"top_k": 5},
        {"router": "noisy", "top_k": 4},
        {"n_group": 3},
        {"bias_update_rate": 0.1},
        {"capacity_factor": 0.0},
        {"shared_gate": True},
    ],
)
def test_config_validation_names_the_field(fields):
    base = {"n_experts": 4, "top_k": 2, "expert_hidden": 8}
    with pytest.raises(ConfigError, match=next(iter(fields))):
        MoEConfig(**{**base, **fields})
