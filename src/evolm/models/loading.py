"""``load_model`` / ``save_model``: Hugging Face directories and GGUF files in, HF directories out.

Loading builds the model on the ``meta`` device (no memory, no random init), checks every tensor
against the config (names and shapes), and only then materialises it with
``load_state_dict(assign=True)``. Any mismatch raises before a model is returned: nothing is
ever partially loaded.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from evolm.checkpoint import host_memory
from evolm.checkpoint.safetensors_io import PICKLE_SUFFIXES, pickle_refusal, read_safetensors_dir, write_safetensors_dir
from evolm.errors import CheckpointError, ConfigError
from evolm.models.config import DecoderConfig
from evolm.models.family import Family, family_for


def read_hf_config(directory: Path) -> dict:
    """The parsed ``config.json`` of a checkpoint directory, with a clear error if absent or invalid."""
    path = directory / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{directory} has no config.json; a Hugging Face checkpoint directory needs one")
    try:
        hf = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(hf, dict) or "model_type" not in hf:
        raise CheckpointError(f"{path} has no 'model_type' field; cannot tell which model family it is")
    return hf


def config_from_hf(hf: dict, source: Path | str = "config.json") -> tuple[Family, DecoderConfig]:
    """Family and ``DecoderConfig`` for an HF config dict; errors name ``source``."""
    family = family_for(hf["model_type"])
    try:
        return family, family.config_from_hf(hf)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from e
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{source}: invalid value in config ({e})") from e


def load_config(path: str | Path) -> tuple[Family, DecoderConfig]:
    """Family and config of a checkpoint (directory or .gguf) without reading the weights' data."""
    p = Path(path)
    if p.suffix == ".gguf":
        from evolm.checkpoint.gguf import read_gguf_config

        return config_from_hf(read_gguf_config(p), p)
    _check_exists(p)
    directory = p if p.is_dir() else p.parent
    return config_from_hf(read_hf_config(directory), directory / "config.json")


def _check_exists(p: Path) -> None:
    if not p.exists():
        raise CheckpointError(f"{p} does not exist; pass a Hugging Face model directory or a .gguf file")
    if p.is_file() and p.suffix in PICKLE_SUFFIXES:
        raise pickle_refusal(p)


def load_model(
    path: str | Path, dtype: torch.dtype | None = None, device: torch.device | str | None = None
) -> nn.Module:
    """Load a model from a Hugging Face directory (``config.json`` + safetensors) or a ``.gguf`` file.

    Args:
        path: Checkpoint directory, or a GGUF file.
        dtype: Parameter dtype; default: the checkpoint's own floating dtype (float32 for GGUF,
            whose quantised tensors are dequantised).
        device: Where the parameters go; default CPU.

    Returns:
        The model (in eval mode); ``model(input_ids)`` returns logits (B, T, V).

    Raises:
        CheckpointError: missing/truncated/unsafe files, tensors that do not match the config.
        UnsupportedModelError: a family evolm does not build (the message lists those it does).
    """
    p = Path(path)
    _check_exists(p)
    if p.is_file() and p.suffix == ".gguf":
        from evolm.checkpoint.gguf import read_gguf

        ckpt = read_gguf(p)
        family, cfg = config_from_hf(ckpt.hf_config, p)
        origin = dict.fromkeys(ckpt.tensors, p)
        return _assemble(family, cfg, ckpt.tensors, origin, dtype or torch.float32, device, p)
    if p.is_file():
        raise CheckpointError(f"{p} is a file; pass the checkpoint directory that holds it and its config.json")
    hf = read_hf_config(p)
    family, cfg = config_from_hf(hf, p / "config.json")
    files = read_safetensors_dir(p)
    return _assemble(family, cfg, files.tensors, files.origin, dtype, device, p)


