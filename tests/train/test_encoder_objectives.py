"""Encoder pretraining objectives: BERT's masking statistics, ELECTRA's replaced-token labels,
DistilBERT's loss in closed form, and short ``pretrain`` runs on standard-library modules whose
loss goes down (masked LM, then ELECTRA, then distillation of the masked LM into a student)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import transformers

import evolm
from evolm.data.packing import Batch
from evolm.errors import ConfigError
from evolm.models.family import family_for
from evolm.nn.losses import IGNORE_INDEX
from evolm.train.config import PretrainConfig, config_from_dict
from evolm.train.encoder_objectives import (
    DistillationObjective,
    ElectraObjective,
    MaskedLMObjective,
    distillation_loss_sum,
    make_student,
    mask_tokens,
)
from evolm.train.objectives import make_objective
from evolm.train.pretrain import pretrain

V = 512
BERT = {
    "model_type": "bert",
    "vocab_size": V,
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 128,
    "max_position_embeddings": 64,
    "pad_token_id": 0,
    "mask_token_id": 1,
}
ELECTRA = {
    **BERT,
    "model_type": "electra",
    "embedding_size": 32,
    "evolm_generator": {**BERT, "hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64},
}


def build(hf: dict, seed: int = 0):
    return evolm.build_model(family_for(hf["model_type"]).config_from_hf(hf), seed=seed)


def test_mask_tokens_is_bert_80_10_10():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 1000, (200, 500), generator=g)  # 100k tokens
    ids[:, ::50] = 0  # "padding" that is never selected
    inputs, labels = mask_tokens(ids, mask_token_id=1, vocab_size=1000, never_mask=(0,), generator=g)
    selected = labels != IGNORE_INDEX
    eligible = ids != 0
    assert not bool(selected[~eligible].any())
    assert torch.equal(labels[selected], ids[selected])
    assert torch.equal(inputs[~selected], ids[~selected])  # only selected tokens change
    n = int(selected.sum())
    assert abs(n / int(eligible.sum()) - 0.15) < 0.005  # 4.5 sigma of a Bernoulli(0.15) mean
    masked = float((inputs[selected] == 1).float().mean())
    kept = float((inputs[selected] == ids[selected]).float().mean())
    random = 1.0 - masked - kept
    assert abs(masked - 0.8) < 0.015 and abs(kept - 0.1) < 0.01 and abs(random - 0.1) < 0.01
    # the same generator state masks the same way; RoBERTa's dynamic masking draws anew each time
    again = mask_tokens(ids, mask_token_id=1, vocab_size=1000, never_mask=(0,), generator=torch.Generator())
    redo = mask_tokens(ids, mask_token_id=1, vocab_size=1000, never_mask=(0,), generator=torch.Generator())
    assert torch.equal(again[0], redo[0]) and not torch.equal(again[0], inputs)


def test_electra_replaces_masked_tokens_with_generator_samples():
    model = build(ELECTRA).eval()
    objective = ElectraObjective(model)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, V, (4, 24), generator=g)
    batch = Batch(ids, ids, torch.zeros_like(ids))
    p = objective.prepare(batch, g)
    labels, noise = p.targets["labels"], p.targets["sample_noise"]
    masked = labels != IGNORE_INDEX
    with torch.no_grad():
        _, gen_logits, corrupted = model(p.inputs["input_ids"], mlm_labels=labels, sample_noise=noise)
        assert torch.equal(gen_logits, model.generator(p.inputs["input_ids"]))
    assert torch.equal(corrupted[~masked], ids[~masked])
    cdf = torch.softmax(gen_logits[masked], -1).cumsum(-1)  # (M, V)
    drawn, u = corrupted[masked], noise[masked]
    below = torch.where(drawn > 0, cdf.gather(1, (drawn - 1).clamp_min(0)[:, None])[:, 0], torch.zeros_like(u))
    assert bool((below <= u + 1e-6).all() and (u <= cdf.gather(1, drawn[:, None])[:, 0] + 1e-6).all())  # inverse CDF

    with torch.no_grad():  # a generator certain of token 7: a masked 7 stays "original"
        model.generator.mlm_head.decoder.bias.fill_(-1e4)
        model.generator.mlm_head.decoder.bias[7] = 1e4
    ids[0, :12] = 7
    p = objective.prepare(Batch(ids, ids, torch.zeros_like(ids)), torch.Generator().manual_seed(1))
    masked = p.targets["labels"] != IGNORE_INDEX
    with torch.no_grad():
        _, metrics = objective.loss_sum(model, p, torch.device("cpu"))
        _, _, corrupted = model(**p.inputs, mlm_labels=p.targets["labels"], sample_noise=p.targets["sample_noise"])
    assert bool((corrupted[masked] == 7).all())
    replaced = masked & (ids != 7)
    assert 0 < int(replaced.sum()) < int(masked.sum())
    assert metrics["replaced_fraction"] == pytest.approx(float(replaced.float().mean()))


def test_distillation_loss_closed_form():
    s = torch.tensor([[[1.0, 0.0], [0.5, 0.5], [0.0, 2.0]]])  # (1, 3, 2)
    t = torch.tensor([[[0.0, 1.0], [3.0, 0.0], [1.0, 1.0]]])
    labels = torch.tensor([[0, IGNORE_INDEX, 1]])
    hs = torch.tensor([[[1.0, 0.0], [1.0, 1.0], [1.0, 0.0]]])
    ht = torch.tensor([[[0.0, 1.0], [2.0, 2.0], [-1.0, 0.0]]])  # cosines 0, 1, -1
    weights = {"temperature": 2.0, "alpha_ce": 5.0, "alpha_mlm": 2.0, "alpha_cos": 1.0}
    total, parts = distillation_loss_sum(s, t, labels, hs, ht, **weights)

    def softmax(x):
        e = [math.exp(v) for v in x]
        return [v / sum(e) for v in e]

    kl = ce = 0.0
    for pos, label in ((0, 0), (2, 1)):
        ps, pt = softmax([v / 2 for v in s[0, pos].tolist()]), softmax([v / 2 for v in t[0, pos].tolist()])
        kl += sum(a * (math.log(a) - math.log(b)) for a, b in zip(pt, ps, strict=True)) * 4.0
        ce -= math.log(softmax(s[0, pos].tolist())[label])
    cos = ((1 - 0) + (1 - 1) + (1 + 1)) / 3
    assert float(total) == pytest.approx(5.0 * kl + 2.0 * ce + 1.0 * cos * 2, rel=1e-6)
    assert parts["kl"] == pytest.approx(kl / 2, rel=1e-6) and parts["cos_loss"] == pytest.approx(cos, rel=1e-6)
    _, parts = distillation_loss_sum(s, s, labels, hs, hs * 3)
    assert parts["kl"] == pytest.approx(0.0, abs=1e-6) and parts["cos_loss"] == pytest.approx(0.0, abs=1e-6)


def test_objective_bad_input(tmp_path):
    no_mask = build({**BERT, "mask_token_id": None})
    with pytest.raises(ConfigError, match="no mask_token_id"):
        make_objective("mlm", no_mask)
    with pytest.raises(ConfigError, match="trains a EncoderForReplacedTokenDetection"):
        ElectraObjective(build(BERT))
    no_generator = {k: v for k, v in ELECTRA.items() if k != "evolm_generator"}
    with pytest.raises(ConfigError, match="needs a discriminator config with a generator"):
        make_objective("electra", build(no_generator))
    with pytest.raises(ConfigError, match="needs a teacher"):
        DistillationObjective(build(BERT))
    with pytest.raises(ConfigError, match="hidden_size=32 differs"):
        DistillationObjective(build(BERT), teacher=build({**BERT, "hidden_size": 32}))
    with pytest.raises(ConfigError, match="mask_prob"):
        MaskedLMObjective(build(BERT), mask_prob=1.5).prepare(Batch(*[torch.zeros(1, 4, dtype=torch.long)] * 3))


# ---- short pretraining runs ---------------------------------------------------------------------


class Runs:
    """Pretraining runs over the session's standard-library corpus (``tiny.corpus``)."""

    def __init__(self, root: Path, corpus: str) -> None:
        self.root, self.corpus = root, corpus

    def run(self, name: str, model: Path, objective: str, steps: int, tokenizer: str | None = None, **fields):
        values = {
            "model": str(model),
            "objective": objective,
            "tokenizer": tokenizer,
            "out_dir": str(self.root / name),
            "steps": steps,
            "precision": "fp32",
            "progress": False,
            "sample_prompt": "",
            "log_every": 1,
            "eval_every": 0,
            "eval_batches": 2,
            "save_every": 0,
            "data": {"sources": [self.corpus], "seq_len": 32, "batch_size": 8, "dataset_dir": str(self.root / "ds")},
            "optim": {"lr": 3e-3},
            "schedule": {"warmup_steps": 2, "kind": "constant"},
            **fields,
        }
        pretrain(config_from_dict(PretrainConfig, values))
        lines = (self.root / name / "metrics.jsonl").read_text().splitlines()
        return {r["step"]: r for r in map(json.loads, lines)}

    def checkpoint(self, name: str) -> Path:
        return max((self.root / name / "checkpoints").glob("step-*"))


