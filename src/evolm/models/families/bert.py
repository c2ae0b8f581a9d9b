"""BERT and the encoder families that share its shape, with their task heads.

* ``bert``: BERT (Devlin et al., 2019): post-LN blocks, learned absolute positions plus
  token-type (segment) embeddings, LayerNorm over the embedding sum.
* ``roberta``: RoBERTa (Liu et al., 2019): BERT's network with fairseq's position numbering
  (positions count from ``pad_token_id + 1`` and skip padding) and a one-row token-type table.
* ``distilbert``: DistilBERT (Sanh et al., 2019): BERT with half the layers, no token types and
  no pooler.
* ``electra``: ELECTRA (Clark et al., 2020): BERT whose embeddings may be narrower than the
  blocks (``embedding_size``, projected up), trained as a discriminator of a small generator's
  replacements.

The architecture in ``config.json`` picks the head (``BertForMaskedLM`` -> masked LM, ...; see
``_HEADS``); ``BertForPreTraining`` checkpoints load as masked LMs (the next-sentence head is
dropped and the model is saved back as ``BertForMaskedLM``).

Checkpoint layout (``{base}`` is ``bert.``, ``roberta.``, ``distilbert.`` or ``electra.`` under a
head, nothing in a bare ``*Model``)::

    {base}embeddings.word_embeddings / position_embeddings / token_type_embeddings / LayerNorm
                                                -> model.embed_tokens / embed_positions / embed_token_types / embed_norm
    {base}embeddings_project                    -> model.embed_proj (ELECTRA)
    {base}encoder.layer.N.attention.self.query  -> model.layers.N.self_attn.q_proj (key, value alike)
    {base}encoder.layer.N.attention.output.dense / .LayerNorm
                                                -> self_attn.o_proj / post_attention_layernorm
    {base}encoder.layer.N.intermediate.dense / output.dense / output.LayerNorm
                                                -> mlp.up_proj / mlp.down_proj / post_feedforward_layernorm
    DistilBERT: {base}transformer.layer.N.attention.{q,k,v,out}_lin, sa_layer_norm, ffn.lin1,
                ffn.lin2, output_layer_norm

Heads map per family (``_HEAD_RENAMES``). An ELECTRA pretraining checkpoint (discriminator plus
the generator evolm trains with it) stores the generator under ``generator.`` with the names of
an ``ElectraForMaskedLM`` and its config under ``evolm_generator``; transformers loads the
discriminator from it and ignores the rest.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from evolm.errors import ConfigError, UnsupportedModelError
from evolm.models.encoder import EncoderConfig, build_encoder
from evolm.models.family import Family, StateDict
from evolm.models.hf_config import activation_from_hf, activation_to_hf, need
from evolm.models.renames import Renames
from evolm.nn.mlp import MLPConfig
from evolm.nn.norm import NormConfig
from evolm.nn.self_attention import AttentionConfig

_PREFIX = {"bert": "Bert", "roberta": "Roberta", "distilbert": "DistilBert", "electra": "Electra"}
_BASE = {"bert": "bert.", "roberta": "roberta.", "distilbert": "distilbert.", "electra": "electra."}
_SUFFIX_HEADS = {
    "Model": "encoder",
    "ForMaskedLM": "masked_lm",
    "ForSequenceClassification": "sequence_classification",
    "ForTokenClassification": "token_classification",
}
# HF architecture -> head, per family.
_HEADS: dict[str, dict[str, str]] = {
    mt: {prefix + suffix: head for suffix, head in _SUFFIX_HEADS.items()} for mt, prefix in _PREFIX.items()
}
_HEADS["bert"]["BertForPreTraining"] = "masked_lm"  # the next-sentence head is dropped
_HEADS["electra"]["ElectraForPreTraining"] = "replaced_token_detection"
_DEFAULT_HEAD = {
    "bert": "masked_lm",
    "roberta": "masked_lm",
    "distilbert": "masked_lm",
    "electra": "replaced_token_detection",
}
_PAD = {"bert": 0, "roberta": 1, "distilbert": 0, "electra": 0}
# Activation between the sequence classifier's layers: BERT's pooler and RoBERTa's head use tanh,
# ELECTRA's GELU, DistilBERT's pre-classifier ReLU.
_CLASSIFIER_ACT = {"bert": "tanh", "roberta": "tanh", "distilbert": "relu", "electra": "gelu"}

# Fields written back verbatim (dropouts: evolm runs no dropout, but a save keeps what was read).
_PASSTHROUGH = (
    "bos_token_id",
    "eos_token_id",
    "initializer_range",
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "classifier_dropout",
    "problem_type",
    "dropout",
    "attention_dropout",
    "seq_classif_dropout",
    "qa_dropout",
    "sinusoidal_pos_embds",
    "summary_type",
    "summary_use_proj",
    "summary_activation",
    "summary_last_dropout",
    "distillation_teacher",
)


def _head(hf: dict) -> str:
    mt = hf["model_type"]
    archs = hf.get("architectures") or []
    if not archs:
        return _DEFAULT_HEAD[mt]
    head = _HEADS[mt].get(archs[0])
    if head is None:
        raise UnsupportedModelError(
            f"architecture {archs[0]!r} is not supported for {mt}; supported: {', '.join(sorted(_HEADS[mt]))}"
        )
    return head


def _labels(hf: dict) -> tuple[str, ...]:
    id2label = hf.get("id2label")
    if id2label:
        return tuple(str(id2label[k]) for k in sorted(id2label, key=int))
    return tuple(f"LABEL_{i}" for i in range(int(hf.get("num_labels", 2))))


def _config_from_hf(hf: dict) -> EncoderConfig:
    mt = hf["model_type"]
    if hf.get("is_decoder") or hf.get("add_cross_attention"):
        raise ConfigError(f"{mt} with is_decoder/add_cross_attention (a causal or cross-attending BERT) is unsupported")
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise ConfigError(
            f"position_embedding_type={hf['position_embedding_type']!r} is not supported for {mt}; only 'absolute'"
        )
    pad = hf.get("pad_token_id", _PAD[mt])
    if mt == "distilbert":
        c, n_heads = int(need(hf, "dim")), int(need(hf, "n_heads"))
        act = activation_from_hf(hf.get("activation", "gelu"))
        sizes = dict(
            hidden_size=c,
            n_layers=int(need(hf, "n_layers")),
            mlp=MLPConfig(hidden_size=int(need(hf, "hidden_dim")), gated=False, activation=act, bias=True),
            norm=NormConfig(kind="layernorm", eps=1e-12),
            type_vocab_size=0,
            lm_activation=act,
        )
    else:
        c, n_heads = int(need(hf, "hidden_size")), int(need(hf, "num_attention_heads"))
        act = activation_from_hf(hf.get("hidden_act", "gelu"))
        emb = hf.get("embedding_size")
        sizes = dict(
            hidden_size=c,
            n_layers=int(need(hf, "num_hidden_layers")),
            mlp=MLPConfig(hidden_size=int(need(hf, "intermediate_size")), gated=False, activation=act, bias=True),
            norm=NormConfig(kind="layernorm", eps=float(hf.get("layer_norm_eps", 1e-12))),
            type_vocab_size=int(hf.get("type_vocab_size", 2)),
            embedding_size=int(emb) if emb is not None and int(emb) != c else None,
            lm_activation=act if mt == "bert" else "gelu",
        )
    if c % n_heads:
        raise ConfigError(f"{mt}: hidden size {c} is not a multiple of the number of heads {n_heads}")
    style = "roberta" if mt == "roberta" else "absolute"
    offset = pad + 1 if style == "roberta" else 0
    max_seq_len = int(need(hf, "max_position_embeddings")) - offset
    if max_seq_len <= 0:
        raise ConfigError(f"{mt}: max_position_embeddings must exceed pad_token_id + 1 = {offset}")
    gen = hf.get("evolm_generator")
    generator = None
    if gen is not None:
        generator = _config_from_hf({**gen, "model_type": mt, "architectures": [f"{_PREFIX[mt]}ForMaskedLM"]})
    return EncoderConfig(
        family=mt,
        vocab_size=int(need(hf, "vocab_size")),
        max_seq_len=max_seq_len,
        attention=AttentionConfig(
            n_heads=n_heads, n_kv_heads=n_heads, head_dim=c // n_heads, qkv_bias=True, out_bias=True, position="none"
        ),
        head=_head(hf),
        position_style=style,
        pad_token_id=None if pad is None else int(pad),
        mask_token_id=hf.get("mask_token_id"),
        pooler=mt in ("bert", "roberta"),
        classifier_activation=_CLASSIFIER_ACT[mt],
        rtd_activation=act,
        labels=_labels(hf),
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        generator=generator,
        extra=tuple((k, hf[k]) for k in _PASSTHROUGH if k in hf),
        **sizes,
    )


def _architecture(cfg: EncoderConfig) -> str:
    if cfg.head == "replaced_token_detection":
        return "ElectraForPreTraining"
    suffix = {v: k for k, v in _SUFFIX_HEADS.items()}[cfg.head]
    return _PREFIX[cfg.family] + suffix


def _config_to_hf(cfg: EncoderConfig) -> dict[str, Any]:
    mt, a = cfg.family, cfg.attention
    out: dict[str, Any] = {"model_type": mt, "architectures": [_architecture(cfg)], "vocab_size": cfg.vocab_size}
    if mt == "distilbert":
        if cfg.norm.eps != 1e-12 or cfg.type_vocab_size:
            raise ConfigError("a distilbert config has LayerNorm eps 1e-12 and no token types")
        out.update(
            dim=cfg.hidden_size,
            n_layers=cfg.n_layers,
            n_heads=a.n_heads,
            hidden_dim=cfg.mlp.hidden_size,
            activation=activation_to_hf(cfg.mlp.activation, gelu_tanh="gelu_new"),
            sinusoidal_pos_embds=False,
        )
    else:
        out.update(
            hidden_size=cfg.hidden_size,
            num_hidden_layers=cfg.n_layers,
            num_attention_heads=a.n_heads,
            intermediate_size=cfg.mlp.hidden_size,
            hidden_act=activation_to_hf(cfg.mlp.activation, gelu_tanh="gelu_new"),
            type_vocab_size=cfg.type_vocab_size,
            layer_norm_eps=cfg.norm.eps,
            position_embedding_type="absolute",
            is_decoder=False,
        )
        if mt == "electra":
            out["embedding_size"] = cfg.embed_dim
    out.update(
        max_position_embeddings=cfg.max_seq_len + cfg.position_offset,
        pad_token_id=cfg.pad_token_id,
        tie_word_embeddings=cfg.tie_embeddings,
        id2label={str(i): label for i, label in enumerate(cfg.labels)},
        label2id={label: i for i, label in enumerate(cfg.labels)},
    )
    if cfg.mask_token_id is not None:
        out["mask_token_id"] = cfg.mask_token_id
    if cfg.generator is not None:
        gen = _config_to_hf(cfg.generator)
        out["evolm_generator"] = {k: v for k, v in gen.items() if k not in ("model_type", "architectures")}
    return {**out, **dict(cfg.extra)}


_BERT_BACKBONE = Renames(
    ("embeddings.word_embeddings.", "model.embed_tokens."),
    ("embeddings.position_embeddings.", "model.embed_positions."),
    ("embeddings.token_type_embeddings.", "model.embed_token_types."),
    ("embeddings.LayerNorm.", "model.embed_norm."),
    ("embeddings_project.", "model.embed_proj."),
    ("encoder.layer.{i}.attention.self.query.", "model.layers.{i}.self_attn.q_proj."),
    ("encoder.layer.{i}.attention.self.key.", "model.layers.{i}.self_attn.k_proj."),
    ("encoder.layer.{i}.attention.self.value.", "model.layers.{i}.self_attn.v_proj."),
    ("encoder.layer.{i}.attention.output.dense.", "model.layers.{i}.self_attn.o_proj."),
    ("encoder.layer.{i}.attention.output.LayerNorm.", "model.layers.{i}.post_attention_layernorm."),
    ("encoder.layer.{i}.intermediate.dense.", "model.layers.{i}.mlp.up_proj."),
    ("encoder.layer.{i}.output.dense.", "model.layers.{i}.mlp.down_proj."),
    ("encoder.layer.{i}.output.LayerNorm.", "model.layers.{i}.post_feedforward_layernorm."),
)
_DISTILBERT_BACKBONE = Renames(
    ("embeddings.word_embeddings.", "model.embed_tokens."),
    ("embeddings.position_embeddings.", "model.embed_positions."),
    ("embeddings.LayerNorm.", "model.embed_norm."),
    ("transformer.layer.{i}.attention.q_lin.", "model.layers.{i}.self_attn.q_proj."),
    ("transformer.layer.{i}.attention.k_lin.", "model.layers.{i}.self_attn.k_proj."),
    ("transformer.layer.{i}.attention.v_lin.", "model.layers.{i}.self_attn.v_proj."),
    ("transformer.layer.{i}.attention.out_lin.", "model.layers.{i}.self_attn.o_proj."),
    ("transformer.layer.{i}.sa_layer_norm.", "model.layers.{i}.post_attention_layernorm."),
    ("transformer.layer.{i}.ffn.lin1.", "model.layers.{i}.mlp.up_proj."),
    ("transformer.layer.{i}.ffn.lin2.", "model.layers.{i}.mlp.down_proj."),
    ("transformer.layer.{i}.output_layer_norm.", "model.layers.{i}.post_feedforward_layernorm."),
)

_CLASSIFIER = (("classifier.dense.", "classifier.dense."), ("classifier.out_proj.", "classifier.out_proj."))
_TOKEN = (("classifier.", "classifier."),)
_POOLER = (("pooler.dense.", "pooler.dense."),)
# (HF, evolm) head tensor pieces per family and head.
_HEAD_RENAMES: dict[str, dict[str, tuple[tuple[str, str], ...]]] = {
    "bert": {
        "encoder": _POOLER,
        "masked_lm": (
            ("cls.predictions.transform.dense.", "mlm_head.dense."),
            ("cls.predictions.transform.LayerNorm.", "mlm_head.norm."),
            ("cls.predictions.decoder.weight", "mlm_head.decoder.weight"),
            ("cls.predictions.bias", "mlm_head.decoder.bias"),
        ),
        "sequence_classification": (
            ("bert.pooler.dense.", "classifier.dense."),
            ("classifier.", "classifier.out_proj."),
        ),
        "token_classification": _TOKEN,
    },
    "roberta": {
        "encoder": _POOLER,
        "masked_lm": (
            ("lm_head.dense.", "mlm_head.dense."),
            ("lm_head.layer_norm.", "mlm_head.norm."),
            ("lm_head.decoder.weight", "mlm_head.decoder.weight"),
            ("lm_head.bias", "mlm_head.decoder.bias"),
        ),
        "sequence_classification": _CLASSIFIER,
        "token_classification": _TOKEN,
    },
    "distilbert": {
        "encoder": (),
        "masked_lm": (
            ("vocab_transform.", "mlm_head.dense."),
            ("vocab_layer_norm.", "mlm_head.norm."),
            ("vocab_projector.", "mlm_head.decoder."),
        ),
        "sequence_classification": (("pre_classifier.", "classifier.dense."), ("classifier.", "classifier.out_proj.")),
        "token_classification": _TOKEN,
    },
    "electra": {
        "encoder": (),
        "masked_lm": (
            ("generator_predictions.dense.", "mlm_head.dense."),
            ("generator_predictions.LayerNorm.", "mlm_head.norm."),
            ("generator_lm_head.", "mlm_head.decoder."),
        ),
        "sequence_classification": _CLASSIFIER,
        "token_classification": _TOKEN,
        "replaced_token_detection": (
            ("discriminator_predictions.dense_prediction.", "rtd_head.out_proj."),
            ("discriminator_predictions.dense.", "rtd_head.dense."),
        ),
    },
}
_GENERATOR = "generator."


def _tables(cfg: EncoderConfig) -> tuple[Renames, Renames, tuple[str, ...], tuple[str, ...]]:
    """Backbone and head rename tables, and the head's HF and evolm name pieces."""
    pairs = _HEAD_RENAMES[cfg.family][cfg.head]
    backbone = _DISTILBERT_BACKBONE if cfg.family == "distilbert" else _BERT_BACKBONE
    return backbone, Renames(*pairs), tuple(hf for hf, _ in pairs), tuple(ev for _, ev in pairs)


