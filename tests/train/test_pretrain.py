"""The pretraining loop on a tiny Llama: token-normalised gradient accumulation, the stored loss
curve, divergence, and the command line end to end."""

from __future__ import annotations

import dataclasses
import json
import math
import random
from pathlib import Path

import pytest
import torch

import evolm
from evolm.cli.main import main
from evolm.data import PackedDataset
from evolm.tokenizer.train import save_tokenizer, train_tokenizer
from evolm.train.checkpoint import latest_complete, list_complete
from evolm.train.config import PretrainConfig, config_from_dict
from evolm.train.pretrain import TrainingDivergedError, pretrain

EXPECTED = Path(__file__).with_name("expected_losses.json")


def steps_per_epoch(tiny, cfg: PretrainConfig) -> int:
    """Optimizer steps in one epoch of ``cfg``'s data (one global batch of B * grad_accum rows each)."""
    data_cfg = dataclasses.replace(cfg.data, batch_size=cfg.data.batch_size * cfg.grad_accum)
    return PackedDataset.from_config(data_cfg, evolm.load_tokenizer(cfg.tokenizer)).steps_per_epoch


def test_grad_accum_equals_one_batch_of_all_micro_batches(tiny, tmp_path):
    """grad_accum=2 of 2 rows == 1 batch of 4 rows: same losses, same weights, across an epoch end."""
    common = {"data.sources": [tiny.small_corpus], "steps": 9, "optim.lr": 1e-2, "eval_every": 9}
    split = tiny.config(tmp_path / "accum", grad_accum=2, **{"data.batch_size": 2}, **common)
    whole = tiny.config(tmp_path / "whole", grad_accum=1, **{"data.batch_size": 4}, **common)
    assert steps_per_epoch(tiny, whole) < 9  # the runs cross into the second epoch
    pretrain(split)
    pretrain(whole)
    a, b = tiny.metrics(split.out_dir), tiny.metrics(whole.out_dir)
    assert sorted(a) == sorted(b) == list(range(1, 10))
    for step in a:
        assert a[step]["loss"] == pytest.approx(b[step]["loss"], rel=1e-6), step
        assert a[step]["lr"] == b[step]["lr"]
        assert a[step]["tokens"] == b[step]["tokens"] == step * 4 * 32
    assert a[9]["val_loss"] == pytest.approx(b[9]["val_loss"], rel=1e-6)
    assert a[1]["loss"] != pytest.approx(a[9]["loss"], rel=1e-2)  # it did learn something
    wa = tiny.weights(latest_complete(Path(split.out_dir)))
    wb = tiny.weights(latest_complete(Path(whole.out_dir)))
    assert wa.keys() == wb.keys()
    # Adam divides by sqrt(v): on an element whose gradient is near zero, fp32 rounding of sums
    # taken in another order becomes up to ~1e-4 of weight; one step moves a weight up to lr=1e-2
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=0, atol=1e-3, msg=name)
        assert (wa[name] - wb[name]).abs().mean() < 1e-5, name


def synthetic_documents(n: int) -> list[str]:
    """Python-looking documents drawn from ``random.Random(0)``: the same bytes on every platform
    and Python version, unlike the standard library's sources."""
    rng = random.Random(0)
    names = ["alpha", "beta", "gamma", "delta", "total", "count", "value", "items", "result", "index"]
    docs = []
    for d in range(n):
        lines = [f"def function_{d}({rng.choice(names)}, {rng.choice(names)}):"]
        for _ in range(rng.randint(4, 12)):
            a, b, c = rng.sample(names, 3)
            op = rng.choice(["+", "-", "*", "//", "%"])
            lines.append(f"    {a} = {b} {op} {c} + {rng.randint(0, 99)}")
        lines.append(f"    return {rng.choice(names)}\n")
        docs.append("\n".join(lines))
    return docs