def assert_loss_goes_down(metrics: dict[int, dict], margin: float) -> None:
    losses = [metrics[s]["loss"] for s in sorted(metrics)]
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < first - margin, f"loss did not go down: {losses}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny) -> Runs:
    return Runs(tmp_path_factory.mktemp("encoder-runs"), tiny.corpus)


@pytest.fixture(scope="module")
def mlm_run(runs) -> Path:
    """A masked-LM run from scratch; the loop trains its tokenizer with <mask> at id 1."""
    evolm.save_model(build(BERT), runs.root / "model-bert")
    metrics = runs.run("mlm", runs.root / "model-bert", "mlm", steps=12)
    assert_loss_goes_down(metrics, 0.25)
    return runs.checkpoint("mlm")


def test_pretrain_masked_lm(mlm_run):
    tok = evolm.load_tokenizer(mlm_run)
    assert tok.backend.id_to_token(0) == "<|endoftext|>" and tok.backend.id_to_token(1) == "<mask>"
    model = evolm.load_model(mlm_run)
    hf = transformers.BertForMaskedLM.from_pretrained(mlm_run, dtype=torch.float32).eval()
    ids = torch.tensor([tok.encode("def count(items):\n    return len(items)")])
    ids[0, 3] = 1
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, rtol=1e-4, atol=1e-4)


