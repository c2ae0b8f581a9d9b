"""Bad input fails within seconds, before any training step, with a message naming the field."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from evolm.cli.main import main
from evolm.errors import CheckpointError, ConfigError
from evolm.train.config import OptimConfig, PretrainConfig, config_from_dict
from evolm.train.pretrain import pretrain

ALLOWED_TOP = str(sorted(f for f in PretrainConfig.__dataclass_fields__))
ALLOWED_OPTIM = str(sorted(f for f in OptimConfig.__dataclass_fields__))


def fails_fast(cfg: PretrainConfig, error: type[Exception], match: str) -> None:
    """``pretrain(cfg)`` raises ``error`` within seconds, having trained nothing."""
    start = time.perf_counter()
    with pytest.raises(error, match=match):
        pretrain(cfg)
    assert time.perf_counter() - start < 10
    assert not (Path(cfg.out_dir) / "metrics.jsonl").exists()
    assert not (Path(cfg.out_dir) / "checkpoints").exists()


@pytest.mark.parametrize("suffix", [".yaml", ".toml", ".json"])
def test_config_file_typos_list_the_allowed_keys(tmp_path, capsys, suffix):
    texts = {
        ".yaml": ("stesp: 10\n", "optim:\n  lrr: 0.1\n"),
        ".toml": ("stesp = 10\n", "[optim]\nlrr = 0.1\n"),
        ".json": ('{"stesp": 10}', '{"optim": {"lrr": 0.1}}'),
    }
    top, nested = texts[suffix]
    for text, key, allowed in ((top, "stesp", ALLOWED_TOP), (nested, "lrr", ALLOWED_OPTIM)):
        path = tmp_path / f"run{suffix}"
        path.write_text(text)
        assert main(["train", "pretrain", "--config", str(path)]) == 2
        err = capsys.readouterr().err
        assert f"unknown key(s) ['{key}']; allowed: {allowed}" in err, err
    with pytest.raises(ConfigError, match=r"config\.optim: unknown key\(s\) \['lrr'\]; allowed: \[.*'lr'"):
        config_from_dict(PretrainConfig, {"optim": {"lrr": 0.1}})


def test_cli_flag_typos_and_bad_flag_types_exit_2(capsys):
    for argv in (["--optim.lrr", "1e-3"], ["--stesp", "3"], ["--steps", "ten"], ["--precision", "fp8"]):
        with pytest.raises(SystemExit) as exc:
            main(["train", "pretrain", *argv])
        assert exc.value.code == 2
        assert "error:" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("values", "match"),
    [
        ({"steps": "ten"}, r"config\.steps='ten' has type str; expected int"),
        ({"steps": 10.5}, r"config\.steps=10\.5 has type float; expected int"),
        ({"optim": {"lr": "fast"}}, r"config\.optim\.lr='fast' has type str; expected float"),
        ({"progress": "yes"}, r"config\.progress='yes' has type str; expected bool"),
        ({"precision": "fp16"}, r"config\.precision='fp16'; allowed: \['bf16', 'fp32'\]"),
        ({"data": {"sources": "shakespeare"}}, r"config\.data\.sources='shakespeare'; expected a list"),
        ({"data": {"sources": [3]}}, r"sources: 3 is not a string spec"),
        ({"optim": 3e-4}, r"config\.optim: expected a table of fields, got float"),
        ({"grad_accum": True}, r"config\.grad_accum=True has type bool; expected int"),
    ],
)
def test_wrong_types_in_a_config_file(tmp_path, capsys, values, match):
    with pytest.raises(ConfigError, match=match):
        config_from_dict(PretrainConfig, values)
    path = tmp_path / "run.json"
    path.write_text(json.dumps(values))
    assert main(["train", "pretrain", "--config", str(path)]) == 2
    assert "evolm train pretrain: error:" in capsys.readouterr().err


def test_unparsable_config_file(tmp_path, capsys):
    for name, text in (("a.yaml", "steps: [1\n"), ("a.toml", "steps = \n"), ("a.json", "{"), ("a.ini", "x")):
        (tmp_path / name).write_text(text)
        assert main(["train", "pretrain", "--config", str(tmp_path / name)]) == 2
        assert f"--config {tmp_path / name}: " in capsys.readouterr().err


@pytest.mark.parametrize(
    ("values", "match"),
    [
        ({"optim": {"lr": 0}}, r"optim\.lr=0\.0; must be a positive number"),
        ({"optim": {"lr": -1e-3}}, r"optim\.lr=-0\.001; must be a positive number"),
        ({"steps": 0}, r"train\.steps=0; must be a positive int"),
        ({"grad_accum": -2}, r"train\.grad_accum=-2; must be a positive int"),
        ({"data": {"batch_size": 0}}, r"batch_size=0 must be an integer >= 1"),
        ({"data": {"seq_len": -8}}, r"seq_len=-8 must be an integer >= 1"),
    ],
)
def test_non_positive_values(values, match):
    with pytest.raises(ConfigError, match=match):
        config_from_dict(PretrainConfig, values)


def test_non_positive_flags_exit_2_naming_the_field(capsys):
    for argv, field in (
        (["--optim.lr", "-1"], "optim.lr"),
        (["--steps", "0"], "steps"),
        (["--data.batch_size", "0"], "batch_size"),
    ):
        assert main(["train", "pretrain", *argv]) == 2
        assert field in capsys.readouterr().err


def test_seq_len_above_the_model_context(tiny, tmp_path):
    cfg = tiny.config(tmp_path / "run", **{"data.seq_len": 129})
    fails_fast(cfg, ConfigError, r"data\.seq_len=129 exceeds the model's context max_seq_len=128")


def test_tokenizer_larger_than_the_model_vocabulary(tiny, tmp_path):
    cfg = tiny.config(tmp_path / "run", model=tiny.small_vocab_model)
    fails_fast(cfg, ConfigError, r"the tokenizer has 512 tokens but the model's vocab_size is 256")


def test_unknown_model(tiny, tmp_path):
    # no tokenizer given: the model is checked before one would be trained on the data
    cfg = tiny.config(tmp_path / "run", model=str(tmp_path / "no-such-model"), tokenizer=None)
    fails_fast(cfg, ConfigError, r"train\.model=.*no-such-model' is neither a preset \(.*llama-10m.*\) nor a path")
    assert not (tmp_path / "run" / "tokenizer").exists()


def test_resume_always_needs_a_complete_checkpoint(tiny, tmp_path):
    run = tmp_path / "run"
    cfg = tiny.config(run, resume="always")
    fails_fast(cfg, CheckpointError, r"train\.resume='always' but .*run has no complete checkpoint")
    partial = run / "checkpoints" / ".partial-step-00000002-x"  # what a killed save leaves
    partial.mkdir(parents=True)
    (partial / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        pretrain(cfg)


def test_resume_never_refuses_a_run_with_checkpoints(tiny, tmp_path):
    run = tmp_path / "run"
    pretrain(tiny.config(run, steps=1))
    with pytest.raises(ConfigError, match=r"resume='never' but .* already holds checkpoints \(newest step-00000001\)"):
        pretrain(tiny.config(run, steps=2, resume="never"))


def test_unwritable_out_dir(tiny, tmp_path):
    # a regular file where a parent directory should be: mkdir fails even for root
    (tmp_path / "file").write_text("not a directory")
    cfg = tiny.config(tmp_path / "file" / "run")
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=r"train\.out_dir='.*file/run' is not writable: Not a directory"):
        pretrain(cfg)
    assert time.perf_counter() - start < 10
