"""LoRA/DoRA adapters on disk in PEFT's format, read and written by name.

A PEFT LoRA directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` whose keys are
the wrapped model's parameter names under PEFT's prefix, without the adapter name::

    base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight          (r, I)
    base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight          (O, r)
    base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector  (O,)   DoRA only

``evolm.nn.lora.LoRALinear`` uses the same names, so a file maps onto an evolm model tensor by
tensor wherever evolm's module names are the checkpoint's (the Llama-layout families: Llama,
Mistral, Qwen2/3, OLMo, ...). Families whose checkpoints fuse or rename projections are refused
with a message rather than mapped approximately.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from evolm.errors import CheckpointError, ConfigError
from evolm.models.family import family_for
from evolm.nn.lora import LoRAConfig, LoRALinear, apply_lora, is_lora_param, lora_layers, lora_state_dict, matches
from evolm.nn.nf4 import Linear4bit

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."


def _check_names_are_hf(model: nn.Module, names: list[str]) -> None:
    """Raise unless the family writes these linear layers' weights under the same names."""
    cfg = getattr(model, "cfg", None)
    if cfg is None:
        return
    family = family_for(cfg.family)
    for name in names:
        layer = model.get_submodule(name)
        w = torch.empty(layer.out_features, layer.in_features, device="meta")
        try:
            out = family.state_to_hf({f"{name}.weight": w}, cfg)
        except Exception as e:  # a converter that needs the whole state dict: it fuses or reshapes
            raise ConfigError(
                f"the {cfg.family} family converts {name}.weight when saving ({type(e).__name__}); "
                "PEFT adapters are supported where evolm's module names are the checkpoint's (Llama layout)"
            ) from e
        if list(out) != [f"{name}.weight"] or tuple(out[f"{name}.weight"].shape) != tuple(w.shape):
            raise ConfigError(
                f"the {cfg.family} family stores {name}.weight as {list(out)} in its checkpoints; PEFT adapters "
                "are supported where evolm's module names are the checkpoint's (Llama layout)"
            )


def _target_modules(model: nn.Module, names: list[str]) -> list[str]:
    """PEFT ``target_modules`` selecting exactly ``names``: their last components if those pick the
    same set of linear layers, else the full names."""
    short = sorted({n.rsplit(".", 1)[-1] for n in names})
    picked = {
        n
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear | LoRALinear | Linear4bit)
        and matches(n, tuple(short))
        and not {"base_layer", "lora_A", "lora_B"} & set(n.split("."))
    }
    return short if picked == set(names) else list(names)


def save_adapter(model: nn.Module, directory: str | Path, base_model_name_or_path: str | None = None) -> Path:
    """Write the model's adapters as a PEFT LoRA directory that ``peft.PeftModel.from_pretrained`` loads.

    Args:
        model: An evolm model after ``apply_lora``.
        directory: Output directory (created).
        base_model_name_or_path: Recorded in ``adapter_config.json`` for the reader.

    Returns:
        The directory.
    """
    layers = lora_layers(model)
    if not layers:
        raise ConfigError("the model has no LoRA layers; call evolm.nn.lora.apply_lora first")
    cfgs = {layer.cfg for layer in layers.values()}
    if len(cfgs) != 1:
        raise ConfigError(f"adapters with different settings in one model cannot be saved as one PEFT adapter: {cfgs}")
    if any(layer.merged for layer in layers.values()):
        raise ConfigError("the adapters are merged into the base weights; unmerge_lora(model) before saving them")
    (cfg,) = cfgs
    names = list(layers)
    _check_names_are_hf(model, names)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": cfg.rank,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": _target_modules(model, names),
        "use_rslora": cfg.rslora,
        "use_dora": cfg.dora,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    tensors = {PREFIX + k: v.detach().contiguous() for k, v in lora_state_dict(model).items()}
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return out


def read_adapter_config(directory: str | Path) -> LoRAConfig:
    """The ``LoRAConfig`` of a PEFT LoRA directory; settings evolm does not implement are refused by name."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{directory} has no {CONFIG_FILE}; not a PEFT adapter directory")
    try:
        c = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e
    if c.get("peft_type") != "LORA":
        raise CheckpointError(f"{path}: peft_type={c.get('peft_type')!r}; only LORA adapters are read")
    unsupported = {
        "bias": ("none", None),
        "fan_in_fan_out": (False, None),
        "rank_pattern": ({}, None),
        "alpha_pattern": ({}, None),
        "layers_to_transform": (None,),
        "modules_to_save": (None, []),
        "use_qalora": (False, None),
        "lora_bias": (False, None),
    }
    for key, allowed in unsupported.items():
        if c.get(key, allowed[0]) not in allowed:
            raise CheckpointError(f"{path}: {key}={c[key]!r} is not supported (allowed: {list(allowed)})")
    targets = c.get("target_modules")
    if isinstance(targets, str):
        if targets != "all-linear":
            raise CheckpointError(f"{path}: target_modules as a regular expression ({targets!r}) is not supported")
        targets = [targets]
    if not targets:
        raise CheckpointError(f"{path}: target_modules is empty")
    return LoRAConfig(
        rank=int(c["r"]),
        alpha=float(c.get("lora_alpha", 8)),
        dropout=float(c.get("lora_dropout", 0.0)),
        targets=tuple(targets),
        rslora=bool(c.get("use_rslora", False)),
        dora=bool(c.get("use_dora", False)),
    )


def load_adapter(model: nn.Module, directory: str | Path) -> list[str]:
    """Wrap ``model``'s targeted layers (``apply_lora``) and load a PEFT LoRA directory into them.

    Every tensor of the file must land on an adapter parameter of the same shape, and every adapter
    parameter must be in the file. The checks run once the layers are wrapped: after an error the
    model holds untrained adapters and should be discarded.

    Returns:
        The names of the adapted modules.
    """
    cfg = read_adapter_config(directory)
    path = Path(directory) / WEIGHTS_FILE
    if not path.is_file():
        raise CheckpointError(f"{directory} has no {WEIGHTS_FILE}")
    raw = load_file(str(path))
    state = {}
    for key, value in raw.items():
        name = key.removeprefix(PREFIX)
        # some writers keep the adapter name ("lora_A.default.weight"); PEFT's own save drops it
        name = name.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")
        name = name.replace(".lora_magnitude_vector.default.weight", ".lora_magnitude_vector")
        if not is_lora_param(name):
            raise CheckpointError(f"{path}: tensor {key!r} is not a LoRA parameter")
        state[name] = value
    names = apply_lora(model, cfg)
    _check_names_are_hf(model, names)
    expected = lora_state_dict(model)
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not match the model's adapted layers: missing {missing[:6]}, unexpected {unexpected[:6]}"
        )
    for k, ref in expected.items():
        if tuple(state[k].shape) != tuple(ref.shape):
            raise CheckpointError(f"{path}: {k} has shape {tuple(state[k].shape)}; the model needs {tuple(ref.shape)}")
    with torch.no_grad():
        params = dict(model.named_parameters())
        for k, v in state.items():
            params[k].copy_(v.to(params[k].dtype))
    return names
