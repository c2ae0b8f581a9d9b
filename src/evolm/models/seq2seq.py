"""The encoder-decoder transformer (Vaswani et al., 2017, "Attention Is All You Need") that T5,
BART and the original Transformer are built from.

An encoder reads the source bidirectionally; a decoder reads the target causally and attends to
the encoder output through cross-attention in every layer::

    source ─ embed ─ [self-attn ─ MLP] x N_enc ─ norm ─┐ memory
                                                       v
    target ─ embed ─ [causal self-attn ─ cross-attn ─ MLP] x N_dec ─ norm ─ (scale) ─ lm_head ─ logits

Each sub-layer f joins the residual stream pre-LN (``x + f(n(x))``: T5) or post-LN
(``n(x + f(x))``: the 2017 Transformer, BART). Positions are T5's relative bias added to the
scores (``relative_buckets > 0``), learned absolute (BART, with its offset of 2) or sinusoidal
(2017). One token embedding is shared by encoder and decoder (and the head when tied).

Module names follow the decoder-only models (``self_attn.q_proj``, ``mlp.gate_proj``,
``lm_head``); each family's converter renames HF checkpoints onto them.

Notation: B batch, S source tokens, T target tokens, C width, H heads, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from evolm.errors import ConfigError
from evolm.models.config import DecoderConfig
from evolm.nn.attention import AttentionMask
from evolm.nn.cross_attention import Attention
from evolm.nn.cross_cache import CrossCache
from evolm.nn.kv_cache import KVCache
from evolm.nn.linear import Linear
from evolm.nn.mlp import make_mlp
from evolm.nn.norm import make_norm
from evolm.nn.positions import sinusoidal_positions
from evolm.nn.relative_position import RelativePositionBias


@dataclass(frozen=True)
class Seq2SeqConfig(DecoderConfig):
    """An encoder-decoder transformer: ``DecoderConfig``'s fields for both stacks, plus these.

    Inherited fields read as follows: ``n_layers`` counts *encoder* layers; ``attention``, ``mlp``
    and ``norm`` describe both stacks; ``residual`` is ``"pre"`` or ``"post"``;
    ``absolute_positions`` is ``"learned"``, ``"sinusoidal"`` or ``"none"`` (with a relative bias);
    ``embedding_norm`` normalises embeddings plus positions (BART's ``layernorm_embedding``);
    ``final_norm`` ends each stack with a norm (T5); ``lm_head_bias`` adds a fixed logits bias, a
    buffer that is loaded and saved but not trained (BART's ``final_logits_bias``). Decoder-only
    options (parallel residuals, soft-caps, sliding windows) must keep their defaults.

    Attributes:
        n_decoder_layers: Decoder layers; None means as many as the encoder.
        relative_buckets: T5's relative position buckets per stack (0: no relative bias).
        relative_max_distance: Distance at which T5's buckets stop growing.
        position_offset: Rows skipped at the start of a learned position table (BART: 2).
        output_scale: Multiplier on the decoder output before the head (T5 v1.0's tied head:
            ``C ** -0.5``), or None.
        decoder_start_token_id: First decoder token (T5: pad 0; BART: EOS 2).
        pad_token_id: Padding id (HF fills finished generations with it), or None.
        eos_token_id: End-of-sequence id, or None.
    """

    n_decoder_layers: int | None = None
    relative_buckets: int = 0
    relative_max_distance: int = 128
    position_offset: int = 0
    output_scale: float | None = None
    decoder_start_token_id: int = 0
    pad_token_id: int | None = None
    eos_token_id: int | None = None

    is_encoder_decoder = True  # class constant: tells generation APIs apart

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n_decoder_layers is None:
            object.__setattr__(self, "n_decoder_layers", self.n_layers)
        if not isinstance(self.n_decoder_layers, int) or self.n_decoder_layers <= 0:
            raise ConfigError(f"n_decoder_layers={self.n_decoder_layers!r}; must be a positive integer")
        if self.residual not in ("pre", "post"):
            raise ConfigError(f"residual={self.residual!r}; an encoder-decoder allows 'pre' or 'post'")
        if self.parallel_shared_norm or self.final_softcap is not None or self.sliding_window is not None:
            raise ConfigError(
                "parallel_shared_norm, final_softcap and sliding_window are decoder-only options; "
                "an encoder-decoder keeps them unset"
            )
        if self.relative_buckets < 0 or (self.relative_buckets and self.relative_max_distance <= 0):
            raise ConfigError(
                f"relative_buckets={self.relative_buckets}, relative_max_distance={self.relative_max_distance}; "
                "buckets must be >= 0 and the distance > 0"
            )
        if self.position_offset < 0:
            raise ConfigError(f"position_offset={self.position_offset}; must be >= 0")
        if self.decoder_start_token_id is None or not 0 <= self.decoder_start_token_id < self.vocab_size:
            raise ConfigError(
                f"decoder_start_token_id={self.decoder_start_token_id!r}; must be a token id in [0, {self.vocab_size})"
            )


def _residual(x: torch.Tensor, norm: nn.Module, f: Callable[[torch.Tensor], torch.Tensor], pre: bool) -> torch.Tensor:
    """One sub-layer: ``x + f(norm(x))`` (pre-LN) or ``norm(x + f(x))`` (post-LN)."""
    return x + f(norm(x)) if pre else norm(x + f(x))


class EncoderLayer(nn.Module):
    """Bidirectional self-attention then MLP."""

    def __init__(self, cfg: Seq2SeqConfig) -> None:
        super().__init__()
        c = cfg.hidden_size
        self.pre = cfg.residual == "pre"
        self.self_attn = Attention(c, cfg.attention)
        self.self_attn_norm = make_norm(cfg.norm, c)
        self.mlp = make_mlp(cfg.mlp, c)
        self.mlp_norm = make_norm(cfg.norm, c)

    def forward(self, x: torch.Tensor, mask: AttentionMask, bias: torch.Tensor | None = None) -> torch.Tensor:
        """(B, S, C) -> (B, S, C)."""
        x = _residual(x, self.self_attn_norm, lambda h: self.self_attn(h, mask, bias=bias), self.pre)
        return _residual(x, self.mlp_norm, self.mlp, self.pre)


class DecoderLayer(nn.Module):
    """Causal self-attention, cross-attention over the encoder output, then MLP."""

    def __init__(self, cfg: Seq2SeqConfig) -> None:
        super().__init__()
        c = cfg.hidden_size
        self.pre = cfg.residual == "pre"
        self.self_attn = Attention(c, cfg.attention)
        self.self_attn_norm = make_norm(cfg.norm, c)
        self.cross_attn = Attention(c, cfg.attention)
        self.cross_attn_norm = make_norm(cfg.norm, c)
        self.mlp = make_mlp(cfg.mlp, c)
        self.mlp_norm = make_norm(cfg.norm, c)

    def forward(
        self,
        x: torch.Tensor,
        self_mask: AttentionMask,
        cross_mask: AttentionMask,
        memory: torch.Tensor | CrossCache,
        bias: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """(B, T, C) -> (B, T, C); ``memory`` is the encoder output (B, S, C) or its ``CrossCache``."""
        x = _residual(x, self.self_attn_norm, lambda h: self.self_attn(h, self_mask, cache=cache, bias=bias), self.pre)
        x = _residual(x, self.cross_attn_norm, lambda h: self.cross_attn(h, cross_mask, memory=memory), self.pre)
        return _residual(x, self.mlp_norm, self.mlp, self.pre)


class _Stack(nn.Module):
    """What the encoder and decoder share: absolute positions or a relative bias, the embedding
    norm, a uniform ``ModuleList`` of blocks and the final norm."""

    def __init__(self, cfg: Seq2SeqConfig, layers: list[nn.Module], causal: bool) -> None:
        super().__init__()
        self.cfg = cfg
        c = cfg.hidden_size
        if cfg.absolute_positions == "learned":
            self.embed_positions = nn.Embedding(cfg.max_seq_len + cfg.position_offset, c)
        if cfg.embedding_norm:
            self.embed_norm = make_norm(cfg.norm, c)
        if cfg.relative_buckets:
            self.relative_bias = RelativePositionBias(
                cfg.relative_buckets, cfg.attention.n_heads, cfg.relative_max_distance, bidirectional=not causal
            )
        self.layers = nn.ModuleList(layers)
        if cfg.final_norm:
            self.norm = make_norm(cfg.norm, c)

    def add_positions(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Embeddings (B, T, C) plus absolute positions (T,), then the embedding norm."""
        cfg = self.cfg
        if cfg.absolute_positions == "learned":
            x = x + self.embed_positions(positions + cfg.position_offset)[None]
        elif cfg.absolute_positions == "sinusoidal":
            x = x + sinusoidal_positions(positions, cfg.hidden_size).to(x.dtype)[None]
        if cfg.embedding_norm:
            x = self.embed_norm(x)
        return x

    def bias(self, q_index: torch.Tensor, k_index: torch.Tensor) -> torch.Tensor | None:
        """The relative position bias (1, H, T, S) shared by every layer, or None."""
        return self.relative_bias(q_index, k_index) if self.cfg.relative_buckets else None

    def finish(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x) if self.cfg.final_norm else x


class Encoder(_Stack):
    """The bidirectional stack: embedded source (B, S, C) -> memory (B, S, C)."""

    def __init__(self, cfg: Seq2SeqConfig) -> None:
        super().__init__(cfg, [EncoderLayer(cfg) for _ in range(cfg.n_layers)], causal=False)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Args: x (B, S, C) token embeddings; attention_mask (B, S), 1 for real tokens, 0 for padding."""
        s = x.shape[1]
        index = torch.arange(s, device=x.device)
        key_valid = attention_mask.bool() if attention_mask is not None else None
        mask = AttentionMask(q_index=index, k_index=index, causal=False, key_valid=key_valid)
        x = self.add_positions(x, index)
        bias = self.bias(index, index)
        for layer in self.layers:
            x = layer(x, mask, bias)
        return self.finish(x)


@dataclass
class Seq2SeqCache:
    """The decoder's caches for incremental decoding, one entry per decoder layer.

    Attributes:
        self_attn: Growing self-attention keys/values (``KVCache``).
        cross_attn: Encoder keys/values, computed once from the encoder output (``CrossCache``).
    """

    self_attn: list[KVCache]
    cross_attn: list[CrossCache]

    @property
    def length(self) -> int:
        """Target tokens decoded so far."""
        return self.self_attn[0].length

    def reorder(self, index: torch.Tensor) -> None:
        """Keep rows ``index`` (B,) of the self-attention caches (beam search picks its parents).

        Cross caches are left as they are: beams of one input share the same encoder keys.
        """
        for c in self.self_attn:
            c.k = c.k.index_select(0, index)
            c.v = c.v.index_select(0, index)


class Decoder(_Stack):
    """The causal stack with cross-attention: embedded target (B, T, C) -> hidden states (B, T, C)."""

    def __init__(self, cfg: Seq2SeqConfig) -> None:
        super().__init__(cfg, [DecoderLayer(cfg) for _ in range(cfg.n_decoder_layers)], causal=True)

    def forward(
        self,
        x: torch.Tensor,
        memory: torch.Tensor | None = None,
        encoder_mask: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: Seq2SeqCache | None = None,
    ) -> torch.Tensor:
        """Decode.

        Args:
            x: (B, T, C) target embeddings.
            memory: (B, S, C) encoder output; not needed with a cache (its cross caches hold it).
            encoder_mask: (B, S) 1 for real source tokens (uncached only; a cache carries its own).
            attention_mask: (B, cached + T) 1 for real target tokens, or None.
            cache: Self- and cross-attention caches, self-attention extended in place.
        """
        b, t, _ = x.shape
        past = cache.length if cache is not None else 0
        q_index = torch.arange(past, past + t, device=x.device)
        k_index = cache.self_attn[0].key_index(t) if cache is not None else q_index
        key_valid = attention_mask.bool() if attention_mask is not None else None
        if key_valid is not None and key_valid.shape != (b, past + t):
            raise ValueError(
                f"decoder_attention_mask has shape {tuple(key_valid.shape)}; expected (batch, cached + new) = "
                f"({b}, {past + t})"
            )
        self_mask = AttentionMask(q_index, k_index, causal=True, key_valid=key_valid, keys_are_history=True)
        if cache is not None:
            sources: list[torch.Tensor | CrossCache] = list(cache.cross_attn)
            s, enc_valid = cache.cross_attn[0].length, cache.cross_attn[0].key_valid
        else:
            if memory is None:
                raise ValueError("the decoder needs the encoder output (memory) or a Seq2SeqCache holding it")
            sources = [memory] * len(self.layers)
            s, enc_valid = memory.shape[1], (encoder_mask.bool() if encoder_mask is not None else None)
        cross_mask = AttentionMask(q_index, torch.arange(s, device=x.device), causal=False, key_valid=enc_valid)
        x = self.add_positions(x, q_index)
        bias = self.bias(q_index, k_index)
        for i, layer in enumerate(self.layers):
            self_cache = cache.self_attn[i] if cache is not None else None
            x = layer(x, self_mask, cross_mask, sources[i], bias, self_cache)
        return self.finish(x)


class Seq2SeqBackbone(nn.Module):
    """The shared token embedding, the encoder and the decoder; returns decoder hidden states."""

    def __init__(self, cfg: Seq2SeqConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)

    @property
    def layers(self) -> list[nn.Module]:
        """Every block, encoder then decoder: what per-block transforms (FSDP, activation
        checkpointing) walk."""
        return [*self.encoder.layers, *self.decoder.layers]

    def embed(self, ids: torch.Tensor, what: str) -> torch.Tensor:
        """Token embeddings (B, T, C) of ``ids`` (B, T), scaled by ``embedding_scale``; ``what`` names
        the argument in errors."""
        cfg = self.cfg
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
            shape = tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
            raise ValueError(f"{what} must be a (batch, tokens) tensor; got {shape}")
        x = self.embed_tokens(ids)
        if cfg.embedding_scale is not None:
            x = x * torch.tensor(cfg.embedding_scale, dtype=x.dtype)
        return x


def _check_length(n: int, cfg: Seq2SeqConfig, what: str) -> None:
    if n > cfg.max_seq_len:
        raise ValueError(
            f"{what} has {n} tokens, more than the model's max_seq_len={cfg.max_seq_len} "
            f"({cfg.family}); truncate it or split it"
        )


class Seq2SeqLM(nn.Module):
    """An encoder-decoder with a language-model head:
    ``model(input_ids, decoder_input_ids=...) -> decoder logits (B, T, V)``."""

    def __init__(self, cfg: Seq2SeqConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = Seq2SeqBackbone(cfg)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.lm_head_bias:  # BART's final_logits_bias: a fixed buffer, saved and loaded, never trained
            del self.lm_head.bias
            self.lm_head.register_buffer("bias", torch.zeros(cfg.vocab_size))
        if cfg.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def tie_weights(self) -> None:
        """Re-point the head at the embedding matrix (after ``load_state_dict(assign=True)``)."""
        if self.cfg.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Encoder output (B, S, C) for source ``input_ids`` (B, S); ``attention_mask`` (B, S) marks
        real tokens with 1 and padding with 0."""
        x = self.model.embed(input_ids, "input_ids")
        _check_length(x.shape[1], self.cfg, "input_ids")
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}; input_ids has {tuple(input_ids.shape)}"
            )
        return self.model.encoder(x, attention_mask)

    def new_decoder_cache(
        self,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        max_len: int | None = None,
        dtype: torch.dtype | None = None,
    ) -> Seq2SeqCache:
        """Empty self-attention caches and filled cross-attention caches for decoding.

        Args:
            encoder_hidden_states: (B, S, C) from ``encode``.
            attention_mask: (B, S) source padding mask given to ``encode``, or None.
            max_len: Most target tokens (default ``max_seq_len``).
            dtype: Cache dtype (default the weights').
        """
        a, p = self.cfg.attention, self.lm_head.weight
        b = encoder_hidden_states.shape[0]
        max_len = max_len or self.cfg.max_seq_len
        key_valid = attention_mask.bool() if attention_mask is not None else None
        layers = self.model.decoder.layers
        return Seq2SeqCache(
            self_attn=[KVCache(b, a.n_kv_heads, max_len, a.head_dim, dtype or p.dtype, p.device) for _ in layers],
            cross_attn=[CrossCache.from_memory(layer.cross_attn, encoder_hidden_states, key_valid) for layer in layers],
        )

    def new_cache(self, *args: object, **kwargs: object) -> None:
        """Refuse the decoder-only cache API: an encoder-decoder decodes with ``new_decoder_cache``.

        Raises:
            ConfigError: always, pointing to the encoder-decoder generation functions.
        """
        raise ConfigError(
            f"this is an encoder-decoder model ({self.cfg.family}); the decoder-only generation API "
            "(evolm.infer.generate, new_cache) does not apply. Use evolm.infer.seq2seq_generate.generate_seq2seq"
            "(model, input_ids, max_new_tokens, num_beams=...), or model.new_decoder_cache(...) for a cache"
        )

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        *,
        decoder_input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        cache: Seq2SeqCache | None = None,
    ) -> torch.Tensor:
        """Decoder logits (B, T, V).

        Args:
            input_ids: (B, S) source tokens; not needed when ``encoder_hidden_states`` or a
                ``cache`` is given.
            decoder_input_ids: (B, T) target tokens, starting with ``cfg.decoder_start_token_id``
                (the targets shifted right by one).
            attention_mask: (B, S) source padding mask (1 real, 0 padding).
            decoder_attention_mask: (B, cached + T) target padding mask, or None.
            encoder_hidden_states: (B, S, C) a previous ``encode`` output, to skip the encoder.
            cache: From ``new_decoder_cache``; extended in place.

        Raises:
            ValueError: missing ``decoder_input_ids``, sequences longer than ``max_seq_len``, bad shapes.
        """
        cfg = self.cfg
        if decoder_input_ids is None:
            raise ConfigError(
                f"decoder_input_ids is missing: {cfg.family} is an encoder-decoder model, called as "
                "model(input_ids, decoder_input_ids=...) with the targets shifted right behind "
                f"decoder_start_token_id={cfg.decoder_start_token_id}; to generate text use "
                "evolm.infer.seq2seq_generate.generate_seq2seq"
            )
        if cache is None and encoder_hidden_states is None:
            if input_ids is None:
                raise ValueError("pass input_ids (the source), encoder_hidden_states or a decoder cache")
            encoder_hidden_states = self.encode(input_ids, attention_mask)
        past = cache.length if cache is not None else 0
        y = self.model.embed(decoder_input_ids, "decoder_input_ids")
        _check_length(past + y.shape[1], cfg, "the decoder sequence (cached + decoder_input_ids)")
        h = self.model.decoder(y, encoder_hidden_states, attention_mask, decoder_attention_mask, cache)
        if cfg.output_scale is not None:
            h = h * cfg.output_scale
        return self.lm_head(h)
