"""The supervised finetuning recipe: adapters on a frozen model, an explicit loop over the shared math.

    model <- load (fp32); [QLoRA: linear weights -> NF4]; apply_lora (only adapters trainable)
    sample before; validate before
    for step in steps:
        lr <- schedule(step)
        for micro-batch in grad_accum:            # token-normalised over the step's assistant tokens
            loss_sum, n <- cross_entropy_sum(model(x, document_ids, position_ids), y)
            backward(loss_sum / n_tokens_step)
        clip, AdamW step on the adapters
        log; validate
    save adapter (PEFT format) [and the merged model]; sample after; summary

Run it with ``evolm train sft MODEL --data FILE``. The run directory holds ``config.json``,
``metrics.jsonl``, ``adapter/`` (``adapter_config.json`` + ``adapter_model.safetensors``, loadable by
``peft``), ``merged/`` with ``--merge``, ``samples.json`` (the same validation prompt answered
before and after training) and ``summary.json`` (losses, memory, parameter counts).
"""

from __future__ import annotations

import contextlib
import json
import math
import resource
import sys
import time
from pathlib import Path

import torch
from torch import nn

from evolm.data.sft import SFTData, read_records
from evolm.errors import ConfigError
from evolm.models.adapters import save_adapter
from evolm.models.loading import load_model, save_model
from evolm.nn.lora import apply_lora, unload_lora
from evolm.nn.losses import cross_entropy_sum
from evolm.nn.nf4 import Linear4bit, dequantize_linears, quantize_linears
from evolm.tokenizer import Tokenizer, load_tokenizer
from evolm.train.log import RunLogger
from evolm.train.math import loss_scale, scheduled_lr
from evolm.train.pretrain import TrainingDivergedError, _checkpoint_blocks
from evolm.train.sft_config import SFTConfig


def peak_memory(device: torch.device) -> dict[str, int]:
    """Peak resident memory of this process (bytes) and, on CUDA, the allocator's peak."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {"peak_rss_bytes": rss if sys.platform == "darwin" else rss * 1024}  # Linux reports KiB
    if device.type == "cuda":
        out["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
    return out


def weight_storage(model: nn.Module) -> dict[str, float]:
    """Bytes the model's weights take: all of them, and the 4-bit layers per weight value."""
    seen, total, n = set(), 0, 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    q = [m for m in model.modules() if isinstance(m, Linear4bit)]
    q_bytes = sum(m.weight_nbytes for m in q)
    n = sum(m.in_features * m.out_features for m in q)
    out: dict[str, float] = {"weight_bytes": total}
    if n:
        out.update(nf4_bytes=q_bytes, nf4_params=n, nf4_bytes_per_param=q_bytes / n)
    return out


def _autocast(cfg: SFTConfig, device: torch.device):
    if cfg.precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _forward_loss(model: nn.Module, batch, device: torch.device, cfg: SFTConfig) -> tuple[torch.Tensor, int]:
    with _autocast(cfg, device):
        logits = model(
            batch.input_ids.to(device),
            document_ids=batch.document_ids.to(device),
            position_ids=batch.position_ids.to(device),
        )
    loss_sum, n = cross_entropy_sum(logits, batch.labels.to(device))
    return loss_sum, int(n)


@torch.no_grad()
def evaluate(model: nn.Module, data: SFTData, cfg: SFTConfig, device: torch.device) -> float:
    """Mean cross-entropy over every assistant token of the validation examples."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in data.val_batches(cfg.batch_size, cfg.packing):
        s, n = _forward_loss(model, batch, device, cfg)
        total += float(s)
        count += n
    model.train(was_training)
    return total / count if count else math.nan


def sample(
    model: nn.Module, tokenizer: Tokenizer, prompt_ids: list[int], max_new_tokens: int, device: torch.device
) -> str:
    """The model's greedy continuation of ``prompt_ids``, stopped at an end-of-turn token."""
    from evolm.infer.chat import turn_end_ids
    from evolm.infer.generate import generate

    was_training = model.training
    model.eval()
    ids = list(prompt_ids)
    out = generate(model, torch.tensor([ids], device=device), max_new_tokens, eos_token_id=turn_end_ids(tokenizer))
    model.train(was_training)
    return tokenizer.decode(out[0, len(ids) :].tolist(), skip_special_tokens=True)


def _optimizer(model: nn.Module, cfg: SFTConfig) -> torch.optim.AdamW:
    """AdamW over the trainable (adapter) parameters; weight decay on matrices only."""
    o = cfg.optim
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = o.fused if o.fused is not None else all(p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, fused=fused)


