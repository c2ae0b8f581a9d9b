"""Typed configuration of the pretraining recipe (one frozen dataclass per concept)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from evolm.data.config import DataConfig
from evolm.errors import ConfigError


def _positive(owner: str, name: str, value, kind=int) -> None:
    if isinstance(value, bool) or not isinstance(value, kind) or value <= 0:
        raise ConfigError(f"{owner}.{name}={value!r}; must be a positive {kind.__name__}")


@dataclass(frozen=True)
class OptimConfig:
    """AdamW (Loshchilov & Hutter, 2019) and gradient clipping.

    Attributes:
        lr: Peak learning rate.
        min_lr_ratio: Final learning rate as a fraction of the peak.
        beta1: First-moment decay.
        beta2: Second-moment decay.
        eps: Denominator epsilon.
        weight_decay: Decoupled weight decay on matrices (not on norms, biases or embeddings).
        grad_clip: Clip the global gradient norm to this (0 disables).
        fused: Use PyTorch's fused AdamW kernel (None: where the device supports it).
    """

    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    fused: bool | None = None

    def __post_init__(self) -> None:
        if isinstance(self.lr, bool) or not isinstance(self.lr, int | float) or not self.lr > 0:
            raise ConfigError(f"optim.lr={self.lr!r}; must be a positive number")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"optim.min_lr_ratio={self.min_lr_ratio}; must be in [0, 1]")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"optim.{name}={getattr(self, name)}; must be in [0, 1)")
        if self.weight_decay < 0 or self.grad_clip < 0 or self.eps <= 0:
            raise ConfigError(
                f"optim.weight_decay={self.weight_decay}, grad_clip={self.grad_clip}, eps={self.eps}; "
                "weight_decay and grad_clip must be >= 0, eps > 0"
            )


@dataclass(frozen=True)
class ScheduleConfig:
    """Learning-rate schedule (see ``evolm.train.math.lr_at``).

    Attributes:
        kind: ``cosine``, ``wsd`` (warmup-stable-decay) or ``constant``.
        warmup_steps: Linear warmup length in optimizer steps.
        decay_fraction: ``wsd`` only: share of training spent decaying.
    """

    kind: Literal["cosine", "wsd", "constant"] = "cosine"
    warmup_steps: int = 40
    decay_fraction: float = 0.2

    def __post_init__(self) -> None:
        if self.kind not in ("cosine", "wsd", "constant"):
            raise ConfigError(f"schedule.kind={self.kind!r}; allowed: cosine, wsd, constant")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ConfigError(f"schedule.warmup_steps={self.warmup_steps!r}; must be an integer >= 0")
        if not 0 < self.decay_fraction <= 1:
            raise ConfigError(f"schedule.decay_fraction={self.decay_fraction}; must be in (0, 1]")


@dataclass(frozen=True)
class PretrainConfig:
    """The pretraining recipe.

    Attributes:
        model: Preset name (``evolm.preset_names()``) or a Hugging Face model directory to continue.
        objective: Training objective by name (``evolm.train.objectives.OBJECTIVES``): ``clm``
            (next-token prediction) or one a family registers (masked LM, span corruption, ...).
        tokenizer: Tokenizer directory or .gguf; None trains a byte-level BPE tokenizer on the
            training data with the model's vocabulary size.
        out_dir: Run directory (config, metrics.jsonl, checkpoints).
        steps: Optimizer steps to train for.
        grad_accum: Micro-batches per optimizer step.
        precision: ``bf16`` autocast (CPU AMX or CUDA) or ``fp32``.
        compile: Compile the model with torch.compile.
        activation_checkpointing: Recompute each block's activations in the backward pass.
        eval_every: Steps between validation runs (0: only at the end).
        eval_batches: Validation batches per run (0: all).
        log_every: Steps between metric lines.
        save_every: Steps between checkpoints (0: only at the end).
        keep_last: Complete checkpoints to keep.
        seed: Seed of the model initialisation.
        resume: ``auto`` continues from the newest complete checkpoint in ``out_dir`` if there is one;
            ``always`` requires one (an error otherwise); ``never`` refuses a run directory that
            already has checkpoints.
        distributed: ``auto`` (DDP when launched by torchrun with several processes), ``ddp``,
            ``fsdp`` (FSDP2 ``fully_shard`` per block) or ``none``.
        tensorboard: Also write TensorBoard event files.
        progress: Show a live progress bar.
        sample_prompt: Text to continue with the trained model at the end ("" disables).
        sample_tokens: Tokens in that sample.
    """

    model: str = "llama-10m"
    objective: str = "clm"
    tokenizer: str | None = None
    out_dir: str = "runs/pretrain"
    steps: int = 400
    grad_accum: int = 1
    precision: Literal["bf16", "fp32"] = "bf16"
    compile: bool = False
    activation_checkpointing: bool = False
    eval_every: int = 100
    eval_batches: int = 16
    log_every: int = 10
    save_every: int = 200
    keep_last: int = 2
    seed: int = 0
    resume: Literal["auto", "always", "never"] = "auto"
    distributed: Literal["auto", "ddp", "fsdp", "none"] = "auto"
    tensorboard: bool = False
    progress: bool = True
    sample_prompt: str = "def "
    sample_tokens: int = 48
    data: DataConfig = field(default_factory=lambda: DataConfig(sources=("stdlib",)))
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)

    def __post_init__(self) -> None:
        for name in ("steps", "grad_accum", "keep_last", "sample_tokens"):
            _positive("train", name, getattr(self, name))
        for name in ("eval_every", "eval_batches", "log_every", "save_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"train.{name}={value!r}; must be an integer >= 0")
        if self.precision not in ("bf16", "fp32"):
            raise ConfigError(f"train.precision={self.precision!r}; allowed: bf16, fp32")
        if self.resume not in ("auto", "always", "never"):
            raise ConfigError(f"train.resume={self.resume!r}; allowed: auto, always, never")
        if self.distributed not in ("auto", "ddp", "fsdp", "none"):
            raise ConfigError(f"train.distributed={self.distributed!r}; allowed: auto, ddp, fsdp, none")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def config_from_dict(cls: type, values: dict, where: str = "config") -> object:
    """Build dataclass ``cls`` from a (nested) dict, rejecting unknown keys and wrong types by name."""
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(known)}")
    kwargs = {}
    hints = __import__("typing").get_type_hints(cls)
    for name, value in values.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp) and isinstance(value, dict):
            kwargs[name] = config_from_dict(tp, value, f"{where}.{name}")
        elif dataclasses.is_dataclass(tp):
            raise ConfigError(f"{where}.{name}: expected a table of fields, got {type(value).__name__}")
        else:
            kwargs[name] = _coerce(tp, value, f"{where}.{name}")
    return cls(**kwargs)


def _coerce(tp, value, where: str):
    import types
    import typing

    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, where) if len(inner) == 1 else value
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}={value!r}; allowed: {list(args)}")
        return value
    if origin is tuple:
        if isinstance(value, str) or not isinstance(value, list | tuple):
            raise ConfigError(f"{where}={value!r}; expected a list")
        return tuple(value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool) and not (isinstance(value, tp) and not (tp is int and isinstance(value, bool))):
        raise ConfigError(f"{where}={value!r} has type {type(value).__name__}; expected {tp.__name__}")
    return value
