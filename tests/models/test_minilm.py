"""The real all-MiniLM-L6-v2: evolm's sentence embeddings against transformers + mean pooling."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

import evolm
from evolm.errors import ConfigError
from evolm.models.encoder import EncoderModel
from evolm.models.pooling import embed

SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "A man is riding a horse.",
    "A man is riding a white horse on an enclosed ground.",
    "The new movie is awesome, I loved every minute of it.",
    "The cat sits outside on the mat.",
    "Stock markets fell sharply after the central bank raised interest rates.",
]
# (similar, dissimilar) pairs of indices into SENTENCES: the first pair must score higher.
RANKINGS = [((0, 1), (0, 2)), ((2, 3), (2, 4)), ((0, 1), (5, 6)), ((2, 3), (1, 6))]


@pytest.fixture(scope="module")
def minilm(minilm_dir):
    """evolm's model and tokenizer of all-MiniLM-L6-v2."""
    model = evolm.load_model(minilm_dir)
    assert isinstance(model, EncoderModel) and model.cfg.pooler
    return model, evolm.load_tokenizer(minilm_dir)


@pytest.fixture(scope="module")
def embeddings(minilm, minilm_dir):
    """(evolm, transformers) unit-length embeddings of SENTENCES, (N, 384) each."""
    import transformers

    ours = embed(*minilm, SENTENCES, batch_size=4)  # two batches, padded differently

    hf_tok = transformers.AutoTokenizer.from_pretrained(minilm_dir)
    hf = transformers.AutoModel.from_pretrained(minilm_dir, dtype=torch.float32).eval()
    enc = hf_tok(SENTENCES, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        hidden = hf(**enc).last_hidden_state  # (N, T, C)
    m = enc["attention_mask"][..., None].float()
    ref = F.normalize((hidden * m).sum(1) / m.sum(1), dim=-1)
    return ours, ref


def test_embeddings_match_transformers(embeddings):
    ours, ref = embeddings
    assert ours.shape == ref.shape == (len(SENTENCES), 384)
    cos = (ours * ref).sum(-1)
    assert float(cos.min()) >= 0.9999, f"cosine to transformers' embeddings: {cos.tolist()}"
    assert torch.allclose(ours.norm(dim=-1), torch.ones(len(SENTENCES)), atol=1e-5)


def test_ranks_pairs_like_the_original(embeddings):
    ours, ref = embeddings
    sim, sim_ref = ours @ ours.T, ref @ ref.T
    for (a, b), (c, d) in RANKINGS:
        assert sim_ref[a, b] > sim_ref[c, d]  # the reference ranks them so
        assert sim[a, b] > sim[c, d], f"pair {(a, b)} should score above {(c, d)}"
    # Every two sentence pairs the reference tells apart (by more than 1e-3) are ordered alike.
    i, j = torch.triu_indices(len(SENTENCES), len(SENTENCES), offset=1)
    ours_s, ref_s = sim[i, j], sim_ref[i, j]  # (P,) one score per sentence pair
    apart = (ref_s[:, None] - ref_s[None, :]).abs() > 1e-3  # (P, P)
    agree = (ours_s[:, None] > ours_s[None, :]) == (ref_s[:, None] > ref_s[None, :])
    assert bool(agree[apart].all())
    assert float((sim - sim_ref).abs().max()) < 1e-4


def test_embed_bad_input(minilm):
    model, tokenizer = minilm
    with pytest.raises(ConfigError, match="single string"):
        embed(model, tokenizer, "one sentence")
    with pytest.raises(ConfigError, match="max_length=600"):
        embed(model, tokenizer, ["x"], max_length=600)
    long = embed(model, tokenizer, ["word " * 1000], max_length=512)  # truncated, not an error
    assert long.shape == (1, 384)
    with pytest.raises(ValueError, match="exceeds the model's maximum"):
        model(torch.zeros(1, 513, dtype=torch.long))


def test_load_tokenizer_drops_the_files_fixed_padding(minilm_dir):
    """all-MiniLM-L6-v2's tokenizer.json pads to 128; evolm encodes exactly the text, as transformers does."""
    import transformers

    import evolm

    ours = evolm.load_tokenizer(minilm_dir).encode("Hello world")
    assert ours == transformers.AutoTokenizer.from_pretrained(minilm_dir)("Hello world")["input_ids"]
    assert len(ours) == 4
