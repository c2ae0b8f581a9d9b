"""GPT-2 (Radford et al., 2019, "Language Models are Unsupervised Multitask Learners").

Pre-LN blocks with LayerNorm (with bias), learned absolute positions added to the token
embeddings, a plain GELU MLP of width ``n_inner`` (default 4C), biases everywhere and an LM
head tied to the token embeddings.

Checkpoint layout (``transformer.`` prefix optional: the original OpenAI conversions were saved
from ``GPT2Model`` without it):

=================================  ==========================================
HF tensor                          evolm tensor
=================================  ==========================================
``wte``                            ``model.embed_tokens``
``wpe``                            ``model.embed_positions``
``h.N.ln_1`` / ``h.N.ln_2``        ``input_layernorm`` / ``post_attention_layernorm``
``h.N.attn.c_attn`` (C, 3C)        ``self_attn.{q,k,v}_proj`` (split, transposed)
``h.N.attn.c_proj`` (C, C)         ``self_attn.o_proj`` (transposed)
``h.N.mlp.c_fc`` / ``c_proj``      ``mlp.up_proj`` / ``mlp.down_proj`` (transposed)
``ln_f``                           ``model.norm``
=================================  ==========================================

GPT-2 stores its projections as ``Conv1D`` modules whose weight is ``(in, out)``, the transpose of
``nn.Linear``'s ``(out, in)``; the fused ``c_attn`` holds q, k and v side by side along ``out``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from evolm.errors import ConfigError
from evolm.models.config import DecoderConfig
from evolm.models.family import StateDict, families_by_type
from evolm.models.hf_config import gpt2_style_from_hf, gpt2_style_to_hf, need
from evolm.nn.self_attention import AttentionConfig

_ARCH = {"gpt2": "GPT2LMHeadModel"}

# Options of GPT2Config evolm does not implement, with the only value it accepts.
_UNSUPPORTED = {"scale_attn_by_inverse_layer_idx": False, "add_cross_attention": False}


def _config_from_hf(hf: dict) -> DecoderConfig:
    for field, default in _UNSUPPORTED.items():
        if hf.get(field, default) != default:
            raise ConfigError(f"{field}={hf[field]!r} is not supported for gpt2; only {default!r} is")
    c = int(need(hf, "n_embd", "hidden_size"))
    n_heads = int(need(hf, "n_head", "num_attention_heads"))
    if c % n_heads:
        raise ConfigError(f"n_embd={c} is not a multiple of n_head={n_heads}")
    # scale_attn_weights=False drops the 1/sqrt(D) factor: scores are raw dot products.
    scale = None if hf.get("scale_attn_weights", True) else 1.0
    base = gpt2_style_from_hf(hf, tie_embeddings=True)
    # reorder_and_upcast_attn only changes the precision of HF's eager attention (fp32 scores and
    # softmax); the function is the same, so it is accepted and written back on save.
    if hf.get("reorder_and_upcast_attn"):
        base["extra"] += (("reorder_and_upcast_attn", True),)
    return DecoderConfig(
        family="gpt2",
        **base,
        attention=AttentionConfig(
            n_heads=n_heads,
            n_kv_heads=n_heads,
            head_dim=c // n_heads,
            qkv_bias=True,
            out_bias=True,
            scale=scale,
            position="none",
        ),
        residual="pre",
        absolute_positions="learned",
    )


def _config_to_hf(cfg: DecoderConfig) -> dict[str, Any]:
    a = cfg.attention
    if a.scale not in (None, 1.0):
        raise ConfigError(f"attention.scale={a.scale} cannot be written as a gpt2 config; only None or 1.0")
    return gpt2_style_to_hf(
        cfg,
        _ARCH["gpt2"],
        scale_attn_weights=a.scale is None,
        scale_attn_by_inverse_layer_idx=False,
        reorder_and_upcast_attn=False,
    )


# Per-layer tensors whose names differ only by a rename (biases, norms); Conv1D weights are handled apart.
_LAYER_RENAMES = {
    "ln_1.weight": "input_layernorm.weight",
    "ln_1.bias": "input_layernorm.bias",
    "ln_2.weight": "post_attention_layernorm.weight",
    "ln_2.bias": "post_attention_layernorm.bias",
    "attn.c_proj.bias": "self_attn.o_proj.bias",
    "mlp.c_fc.bias": "mlp.up_proj.bias",
    "mlp.c_proj.bias": "mlp.down_proj.bias",
}
# Conv1D weights, stored (in, out): transposed to nn.Linear's (out, in).
_CONV1D = {
    "attn.c_proj.weight": "self_attn.o_proj.weight",
    "mlp.c_fc.weight": "mlp.up_proj.weight",
    "mlp.c_proj.weight": "mlp.down_proj.weight",
}
_TOP_RENAMES = {
    "wte.weight": "model.embed_tokens.weight",
    "wpe.weight": "model.embed_positions.weight",
    "ln_f.weight": "model.norm.weight",
    "ln_f.bias": "model.norm.bias",
}
_LAYER = re.compile(r"h\.(\d+)\.(.+)")


def _state_from_hf(state: Mapping[str, torch.Tensor], cfg: DecoderConfig) -> StateDict:
    c = cfg.hidden_size
    out: StateDict = {}
    for name, t in state.items():
        name = name.removeprefix("transformer.")
        m = _LAYER.fullmatch(name)
        if m is None:
            out[_TOP_RENAMES.get(name, name)] = t
            continue
        pre, rest = f"model.layers.{m[1]}.", m[2]
        if rest == "attn.c_attn.weight":  # (C, 3C): q, k, v side by side along the output axis
            for proj, w in zip("qkv", t.split(c, dim=1), strict=True):
                out[f"{pre}self_attn.{proj}_proj.weight"] = w.t().contiguous()  # (C_out, C_in)
        elif rest == "attn.c_attn.bias":  # (3C,)
            for proj, b in zip("qkv", t.split(c, dim=0), strict=True):
                out[f"{pre}self_attn.{proj}_proj.bias"] = b.contiguous()
        elif rest in _CONV1D:
            out[pre + _CONV1D[rest]] = t.t().contiguous()
        else:
            out[pre + _LAYER_RENAMES.get(rest, rest)] = t
    return out


def _state_to_hf(state: Mapping[str, torch.Tensor], cfg: DecoderConfig) -> StateDict:
    top = {v: k for k, v in _TOP_RENAMES.items()}
    layer_renames = {v: k for k, v in _LAYER_RENAMES.items()}
    conv1d = {v: k for k, v in _CONV1D.items()}
    out: StateDict = {}
    for i in range(cfg.n_layers):
        pre = f"model.layers.{i}.self_attn."
        q, k, v = (state[f"{pre}{p}_proj.weight"] for p in "qkv")
        out[f"transformer.h.{i}.attn.c_attn.weight"] = torch.cat((q.t(), k.t(), v.t()), dim=1)  # (C, 3C)
        out[f"transformer.h.{i}.attn.c_attn.bias"] = torch.cat([state[f"{pre}{p}_proj.bias"] for p in "qkv"])
    for name, t in state.items():
        if name == "lm_head.weight":
            out[name] = t
            continue
        m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
        if m is None:
            out["transformer." + top[name]] = t
            continue
        rest = m[2]
        if rest.startswith("self_attn.") and rest.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
            continue  # fused above
        hf_rest = conv1d.get(rest) or layer_renames[rest]
        out[f"transformer.h.{m[1]}.{hf_rest}"] = t.t().contiguous() if rest in conv1d else t
    return out


# Causal-mask buffers of older checkpoints (not weights); ".attn.bias" does not match "c_attn.bias".
_BUFFERS = (".attn.bias", ".attn.masked_bias")
FAMILIES = families_by_type(_ARCH, _config_from_hf, _config_to_hf, _state_from_hf, _state_to_hf, _BUFFERS)
