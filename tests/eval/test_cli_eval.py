"""``evolm eval`` on a tiny saved model: results file, table, task dispatch and clean errors."""

from __future__ import annotations

import json
import shutil

import pytest

import evolm.eval.humaneval as humaneval
from evolm.cli.main import main
from evolm.eval.perplexity import perplexity
from evolm.eval.tasks import EvalConfig, MMLUTaskConfig, run_task


def test_perplexity_results_file_and_table(tiny, tmp_path, capsys):
    path, model, tok = tiny
    text = tmp_path / "doc.txt"
    text.write_text("def add(a, b):\n    return a + b\n" * 20)
    out = tmp_path / "results.json"
    flags = ["--perplexity.data", str(text), "--perplexity.max_length", "32", "--perplexity.stride", "16"]
    assert main(["eval", str(path), "--task", "perplexity", *flags, "--output", str(out), "--no-progress"]) == 0
    report = json.loads(out.read_text())
    (result,) = report["results"]
    want = perplexity(model, tok, [text.read_text()], max_length=32, stride=16)
    assert result["metrics"]["perplexity"] == pytest.approx(want.perplexity, rel=1e-6)
    assert result["metrics"]["bits_per_byte"] == pytest.approx(want.bits_per_byte, rel=1e-6)
    assert (result["tokens"], result["bytes"], result["stride"]) == (want.tokens, want.bytes, 16)
    printed = capsys.readouterr()
    assert "bits_per_byte" in printed.out and "results written to" in printed.err


def test_mmlu_and_bigbench_in_one_run(tiny, tmp_path, authored_bigbench):
    path, model, tok = tiny
    out = tmp_path / "results.json"
    args = ["eval", str(path), "--task", "mmlu", "--task", "bigbench:arithmetic"]
    args += ["--bigbench.path", str(authored_bigbench["arithmetic"])]
    args += ["--limit", "2", "--mmlu.subjects", "astronomy", "high_school_geography", "--num_fewshot", "1"]
    assert main([*args, "--batch_size", "3", "--output", str(out), "--no-progress"]) == 0
    mmlu, bigbench = json.loads(out.read_text())["results"]
    assert mmlu["n"] == 4 and set(mmlu["groups"]) == {"astronomy", "high school geography"}
    assert bigbench["n"] == 2 and bigbench["metrics"]["multiple_choice_grade"] == bigbench["metrics"]["acc"]
    cfg = EvalConfig(limit=2, num_fewshot=1, batch_size=5, mmlu=MMLUTaskConfig(("astronomy", "high school geography")))
    assert run_task("mmlu", model, tok, cfg)["metrics"] == pytest.approx(mmlu["metrics"])


def test_unknown_task_lists_the_known_ones(tiny, capsys):
    assert main(["eval", str(tiny[0]), "--task", "hellaswag"]) == 2
    err = capsys.readouterr().err
    assert "unknown task 'hellaswag'" in err and "perplexity, mmlu, bigbench:NAME, humaneval" in err
    assert main(["eval", str(tiny[0]), "--task", "bigbench"]) == 2
    assert "bigbench:NAME" in capsys.readouterr().err


def test_unknown_bigbench_task_suggests_the_real_names(tiny, bigbench_files, capsys):
    assert main(["eval", str(tiny[0]), "--task", "bigbench:anachronism"]) == 2
    assert "did you mean anachronisms" in capsys.readouterr().err


def test_model_without_tokenizer_is_a_clear_error(tiny, tmp_path, capsys):
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in tiny[0].iterdir():
        if not f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, bare / f.name)
    assert main(["eval", str(bare), "--task", "perplexity", "--output", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err
    assert "needs the model's tokenizer" in err and "tokenizer.json" in err


def test_on_bad_row_error_or_skip(tiny, tmp_path, capsys):
    row = {"question": "Which planet is red?", "answer_a": "Venus", "answer_b": "Mars"}
    row |= {"answer_c": "Earth", "answer_d": "Moon", "correct_answer": "B", "topic": "astronomy"}
    data = tmp_path / "mmlu.jsonl"
    data.write_text(json.dumps(row) + "\n" + "{not json\n" + json.dumps(row) + "\n")
    args = ["eval", str(tiny[0]), "--task", "mmlu", "--mmlu.path", str(data), "--output", str(tmp_path / "r.json")]
    assert main(args) == 2
    assert f"{data}:2: malformed MMLU row" in capsys.readouterr().err
    with pytest.warns(UserWarning, match="skipped 1 malformed rows"):
        assert main([*args, "--on_bad_row", "skip", "--no-progress"]) == 0
    (result,) = json.loads((tmp_path / "r.json").read_text())["results"]
    assert result["n"] == 2 and len(result["skipped_rows"]) == 1 and result["skipped_rows"][0].startswith(f"{data}:2:")


def test_perplexity_jsonl_bad_rows(tiny, tmp_path, capsys):
    data = tmp_path / "docs.jsonl"
    data.write_text(json.dumps({"text": "import os\n" * 30}) + "\n{oops\n" + json.dumps({"text": "x = 1\n" * 9}) + "\n")
    args = ["eval", str(tiny[0]), "--task", "perplexity", "--perplexity.data", str(data), "--no-progress"]
    args += ["--output", str(tmp_path / "r.json")]
    assert main(args) == 2
    assert f"{data}:2: malformed JSONL line" in capsys.readouterr().err
    with pytest.warns(UserWarning, match="skipped 1 malformed JSONL lines"):
        assert main([*args, "--on_bad_row", "skip"]) == 0
    (result,) = json.loads((tmp_path / "r.json").read_text())["results"]
    assert result["skipped_rows"] == 1 and result["documents"] == 2
    assert result["data"] == [f"jsonl:{data}?skip_bad_lines=true"]
    assert main([*args, "--limit", "1"]) == 0  # reading stops after the first document, before the bad line
    assert json.loads((tmp_path / "r.json").read_text())["results"][0]["documents"] == 1


def test_humaneval_task_delegates_to_its_module(tiny, tmp_path, monkeypatch):
    seen = {}

    def fake(model, tokenizer, cfg):
        seen["cfg"] = cfg
        return {"n_problems": 1, "n_samples": 1, "executed": True, "pass@1": 1.0, "samples": []}

    monkeypatch.setattr(humaneval, "evaluate_humaneval", fake)
    out = tmp_path / "r.json"
    assert main(["eval", str(tiny[0]), "--task", "humaneval", "--humaneval.limit", "1", "--output", str(out)]) == 0
    assert isinstance(seen["cfg"], humaneval.HumanEvalConfig) and seen["cfg"].limit == 1
    (result,) = json.loads(out.read_text())["results"]
    assert result["metrics"] == {"pass@1": 1.0} and result["n_problems"] == 1


def test_list_tasks(bigbench_files, capsys):
    assert main(["eval", "--list-tasks"]) == 0
    names = capsys.readouterr().out.split()
    assert names[:3] == ["perplexity", "mmlu", "humaneval"] and len(names) == 3 + 320
    assert "bigbench:simple_arithmetic_json_multiple_choice" in names
