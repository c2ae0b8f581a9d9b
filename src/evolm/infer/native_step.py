"""A whole decode step in one native call, for pre-norm Llama-style decoders at batch 1 on AVX-512 CPUs.

At batch 1 a decode step reads every weight once and does little arithmetic with it, so its speed
limit is the memory bandwidth (Williams et al., 2009, the roofline). The module path, eager or
compiled, runs a step as ~85 product calls plus ~100 small operations; between calls the memory sits
idle and each thread's stream of weights restarts. ``torch.classes.evolm_kernels.DecodePlan``
(``evolm/nn/kernels/decode_step.cpp``) runs the whole step in one OpenMP parallel region instead, the
way llama.cpp computes its graph on a fixed pool of threads: each thread streams a contiguous share of
every product's rows, stages meet at barriers, and a thread waiting at one prefetches its share of the
next weight. Measured on the decode benchmark (``benchmarks/README.md``): see "Session 6".

It covers the family shape most checkpoints have: pre-norm blocks, RMSNorm (Zhang & Sennrich, 2019),
rotary positions (Su et al., 2021) with a length-independent scaling, grouped-query attention (Ainslie
et al., 2023) with optional q/k/v biases (Qwen2), a SwiGLU MLP (Shazeer, 2020), a final norm and an
untied or tied head: Llama 1-3, Mistral without a sliding window, Qwen2, SmolLM. A model or cache it
does not cover (adapters, quantised or hooked layers, sliding windows, MoE, ...) keeps the module path;
``unsupported(model, cache)`` says why.

Numerics follow the modules: float32 products and statistics, with every intermediate rounded to the
model's dtype where the module path stores one. float32 steps match the module path to float32
rounding; bf16 steps to bf16 rounding of sums taken in another order.
"""

from __future__ import annotations

import torch
from torch import nn

from evolm.models.decoder import CausalLM
from evolm.nn import decode_kernels
from evolm.nn.kv_cache import KVCache, StaticKVCache
from evolm.nn.linear import Linear
from evolm.nn.mlp import GatedMLP
from evolm.nn.norm import RMSNorm
from evolm.nn.rope import rope_cos_sin
from evolm.nn.self_attention import AttentionConfig, SelfAttention

_DTYPES = (torch.float32, torch.bfloat16)
_PLAIN = (torch.Tensor, nn.Parameter)
# Scalings whose tables depend on the sequence length are computed per step by the module path.
_LENGTH_DEPENDENT_ROPE = ("dynamic", "longrope")


def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks)


def unsupported(model: nn.Module, cache: list) -> str | None:
    """Why ``model`` with ``cache`` cannot run native decode steps, or None when it can."""
    if not decode_kernels.loaded:
        return "the AVX-512 decode kernels are not loaded (evolm.nn.decode_kernels.available())"
    if type(model) is not CausalLM:
        return f"{type(model).__name__} is not a plain CausalLM"
    cfg = model.cfg
    a = cfg.attention
    if not isinstance(a, AttentionConfig):
        return f"{type(a).__name__} attention (latent attention: MLAConfig)"
    checks = [
        (cfg.residual == "pre", f"residual={cfg.residual!r} (pre-norm only)"),
        (cfg.norm.kind == "rmsnorm" and not cfg.norm.unit_offset, "the norm is not a plain RMSNorm"),
        (a.position == "rope", "positions are not rotary"),
        (
            a.rope is None or a.rope.scaling is None or a.rope.scaling.kind not in _LENGTH_DEPENDENT_ROPE,
            "a length-dependent rotary scaling",
        ),
        (
            a.qk_norm is None and a.clip_qkv is None and a.softcap is None and not a.out_bias,
            "QK-norm, clipping, a score soft-cap or an output bias",
        ),
        (cfg.mlp.gated and cfg.mlp.activation == "silu" and not cfg.mlp.bias, "the MLP is not SwiGLU without biases"),
        (cfg.moe is None, "mixture-of-experts layers"),
        (all(cfg.window(i) is None for i in range(cfg.n_layers)), "sliding-window layers"),
        (
            cfg.absolute_positions == "none" and not cfg.embedding_norm and cfg.embedding_scale is None,
            "absolute positions, an embedding norm or an embedding scale",
        ),
        (
            cfg.final_norm and cfg.final_softcap is None and not cfg.lm_head_bias,
            "no final norm, a logit soft-cap or a head bias",
        ),
    ]
    for ok, reason in checks:
        if not ok:
            return reason
    if torch.is_autocast_enabled("cpu"):
        return "autocast is on"
    if _hooked(model) or _hooked(model.model) or type(model.lm_head) is not Linear or _hooked(model.lm_head):
        return "the model or its head has hooks or is replaced"
    if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
        return "global module hooks are registered"
    embed = model.model.embed_tokens
    if type(embed) is not nn.Embedding or _hooked(embed) or type(model.model.norm) is not RMSNorm:
        return "the embedding or final norm has hooks or is replaced"
    modules = [model.model.norm]
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        if type(attn) is not SelfAttention or type(mlp) is not GatedMLP or _hooked(layer):
            return "a layer's attention or MLP is replaced or hooked"
        norms = [layer.input_layernorm, layer.post_attention_layernorm]
        projections = [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj]
        if any(type(m) is not RMSNorm for m in norms) or any(type(m) is not Linear for m in projections):
            return "a layer's norm or projection is replaced (adapters such as LoRA, quantisation)"
        modules += [attn, mlp, *norms, *projections]
    for m in modules:
        if _hooked(m):
            return f"a {type(m).__name__} has hooks"
        if isinstance(m, RMSNorm) and m.eps != cfg.norm.eps:
            return "norms of different eps"
    dtype = embed.weight.dtype
    if dtype not in _DTYPES:
        return f"dtype {dtype} (float32 and bfloat16 only)"
    for p in model.parameters():
        if type(p) not in _PLAIN or p.device.type != "cpu" or p.dtype != dtype:
            return "parameters that are not plain CPU tensors of one dtype"
        if p.requires_grad and torch.is_grad_enabled():
            return "gradients are enabled"
    if len(cache) != cfg.n_layers:
        return f"the cache has {len(cache)} layers for {cfg.n_layers}"
    for c in cache:
        if type(c) not in (KVCache, StaticKVCache):
            return f"cache of type {type(c).__name__} (KVCache or StaticKVCache only)"
        if c.k.shape[0] != 1 or c.k.dtype != dtype or c.k.shape != c.v.shape or c.k.shape[1:] != cache[0].k.shape[1:]:
            return "the cache is not batch 1 of the model's dtype and shape"
    if cache[0].k.shape[1] != a.n_kv_heads or cache[0].k.shape[3] != a.head_dim:
        return "the cache's heads or widths differ from the model's"
    return None


