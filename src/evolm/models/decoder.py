"""The decoder-only transformer (Radford et al., 2018, GPT) every causal family is built from.

A model is a backbone that returns hidden states plus a head. ``DecoderBackbone`` embeds tokens
(or takes embeddings), runs a uniform ``ModuleList`` of ``DecoderLayer`` blocks and a final
norm; ``CausalLM`` adds the language-model head. Other heads (reward, value, pooling) reuse the
backbone unchanged.

Module names follow Hugging Face's Llama layout (``model.layers.N.self_attn.q_proj``,
``model.layers.N.mlp.gate_proj``, ``lm_head``) so checkpoints and PEFT adapters map by name.

Residual topologies, sub-layer f, norms n (see ``DecoderConfig``)::

    pre        x ──┬──────────────────(+)──>      post      x ─┬──────(+)── n ──>
                   └── n ── f ─────────┘                      └── f ──┘

    parallel   x ──┬───────────────────(+)──>   sandwich    x ─┬─────────────────(+)──>
                   ├── n1 ── attn ──────┤                      └─ n_pre ─ f ─ n_post ┘
                   └── n2 ── mlp  ──────┘
"""

from __future__ import annotations

import torch
from torch import nn

from evolm.models.config import DecoderConfig
from evolm.nn.attention import AttentionMask
from evolm.nn.kv_cache import KVCache, RollingKVCache, StaticKVCache
from evolm.nn.latent_cache import LatentCache
from evolm.nn.linear import Linear
from evolm.nn.mla import MLAConfig, make_attention
from evolm.nn.mlp import make_mlp
from evolm.nn.moe import MoE
from evolm.nn.norm import make_norm
from evolm.nn.positions import sinusoidal_positions
from evolm.nn.rope import rope_cos_sin


class DecoderLayer(nn.Module):
    """One transformer block: self-attention then MLP, joined by the configured residual topology."""

    def __init__(self, cfg: DecoderConfig, layer: int) -> None:
        super().__init__()
        c = cfg.hidden_size
        self.residual = cfg.residual
        self.window = cfg.window(layer)
        self.self_attn = make_attention(cfg.attention, c)
        self.mlp = MoE(c, cfg.moe) if cfg.is_moe(layer) else make_mlp(cfg.mlp, c)
        if cfg.residual in ("pre", "parallel", "sandwich"):
            self.input_layernorm = make_norm(cfg.norm, c)
        if cfg.residual in ("pre", "post", "sandwich", "output") or (
            cfg.residual == "parallel" and not cfg.parallel_shared_norm
        ):
            self.post_attention_layernorm = make_norm(cfg.norm, c)
        if cfg.residual == "sandwich":
            self.pre_feedforward_layernorm = make_norm(cfg.norm, c)
        if cfg.residual in ("post", "sandwich", "output"):
            self.post_feedforward_layernorm = make_norm(cfg.norm, c)

    def forward(
        self,
        x: torch.Tensor,
        mask: AttentionMask,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """(B, T, C) -> (B, T, C); ``mask`` already carries this layer's window and cache keys."""
        r = self.residual
        if r == "pre":
            x = x + self.self_attn(self.input_layernorm(x), mask, rope, cache)
            return x + self.mlp(self.post_attention_layernorm(x))
        if r == "parallel":
            h = self.input_layernorm(x)
            h_mlp = h if not hasattr(self, "post_attention_layernorm") else self.post_attention_layernorm(x)
            return x + self.self_attn(h, mask, rope, cache) + self.mlp(h_mlp)
        if r == "sandwich":
            x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), mask, rope, cache))
            return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        if r == "output":
            x = x + self.post_attention_layernorm(self.self_attn(x, mask, rope, cache))
            return x + self.post_feedforward_layernorm(self.mlp(x))
        # post-LN
        x = self.post_attention_layernorm(x + self.self_attn(x, mask, rope, cache))
        return self.post_feedforward_layernorm(x + self.mlp(x))


