"""The original Transformer (Vaswani et al., 2017) as an evolm preset: its size, its structure,
and an evolm-format save/load round trip (there is no transformers counterpart)."""

from __future__ import annotations

import math

import torch

import evolm
from evolm.models.family import family_for
from evolm.models.presets import preset, preset_hf_config
from evolm.models.seq2seq import Seq2SeqConfig, Seq2SeqLM
from evolm.nn.positions import sinusoidal_positions


def test_base_model_has_the_papers_shape_and_size():
    cfg = preset("transformer-2017")
    assert isinstance(cfg, Seq2SeqConfig)
    assert (cfg.hidden_size, cfg.n_layers, cfg.n_decoder_layers, cfg.attention.n_heads, cfg.mlp.hidden_size) == (
        512,
        6,
        6,
        8,
        2048,
    )
    assert cfg.residual == "post" and cfg.absolute_positions == "sinusoidal" and cfg.tie_embeddings
    assert cfg.embedding_scale == math.sqrt(512) and cfg.mlp.activation == "relu"
    with torch.device("meta"):
        model = Seq2SeqLM(cfg)
    n = sum(p.numel() for p in model.parameters())  # the shared embedding counted once
    c, f, v = 512, 2048, 37000
    attn, ffn, norm = 4 * (c * c + c), 2 * c * f + f + c, 2 * c
    assert n == v * c + 6 * (attn + ffn + 2 * norm) + 6 * (2 * attn + ffn + 3 * norm) == 63_082_496
    assert abs(n - 65e6) / 65e6 < 0.05  # Table 3 reports 65M for "base"


def tiny_transformer() -> Seq2SeqConfig:
    """The same family at toy size, from evolm's own config.json fields."""
    hf = {**preset_hf_config("transformer-2017"), "vocab_size": 61, "d_model": 32, "encoder_layers": 2}
    hf.update(decoder_layers=2, num_heads=4, d_ff=64, max_position_embeddings=40)
    return family_for("transformer").config_from_hf(hf)


def test_forward_is_the_papers_recipe_and_round_trips(tmp_path):
    torch.manual_seed(0)
    model = evolm.build_model(tiny_transformer(), seed=0).eval()
    ids, dec = torch.randint(0, 61, (2, 9)), torch.randint(0, 61, (2, 6))
    # the encoder input is sqrt(d) * embedding + sinusoidal positions, then post-LN blocks
    with torch.no_grad():
        x = model.model.embed_tokens(ids) * math.sqrt(32) + sinusoidal_positions(torch.arange(9), 32)
        for layer in model.model.encoder.layers:
            a = layer.self_attn_norm(x + layer.self_attn(x, _bidirectional(9)))
            x = layer.mlp_norm(a + layer.mlp(a))
        torch.testing.assert_close(model.encode(ids), x)
        logits = model(ids, decoder_input_ids=dec)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # shared embeddings and pre-softmax
    evolm.save_model(model, tmp_path / "ckpt")
    back = evolm.load_model(tmp_path / "ckpt")
    assert back.cfg == model.cfg and back.lm_head.weight is back.model.embed_tokens.weight
    with torch.no_grad():
        torch.testing.assert_close(back(ids, decoder_input_ids=dec), logits, rtol=0, atol=0)


def _bidirectional(n: int):
    from evolm.nn.attention import AttentionMask

    index = torch.arange(n)
    return AttentionMask(q_index=index, k_index=index, causal=False)
