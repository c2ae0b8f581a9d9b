"""Encoder-decoder pretraining objectives: T5 span corruption and BART text infilling, their
corruption statistics, and each one pretraining a tiny model through ``evolm train pretrain`` on a
real corpus with its loss going down."""

from __future__ import annotations

import math

import pytest
import torch

import evolm
from evolm.cli.main import main
from evolm.data.packing import Batch
from evolm.errors import ConfigError
from evolm.train.objectives import make_objective
from evolm.train.seq2seq_objectives import (
    SpanCorruptionObjective,
    TextInfillingObjective,
    random_spans_noise_mask,
    span_corruption_lengths,
)


def t5_reference_lengths(tokens_length: int, noise_density: float = 0.15, mean_span: float = 3.0):
    """T5's ``random_spans_helper._tokens_length_to_inputs_length_targets_length`` (EOS included)."""
    num_noise_tokens = round(tokens_length * noise_density)
    num_nonnoise_tokens = tokens_length - num_noise_tokens
    num_noise_spans = round(num_noise_tokens / mean_span)
    return num_nonnoise_tokens + num_noise_spans + 1, num_noise_tokens + num_noise_spans + 1


@pytest.mark.parametrize("length", [20, 64, 114, 512, 568])
def test_span_corruption_lengths_are_t5s(length):
    n = span_corruption_lengths(length)
    assert (n["inputs"] + 1, n["targets"] + 1) == t5_reference_lengths(length)
    gen = torch.Generator().manual_seed(length)
    for _ in range(5):
        noise = random_spans_noise_mask(length, generator=gen)
        starts = noise & ~torch.cat([torch.zeros(1, dtype=torch.bool), noise[:-1]])
        assert noise.shape == (length,) and int(noise.sum()) == n["noise"] and int(starts.sum()) == n["spans"]
        assert not noise[0] and noise[-1]  # non-noise first, noise last, as in T5


def test_span_corruption_is_invertible_and_uses_top_sentinels():
    vocab, eos = 300, 1
    obj = SpanCorruptionObjective(vocab, decoder_start_token_id=0, eos_token_id=eos)
    tokens = torch.randint(2, 200, (4, 64), generator=torch.Generator().manual_seed(0))
    prepared = obj.prepare(Batch(tokens, tokens, torch.zeros_like(tokens)), torch.Generator().manual_seed(1))
    n = span_corruption_lengths(64)
    inputs, labels = prepared.inputs["input_ids"], prepared.targets["labels"]
    assert inputs.shape == (4, n["inputs"] + 1) and labels.shape == (4, n["targets"] + 1)
    assert prepared.count == labels.numel()
    assert torch.equal(prepared.inputs["decoder_input_ids"][:, 1:], labels[:, :-1])
    assert (prepared.inputs["decoder_input_ids"][:, 0] == 0).all()
    for row in range(4):
        src, tgt = inputs[row, :-1].tolist(), labels[row, :-1].tolist()
        assert inputs[row, -1] == eos and labels[row, -1] == eos
        sentinels = [t for t in src if t >= vocab - n["spans"]]
        assert sentinels == list(range(vocab - 1, vocab - 1 - n["spans"], -1)) == [t for t in tgt if t >= 200]
        # put each hidden span back behind its sentinel: the original row
        spans, current = {}, None
        for t in tgt:
            if t >= 200:
                current = spans.setdefault(t, [])
            else:
                current.append(t)
        rebuilt = [x for t in src for x in (spans[t] if t >= 200 else [t])]
        assert rebuilt == tokens[row].tolist()


def test_text_infilling_masks_thirty_percent_in_poisson_spans():
    mask_id = 499
    obj = TextInfillingObjective(mask_id, decoder_start_token_id=2, pad_token_id=1)
    gen = torch.Generator().manual_seed(0)
    lengths = [s for _ in range(400) for s in obj.span_lengths(200, gen)]
    full = [s for s in lengths if s < 60]  # the last span of a row is cut to fit: mean over the others
    assert 2.7 < sum(full) / len(full) < 3.3  # Poisson(3)
    assert 0 in lengths  # zero-length spans insert a mask
    tokens = torch.randint(3, 400, (8, 100), generator=gen)
    prepared = obj.prepare(Batch(tokens, tokens, torch.zeros_like(tokens)), gen)
    inputs, attn = prepared.inputs["input_ids"], prepared.inputs["attention_mask"]
    assert torch.equal(prepared.targets["labels"], tokens) and prepared.count == tokens.numel()
    assert (prepared.inputs["decoder_input_ids"][:, 0] == 2).all()
    for row in range(8):
        kept = inputs[row][attn[row].bool()].tolist()
        assert mask_id in kept and all(t == 1 for t in inputs[row][~attn[row].bool()].tolist())
        # what is not a mask is the original in order, with about 30% of the tokens removed
        real = [t for t in kept if t != mask_id]
        it = iter(tokens[row].tolist())
        assert all(any(t == u for u in it) for t in real)
        assert 100 - math.ceil(0.3 * 100) <= len(real) <= 100 - 20


def test_ids_reaching_special_ids_and_decoder_only_models_are_refused(tiny_llama):
    obj = SpanCorruptionObjective(100, 0)
    tokens = torch.full((1, 64), 99)
    with pytest.raises(ConfigError, match="collides with the span-corruption sentinels.*at most 97 tokens"):
        obj.prepare(Batch(tokens, tokens, tokens))
    with pytest.raises(ConfigError, match="reaches the infilling <mask> id 99"):
        TextInfillingObjective(99, 2).prepare(Batch(tokens, tokens, tokens))
    llama = evolm.build_model(tiny_llama(), seed=0)
    with pytest.raises(ConfigError, match="objective='span_corruption' trains encoder-decoder models.*'llama'"):
        make_objective("span_corruption", llama)


@pytest.mark.parametrize(
    ("preset", "objective", "lr"), [("t5-tiny", "span_corruption", 1e-2), ("bart-tiny", "text_infilling", 3e-3)]
)
def test_pretraining_through_evolm_train_lowers_the_loss(preset, objective, lr, tiny, tmp_path):
    out = tmp_path / "run"
    flags = tiny.flags(
        out,
        model=preset,
        objective=objective,
        steps=30,
        eval_every=30,
        **{"optim.lr": lr, "schedule.warmup_steps": 5, "data.seq_len": 64, "data.batch_size": 8},
    )
    assert main(["train", "pretrain", *flags]) == 0
    metrics = tiny.metrics(out)
    first = sum(metrics[s]["loss"] for s in range(1, 6)) / 5
    last = sum(metrics[s]["loss"] for s in range(26, 31)) / 5
    assert last < first - 0.7, (first, last)  # nats per target token, from ~ln(640) = 6.5 (measured: -1.04, -1.07)
    assert math.isfinite(metrics[30]["val_loss"])
    model = evolm.load_model(out / "checkpoints" / "step-00000030")
    assert model.cfg.family == preset.split("-")[0]