class NativeStep:
    """Decode steps of ``model`` over ``cache`` (batch 1) in one native call each.

    Build through ``native_step``, which returns None where ``unsupported`` gives a reason.
    """

    def __init__(self, model: CausalLM, cache: list[KVCache]) -> None:
        cfg, a = model.cfg, model.cfg.attention
        self.cache = cache
        none = torch.empty(0)
        layers: list[torch.Tensor] = []
        for layer in model.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            biases = [
                p.bias.detach().float().contiguous() if p.bias is not None else none
                for p in (attn.q_proj, attn.k_proj, attn.v_proj)
            ]
            layers += [
                layer.input_layernorm.weight,
                attn.q_proj.weight,
                attn.k_proj.weight,
                attn.v_proj.weight,
                *biases,
                attn.o_proj.weight,
                layer.post_attention_layernorm.weight,
                mlp.gate_proj.weight,
                mlp.up_proj.weight,
                mlp.down_proj.weight,
            ]
        embed = model.model.embed_tokens.weight.detach().contiguous()
        cos, sin = rope_cos_sin(a.rope, torch.arange(cache[0].max_len)[None], dtype=embed.dtype)
        self.plan = torch.classes.evolm_kernels.DecodePlan(  # checks the tensors once; keeps them alive
            [t.detach().contiguous() for t in layers],
            [c.k for c in cache],
            [c.v for c in cache],
            embed,
            model.model.norm.weight.detach().contiguous(),
            model.lm_head.weight.detach().contiguous(),
            cos[0].contiguous(),
            sin[0].contiguous(),
            a.n_heads,
            cfg.norm.eps,
            a.scale if a.scale is not None else a.head_dim**-0.5,
        )

    def __call__(self, token: int, pos: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Feed ``token`` at position ``pos`` (the cache's length): logits (1, V) in the model's dtype,
        their argmax (1,) and whether they are all finite (1,). The cache grows by one token."""
        self._reserve(pos, 1)
        out = self.plan.step(token, pos)
        for c in self.cache:
            c.length = pos + 1
        return out

    def greedy(self, token: int, pos: int, n: int, eos: list[int]) -> tuple[torch.Tensor, bool]:
        """Up to ``n`` greedy steps from ``token`` at ``pos`` in one native call (no Python between steps,
        whose code and data each step's weight stream evicts from the caches: ~0.1 ms a step here).
        Returns the tokens chosen, (m,), stopping after one in ``eos``, and True if it stopped before a
        step whose logits were not all finite. The cache grows by the steps run."""
        self._reserve(pos, n)
        tokens, nonfinite = self.plan.greedy(token, pos, n, eos)
        for c in self.cache:
            c.length = pos + tokens.shape[0] + int(nonfinite)
        return tokens, nonfinite

    def _reserve(self, pos: int, n: int) -> None:
        """Raise (cache unchanged) unless ``n`` tokens fed from ``pos`` continue the cache and fit in it."""
        if pos != self.cache[0].length:
            raise ValueError(f"native decode step at position {pos}, but the cache holds {self.cache[0].length} tokens")
        self.cache[0]._reserve(n, "KV cache")  # every layer's cache has the same slots


def native_step(model: nn.Module, cache: list) -> NativeStep | None:
    """A ``NativeStep`` for ``model`` and ``cache``, or None where ``unsupported`` gives a reason."""
    return NativeStep(model, cache) if unsupported(model, cache) is None else None
