"""A tiny pretraining setup built once per test session, so recipe tests depend on no download.

The ``tiny`` fixture holds:

- ``model``: a 2-layer Llama (C=64, H=4, K=2, V=512, tied embeddings, context 128) built with
  ``evolm.build_model(cfg, seed=0)`` and saved with ``evolm.save_model``;
  ``small_vocab_model``: the same with V=256, fewer ids than the tokenizer has.
- ``tokenizer``: a byte-level BPE of 512 tokens trained on ``corpus``.
- ``corpus``: eight standard-library modules copied as ``.txt`` files (one document each);
  ``small_corpus``: the first 400 characters of five of them, so that an epoch of packed
  ``seq_len=32`` windows lasts only a few optimizer steps (tests check how many).

and helpers: ``tiny.config(out_dir, **fields)`` is a ``PretrainConfig`` over them (fp32, no
progress bar, no sample, every step logged, a token dataset per corpus kept in the session's
temporary folder), dotted keys setting nested fields (``**{"optim.lr": 1e-2}``);
``tiny.flags(...)`` the same as ``evolm train pretrain`` flags; ``tiny.metrics(run)`` and
``tiny.weights(checkpoint)`` read a run's results.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sysconfig
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import evolm
from evolm.models.config import DecoderConfig
from evolm.models.family import family_for
from evolm.tokenizer.train import save_tokenizer, train_tokenizer
from evolm.train.config import PretrainConfig, config_from_dict

STDLIB_MODULES = ("abc", "bisect", "colorsys", "copyreg", "fnmatch", "glob", "keyword", "numbers")


def tiny_llama(vocab_size: int = 512) -> DecoderConfig:
    """A 2-layer Llama small enough to train in milliseconds per step."""
    return family_for("llama").config_from_hf(
        {
            "model_type": "llama",
            "vocab_size": vocab_size,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 128,
            "tie_word_embeddings": True,
        }
    )


def cli_flags(values: dict, prefix: str = "") -> list[str]:
    """``evolm train pretrain`` flags setting ``values`` (nested dicts become dotted flags)."""
    out: list[str] = []
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out += cli_flags(value, f"{name}.")
        elif isinstance(value, list):
            out += [f"--{name}", *map(str, value)]
        else:
            out += [f"--{name}", str(value).lower() if isinstance(value, bool) else str(value)]
    return out


@dataclasses.dataclass(frozen=True)
class Tiny:
    root: Path
    model: str
    small_vocab_model: str
    tokenizer: str
    corpus: str
    small_corpus: str

    def values(self, out_dir: Path | str, **fields) -> dict:
        """Nested ``PretrainConfig`` values of a tiny run; dotted keys reach nested fields."""
        values: dict = {
            "model": self.model,
            "tokenizer": self.tokenizer,
            "out_dir": str(out_dir),
            "steps": 4,
            "precision": "fp32",
            "progress": False,
            "sample_prompt": "",
            "log_every": 1,
            "eval_every": 0,
            "save_every": 0,
            "data": {"sources": [self.corpus], "seq_len": 32, "batch_size": 4},
            "optim": {"lr": 1e-3},
            "schedule": {"warmup_steps": 2},
        }
        for key, value in fields.items():
            *parents, leaf = key.split(".")
            table = values
            for p in parents:
                table = table.setdefault(p, {})
            table[leaf] = list(value) if isinstance(value, tuple) else value
        data = values["data"]
        data.setdefault("dataset_dir", str(self.root / "datasets" / Path(data["sources"][0]).name))
        return values

    def config(self, out_dir: Path | str, **fields) -> PretrainConfig:
        return config_from_dict(PretrainConfig, self.values(out_dir, **fields))

    def flags(self, out_dir: Path | str, **fields) -> list[str]:
        return cli_flags(self.values(out_dir, **fields))

    @staticmethod
    def metrics(run_dir: Path | str) -> dict[int, dict]:
        """``metrics.jsonl`` as {step: record}; a step logged twice (by a killed run, then by its
        resumption) keeps its last record."""
        lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
        return {r["step"]: r for r in map(json.loads, lines)}

    @staticmethod
    def weights(checkpoint: Path | str) -> dict[str, torch.Tensor]:
        """The tensors of a checkpoint's ``model.safetensors``."""
        return load_file(str(Path(checkpoint) / "model.safetensors"))


@pytest.fixture(name="tiny_llama", scope="session")
def tiny_llama_fixture() -> Callable[[int], DecoderConfig]:
    return tiny_llama


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Tiny:
    root = tmp_path_factory.mktemp("tiny")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    corpus = root / "corpus"
    corpus.mkdir()
    for name in STDLIB_MODULES:
        shutil.copyfile(stdlib / f"{name}.py", corpus / f"{name}.txt")
    small = root / "small_corpus"
    small.mkdir()
    for name in STDLIB_MODULES[:5]:
        (small / f"{name}.txt").write_text((stdlib / f"{name}.py").read_text(encoding="utf-8")[:400])
    tok = train_tokenizer([p.read_text() for p in sorted(corpus.iterdir())], kind="bpe", vocab_size=512)
    assert tok.vocab_size == 512
    save_tokenizer(tok, root / "tokenizer")
    evolm.save_model(evolm.build_model(tiny_llama(), seed=0), root / "model")
    evolm.save_model(evolm.build_model(tiny_llama(vocab_size=256), seed=0), root / "model-v256")
    return Tiny(
        root=root,
        model=str(root / "model"),
        small_vocab_model=str(root / "model-v256"),
        tokenizer=str(root / "tokenizer"),
        corpus=str(corpus),
        small_corpus=str(small),
    )