def regression_config(tiny, tiny_llama, root: Path) -> PretrainConfig:
    """Six steps of the recipe (warmup then cosine, grad_accum=2, AdamW with weight decay,
    clipping) from a model, tokenizer and corpus built here from fixed seeds and fixed text."""
    docs = synthetic_documents(60)
    corpus = root / "synthetic"
    corpus.mkdir(parents=True)
    for i, doc in enumerate(docs):
        (corpus / f"doc{i:03d}.txt").write_text(doc)
    save_tokenizer(train_tokenizer(docs, kind="bpe", vocab_size=384), root / "tokenizer")
    evolm.save_model(evolm.build_model(tiny_llama(512), seed=0), root / "model")
    return tiny.config(
        root / "run",
        model=str(root / "model"),
        tokenizer=str(root / "tokenizer"),
        steps=K,
        grad_accum=2,
        **{
            "data.sources": [str(corpus)],
            "data.dataset_dir": str(root / "dataset"),
            "data.batch_size": 2,
            "optim.lr": 1e-2,
            "schedule.warmup_steps": 2,
        },
    )


K = 6


def test_first_losses_match_the_stored_curve(tiny, tiny_llama, tmp_path):
    """The recipe's first K losses equal tests/train/expected_losses.json (rel 1e-4), and two runs
    agree to the bit. After an intended change of the recipe, regenerate the file with
    ``EVOLM_REGENERATE_EXPECTED=1 pytest tests/train/test_pretrain.py``."""
    import os

    runs = []
    for i in range(2):
        cfg = regression_config(tiny, tiny_llama, tmp_path / f"r{i}")
        pretrain(cfg)
        metrics = tiny.metrics(cfg.out_dir)
        runs.append([metrics[s]["loss"] for s in range(1, K + 1)])
    assert runs[0] == runs[1], "two identical runs differ: the recipe is not deterministic"
    if os.environ.get("EVOLM_REGENERATE_EXPECTED") == "1":
        EXPECTED.write_text(json.dumps({"losses": runs[0]}, indent=2) + "\n")
    expected = json.loads(EXPECTED.read_text())["losses"]
    assert len(expected) == K
    assert runs[0] == pytest.approx(expected, rel=1e-4)
    assert runs[0][-1] < runs[0][0] - 0.3  # and the curve does go down


def test_non_finite_loss_stops_without_a_checkpoint(tiny, tmp_path):
    """lr=1e9 with no clipping blows the weights up after one step; the next loss is inf or nan."""
    cfg = tiny.config(
        tmp_path / "run", steps=6, **{"optim.lr": 1e9, "optim.grad_clip": 0.0, "schedule.warmup_steps": 0}
    )
    with pytest.raises(TrainingDivergedError, match=r"loss is (nan|inf) at step \d+ .*without writing a checkpoint"):
        pretrain(cfg)
    assert list_complete(Path(cfg.out_dir)) == []
    assert not (Path(cfg.out_dir) / "checkpoints").exists()
    lines = (Path(cfg.out_dir) / "metrics.jsonl").read_text().splitlines()
    assert lines, "the steps before the divergence are logged"
    for line in lines:  # strict JSON: no NaN, even for grad_norm with clipping off
        record = json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in metrics.jsonl"))
        assert math.isfinite(record["loss"]) and math.isfinite(record["grad_norm"])


