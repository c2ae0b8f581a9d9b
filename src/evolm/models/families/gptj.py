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

from collections.abc import Mapping
from typing import Any

import torch

from evolm.errors import CheckpointError, ConfigError
from evolm.models.config import DecoderConfig
from evolm.models.family import StateDict, families_by_type
from evolm.models.hf_config import gpt2_style_from_hf, gpt2_style_to_hf, need
from evolm.models.renames import Renames, fuse, unfuse
from evolm.nn.rope import RopeConfig
from evolm.nn.self_attention import AttentionConfig

_ARCH = {"gptj": "GPTJForCausalLM", "codegen": "CodeGenForCausalLM"}
_MP = 4  # CodeGen's model-parallel blocks in qkv_proj
_QVK = ("attn.q_proj", "attn.v_proj", "attn.k_proj")  # CodeGen's order inside attn.qkv_proj
_RENAMES = Renames(  # (HF, evolm), at the start of a name
    ("transformer.wte.", "model.embed_tokens."),
    ("transformer.ln_f.", "model.norm."),
    ("transformer.h.{i}.ln_1.", "model.layers.{i}.input_layernorm."),
    ("transformer.h.{i}.attn.out_proj.", "model.layers.{i}.self_attn.o_proj."),
    ("transformer.h.{i}.attn.", "model.layers.{i}.self_attn."),
    ("transformer.h.{i}.mlp.fc_in.", "model.layers.{i}.mlp.up_proj."),
    ("transformer.h.{i}.mlp.fc_out.", "model.layers.{i}.mlp.down_proj."),
)


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
        **gpt2_style_from_hf(hf, tie_embeddings=False),
        attention=AttentionConfig(
            n_heads=n_heads,
            n_kv_heads=n_heads,
            head_dim=head_dim,
            rope=RopeConfig(theta=10000.0, rotary_dim=int(rotary_dim)),
        ),
        residual="parallel",
        parallel_shared_norm=True,
        lm_head_bias=True,
    )


def _config_to_hf(cfg: DecoderConfig) -> dict[str, Any]:
    codegen = {"n_ctx": cfg.max_seq_len} if cfg.family == "codegen" else {}
    return gpt2_style_to_hf(cfg, _ARCH[cfg.family], rotary_dim=cfg.attention.rope.rotary_dim, **codegen)


def _interleaved_to_half(cfg: DecoderConfig) -> torch.Tensor:
    """Row order that turns interleaved-rotary q/k projections into half-rotary ones, (H*D,)."""
    a = cfg.attention
    d, r = a.head_dim, a.rope.rotary_dim
    within = torch.cat([torch.arange(0, r, 2), torch.arange(1, r, 2), torch.arange(r, d)])  # (D,)
    return (torch.arange(a.n_heads)[:, None] * d + within).reshape(-1)  # (H*D,)


def _state_from_hf(state: Mapping[str, torch.Tensor], cfg: DecoderConfig) -> StateDict:
    perm = _interleaved_to_half(cfg)
    c = cfg.hidden_size

    def split_qvk(name: str, t: torch.Tensor) -> list[torch.Tensor]:  # CodeGen
        if tuple(t.shape) != (3 * c, c):
            raise CheckpointError(f"{name} has shape {tuple(t.shape)}; the config implies {(3 * c, c)}")
        blocks = t.view(_MP, 3, c // _MP, c)  # (4, [q, v, k], C/4, C)
        return [blocks[:, j].reshape(c, c) for j in range(3)]  # (C, C) each, heads in order

    out = _RENAMES.state_from_hf(unfuse(state, "attn.qkv_proj", _QVK, split_qvk, params=("weight",)))
    for name in list(out):
        if name.endswith((".self_attn.q_proj.weight", ".self_attn.k_proj.weight")):
            if out[name].shape[0] != perm.shape[0]:
                raise CheckpointError(f"{name} has {out[name].shape[0]} rows; the config implies {perm.shape[0]}")
            out[name] = out[name][perm]
    return out


def _state_to_hf(state: Mapping[str, torch.Tensor], cfg: DecoderConfig) -> StateDict:
    inverse = torch.argsort(_interleaved_to_half(cfg))
    c = cfg.hidden_size

    def join_qvk(parts: list[torch.Tensor]) -> torch.Tensor:  # CodeGen
        q, v, k = (t.view(_MP, c // _MP, c) for t in parts)  # (4, C/4, C) each
        return torch.stack([q, v, k], dim=1).reshape(3 * c, c)  # (3C, C)

    out = {
        name: t[inverse] if name.endswith((".self_attn.q_proj.weight", ".self_attn.k_proj.weight")) else t
        for name, t in state.items()
    }
    out = _RENAMES.state_to_hf(out)
    if cfg.family == "codegen":
        out = fuse(out, _QVK, "attn.qkv_proj", join_qvk, params=("weight",))
    return out


# Causal-mask and position buffers of older checkpoints (not weights).
_BUFFERS = ("attn.bias", "attn.masked_bias", "attn.causal_mask", "attn.embed_positions")
FAMILIES = families_by_type(_ARCH, _config_from_hf, _config_to_hf, _state_from_hf, _state_to_hf, _BUFFERS)
