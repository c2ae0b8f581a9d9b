"""Data parallelism on CPU (gloo): 2 processes under torchrun, DDP or FSDP2, with B rows each, train
like 1 process with 2B rows: the same losses (fp32 tolerance), one set of files written by rank 0,
a checkpoint that loads with ``evolm.load_model``, and (FSDP) an exact resume from the full
optimizer state."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import evolm
from evolm.data import PackedDataset
from evolm.train.checkpoint import latest_complete, list_complete
from evolm.train.pretrain import pretrain

N = 4


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (read from /proc), children first."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(0), []):
            found.append(child)
            todo.append(child)
    return found


def torchrun(flags: list[str], timeout: float = 120) -> str:
    """``torchrun --nproc_per_node 2 -m evolm.cli.main train pretrain FLAGS``; its stdout.

    On timeout the launcher and its workers are killed (a collective that one rank never joins
    hangs the other forever, and the workers, each in its own session, outlive the launcher).
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.Popen(
        [*cmd, "-m", "evolm.cli.main", "train", "pretrain", *flags],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for pid in [proc.pid, *descendants(proc.pid)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"torchrun did not finish in {timeout} s (a rank waits in a collective?)\n{stderr[-4000:]}")
    assert proc.returncode == 0, stdout[-2000:] + stderr[-4000:]
    return stdout


@pytest.fixture(scope="module")
def setup(tiny, tmp_path_factory):
    """Fields of the runs, and the 1-process reference run with batch 2B.

    The sequence length is picked so that validation windows split unevenly between 2 ranks
    (rank 0 gets one batch more): FSDP must still run its all-gathers in step on both.
    """
    root = tmp_path_factory.mktemp("dist")
    tok = evolm.load_tokenizer(tiny.tokenizer)
    fields = {
        "steps": N,
        "grad_accum": 2,
        "eval_every": 2,
        "eval_batches": 0,
        "save_every": 2,
        "keep_last": 2,
        "data.sources": [tiny.small_corpus],
        "optim.lr": 1e-2,
    }
    for seq_len in range(24, 64):
        cfg = tiny.config(root / "probe", **fields, **{"data.seq_len": seq_len, "data.batch_size": 4})
        data = PackedDataset.from_config(dataclasses.replace(cfg.data, batch_size=8), tok)
        if data.validation_sequences % 4 == 1:  # 2 rows a batch, ranks get (V+1)/2 and (V-1)/2 windows
            break
    else:
        pytest.fail("no seq_len in [24, 64) splits the validation windows unevenly")
    fields["data.seq_len"] = seq_len
    single = tiny.config(root / "single", **fields, **{"data.batch_size": 4})
    pretrain(single)
    return root, fields, Path(single.out_dir)


@pytest.fixture(scope="module")
def two_ranks(tiny, setup):
    """``get(mode)``: the run directory and stdout of the 2-process run in ``mode``, run once."""
    root, fields, _ = setup
    done: dict[str, tuple[Path, str]] = {}

    def get(mode: str) -> tuple[Path, str]:
        if mode not in done:
            run = root / mode
            extra = {"sample_prompt": "def ", "sample_tokens": 4} if mode == "fsdp" else {}
            rank_batch = {"data.batch_size": 2, "data.dataset_dir": str(root / f"ds-{mode}")}
            done[mode] = run, torchrun(tiny.flags(run, distributed=mode, **fields, **extra, **rank_batch))
        return done[mode]

    return get


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_ranks_train_like_one_with_the_global_batch(tiny, setup, two_ranks, mode):
    single = setup[2]
    run, stdout = two_ranks(mode)
    if mode == "fsdp":
        assert stdout.count("sample> def ") == 1  # rank 0 samples from the gathered weights
    assert stdout.count('{"step": 4,') == 1  # the final metrics, printed by rank 0 only

    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == N  # one writer
    ref, got = tiny.metrics(single), tiny.metrics(run)
    for step in range(1, N + 1):
        assert got[step]["loss"] == pytest.approx(ref[step]["loss"], rel=1e-5), step
        assert got[step]["tokens"] == ref[step]["tokens"]
    for step in (2, 4):
        assert got[step]["val_loss"] == pytest.approx(ref[step]["val_loss"], rel=1e-5), step

    assert [c.name for c in list_complete(run)] == ["step-00000002", "step-00000004"]
    assert not list((run / "checkpoints").glob(".partial-*"))
    model = evolm.load_model(latest_complete(run))
    reference = evolm.load_model(latest_complete(single))
    theirs = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        # losses agree to 1e-5; in the weights Adam's 1/sqrt(v) turns rounding in a near-zero
        # gradient into up to ~1e-4 on single elements (one step moves a weight by up to lr=1e-2)
        torch.testing.assert_close(p, theirs[name], rtol=0, atol=1e-3, msg=name)
        assert (p - theirs[name]).abs().mean() < 1e-5, name


def test_fsdp_resumes_exactly_from_its_full_optimizer_state(tiny, setup, two_ranks):
    """Drop the final checkpoint of the FSDP run, resume from step 2: bitwise the same end."""
    root, fields, _ = setup
    straight, _ = two_ranks("fsdp")
    run = root / "fsdp-resumed"
    shutil.copytree(straight, run, ignore=shutil.ignore_patterns("step-00000004", "metrics.jsonl"))
    assert [c.name for c in list_complete(run)] == ["step-00000002"]
    flags = tiny.flags(
        run,
        distributed="fsdp",
        resume="always",
        **fields,
        **{"data.batch_size": 2, "data.dataset_dir": str(root / "ds-fsdp")},
    )
    torchrun(flags)
    got, ref = tiny.metrics(run), tiny.metrics(straight)
    assert sorted(got) == [3, 4]
    for step in (3, 4):
        assert got[step]["loss"] == ref[step]["loss"], step
    a, b = tiny.weights(latest_complete(run)), tiny.weights(latest_complete(straight))
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_mtp_objective_under_ddp_trains_like_one_process(tiny, tmp_path):
    """The MTP head is used after the DDP forward (its input is the backbone's output, taken with a
    hook): its gradients are still all-reduced, so 2 ranks give the 1-process losses."""
    fields = {
        "objective": "mtp",
        "steps": 2,
        "eval_every": 0,
        "save_every": 0,
        "data.sources": [tiny.small_corpus],
        "data.seq_len": 32,
        "optim.lr": 1e-2,
    }
    single = tiny.config(tmp_path / "single", **fields, **{"data.batch_size": 4})
    pretrain(single)
    run = tmp_path / "ddp"
    rank_batch = {"data.batch_size": 2, "data.dataset_dir": str(tmp_path / "ds-ddp")}
    torchrun(tiny.flags(run, distributed="ddp", **fields, **rank_batch))
    ref, got = tiny.metrics(single.out_dir), tiny.metrics(run)
    for step in (1, 2):
        assert got[step]["loss"] == pytest.approx(ref[step]["loss"], rel=1e-5), step
    assert got[2]["val_loss"] == pytest.approx(ref[2]["val_loss"], rel=1e-5)
