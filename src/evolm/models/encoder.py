"""The encoder-only transformer (Devlin et al., 2019, BERT) and its task heads.

An encoder is the decoder's backbone with bidirectional attention: every token sees every other
(non-padding) token. It is built from the same pieces as the decoders (``evolm.nn``: ``attend``
under an ``AttentionMask`` with ``causal=False``, ``SelfAttention``, ``MLP``, ``LayerNorm``).

A model is ``EncoderBackbone`` (embeddings + a uniform ``ModuleList`` of ``EncoderLayer`` blocks)
returning hidden states, plus one head:

===============================  =========================  ================================
model                            head                       output
===============================  =========================  ================================
``EncoderModel``                 optional BERT pooler       hidden states (B, T, C)
``EncoderForMaskedLM``           ``MaskedLMHead``           token logits (B, T, V)
``EncoderForSequenceClassif.``   ``SequenceClassifier``     class logits (B, L)
``EncoderForTokenClassif.``      ``nn.Linear``              per-token class logits (B, T, L)
``EncoderForReplacedTokenDet.``  ``ReplacedTokenHead``      "was replaced" logits (B, T)
===============================  =========================  ================================

Embeddings (BERT; ELECTRA's narrower ``embedding_size`` E is projected up to C)::

    tokens ─ embed_tokens ─(+)─(+)─ embed_norm ─ [embed_proj: E -> C] ─> blocks
          token types ─────┘   │
          positions ───────────┘

Block (post-LN, as in the 2017 Transformer and BERT; ``residual="pre"`` gives the pre-LN block)::

    x ─┬─ self_attn ─(+)─ post_attention_layernorm ─┬─ mlp ─(+)─ post_feedforward_layernorm ─>
       └─────────────┘                              └───────┘

Tensor names follow the decoders' (Llama-style) layout: ``model.embed_tokens``,
``model.layers.N.self_attn.q_proj``, ``model.layers.N.mlp.up_proj``, ...; each family file maps
them to and from its Hugging Face checkpoint names.

Notation: B batch, T tokens, C hidden width, E embedding width, V vocabulary, L labels.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from evolm.errors import ConfigError
from evolm.nn.attention import AttentionMask
from evolm.nn.linear import Linear
from evolm.nn.mlp import ACTIVATIONS, MLPConfig, make_mlp
from evolm.nn.norm import LayerNorm, NormConfig, make_norm
from evolm.nn.self_attention import AttentionConfig, SelfAttention

HEADS = ("encoder", "masked_lm", "sequence_classification", "token_classification", "replaced_token_detection")
HeadKind = Literal[
    "encoder", "masked_lm", "sequence_classification", "token_classification", "replaced_token_detection"
]
HEAD_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {**ACTIVATIONS, "tanh": torch.tanh}


@dataclass(frozen=True)
class EncoderConfig:
    """A bidirectional (encoder-only) transformer and its head.

    Attributes:
        family: HF ``model_type`` of the family that reads and writes its checkpoints.
        vocab_size: V, rows of the token embedding.
        hidden_size: C, model width.
        n_layers: Number of blocks.
        max_seq_len: Longest sequence the position table covers.
        attention: Self-attention shape (``position="none"``: positions are added to embeddings).
        mlp: Feed-forward block.
        norm: LayerNorm used everywhere (embeddings, blocks, heads).
        head: What sits on the backbone: ``encoder`` (hidden states), ``masked_lm``,
            ``sequence_classification``, ``token_classification`` or ``replaced_token_detection``
            (ELECTRA's discriminator).
        residual: ``post`` (BERT: ``norm(x + f(x))``) or ``pre`` (``x + f(norm(x))``).
        type_vocab_size: Rows of the token-type (segment) embedding; 0 for none (DistilBERT).
        position_style: ``absolute`` (position = slot index) or ``roberta`` (fairseq's numbering:
            non-padding tokens count from ``pad_token_id + 1``, padding sits at ``pad_token_id``;
            the table has ``pad_token_id + 1`` extra rows).
        embedding_size: E, width of the embeddings when it differs from C (ELECTRA; projected by
            ``embed_proj``), else None.
        pad_token_id: Padding id (RoBERTa positions depend on it), or None.
        mask_token_id: The ``<mask>`` id masked-LM objectives put in, or None (then an objective
            needs it given).
        pooler: ``encoder`` head only: keep BERT's pooler (dense + tanh over the first token).
        lm_activation: Activation of the masked-LM head's transform.
        classifier_activation: Activation between the sequence classifier's two layers (``tanh``
            for BERT's pooler and RoBERTa, ``gelu`` for ELECTRA, ``relu`` for DistilBERT).
        rtd_activation: Activation of ELECTRA's discriminator head.
        labels: Class names of classification heads (their number is L).
        tie_embeddings: The masked-LM decoder shares the token embedding matrix.
        generator: ELECTRA pretraining: the generator (a ``masked_lm`` encoder sharing this
            model's token, position and token-type embeddings) trained alongside the discriminator.
        extra: Checkpoint fields kept verbatim for a faithful save (name/value pairs).
    """

    family: str
    vocab_size: int
    hidden_size: int
    n_layers: int
    max_seq_len: int
    attention: AttentionConfig
    mlp: MLPConfig
    norm: NormConfig = field(default_factory=lambda: NormConfig(kind="layernorm", eps=1e-12))
    head: HeadKind = "masked_lm"
    residual: Literal["post", "pre"] = "post"
    type_vocab_size: int = 2
    position_style: Literal["absolute", "roberta"] = "absolute"
    embedding_size: int | None = None
    pad_token_id: int | None = 0
    mask_token_id: int | None = None
    pooler: bool = False
    lm_activation: str = "gelu"
    classifier_activation: str = "tanh"
    rtd_activation: str = "gelu"
    labels: tuple[str, ...] = ("LABEL_0", "LABEL_1")
    tie_embeddings: bool = True
    generator: EncoderConfig | None = None
    extra: tuple[tuple[str, object], ...] = ()

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "n_layers", "max_seq_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name}={value!r}; must be a positive integer")
        if self.head not in HEADS:
            raise ConfigError(f"head={self.head!r}; allowed: {list(HEADS)}")
        if self.residual not in ("post", "pre"):
            raise ConfigError(f"residual={self.residual!r}; allowed: 'post', 'pre'")
        if self.position_style not in ("absolute", "roberta"):
            raise ConfigError(f"position_style={self.position_style!r}; allowed: 'absolute', 'roberta'")
        if self.position_style == "roberta" and self.pad_token_id is None:
            raise ConfigError("position_style='roberta' numbers positions after pad_token_id; set pad_token_id")
        if self.norm.kind != "layernorm":
            raise ConfigError(f"norm.kind={self.norm.kind!r}; encoders use 'layernorm'")
        if self.attention.position != "none":
            raise ConfigError(f"attention.position={self.attention.position!r}; encoders add positions to embeddings")
        if self.type_vocab_size < 0:
            raise ConfigError(f"type_vocab_size={self.type_vocab_size}; must be >= 0")
        if self.embedding_size is not None and self.embedding_size <= 0:
            raise ConfigError(f"embedding_size={self.embedding_size}; must be > 0 or None")
        for name in ("lm_activation", "classifier_activation", "rtd_activation"):
            if getattr(self, name) not in HEAD_ACTIVATIONS:
                raise ConfigError(f"{name}={getattr(self, name)!r}; allowed: {sorted(HEAD_ACTIVATIONS)}")
        if self.mask_token_id is not None and not 0 <= self.mask_token_id < self.vocab_size:
            raise ConfigError(f"mask_token_id={self.mask_token_id} is outside the vocabulary 0..{self.vocab_size - 1}")
        if self.head in ("sequence_classification", "token_classification") and not self.labels:
            raise ConfigError(f"head={self.head!r} needs at least one label; labels is empty")
        g = self.generator
        if g is not None:
            if self.head != "replaced_token_detection" or g.head != "masked_lm":
                raise ConfigError(
                    f"generator is for ELECTRA pretraining: head='replaced_token_detection' with a 'masked_lm' "
                    f"generator; got head={self.head!r}, generator.head={g.head!r}"
                )
            shared = ("vocab_size", "max_seq_len", "type_vocab_size", "position_style", "pad_token_id")
            for name in (*shared, "embed_dim"):
                if getattr(g, name) != getattr(self, name):
                    raise ConfigError(
                        f"generator.{name}={getattr(g, name)!r} differs from the discriminator's "
                        f"{getattr(self, name)!r}; the two share their embeddings (Clark et al., 2020)"
                    )

    @property
    def embed_dim(self) -> int:
        """E: the width of the embeddings (``embedding_size`` or C)."""
        return self.embedding_size or self.hidden_size

    @property
    def position_offset(self) -> int:
        """Rows of the position table before position 0 (RoBERTa: ``pad_token_id + 1``)."""
        return self.pad_token_id + 1 if self.position_style == "roberta" else 0

    @property
    def tokenizer_special_tokens(self) -> tuple[str, ...] | None:
        """Special tokens, in id order, of a byte-level BPE tokenizer trained for this model from
        scratch (the pretraining loop asks): GPT-2's ``<|endoftext|>`` at id 0 (document separator)
        and ``<mask>`` at id 1, when the config reserves id 1 for the mask (the encoder presets
        do); None (the trainer's defaults) otherwise."""
        return ("<|endoftext|>", "<mask>") if self.mask_token_id == 1 else None

    @property
    def num_labels(self) -> int:
        """L: number of classes of a classification head."""
        return len(self.labels)

    def replace(self, **changes: object) -> EncoderConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


class EncoderLayer(nn.Module):
    """One bidirectional block: self-attention then MLP, each with a residual and a LayerNorm.

    Args:
        dim: Model width C.
        attention: Self-attention shape.
        mlp: Feed-forward block.
        norm: Normalisation of the block.
        residual: ``post`` (``norm(x + f(x))``, BERT) or ``pre`` (``x + f(norm(x))``).
    """

    def __init__(
        self, dim: int, attention: AttentionConfig, mlp: MLPConfig, norm: NormConfig, residual: str = "post"
    ) -> None:
        super().__init__()
        self.residual = residual
        self.self_attn = SelfAttention(dim, attention)
        self.mlp = make_mlp(mlp, dim)
        if residual == "pre":
            self.input_layernorm = make_norm(norm, dim)
        self.post_attention_layernorm = make_norm(norm, dim)
        if residual == "post":
            self.post_feedforward_layernorm = make_norm(norm, dim)

    def forward(self, x: torch.Tensor, mask: AttentionMask) -> torch.Tensor:
        """(B, T, C) -> (B, T, C); ``mask`` says which keys each query sees (bidirectional, padding)."""
        if self.residual == "pre":
            x = x + self.self_attn(self.input_layernorm(x), mask)
            return x + self.mlp(self.post_attention_layernorm(x))
        x = self.post_attention_layernorm(x + self.self_attn(x, mask))
        return self.post_feedforward_layernorm(x + self.mlp(x))


def bidirectional_mask(
    t: int,
    attention_mask: torch.Tensor | None = None,
    document_ids: torch.Tensor | None = None,
    device: torch.device | None = None,
) -> AttentionMask:
    """The mask of an encoder over T tokens: every real token sees every real token.

    Args:
        t: Number of tokens T.
        attention_mask: (B, T), 1 for real tokens and 0 for padding, or None (no padding).
        document_ids: (B, T) ids of packed documents that must not see each other, or None.
        device: Device of the index tensors.
    """
    index = torch.arange(t, device=device)
    key_valid = attention_mask.bool() if attention_mask is not None else None
    return AttentionMask(
        q_index=index, k_index=index, causal=False, key_valid=key_valid, q_doc=document_ids, k_doc=document_ids
    )


class EncoderBackbone(nn.Module):
    """Embeddings and blocks; returns the last block's hidden states (B, T, C)."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        c, e = cfg.hidden_size, cfg.embed_dim
        self.embed_tokens = nn.Embedding(cfg.vocab_size, e)
        self.embed_positions = nn.Embedding(cfg.max_seq_len + cfg.position_offset, e)
        if cfg.type_vocab_size:
            self.embed_token_types = nn.Embedding(cfg.type_vocab_size, e)
        self.embed_norm = LayerNorm(e, eps=cfg.norm.eps)
        if e != c:
            self.embed_proj = Linear(e, c)
        self.layers = nn.ModuleList(
            EncoderLayer(c, cfg.attention, cfg.mlp, cfg.norm, cfg.residual) for _ in range(cfg.n_layers)
        )

    def positions(self, input_ids: torch.Tensor | None, b: int, t: int, device: torch.device) -> torch.Tensor:
        """(B, T) rows of the position table: slot index, or RoBERTa's padding-aware numbering."""
        off = self.cfg.position_offset
        if self.cfg.position_style == "roberta" and input_ids is not None:
            real = (input_ids != self.cfg.pad_token_id).long()  # (B, T)
            return real.cumsum(-1) * real + self.cfg.pad_token_id  # padding stays at pad_token_id
        return (torch.arange(t, device=device) + off)[None].expand(b, t)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        *,
        inputs_embeds: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Hidden states of the last block.

        Args:
            input_ids: (B, T) token ids; exactly one of ``input_ids``/``inputs_embeds``.
            inputs_embeds: (B, T, E) token embeddings used instead of ``embed_tokens(input_ids)``.
            attention_mask: (B, T), 1 for real tokens and 0 for padding.
            token_type_ids: (B, T) segment ids (default 0).
            position_ids: (B, T) or (T,) rows of the position table (default: see ``positions``).
            document_ids: (B, T) ids of packed documents; tokens only see their own document.

        Returns:
            (B, T, C).

        Raises:
            ValueError: bad shapes, or more tokens than the position table holds.
        """
        cfg = self.cfg
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids (B, T) or inputs_embeds (B, T, E)")
        if input_ids is not None:
            if input_ids.dim() != 2:
                raise ValueError(f"input_ids must be (batch, tokens); got shape {tuple(input_ids.shape)}")
            x = self.embed_tokens(input_ids)  # (B, T, E)
        else:
            x = inputs_embeds
        b, t, _ = x.shape
        if t > cfg.max_seq_len:
            raise ValueError(
                f"sequence of {t} tokens exceeds the model's maximum of max_seq_len={cfg.max_seq_len} positions "
                "(max_position_embeddings); truncate the input"
            )
        for name, extra in (("attention_mask", attention_mask), ("token_type_ids", token_type_ids)):
            if extra is not None and tuple(extra.shape) != (b, t):
                raise ValueError(f"{name} has shape {tuple(extra.shape)}; expected (batch, tokens) = ({b}, {t})")
        if cfg.type_vocab_size:
            if token_type_ids is None:
                token_type_ids = torch.zeros(b, t, dtype=torch.long, device=x.device)
            x = x + self.embed_token_types(token_type_ids)
        elif token_type_ids is not None:
            raise ValueError(f"the {cfg.family} model has no token-type embeddings; do not pass token_type_ids")
        if position_ids is None:
            position_ids = self.positions(input_ids, b, t, x.device)
        elif position_ids.dim() == 1:
            position_ids = position_ids[None].expand(b, t)
        x = self.embed_norm(x + self.embed_positions(position_ids))
        if hasattr(self, "embed_proj"):
            x = self.embed_proj(x)  # (B, T, C)
        mask = bidirectional_mask(t, attention_mask, document_ids, x.device)
        for layer in self.layers:
            x = layer(x, mask)
        return x


class Pooler(nn.Module):
    """BERT's pooler: ``tanh(dense(h[:, 0]))``, the first ([CLS]) token's summary (B, C)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dense = Linear(dim, dim)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, T, C) -> (B, C)."""
        return torch.tanh(self.dense(hidden[:, 0]))


class MaskedLMHead(nn.Module):
    """Masked-LM head (Devlin et al., 2019): ``decoder(norm(act(dense(h))))``, (B, T, C) -> (B, T, V).

    ``dense`` maps C to the embedding width E, so ``decoder`` can share the token embedding matrix.
    """

    def __init__(self, dim: int, embed_dim: int, vocab_size: int, activation: str, eps: float) -> None:
        super().__init__()
        self.dense = Linear(dim, embed_dim)
        self.act = HEAD_ACTIVATIONS[activation]
        self.norm = LayerNorm(embed_dim, eps=eps)
        self.decoder = Linear(embed_dim, vocab_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.norm(self.act(self.dense(hidden))))


class SequenceClassifier(nn.Module):
    """``out_proj(act(dense(h[:, 0])))``: one label distribution per sequence, (B, T, C) -> (B, L).

    BERT's pooler + classifier (tanh), RoBERTa's classification head (tanh), ELECTRA's (GELU) and
    DistilBERT's pre-classifier + classifier (ReLU) are all this shape.
    """

    def __init__(self, dim: int, num_labels: int, activation: str) -> None:
        super().__init__()
        self.dense = Linear(dim, dim)
        self.act = HEAD_ACTIVATIONS[activation]
        self.out_proj = Linear(dim, num_labels)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.out_proj(self.act(self.dense(hidden[:, 0])))


class ReplacedTokenHead(nn.Module):
    """ELECTRA's discriminator head (Clark et al., 2020): per token, the logit that it was replaced
    by the generator; ``out_proj(act(dense(h)))``, (B, T, C) -> (B, T)."""

    def __init__(self, dim: int, activation: str) -> None:
        super().__init__()
        self.dense = Linear(dim, dim)
        self.act = HEAD_ACTIVATIONS[activation]
        self.out_proj = Linear(dim, 1)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.out_proj(self.act(self.dense(hidden))).squeeze(-1)


class _Encoder(nn.Module):
    """A backbone plus a head; each subclass defines ``head_forward`` (hidden states -> output).

    ``forward`` takes the arguments of ``EncoderBackbone.forward``; with ``return_hidden`` it
    returns ``(output, hidden)`` (distillation's hidden-state loss needs both).
    """

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = EncoderBackbone(cfg)

    def tie_weights(self) -> None:
        """Re-point shared matrices after ``load_state_dict(assign=True)`` (nothing by default)."""

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        *,
        inputs_embeds: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        return_hidden: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        hidden = self.model(
            input_ids,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            document_ids=document_ids,
        )
        out = self.head_forward(hidden)
        return (out, hidden) if return_hidden else out


class EncoderModel(_Encoder):
    """The bare encoder (``BertModel``): ``model(input_ids) -> hidden states (B, T, C)``;
    ``pool(hidden)`` gives BERT's pooled output (B, C) when the checkpoint has a pooler."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__(cfg)
        if cfg.pooler:
            self.pooler = Pooler(cfg.hidden_size)

    def head_forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden

    def pool(self, hidden: torch.Tensor) -> torch.Tensor:
        """BERT's pooled output, (B, T, C) -> (B, C)."""
        if not self.cfg.pooler:
            raise ConfigError(f"this {self.cfg.family} encoder has no pooler (its checkpoint has none)")
        return self.pooler(hidden)


class EncoderForMaskedLM(_Encoder):
    """Masked-language model: ``model(input_ids) -> logits (B, T, V)`` at every position."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__(cfg)
        self.mlm_head = MaskedLMHead(cfg.hidden_size, cfg.embed_dim, cfg.vocab_size, cfg.lm_activation, cfg.norm.eps)
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.cfg.tie_embeddings:
            self.mlm_head.decoder.weight = self.model.embed_tokens.weight

    def head_forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.mlm_head(hidden)


class EncoderForSequenceClassification(_Encoder):
    """Sequence classifier: ``model(input_ids) -> logits (B, L)`` from the first token."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__(cfg)
        self.classifier = SequenceClassifier(cfg.hidden_size, cfg.num_labels, cfg.classifier_activation)

    def head_forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.classifier(hidden)


class EncoderForTokenClassification(_Encoder):
    """Token classifier (tagging, NER): ``model(input_ids) -> logits (B, T, L)``."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__(cfg)
        self.classifier = Linear(cfg.hidden_size, cfg.num_labels)

    def head_forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.classifier(hidden)


class EncoderForReplacedTokenDetection(_Encoder):
    """ELECTRA's discriminator (Clark et al., 2020): ``model(input_ids) -> logits (B, T)`` that each
    token was replaced. With ``cfg.generator`` it also holds the generator (``.generator``, an
    ``EncoderForMaskedLM``) that ELECTRA pretraining trains with it; the generator shares the
    discriminator's token, position and token-type embeddings, as in the paper."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__(cfg)
        self.rtd_head = ReplacedTokenHead(cfg.hidden_size, cfg.rtd_activation)
        if cfg.generator is not None:
            self.generator = EncoderForMaskedLM(cfg.generator)
        self.tie_weights()

    def shared_embeddings(self) -> tuple[str, ...]:
        """Names (under ``model.``) of the embeddings the generator shares with the discriminator."""
        if self.cfg.generator is None:
            return ()
        return ("embed_tokens", "embed_positions") + (("embed_token_types",) if self.cfg.type_vocab_size else ())

    def tie_weights(self) -> None:
        if self.cfg.generator is None:
            return
        for name in self.shared_embeddings():
            getattr(self.generator.model, name).weight = getattr(self.model, name).weight
        self.generator.tie_weights()

    def head_forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.rtd_head(hidden)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        *,
        mlm_labels: torch.Tensor | None = None,
        sample_noise: torch.Tensor | None = None,
        **kwargs: torch.Tensor | bool | None,
    ) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """Replaced-token logits (B, T); arguments as ``EncoderBackbone.forward``.

        ELECTRA pretraining runs generator and discriminator in this one call (so a data-parallel
        wrapper sees one forward): pass the masked ``input_ids``, ``mlm_labels`` (B, T) holding the
        original token where a position was masked and -100 elsewhere, and ``sample_noise`` (B, T)
        uniforms in [0, 1). The generator predicts every masked position; each is replaced by a
        token drawn from the generator's distribution (inverse CDF at the noise; no gradient flows
        through the draw); the discriminator reads the result.

        Returns:
            Without ``mlm_labels``: logits (B, T). With them: ``(disc_logits (B, T), gen_logits
            (B, T, V), corrupted (B, T) int64)``.
        """
        if mlm_labels is None:
            return super().forward(input_ids, **kwargs)
        if self.cfg.generator is None or sample_noise is None or input_ids is None:
            raise ConfigError("ELECTRA pretraining needs the generator (cfg.generator), input_ids and sample_noise")
        gen_logits = self.generator(input_ids, **kwargs)  # (B, T, V)
        masked = mlm_labels != -100  # (B, T)
        with torch.no_grad():
            probs = torch.softmax(gen_logits[masked].float(), dim=-1)  # (M, V)
            cdf = probs.cumsum(-1)
            u = sample_noise[masked].to(cdf)[:, None] * cdf[:, -1:]  # (M, 1), scaled against rounding
            drawn = torch.searchsorted(cdf, u).squeeze(-1).clamp_max(probs.shape[-1] - 1)  # (M,)
        corrupted = input_ids.masked_scatter(masked, drawn)  # (B, T)
        return super().forward(corrupted, **kwargs), gen_logits, corrupted


MODELS: dict[str, type[_Encoder]] = {
    "encoder": EncoderModel,
    "masked_lm": EncoderForMaskedLM,
    "sequence_classification": EncoderForSequenceClassification,
    "token_classification": EncoderForTokenClassification,
    "replaced_token_detection": EncoderForReplacedTokenDetection,
}


def build_encoder(cfg: EncoderConfig) -> nn.Module:
    """The model for ``cfg.head`` (the ``Family.build`` hook of the encoder families)."""
    return MODELS[cfg.head](cfg)
