"""GPT-J (Wang & Komatsuzaki, 2021) and CodeGen (Nijkamp et al., 2022), which shares its block.

Each block normalises once and feeds the same LayerNorm output to attention and to the MLP
(a parallel residual)::

    x ──┬─────────────────────────(+)──>
        └── ln_1 ──┬── attn ───────┤
                   └── mlp  ───────┘

Rotary embedding (Su et al., 2021) covers the first ``rotary_dim`` channels of each head, in the
*interleaved* layout: channel pairs ``(2i, 2i+1)`` rotate at frequency i. evolm rotates the
"half" layout, pairs ``(i, i + r/2)``. Permuting the first ``r`` output rows of every head of
``q_proj`` and ``k_proj`` (even channels first, then odd ones) turns one into the other exactly:
scores ``q . k`` are unchanged by a permutation applied to both, values and outputs are untouched.
The permutation is applied on load and undone on save.

CodeGen stores q, k, v as one ``qkv_proj`` laid out for 4-way model parallelism: the output rows
are 4 blocks, each ``[q | v | k]`` for a quarter of the heads. They are split into evolm's three
projections on load and fused again on save.

State mapping (HF -> evolm): ``transformer.wte`` -> ``model.embed_tokens``, ``transformer.h.N``
-> ``model.layers.N``, ``ln_1`` -> ``input_layernorm``, ``attn`` -> ``self_attn``,
``out_proj`` -> ``o_proj``, ``mlp.fc_in``/``fc_out`` -> ``mlp.up_proj``/``down_proj``,
``transformer.ln_f`` -> ``model.norm``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from evolm.errors import CheckpointError, ConfigError
from evolm.models.config import DecoderConfig
from evolm.models.family import Family, StateDict
from evolm.models.hf_config import activation_from_hf, extra_from_hf, need
from evolm.nn.mlp import MLPConfig
from evolm.nn.norm import NormConfig
from evolm.nn.rope import RopeConfig
from evolm.nn.self_attention import AttentionConfig

_ARCH = {"gptj": "GPTJForCausalLM", "codegen": "CodeGenForCausalLM"}
_HF_ACT = {"silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu"}
_MP = 4  # CodeGen's model-parallel blocks in qkv_proj
_RENAMES = (  # HF -> evolm, applied in order
    (r"^transformer\.wte\.", "model.embed_tokens."),
    (r"^transformer\.ln_f\.", "model.norm."),
    (r"^transformer\.h\.(\d+)\.ln_1\.", r"model.layers.\1.input_layernorm."),
    (r"^transformer\.h\.(\d+)\.attn\.out_proj\.", r"model.layers.\1.self_attn.o_proj."),
    (r"^transformer\.h\.(\d+)\.attn\.", r"model.layers.\1.self_attn."),
    (r"^transformer\.h\.(\d+)\.mlp\.fc_in\.", r"model.layers.\1.mlp.up_proj."),
    (r"^transformer\.h\.(\d+)\.mlp\.fc_out\.", r"model.layers.\1.mlp.down_proj."),
)
_BACK = (
    (r"^model\.embed_tokens\.", "transformer.wte."),
    (r"^model\.norm\.", "transformer.ln_f."),
    (r"^model\.layers\.(\d+)\.input_layernorm\.", r"transformer.h.\1.ln_1."),
    (r"^model\.layers\.(\d+)\.self_attn\.o_proj\.", r"transformer.h.\1.attn.out_proj."),
    (r"^model\.layers\.(\d+)\.self_attn\.", r"transformer.h.\1.attn."),
    (r"^model\.layers\.(\d+)\.mlp\.up_proj\.", r"transformer.h.\1.mlp.fc_in."),
    (r"^model\.layers\.(\d+)\.mlp\.down_proj\.", r"transformer.h.\1.mlp.fc_out."),
)


def _rename(name: str, table: tuple[tuple[str, str], ...]) -> str:
    for pattern, repl in table:
        new, n = re.subn(pattern, repl, name)
        if n:
            return new
    return name


def _config_from_hf(hf: dict) -> DecoderConfig:
    mt = hf["model_type"]
    c = int(need(hf, "n_embd", "hidden_size"))
    n_heads = int(need(hf, "n_head", "num_attention_heads"))
    head_dim = c // n_heads
    rotary_dim = hf.get("rotary_dim", 64)
    if rotary_dim is None:  # transformers then builds sin/cos of width C, which only fits a single head
        raise ConfigError(f"{mt} rotary_dim=None is not supported; set rotary_dim (<= head width {head_dim})")
    if mt == "codegen" and n_heads % _MP:
        raise ConfigError(f"codegen n_head={n_heads} must be a multiple of {_MP} (qkv_proj's model-parallel blocks)")
    return DecoderConfig(
        family=mt,
        vocab_size=int(need(hf, "vocab_size")),
        hidden_size=c,
        n_layers=int(need(hf, "n_layer", "num_hidden_layers")),
        max_seq_len=int(need(hf, "n_positions", "max_position_embeddings")),
        attention=AttentionConfig(
            n_heads=n_heads,
            n_kv_heads=n_heads,
            head_dim=head_dim,
            rope=RopeConfig(theta=10000.0, rotary_dim=int(rotary_dim)),
        ),
        mlp=MLPConfig(
            hidden_size=int(hf.get("n_inner") or 4 * c),
            gated=False,
            activation=activation_from_hf(hf.get("activation_function", "gelu_new")),
            bias=True,
        ),
        norm=NormConfig(kind="layernorm", eps=float(hf.get("layer_norm_epsilon", 1e-5)), bias=True),
        residual="parallel",
        parallel_shared_norm=True,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        lm_head_bias=True,
        extra=extra_from_hf(hf),
    )


def _config_to_hf(cfg: DecoderConfig) -> dict[str, Any]:
    a = cfg.attention
    hf: dict[str, Any] = {
        "model_type": cfg.family,
        "architectures": [_ARCH[cfg.family]],
        "vocab_size": cfg.vocab_size,
        "n_embd": cfg.hidden_size,
        "n_layer": cfg.n_layers,
        "n_head": a.n_heads,
        "n_positions": cfg.max_seq_len,
        "rotary_dim": a.rope.rotary_dim,
        "n_inner": cfg.mlp.hidden_size,
        "activation_function": _HF_ACT[cfg.mlp.activation],
        "layer_norm_epsilon": cfg.norm.eps,
        "tie_word_embeddings": cfg.tie_embeddings,
    }
    if cfg.family == "codegen":
        hf["n_ctx"] = cfg.max_seq_len
    hf.update(dict(cfg.extra))
    return hf


def _interleaved_to_half(cfg: DecoderConfig) -> torch.Tensor:
    """Row order that turns interleaved-rotary q/k projections into half-rotary ones, (H*D,)."""
    a = cfg.attention
    d, r = a.head_dim, a.rope.rotary_dim
    within = torch.cat([torch.arange(0, r, 2), torch.arange(1, r, 2), torch.arange(r, d)])  # (D,)
    return (torch.arange(a.n_heads)[:, None] * d + within).reshape(-1)  # (H*D,)


def _state_from_hf(state: Mapping[str, torch.Tensor], cfg: DecoderConfig) -> StateDict:
    perm = _interleaved_to_half(cfg)
    c = cfg.hidden_size
    out: StateDict = {}
    for name, t in state.items():
        new = _rename(name, _RENAMES)
        if new.endswith(".self_attn.qkv_proj.weight"):  # CodeGen
            if tuple(t.shape) != (3 * c, c):
                raise CheckpointError(f"{name} has shape {tuple(t.shape)}; the config implies {(3 * c, c)}")
            blocks = t.view(_MP, 3, c // _MP, c)  # (4, [q, v, k], C/4, C)
            p = new.removesuffix(".qkv_proj.weight")
            for j, x in enumerate("qvk"):
                out[f"{p}.{x}_proj.weight"] = blocks[:, j].reshape(c, c)  # (C, C), heads in order
        else:
            out[new] = t
    for name in list(out):
        if name.endswith((".self_attn.q_proj.weight", ".self_attn.k_proj.weight")):
            if out[name].shape[0] != perm.shape[0]:
                raise CheckpointError(f"{name} has {out[name].shape[0]} rows; the config implies {perm.shape[0]}")
            out[name] = out[name][perm]
    return out


def _state_to_hf(state: Mapping[str, torch.Tensor], cfg: DecoderConfig) -> StateDict:
    inverse = torch.argsort(_interleaved_to_half(cfg))
    c = cfg.hidden_size
    out: StateDict = {}
    for name, t in state.items():
        if name.endswith((".self_attn.q_proj.weight", ".self_attn.k_proj.weight")):
            t = t[inverse]
        out[_rename(name, _BACK)] = t
    if cfg.family == "codegen":
        for name in [n for n in out if n.endswith(".attn.q_proj.weight")]:
            p = name.removesuffix(".q_proj.weight")
            q, v, k = (out.pop(f"{p}.{x}_proj.weight").view(_MP, c // _MP, c) for x in "qvk")  # (4, C/4, C)
            out[f"{p}.qkv_proj.weight"] = torch.stack([q, v, k], dim=1).reshape(3 * c, c)  # (3C, C)
    return out


FAMILIES = {
    mt: Family(
        name=mt,
        model_types=(mt,),
        architecture=arch,
        config_from_hf=_config_from_hf,
        config_to_hf=_config_to_hf,
        state_from_hf=_state_from_hf,
        state_to_hf=_state_to_hf,
        ignored_keys=("attn.bias", "attn.masked_bias", "attn.causal_mask", "attn.embed_positions"),
    )
    for mt, arch in _ARCH.items()
}
