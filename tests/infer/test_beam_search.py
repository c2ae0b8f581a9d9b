"""Encoder-decoder generation against transformers' ``generate`` on the same weights: greedy and
beam search (length penalty, early_stopping True / False / "never"), padded sources, scores."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
import transformers as T

import evolm
from evolm.errors import ConfigError
from evolm.infer.seq2seq_generate import beam_search, generate_seq2seq
from evolm.models.family import family_for
from helpers.seq2seq_parity import build_hf_seq2seq

# (num_beams, length_penalty, early_stopping, max_new_tokens)
SETTINGS = [(1, 1.0, False, 10), (3, 1.0, False, 10), (3, 2.0, True, 12), (4, -1.0, False, 8), (2, 0.5, "never", 10)]


def load_example(name: str):
    """A module of examples/ (the runnable demos), imported by path."""
    path = Path(__file__).resolve().parents[2] / "examples" / f"{name}.py"
    key = f"evolm_examples.{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module  # dataclasses look their module up while the file runs
        spec.loader.exec_module(module)
    return sys.modules[key]


@pytest.fixture(scope="module")
def t5_pair(tmp_path_factory):
    """A tiny T5 half-trained to reverse strings (so EOS comes early, late or not at all and beams
    disagree), saved by evolm and loaded by transformers: the same weights in both libraries."""
    demo = load_example("t5_reverse")
    model, vocab, _ = demo.train(60, batch_size=32)
    path = tmp_path_factory.mktemp("t5") / "reverse"
    evolm.save_model(model, path)
    hf = T.T5ForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    batch = demo.batch(vocab, ["abcdefg", "hij", "jihgfedcb"])
    return hf, evolm.load_model(path), batch["input_ids"], batch["attention_mask"]


def test_generate_matches_transformers(t5_pair):
    hf, model, ids, mask = t5_pair
    ended_early = False
    for beams, penalty, early, n in SETTINGS:
        kwargs = dict(num_beams=beams, length_penalty=penalty, early_stopping=early)
        with torch.no_grad():
            ref = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False, **kwargs)
        out = generate_seq2seq(model, ids, n, attention_mask=mask, **kwargs)
        assert torch.equal(out, ref), f"{kwargs}, max_new_tokens={n}:\n{out}\n!=\n{ref}"
        ended_early |= bool((out[:, 1:-1] == 1).any())  # EOS = 1
    assert ended_early  # some hypotheses ended with EOS before the length limit


def test_beam_scores_and_several_returned_sequences_match(t5_pair):
    hf, model, ids, mask = t5_pair
    with torch.no_grad():
        ref = hf.generate(
            input_ids=ids,
            attention_mask=mask,
            num_beams=4,
            num_return_sequences=3,
            length_penalty=1.5,
            max_new_tokens=9,
            do_sample=False,
            return_dict_in_generate=True,
            output_scores=True,
        )
    seqs, scores = beam_search(model, ids, 9, 4, length_penalty=1.5, attention_mask=mask, num_return_sequences=3)
    assert torch.equal(seqs, ref.sequences)
    torch.testing.assert_close(scores, ref.sequences_scores, rtol=1e-4, atol=1e-5)


def test_bart_beam_search_starts_from_its_decoder_start_token(tmp_path):
    cfg = T.BartConfig(
        vocab_size=40,
        d_model=32,
        encoder_layers=1,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=48,
        decoder_ffn_dim=48,
        max_position_embeddings=32,
        forced_eos_token_id=None,
    )
    hf = build_hf_seq2seq(T.BartForConditionalGeneration, cfg, scale=0.3)
    hf.save_pretrained(tmp_path)
    model = evolm.load_model(tmp_path)
    ids = torch.randint(3, 40, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf.generate(input_ids=ids, num_beams=3, max_new_tokens=8, do_sample=False)
    out = generate_seq2seq(model, ids, 8, num_beams=3)
    assert out[0, 0] == 2 and torch.equal(out, ref)


def test_bad_generation_arguments(t5_pair):
    _, model, ids, _ = t5_pair
    with pytest.raises(ConfigError, match="num_beams=0"):
        generate_seq2seq(model, ids, 4, num_beams=0)
    with pytest.raises(ConfigError, match="early_stopping='always'"):
        generate_seq2seq(model, ids, 4, num_beams=2, early_stopping="always")
    with pytest.raises(ConfigError, match="max_new_tokens=64 exceeds the decoder's max_seq_len=64"):
        generate_seq2seq(model, ids, 64)
    llama = evolm.build_model(
        family_for("llama").config_from_hf(
            {"model_type": "llama", "vocab_size": 32, "hidden_size": 16, "intermediate_size": 32}
            | {"num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 16}
        )
    )
    with pytest.raises(ConfigError, match="needs an encoder-decoder model.*evolm.infer.generate.generate"):
        generate_seq2seq(llama, ids, 4)