def _attach_mtp(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Re-attach a multi-token prediction head trained with evolm (``mtp.depths.K.*`` tensors,
    objective ``mtp``) so checkpoints of such runs load, and resume, whole."""
    depths = {int(k.split(".")[2]) for k in state if k.startswith("mtp.depths.")}
    if depths:
        from evolm.models.families.deepseek import build_mtp

        model.mtp = build_mtp(model.cfg, max(depths) + 1)


def _assemble(
    family: Family,
    cfg: DecoderConfig,
    tensors: dict[str, torch.Tensor],
    origin: dict[str, Path],
    dtype: torch.dtype | None,
    device: torch.device | str | None,
    source: Path,
) -> nn.Module:
    tensors = {k: v for k, v in tensors.items() if not k.endswith(family.ignored_keys)}
    if dtype is None:
        floats = Counter(t.dtype for t in tensors.values() if t.is_floating_point())
        dtype = floats.most_common(1)[0][0] if floats else torch.float32
    state = family.state_from_hf(tensors, cfg)
    with torch.device("meta"):
        model = family.new_model(cfg)
        _attach_mtp(model, state)
    expected = dict(model.state_dict())
    if cfg.tie_embeddings:
        expected.pop("lm_head.weight", None)
        state.pop("lm_head.weight", None)  # some checkpoints store the tied copy too
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = [f"{source}: checkpoint tensors do not match the {cfg.family} config"]
        if missing:
            parts.append(f"missing {len(missing)}: {missing[:8]}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)}: {unexpected[:8]}")
        raise CheckpointError("; ".join(parts))
    for name, ref in expected.items():
        got = state[name]
        if tuple(got.shape) != tuple(ref.shape):
            where = origin.get(name, source)
            raise CheckpointError(
                f"{where}: tensor {name!r} has shape {tuple(got.shape)} but the config "
                f"({source}) implies {tuple(ref.shape)}"
                + (
                    f"; vocab_size in config is {cfg.vocab_size}"
                    if name in ("model.embed_tokens.weight", "lm_head.weight")
                    else ""
                )
            )
    # Always copy: safetensors hands back tensors over the file's mmap, and a weight left there is
    # read from page-cache pages, which halves gemv bandwidth on some hosts (measured in
    # benchmarks/README.md), and ties the model to a file that may later change under it.
    target = torch.device("cpu") if device is None else torch.device(device)
    packed = _pack_for_decoding(model, state, dtype) if target.type == "cpu" else {}
    for k, v in state.items():
        if k not in packed:
            packed[k] = v.to(device=target, dtype=dtype if v.is_floating_point() else v.dtype, copy=True)
    state = packed
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise CheckpointError(f"{source}: no data loaded for {left[:8]}")
    return model.eval()


_LAYER = re.compile(r"^(.*?\.\d+)\.")  # the first numbered module of a path: model.layers.3, encoder.layer.0


def _pack_for_decoding(model: nn.Module, state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """CPU copies, in ``dtype``, of the weights a decode step streams, in huge-page blocks
    (``evolm.checkpoint.host_memory``): the ``nn.Linear`` weights of each numbered layer side by side
    in the model's own order (q, k, v, o, gate, up, down), and every other floating tensor of at
    least 2 MB (embeddings, output head) in a block of its own. Only ``nn.Linear`` weights share a
    layer's block, so swapping all of them out (QLoRA's quantisation) frees it.
    """
    layers: dict[str, list[str]] = {}
    for name, module in model.named_modules():
        key = f"{name}.weight"
        if isinstance(module, nn.Linear) and key in state and (m := _LAYER.match(name)):
            layers.setdefault(m.group(1), []).append(key)
    grouped = {k for names in layers.values() for k in names}
    alone = [
        [k]
        for k, v in state.items()
        if k not in grouped and v.is_floating_point() and v.numel() * dtype.itemsize >= host_memory.HUGE_PAGE
    ]
    out = {}
    for names in [*layers.values(), *alone]:
        out.update(zip(names, host_memory.pack([state[k] for k in names], dtype), strict=True))
    return out


def save_model(
    model: nn.Module, directory: str | Path, max_shard_size: int = 5 * 2**30, state_dict: dict | None = None
) -> list[Path]:
    """Save ``model`` as a Hugging Face directory that ``transformers`` and ``load_model`` read.

    Writes ``config.json`` and ``model.safetensors`` (or numbered shards plus
    ``model.safetensors.index.json`` above ``max_shard_size`` bytes). Files are written under
    temporary names and renamed into place; other files in the directory (tokenizer) are kept.

    Args:
        model: The model (its config names the family).
        directory: Where to write.
        max_shard_size: Largest shard in bytes.
        state_dict: The tensors to write instead of ``model.state_dict()`` (e.g. the gathered full
            state of a sharded model).

    Returns:
        The files written.
    """
    cfg = getattr(model, "cfg", None)
    if not isinstance(getattr(cfg, "family", None), str):  # DecoderConfig, EncoderConfig, ...
        raise TypeError(f"save_model needs an evolm model with a config naming its family; got {type(model).__name__}")
    family = family_for(cfg.family)
    state = dict(model.state_dict() if state_dict is None else state_dict)
    if cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
    state = family.state_to_hf(state, cfg)
    hf = family.config_to_hf(cfg)
    dtype = next(iter(state.values())).dtype
    hf["torch_dtype"] = str(dtype).removeprefix("torch.")
    return write_safetensors_dir(Path(directory), state, hf, max_shard_size)
