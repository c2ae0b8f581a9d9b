"""Model families: how a Hugging Face ``config.json`` and state dict map onto evolm's modules.

A family is data plus four pure functions, one file per family in ``evolm.models.families``:
config from/to HF, state dict from/to HF. Families whose checkpoints already use evolm's
(Llama-style) tensor names keep the identity state mappings.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from evolm.errors import UnsupportedModelError
from evolm.models.config import DecoderConfig

if TYPE_CHECKING:
    from evolm.models.encoder import EncoderConfig

StateDict = dict[str, torch.Tensor]


def _identity(state: Mapping[str, torch.Tensor], cfg: DecoderConfig | EncoderConfig) -> StateDict:
    return dict(state)


# Checkpoint tensors most families may carry that are cached buffers, not weights.
_BUFFERS = ("rotary_emb.inv_freq",)


@dataclass(frozen=True)
class Family:
    """How one model family is read from and written to checkpoints.

    Attributes:
        name: evolm's family name (``DecoderConfig.family``).
        model_types: HF ``model_type`` values this family reads.
        architecture: HF ``architectures[0]`` written on save.
        config_from_hf: HF config dict -> ``DecoderConfig``.
        config_to_hf: ``DecoderConfig`` -> HF config dict.
        state_from_hf: HF tensors -> evolm tensors (renames, splitting fused projections).
        state_to_hf: evolm tensors -> HF tensors.
        ignored_keys: Suffixes of checkpoint tensors that carry no weights (cached buffers).
        build: Builds the module for a config (``CausalLM`` for decoders).
    """

    name: str
    model_types: tuple[str, ...]
    architecture: str
    config_from_hf: Callable[[dict], DecoderConfig | EncoderConfig]
    config_to_hf: Callable[[DecoderConfig | EncoderConfig], dict]
    state_from_hf: Callable[[Mapping[str, torch.Tensor], DecoderConfig | EncoderConfig], StateDict] = _identity
    state_to_hf: Callable[[Mapping[str, torch.Tensor], DecoderConfig | EncoderConfig], StateDict] = _identity
    ignored_keys: tuple[str, ...] = _BUFFERS
    build: Callable[[DecoderConfig | EncoderConfig], nn.Module] | None = None

    def new_model(self, cfg: DecoderConfig | EncoderConfig) -> nn.Module:
        """Construct an (uninitialised-weights) model for ``cfg`` on the current default device."""
        if self.build is not None:
            return self.build(cfg)
        from evolm.models.decoder import CausalLM

        return CausalLM(cfg)


def families_by_type(
    architectures: Mapping[str, str],
    config_from_hf: Callable[[dict], DecoderConfig | EncoderConfig],
    config_to_hf: Callable[[DecoderConfig | EncoderConfig], dict],
    state_from_hf: Callable[[Mapping[str, torch.Tensor], DecoderConfig | EncoderConfig], StateDict] = _identity,
    state_to_hf: Callable[[Mapping[str, torch.Tensor], DecoderConfig | EncoderConfig], StateDict] = _identity,
    ignored_keys: tuple[str, ...] = _BUFFERS,
) -> dict[str, Family]:
    """A family module's ``FAMILIES``: one ``Family`` per HF ``model_type``, named after it.

    Args:
        architectures: HF ``model_type`` -> the ``architectures[0]`` written on save.
        config_from_hf, config_to_hf, state_from_hf, state_to_hf, ignored_keys: ``Family``'s
            fields, shared by every model type of the module (converters read ``model_type`` or
            ``cfg.family`` where the types differ).
    """
    return {
        mt: Family(
            name=mt,
            model_types=(mt,),
            architecture=arch,
            config_from_hf=config_from_hf,
            config_to_hf=config_to_hf,
            state_from_hf=state_from_hf,
            state_to_hf=state_to_hf,
            ignored_keys=ignored_keys,
        )
        for mt, arch in architectures.items()
    }


# HF model_type -> module in evolm.models.families defining FAMILIES.
_MODULES: dict[str, str] = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
    "qwen3": "llama",
    "olmo": "llama",
    "olmo2": "llama",
    "gemma": "gemma",
    "gemma2": "gemma",
    "gpt2": "gpt2",
    "gpt_neox": "gpt_neox",
    "phi3": "phi3",
    "bloom": "bloom",
    "starcoder2": "starcoder2",
    "phi": "phi",
    "stablelm": "stablelm",
    "gptj": "gptj",
    "codegen": "gptj",
    "mixtral": "moe",
    "qwen2_moe": "moe",
    "qwen3_moe": "moe",
    "t5": "t5",
    "bart": "bart",
    "transformer": "transformer",
    "deepseek_v2": "deepseek",
    "deepseek_v3": "deepseek",
    "bert": "bert",
    "roberta": "bert",
    "distilbert": "bert",
    "electra": "bert",
}


def supported_model_types() -> list[str]:
    """Every HF ``model_type`` evolm can load."""
    return sorted(_MODULES)


def family_for(model_type: str) -> Family:
    """The family that reads checkpoints of HF ``model_type``.

    Raises:
        UnsupportedModelError: naming the type and listing the supported ones.
    """
    module = _MODULES.get(model_type)
    if module is None:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported; supported families: {', '.join(supported_model_types())}"
        )
    mod = importlib.import_module(f"evolm.models.families.{module}")
    families: dict[str, Family] = mod.FAMILIES
    return families[model_type]
