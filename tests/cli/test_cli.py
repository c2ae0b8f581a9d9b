"""The `evolm` command line: info, generate, chat, and flags derived from config dataclasses."""

from __future__ import annotations

import argparse
import builtins
import json
from dataclasses import dataclass

import pytest
import transformers as T

from evolm.cli.args import add_dataclass_args, dataclass_from_args
from evolm.cli.main import main
from evolm.errors import ConfigError
from evolm.infer.sampling import SamplingConfig
from helpers.hf_parity import build_hf


def test_info_json_on_a_checkpoint(tmp_path, capsys):
    build_hf(
        T.Qwen2Config(
            vocab_size=97,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    ).save_pretrained(tmp_path)
    assert main(["info", str(tmp_path), "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["family"] == "qwen2" and facts["layers"] == 3 and facts["kv_heads"] == 2
    assert facts["parameters"] == sum(
        p.numel()
        for p in build_hf(
            T.Qwen2Config(
                vocab_size=97,
                hidden_size=64,
                intermediate_size=96,
                num_hidden_layers=3,
                num_attention_heads=4,
                num_key_value_heads=2,
            )
        ).parameters()
    )


def test_info_default_model_is_smollm2(capsys, smollm2_gguf):
    assert main(["info", "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["parameters"] == 134_515_008 and facts["context"] == 8192


def test_bad_path_is_a_clean_error(tmp_path, capsys):
    assert main(["info", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_generate_greedy_on_smollm2(capsys):
    code = main(
        ["generate", "--prompt", "What is the capital of France?", "--max-new-tokens", "20", "--dtype", "float32"]
    )
    assert code == 0
    out = capsys.readouterr()
    assert "Paris" in out.out and "tok/s" in out.err


def test_generate_rejects_bad_sampling_flags(capsys):
    assert main(["generate", "--prompt", "hi", "--sampling.temperature", "-1"]) == 2
    assert "temperature=-1.0" in capsys.readouterr().err


def test_chat_keeps_the_conversation(monkeypatch, capsys):
    lines = iter(["What is the capital of France?", "And of Italy?", ""])
    monkeypatch.setattr(builtins, "input", lambda prompt="": next(lines))
    assert main(["chat", "--max-new-tokens", "16", "--dtype", "float32"]) == 0
    out = capsys.readouterr()
    assert "Paris" in out.out and "Rome" in out.out
    reused = [int(line.split()[1]) for line in out.err.splitlines() if line.startswith("[reused")]
    assert reused[0] == 0 and reused[1] > 20


@dataclass(frozen=True)
class _Inner:
    """Inner.

    Attributes:
        lr: Learning rate.
    """

    lr: float = 3e-4


@dataclass(frozen=True)
class _Outer:
    """Outer.

    Attributes:
        steps: How many.
        mode: Which.
        warm: Whether.
        limit: Optional cap.
    """

    steps: int = 10
    mode: str = "a"
    warm: bool = False
    limit: int | None = None
    optim: _Inner = _Inner()


def test_dataclass_flags_round_trip():
    p = argparse.ArgumentParser()
    add_dataclass_args(p, _Outer)
    args = p.parse_args(["--steps", "5", "--optim.lr", "0.1", "--warm", "true", "--limit", "none"])
    assert dataclass_from_args(_Outer, args) == _Outer(steps=5, warm=True, optim=_Inner(lr=0.1), limit=None)
    assert "Learning rate" in p.format_help()
    with pytest.raises(SystemExit):
        p.parse_args(["--steps", "five"])
    sp = argparse.ArgumentParser()
    add_dataclass_args(sp, SamplingConfig, "sampling")
    with pytest.raises(ConfigError, match="top_k=-3"):
        dataclass_from_args(SamplingConfig, sp.parse_args(["--sampling.top_k", "-3"]), "sampling")


def test_pretrain_flags_keep_the_recipe_defaults_of_nested_configs():
    """Unset nested flags take PretrainConfig's own defaults (data from the stdlib corpus), not the
    nested class's (DataConfig alone defaults to Shakespeare)."""
    from evolm.cli.main import build_parser
    from evolm.cli.train import pretrain_config
    from evolm.train.config import PretrainConfig

    parse = build_parser().parse_args
    assert pretrain_config(parse(["train", "pretrain"])) == PretrainConfig()
    cfg = pretrain_config(parse(["train", "pretrain", "--data.seq_len", "64"]))
    assert cfg.data.sources == ("stdlib",) and cfg.data.seq_len == 64


@pytest.mark.parametrize("name", ["bert-tiny", "t5-tiny", "mixtral-tiny"])
def test_info_describes_encoder_seq2seq_and_moe_checkpoints(name, tmp_path):
    """`evolm info` reads every kind of model evolm saves, not only decoders."""
    import evolm
    from evolm.cli.info import describe

    model = evolm.build_model(name, seed=0)
    evolm.save_model(model, tmp_path / name)
    facts = describe(tmp_path / name)
    assert facts["family"] == model.cfg.family
    assert facts["parameters"] == sum(p.numel() for p in model.parameters())
