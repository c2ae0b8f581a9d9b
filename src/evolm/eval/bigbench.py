"""BIG-bench multiple-choice tasks (Srivastava et al., 2022, "Beyond the Imitation Game").

The ``bigbench==1.0.0`` source distribution on PyPI carries every JSON task; 320 of them
(subtasks included, named by their folder: ``"arithmetic/1_digit_addition"``) are multiple choice:
every example has ``input`` and ``target_scores`` (choice text -> grade). Tasks are extracted one
by one into ``~/.cache/evolm/sdist/bigbench-1.0.0/bigbench/benchmark_tasks/<name>/task.json``
(where ``evolm.assets.sdist_member`` keeps sdist files) and never committed.

In December 2026 PyPI lists only ``bigbench 0.0.1`` (no tasks in it); where the 1.0.0 sdist cannot be
fetched the error says so and names ``--bigbench.path``, which reads any file in BIG-bench's format.

pip >= 26 refuses to *finish* ``pip download`` of this sdist (it declares a ``file://`` dependency
on ``bleurt``), after it has downloaded and unpacked it. So the sdist is fetched with ``pip
download --no-clean`` into a private temporary folder and the wanted files are taken from the tree
pip leaves there, which is then deleted. The list of multiple-choice tasks is kept next to them.

Prompts follow BIG-bench's ``JsonTask``: ``task_prefix``, then for each of the k shots and the
question ``example_input_prefix + input`` (default ``"\\nQ: "``), the choices appended in a
seeded permutation (``choice_prefix``, default ``"\\n  choice: "``, unless
``append_choices_to_input`` is false) and ``example_output_prefix`` (default ``"\\nA: "``); shots
end with their answer and are joined by ``few_shot_example_separator`` (default ``"\\n"``). Each
choice is scored as the continuation of that prompt; the grade of the chosen one is BIG-bench's
``multiple_choice_grade``.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from evolm.assets import cache_dir
from evolm.errors import CheckpointError, ConfigError, DataError
from evolm.eval.multiple_choice import MCItem

BIGBENCH_SDIST = "bigbench==1.0.0"
TASKS_DIR = "bigbench/benchmark_tasks"
_INDEX = ".evolm-multiple-choice-tasks.txt"
_DEFAULTS = {
    "task_prefix": "",
    "example_input_prefix": "\nQ: ",
    "example_output_prefix": "\nA: ",
    "choice_prefix": "\n  choice: ",
    "append_choices_to_input": True,
    "few_shot_example_separator": "\n",
}


@dataclass(frozen=True)
class BigBenchExample:
    """One multiple-choice example.

    Attributes:
        input: The question text.
        target_scores: Choice text -> grade, in file order.
        target: The answer shown when the example is a shot.
        line: Line of the task file where the example starts.
    """

    input: str
    target_scores: dict[str, float]
    target: str
    line: int = 0


@dataclass(frozen=True)
class BigBenchTask:
    """A BIG-bench JSON task's prompt settings and its valid multiple-choice examples.

    Attributes:
        name: Task name (folder under ``benchmark_tasks``).
        examples: The examples, in file order.
        format: The prompt settings (``task_prefix``, ``example_input_prefix``, ...; defaults filled).
        path: The file read.
    """

    name: str
    examples: list[BigBenchExample]
    format: dict = field(default_factory=dict)
    path: str = ""


def _root() -> Path:
    """Cache folder of the sdist's files (the layout of ``evolm.assets.sdist_member``)."""
    name, _, version = BIGBENCH_SDIST.partition("==")
    return cache_dir() / "sdist" / f"{name}-{version}"


def _task_file(name: str) -> Path:
    return _root() / TASKS_DIR / name / "task.json"


def fetch_bigbench_tasks(names: Sequence[str]) -> list[Path]:
    """Extract these tasks' ``task.json`` from the BIG-bench sdist into the cache, downloading once per call.

    Also records the names of all multiple-choice tasks (``bigbench_task_names``).

    Args:
        names: Task names; ones already cached are not fetched again.

    Returns:
        The task files, in the order of ``names``.

    Raises:
        ConfigError: a name that is no multiple-choice task (close matches suggested).
        CheckpointError: pip could not fetch the sdist.
    """
    index = _root() / _INDEX
    known = set(index.read_text().split()) if index.is_file() else None
    for n in names:
        if known is not None and n not in known:
            raise ConfigError(_unknown_task_message(n))
    missing = [n for n in names if not _task_file(n).is_file()]
    if missing or known is None:
        _extract(missing)
    for n in names:
        if not _task_file(n).is_file():
            raise ConfigError(_unknown_task_message(n))
    return [_task_file(n) for n in names]


