"""evolm's scores on the real SmolLM2-135M-Instruct equal transformers' on the same prompts.

MMLU: 20 questions (the first 10 of two subjects with short questions), zero-shot, choices
" A".." D": evolm's batched scorer picks the same answers as a plain transformers forward of each
prompt. BIG-bench: free-text choices (several tokens each), where the shared-context KV-cache
path of the scorer is used, against one transformers forward per (prompt, choice).
"""

from __future__ import annotations

import torch

from evolm.eval.bigbench import bigbench_items, load_bigbench
from evolm.eval.mmlu import load_mmlu, mmlu_items
from evolm.eval.multiple_choice import score_items, split_context, summarize


def _hf_choice_logprobs(hf, context_ids: list[int], choice_ids: list[list[int]]) -> list[float]:
    """log p(choice | context) with one unpadded transformers forward per choice."""
    out = []
    with torch.no_grad():
        for cont in choice_ids:
            ids = torch.tensor([context_ids + cont[:-1]])
            logits = hf(ids, logits_to_keep=len(cont)).logits  # (1, len(cont), V): the positions predicting cont
            logp = logits[0].float().log_softmax(-1)
            out.append(logp.gather(1, torch.tensor(cont)[:, None]).sum().item())
    return out


def test_mmlu_accuracy_equals_transformers(smollm2_evolm, smollm2_hf_reference, smollm2_hf_tokenizer):
    model, tok = smollm2_evolm
    hf = smollm2_hf_reference[2]
    questions, problems = load_mmlu(subjects=("world religions", "management"), limit=10)
    assert len(questions) == 20 and not problems
    items = mmlu_items(questions)
    scores = score_items(model, tok, items, batch_size=8)

    hf_correct = 0
    for item, score in zip(items, scores, strict=True):
        pairs = [split_context(tok, item.context, c) for c in item.choices]
        context_ids = pairs[0][0]
        assert smollm2_hf_tokenizer(item.context.rstrip(), add_special_tokens=False)["input_ids"] == context_ids
        assert all(len(c) == 1 for _, c in pairs)  # " A" .. " D" are single tokens: one forward scores all
        with torch.no_grad():
            logp = hf(torch.tensor([context_ids]), logits_to_keep=1).logits[0, -1].float().log_softmax(-1)
        ref = [logp[c[0]].item() for _, c in pairs]
        hf_pred = max(range(4), key=lambda i: ref[i])
        assert score.pred == hf_pred, (item.context, ref, score.logprobs)
        assert max(abs(a - b) for a, b in zip(ref, score.logprobs, strict=True)) < 1e-3
        hf_correct += item.scores[hf_pred]
    summary = summarize(items, scores)
    assert summary["acc"] == hf_correct / len(items)
    assert set(summary["groups"]) == {"world religions", "management"}
    groups = summary["groups"]
    assert summary["acc_macro"] == (groups["world religions"]["acc"] + groups["management"]["acc"]) / 2


def test_bigbench_free_text_choices_equal_transformers(smollm2_evolm, smollm2_hf_reference, authored_bigbench):
    model, tok = smollm2_evolm
    hf = smollm2_hf_reference[2]
    task, _ = load_bigbench("authored_words", authored_bigbench["words"])
    items = bigbench_items(task, limit=2)
    scores = score_items(model, tok, items, batch_size=2)
    for item, score in zip(items, scores, strict=True):
        pairs = [split_context(tok, item.context, c) for c in item.choices]
        assert max(len(c) for _, c in pairs) > 3  # the multi-token path
        ref = _hf_choice_logprobs(hf, pairs[0][0], [c for _, c in pairs])
        assert score.pred == max(range(len(ref)), key=lambda i: ref[i])
        assert max(abs(a - b) for a, b in zip(ref, score.logprobs, strict=True)) < 1e-3
