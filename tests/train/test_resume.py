"""Checkpoints survive SIGKILL: a run killed mid-training, or in the middle of writing a
checkpoint, resumes to exactly (bitwise) the losses, weights and optimizer state of an
uninterrupted run, across an epoch boundary and with gradient accumulation.

Every run is a child process (``killable_run.py``) in one CPU thread, so the straight run and
the killed-then-resumed one do the same floating-point operations in the same order.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import evolm
from evolm.data import PackedDataset
from evolm.train.checkpoint import MARKER, STATE, latest_complete, list_complete, load_trainer_state

CHILD = Path(__file__).with_name("killable_run.py")
N = 8  # optimizer steps


def run_fields(tiny) -> dict:
    """Steps of 2 micro-batches x 2 rows of the small corpus (an epoch is a few steps), a checkpoint
    every 2 steps of which only the newest is kept, validation at steps 4 and 8."""
    return {
        "steps": N,
        "grad_accum": 2,
        "save_every": 2,
        "keep_last": 1,
        "eval_every": 4,
        "data.sources": [tiny.small_corpus],
        "data.batch_size": 2,
        "optim.lr": 1e-2,
    }


def run_child(flags: list[str], *own: str, killed: bool = False) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(CHILD), *own, *flags], capture_output=True, text=True, timeout=300, env=env
    )
    expected = -signal.SIGKILL if killed else 0
    assert proc.returncode == expected, f"exit {proc.returncode}, expected {expected}\n{proc.stderr[-3000:]}"


def assert_same_run(tiny, a: Path, b: Path) -> None:
    """Bitwise-equal losses (last record per step), final weights, optimizer and data state."""
    ma, mb = tiny.metrics(a), tiny.metrics(b)
    assert sorted(ma) == sorted(mb) == list(range(1, N + 1))
    for step in ma:
        for key in ("loss", "lr", "val_loss"):
            assert ma[step].get(key) == mb[step].get(key), (step, key)
    ca, cb = latest_complete(a), latest_complete(b)
    assert ca.name == cb.name == f"step-{N:08d}"
    wa, wb = tiny.weights(ca), tiny.weights(cb)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name
    sa, sb = load_trainer_state(ca), load_trainer_state(cb)
    assert sa["step"] == sb["step"] == N and sa["data"] == sb["data"]
    for i, state in sa["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.equal(value, sb["optimizer"]["state"][i][key]), (i, key)


@pytest.fixture(scope="module")
def straight(tiny, tmp_path_factory) -> Path:
    """The uninterrupted run."""
    run = tmp_path_factory.mktemp("straight") / "run"
    run_child(tiny.flags(run, **run_fields(tiny)))
    return run


def test_sigkilled_run_resumes_bitwise(tiny, straight, tmp_path):
    cfg = tiny.config(tmp_path, **run_fields(tiny))
    data_cfg = dataclasses.replace(cfg.data, batch_size=cfg.data.batch_size * cfg.grad_accum)
    per_epoch = PackedDataset.from_config(data_cfg, evolm.load_tokenizer(tiny.tokenizer)).steps_per_epoch
    assert 4 < per_epoch < N  # resumed at step 4 mid-epoch; the epoch ends after the resume

    run = tmp_path / "run"
    run_child(tiny.flags(run, **run_fields(tiny)), "--kill-after-step", "5", killed=True)
    assert [c.name for c in list_complete(run)] == ["step-00000004"]
    assert max(tiny.metrics(run)) == 5  # step 5 was trained and logged, then lost

    run_child(tiny.flags(run, resume="always", **run_fields(tiny)))
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 5, 6, 7, 8]  # step 5 again, from the step-4 checkpoint
    assert_same_run(tiny, straight, run)


def test_kill_while_saving_keeps_the_previous_checkpoint(tiny, straight, tmp_path):
    run = tmp_path / "run"
    run_child(tiny.flags(run, **run_fields(tiny)), "--kill-in-save", "6", killed=True)
    root = run / "checkpoints"
    # the step-6 save died before its marker: step 4 is still the newest complete checkpoint
    assert latest_complete(run) == root / "step-00000004"
    (partial,) = root.glob(".partial-step-00000006-*")
    assert (partial / "model.safetensors").is_file() and not (partial / MARKER).exists()
    assert (partial / STATE).stat().st_size < (root / "step-00000004" / STATE).stat().st_size
    with pytest.raises(Exception):  # noqa: B017 (what it raises is torch's business; it must not load)
        load_trainer_state(partial)

    run_child(tiny.flags(run, resume="always", **run_fields(tiny)))
    assert not list(root.glob(".partial-*"))  # swept by the next save
    assert [c.name for c in list_complete(run)] == [f"step-{N:08d}"]
    assert_same_run(tiny, straight, run)