def bigbench_task_file(name: str) -> Path:
    """``task.json`` of one multiple-choice task (fetched into the cache on first use)."""
    return fetch_bigbench_tasks([name])[0]


def bigbench_task_names() -> list[str]:
    """The 320 multiple-choice task names (downloads the sdist once if the list is not cached)."""
    index = _root() / _INDEX
    if not index.is_file():
        _extract([])
    return index.read_text().split()


def _unknown_task_message(name: str) -> str:
    names = bigbench_task_names()
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return (
        f"unknown BIG-bench multiple-choice task {name!r}{hint} ({len(names)} tasks: "
        f"{', '.join(names[:8])}, ...; `evolm eval --list-tasks` prints all)"
    )


def _extract(names: Sequence[str]) -> None:
    """Run pip on the sdist, copy ``names``' task files and the task list into the cache, clean up."""
    root = _root()
    tmp = root / f".unpack-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-clean", "--no-deps", "--no-binary=:all:"]
        cmd += ["-d", str(tmp / "dist"), BIGBENCH_SDIST]
        env = {**os.environ, "TMPDIR": str(tmp), "PIP_NO_INPUT": "1"}
        r = subprocess.run(cmd, capture_output=True, text=True, env=env)
        trees = sorted(tmp.glob(f"pip-*/*/{TASKS_DIR}"))
        if not trees:
            errors = [ln for ln in r.stderr.splitlines() if not ln.startswith("WARNING:")]
            raise CheckpointError(
                f"could not fetch the {BIGBENCH_SDIST} sdist with pip ({' '.join(errors)[-400:] or 'no output'}). "
                "PyPI lists only bigbench 0.0.1 today, which holds no tasks; put the 1.0.0 sdist on a package "
                "index pip reads (pip --find-links), or read a task file in BIG-bench's JSON format instead: "
                "`evolm eval MODEL --task bigbench:NAME --bigbench.path task.json` (load_bigbench(name, path))"
            )
        tasks = trees[0]
        mc = sorted(
            p.parent.relative_to(tasks).as_posix()
            for p in tasks.rglob("task.json")
            if b'"target_scores"' in p.read_bytes()
        )
        for n in names:
            if n in mc:
                target = _task_file(n)
                target.parent.mkdir(parents=True, exist_ok=True)
                part = target.with_name(f"task.json.{os.getpid()}.part")
                shutil.copyfile(tasks / n / "task.json", part)
                part.replace(target)
        part = root / f"{_INDEX}.{os.getpid()}.part"
        part.write_text("".join(f"{n}\n" for n in mc))
        part.replace(root / _INDEX)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _examples_with_lines(text: str) -> tuple[dict, list[tuple[int, object]]]:
    """The top-level fields of valid JSON ``text`` (``examples`` aside) and each example with its line.

    ``json`` gives no positions of nested values, so the top object and the ``examples`` array are
    walked with ``raw_decode``, which reports where each value ends.
    """
    decoder = json.JSONDecoder()
    space = re.compile(r"\s*")
    top: dict = {}
    examples: list[tuple[int, object]] = []
    line, counted = 1, 0

    def skip(i: int) -> int:
        return space.match(text, i).end()

    i = skip(0) + 1  # past "{"
    while True:
        i = skip(i)
        if text[i] == "}":
            return top, examples
        key, i = decoder.raw_decode(text, i)
        i = skip(skip(i) + 1)  # past ":"
        if key == "examples" and text[i] == "[":
            i = skip(i + 1)
            while text[i] != "]":
                line += text.count("\n", counted, i)
                counted = i
                value, i = decoder.raw_decode(text, i)
                examples.append((line, value))
                i = skip(i)
                if text[i] == ",":
                    i = skip(i + 1)
            i += 1
        else:
            top[key], i = decoder.raw_decode(text, i)
        i = skip(i)
        if text[i] == ",":
            i += 1


def _parse_example(raw: object) -> BigBenchExample:
    if not isinstance(raw, dict):
        raise ValueError(f"expected a JSON object, got {type(raw).__name__}")
    if not isinstance(raw.get("input"), str):
        raise ValueError("no string field 'input'")
    scores = raw.get("target_scores")
    if not isinstance(scores, dict) or len(scores) < 2:
        raise ValueError("'target_scores' must map at least 2 choices to grades")
    for k, v in scores.items():
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise ValueError(f"target_scores[{k!r}] = {v!r} is not a finite number")
    if max(scores.values()) <= min(scores.values()):
        raise ValueError("no choice scores higher than the others (no correct answer)")
    best = max(scores.values())
    target = raw.get("target")
    if isinstance(target, list):
        target = next((t for t in target if t in scores), None)
    if not isinstance(target, str) or target not in scores:
        target = next(k for k, v in scores.items() if v == best)
    return BigBenchExample(raw["input"], {k: float(v) for k, v in scores.items()}, target)