def save_tokenizer(tokenizer: Tokenizer, directory: Path) -> None:
    """``tokenizer.json`` with its special tokens and chat template, as ``load_tokenizer`` and transformers read it."""
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.backend.save(str(directory / "tokenizer.json"))
    config = {k: v for k, v in tokenizer.special_tokens().items() if v is not None}
    config["add_bos_token"] = tokenizer.add_bos
    if tokenizer.chat_template:
        config["chat_template"] = tokenizer.chat_template
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def sft(cfg: SFTConfig) -> dict:
    """Run the recipe; returns the summary (validation loss before/after, memory, samples)."""
    torch.manual_seed(cfg.seed)
    run = Path(cfg.out_dir)
    try:
        run.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"sft.out_dir={str(run)!r} cannot be created: {e.strerror or e}") from e
    if cfg.model is None:
        from evolm.assets import smollm2_gguf

        model_path = str(smollm2_gguf())
    else:
        model_path = cfg.model
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    model = load_model(model_path, dtype=torch.float32)
    tokenizer = load_tokenizer(model_path, model=model)
    if cfg.seq_len > model.cfg.max_seq_len:
        raise ConfigError(f"sft.seq_len={cfg.seq_len} exceeds the model's context max_seq_len={model.cfg.max_seq_len}")
    data = SFTData.from_records(read_records(cfg.data), tokenizer, cfg.seq_len, cfg.val_fraction, cfg.seed)
    (run / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2, default=str) + "\n")
    if cfg.qlora:
        quantize_linears(model)
    model.to(device)
    storage = weight_storage(model)
    probe = data.val[0] if data.val else data.train[0]
    samples = {"prompt": probe.prompt, "reference": probe.reference}
    if cfg.sample_tokens:
        samples["before"] = sample(model, tokenizer, probe.prompt_ids, cfg.sample_tokens, device)
    names = apply_lora(model, cfg.lora)
    model.to(device).train()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    total += sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, Linear4bit))
    if cfg.gradient_checkpointing:
        _checkpoint_blocks(model)
    optimizer = _optimizer(model, cfg)
    logger = RunLogger(run, cfg.steps, 0, True, cfg.progress, False)
    val_before = evaluate(model, data, cfg, device) if data.val else math.nan
    logger.print(
        f"sft: {len(data.train)} train / {len(data.val)} val examples ({data.truncated} truncated, "
        f"{data.dropped} dropped); LoRA on {len(names)} layers, {trainable:,} trainable of {total:,} parameters; "
        f"val loss before {val_before:.4f}"
    )
    batches = data.train_batches(cfg.batch_size, cfg.packing, cfg.seed)
    history = []
    try:
        t0, tokens_since = time.perf_counter(), 0
        for step in range(cfg.steps):
            lr = scheduled_lr(step, cfg.optim, cfg.schedule, cfg.steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            micro = [next(batches) for _ in range(cfg.grad_accum)]
            n_step = sum(int((b.labels != -100).sum()) for b in micro)
            scale = loss_scale(n_step, 1)
            loss_total = 0.0
            for b in micro:
                loss_sum, _ = _forward_loss(model, b, device, cfg)
                (loss_sum * scale).backward()
                loss_total += float(loss_sum.detach())
                tokens_since += b.input_ids.numel()
            loss = loss_total / n_step
            grad_norm = float(
                torch.nn.utils.clip_grad_norm_(
                    [p for p in model.parameters() if p.requires_grad], cfg.optim.grad_clip or math.inf
                )
            )
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                raise TrainingDivergedError(
                    f"loss {loss} / gradient norm {grad_norm} at step {step + 1} (lr {lr:.3g}); lower optim.lr"
                )
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            done = step + 1
            record = {"step": done, "loss": loss, "lr": lr}
            if done % cfg.log_every == 0 or done == cfg.steps:
                elapsed = time.perf_counter() - t0
                record.update(grad_norm=grad_norm, tok_per_s=tokens_since / elapsed)
                t0, tokens_since = time.perf_counter(), 0
            if data.val and ((cfg.eval_every and done % cfg.eval_every == 0) or done == cfg.steps):
                record["val_loss"] = evaluate(model, data, cfg, device)
            logger.log(record)
            history.append(record)
    finally:
        logger.close()
    summary = {
        "steps": cfg.steps,
        "train_loss": history[-1]["loss"],
        "val_loss_before": val_before,
        "val_loss_after": history[-1].get("val_loss", math.nan),
        "lora_layers": len(names),
        "trainable_params": trainable,
        "total_params": total,
        **storage,
        **peak_memory(device),
    }
    save_adapter(model, run / "adapter", base_model_name_or_path=model_path)
    if cfg.sample_tokens:
        samples["after"] = sample(model, tokenizer, probe.prompt_ids, cfg.sample_tokens, device)
        summary["samples"] = samples
        (run / "samples.json").write_text(json.dumps(samples, indent=2, ensure_ascii=False) + "\n")
    if cfg.merge:
        unload_lora(model, merge=True)
        dequantize_linears(model)  # QLoRA: the layers without adapters go back to float32 too
        save_model(model, run / "merged")
        save_tokenizer(tokenizer, run / "merged")
    (run / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    return summary
