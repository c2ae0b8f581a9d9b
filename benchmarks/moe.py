"""Mixture-of-experts layer throughput on this CPU: evolm's ``MoE`` vs transformers' Mixtral block vs a
dense MLP with the same active parameters, forward + backward.

The layer is Mixtral's shape scaled down: E=8 experts, top-2, model width C, expert width F, a
SwiGLU expert each. evolm's ``MoE`` (``evolm.nn.moe``: stable sort of the token-expert assignments,
one gather, each expert once on its contiguous slice through oneDNN, weighted ``index_add``) and
transformers' ``MixtralSparseMoeBlock`` hold identical weights (loaded from one another; the first
outputs are compared). transformers runs its experts two ways, both timed: ``eager`` (a Python
loop over the experts hit, ``torch.where`` per expert, ``F.linear`` on a slice of the 3-D weight)
and ``grouped_mm`` (the default inside a ``from_pretrained`` model on torch >= 2.9:
``torch.nn.functional.grouped_mm`` over expert-sorted rows). The dense reference is evolm's
``GatedMLP`` of width K*F: the same multiply-adds per token as the routed experts, without routing.

A step is ``forward; backward(fixed random gradient)`` with parameter gradients cleared
(``set_to_none``) between steps; inputs require grad, as a layer inside a model's does. After
``--warmup`` untimed steps each, the implementations run one step at a time in rotation
(A B C D A B C D ...), so load bursts from other processes on this shared machine hit them all
alike; tokens/s is ``tokens / median(step seconds)``.

    python benchmarks/moe.py                       # fp32, 2048 tokens, C=512, F=1024
    python benchmarks/moe.py --bf16 --json moe.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import time
from collections.abc import Callable

import torch
import transformers
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

from evolm.nn.mlp import GatedMLP, MLPConfig
from evolm.nn.moe import MoE, MoEConfig


def build(args: argparse.Namespace, impl: str) -> torch.nn.Module:
    """One layer, weights from seed 0 (the same for the evolm and transformers MoE layers)."""
    torch.manual_seed(0)
    e, k, c, f = args.experts, args.top_k, args.dim, args.expert_dim
    if impl == "dense":
        return GatedMLP(c, MLPConfig(hidden_size=k * f))
    hf_cfg = transformers.MixtralConfig(hidden_size=c, intermediate_size=f, num_local_experts=e, num_experts_per_tok=k)
    hf_cfg._experts_implementation = impl.removeprefix("hf-") if impl.startswith("hf-") else "eager"
    hf = MixtralSparseMoeBlock(hf_cfg)
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0.0, 0.02)
    if impl.startswith("hf-"):
        return hf
    moe = MoE(c, MoEConfig(n_experts=e, top_k=k, expert_hidden=f, norm_topk=True))
    moe.load_state_dict(hf.state_dict())
    return moe


def step_fn(layer: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor, bf16: bool) -> Callable[[], float]:
    def step() -> float:
        layer.zero_grad(set_to_none=True)
        xi = x.detach().requires_grad_()
        t0 = time.perf_counter()
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        with ctx:
            y = layer(xi)
        y.backward(grad.to(y.dtype))
        return time.perf_counter() - t0

    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=2048, help="tokens per step (batch x sequence)")
    p.add_argument("--dim", type=int, default=512, help="model width C")
    p.add_argument("--expert-dim", type=int, default=1024, help="expert width F")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--steps", type=int, default=9, help="timed steps per implementation")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--bf16", action="store_true", help="also time under bf16 autocast")
    p.add_argument("--impls", default="evolm,dense,hf-eager,hf-grouped_mm")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: PyTorch's default)")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    impls = args.impls.split(",")
    torch.manual_seed(1)
    x = torch.randn(1, args.tokens, args.dim)
    grad = torch.randn(1, args.tokens, args.dim)
    layers = {name: build(args, name) for name in impls}
    with torch.no_grad():
        ref = layers["hf-eager"](x) if "hf-eager" in layers else None
        if ref is not None and "evolm" in layers:
            err = float((layers["evolm"](x) - ref).abs().max() / ref.abs().max())
            print(f"evolm vs transformers Mixtral block, first output: max relative error {err:.1e}")
    results: dict[str, dict[str, float]] = {}
    for precision in ["fp32"] + (["bf16"] if args.bf16 else []):
        steps = {n: step_fn(m, x, grad, precision == "bf16") for n, m in layers.items()}
        times: dict[str, list[float]] = {n: [] for n in impls}
        for _ in range(args.warmup):
            for fn in steps.values():
                fn()
        for _ in range(args.steps):
            for n, fn in steps.items():
                times[n].append(fn())
        results[precision] = {n: args.tokens / statistics.median(t) for n, t in times.items()}
        print(
            f"\n{precision}: forward + backward, {args.tokens} tokens, C={args.dim}, F={args.expert_dim}, "
            f"E={args.experts}, K={args.top_k}, {torch.get_num_threads()} threads (median of {args.steps})"
        )
        for n in impls:
            print(f"  {n:16s} {results[precision][n]:10.0f} tok/s   {statistics.median(times[n]) * 1e3:8.1f} ms")
        r = results[precision]
        if "evolm" in r:
            for other in impls:
                if other != "evolm":
                    print(f"  evolm / {other:14s} {r['evolm'] / r[other]:.2f}x")
    if args.json:
        meta = {"torch": torch.__version__, "transformers": transformers.__version__, "cpu": platform.processor()}
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "tok_per_s": results, **meta}, f, indent=2)


if __name__ == "__main__":
    main()
