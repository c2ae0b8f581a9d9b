"""MMLU and BIG-bench data: loading the real files, prompts, and malformed rows."""

from __future__ import annotations

import json
import re
from collections import Counter

import numpy as np
import pytest

from evolm.errors import CheckpointError, ConfigError, DataError
from evolm.eval.bigbench import bigbench_items, fetch_bigbench_tasks, load_bigbench
from evolm.eval.mmlu import MMLUQuestion, load_mmlu, mmlu_items, mmlu_path


def test_packaged_mmlu_test_set_without_its_csv_headers():
    questions, problems = load_mmlu()
    assert not problems
    assert len(questions) == 14_042  # 14,044 lines less the two stray CSV header rows
    counts = Counter(q.subject for q in questions)
    assert len(counts) == 57
    assert counts["elementary mathematics"] == 378 and counts["college mathematics"] == 100
    assert {q.answer for q in questions} == {0, 1, 2, 3}
    assert sum(1 for _ in mmlu_path().open()) == 14_044


def _mmlu_row(question: str, answer: str = "B", topic: str = "astronomy", **extra) -> str:
    row = {
        "question": question,
        "answer_a": "one",
        "answer_b": "two",
        "answer_c": "three",
        "answer_d": "four",
        "correct_answer": answer,
        "topic": topic,
    }
    return json.dumps({**row, **extra})


def test_mmlu_malformed_rows_name_file_and_line(tmp_path):
    path = tmp_path / "mmlu.jsonl"
    lines = [
        _mmlu_row("How many moons has Mars?"),
        '{"question": "broken',
        json.dumps({"question": "no answers", "topic": "astronomy"}),
        _mmlu_row("Which letter?", answer="E"),
        _mmlu_row("question", answer="answer"),  # a CSV header row: dropped silently
        _mmlu_row("What is 2 + 2?", answer="D"),
    ]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=rf"{re.escape(str(path))}:2: malformed MMLU row.*--on_bad_row skip"):
        load_mmlu(path)
    with pytest.warns(UserWarning, match="skipped 3 malformed rows"):
        questions, problems = load_mmlu(path, on_bad_row="skip")
    assert [q.line for q in questions] == [1, 6] and [q.answer for q in questions] == [1, 3]
    assert [p.split(": ")[0] for p in problems] == [f"{path}:2", f"{path}:3", f"{path}:4"]
    assert "missing field(s)" in problems[1] and "'E' is not one of A, B, C, D" in problems[2]
    with pytest.raises(DataError, match="unknown MMLU subject.*astronomy"), pytest.warns(UserWarning):
        load_mmlu(path, subjects=("astrology",), on_bad_row="skip")


def test_mmlu_prompts_in_lm_eval_format():
    a = MMLUQuestion("astronomy", "How many moons has Mars? ", ("0", "1", "2", "3"), 2, line=1)
    b = MMLUQuestion("astronomy", "Which planet is red?", ("Venus", "Mars", "Earth", "Moon"), 1, line=2)
    item = mmlu_items([a, b], num_fewshot=1)[1]
    assert item.context == (
        "The following are multiple choice questions (with answers) about astronomy.\n\n"
        "How many moons has Mars?\nA. 0\nB. 1\nC. 2\nD. 3\nAnswer: C\n\n"
        "Which planet is red?\nA. Venus\nB. Mars\nC. Earth\nD. Moon\nAnswer:"
    )
    assert item.choices == (" A", " B", " C", " D") and item.scores == (0.0, 1.0, 0.0, 0.0)
    text = mmlu_items([a, b], choice_format="text")[1]
    assert text.choices == (" Venus", " Mars", " Earth", " Moon") and text.length == (5, 4, 5, 4)
    with pytest.raises(DataError, match="1 other questions; 2 shots"):
        mmlu_items([a, b], num_fewshot=2)


def test_bigbench_prompt_follows_json_task_format(authored_bigbench):
    task, problems = load_bigbench("authored_arithmetic", authored_bigbench["arithmetic"])
    assert not problems and len(task.examples) == 8 and task.format["choice_prefix"] == " option: "
    item = bigbench_items(task)[0]
    order = np.random.RandomState(42).permutation(["3", "4", "5", "6"])  # BIG-bench's default_format_fn
    assert item.context == "\nQ: 1 + 4 =" + " option: " + " option: ".join(order) + "\nA: "
    assert item.choices == ("5", "4", "6", "3") and item.scores == (1.0, 0.0, 0.0, 0.0)
    shot = bigbench_items(task, num_fewshot=2, limit=1)[0].context
    assert shot.endswith("\n" + item.context) and shot.count("\nA: ") == 3


def test_real_bigbench_task_file(bigbench_files):
    task, problems = load_bigbench("simple_arithmetic_json_multiple_choice")
    assert not problems and len(task.examples) == 8 and task.format["choice_prefix"] == " option: "
    item = bigbench_items(task)[0]
    assert item.context.startswith("\nQ: 1 + 4 = option: ") and item.choices == ("5", "4", "6", "3")


def test_unavailable_sdist_names_the_task_file_option(tmp_path, monkeypatch):
    import evolm.eval.bigbench as bigbench

    monkeypatch.setattr(bigbench, "BIGBENCH_SDIST", "bigbench==0.0.0.404")
    monkeypatch.setattr(bigbench, "cache_dir", lambda: tmp_path)
    with pytest.raises(CheckpointError, match=r"bigbench==0\.0\.0\.404 sdist.*--bigbench\.path task\.json"):
        fetch_bigbench_tasks(["simple_arithmetic_json_multiple_choice"])
    assert [p.name for p in (tmp_path / "sdist" / "bigbench-0.0.0.404").iterdir()] == []  # nothing left behind


def test_bigbench_malformed_examples_name_file_and_line(tmp_path):
    path = tmp_path / "task.json"
    path.write_text(
        '{\n  "name": "tiny",\n  "example_output_prefix": "\\nAnswer: ",\n  "examples": [\n'
        '    {"input": "1 + 1 =", "target_scores": {"2": 1, "3": 0}},\n'
        '    {"input": "no scores"},\n'
        "    {\n"
        '      "input": "all equal", "target_scores": {"a": 0, "b": 0}\n'
        "    },\n"
        '    {"input": "2 + 2 =", "target_scores": {"4": 1, "5": 0, "x": true}}\n'
        "  ]\n}\n"
    )
    with pytest.raises(DataError, match=rf"{re.escape(str(path))}:6: malformed example 1: 'target_scores' must map"):
        load_bigbench("tiny", path)
    with pytest.warns(UserWarning, match="skipped 3 malformed examples"):
        task, problems = load_bigbench("tiny", path, on_bad_row="skip")
    assert [e.line for e in task.examples] == [5]
    assert [p.split(": malformed")[0] for p in problems] == [f"{path}:6", f"{path}:7", f"{path}:10"]
    order = np.random.RandomState(42).permutation(["2", "3"])
    assert bigbench_items(task)[0].context == f"\nQ: 1 + 1 =\n  choice: {order[0]}\n  choice: {order[1]}\nAnswer: "
    path.write_text('{"examples": [\n{"input": 1,}]}')
    with pytest.raises(DataError, match=rf"{re.escape(str(path))}:2:\d+: invalid JSON"):
        load_bigbench("tiny", path)


def test_unknown_bigbench_task_suggests_names(bigbench_files):
    with pytest.raises(ConfigError, match="unknown BIG-bench multiple-choice task.*did you mean.*simple_arithmetic"):
        fetch_bigbench_tasks(["simple_arithmetic_json_multiple_choise"])
