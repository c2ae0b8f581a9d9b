"""The pretraining recipe: an explicit loop (nanoGPT's shape) over the shared, tested math.

    for step in steps:
        lr <- schedule(step)
        for micro-batch in grad_accum:            # token-normalised: every token weighs the same
            loss_sum, n <- cross_entropy_sum(model(x), y)
            backward(loss_sum * world_size / n_tokens_global)
        clip, AdamW step
        log; validate; checkpoint (atomic)

Run it with ``evolm train pretrain`` (or ``torchrun ... -m evolm train pretrain`` for DDP/FSDP).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import json
import math
import os
import random
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from evolm.data.packing import Batch, PackedDataset
from evolm.data.shards import prepare_shards
from evolm.errors import CheckpointError, ConfigError, EvolmError
from evolm.models.build import build_model
from evolm.models.config import DecoderConfig
from evolm.models.loading import load_config, load_model, save_model
from evolm.models.presets import PRESETS, preset
from evolm.nn.moe import update_router_biases
from evolm.tokenizer import Tokenizer, load_tokenizer
from evolm.train import distributed as D
from evolm.train.checkpoint import latest_complete, load_trainer_state, save_checkpoint
from evolm.train.checkpoint import save_trainer_state as write_trainer_state
from evolm.train.config import PretrainConfig
from evolm.train.log import RunLogger, measure_matmul_peak
from evolm.train.math import flops_per_token, loss_scale, matmul_params, scheduled_lr
from evolm.train.objectives import Objective, make_objective


class TrainingDivergedError(EvolmError):
    """The loss became NaN or infinite; the run stops without writing a checkpoint."""


def _check_writable(run: Path) -> None:
    try:
        run.mkdir(parents=True, exist_ok=True)
        probe = run / f".evolm-write-test-{os.getpid()}"  # one per process: ranks probe at once
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"train.out_dir={str(run)!r} is not writable: {e.strerror or e}") from e


def _resolve_checkpoint(cfg: PretrainConfig, run: Path) -> Path | None:
    latest = latest_complete(run)
    if cfg.resume == "always" and latest is None:
        raise CheckpointError(
            f"train.resume='always' but {run} has no complete checkpoint "
            f"(none under {run / 'checkpoints'} with a COMPLETE marker)"
        )
    if cfg.resume == "never" and latest is not None:
        raise ConfigError(
            f"train.resume='never' but {run} already holds checkpoints (newest {latest.name}); "
            "choose another out_dir or resume"
        )
    return latest if cfg.resume != "never" else None


def _tokenizer(
    cfg: PretrainConfig,
    run: Path,
    ckpt: Path | None,
    world: D.World,
    vocab_size: int,
    special_tokens: tuple[str, ...] | None = None,
) -> Tokenizer:
    if cfg.tokenizer:
        return load_tokenizer(cfg.tokenizer)
    if ckpt is not None and (ckpt / "tokenizer.json").is_file():
        return load_tokenizer(ckpt)
    tok_dir = run / "tokenizer"
    if world.is_main and not (tok_dir / "tokenizer.json").is_file():
        from evolm.data.corpus import iter_documents
        from evolm.tokenizer.train import save_tokenizer, train_tokenizer

        docs = iter_documents(cfg.data.sources)
        tok = train_tokenizer(docs, kind="bpe", vocab_size=vocab_size, special_tokens=special_tokens)
        save_tokenizer(tok, tok_dir)
    D.barrier()
    return load_tokenizer(tok_dir)


def _model_config(cfg: PretrainConfig, ckpt: Path | None) -> DecoderConfig:
    """The config of the model to train (checkpoint, preset or path), read without any weights."""
    if ckpt is not None:
        return load_config(ckpt)[1]
    if cfg.model in PRESETS:
        return preset(cfg.model)
    if not Path(cfg.model).exists():
        raise ConfigError(f"train.model={cfg.model!r} is neither a preset ({', '.join(sorted(PRESETS))}) nor a path")
    return load_config(cfg.model)[1]


def _model(cfg: PretrainConfig, ckpt: Path | None) -> nn.Module:
    if ckpt is not None:
        return load_model(ckpt, dtype=torch.float32)
    if cfg.model in PRESETS:
        return build_model(preset(cfg.model), seed=cfg.seed)
    return load_model(cfg.model, dtype=torch.float32)


def _optimizer(model: nn.Module, cfg: PretrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not norms, biases, embeddings)."""
    o = cfg.optim
    emb = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay, seen = [], [], set()
    for p in model.parameters():
        if id(p) in seen or not p.requires_grad:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 and id(p) not in emb else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = o.fused
    if fused is None:
        fused = all(p.device.type in ("cpu", "cuda") for p in decay + no_decay)
    return torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, fused=fused)


def _checkpoint_blocks(model: nn.Module) -> None:
    """Activation checkpointing per block, applied from outside (the module tree is unchanged)."""
    for block in model.model.layers:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


