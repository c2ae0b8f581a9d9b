"""EleutherAI's lm-evaluation-harness runs evolm models through ``evolm.eval.harness``.

Three custom tasks read local JSON-lines files from a temporary folder (``include_path``): a
multiple-choice task, a rolling log-likelihood (perplexity) task and a generation task. Their
numbers must equal what evolm computes itself for the same prompts.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

pytest.importorskip("lm_eval", reason="the lm_eval adapter test needs: pip install 'lm_eval==0.4.13'")

from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from evolm.eval.harness import lm_eval_model, simple_evaluate
from evolm.eval.multiple_choice import MCItem, loglikelihoods, score_items, split_context, summarize
from evolm.eval.perplexity import sequence_nll
from evolm.infer.generate import generate

QUESTIONS = [
    {"question": "def f(x): return x +", "choices": ["1", "None", "self"], "answer": 0},
    {"question": "import", "choices": [" os", " sys", "abc"], "answer": 2},
    {"question": "class A(", "choices": ["object):", "x", "0"], "answer": 0},
    {"question": "for i in", "choices": ["range(10):", "None", "the list"], "answer": 0},
]
PROMPTS = ["def f(", "class Counter", "import os\nfor i in range("]
TEXTS = ["def f(x):\n    return x + 1\n", "class Counter:\n    pass\n" * 30]


def _write_tasks(folder, cache):
    data = {
        "mc": QUESTIONS,
        "text": [{"text": t} for t in TEXTS],
        "gen": [{"prompt": p, "target": "x"} for p in PROMPTS],
    }
    for name, rows in data.items():
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = f"dataset_path: json\ntest_split: test\ndataset_kwargs:\n  cache_dir: {cache}\n  data_files:\n"
    (folder / "mc.yaml").write_text(
        "task: evolm_mc\n" + common + f"    test: {folder}/mc.jsonl\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "Q: {{question}}\\nA:"\n'
        "doc_to_choice: '{{choices}}'\n"
        "doc_to_target: answer\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n"
    )
    (folder / "text.yaml").write_text(
        "task: evolm_text\n" + common + f"    test: {folder}/text.jsonl\n"
        "output_type: loglikelihood_rolling\n"
        'doc_to_text: ""\n'
        "doc_to_target: '{{text}}'\n"
        "metric_list:\n  - metric: bits_per_byte\n    aggregation: bits_per_byte\n    higher_is_better: false\n"
    )
    (folder / "gen.yaml").write_text(
        "task: evolm_gen\n" + common + f"    test: {folder}/gen.jsonl\n"
        "output_type: generate_until\n"
        "doc_to_text: '{{prompt}}'\n"
        "doc_to_target: '{{target}}'\n"
        "generation_kwargs:\n  until: [')']\n  max_gen_toks: 12\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"
    )


def test_lm_eval_tasks_on_local_data_agree_with_evolm(tiny, tmp_path):
    _, model, tok = tiny
    _write_tasks(tmp_path, tmp_path / "hf-cache")
    out = simple_evaluate(
        model,
        tok,
        ["evolm_mc", "evolm_text", "evolm_gen"],
        include_path=str(tmp_path),
        include_defaults=False,
        batch_size=2,
        bootstrap_iters=0,
    )
    results, samples = out["results"], out["samples"]

    # multiple choice: lm_eval's context is doc_to_text, each continuation " " + choice
    items = [
        MCItem(
            f"Q: {q['question']}\nA:",
            tuple(" " + c for c in q["choices"]),
            tuple(float(i == q["answer"]) for i in range(3)),
            length=tuple(len(c) for c in q["choices"]),
        )
        for q in QUESTIONS
    ]
    summary = summarize(items, score_items(model, tok, items))
    assert results["evolm_mc"]["acc,none"] == pytest.approx(summary["acc"])
    assert results["evolm_mc"]["acc_norm,none"] == pytest.approx(summary["acc_norm"])
    for sample in samples["evolm_mc"]:
        q = sample["doc"]
        want = loglikelihoods(model, [split_context(tok, f"Q: {q['question']}\nA:", " " + c) for c in q["choices"]])
        assert [r[0][0] for r in sample["resps"]] == pytest.approx([w[0] for w in want], abs=1e-5)

    # rolling log-likelihood: the short text fits one window, so it is the whole-text log-probability
    # after the EOS prefix; the long one (> the 128-token context) is cut into lm_eval's windows,
    # each scored here by one plain forward
    by_text = {s["doc"]["text"]: s["resps"][0][0] for s in samples["evolm_text"]}
    short = [tok.eos_token_id, *tok.encode(TEXTS[0], add_special_tokens=False)]
    assert by_text[TEXTS[0]] == pytest.approx(-sequence_nll(model, [short]).nll, abs=1e-4)
    long = tok.encode(TEXTS[1], add_special_tokens=False)
    assert len(long) > model.cfg.max_seq_len
    windows = get_rolling_token_windows(long, tok.eos_token_id, model.cfg.max_seq_len, context_len=1)
    want = 0.0
    for ctx, cont in map(make_disjoint_window, windows):
        with torch.no_grad():
            logp = model(torch.tensor([(ctx + cont)[:-1]]))[0, -len(cont) :].log_softmax(-1)
        want += logp.gather(1, torch.tensor(cont)[:, None]).sum().item()
    assert by_text[TEXTS[1]] == pytest.approx(want, abs=1e-3)
    total_bytes = sum(len(t.encode()) for t in TEXTS)
    assert results["evolm_text"]["bits_per_byte,none"] == pytest.approx(
        -sum(by_text.values()) / total_bytes / math.log(2), rel=1e-6
    )

    # generation: greedy, cut at the first ")"; prompts of different lengths share left-padded batches
    generated = {s["doc"]["prompt"]: s["resps"][0][0] for s in samples["evolm_gen"]}
    for text in PROMPTS:
        prompt = tok.encode(text)
        ids = generate(model, torch.tensor([prompt]), 12, eos_token_id=tok.eos_token_id)[0, len(prompt) :].tolist()
        if tok.eos_token_id in ids:
            ids = ids[: ids.index(tok.eos_token_id)]
        assert generated[text] == tok.decode(ids, skip_special_tokens=True).split(")")[0]


def test_adapter_is_registered_and_needs_a_tokenizer(tiny):
    from lm_eval.api.instance import Instance
    from lm_eval.api.registry import get_model

    from evolm.errors import ConfigError

    _, model, tok = tiny
    lm = lm_eval_model(model, tok, batch_size=2)
    assert get_model("evolm") is type(lm)
    with pytest.raises(ConfigError, match="needs the model's tokenizer"):
        lm_eval_model(model, None)
    loaded = type(lm).create_from_arg_string(f"pretrained={tiny[0]},batch_size=2")
    request = Instance("loglikelihood", {}, ("def f(x):", " return x"), 0)
    (got,), (want,) = loaded.loglikelihood([request]), lm.loglikelihood([request])
    assert got[0] == pytest.approx(want[0], abs=1e-6) and got[1] == want[1]