def load_bigbench(
    name: str,
    path: str | Path | None = None,
    on_bad_row: Literal["skip", "error"] = "error",
) -> tuple[BigBenchTask, list[str]]:
    """Read a BIG-bench JSON task.

    An example is malformed when it is not an object, has no string ``input``, or its
    ``target_scores`` has fewer than two choices, non-numeric grades or no best choice.

    Args:
        name: Task name (fetched from the sdist when ``path`` is None).
        path: A task file in BIG-bench's JSON format to read instead.
        on_bad_row: ``"error"`` raises on the first malformed example; ``"skip"`` skips it with a warning.

    Returns:
        ``(task, problems)``: problems are ``"file:line: reason"`` per skipped example.

    Raises:
        DataError: invalid JSON, a malformed example (``on_bad_row="error"``), or no valid example.
    """
    file = Path(path) if path is not None else bigbench_task_file(name)
    if not file.is_file():
        raise DataError(f"BIG-bench task file {file} does not exist")
    try:
        text = file.read_text(encoding="utf-8")
        top = json.loads(text)
    except UnicodeDecodeError as e:
        raise DataError(f"{file}: not valid UTF-8 at byte {e.start}") from e
    except json.JSONDecodeError as e:
        raise DataError(f"{file}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}") from e
    if not isinstance(top, dict) or not isinstance(top.get("examples"), list):
        raise DataError(f"{file}: expected a JSON object with an 'examples' list (a BIG-bench JSON task)")
    fields, raw_examples = _examples_with_lines(text)
    examples, problems = [], []
    for k, (line, raw) in enumerate(raw_examples):
        try:
            ex = _parse_example(raw)
        except ValueError as e:
            where = f"{file}:{line}: malformed example {k}: {e}"
            if on_bad_row == "error":
                raise DataError(f"{where} (pass --on_bad_row skip to skip such examples)") from e
            problems.append(where)
            continue
        examples.append(BigBenchExample(ex.input, ex.target_scores, ex.target, line))
    if problems:
        warnings.warn(f"{file}: skipped {len(problems)} malformed examples: {problems[:3]}", stacklevel=2)
    if not examples:
        raise DataError(f"{file}: no valid multiple-choice example")
    fmt = {k: fields.get(k, v) for k, v in _DEFAULTS.items()}
    return BigBenchTask(name, examples, fmt, str(file)), problems


def _formatted_input(ex: BigBenchExample, fmt: dict, seed: int) -> str:
    text = ex.input
    if fmt["append_choices_to_input"]:
        order = np.random.RandomState(seed).permutation(sorted(ex.target_scores))
        text += fmt["choice_prefix"] + fmt["choice_prefix"].join(str(c) for c in order)
    return fmt["example_input_prefix"] + text + fmt["example_output_prefix"]


def bigbench_items(task: BigBenchTask, num_fewshot: int = 0, limit: int | None = None, seed: int = 42) -> list[MCItem]:
    """Multiple-choice items of a BIG-bench task.

    Args:
        task: The task.
        num_fewshot: k solved examples before each question, drawn (seeded) from the other examples.
        limit: Ask only the first ``limit`` examples (shots still come from all).
        seed: Seed of the choice permutation (BIG-bench's default is 42) and of the shot draw.

    Returns:
        One ``MCItem`` per asked example, in the task's group.
    """
    fmt, examples = task.format, task.examples
    if num_fewshot and len(examples) < num_fewshot + 1:
        raise DataError(f"BIG-bench task {task.name!r} has {len(examples)} examples; {num_fewshot} shots need more")
    rng = np.random.RandomState(seed)
    items = []
    for i, ex in enumerate(examples[:limit]):
        prompt = _formatted_input(ex, fmt, seed)
        if num_fewshot:
            others = [j for j in range(len(examples)) if j != i]
            picks = rng.choice(others, num_fewshot, replace=False)
            shots = [_formatted_input(examples[j], fmt, seed) + examples[j].target for j in picks]
            prompt = fmt["few_shot_example_separator"].join([*shots, prompt])
        choices = tuple(ex.target_scores)
        items.append(
            MCItem(
                context=fmt["task_prefix"] + prompt,
                choices=choices,
                scores=tuple(ex.target_scores[c] for c in choices),
                group=task.name,
            )
        )
    return items
