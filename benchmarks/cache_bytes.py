"""Inference cache bytes per token: multi-head latent attention against MHA, GQA and MQA.

DeepSeek-V2's argument for MLA (DeepSeek-AI, 2024, Table 1): a key/value cache stores ``2 * K * D``
values per token and layer (MHA K = H; GQA, Ainslie et al., 2023, 1 < K < H; MQA, Shazeer, 2019,
K = 1), MLA stores the compressed latent and one shared rotary key, ``R + Dr``. The numbers here are
read off the cache objects evolm allocates (``model.new_cache``) for models built on the ``meta``
device (no memory), so they are what generation actually holds, not a formula.

Configurations: DeepSeek-V2-Lite's attention (27 layers, 16 heads, R = 512, Dr = 64, Dn = Dv = 128)
with MLA, and the same width with MHA (16 heads of 128), GQA (4 kv heads) and MQA; MLA expanded
to per-head keys and values (what the naive form materialises, H * (Dn + Dr + Dv)); DeepSeek-V3
(61 layers, 128 heads); and Llama-3-8B's GQA (32 layers, 8 kv heads of 128) against its MHA.
Feed-forward blocks are dense here: the cache does not depend on them.

    python benchmarks/cache_bytes.py             # bf16 table, plus the cache for a 32k-token context
    python benchmarks/cache_bytes.py --dtype fp32
"""

from __future__ import annotations

import argparse

import torch

from evolm.models.config import DecoderConfig
from evolm.models.decoder import CausalLM
from evolm.nn.mla import MLAConfig
from evolm.nn.mlp import MLPConfig
from evolm.nn.rope import RopeConfig
from evolm.nn.self_attention import AttentionConfig

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def _decoder(name: str, n_layers: int, hidden: int, attention: AttentionConfig | MLAConfig) -> DecoderConfig:
    return DecoderConfig(
        family=name,
        vocab_size=256,
        hidden_size=hidden,
        n_layers=n_layers,
        max_seq_len=4096,
        attention=attention,
        mlp=MLPConfig(hidden_size=256),
    )


def _gqa(n_heads: int, n_kv: int, head_dim: int) -> AttentionConfig:
    return AttentionConfig(n_heads=n_heads, n_kv_heads=n_kv, head_dim=head_dim, rope=RopeConfig(rotary_dim=head_dim))


def _mla(n_heads: int) -> MLAConfig:
    return MLAConfig(
        n_heads=n_heads,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        rope=RopeConfig(rotary_dim=64),
    )


def configs() -> list[tuple[str, DecoderConfig]]:
    """(label, config) rows of the table."""
    lite = 27, 2048
    return [
        ("DeepSeek-V2-Lite dims, MLA (R=512, Dr=64)", _decoder("mla", *lite, _mla(16))),
        ("DeepSeek-V2-Lite dims, MHA (16 x 128)", _decoder("mha", *lite, _gqa(16, 16, 128))),
        ("DeepSeek-V2-Lite dims, GQA (4 kv x 128)", _decoder("gqa", *lite, _gqa(16, 4, 128))),
        ("DeepSeek-V2-Lite dims, MQA (1 kv x 128)", _decoder("mqa", *lite, _gqa(16, 1, 128))),
        # the keys and values MLA's naive form expands to: 16 heads of (Dn + Dr) keys and Dv values
        ("DeepSeek-V2-Lite dims, MLA expanded", _decoder("mla-expanded", *lite, _gqa(16, 16, 160))),
        ("DeepSeek-V3 dims, MLA", _decoder("mla", 61, 7168, _mla(128))),
        ("DeepSeek-V3 dims, MHA (128 x 128)", _decoder("mha", 61, 7168, _gqa(128, 128, 128))),
        ("Llama-3-8B, GQA (8 kv x 128)", _decoder("gqa", 32, 4096, _gqa(32, 8, 128))),
        ("Llama-3-8B dims, MHA (32 x 128)", _decoder("mha", 32, 4096, _gqa(32, 32, 128))),
    ]


def cache_bytes_per_token(cfg: DecoderConfig, dtype: torch.dtype) -> tuple[int, int]:
    """Bytes of one token's cache, over all layers and per layer, read off ``new_cache`` on ``meta``."""
    with torch.device("meta"):
        model = CausalLM(cfg)
    cache = model.new_cache(batch_size=1, max_len=1, dtype=dtype)
    total = 0
    for layer_cache in cache:
        for t in vars(layer_cache).values():  # every floating buffer: keys, values or latent rows
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                total += t.numel() * t.element_size()
    return total, total // cfg.n_layers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--context", type=int, default=32768, help="tokens for the whole-cache column")
    args = parser.parse_args()
    dtype = DTYPES[args.dtype]
    rows = [(label, *cache_bytes_per_token(cfg, dtype)) for label, cfg in configs()]
    print(f"| configuration | bytes/token/layer | KiB/token (all layers) | GiB at {args.context} tokens |")
    print("| --- | ---: | ---: | ---: |")
    for label, total, per_layer in rows:
        print(f"| {label} | {per_layer:,} | {total / 2**10:,.1f} | {total * args.context / 2**30:,.2f} |")


if __name__ == "__main__":
    main()
