"""Typed configuration of a decoder-only language model.

One frozen dataclass per concept: ``NormConfig``, ``MLPConfig``, ``RopeConfig``/``RopeScaling``
and ``AttentionConfig`` live beside their modules in ``evolm.nn``; ``DecoderConfig`` composes
them with the residual topology and the embedding/head options.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from evolm.errors import ConfigError
from evolm.nn.mla import MLAConfig
from evolm.nn.mlp import MLPConfig
from evolm.nn.moe import MoEConfig
from evolm.nn.norm import NormConfig
from evolm.nn.self_attention import AttentionConfig

RESIDUALS = ("pre", "post", "parallel", "sandwich", "output")


@dataclass(frozen=True)
class DecoderConfig:
    """A decoder-only transformer.

    Residual topologies (``residual``), for a sub-layer ``f`` (attention, then MLP):

    * ``pre``: ``x + f(norm(x))`` (GPT-2, Llama; Xiong et al., 2020).
    * ``post``: ``norm(x + f(x))`` (the 2017 Transformer, BERT).
    * ``parallel``: ``x + attn(n1(x)) + mlp(n2(x))`` (GPT-J, GPT-NeoX; one shared norm when
      ``parallel_shared_norm``, as in Falcon and Phi-2).
    * ``sandwich``: ``x + n_post(f(n_pre(x)))`` (Gemma 2).
    * ``output``: ``x + norm(f(x))`` (OLMo 2).

    Attributes:
        family: Name of the family module that maps this config to and from checkpoints.
        vocab_size: Rows of the embedding and of the LM head.
        hidden_size: Model width C.
        n_layers: Number of blocks.
        max_seq_len: Longest sequence the model supports (context length).
        attention: Self-attention configuration: ``AttentionConfig`` (multi-head, grouped-query or
            multi-query attention) or ``MLAConfig`` (DeepSeek's multi-head latent attention).
        mlp: Feed-forward configuration (of the dense layers, when some layers are MoE).
        moe: Mixture-of-experts feed-forward of the MoE layers, or None (all dense).
        moe_layers: Indices of the MoE layers, increasing; empty with ``moe`` set means every layer.
        norm: Normalisation used everywhere.
        residual: Residual topology, see above.
        parallel_shared_norm: ``parallel`` only: one norm feeds both branches.
        absolute_positions: ``"learned"`` (GPT-2), ``"sinusoidal"`` (Vaswani 2017) or ``"none"``.
        embedding_scale: Multiply token embeddings by this (Gemma: sqrt(C)), or None.
        embedding_norm: Normalise embeddings before the first block (BLOOM).
        final_norm: Normalise after the last block (all pre-LN models).
        tie_embeddings: LM head shares the token embedding matrix.
        lm_head_bias: LM head has a bias.
        final_softcap: Gemma 2's tanh soft-cap on output logits, or None.
        sliding_window: Window width of sliding-window layers (Mistral), or None.
        layer_types: Per layer, ``"full"`` or ``"sliding"``; empty means every layer is sliding if
            ``sliding_window`` is set, else full.
        extra: Checkpoint fields kept verbatim for a faithful save (name/value pairs).
    """

    family: str
    vocab_size: int
    hidden_size: int
    n_layers: int
    max_seq_len: int
    attention: AttentionConfig | MLAConfig
    mlp: MLPConfig
    norm: NormConfig = field(default_factory=NormConfig)
    residual: Literal["pre", "post", "parallel", "sandwich", "output"] = "pre"
    parallel_shared_norm: bool = False
    absolute_positions: Literal["learned", "sinusoidal", "none"] = "none"
    embedding_scale: float | None = None
    embedding_norm: bool = False
    final_norm: bool = True
    tie_embeddings: bool = False
    lm_head_bias: bool = False
    final_softcap: float | None = None
    sliding_window: int | None = None
    layer_types: tuple[str, ...] = ()
    moe: MoEConfig | None = None
    moe_layers: tuple[int, ...] = ()
    extra: tuple[tuple[str, object], ...] = ()

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "n_layers", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name}={value!r}; must be a positive integer")
        if self.residual not in RESIDUALS:
            raise ConfigError(f"residual={self.residual!r}; allowed: {list(RESIDUALS)}")
        if self.absolute_positions not in ("learned", "sinusoidal", "none"):
            raise ConfigError(
                f"absolute_positions={self.absolute_positions!r}; allowed: 'learned', 'sinusoidal', 'none'"
            )
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ConfigError(f"sliding_window={self.sliding_window}; must be > 0 or None")
        if self.layer_types:
            if len(self.layer_types) != self.n_layers:
                raise ConfigError(f"layer_types has {len(self.layer_types)} entries; expected n_layers={self.n_layers}")
            bad = sorted(set(self.layer_types) - {"full", "sliding"})
            if bad:
                raise ConfigError(f"layer_types contains {bad}; allowed: 'full', 'sliding'")
            if "sliding" in self.layer_types and self.sliding_window is None:
                raise ConfigError("layer_types has 'sliding' layers but sliding_window is None")
        if self.moe_layers:
            if self.moe is None:
                raise ConfigError(f"moe_layers={self.moe_layers} but moe is None; set moe or leave moe_layers empty")
            ok = all(isinstance(i, int) and 0 <= i < self.n_layers for i in self.moe_layers)
            if not ok or list(self.moe_layers) != sorted(set(self.moe_layers)):
                raise ConfigError(
                    f"moe_layers={self.moe_layers}; must be increasing layer indices in [0, n_layers={self.n_layers})"
                )

    def is_moe(self, layer: int) -> bool:
        """Whether ``layer``'s feed-forward is the mixture of experts ``moe`` (else the dense ``mlp``)."""
        return self.moe is not None and (not self.moe_layers or layer in self.moe_layers)

    def window(self, layer: int) -> int | None:
        """Sliding-window width of ``layer``, or None for full attention."""
        if self.sliding_window is None:
            return None
        if self.layer_types and self.layer_types[layer] != "sliding":
            return None
        return self.sliding_window

    def replace(self, **changes: object) -> DecoderConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)
