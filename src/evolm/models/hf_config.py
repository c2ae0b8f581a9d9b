"""Helpers shared by the family converters to read and write HF ``config.json`` dicts."""

from __future__ import annotations

from typing import Any

from evolm.errors import ConfigError
from evolm.models.config import DecoderConfig
from evolm.nn.mlp import MLPConfig
from evolm.nn.norm import NormConfig
from evolm.nn.rope import RopeConfig, RopeScaling

# Fields copied verbatim between HF configs and ``DecoderConfig.extra`` so a save keeps them.
PASSTHROUGH = ("bos_token_id", "eos_token_id", "pad_token_id", "initializer_range")

_SCALING_TYPES = {
    "linear": "linear",
    "dynamic": "dynamic",
    "llama3": "llama3",
    "yarn": "yarn",
    "longrope": "longrope",
    "su": "longrope",
}


def need(hf: dict, *names: str) -> Any:
    """The first of ``names`` present in ``hf``; a ConfigError naming them if none is."""
    for n in names:
        if hf.get(n) is not None:
            return hf[n]
    raise ConfigError(f"config.json of model_type {hf.get('model_type')!r} lacks required field {' / '.join(names)}")


def extra_from_hf(hf: dict) -> tuple[tuple[str, object], ...]:
    """The passthrough fields present in ``hf``, as ``DecoderConfig.extra``."""
    return tuple((k, hf[k]) for k in PASSTHROUGH if k in hf)


def rope_params(hf: dict) -> dict:
    """The RoPE parameters of an HF config in one flat dict, from either the transformers-5
    ``rope_parameters`` form or the older ``rope_theta`` + ``rope_scaling`` form."""
    params = dict(hf.get("rope_parameters") or {})
    scaling = hf.get("rope_scaling") or {}
    for k, v in scaling.items():
        params.setdefault(k, v)
    if "rope_theta" in hf:
        params.setdefault("rope_theta", hf["rope_theta"])
    if "partial_rotary_factor" in hf:
        params.setdefault("partial_rotary_factor", hf["partial_rotary_factor"])
    if "original_max_position_embeddings" in hf:
        params.setdefault("original_max_position_embeddings", hf["original_max_position_embeddings"])
    return params


def rope_from_hf(hf: dict, head_dim: int, default_theta: float = 10000.0, partial: float | None = None) -> RopeConfig:
    """Build a ``RopeConfig`` from an HF config dict.

    Args:
        hf: The config dict.
        head_dim: Per-head width; the rotary width is ``head_dim * partial_rotary_factor``.
        default_theta: Base used when the config names none.
        partial: Rotary fraction overriding the config's (families with their own field name).
    """
    p = rope_params(hf)
    theta = float(p.get("rope_theta", default_theta))
    frac = partial if partial is not None else float(p.get("partial_rotary_factor", 1.0))
    rotary_dim = int(head_dim * frac)
    kind = p.get("rope_type", p.get("type", "default"))
    if kind in (None, "default"):
        return RopeConfig(theta=theta, rotary_dim=rotary_dim)
    if kind not in _SCALING_TYPES:
        raise ConfigError(
            f"rope_scaling type {kind!r} is not supported; supported: default, {', '.join(sorted(_SCALING_TYPES))}"
        )
    kind = _SCALING_TYPES[kind]
    orig = p.get("original_max_position_embeddings") or hf.get("max_position_embeddings")
    if kind == "dynamic":  # HF's dynamic NTK grows the base past max_position_embeddings itself
        orig = hf.get("max_position_embeddings")
    factor = p.get("factor")
    if factor is None and kind in ("yarn", "longrope") and orig:
        factor = hf.get("max_position_embeddings", orig) / orig
    scaling = RopeScaling(
        kind=kind,
        factor=float(factor if factor is not None else 1.0),
        original_max_position=int(orig) if orig else None,
        low_freq_factor=float(p.get("low_freq_factor", 1.0)),
        high_freq_factor=float(p.get("high_freq_factor", 4.0)),
        beta_fast=float(p.get("beta_fast") or 32.0),
        beta_slow=float(p.get("beta_slow") or 1.0),
        mscale=p.get("mscale"),
        mscale_all_dim=p.get("mscale_all_dim"),
        truncate=bool(p.get("truncate", True)),
        attention_factor=p.get("attention_factor"),
        short_factor=tuple(p.get("short_factor") or ()),
        long_factor=tuple(p.get("long_factor") or ()),
    )
    return RopeConfig(theta=theta, rotary_dim=rotary_dim, scaling=scaling)


