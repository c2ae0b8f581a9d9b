"""The objective hook of the training loop: the causal objective, auxiliary losses, the registry."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from evolm.data.packing import Batch
from evolm.errors import ConfigError
from evolm.nn.losses import cross_entropy_sum
from evolm.train.objectives import CausalLMObjective, auxiliary_losses, make_objective


class _Aux(nn.Module):
    def __init__(self, value: float) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(value))

    def aux_loss(self):
        return self.w * 2, {"load_max": float(self.w.detach())}


class _Toy(nn.Module):
    """A 'language model' with one auxiliary-loss module: logits are a learned table lookup."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Embedding(11, 11)
        self.router = _Aux(0.25)

    def forward(self, input_ids, document_ids=None):
        return self.table(input_ids)


def test_causal_objective_counts_labelled_tokens_and_adds_weighted_aux_loss():
    torch.manual_seed(0)
    model = _Toy()
    ids = torch.randint(0, 11, (2, 5))
    labels = torch.randint(0, 11, (2, 5))
    labels[0, :2] = -100
    prepared = CausalLMObjective().prepare(Batch(ids, labels, torch.zeros_like(ids)))
    assert prepared.count == 8
    loss, metrics = CausalLMObjective().loss_sum(model, prepared, torch.device("cpu"))
    ce, n = cross_entropy_sum(model(ids), labels)
    assert n == 8
    torch.testing.assert_close(loss, ce + 0.5 * 8)  # aux (2 * 0.25) is a per-token mean
    assert metrics["router.load_max"] == 0.25 and metrics["ce_loss_sum"] == pytest.approx(float(ce.detach()))
    loss.backward()
    assert model.router.w.grad == pytest.approx(2 * 8)


def test_auxiliary_losses_absent_is_none():
    assert auxiliary_losses(nn.Linear(2, 2)) == (None, {})


def test_unknown_objective_names_the_known_ones():
    with pytest.raises(ConfigError, match=r"objective='mlmm' is unknown; known objectives: .*clm"):
        make_objective("mlmm", nn.Linear(2, 2))
    assert isinstance(make_objective("clm", nn.Linear(2, 2)), CausalLMObjective)