def _state_from_hf(state: Mapping[str, torch.Tensor], cfg: EncoderConfig) -> StateDict:
    backbone, head, hf_head, _ = _tables(cfg)
    base = _BASE[cfg.family]
    out: StateDict = {}
    generator: StateDict = {}
    for name, t in state.items():
        if name.startswith(_GENERATOR) and cfg.generator is not None:
            generator[name.removeprefix(_GENERATOR)] = t
            continue
        if name.endswith((".gamma", ".beta")):  # TF-converted LayerNorms
            name = name.rpartition(".")[0] + (".weight" if name.endswith(".gamma") else ".bias")
        if name.startswith(hf_head):
            out[head.to_evolm(name)] = t
        elif name.removeprefix(base).startswith("pooler.") and cfg.head != "encoder":
            continue  # BERT's pooler under a head that does not read it (BertForPreTraining's NSP input)
        else:
            out[backbone.to_evolm(name.removeprefix(base))] = t
    if cfg.tie_embeddings and cfg.head == "masked_lm" and "model.embed_tokens.weight" in out:
        out["mlm_head.decoder.weight"] = out["model.embed_tokens.weight"]  # stored once, or a tied copy
    if cfg.generator is not None:
        shared = ["model.embed_tokens.weight", "model.embed_positions.weight"]
        if cfg.type_vocab_size:
            shared.append("model.embed_token_types.weight")
        for name in shared:  # the generator's copies were not written; tie_weights shares them
            if name in out:
                generator.setdefault(base + backbone.to_hf(name), out[name])
        out.update({_GENERATOR + k: v for k, v in _state_from_hf(generator, cfg.generator).items()})
    return out


