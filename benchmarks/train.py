"""Training throughput: evolm vs Hugging Face ``transformers`` on this CPU, and MFU against a measured peak.

One random-init Llama model (GQA, SwiGLU, untied head) is built as an HF ``LlamaForCausalLM`` with a
fixed seed, saved to a temporary directory, and loaded again by each implementation, so every one
starts from identical float32 weights. Each implementation owns its model copy and its AdamW
(``fused=True`` where PyTorch has it) and trains on the same random token batch; the loss is the
mean next-token cross-entropy (HF: ``model(ids, labels=ids).loss``; evolm: ``cross_entropy_sum`` over
the same shifted labels, divided by the number of targets). The first-step losses are printed: they
must agree (float32 to ~1e-6 relative, bf16 autocast to ~1e-3).

A step is ``zero_grad; forward + loss (under autocast for bf16); backward; optimizer step``. After
``--warmup`` untimed steps each, the implementations are timed one step at a time in rotation
(A B C A B C ...), so a burst of load from another process on this shared machine hits them all
alike; tok/s is ``batch * seq / median(step seconds)``. ``evolm bf16 compile`` runs
``model.compile()`` (torch.compile); its compile time (first step minus the median step, with an
empty Inductor cache unless ``--warm-cache``) is reported on its own and is not in its tok/s. The
``-flinear`` variants run evolm with its oneDNN products switched off (``use_onednn(False)``: every
product through ``F.linear``, as before evolm trained with oneDNN).

MFU (Chowdhery et al., 2022, PaLM, appendix B) = tok/s x training FLOPs per token / peak, with FLOPs
per token = 6 x matmul parameters + attention's ``12 * layers * heads * head_dim * seq``
(``evolm.train.math.flops_per_token``) and the peak measured in the same run: the best of several
``torch.mm`` of two bf16 2048x2048 matrices.

    python benchmarks/train.py --steps 10 --json train.json
    python benchmarks/train.py --impls hf-bf16,evolm-bf16 --profile 2     # and the top ops of each
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import evolm
from evolm.nn.linear import use_onednn
from evolm.nn.losses import IGNORE_INDEX, cross_entropy_sum
from evolm.train.math import flops_per_token, matmul_params

TARGETS = {"hf-fp32": 2.5, "hf-bf16": 1.2}  # evolm bf16 tok/s as a multiple of these


def model_config(layers: int) -> LlamaConfig:
    """~31M parameters (27M in matmuls): small enough that one CPU training step takes about a second."""
    return LlamaConfig(
        hidden_size=512,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        intermediate_size=1376,
        vocab_size=8192,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )


def bf16_peak(n: int = 2048, repeats: int = 10) -> float:
    """Best FLOP/s of ``torch.mm`` on two bf16 (n, n) matrices: the roof MFU is measured against."""
    a, b = torch.randn(n, n).bfloat16(), torch.randn(n, n).bfloat16()
    for _ in range(2):
        torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def cpu_ticks() -> tuple[int, int, int]:
    """(all CPUs' busy ticks, all ticks, this process's ticks) from /proc: to see who else used the CPUs."""
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    own = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    return sum(f) - f[3] - f[4], sum(f), int(own[11]) + int(own[12])  # minus idle, iowait; utime + stime


def adamw(model: nn.Module) -> torch.optim.AdamW:
    """AdamW (Loshchilov & Hutter, 2019), the fused single-kernel update where this PyTorch has one."""
    params = [p for p in model.parameters() if p.requires_grad]
    try:
        return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.1, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.1)


def hf_loss(model: nn.Module, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """HF's own next-token loss (it shifts ``ids`` itself)."""
    return model(ids, labels=ids).loss