def test_pretrain_electra_with_exact_resume(runs, mlm_run):
    evolm.save_model(build(ELECTRA), runs.root / "model-electra")
    tok = str(mlm_run)
    straight = runs.run("electra", runs.root / "model-electra", "electra", steps=6, tokenizer=tok)
    assert_loss_goes_down(straight, 3.0)  # about 41 -> 33: lambda = 50 weighs the discriminator
    assert {"gen_loss", "disc_loss", "disc_accuracy"} <= set(straight[6])
    runs.run("electra-resumed", runs.root / "model-electra", "electra", steps=3, tokenizer=tok)
    resumed = runs.run("electra-resumed", runs.root / "model-electra", "electra", steps=6, tokenizer=tok)
    for step in range(4, 7):  # same masks, same generator samples, same weights after the resume
        assert resumed[step]["loss"] == pytest.approx(straight[step]["loss"], rel=1e-5), step
    back = evolm.load_model(runs.checkpoint("electra-resumed"))
    assert back.generator.model.embed_tokens.weight is back.model.embed_tokens.weight


def test_make_student_takes_every_other_layer(runs, mlm_run):
    """DistilBERT's initialisation: the student's embeddings equal the teacher's on one segment."""
    student_dir = make_student(mlm_run, runs.root / "student")
    teacher, student = evolm.load_model(mlm_run), evolm.load_model(student_dir)
    assert student.cfg.family == "distilbert" and student.cfg.n_layers == 1
    assert dict(student.cfg.extra)["distillation_teacher"] == str(mlm_run.resolve())
    ids = torch.randint(2, V, (2, 10))
    with torch.no_grad():  # the type-0 row is folded into the positions
        pos = torch.arange(10)
        t_emb = teacher.model.embed_tokens(ids) + teacher.model.embed_token_types(torch.zeros_like(ids))
        t_emb = teacher.model.embed_norm(t_emb + teacher.model.embed_positions(pos))
        s_emb = student.model.embed_norm(student.model.embed_tokens(ids) + student.model.embed_positions(pos))
    torch.testing.assert_close(s_emb, t_emb, rtol=1e-5, atol=1e-5)
    for name, w in student.model.layers[0].state_dict().items():
        assert torch.equal(w, teacher.model.layers[0].state_dict()[name]), name


def test_pretrain_distillation(runs, mlm_run):
    """A freshly initialised DistilBERT student learns from the masked-LM teacher: the soft-target,
    masked-LM and hidden-state losses go down together."""
    hf = {**BERT, "model_type": "distilbert", "num_hidden_layers": 1, "type_vocab_size": 0}
    hf |= {"dim": 64, "n_layers": 1, "n_heads": 4, "hidden_dim": 128, "distillation_teacher": str(mlm_run)}
    evolm.save_model(build(hf), runs.root / "model-student")
    metrics = runs.run("distil", runs.root / "model-student", "distil", steps=8, tokenizer=str(mlm_run))
    assert_loss_goes_down(metrics, 1.0)
    assert metrics[8]["kl"] < metrics[1]["kl"] and metrics[8]["cos_loss"] < metrics[1]["cos_loss"]
