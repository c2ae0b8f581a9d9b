"""Encoder families (bert, roberta, distilbert, electra) and their heads against transformers.

Each case builds a random transformers model, perturbs every parameter (so default-initialised
norms and zero biases cannot hide a mapping mistake), saves it, loads it with ``evolm.load_model``
and compares fp32 outputs on padded batches; then saves with evolm, reloads with transformers and
compares again.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers as T

import evolm
from evolm.errors import CheckpointError, ConfigError, UnsupportedModelError
from evolm.infer.generate import generate
from evolm.models.encoder import (
    EncoderForMaskedLM,
    EncoderForReplacedTokenDetection,
    EncoderForSequenceClassification,
    EncoderForTokenClassification,
    EncoderModel,
)
from helpers.hf_parity import TOL, relative_error

V = 99
BERT = dict(
    vocab_size=V,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=48,
    max_position_embeddings=24,
    num_labels=3,
)
CONFIGS = {
    "bert": lambda: T.BertConfig(**BERT, hidden_act="gelu_new", layer_norm_eps=1e-7),
    "roberta": lambda: T.RobertaConfig(**{**BERT, "max_position_embeddings": 26}, type_vocab_size=1),
    "distilbert": lambda: T.DistilBertConfig(
        vocab_size=V, dim=32, n_layers=2, n_heads=4, hidden_dim=48, max_position_embeddings=24, num_labels=3
    ),
    "electra": lambda: T.ElectraConfig(**BERT, embedding_size=16),
}
HEADS = {
    "Model": EncoderModel,
    "ForMaskedLM": EncoderForMaskedLM,
    "ForSequenceClassification": EncoderForSequenceClassification,
    "ForTokenClassification": EncoderForTokenClassification,
}
PREFIX = {"bert": "Bert", "roberta": "Roberta", "distilbert": "DistilBert", "electra": "Electra"}
CASES = [(f, h) for f in CONFIGS for h in HEADS] + [("electra", "ForPreTraining"), ("bert", "ForPreTraining")]


def _perturbed(cls, config, seed: int = 0):
    torch.manual_seed(seed)
    model = cls(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _inputs(family: str, pad: int, seed: int = 1) -> dict[str, torch.Tensor]:
    """Two rows, the second right-padded: ids avoid the pad id so RoBERTa's positions are plain."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (2, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    ids[1, 7:] = pad
    inputs = {"input_ids": ids, "attention_mask": mask}
    if family in ("bert", "electra"):
        inputs["token_type_ids"] = (torch.arange(11) >= 5).long()[None].expand(2, 11).contiguous()
    return inputs


def _hf_out(model, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs)
    for field in ("last_hidden_state", "prediction_logits", "logits"):  # bare, BertForPreTraining, heads
        if hasattr(out, field):
            return getattr(out, field)
    raise AssertionError(f"no output in {type(out).__name__}")


def _compare(ref: torch.Tensor, got: torch.Tensor, inputs: dict[str, torch.Tensor], what: str) -> None:
    if ref.dim() >= 2 and ref.shape[:2] == inputs["attention_mask"].shape:  # per-token: padding is never read
        keep = inputs["attention_mask"].bool()
        ref, got = ref[keep], got[keep]
    assert got.shape == ref.shape
    err = relative_error(got, ref)
    assert err <= TOL, f"{what}: relative error {err:.2e} > {TOL}"


@pytest.mark.parametrize("family,head", CASES, ids=[f"{f}-{h}" for f, h in CASES])
def test_parity_and_round_trip(family, head, tmp_path):
    config = CONFIGS[family]()
    arch = PREFIX[family] + head
    hf = _perturbed(getattr(T, arch), config)
    hf.save_pretrained(tmp_path / "hf")
    model = evolm.load_model(tmp_path / "hf")
    expected = {"ElectraForPreTraining": EncoderForReplacedTokenDetection, "BertForPreTraining": EncoderForMaskedLM}
    assert type(model) is expected.get(arch, HEADS.get(head))
    inputs = _inputs(family, config.pad_token_id)
    ref = _hf_out(hf, inputs)
    with torch.no_grad():
        out = model(**inputs)
    _compare(ref, out, inputs, f"{arch}: evolm vs transformers")
    if head == "Model" and family in ("bert", "roberta"):
        with torch.no_grad():
            pooled = hf(**inputs).pooler_output
        _compare(pooled, model.pool(out), inputs, f"{arch} pooler")

    evolm.save_model(model, tmp_path / "evolm")
    saved = json.loads((tmp_path / "evolm" / "config.json").read_text())
    back_arch = "BertForMaskedLM" if arch == "BertForPreTraining" else arch
    assert saved["architectures"] == [back_arch]
    back = getattr(T, back_arch).from_pretrained(tmp_path / "evolm", dtype=torch.float32).eval()
    again = _hf_out(back, inputs)
    _compare(ref, again, inputs, f"{arch}: saved by evolm, reloaded by transformers")


