"""Atomic training checkpoints: what a failed or interrupted save leaves, which directory resume
picks, pruning, permissions, and ``trainer_state.pt`` read back with ``weights_only=True``."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch

from evolm.errors import CheckpointError
from evolm.train.checkpoint import (
    MARKER,
    STATE,
    latest_complete,
    list_complete,
    load_trainer_state,
    save_checkpoint,
    save_trainer_state,
)


def writer(text: str):
    def write(directory: Path) -> None:
        (directory / "weights.txt").write_text(text)

    return write


def test_save_lands_whole_with_its_marker(tmp_path):
    path = save_checkpoint(tmp_path, 7, writer("seven"), keep_last=2)
    assert path == tmp_path / "checkpoints" / "step-00000007"
    assert (path / "weights.txt").read_text() == "seven" and (path / MARKER).read_text() == "7\n"
    assert latest_complete(tmp_path) == path
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-00000007"]
    # readable like any directory the user creates (mkdtemp's 0700 would hide it from others)
    (tmp_path / "plain").mkdir()
    assert path.stat().st_mode & 0o777 == (tmp_path / "plain").stat().st_mode & 0o777


def test_failed_save_leaves_the_previous_checkpoints(tmp_path):
    save_checkpoint(tmp_path, 2, writer("two"), keep_last=1)

    def half_then_fail(directory: Path) -> None:
        (directory / "weights.txt").write_text("fo")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, 4, half_then_fail, keep_last=1)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-00000002"]
    assert (latest_complete(tmp_path) / "weights.txt").read_text() == "two"


def test_resume_reads_only_complete_well_named_directories(tmp_path):
    root = tmp_path / "checkpoints"
    save_checkpoint(tmp_path, 3, writer("three"), keep_last=5)
    # what kills leave behind: a partial save (even one killed after its marker, before the
    # rename), a step directory without its marker, and names that are not ours
    for name, marker in (
        (".partial-step-00000009-1-abc", True),
        ("step-00000008", False),
        ("step-9", True),
        ("step-00000010.old", True),
    ):
        (root / name).mkdir()
        if marker:
            (root / name / MARKER).write_text("x\n")
    assert list_complete(tmp_path) == [root / "step-00000003"]
    save_checkpoint(tmp_path, 5, writer("five"), keep_last=5)  # sweeps the stale partial
    assert not (root / ".partial-step-00000009-1-abc").exists()
    assert list_complete(tmp_path) == [root / "step-00000003", root / "step-00000005"]


def test_keep_last_prunes_the_oldest_after_the_new_one_lands(tmp_path):
    for step in (10, 20, 30, 40):
        save_checkpoint(tmp_path, step, writer(str(step)), keep_last=2)
    assert [p.name for p in list_complete(tmp_path)] == ["step-00000030", "step-00000040"]
    assert latest_complete(tmp_path / "elsewhere") is None


class Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_trainer_state_round_trip_and_refuses_code(tmp_path):
    state = {"step": 3, "optimizer": {"state": {0: {"exp_avg": torch.ones(2)}}}, "rng": [1, 2], "data": {"epoch": 0}}
    save_trainer_state(tmp_path, state)
    back = load_trainer_state(tmp_path)
    assert back["step"] == 3 and torch.equal(back["optimizer"]["state"][0]["exp_avg"], torch.ones(2))
    torch.save({"step": 3, "evil": Payload()}, tmp_path / STATE)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        load_trainer_state(tmp_path)
    with pytest.raises(CheckpointError, match=f"has no {STATE}; it is not a training checkpoint"):
        load_trainer_state(tmp_path / "empty")
