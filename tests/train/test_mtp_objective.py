"""Multi-token prediction (DeepSeek-V3) as a pretraining objective: the loss, the head in the
checkpoint, exact resume (DDP: tests/train/test_distributed.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

import evolm
from evolm.data.packing import Batch
from evolm.nn.losses import cross_entropy_sum
from evolm.train.checkpoint import latest_complete
from evolm.train.mtp_objective import MultiTokenPredictionObjective
from evolm.train.pretrain import pretrain


def test_loss_is_next_token_plus_weighted_mean_of_depth_cross_entropies(tiny):
    torch.manual_seed(0)
    model = evolm.load_model(tiny.model).train()
    objective = MultiTokenPredictionObjective(model, depth=2, weight=0.3)
    ids = torch.randint(0, 512, (2, 12))
    labels = torch.cat([ids[:, 1:], torch.full((2, 1), -100)], dim=1)
    prepared = objective.prepare(Batch(ids, labels, torch.zeros_like(ids)))
    loss, metrics = objective.loss_sum(model, prepared, torch.device("cpu"))
    # by hand: depth k at position i predicts token i + k + 1 = labels[:, i + k]
    hidden = model.model(ids)
    ce, n = cross_entropy_sum(model.lm_head(hidden), labels)
    depth = model.mtp(hidden, ids, model.model.embed_tokens, model.lm_head)
    sums = [cross_entropy_sum(d, labels[:, k:])[0] for k, d in enumerate(depth, 1)]  # 11 and 10 targets a row
    torch.testing.assert_close(loss, ce + 0.3 / 2 * sum(sums))
    assert metrics["mtp_loss"] == pytest.approx(float(0.3 / 2 * sum(sums).detach()) / int(n), rel=1e-5)
    loss.backward()
    assert all(p.grad is not None for p in model.mtp.parameters())
    model.eval()  # validation: the next-token loss alone
    torch.testing.assert_close(objective.loss_sum(model, prepared, torch.device("cpu"))[0], ce)


def test_pretrain_with_mtp_saves_the_head_and_resumes_exactly(tiny, tmp_path):
    run = tiny.config(tmp_path / "run", model=tiny.model, objective="mtp", steps=4, save_every=2, keep_last=3)
    pretrain(run)
    records = tiny.metrics(run.out_dir)
    assert all(records[s]["mtp_loss"] > 0 for s in records)
    final = latest_complete(Path(run.out_dir))
    straight = tiny.weights(final)
    assert any(k.startswith("mtp.depths.0.") for k in straight)
    reloaded = evolm.load_model(final)
    assert reloaded.mtp is not None and len(reloaded.mtp.depths) == 1
    # drop the last checkpoint and its log lines, resume from step 2: same steps 3-4, same weights
    shutil.rmtree(final)
    metrics = Path(run.out_dir) / "metrics.jsonl"
    metrics.write_text("".join(line for line in metrics.read_text().splitlines(True)[:2]))
    pretrain(run)
    resumed = tiny.metrics(run.out_dir)
    assert [resumed[s]["loss"] for s in (3, 4)] == [records[s]["loss"] for s in (3, 4)]
    again = tiny.weights(latest_complete(Path(run.out_dir)))
    assert straight.keys() == again.keys()
    assert all(torch.equal(straight[k], again[k]) for k in straight)
