"""The scoring engines against transformers on a tiny random checkpoint.

Perplexity: Hugging Face's strided recipe run literally on the transformers model (``labels``
with -100, ``outputs.loss``) equals ``sequence_nll`` on the same checkpoint loaded by evolm.
Multiple choice: ``loglikelihoods`` (left-padded contexts, KV-cache rows repeated per
continuation, right-padded continuations, a sliding-window model so the rolling cache is
repeated too) equals one plain transformers forward per (context, continuation).
"""

from __future__ import annotations

import math

import pytest
import torch
import transformers as T

import evolm
from evolm.errors import ConfigError
from evolm.eval.multiple_choice import MCItem, MCScore, loglikelihoods, split_context, summarize
from evolm.eval.perplexity import perplexity, sequence_nll, strided_windows
from helpers.hf_parity import build_hf


@pytest.fixture(scope="module")
def mistral(tmp_path_factory):
    """(transformers model, evolm model) of one tiny Mistral with a sliding window of 8 tokens."""
    cfg = T.MistralConfig(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        sliding_window=8,
    )
    hf = build_hf(cfg)
    path = tmp_path_factory.mktemp("mistral")
    hf.save_pretrained(path)
    return hf, evolm.load_model(path)


def hf_strided_nll(hf, ids: torch.Tensor, max_length: int, stride: int) -> tuple[float, int]:
    """The recipe of https://huggingface.co/docs/transformers/perplexity, run on transformers.

    The page weights each window's mean loss by ``num_valid_tokens - batch_size``, which is right
    for the first window only: later windows keep their first label after the internal shift. Here
    the weight is the number of labels the loss really averaged over.
    """
    seq_len, nll_sum, n_tokens, prev_end = ids.size(1), 0.0, 0, 0
    for begin in range(0, seq_len, stride):
        end = min(begin + max_length, seq_len)
        trg_len = end - prev_end
        input_ids = ids[:, begin:end]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            loss = hf(input_ids, labels=target_ids).loss
        n = int((target_ids[:, 1:] != -100).sum())
        nll_sum += float(loss) * n
        n_tokens += n
        prev_end = end
        if end == seq_len:
            break
    return nll_sum, n_tokens


@pytest.mark.parametrize(("max_length", "stride"), [(64, 16), (32, 32), (48, 20)])
def test_strided_perplexity_equals_transformers_recipe(mistral, max_length, stride):
    hf, model = mistral
    ids = torch.randint(0, 300, (1, 203), generator=torch.Generator().manual_seed(max_length + stride))
    ref_nll, ref_tokens = hf_strided_nll(hf, ids, max_length, stride)
    got = sequence_nll(model, [ids[0].tolist()], max_length, stride, batch_size=3)
    assert got.tokens == ref_tokens
    assert got.nll == pytest.approx(ref_nll, rel=1e-5)
    assert got.perplexity == pytest.approx(math.exp(ref_nll / ref_tokens), rel=1e-5)


def test_windows_score_every_token_once():
    for n, max_length, stride in [(10, 6, 3), (203, 64, 16), (7, 4, 1), (64, 64, 32), (65, 64, 64)]:
        scored = [t for w in strided_windows(n, max_length, stride) for t in range(w.first_scored, w.end)]
        assert len(scored) == len(set(scored))
        if stride < max_length:
            assert scored == list(range(1, n))
        for w in strided_windows(n, max_length, stride):
            assert w.end - w.begin <= max_length and w.first_scored > w.begin
    assert strided_windows(10, 6, 3)[1].first_scored == 6  # the docstring's picture
    with pytest.raises(ConfigError, match="stride=7"):
        strided_windows(10, 6, 7)


