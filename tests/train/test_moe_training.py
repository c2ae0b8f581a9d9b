"""A tiny Mixtral-style MoE through the pretraining loop: balancing loss added to the objective,
expert utilisation logged per layer, DeepSeek-V3's bias update applied after each optimizer step."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

import evolm
import evolm.train.pretrain as pretrain_module
from evolm.models.build import init_weights
from evolm.models.config import DecoderConfig
from evolm.models.family import family_for
from evolm.nn.moe import MoE
from evolm.train.checkpoint import latest_complete

E, K = 8, 2


def tiny_mixtral(aux_coef: float) -> DecoderConfig:
    return family_for("mixtral").config_from_hf(
        {
            "model_type": "mixtral",
            "vocab_size": 512,
            "hidden_size": 64,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 128,
            "num_local_experts": E,
            "num_experts_per_tok": K,
            "router_aux_loss_coef": aux_coef,
            "tie_word_embeddings": True,
        }
    )


def build(cfg: DecoderConfig) -> torch.nn.Module:
    """Built on CPU (the MoE modules initialise their 3-D expert weights themselves)."""
    torch.manual_seed(0)
    model = family_for(cfg.family).new_model(cfg)
    init_weights(model)
    return model


def test_moe_pretrains_with_balancing_loss_and_logs_expert_load(tiny, tmp_path):
    cfg = tiny_mixtral(aux_coef=0.05)
    assert cfg.moe.aux_loss_coef == pytest.approx(0.1)  # transformers' coefficient times K
    evolm.save_model(build(cfg), tmp_path / "model")
    run = tiny.config(tmp_path / "run", model=str(tmp_path / "model"), steps=6, **{"optim.lr": 1e-2})
    pretrain_module.pretrain(run)
    records = tiny.metrics(run.out_dir)
    assert sorted(records) == [1, 2, 3, 4, 5, 6]
    for r in records.values():
        for layer in (0, 1):
            assert 1.0 <= r[f"model.layers.{layer}.mlp.load_max"] <= E / K
            assert 0.0 <= r[f"model.layers.{layer}.mlp.load_min"] <= 1.0
        # loss = (cross-entropy sum + aux * tokens) / tokens; the balancing loss is >= 1 per layer, times 0.1
        assert r["loss"] * 4 * 32 > r["ce_loss_sum"] + 0.1 * 2 * 100
    assert records[6]["loss"] < records[1]["loss"] - 0.2
    reloaded = evolm.load_model(latest_complete(Path(run.out_dir)))
    assert isinstance(reloaded.model.layers[0].mlp, MoE)


def test_bias_update_runs_after_each_optimizer_step(tiny, tmp_path, monkeypatch):
    """Auxiliary-loss-free balancing (DeepSeek-V3) in the loop: every step moves each bias by +-rate."""
    base = tiny_mixtral(aux_coef=0.0)
    moe = dataclasses.replace(base.moe, router="sigmoid", correction_bias=True, bias_update_rate=0.01)
    cfg = base.replace(moe=moe)
    model = build(cfg)
    monkeypatch.setattr(pretrain_module, "_model", lambda c, ckpt: model)
    monkeypatch.setattr(pretrain_module, "_model_config", lambda c, ckpt: cfg)
    pretrain_module.pretrain(tiny.config(tmp_path / "run", model="moe-in-memory", steps=3))
    for layer in model.model.layers:
        bias = layer.mlp.gate.e_score_correction_bias
        steps = bias / 0.01  # each step adds -1, 0 or +1 per expert
        torch.testing.assert_close(steps, steps.round(), rtol=0, atol=1e-4)
        assert bias.abs().max() > 0 and bias.abs().max() <= 0.03 + 1e-6
        assert layer.mlp._load_sum is None  # consumed by the last update


def _late_load_max(tiny, tmp_path, aux_coef: float, steps: int) -> float:
    """Busiest expert's load over the mean (1 balanced, E/K = 4 collapsed) over the last third of a
    run, worst layer, for a tiny Mixtral trained with Switch balancing coefficient ``aux_coef``."""
    evolm.save_model(build(tiny_mixtral(aux_coef)), tmp_path / f"model-{aux_coef}")
    run = tiny.config(tmp_path / f"run-{aux_coef}", model=str(tmp_path / f"model-{aux_coef}"), steps=steps,
                      **{"optim.lr": 1e-2, "data.batch_size": 8, "save_every": 0})
    pretrain_module.pretrain(run)
    records = tiny.metrics(run.out_dir)
    late = [records[s] for s in sorted(records)[-steps // 3 :]]
    return max(r[f"model.layers.{layer}.mlp.load_max"] for r in late for layer in (0, 1))


def test_balancing_loss_keeps_expert_load_in_band_and_its_absence_collapses(tiny, tmp_path):
    """Switch balancing (Fedus et al., 2021) holds the busiest expert under 2.5x the mean load;
    without it the routers collapse towards E/K = 4 (two experts take every token)."""
    balanced = _late_load_max(tiny, tmp_path, aux_coef=0.1, steps=60)
    free = _late_load_max(tiny, tmp_path, aux_coef=0.0, steps=60)
    print(f"late load_max: with balancing {balanced:.2f}, without {free:.2f}")
    assert balanced <= 2.5
    assert free >= 3.0