class InfiniteGradient(torch.autograd.Function):
    """Identity forward, infinite backward: a finite loss whose gradient overflows."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad * math.inf


def test_non_finite_gradient_stops_before_the_update(tiny, tmp_path, monkeypatch):
    """The loss of step 3 is finite but its gradient is not: training stops before the optimizer
    step would write inf/nan into the weights, and step 3 gets no checkpoint."""
    import evolm.train.objectives as objectives

    calls = []

    def cross_entropy_sum(logits, labels):
        calls.append(1)
        loss_sum, n = recipe_loss(logits, labels)
        return (InfiniteGradient.apply(loss_sum) if len(calls) == 3 else loss_sum), n

    recipe_loss = objectives.cross_entropy_sum
    monkeypatch.setattr(objectives, "cross_entropy_sum", cross_entropy_sum)
    cfg = tiny.config(tmp_path / "run", steps=5, save_every=1)
    with pytest.raises(TrainingDivergedError, match=r"gradient norm is (inf|nan) \(loss [0-9.]+\) at step 3 "):
        pretrain(cfg)
    assert [c.name for c in list_complete(Path(cfg.out_dir))] == ["step-00000001", "step-00000002"]
    assert sorted(tiny.metrics(cfg.out_dir)) == [1, 2]


def test_cli_config_file_and_flag_overrides(tiny, tmp_path, capsys):
    """``evolm train pretrain --config run.yaml`` + flags: flags win, the file sets the rest, and
    the resolved config lands in out_dir/config.json."""
    import yaml

    out = tmp_path / "run"
    values = tiny.values(out, steps=50, grad_accum=2, **{"optim.weight_decay": 0.05, "data.seq_len": 48})
    text = yaml.safe_dump(values, sort_keys=False)
    assert "  lr: 0.001\n" in text
    # written as people write it: YAML 1.1 alone would read 1e-3 (no dot) as a string
    config = tmp_path / "run.yaml"
    config.write_text(text.replace("  lr: 0.001\n", "  lr: 1e-3\n"))
    args = ["train", "pretrain", "--config", str(config), "--steps", "3", "--optim.lr", "2e-3"]
    assert main([*args[:4], "--steps", "1", "--out_dir", str(tmp_path / "file-only")]) == 0
    assert json.loads((tmp_path / "file-only" / "config.json").read_text())["optim"]["lr"] == 1e-3
    capsys.readouterr()
    assert main([*args, "--schedule.kind", "wsd"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["step"] == 3 and math.isfinite(result["val_loss"])
    expected = tiny.config(
        out,
        steps=3,
        grad_accum=2,
        **{"optim.weight_decay": 0.05, "data.seq_len": 48, "optim.lr": 2e-3, "schedule.kind": "wsd"},
    )
    written = json.loads((out / "config.json").read_text())
    assert config_from_dict(PretrainConfig, written) == expected
    assert written["optim"]["lr"] == 2e-3 and written["steps"] == 3 and written["data"]["seq_len"] == 48
    ckpt = latest_complete(out)
    assert ckpt is not None and ckpt.name == "step-00000003"
    model = evolm.load_model(ckpt)
    tok = evolm.load_tokenizer(ckpt)
    ids = torch.tensor([tok.encode("def f(x):\n    return x")])
    assert model(ids).shape == (1, ids.shape[1], 512)


def test_activation_checkpointing_and_bf16_train_the_same_model(tiny, tmp_path):
    """Recomputing activations in the backward pass changes no bit (fp32); bf16 autocast follows
    the fp32 curve to bf16 precision."""
    runs = {}
    for name, fields in {
        "plain": {},
        "checkpointed": {"activation_checkpointing": True},
        "bf16": {"precision": "bf16"},
    }.items():
        cfg = tiny.config(tmp_path / name, steps=3, **{"optim.lr": 1e-2}, **fields)
        pretrain(cfg)
        runs[name] = [tiny.metrics(cfg.out_dir)[s]["loss"] for s in (1, 2, 3)]
    assert runs["checkpointed"] == runs["plain"]
    assert runs["bf16"] == pytest.approx(runs["plain"], rel=2e-2)
    assert runs["bf16"] != runs["plain"]


def test_no_validation_split(tiny, tmp_path):
    """val_fraction=0 trains on every document and skips validation, final step included."""
    cfg = tiny.config(tmp_path / "run", steps=2, eval_every=1, **{"data.val_fraction": 0.0})
    result = pretrain(cfg)
    assert result["step"] == 2 and "val_loss" not in result
    assert latest_complete(Path(cfg.out_dir)).name == "step-00000002"


def test_tokenizer_trained_to_the_model_vocabulary(tiny, tmp_path):
    """With no tokenizer given, one is trained on the data with the vocabulary of the model
    directory (not a fixed 8192, which a 512-row model could not embed)."""
    run = tmp_path / "run"
    cfg = tiny.config(run, steps=1, tokenizer=None, **{"data.dataset_dir": str(tmp_path / "dataset")})
    pretrain(cfg)
    tok = evolm.load_tokenizer(run / "tokenizer")
    assert 256 < tok.vocab_size <= 512
    assert evolm.load_tokenizer(latest_complete(run)).vocab_size == tok.vocab_size