def rope_to_hf(rope: RopeConfig, head_dim: int) -> dict:
    """HF config fields (``rope_theta``, ``rope_scaling``, ``partial_rotary_factor``) for ``rope``."""
    out: dict[str, Any] = {"rope_theta": rope.theta}
    if rope.rotary_dim != head_dim:
        out["partial_rotary_factor"] = rope.rotary_dim / head_dim
    s = rope.scaling
    if s is None:
        return out
    sc: dict[str, Any] = {"rope_type": s.kind, "factor": s.factor}
    if s.kind == "llama3":
        sc.update(
            low_freq_factor=s.low_freq_factor,
            high_freq_factor=s.high_freq_factor,
            original_max_position_embeddings=s.original_max_position,
        )
    if s.kind == "yarn":
        sc.update(
            original_max_position_embeddings=s.original_max_position,
            beta_fast=s.beta_fast,
            beta_slow=s.beta_slow,
            truncate=s.truncate,
        )
        for k in ("mscale", "mscale_all_dim", "attention_factor"):
            if getattr(s, k) is not None:
                sc[k] = getattr(s, k)
    if s.kind == "longrope":
        sc.update(short_factor=list(s.short_factor), long_factor=list(s.long_factor))
        out["original_max_position_embeddings"] = s.original_max_position
        if s.attention_factor is not None:
            sc["attention_factor"] = s.attention_factor
    out["rope_scaling"] = sc
    return out


def layer_types_from_hf(hf: dict, n_layers: int) -> tuple[str, ...]:
    """Per-layer ``"full"``/``"sliding"`` from HF's ``layer_types`` list, if present."""
    lt = hf.get("layer_types")
    if not lt:
        return ()
    mapping = {"full_attention": "full", "sliding_attention": "sliding"}
    bad = sorted({t for t in lt if t not in mapping})
    if bad:
        raise ConfigError(f"layer_types contains {bad}; supported: {sorted(mapping)}")
    if len(lt) != n_layers:
        raise ConfigError(f"layer_types has {len(lt)} entries; num_hidden_layers is {n_layers}")
    return tuple(mapping[t] for t in lt)


def layer_types_to_hf(types: tuple[str, ...]) -> list[str]:
    """Inverse of ``layer_types_from_hf``."""
    return [{"full": "full_attention", "sliding": "sliding_attention"}[t] for t in types]


_ACT_FROM_HF = {
    "silu": "silu",
    "swish": "silu",
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "relu": "relu",
}


def activation_from_hf(name: str) -> str:
    """Map an HF ``hidden_act`` name to evolm's activation name."""
    if name not in _ACT_FROM_HF:
        raise ConfigError(f"activation {name!r} is not supported; supported: {sorted(_ACT_FROM_HF)}")
    return _ACT_FROM_HF[name]


def max_seq_len_from_hf(hf: dict, rope: RopeConfig | None, *names: str) -> int:
    """Context length: ``max_position_embeddings`` (or ``names``), times the factor for dynamic NTK,
    which is defined to extrapolate past it."""
    n = int(need(hf, *(names or ("max_position_embeddings",))))
    if rope is not None and rope.scaling is not None and rope.scaling.kind == "dynamic":
        return int(n * rope.scaling.factor)
    return n


