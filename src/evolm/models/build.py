"""Building a fresh model from a preset name or a config, with GPT-2-style initialisation."""

from __future__ import annotations

import torch
from torch import nn

from evolm.models.config import DecoderConfig
from evolm.models.family import family_for
from evolm.models.presets import preset
from evolm.nn.norm import LayerNorm, RMSNorm


@torch.no_grad()
def init_weights(model: nn.Module, std: float = 0.02) -> None:
    """Initialise in place as GPT-2 / HF do: linear and embedding weights ~ N(0, std), biases 0,
    norm scales 1 (0 for Gemma's ``1 + w`` RMSNorm)."""
    for m in model.modules():
        if isinstance(m, nn.Linear | nn.Embedding):
            m.weight.normal_(0.0, std)
            if isinstance(m, nn.Linear) and m.bias is not None:
                m.bias.zero_()
        elif isinstance(m, RMSNorm):
            m.weight.fill_(0.0 if m.unit_offset else 1.0)
        elif isinstance(m, LayerNorm):
            if m.weight is not None:
                m.weight.fill_(1.0)
            if m.bias is not None:
                m.bias.zero_()
        elif callable(getattr(m, "init_weights", None)):
            m.init_weights(std)  # modules owning non-Linear parameters (MoE experts, routers)


def build_model(
    config: str | DecoderConfig,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    seed: int | None = None,
) -> nn.Module:
    """A freshly initialised model for a preset name (see ``evolm.models.presets``) or a config.

    Args:
        config: Preset name or ``DecoderConfig``.
        dtype: Parameter dtype.
        device: Parameter device (default CPU).
        seed: Seed for the initialisation (default: the global RNG).
    """
    cfg = preset(config) if isinstance(config, str) else config
    family = family_for(cfg.family)
    with torch.device("meta"):
        model = family.new_model(cfg)
    model.to_empty(device=device or "cpu")
    model.tie_weights()
    gen_state = torch.random.get_rng_state()
    if seed is not None:
        torch.manual_seed(seed)
    init_weights(model)
    if seed is not None:
        torch.random.set_rng_state(gen_state)
    return model.to(dtype)
