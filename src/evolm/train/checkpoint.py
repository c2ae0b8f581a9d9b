"""Training checkpoints that survive being killed at any instant.

Layout of a run directory::

    RUN/checkpoints/step-00000200/   config.json, model.safetensors (HF format: evolm.load_model and
                                     transformers both load it), tokenizer files, trainer_state.pt
                                     (optimizer, RNG, data position, step), COMPLETE
    RUN/checkpoints/.partial-.../    a save in progress; never read

A save writes into a ``.partial-*`` directory, fsyncs every file, writes the ``COMPLETE`` marker
last, renames the directory into place and fsyncs the parent: a kill at any point leaves either
the old set of checkpoints or the old set plus one complete new one. Resume takes the newest
directory that has the marker. ``trainer_state.pt`` is our own file, read back with
``torch.load(weights_only=True)`` (tensors and plain containers only, nothing executable).
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch

from evolm.errors import CheckpointError

MARKER = "COMPLETE"
STATE = "trainer_state.pt"
_NAME = re.compile(r"^step-(\d{8})$")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(path)


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_complete(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _NAME.match(p.name) and (p / MARKER).is_file()]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def latest_complete(run_dir: Path) -> Path | None:
    """The newest complete checkpoint, or None."""
    done = list_complete(run_dir)
    return done[-1] if done else None


def save_checkpoint(run_dir: Path, step: int, write_files, keep_last: int) -> Path:
    """Write a checkpoint atomically and prune old ones.

    Args:
        run_dir: The run directory.
        step: Optimizer steps done; names the checkpoint.
        write_files: ``f(directory)`` writing the checkpoint's files into ``directory``.
        keep_last: Complete checkpoints to keep (older ones are deleted after the new one lands).

    Returns:
        The checkpoint directory.
    """
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".partial-step-{step:08d}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()  # not mkdtemp: its 0700 would make the checkpoint unreadable to anyone else
    try:
        write_files(tmp)
        _fsync_tree(tmp)
        (tmp / MARKER).write_text(f"{step}\n")
        _fsync_tree(tmp)
        if final.exists():  # an earlier, interrupted run saved this step: replace it whole
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_complete(run_dir)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".partial-*"):  # left by a killed save
        shutil.rmtree(stale, ignore_errors=True)
    return final


def save_trainer_state(directory: Path, state: dict[str, Any]) -> None:
    torch.save(state, directory / STATE)


def load_trainer_state(checkpoint: Path) -> dict[str, Any]:
    path = checkpoint / STATE
    if not path.is_file():
        raise CheckpointError(f"{checkpoint} has no {STATE}; it is not a training checkpoint")
    return torch.load(path, map_location="cpu", weights_only=True)