def _autocast(cfg: PretrainConfig, device: torch.device):
    if cfg.precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate(
    model: nn.Module, objective: Objective, data: PackedDataset, cfg: PretrainConfig, device: torch.device
) -> float:
    """Mean validation loss per counted token over ``cfg.eval_batches`` batches (all ranks together).

    Randomised objectives (masking, corruption) draw from a generator seeded with a constant, so
    every validation pass scores the same corrupted batches. Ranks hold unequal numbers of
    validation windows, but every FSDP forward all-gathers weights on every rank: a rank out of
    batches runs a dummy forward until no rank has one left.
    """
    model.eval()
    total, count = 0.0, 0.0
    generator = torch.Generator().manual_seed(cfg.seed)
    batches = data.iter_validation(batch_size=cfg.data.batch_size)
    for i in itertools.count():
        batch = next(batches, None) if not cfg.eval_batches or i < cfg.eval_batches else None
        (ranks_with_batch,) = D.all_reduce_sum([float(batch is not None)])
        if ranks_with_batch == 0:
            break
        if batch is None:
            dummy = torch.zeros(1, cfg.data.seq_len, dtype=torch.long)
            batch = Batch(dummy, dummy, dummy)
            with _autocast(cfg, device):
                objective.loss_sum(model, objective.prepare(batch, generator), device)
            continue
        prepared = objective.prepare(batch, generator)
        with _autocast(cfg, device):
            s, _ = objective.loss_sum(model, prepared, device)
        total += float(s)
        count += float(prepared.count)
    model.train()
    total, count = D.all_reduce_sum([total, count])
    return total / max(count, 1.0)


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, _, gauss = random.getstate()
    random.setstate((version, tuple(state["python"]), gauss))