class DecoderBackbone(nn.Module):
    """Embeddings, blocks and final norm; returns hidden states (B, T, C)."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        if cfg.absolute_positions == "learned":
            self.embed_positions = nn.Embedding(cfg.max_seq_len, cfg.hidden_size)
        if cfg.embedding_norm:
            self.embed_norm = make_norm(cfg.norm, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.n_layers))
        if cfg.final_norm:
            self.norm = make_norm(cfg.norm, cfg.hidden_size)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        *,
        inputs_embeds: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        cache: list[KVCache | RollingKVCache] | None = None,
    ) -> torch.Tensor:
        """Hidden states of the last block (after the final norm).

        Args:
            input_ids: (B, T) token ids; exactly one of ``input_ids``/``inputs_embeds``.
            inputs_embeds: (B, T, C) embeddings fed instead of tokens (vision projectors, soft prompts);
                used as given (no ``embedding_scale``), as transformers does.
            position_ids: (B, T) or (T,) positions for RoPE / learned positions; default
                ``cached + arange(T)``.
            attention_mask: (B, S) with 1 for real tokens and 0 for padding, S = cached + T.
            document_ids: (B, T) ids of packed documents; tokens only see their own document.
                Not combinable with a cache.
            cache: One ``KVCache`` per layer, extended in place.

        Returns:
            (B, T, C).
        """
        cfg = self.cfg
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids (B, T) or inputs_embeds (B, T, C)")
        if input_ids is not None:
            if input_ids.dim() != 2:
                raise ValueError(f"input_ids must be (batch, tokens); got shape {tuple(input_ids.shape)}")
            x = self.embed_tokens(input_ids)  # (B, T, C)
            if cfg.embedding_scale is not None:  # Gemma; given embeddings are taken as already scaled
                x = x * torch.tensor(cfg.embedding_scale, dtype=x.dtype)
        else:
            x = inputs_embeds
        b, t, _ = x.shape
        past = cache[0].length if cache is not None else 0
        if cache is not None and len(cache) != len(self.layers):
            raise ValueError(f"cache has {len(cache)} layers; the model has {len(self.layers)}")
        if past + t > cfg.max_seq_len:
            raise ValueError(
                f"sequence of {past + t} tokens (cached {past} + new {t}) exceeds the model's "
                f"context length max_seq_len={cfg.max_seq_len}"
            )
        device = x.device
        q_index = torch.arange(past, past + t, device=device)
        if position_ids is None:
            position_ids = q_index[None].expand(b, t)
        elif position_ids.dim() == 1:
            position_ids = position_ids[None].expand(b, t)

        if cfg.absolute_positions == "learned":
            x = x + self.embed_positions(position_ids)
        elif cfg.absolute_positions == "sinusoidal":
            x = x + sinusoidal_positions(position_ids, cfg.hidden_size).to(x.dtype)
        if cfg.embedding_norm:
            x = self.embed_norm(x)

        key_valid = None
        if attention_mask is not None:
            if attention_mask.shape != (b, past + t):
                raise ValueError(
                    f"attention_mask has shape {tuple(attention_mask.shape)}; expected (batch, cached + new) "
                    f"= ({b}, {past + t})"
                )
            key_valid = attention_mask.bool()
        if document_ids is not None and cache is not None:
            raise ValueError("document_ids cannot be combined with a KV cache")
        masks = self._layer_masks(q_index, key_valid, document_ids, cache)
        rope = None
        if cfg.attention.position == "rope":
            rope = rope_cos_sin(cfg.attention.rope, position_ids, dtype=x.dtype)
        for i, layer in enumerate(self.layers):
            x = layer(x, masks[i], rope, cache[i] if cache is not None else None)
        if cfg.final_norm:
            x = self.norm(x)
        return x

    def _layer_masks(
        self,
        q_index: torch.Tensor,
        key_valid: torch.Tensor | None,
        document_ids: torch.Tensor | None,
        cache: list[KVCache | RollingKVCache] | None,
    ) -> list[AttentionMask]:
        """One mask per layer, shared (with its dense form) by layers of the same window and cache kind."""
        t = q_index.shape[0]
        shared: dict[tuple, AttentionMask] = {}
        masks = []
        for i, layer in enumerate(self.layers):
            c = cache[i] if cache is not None else None
            key = (layer.window, type(c), getattr(c, "window", None))
            if key not in shared:
                shared[key] = AttentionMask(
                    q_index=q_index,
                    k_index=q_index if c is None else c.key_index(t),
                    causal=True,
                    window=layer.window,
                    key_valid=key_valid,
                    q_doc=document_ids,
                    k_doc=document_ids,
                    keys_are_history=c is None or getattr(c, "keys_are_history", False),
                )
            masks.append(shared[key])
        return masks


class CausalLM(nn.Module):
    """A decoder backbone with a language-model head: ``model(input_ids) -> logits (B, T, V)``."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = DecoderBackbone(cfg)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=cfg.lm_head_bias)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def tie_weights(self) -> None:
        """Re-point the head at the embedding matrix (after ``load_state_dict(assign=True)``)."""
        if self.cfg.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def new_cache(
        self, batch_size: int, max_len: int | None = None, dtype: torch.dtype | None = None, static: bool = False
    ) -> list[KVCache]:
        """Empty per-layer KV caches for ``batch_size`` sequences of up to ``max_len`` tokens.

        ``static``: full-attention layers get a ``StaticKVCache`` (decode shapes that never change,
        for a compiled decode step).
        """
        a, p = self.cfg.attention, self.lm_head.weight
        max_len = max_len or self.cfg.max_seq_len
        if isinstance(a, MLAConfig):  # latent attention caches the compressed latent, not keys and values
            r, dr = a.kv_lora_rank, a.qk_rope_head_dim
            return [LatentCache(batch_size, max_len, r, dr, dtype or p.dtype, p.device) for _ in self.model.layers]
        caches: list[KVCache | RollingKVCache] = []
        for layer in self.model.layers:
            if layer.window is not None and layer.window < max_len:  # memory O(window), not O(max_len)
                caches.append(
                    RollingKVCache(batch_size, a.n_kv_heads, layer.window, a.head_dim, dtype or p.dtype, p.device)
                )
            else:
                kind = StaticKVCache if static else KVCache
                caches.append(kind(batch_size, a.n_kv_heads, max_len, a.head_dim, dtype or p.dtype, p.device))
        return caches

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        *,
        inputs_embeds: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        cache: list[KVCache | RollingKVCache] | None = None,
    ) -> torch.Tensor:
        """Next-token logits (B, T, V); arguments as ``DecoderBackbone.forward``."""
        h = self.model(
            input_ids,
            inputs_embeds=inputs_embeds,
            position_ids=position_ids,
            attention_mask=attention_mask,
            document_ids=document_ids,
            cache=cache,
        )
        logits = self.lm_head(h)
        if self.cfg.final_softcap is not None:
            c = self.cfg.final_softcap
            logits = torch.tanh(logits / c) * c
        return logits