def _state_to_hf(state: Mapping[str, torch.Tensor], cfg: EncoderConfig) -> StateDict:
    backbone, head, _, ev_head = _tables(cfg)
    base = _BASE[cfg.family] if cfg.head != "encoder" else ""
    out: StateDict = {}
    generator: StateDict = {}
    for name, t in state.items():
        if name.startswith(_GENERATOR):
            generator[name.removeprefix(_GENERATOR)] = t
        elif name == "mlm_head.decoder.weight" and cfg.tie_embeddings:
            continue  # the token embedding matrix, written once
        elif name.startswith(ev_head):
            out[head.to_hf(name)] = t
        else:
            out[base + backbone.to_hf(name)] = t
    if cfg.generator is not None:
        shared = ("model.embed_tokens.", "model.embed_positions.", "model.embed_token_types.")
        kept = {k: v for k, v in generator.items() if not k.startswith(shared)}
        out.update({_GENERATOR + k: v for k, v in _state_to_hf(kept, cfg.generator).items()})
    return out


# Checkpoint tensors that carry no weights, or heads evolm drops (BERT's next-sentence prediction),
# or duplicates of a bias stored once more under the tied decoder.
_IGNORED = (
    "embeddings.position_ids",
    "embeddings.token_type_ids",
    "cls.seq_relationship.weight",
    "cls.seq_relationship.bias",
    "cls.predictions.decoder.bias",
    "lm_head.decoder.bias",
)

FAMILIES = {
    mt: Family(
        name=mt,
        model_types=(mt,),
        architecture=_PREFIX[mt] + ("ForPreTraining" if mt == "electra" else "ForMaskedLM"),
        config_from_hf=_config_from_hf,
        config_to_hf=_config_to_hf,
        state_from_hf=_state_from_hf,
        state_to_hf=_state_to_hf,
        ignored_keys=_IGNORED,
        build=build_encoder,
    )
    for mt in _PREFIX
}
