"""Training objectives: what a recipe's loop computes a loss from, kept apart from the loop.

The pretraining loop is objective-agnostic::

    prepared = objective.prepare(batch)               # masking / corruption on CPU: fixes the count
    n_global = all_reduce(sum(p.count for p in micro_batches))
    loss_sum, metrics = objective.loss_sum(model, prepared, device)
    backward(loss_sum * world_size / n_global)        # every counted unit weighs the same

``prepare`` draws its randomness from the generator it is given (the loop passes the global
torch RNG's state through ``torch.Generator`` semantics: ``None`` means the global RNG, which
the trainer checkpoints, so resumed runs mask identically). Validation passes a generator seeded
with a constant so every validation pass sees the same corruption.

Objectives register by name in ``OBJECTIVES``; ``PretrainConfig.objective`` picks one.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from evolm.data.packing import Batch
from evolm.errors import ConfigError
from evolm.nn.losses import cross_entropy_sum


@dataclass
class Prepared:
    """A micro-batch ready for the model.

    Attributes:
        inputs: Keyword arguments of the model's forward (CPU tensors; moved by ``loss_sum``).
        targets: What the loss compares against (CPU tensors).
        count: Number of loss terms ``loss_sum`` adds up (tokens with a label): the
            normaliser of token-normalised gradient accumulation.
    """

    inputs: dict[str, torch.Tensor]
    targets: dict[str, torch.Tensor]
    count: int
    extra: dict[str, object] = field(default_factory=dict)


class Objective(Protocol):
    """What a training loop needs from an objective."""

    name: str

    def prepare(self, batch: Batch, generator: torch.Generator | None = None) -> Prepared:
        """Turn a packed batch into model inputs and targets (randomness from ``generator``)."""
        ...

    def loss_sum(
        self, model: nn.Module, prepared: Prepared, device: torch.device
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Summed loss over ``prepared.count`` units (a 0-d tensor with grad) and extra metrics.

        Metrics are per-micro-batch values the logger averages over a step (e.g. MoE load).
        """
        ...


def auxiliary_losses(model: nn.Module) -> tuple[torch.Tensor | None, dict[str, float]]:
    """Sum of the auxiliary losses modules recorded in their last forward, and their metrics.

    A module takes part by defining ``aux_loss() -> (loss | None, metrics)`` (MoE routers: load
    balancing, z-loss). The loss is already weighted by its coefficient; it is a per-token mean,
    so callers multiply it by their token count to put it on the ``loss_sum`` scale.
    """
    total: torch.Tensor | None = None
    metrics: dict[str, float] = {}
    for name, module in model.named_modules():
        fn = getattr(module, "aux_loss", None)
        if fn is None or not callable(fn):
            continue
        loss, m = fn()
        if loss is not None:
            total = loss if total is None else total + loss
        for k, v in m.items():
            metrics[f"{name}.{k}" if name else k] = float(v)
    return total, metrics


class CausalLMObjective:
    """Next-token prediction (Radford et al., 2018): cross-entropy on the packed ``labels``,
    documents kept apart with ``document_ids``; module auxiliary losses are added when present."""

    name = "clm"

    def prepare(self, batch: Batch, generator: torch.Generator | None = None) -> Prepared:
        return Prepared(
            inputs={"input_ids": batch.input_ids, "document_ids": batch.document_ids},
            targets={"labels": batch.labels},
            count=int((batch.labels != -100).sum()),
        )

    def loss_sum(
        self, model: nn.Module, prepared: Prepared, device: torch.device
    ) -> tuple[torch.Tensor, dict[str, float]]:
        logits = model(**{k: v.to(device) for k, v in prepared.inputs.items()})
        loss, _ = cross_entropy_sum(logits, prepared.targets["labels"].to(device))
        aux, metrics = auxiliary_losses(model)
        if aux is not None:
            metrics["ce_loss_sum"] = float(loss.detach())
            loss = loss + aux * prepared.count
        return loss, metrics


# name -> "module:factory"; the factory takes the (unwrapped) model and returns the objective.
# Imported lazily, so an objective's module loads only when a run asks for it.
OBJECTIVES: dict[str, str] = {
    "clm": "evolm.train.objectives:CausalLMObjective",
    "mlm": "evolm.train.encoder_objectives:MaskedLMObjective",
    "electra": "evolm.train.encoder_objectives:ElectraObjective",
    "distil": "evolm.train.encoder_objectives:DistillationObjective",
    "span_corruption": "evolm.train.seq2seq_objectives:span_corruption",
    "text_infilling": "evolm.train.seq2seq_objectives:text_infilling",
    "mtp": "evolm.train.mtp_objective:MultiTokenPredictionObjective",
}


def make_objective(name: str, model: nn.Module) -> Objective:
    """The objective called ``name`` for ``model``.

    Raises:
        ConfigError: naming the unknown objective and listing the known ones.
    """
    target = OBJECTIVES.get(name)
    if target is None:
        raise ConfigError(f"objective={name!r} is unknown; known objectives: {', '.join(sorted(OBJECTIVES))}")
    module, _, attr = target.partition(":")
    factory = getattr(importlib.import_module(module), attr)
    return factory(model) if not isinstance(factory, type) or _takes_model(factory) else factory()


def _takes_model(cls: type) -> bool:
    import inspect

    return len(inspect.signature(cls).parameters) > 0
