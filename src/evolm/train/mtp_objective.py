"""Multi-token prediction as a pretraining objective (DeepSeek-AI, 2024, DeepSeek-V3 §2.2;
after Gloeckle et al., 2024): next-token cross-entropy plus ``weight / D * sum_k CE_k``, where
depth k predicts token ``t + k + 1`` from the main model's final hidden state at ``t`` and the
embedding of token ``t + k``.

Each depth's cross-entropy is summed over its targets and normalised with the step's token count,
as the main loss is (``evolm.nn.mtp.mtp_loss`` is the per-depth-mean form of the paper).

The MTP head (``evolm.nn.mtp.MultiTokenPrediction``) becomes the trained model's ``mtp``
submodule, so the optimizer trains it, checkpoints hold it (``mtp.*`` tensors, which
``evolm.load_model`` re-attaches and transformers ignores) and resume is exact. Generation and
validation use the main head only: validation loss is the next-token loss, comparable with ``clm``.

Runs single-process or under DDP (the backbone's hidden states are taken with a forward hook, so
the forward still goes through the DDP wrapper); FSDP is refused.
"""

from __future__ import annotations

import torch
from torch import nn

from evolm.errors import ConfigError
from evolm.models.build import init_weights
from evolm.models.families.deepseek import build_mtp
from evolm.nn.losses import cross_entropy_sum
from evolm.train import distributed as D
from evolm.train.objectives import CausalLMObjective, Prepared, auxiliary_losses


class MultiTokenPredictionObjective(CausalLMObjective):
    """Next-token prediction plus DeepSeek-V3's MTP loss over ``depth`` extra tokens.

    Args:
        model: The causal LM to train (unwrapped); gains an ``mtp`` head unless it has one.
        depth: D, tokens predicted beyond the next one.
        weight: The MTP loss weight lambda (DeepSeek-V3: 0.3 for most of training, then 0.1).
    """

    name = "mtp"

    def __init__(self, model: nn.Module, depth: int = 1, weight: float = 0.3) -> None:
        if not hasattr(model, "lm_head") or not hasattr(model, "model"):
            raise ConfigError(f"objective='mtp' needs a causal language model; got {type(model).__name__}")
        if getattr(model, "mtp", None) is None:
            p = model.lm_head.weight
            mtp = build_mtp(model.cfg, depth)
            init_weights(mtp)
            model.mtp = mtp.to(device=p.device, dtype=p.dtype)
        self.weight = weight
        self._hidden: torch.Tensor | None = None
        model.model.register_forward_hook(self._keep_hidden)

    def _keep_hidden(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        self._hidden = output  # (B, T, C): the backbone's final (normed) hidden states

    def loss_sum(
        self, model: nn.Module, prepared: Prepared, device: torch.device
    ) -> tuple[torch.Tensor, dict[str, float]]:
        base = D.unwrap(model)
        if not isinstance(model, nn.parallel.DistributedDataParallel) and any(
            type(m).__name__.startswith("FSDP") for m in (model, base.model)
        ):
            raise ConfigError("objective='mtp' runs single-process or with DDP; FSDP is not supported yet")
        ids = prepared.inputs["input_ids"].to(device)
        docs = prepared.inputs["document_ids"].to(device)
        labels = prepared.targets["labels"].to(device)
        logits = model(input_ids=ids, document_ids=docs)  # through the wrapper: DDP's hooks run
        hidden, self._hidden = self._hidden, None
        loss, _ = cross_entropy_sum(logits, labels)
        metrics: dict[str, float] = {}
        if base.training:  # validation reports the next-token loss alone
            depth_logits = base.mtp(hidden, ids, base.model.embed_tokens, base.lm_head, document_ids=docs)
            # each depth's cross-entropy summed over its targets, like the main loss, so the step's
            # token normalisation makes it lambda / D * sum_k CE_k (a depth has (T - k) / T of the
            # positions) whatever the micro-batching or the number of ranks
            extra = sum(cross_entropy_sum(d, labels[:, k:])[0] for k, d in enumerate(depth_logits, 1))
            extra = extra * (self.weight / len(depth_logits))
            metrics["mtp_loss"] = float(extra.detach()) / max(prepared.count, 1)
            loss = loss + extra
        aux, aux_metrics = auxiliary_losses(base)
        if aux is not None:
            loss = loss + aux * prepared.count
        return loss, {**metrics, **aux_metrics}