def max_position_to_hf(max_seq_len: int, rope: RopeConfig | None) -> int:
    """Inverse of ``max_seq_len_from_hf``."""
    if rope is not None and rope.scaling is not None and rope.scaling.kind == "dynamic":
        return int(rope.scaling.original_max_position)
    return max_seq_len


def activation_to_hf(activation: str, gelu_tanh: str = "gelu_pytorch_tanh") -> str:
    """The HF ``hidden_act`` name of evolm's ``activation``.

    Args:
        activation: evolm's name (``silu``, ``gelu``, ``gelu_tanh``, ``relu``).
        gelu_tanh: The family's HF name for the tanh-approximate GELU (``"gelu_new"`` in the GPT-2
            lineage: GPT-2, GPT-J, GPT-NeoX, Phi).
    """
    return {"silu": "silu", "gelu": "gelu", "gelu_tanh": gelu_tanh, "relu": "relu"}[activation]


# Llama-style configs (Llama, Gemma, Phi, Phi-3, StableLM, StarCoder 2; GPT-NeoX but for
# num_key_value_heads) spell their sizes hidden_size, num_hidden_layers, num_attention_heads,
# num_key_value_heads, intermediate_size, max_position_embeddings.


def head_dim_from_hf(hf: dict) -> int:
    """Per-head width D: ``head_dim`` when the config sets it, else ``hidden_size / num_attention_heads``."""
    c, n_heads = int(need(hf, "hidden_size")), int(need(hf, "num_attention_heads"))
    return int(hf.get("head_dim") or c // n_heads)


def heads_from_hf(hf: dict, head_dim: int) -> dict[str, int]:
    """``n_heads``, ``n_kv_heads`` (``num_key_value_heads``, else one per query head) and ``head_dim``,
    as ``AttentionConfig`` keyword arguments."""
    n_heads = int(need(hf, "num_attention_heads"))
    return {"n_heads": n_heads, "n_kv_heads": int(hf.get("num_key_value_heads") or n_heads), "head_dim": head_dim}


def mlp_from_hf(hf: dict, *, gated: bool, default_act: str, bias: bool = False) -> MLPConfig:
    """The feed-forward block: width ``intermediate_size``, activation ``hidden_act``.

    Args:
        hf: The config dict.
        gated: GLU feed-forward (``gate_proj``) or a plain two-layer one.
        default_act: The HF activation the family assumes when ``hidden_act`` is absent.
        bias: Whether the projections carry biases.
    """
    return MLPConfig(
        hidden_size=int(need(hf, "intermediate_size")),
        gated=gated,
        activation=activation_from_hf(hf.get("hidden_act", default_act)),
        bias=bias,
    )


def llama_style_from_hf(hf: dict, rope: RopeConfig | None, *, tie_embeddings: bool) -> dict[str, Any]:
    """The ``DecoderConfig`` fields every Llama-style config states the same way, as keyword arguments.

    Args:
        hf: The config dict.
        rope: The model's RoPE (its dynamic-NTK factor extends the context length).
        tie_embeddings: The family's default for ``tie_word_embeddings``.

    Returns:
        ``vocab_size``, ``hidden_size``, ``n_layers`` (``num_hidden_layers``), ``max_seq_len``
        (``max_position_embeddings``), ``tie_embeddings`` and ``extra`` (the passthrough fields).
    """
    return {
        "vocab_size": int(need(hf, "vocab_size")),
        "hidden_size": int(need(hf, "hidden_size")),
        "n_layers": int(need(hf, "num_hidden_layers")),
        "max_seq_len": max_seq_len_from_hf(hf, rope),
        "tie_embeddings": bool(hf.get("tie_word_embeddings", tie_embeddings)),
        "extra": extra_from_hf(hf),
    }


def llama_style_to_hf(cfg: DecoderConfig, architecture: str, **fields: Any) -> dict[str, Any]:
    """An HF config dict for ``cfg`` with the fields every Llama-style config states the same way.

    Args:
        cfg: The model config.
        architecture: HF ``architectures[0]``.
        **fields: The family's own fields; they follow the RoPE fields and so override them.

    Returns:
        ``model_type``, ``architectures``, the sizes and head counts, ``max_position_embeddings``,
        ``tie_word_embeddings`` and the RoPE fields, then ``fields``, then ``cfg.extra`` (kept verbatim
        from the checkpoint this config was read from, so it wins).
    """
    a = cfg.attention
    return {
        "model_type": cfg.family,
        "architectures": [architecture],
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.mlp.hidden_size,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": a.n_heads,
        "num_key_value_heads": a.n_kv_heads,
        "max_position_embeddings": max_position_to_hf(cfg.max_seq_len, a.rope),
        "tie_word_embeddings": cfg.tie_embeddings,
        **rope_to_hf(a.rope, a.head_dim),
        **fields,
        **dict(cfg.extra),
    }


def head_dim_to_hf(cfg: DecoderConfig) -> dict[str, int]:
    """``{"head_dim": D}`` when D is not ``hidden_size / num_attention_heads`` (what it reads as), else ``{}``."""
    a = cfg.attention
    return {"head_dim": a.head_dim} if a.head_dim * a.n_heads != cfg.hidden_size else {}


# GPT-2-style configs (GPT-2, GPT-J, CodeGen) name their sizes n_embd, n_layer, n_head, n_positions,
# n_inner (the Llama-style names are read as fallbacks) and have no fields for the block's shape:
# a two-layer feed-forward with biases and LayerNorm with bias, always.


def gpt2_style_from_hf(hf: dict, *, tie_embeddings: bool) -> dict[str, Any]:
    """The ``DecoderConfig`` fields a GPT-2-style config states, as keyword arguments.

    Args:
        hf: The config dict.
        tie_embeddings: The family's default for ``tie_word_embeddings``.

    Returns:
        ``vocab_size``, ``hidden_size`` (``n_embd``), ``n_layers`` (``n_layer``), ``max_seq_len``
        (``n_positions``), ``mlp`` (width ``n_inner``, default 4C; ``activation_function``),
        ``norm`` (``layer_norm_epsilon``), ``tie_embeddings`` and ``extra``.
    """
    c = int(need(hf, "n_embd", "hidden_size"))
    return {
        "vocab_size": int(need(hf, "vocab_size")),
        "hidden_size": c,
        "n_layers": int(need(hf, "n_layer", "num_hidden_layers")),
        "max_seq_len": int(need(hf, "n_positions", "max_position_embeddings")),
        "mlp": MLPConfig(
            hidden_size=int(hf.get("n_inner") or 4 * c),
            gated=False,
            activation=activation_from_hf(hf.get("activation_function", "gelu_new")),
            bias=True,
        ),
        "norm": NormConfig(kind="layernorm", eps=float(hf.get("layer_norm_epsilon", 1e-5)), bias=True),
        "tie_embeddings": bool(hf.get("tie_word_embeddings", tie_embeddings)),
        "extra": extra_from_hf(hf),
    }


def gpt2_style_to_hf(cfg: DecoderConfig, architecture: str, **fields: Any) -> dict[str, Any]:
    """A GPT-2-style HF config dict for ``cfg``: the fields ``gpt2_style_from_hf`` reads plus
    ``model_type``, ``architectures`` and ``n_head``, then ``fields``, then ``cfg.extra``."""
    return {
        "model_type": cfg.family,
        "architectures": [architecture],
        "vocab_size": cfg.vocab_size,
        "n_embd": cfg.hidden_size,
        "n_layer": cfg.n_layers,
        "n_head": cfg.attention.n_heads,
        "n_positions": cfg.max_seq_len,
        "n_inner": cfg.mlp.hidden_size,
        "activation_function": activation_to_hf(cfg.mlp.activation, gelu_tanh="gelu_new"),
        "layer_norm_epsilon": cfg.norm.eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        **fields,
        **dict(cfg.extra),
    }
