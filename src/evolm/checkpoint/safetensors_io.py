"""Reading and writing Hugging Face-style safetensors checkpoints, safely.

Only safetensors is read: it holds raw tensors and a JSON header, nothing executable. Pickle-based
files (``pytorch_model.bin``, ``*.pt``) are refused with the command that converts them.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from evolm.errors import CheckpointError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def pickle_refusal(path: Path) -> CheckpointError:
    """The error for a pickle checkpoint: evolm never unpickles, and says how to convert."""
    return CheckpointError(
        f"{path} is a pickle-based checkpoint; evolm loads only safetensors because unpickling can run "
        "arbitrary code. Convert it once, in an environment you trust, with transformers: "
        '`python -c "from transformers import AutoModelForCausalLM as M; '
        f"M.from_pretrained('{path.parent if path.is_file() else path}').save_pretrained('OUT_DIR', "
        'safe_serialization=True)"`, then load OUT_DIR.'
    )


@dataclass
class TensorFiles:
    """The tensors of a checkpoint directory and the file each came from."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    origin: dict[str, Path] = field(default_factory=dict)


def _read_file(path: Path, out: TensorFiles, names: set[str] | None = None) -> None:
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
            if names is not None and not names <= keys:
                missing = sorted(names - keys)
                raise CheckpointError(
                    f"{path} lacks {len(missing)} tensor(s) that {INDEX_NAME} assigns to it, e.g. {missing[:5]}"
                )
            for k in sorted(keys if names is None else names):
                if k in out.tensors:
                    raise CheckpointError(f"tensor {k!r} appears in both {out.origin[k]} and {path}")
                out.tensors[k] = f.get_tensor(k)
                out.origin[k] = path
    except SafetensorError as e:
        raise CheckpointError(
            f"{path} is not a readable safetensors file (truncated or corrupt: {e}); re-download or re-save it"
        ) from e


def read_safetensors_dir(directory: Path) -> TensorFiles:
    """Read every tensor of a checkpoint directory (single file or sharded with an index).

    Raises:
        CheckpointError: no safetensors, a pickle-only checkpoint, a missing or truncated shard,
            or an index that disagrees with its shards; the message names the file.
    """
    out = TensorFiles()
    index = directory / INDEX_NAME
    if index.is_file():
        try:
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index (needs a 'weight_map'): {e}") from e
        by_file: dict[str, set[str]] = {}
        for name, fname in weight_map.items():
            by_file.setdefault(fname, set()).add(name)
        missing = sorted(f for f in by_file if not (directory / f).is_file())
        if missing:
            raise CheckpointError(
                f"{index} lists {len(by_file)} shard(s) but {len(missing)} are missing from {directory}: {missing}"
            )
        for fname in sorted(by_file):
            _read_file(directory / fname, out, by_file[fname])
        return out
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        pickles = sorted(p for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise pickle_refusal(pickles[0])
        raise CheckpointError(f"no *.safetensors weights found in {directory}")
    for f in files:
        _read_file(f, out)
    return out


def _fsync_write(path: Path, writer) -> None:
    writer(path)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)  # safetensors creates files 0600; give them the usual permissions
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _own_storage(t: torch.Tensor) -> torch.Tensor:
    """``t``, copied out if it is a view of a larger storage (weights loaded into one block per layer,
    ``evolm.checkpoint.host_memory``): safetensors refuses tensors that share memory."""
    return t if t.untyped_storage().nbytes() == t.numel() * t.element_size() else t.clone()


def write_safetensors_dir(
    directory: Path, tensors: dict[str, torch.Tensor], config: dict, max_shard_bytes: int = 5 * 2**30
) -> list[Path]:
    """Write ``config.json`` and weights (sharded with an index above ``max_shard_bytes``).

    Every file is written under a temporary name, fsynced, then renamed into place, so an
    interrupted save never leaves a half-written file under a real name. Shards of an earlier
    save in the same directory that the new one no longer uses are removed at the end.

    Returns:
        The files written.
    """
    directory.mkdir(parents=True, exist_ok=True)
    if not os.access(directory, os.W_OK):
        raise CheckpointError(f"cannot write to {directory}: permission denied")
    tensors = {k: _own_storage(v.detach().contiguous().cpu()) for k, v in tensors.items()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k in sorted(tensors):
        nbytes = tensors[k].numel() * tensors[k].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = tensors[k]
        size += nbytes
    names = (
        [SINGLE_NAME]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    staged: list[tuple[Path, Path]] = []
    with tempfile.TemporaryDirectory(dir=directory, prefix=".evolm-save-") as tmp:
        tmpdir = Path(tmp)
        for name, shard in zip(names, shards, strict=True):
            _fsync_write(tmpdir / name, lambda p, s=shard: save_file(s, str(p), metadata={"format": "pt"}))
            staged.append((tmpdir / name, directory / name))
        if len(shards) > 1:
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            index = {
                "metadata": {"total_size": total},
                "weight_map": {k: n for n, s in zip(names, shards, strict=True) for k in s},
            }
            _fsync_write(tmpdir / INDEX_NAME, lambda p: p.write_text(json.dumps(index, indent=2)))
            staged.append((tmpdir / INDEX_NAME, directory / INDEX_NAME))
        _fsync_write(tmpdir / "config.json", lambda p: p.write_text(json.dumps(config, indent=2, sort_keys=True)))
        staged.append((tmpdir / "config.json", directory / "config.json"))
        for src, dst in staged:
            os.replace(src, dst)
    written = {dst for _, dst in staged}
    stale = [p for p in directory.glob("model*.safetensors") if p not in written]
    if len(shards) == 1 and (directory / INDEX_NAME).exists():
        stale.append(directory / INDEX_NAME)
    for p in stale:
        p.unlink()
    return sorted(written)
