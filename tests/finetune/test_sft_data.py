"""SFT data: formats, assistant-only labels through the real SmolLM2 chat template, packing that
computes exactly what each example computes alone, and the validation split."""

from __future__ import annotations

import json

import pytest
import torch

import evolm
from evolm.data.sft import SFTData, read_records, record_format, tokenize_record
from evolm.errors import DataError


@pytest.fixture(scope="module")
def tok(smollm2_gguf):
    return evolm.load_tokenizer(smollm2_gguf)


def _targets(ex, tok) -> str:
    return tok.decode([label for label in ex.labels if label != -100])


def test_chat_labels_cover_assistant_turns_only(tok):
    record = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Capital of France?"},
            {"role": "assistant", "content": "Paris."},
            {"role": "user", "content": "And of Italy?"},
            {"role": "assistant", "content": "Rome."},
        ]
    }
    ex = tokenize_record(record, tok, 512)
    assert _targets(ex, tok) == "Paris.<|im_end|>Rome.<|im_end|>"
    assert tok.decode(list(ex.input_ids)) == tok.apply_chat_template(record["messages"], tokenize=False)
    assert ex.prompt.endswith("And of Italy?<|im_end|>\n<|im_start|>assistant\n") and ex.reference == "Rome."
    # labels are the next token where it is a target
    ids = ex.input_ids
    assert all(label in (-100, ids[t + 1]) for t, label in enumerate(ex.labels[:-1])) and ex.labels[-1] == -100


def test_alpaca_and_prompt_completion(tok):
    alpaca = tokenize_record({"instruction": "Add.", "input": "2+2", "output": "4"}, tok, 512)
    assert _targets(alpaca, tok) == "4<|im_end|>"
    assert "Add.\n\n2+2" in tok.decode(list(alpaca.input_ids))
    plain = tokenize_record({"prompt": "def f():\n", "completion": "    return 1\n"}, tok, 512)
    assert _targets(plain, tok) == "    return 1\n" + tok.decode([tok.eos_token_id])
    conv = tokenize_record(
        {"prompt": [{"role": "user", "content": "Hi"}], "completion": [{"role": "assistant", "content": "Hey"}]},
        tok,
        512,
    )
    assert _targets(conv, tok) == "Hey<|im_end|>"
    assert tokenize_record({"prompt": "x " * 50, "completion": "y"}, tok, 10) is None  # target truncated away


def test_bad_records_name_the_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n" + json.dumps({"text": "x"}) + "\n")
    with pytest.raises(DataError, match=r"d.jsonl:2: unknown record"):
        read_records(str(path))
    with pytest.raises(DataError, match="no assistant"):
        record_format({"messages": [{"role": "user", "content": "hi"}]})


def test_humaneval_records_and_split(tok):
    records = read_records("humaneval")
    assert len(records) == 164 and "has_close_elements" in records[0]["messages"][1]["content"]
    data = SFTData.from_records(records[:20], tok, 256, 0.2, seed=0)
    again = SFTData.from_records(records[:20], tok, 256, 0.2, seed=0)
    assert len(data.val) == 4 and len(data.train) == 16 and data.truncated > 0
    assert [e.input_ids for e in data.val] == [e.input_ids for e in again.val]
    assert not {e.input_ids for e in data.val} & {e.input_ids for e in data.train}


def test_packed_rows_compute_what_each_example_computes_alone(tiny_pair):
    _, model = tiny_pair
    gen = torch.Generator().manual_seed(0)
    from evolm.data.sft import Example

    examples = []
    for n in (5, 9, 3, 7, 6):
        ids = torch.randint(0, 256, (n,), generator=gen).tolist()
        examples.append(Example(tuple(ids), (*ids[1:], -100), "", ""))
    data = SFTData(examples, [], seq_len=16, pad_id=0)
    rows = data.rows(examples, packing=True)
    assert [[len(e.input_ids) for e in r] for r in rows] == [[5, 9], [3, 7, 6]]
    batch = data.collate(rows)
    assert batch.input_ids.shape == (2, 16)
    with torch.no_grad():
        packed = model(batch.input_ids, document_ids=batch.document_ids, position_ids=batch.position_ids)
        for b, row in enumerate(rows):
            at = 0
            for ex in row:
                n = len(ex.input_ids)
                alone = model(torch.tensor([ex.input_ids]))[0]
                torch.testing.assert_close(packed[b, at : at + n], alone, rtol=0, atol=1e-5)
                assert batch.labels[b, at + n - 1] == -100  # no label crosses into the next example
                at += n
            assert (batch.labels[b, at:] == -100).all()