def pretrain(cfg: PretrainConfig) -> dict:
    """Run the recipe; returns the final metrics (train/validation loss and perplexity, steps)."""
    world = D.init_world(cfg.distributed)
    run = Path(cfg.out_dir)
    _check_writable(run)
    ckpt = _resolve_checkpoint(cfg, run)
    model_cfg = _model_config(cfg, ckpt)
    # A model may need special tokens in a tokenizer trained for it (an encoder's <mask> for masked LM).
    specials = getattr(model_cfg, "tokenizer_special_tokens", None)
    tokenizer = _tokenizer(cfg, run, ckpt, world, model_cfg.vocab_size, specials)
    model = _model(cfg, ckpt)
    mcfg = model.cfg
    if tokenizer.vocab_size > mcfg.vocab_size:
        raise ConfigError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is {mcfg.vocab_size}; "
            "train a smaller tokenizer or use a model with a larger vocabulary"
        )
    if cfg.data.seq_len > mcfg.max_seq_len:
        raise ConfigError(f"data.seq_len={cfg.data.seq_len} exceeds the model's context max_seq_len={mcfg.max_seq_len}")
    device = (
        torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else torch.device("cpu")
    )
    model.to(device).train()
    # One dataset batch per optimizer step, B * grad_accum rows cut into grad_accum micro-batches:
    # epochs end on step boundaries, so the steps are those of grad_accum=1 with B * grad_accum rows.
    data_cfg = dataclasses.replace(cfg.data, batch_size=cfg.data.batch_size * cfg.grad_accum)
    if world.is_main:  # tokenize once, before the other ranks open the dataset
        prepare_shards(data_cfg.sources, tokenizer, data_cfg.dataset_dir)
    D.barrier()
    data = PackedDataset.from_config(data_cfg, tokenizer, world.rank, world.world_size)
    if ckpt is None:
        # the global RNG feeds objective parts built now (an MTP head: the same on every rank) and
        # randomised objectives later (masking); a resumed run restores it from the checkpoint
        torch.manual_seed(cfg.seed)
    objective = make_objective(cfg.objective, model)
    n_matmul = matmul_params(model)
    fpt = flops_per_token(mcfg, n_matmul, cfg.data.seq_len)
    if cfg.activation_checkpointing:
        _checkpoint_blocks(model)
    train_model = D.wrap(model, world)
    optimizer = _optimizer(train_model, cfg)  # after wrapping: FSDP2 replaces the parameters
    start = 0
    if ckpt is not None:
        state = load_trainer_state(ckpt)
        D.load_optimizer_state(train_model, optimizer, state["optimizer"], world)
        data.load_state_dict(state["data"])
        _set_rng_state(state["rng"])
        start = int(state["step"])
    if world.is_main:
        (run / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2, default=str))
    if cfg.compile:
        train_model.compile()
    with torch.random.fork_rng(devices=[]):  # its random matrices must not move the (restored) RNG
        peak = measure_matmul_peak(torch.bfloat16 if cfg.precision == "bf16" else torch.float32, device)
    logger = RunLogger(run, cfg.steps, start, world.is_main, cfg.progress, cfg.tensorboard)
    tokens_per_step = cfg.data.batch_size * cfg.data.seq_len * cfg.grad_accum * world.world_size
    last = {"step": start}

    def save(step: int) -> None:
        model_state, optim_state = D.full_state_dicts(train_model, optimizer, world)
        if world.is_main:

            def write(directory: Path) -> None:
                save_model(D.unwrap(model), directory, state_dict=model_state)
                tokenizer.backend.save(str(directory / "tokenizer.json"))
                tok_src = Path(tokenizer.source)
                for extra in ("tokenizer_config.json", "special_tokens_map.json"):
                    if (tok_src / extra).is_file():
                        (directory / extra).write_bytes((tok_src / extra).read_bytes())
                write_trainer_state(
                    directory,
                    {"step": step, "optimizer": optim_state, "data": data.state_dict(), "rng": _rng_state()},
                )

            save_checkpoint(run, step, write, cfg.keep_last)
        D.barrier()

    try:
        t0, tokens_since = time.perf_counter(), 0
        for step in range(start, cfg.steps):
            lr = scheduled_lr(step, cfg.optim, cfg.schedule, cfg.steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            step_batch = next(data)  # (B * grad_accum, T) each
            batches = [
                Batch(*(t[i : i + cfg.data.batch_size] for t in step_batch))  # (B, T) each
                for i in range(0, cfg.grad_accum * cfg.data.batch_size, cfg.data.batch_size)
            ]
            prepared = [objective.prepare(b) for b in batches]
            n_local = sum(p.count for p in prepared)
            (n_global,) = D.all_reduce_sum([float(n_local)])
            scale = loss_scale(int(n_global), world.world_size)
            loss_local = 0.0
            step_metrics: dict[str, float] = {}
            for i, p in enumerate(prepared):
                final = i == len(prepared) - 1
                with D.no_sync(train_model, world, final):
                    if final:
                        D.set_sync(train_model, world)
                    with _autocast(cfg, device):
                        loss_sum, metrics = objective.loss_sum(train_model, p, device)
                    (loss_sum * scale).backward()
                    loss_local += float(loss_sum.detach())
                for k, v in metrics.items():  # mean over micro-batches
                    step_metrics[k] = step_metrics.get(k, 0.0) + v / len(prepared)
            (loss_total,) = D.all_reduce_sum([loss_local])
            loss = loss_total / n_global
            # max_norm=inf (grad_clip 0) measures without clipping: the factor clamps to 1
            grad_norm = float(torch.nn.utils.clip_grad_norm_(train_model.parameters(), cfg.optim.grad_clip or math.inf))
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):  # before the step spreads it into the weights
                bad = f"gradient norm is {grad_norm} (loss {loss:.4g})" if math.isfinite(loss) else f"loss is {loss}"
                raise TrainingDivergedError(
                    f"{bad} at step {step + 1} (lr {lr:.3g}); stopping without writing a checkpoint. "
                    "Lower optim.lr, raise schedule.warmup_steps, or train in fp32 to find the cause."
                )
            optimizer.step()
            update_router_biases(train_model)  # MoE layers with bias_update_rate > 0 (DeepSeek-V3); else no-op
            optimizer.zero_grad(set_to_none=True)
            done = step + 1
            tokens_since += tokens_per_step
            record = {"step": done, "loss": loss, "lr": lr, **step_metrics}
            if cfg.log_every and (done % cfg.log_every == 0 or done == cfg.steps):
                elapsed = time.perf_counter() - t0
                tps = tokens_since / elapsed
                record.update(
                    grad_norm=grad_norm,
                    tok_per_s=tps,
                    mfu=tps * fpt / (peak * world.world_size),
                    tokens=done * tokens_per_step,
                )
                t0, tokens_since = time.perf_counter(), 0
            if len(data.val_docs) and ((cfg.eval_every and done % cfg.eval_every == 0) or done == cfg.steps):
                val = evaluate(train_model, objective, data, cfg, device)
                record.update(val_loss=val, val_ppl=math.exp(min(val, 50.0)))
            logger.log(record)
            last = record
            if (cfg.save_every and done % cfg.save_every == 0) or done == cfg.steps:
                save(done)
    finally:
        logger.close()
    if world.is_main and cfg.sample_prompt and cfg.objective == "clm":
        # FSDP leaves rank 0 a shard of each weight; sample from the full weights just saved
        plain = load_model(latest_complete(run), dtype=torch.float32).to(device) if world.mode == "fsdp" else model
        last["sample"] = _sample(D.unwrap(plain), tokenizer, cfg, device)
        logger_text = f"sample> {cfg.sample_prompt}{last['sample']}"
        print(logger_text, flush=True)
    D.shutdown()
    return last


def _sample(model: nn.Module, tokenizer: Tokenizer, cfg: PretrainConfig, device: torch.device) -> str:
    from evolm.infer.generate import generate

    model.eval()
    ids = tokenizer.encode(cfg.sample_prompt, add_special_tokens=False) or [tokenizer.eos_token_id or 0]
    out = generate(model, torch.tensor([ids], device=device), cfg.sample_tokens, eos_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, len(ids) :].tolist(), skip_special_tokens=True)