def test_loglikelihoods_equal_one_forward_per_request(mistral):
    hf, model = mistral
    g = torch.Generator().manual_seed(0)
    requests = []
    for _ in range(9):
        ctx = torch.randint(0, 300, (int(torch.randint(1, 30, (1,), generator=g)),), generator=g).tolist()
        for _ in range(3):  # shared contexts, continuations of 1..5 tokens
            n = int(torch.randint(1, 6, (1,), generator=g))
            requests.append((ctx, torch.randint(0, 300, (n,), generator=g).tolist()))
    requests.append((list(range(1, 70)), [7, 8, 9]))  # longer than the 64-token window: context cut
    got = loglikelihoods(model, requests, batch_size=4)
    for (ctx, cont), (logp, greedy) in zip(requests, got, strict=True):
        ids = torch.tensor([(ctx + cont)[-65:][:-1]])
        with torch.no_grad():
            ref = hf(ids).logits[0, -len(cont) :].log_softmax(-1)
        want = ref.gather(1, torch.tensor(cont)[:, None]).sum().item()
        assert logp == pytest.approx(want, abs=1e-4)
        assert greedy == bool((ref.argmax(-1) == torch.tensor(cont)).all())
    # a continuation that is the greedy one is reported as such
    ctx = requests[0][0]
    with torch.no_grad():
        best = int(hf(torch.tensor([ctx])).logits[0, -1].argmax())
    assert loglikelihoods(model, [(ctx, [best])])[0][1] is True


def test_loglikelihoods_bad_requests(mistral):
    _, model = mistral
    with pytest.raises(ConfigError, match="empty context"):
        loglikelihoods(model, [([], [1])])
    with pytest.raises(ConfigError, match="does not fit"):
        loglikelihoods(model, [([1], list(range(65)))])
    assert loglikelihoods(model, [([1, 2], [])]) == [(0.0, True)]


def test_split_context_moves_trailing_space(tiny):
    _, _, tok = tiny
    ctx, cont = split_context(tok, "Question: 1 + 1 =\nAnswer: ", "2")
    assert ctx == tok.encode("Question: 1 + 1 =\nAnswer:")
    assert ctx + cont == tok.encode("Question: 1 + 1 =\nAnswer: 2")
    with pytest.raises(ConfigError, match="empty context"):
        split_context(tok, "", "x")


def test_perplexity_of_text_scores_every_token_and_counts_bytes(tiny):
    _, model, tok = tiny
    texts = ["def f(x):\n    return x + 1\n" * 12, "café au lait ünïcödé " * 3]
    result = perplexity(model, tok, texts, max_length=32, stride=8, batch_size=4)
    ids = [[tok.eos_token_id, *tok.encode(t, add_special_tokens=False)] for t in texts]  # BPE: no BOS, EOS prefix
    assert tok.bos_token_id is None or tok.bos_token_id == tok.eos_token_id
    assert result.tokens == sum(len(i) - 1 for i in ids)  # every text token, the first one included
    assert result.bytes == sum(len(t.encode()) for t in texts)
    assert result.nll == pytest.approx(sequence_nll(model, ids, 32, 8).nll, rel=1e-6)
    assert result.bits_per_byte == pytest.approx(result.nll / math.log(2) / result.bytes)
    cut = perplexity(model, tok, texts, max_length=32, stride=8, max_tokens=50)
    assert cut.tokens == 49 and cut.documents == 1


def test_summarize_micro_and_macro():
    items = [MCItem("q", (" a", " b"), (1.0, 0.0), group=g) for g in ("x", "x", "x", "y")]
    right, wrong = MCScore((0.0, -1.0), 0, 0, 1.0, 1.0), MCScore((-1.0, 0.0), 1, 0, 0.0, 1.0)
    s = summarize(items, [right, right, wrong, wrong])
    assert s["acc"] == 0.5 and s["acc_macro"] == pytest.approx((2 / 3 + 0) / 2)
    assert s["acc_norm"] == 1.0 and s["groups"]["x"] == {"n": 3, "acc": 2 / 3, "acc_norm": 1.0}