def test_roberta_positions_skip_padding(tmp_path):
    """Left padding moves RoBERTa's positions (fairseq numbering), and evolm follows transformers."""
    config = CONFIGS["roberta"]()
    hf = _perturbed(T.RobertaForMaskedLM, config)
    hf.save_pretrained(tmp_path)
    model = evolm.load_model(tmp_path)
    ids = torch.randint(3, V, (2, 9), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    ids[0, :4], mask[0, :4] = config.pad_token_id, 0
    inputs = {"input_ids": ids, "attention_mask": mask}
    _compare(_hf_out(hf, inputs), model(**inputs), inputs, "left-padded roberta")


def test_electra_pretraining_checkpoint_keeps_generator(tmp_path):
    """An ELECTRA discriminator trained with its generator saves both; transformers reads the discriminator,
    evolm reads both back, with the shared embeddings tied again."""
    model = evolm.build_model(evolm.preset("electra-tiny", n_layers=1), seed=0)
    assert model.generator.model.embed_tokens.weight is model.model.embed_tokens.weight
    evolm.save_model(model, tmp_path)
    back = evolm.load_model(tmp_path)
    assert back.generator.model.embed_tokens.weight is back.model.embed_tokens.weight
    assert back.generator.mlm_head.decoder.weight is back.model.embed_tokens.weight
    for (name, a), (_, b) in zip(model.state_dict().items(), back.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    ids = torch.randint(0, model.cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    hf = T.ElectraForPreTraining.from_pretrained(tmp_path, dtype=torch.float32).eval()
    with torch.no_grad():
        _compare(hf(ids).logits, model(ids), {"attention_mask": torch.ones_like(ids)}, "electra discriminator")
    evolm.save_model(back.generator, tmp_path / "generator")  # the generator alone is an ElectraForMaskedLM
    gen = T.ElectraForMaskedLM.from_pretrained(tmp_path / "generator", dtype=torch.float32).eval()
    with torch.no_grad():
        _compare(gen(ids).logits, back.generator(ids), {"attention_mask": torch.ones_like(ids)}, "electra generator")


def test_bad_input(tmp_path):
    config = CONFIGS["bert"]()
    _perturbed(T.BertForMaskedLM, config).save_pretrained(tmp_path / "bert")
    model = evolm.load_model(tmp_path / "bert")
    too_long = torch.zeros(1, config.max_position_embeddings + 1, dtype=torch.long)
    with pytest.raises(ValueError, match="exceeds the model's maximum of max_seq_len=24"):
        model(too_long)
    with pytest.raises(ConfigError, match="encoder-only"):
        generate(model, torch.tensor([[5, 6]]), 3)
    with pytest.raises(ValueError, match="attention_mask has shape"):
        model(torch.zeros(2, 5, dtype=torch.long), attention_mask=torch.ones(2, 4))

    cfg = json.loads((tmp_path / "bert" / "config.json").read_text())
    for change, error, match in [
        ({"architectures": ["BertLMHeadModel"]}, UnsupportedModelError, "BertLMHeadModel"),
        ({"position_embedding_type": "relative_key"}, ConfigError, "position_embedding_type"),
        ({"is_decoder": True}, ConfigError, "is_decoder"),
        ({"hidden_size": 30}, ConfigError, "multiple of the number of heads"),
        ({"vocab_size": V + 1}, CheckpointError, "vocab_size"),
    ]:
        (tmp_path / "bad").mkdir(exist_ok=True)
        (tmp_path / "bad" / "config.json").write_text(json.dumps({**cfg, **change}))
        (tmp_path / "bad" / "model.safetensors").write_bytes((tmp_path / "bert" / "model.safetensors").read_bytes())
        with pytest.raises(error, match=match):
            evolm.load_model(tmp_path / "bad")