def evolm_loss(model: nn.Module, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over ``labels`` (``ids`` shifted left, IGNORE_INDEX last)."""
    loss_sum, n = cross_entropy_sum(model(ids), labels)
    return loss_sum / n


@dataclass
class Impl:
    """One implementation under test: its model, optimizer, loss and precision."""

    name: str
    model: nn.Module
    loss_fn: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
    bf16: bool
    onednn: bool = True
    opt: torch.optim.Optimizer = field(init=False)
    times: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    first_step_s: float = 0.0

    def __post_init__(self) -> None:
        self.model.train()
        self.opt = adamw(self.model)

    def step(self, ids: torch.Tensor, labels: torch.Tensor) -> float:
        """One optimizer step; returns its wall seconds and records the loss."""
        previous = use_onednn(self.onednn)
        try:
            t0 = time.perf_counter()
            self.opt.zero_grad(set_to_none=True)
            amp = torch.autocast("cpu", dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()
            with amp:
                loss = self.loss_fn(self.model, ids, labels)
            loss.backward()
            self.opt.step()
            self.losses.append(loss.item())
            return time.perf_counter() - t0
        finally:
            use_onednn(previous)


def build(name: str, path: str) -> Impl:
    """The implementation called ``name``, loaded from the HF checkpoint directory ``path``."""
    if name.startswith("hf-"):
        model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
        return Impl(name, model, hf_loss, bf16=name == "hf-bf16")
    model = evolm.load_model(path, dtype=torch.float32)
    impl = Impl(name, model, evolm_loss, bf16="bf16" in name, onednn="flinear" not in name)
    if name.endswith("-compile"):
        model.compile()
    return impl


IMPLS = ["hf-fp32", "hf-bf16", "evolm-fp32", "evolm-bf16", "evolm-bf16-compile", "evolm-fp32-flinear",
         "evolm-bf16-flinear"]
DEFAULT_IMPLS = "hf-fp32,hf-bf16,evolm-fp32,evolm-bf16,evolm-bf16-compile,evolm-fp32-flinear"


def environment() -> dict:
    """Machine and software facts printed with the results."""
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    src = Path(evolm.__file__).resolve().parent
    commit = subprocess.run(["git", "-C", str(src), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(src), "status", "--porcelain", "."], capture_output=True, text=True)
    return {
        "date": datetime.date.today().isoformat(),
        "cpu": cpu,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "evolm": f"{src} " + (f"git {commit.stdout.strip()}" if commit.returncode == 0 else "(not a git checkout)")
        + (" + uncommitted changes" if dirty.stdout.strip() else ""),
    }


def profile_step(impl: Impl, ids: torch.Tensor, labels: torch.Tensor, steps: int) -> str:
    """torch.profiler table of ``steps`` training steps of ``impl``, top ops by self CPU time."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            impl.step(ids, labels)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=7, help="timed steps per implementation (after the warm-up)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per implementation")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--impls", default=DEFAULT_IMPLS, help=f"comma-separated subset of {','.join(IMPLS)}, or all")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--profile", type=int, default=0, help="also profile this many steps of each implementation")
    ap.add_argument("--warm-cache", action="store_true", help="let torch.compile reuse Inductor's on-disk cache")
    args = ap.parse_args()
    names = IMPLS if args.impls == "all" else args.impls.split(",")
    if bad := [n for n in names if n not in IMPLS]:
        ap.error(f"--impls: unknown {bad}; choose from {IMPLS}")

    transformers.utils.logging.disable_progress_bar()
    env = environment()
    for k, v in env.items():
        print(f"{k:>15}: {v}")
    cfg = model_config(args.layers)
    b, t = args.batch, args.seq
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (b, t), generator=gen)  # (B, T)
    labels = torch.cat([ids[:, 1:], torch.full((b, 1), IGNORE_INDEX)], dim=1)  # (B, T): position t predicts t + 1

    if not args.warm_cache:  # compile from scratch, as a first run does
        inductor_cache = tempfile.TemporaryDirectory(prefix="evolm-bench-inductor-")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = inductor_cache.name
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        LlamaForCausalLM(cfg).save_pretrained(tmp)
        impls = [build(n, tmp) for n in names]
        counted = evolm.load_model(tmp, dtype=torch.float32)  # FLOPs are counted on evolm's module tree
    evolm_cfg, n_matmul = counted.cfg, matmul_params(counted)
    del counted
    n_params = sum(p.numel() for p in impls[0].model.parameters())
    print(f"{'model':>15}: Llama {cfg.num_hidden_layers}L d={cfg.hidden_size} heads {cfg.num_attention_heads}/"
          f"{cfg.num_key_value_heads} kv, ffn {cfg.intermediate_size}, vocab {cfg.vocab_size}, untied; "
          f"{n_params / 1e6:.1f}M params; batch {b} x seq {t} = {b * t} tokens/step; AdamW "
          f"{'fused' if impls[0].opt.defaults.get('fused') else 'foreach'}")

    for impl in impls:  # warm-up (and compilation) one implementation at a time
        t0 = time.perf_counter()
        impl.step(ids, labels)
        impl.first_step_s = time.perf_counter() - t0
        for _ in range(args.warmup - 1):
            impl.step(ids, labels)
        print(f"warm-up {impl.name:<20} first step {impl.first_step_s:6.2f} s, loss {impl.losses[0]:.6f}")

    peak = bf16_peak()
    busy0, all0, own0 = cpu_ticks()
    for _ in range(args.steps):
        for impl in impls:
            impl.times.append(impl.step(ids, labels))
    busy1, all1, own1 = cpu_ticks()
    others = max(0.0, (busy1 - busy0) - (own1 - own0)) / max(1, all1 - all0)
    peak = max(peak, bf16_peak())  # before and after the timed steps: the best of both

    fpt = flops_per_token(evolm_cfg, n_matmul, t)
    rows = []
    for impl in impls:
        step_s = statistics.median(impl.times)
        tok_s = b * t / step_s
        rows.append({
            "impl": impl.name,
            "step_s": step_s,
            "best_step_s": min(impl.times),
            "tok_s": tok_s,
            "mfu": tok_s * fpt / peak,
            "compile_s": impl.first_step_s - step_s if impl.name.endswith("-compile") else None,
            "first_loss": impl.losses[0],
            "step_times_s": impl.times,
        })
    by = {r["impl"]: r for r in rows}
    ratio = lambda x: f"{x:8.2f}x" if x is not None else f"{'-':>9}"  # noqa: E731
    seconds = lambda x: f"{x:9.1f}" if x is not None else ""  # noqa: E731
    print(f"\n{'impl':<20} {'step s':>7} {'(best)':>7} {'tok/s':>7} {'MFU':>6} {'x HF fp32':>9} {'x HF bf16':>9} "
          f"{'first loss':>10} {'compile s':>9}")
    for r in rows:
        r["x_hf_fp32"] = r["tok_s"] / by["hf-fp32"]["tok_s"] if "hf-fp32" in by else None
        r["x_hf_bf16"] = r["tok_s"] / by["hf-bf16"]["tok_s"] if "hf-bf16" in by else None
        print(f"{r['impl']:<20} {r['step_s']:>7.3f} {r['best_step_s']:>7.3f} {r['tok_s']:>7.0f} "
              f"{r['mfu']:>6.1%} {ratio(r['x_hf_fp32'])} {ratio(r['x_hf_bf16'])} "
              f"{r['first_loss']:>10.6f} {seconds(r['compile_s'])}")
    print(f"\nstep = median (best) of {args.steps} interleaved steps after {args.warmup} warm-up; "
          f"bf16 mm peak {peak / 1e12:.3f} TFLOP/s; {fpt / 1e6:.1f} MFLOP/token "
          f"({n_matmul / 1e6:.1f}M matmul params); other processes used {others:.0%} of the CPUs meanwhile")

    base_loss = rows[0]["first_loss"]
    print(f"first-step loss vs {rows[0]['impl']}: "
          + ", ".join(f"{r['impl']} {r['first_loss'] - base_loss:+.2e}" for r in rows[1:]))
    print("\ntargets:")
    for name in ("evolm-bf16", "evolm-bf16-compile"):
        if name not in by:
            continue
        for base, goal in TARGETS.items():
            if base in by:
                x = by[name]["tok_s"] / by[base]["tok_s"]
                print(f"  {name}: {x:.2f}x {base} (target >= {goal}x: {'met' if x >= goal else 'MISSED'})")

    profiles = {}
    if args.profile:
        for impl in impls:
            profiles[impl.name] = profile_step(impl, ids, labels, args.profile)
            print(f"\n{impl.name}, {args.profile} steps, top ops by self CPU time:\n{profiles[impl.name]}")
    if args.json:
        result = {"env": env, "params": n_params, "matmul_params": n_matmul, "flops_per_token": fpt,
                  "batch": b, "seq": t, "layers": args.layers, "steps": args.steps, "warmup": args.warmup,
                  "bf16_peak_flops": peak, "others_cpu": others, "results": rows, "profiles": profiles}
        args.json.write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
